// Fused eval-mode Ghost module on the CPU: primary 1x1 conv + BN1 + act, depthwise cheap op +
// BN2 + act, and the concatenation, in one pass over memory (DESIGN.md section 2).
//
// Work is split into tasks: a band of output rows of one image, or several whole images when
// maps are small. A task computes the intrinsic channels of its band plus a halo of dw/2 rows
// into a per-thread buffer that stays in cache (halo rows are recomputed by both neighbouring
// bands rather than re-read), with a register-blocked GEMM over packed panels of pixels; writes
// the intrinsic rows to y[:, :init]; and runs the depthwise conv from that buffer straight into
// y[:, init:oup], masking taps that fall off the image. Ghost channels beyond oup are never
// computed. Both BatchNorms are folded into the convs beforehand.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ghost_common.h"
#include "kernels.h"
#include "output_pool.h"

namespace ghostops::cpu {
namespace {

// Everything a task needs: sizes, strides (elements) and pointers.
template <typename T>
struct EvalParams {
  GhostShape s;
  const T* x;
  T* y;
  GemmWeight<T> w1;  // primary weight: packed with BN1 folded, or in place with BN1's scale
  const T* b1;  // folded primary bias (init)
  const T* w2;  // folded cheap weight (ghost channels, dw * dw)
  const T* b2;  // folded cheap bias
  int64_t x_sn, x_sc, x_sh, x_sw;
  int64_t y_sn, y_sc, y_sh, y_sw;
  int64_t band_rows;  // output rows per task
  int64_t images;     // images per task (> 1 only when a band is a whole image)
  int64_t channel_blocks;  // tasks an image's intrinsic channels split into (whole images)
  bool x_packed;      // x's rows are strided or channels_last: gathered before the GEMM
  bool y_buffered;    // y's rows are not contiguous: ghost rows go through a buffer
  bool stream;        // y is far larger than the cache: written with non-temporal stores
};

// Writes `channels` planes of (rows, width) pixels, plane stride `ld` in src, to dst with the
// given element strides; the loop order follows whichever side is contiguous.
template <typename T>
void store_planes(const T* src, int64_t ld, int64_t channels, int64_t rows, int64_t width,
                  T* dst, int64_t sc, int64_t sh, int64_t sw, bool stream = false) {
  if (sc == 1) {  // channels_last: channels innermost in dst
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t col = 0; col < width; ++col) {
        T* out = dst + r * sh + col * sw;
        const T* in = src + r * width + col;
        for (int64_t c = 0; c < channels; ++c) out[c] = in[c * ld];
      }
    return;
  }
  if (sw == 1 && sh == width) {  // each channel's rows are one run in src and in dst
    using Vec = Vectorized<T>;
    for (int64_t c = 0; c < channels; ++c) {
      const T* in = src + c * ld;
      T* out = dst + c * sc;
      for (int64_t i = 0, n = rows * width; i < n; i += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), n - i);
        store_maybe_streaming(Vec::loadu(in + i, count), out + i, count, stream);
      }
    }
    return;
  }
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const T* in = src + c * ld + r * width;
      T* out = dst + c * sc + r * sh;
      if (sw == 1) {
        std::memcpy(out, in, width * sizeof(T));
      } else {
        for (int64_t col = 0; col < width; ++col) out[col * sw] = in[col];
      }
    }
}

// One task: output rows [row0, row0 + rows) of images [n0, n0 + images), intrinsic channels of
// block `cb` of p.channel_blocks (with their ghost channels). Several images go together only
// when each is whole (row0 == 0, rows == out_h): small maps then fill the GEMM's vectors across
// image boundaries instead of leaving the tail of each image half empty.
template <typename T, Act A>
void eval_task(const EvalParams<T>& p, int64_t n0, int64_t images, int64_t row0, int64_t cb) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const GhostShape& s = p.s;
  const int64_t h = s.dw / 2, wo = s.out_w, ho = s.out_h;
  const int64_t rows = std::min(p.band_rows, ho - row0);
  const int64_t lo = std::max<int64_t>(row0 - h, 0), hi = std::min(row0 + rows + h, ho);
  const int64_t npx = (hi - lo) * wo;   // intrinsic pixels computed per image (band + halo)
  const int64_t total = rows * wo;      // output pixels per image
  const int64_t margin = h * wo + h;    // readable slack around each channel's pixels
  const int64_t plane = images * npx + 2 * margin + VL;
  const bool y_rows_contiguous = !p.y_buffered;
  const bool x_rows_contiguous = !p.x_packed;
  const int64_t mask_ld = (total + VL - 1) / VL * VL;

  const int64_t intr_elems = s.init * plane;
  const int64_t pack_elems = x_rows_contiguous ? 0 : s.inp * images * npx;
  const int64_t ghost_elems = y_rows_contiguous ? 0 : s.ghost * total;
  const int64_t mask_elems = 2 * s.dw * mask_ld;
  T* intr = scratch<T>(intr_elems + pack_elems + ghost_elems + mask_elems + s.inp * kPanel<T>);
  T* pack = intr + intr_elems;
  T* ghost_buf = pack + pack_elems;
  T* col_masks = ghost_buf + ghost_elems;
  T* row_masks = col_masks + s.dw * mask_ld;
  T* panel = row_masks + s.dw * mask_ld;

  // The input pixels of rows [lo, hi): x itself, or gathered when strided or channels_last.
  PixelMatrix<T> b{p.x + n0 * p.x_sn + lo * p.x_sh, p.x_sc, p.x_sn, npx, images};
  if (!x_rows_contiguous) {
    for (int64_t g = 0; g < images; ++g) {
      const T* xn = p.x + (n0 + g) * p.x_sn;
      T* out_g = pack + g * npx;
      const int64_t ld = images * npx;
      if (p.x_sc == 1) {  // channels_last: transpose pixel-major rows into channel rows
        for (int64_t r = lo; r < hi; ++r)
          for (int64_t col = 0; col < wo; ++col) {
            const T* in = xn + r * s.stride * p.x_sh + col * s.stride * p.x_sw;
            T* out = out_g + (r - lo) * wo + col;
            for (int64_t k = 0; k < s.inp; ++k) out[k * ld] = in[k];
          }
      } else {
        for (int64_t k = 0; k < s.inp; ++k)
          for (int64_t r = lo; r < hi; ++r) {
            const T* in = xn + k * p.x_sc + r * s.stride * p.x_sh;
            T* out = out_g + k * ld + (r - lo) * wo;
            for (int64_t col = 0; col < wo; ++col) out[col] = in[col * s.stride * p.x_sw];
          }
      }
    }
    b = PixelMatrix<T>{pack, images * npx, npx, npx, images};
  }

  // Intrinsic channels [c0, c1) of every image's band and halo, image after image in each
  // channel row; c0 and c1 on boundaries of the packed weight's register blocks.
  const int64_t blocks = row_blocks(s.init, kMaxRows<T>);
  const int64_t blk0 = blocks * cb / p.channel_blocks;
  const int64_t blk1 = blocks * (cb + 1) / p.channel_blocks;
  const int64_t c0 = row_block_start(s.init, blocks, blk0);
  const int64_t c1 = row_block_start(s.init, blocks, blk1);
  const int64_t j0 = std::min(c0 * (s.ratio - 1), s.ghost);
  const int64_t j1 = std::min(c1 * (s.ratio - 1), s.ghost);
  T* intr0 = intr + margin;
  primary_gemm<T, A>(p.w1, p.b1, s.init, s.inp, b, intr0, plane, panel, blk0, blk1);

  tap_masks(s.dw, row0, rows, ho, wo, col_masks, row_masks, mask_ld);
  const int64_t top_rows = std::clamp<int64_t>(h - row0, 0, rows);
  const int64_t bottom_rows = std::clamp<int64_t>(row0 + rows + h - ho, 0, rows);
  for (int64_t g = 0; g < images; ++g) {
    const T* band = intr0 + g * npx + (row0 - lo) * wo;  // output row row0 of image g
    T* yb = p.y + (n0 + g) * p.y_sn + row0 * p.y_sh;
    store_planes(band + c0 * plane, plane, c1 - c0, rows, wo, yb + c0 * p.y_sc, p.y_sc, p.y_sh,
                 p.y_sw, p.stream);
    // Ghost channels: ghost j is the depthwise conv of intrinsic j / (ratio - 1).
    for (int64_t j = j0; j < j1; ++j) {
      const T* src = band + (j / (s.ratio - 1)) * plane;
      T* dst = y_rows_contiguous ? yb + (s.init + j) * p.y_sc : ghost_buf + j * total;
      const T* w = p.w2 + j * s.dw * s.dw;
      if (s.dw == 3) {
        depthwise_band<T, A, 3>(src, w, p.b2[j], 3, wo, total, top_rows, bottom_rows,
                                col_masks, row_masks, mask_ld, dst, p.stream);
      } else {
        depthwise_band<T, A, 0>(src, w, p.b2[j], s.dw, wo, total, top_rows, bottom_rows,
                                col_masks, row_masks, mask_ld, dst, p.stream);
      }
    }
    if (!y_rows_contiguous)
      store_planes<T>(ghost_buf + j0 * total, total, j1 - j0, rows, wo,
                      yb + (s.init + j0) * p.y_sc, p.y_sc, p.y_sh, p.y_sw);
  }
  if (p.stream) stream_fence();
}

// How work is split: output rows per band, images per task when bands are whole images, and
// blocks of intrinsic channels per image.
struct TaskSplit {
  int64_t band_rows, images, channel_blocks;
};

// Maps of at most this many pixels (14x14 and 7x7 in GhostNet) split channels, not rows, when
// there are fewer images than threads.
constexpr int64_t kSmallMapPixels = 256;

// A task's buffers should stay in L2, and there should be enough tasks for every thread.
// gemm_blocks: the register blocks the intrinsic channels pack into (row_blocks).
TaskSplit choose_split(const GhostShape& s, bool x_packed, bool y_buffered, int64_t elem_size,
                       int64_t vector_size, int64_t gemm_blocks) {
  const int64_t h = s.dw / 2;
  // Per output row: intrinsic rows, plus gathered input rows and buffered ghost rows if any.
  const int64_t channels = s.init + (x_packed ? s.inp : 0) + (y_buffered ? s.ghost : 0);
  const int64_t bytes_per_row = channels * s.out_w * elem_size;
  const int64_t budget = 512 * 1024;
  int64_t rows = std::clamp<int64_t>(budget / std::max<int64_t>(bytes_per_row, 1) - 2 * h, 1,
                                     s.out_h);
  const int64_t threads = at::get_num_threads();
  const int64_t bands_wanted = (threads + s.batch - 1) / s.batch;
  // Too few images for the threads. A small map that fits whole splits its intrinsic channels
  // instead of its rows: bands of a 7x7 map recompute their halo rows and leave their GEMM
  // panels mostly empty (at batch 1, 160->960 7x7 did 2.6x the GEMM work it needed).
  if (bands_wanted > 1 && gemm_blocks > 1 && rows == s.out_h &&
      s.out_h * s.out_w <= kSmallMapPixels) {
    return {rows, 1, std::min(bands_wanted, gemm_blocks)};
  }
  if (bands_wanted > 1) rows = std::min(rows, (s.out_h + bands_wanted - 1) / bands_wanted);
  rows = std::max<int64_t>(rows, 1);
  // Few tasks: as many bands as make the tasks a multiple of the threads, so that each gets
  // the same share (the threads take contiguous runs of tasks). At batch 1, 16->48 112x112
  // had three bands of 45, 45 and 22 rows on two threads: one thread did 80 % of the work.
  int64_t bands = (s.out_h + rows - 1) / rows;
  if (s.batch * bands < 8 * threads) {
    while (bands < s.out_h && (s.batch * bands) % threads != 0) ++bands;
    rows = (s.out_h + bands - 1) / bands;
  }
  int64_t images = 1;
  if (rows == s.out_h) {
    // Enough pixels per task to fill 16 GEMM panels, within the budget, and >= 4 tasks a thread.
    const int64_t pixels = s.out_h * s.out_w;
    const int64_t wanted = (16 * 2 * vector_size + pixels - 1) / pixels;
    const int64_t fit = budget / std::max<int64_t>(bytes_per_row * s.out_h, 1);
    const int64_t spread = s.batch / (4 * threads);
    images = std::max<int64_t>(1, std::min({wanted, fit, spread}));
  }
  return {rows, images, 1};
}

// The eval op's weights with both BatchNorms folded in, w' = w * gamma / sqrt(var + eps) and
// b = beta - mean * gamma / sqrt(var + eps), in one buffer: the primary weight's per-row scale
// and bias, and the cheap weights and biases of the ghost channels (those past oup are never
// computed). The primary weight itself is read in place by the GEMM, which applies the scale
// to its accumulators, when its rows are contiguous (the usual case); else it is packed here
// with the scale folded in. Packing every call cost batch-1 calls 10-20 % (960->160 7x7:
// 61-62 -> 49-52 us; 160->960 7x7 67-69 -> 59-60 us), and nothing at batch 32. Plain loops
// over the arguments' strides: at batch 1, the dozen small ATen ops that folded and copied
// them took a fifth of a small module's call.
template <typename T>
struct FoldedWeights {
  std::unique_ptr<T[]> data;  // uninitialised: every entry is written
  GemmWeight<T> w1;
  const T *b1, *w2, *b2;
};

template <typename T>
FoldedWeights<T> fold_weights(const GhostShape& s, const at::Tensor& primary_weight,
                              const at::Tensor& g1, const at::Tensor& beta1,
                              const at::Tensor& mean1, const at::Tensor& var1, double eps1,
                              const at::Tensor& cheap_weight, const at::Tensor& g2,
                              const at::Tensor& beta2, const at::Tensor& mean2,
                              const at::Tensor& var2, double eps2) {
  const int64_t taps = s.dw * s.dw;
  const int64_t lda =
      in_place_lda(s.init, s.inp, primary_weight.stride(0), primary_weight.stride(1));
  const bool in_place = lda > 0;
  const int64_t packed_elems = in_place ? 0 : s.init * s.inp;
  FoldedWeights<T> f;
  f.data.reset(new T[packed_elems + s.init + s.init + s.ghost * taps + s.ghost]);
  T* w1 = f.data.get();
  T* b1 = w1 + packed_elems;
  T* scale1 = b1 + s.init;
  T* w2 = scale1 + s.init;
  T* b2 = w2 + s.ghost * taps;
  // Element i of a 1-D argument, through its stride.
  struct Vector {
    const T* data;
    int64_t stride;
    explicit Vector(const at::Tensor& v) : data(v.const_data_ptr<T>()), stride(v.stride(0)) {}
    double operator[](int64_t i) const { return double(data[i * stride]); }
  };
  auto fold = [](const Vector& g, const Vector& beta, const Vector& mean, const Vector& var,
                 double eps, int64_t c, T& scale, T& bias) {
    std::tie(scale, bias) = bn_affine(T(mean[c]), T(var[c]), T(g[c]), T(beta[c]), eps);
  };
  const Vector vg1(g1), vbeta1(beta1), vmean1(mean1), vvar1(var1);
  for (int64_t m = 0; m < s.init; ++m) fold(vg1, vbeta1, vmean1, vvar1, eps1, m, scale1[m], b1[m]);
  const T* pw = primary_weight.const_data_ptr<T>();
  const int64_t pw_s0 = primary_weight.stride(0), pw_s1 = primary_weight.stride(1);
  if (in_place) {
    f.w1 = GemmWeight<T>{pw, lda, scale1};
  } else {
    f.w1 = GemmWeight<T>{w1};
    // A scalar transpose: split over threads when it is large.
    const int64_t blocks = row_blocks(s.init, kMaxRows<T>);
    const int64_t grain =
        std::max<int64_t>(1, 16384 / (kMaxRows<T> * std::max<int64_t>(s.inp, 1)));
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      pack_weight(pw, s.init, s.inp, pw_s0, pw_s1, static_cast<const T*>(scale1), w1, begin,
                  end);
    });
  }
  const Vector vg2(g2), vbeta2(beta2), vmean2(mean2), vvar2(var2);
  const T* cw = cheap_weight.const_data_ptr<T>();
  const int64_t cs0 = cheap_weight.stride(0), cs2 = cheap_weight.stride(2);
  const int64_t cs3 = cheap_weight.stride(3);
  for (int64_t j = 0; j < s.ghost; ++j) {
    T scale;
    fold(vg2, vbeta2, vmean2, vvar2, eps2, j, scale, b2[j]);
    // Rows and columns as loops: t / dw and t % dw per tap were two integer divisions each,
    // a tenth of a batch-1 call (160->960 7x7: 4320 taps) while the other thread waited.
    const T* src = cw + j * cs0;
    T* dst = w2 + j * taps;
    for (int64_t ky = 0; ky < s.dw; ++ky)
      for (int64_t kx = 0; kx < s.dw; ++kx) dst[ky * s.dw + kx] = src[ky * cs2 + kx * cs3] * scale;
  }
  f.b1 = b1, f.w2 = w2, f.b2 = b2;
  return f;
}

// Whether y is written with non-temporal stores: when it is far larger than the last-level
// cache (the next layer reads it from memory anyway, and write-allocating its lines first would
// read as many bytes again), its rows are written straight (not through the ghost buffer), and
// every plane starts 64-byte aligned, so the streamed vectors fill whole lines. Measured at
// batch 32 (fp32, medians, interleaved): 16->16 112x112 1.71-1.77 -> 1.51-1.59 ms, 24->72 56x56
// 1.37-1.59 -> 1.32-1.37 ms, 48->24 56x56 0.96-1.45 -> 0.85-0.88 ms, 40->240 28x28 1.35-1.38
// -> 1.22-1.28 ms; 14x14 maps (planes not aligned) unchanged.
bool stream_output(const at::Tensor& y, bool y_buffered) {
  constexpr size_t kStreamBytes = size_t(8) << 20;
  const int64_t plane_bytes = y.size(2) * y.size(3) * int64_t(y.element_size());
  return y.scalar_type() == at::kFloat && !y_buffered && y.nbytes() >= kStreamBytes &&
         plane_bytes % 64 == 0;
}

template <typename T, Act A>
void eval_run(const EvalParams<T>& p) {
  const int64_t bands = (p.s.out_h + p.band_rows - 1) / p.band_rows;
  const int64_t groups = (p.s.batch + p.images - 1) / p.images;
  const int64_t per_group = bands * p.channel_blocks;
  at::parallel_for(0, groups * per_group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = (task / per_group) * p.images;
      const int64_t band = task % per_group / p.channel_blocks;
      eval_task<T, A>(p, n0, std::min(p.images, p.s.batch - n0), band * p.band_rows,
                      task % p.channel_blocks);
    }
  });
}

at::Tensor ghost_forward_eval_cpu(const at::Tensor& x, const at::Tensor& primary_weight,
                                  const at::Tensor& bn1_weight, const at::Tensor& bn1_bias,
                                  const at::Tensor& bn1_mean, const at::Tensor& bn1_var,
                                  double bn1_eps, const at::Tensor& cheap_weight,
                                  const at::Tensor& bn2_weight, const at::Tensor& bn2_bias,
                                  const at::Tensor& bn2_mean, const at::Tensor& bn2_var,
                                  double bn2_eps, int64_t oup, int64_t stride,
                                  c10::string_view act) {
  const GhostShape s = check_ghost_args(x, primary_weight, bn1_weight, bn1_bias, bn1_mean,
                                        bn1_var, cheap_weight, bn2_weight, bn2_bias, bn2_mean,
                                        bn2_var, oup, stride);
  TORCH_CHECK(x.device().is_cpu(), "ghost_forward_eval (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "ghost_forward_eval (CPU kernel): dtype must be float32 or float64, got ",
              x.scalar_type());
  const Act activation = parse_act(std::string(act));
  at::Tensor y = pooled_empty({s.batch, s.oup, s.out_h, s.out_w}, x.options(),
                              x.suggest_memory_format());
  if (y.numel() == 0) return y;
  advise_huge_pages(y.mutable_data_ptr(), y.nbytes());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_forward_eval_cpu", [&] {
    const FoldedWeights<scalar_t> f = fold_weights<scalar_t>(
        s, primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, cheap_weight,
        bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps);
    const bool x_packed = !(stride == 1 && x.stride(3) == 1 && x.stride(2) == s.width);
    const bool y_buffered = !(y.stride(3) == 1 && y.stride(2) == s.out_w);
    const TaskSplit split =
        choose_split(s, x_packed, y_buffered, sizeof(scalar_t), Vectorized<scalar_t>::size(),
                     row_blocks(s.init, kMaxRows<scalar_t>));
    const EvalParams<scalar_t> p{s,
                                 x.const_data_ptr<scalar_t>(),
                                 y.mutable_data_ptr<scalar_t>(),
                                 f.w1,
                                 f.b1,
                                 f.w2,
                                 f.b2,
                                 x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                                 y.stride(0), y.stride(1), y.stride(2), y.stride(3),
                                 split.band_rows, split.images, split.channel_blocks,
                                 x_packed, y_buffered,
                                 stream_output(y, y_buffered)};
    if (activation == Act::ReLU) {
      eval_run<scalar_t, Act::ReLU>(p);
    } else {
      eval_run<scalar_t, Act::Identity>(p);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CPU, m) {
  m.impl("ghost_forward_eval", &ghost_forward_eval_cpu);
}

}  // namespace ghostops::cpu
