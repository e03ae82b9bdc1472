// Fused eval-mode Ghost module on the CPU: primary 1x1 conv + BN1 + act, depthwise cheap op +
// BN2 + act, and the concatenation, in one pass over memory (DESIGN.md section 2).
//
// Work is split into tasks of (image, band of output rows). A task computes the intrinsic
// channels of its band plus a halo of dw/2 rows above and below into a per-thread buffer that
// stays in cache (halo rows are recomputed by both neighbours rather than re-read), writes the
// band's intrinsic rows to y[:, :init] and runs the depthwise conv from that buffer straight
// into y[:, init:oup]. Ghost channels beyond oup are never computed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ghost_common.h"

namespace ghostops::cpu {
namespace {

using at::vec::Vectorized;

template <Act A, typename T>
inline Vectorized<T> activate_vec(Vectorized<T> v) {
  if constexpr (A == Act::ReLU) {
    return at::vec::maximum(v, Vectorized<T>(T(0)));
  } else {
    return v;
  }
}

// Everything a task needs: sizes, strides (elements) and pointers.
template <typename T>
struct EvalParams {
  GhostShape s;
  const T* x;
  T* y;
  const T* w1;  // folded primary weight (init, inp)
  const T* b1;  // folded primary bias (init)
  const T* w2;  // folded cheap weight (ghost channels, dw * dw)
  const T* b2;  // folded cheap bias
  int64_t x_sn, x_sc, x_sh, x_sw;
  int64_t y_sn, y_sc, y_sh, y_sw;
  int64_t band_rows;  // output rows per task
};

// Register-blocked micro-kernel of the primary GEMM:
//   c[m][j] = act(bias[m] + sum_k a[m][k] * b[k][j]),  m < MR, j < (NV - 1) * VL + last.
// a: MR rows of the folded weight (row stride lda); b: K rows of pixels (row stride ldb).
// The last of the NV vectors holds `last` (1..VL) pixels and is loaded and stored masked.
template <typename T, int MR, int NV, Act A>
inline void gemm_micro(const T* a, int64_t lda, const T* bias, const T* b, int64_t ldb,
                       int64_t K, T* c, int64_t ldc, int64_t last) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec(bias[m]);
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
    for (int v = 0; v < NV - 1; ++v) bv[v] = Vec::loadu(b + k * ldb + v * VL);
    bv[NV - 1] = Vec::loadu(b + k * ldb + (NV - 1) * VL, last);
    for (int m = 0; m < MR; ++m) {
      const Vec av(a[m * lda + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = at::vec::fmadd(av, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV - 1; ++v) activate_vec<A>(acc[m][v]).store(c + m * ldc + v * VL);
    activate_vec<A>(acc[m][NV - 1]).store(c + m * ldc + (NV - 1) * VL, last);
  }
}

// Rows per register block: 24 accumulators fit the 32 registers of AVX-512, 12 the 16 of AVX2.
template <typename T>
constexpr int kMaxRows = Vectorized<T>::size() * sizeof(T) >= 64 ? 12 : 6;

// One block of MR weight rows against columns [j0, j1) of b, two vectors of pixels at a time.
template <typename T, int MR, Act A>
void gemm_rows(const T* a, const T* bias, int64_t K, const T* b, int64_t ldb, T* c, int64_t ldc,
               int64_t j0, int64_t j1) {
  constexpr int64_t VL = Vectorized<T>::size();
  for (int64_t j = j0; j < j1; j += 2 * VL) {
    const int64_t n = std::min(2 * VL, j1 - j);
    if (n > VL) {
      gemm_micro<T, MR, 2, A>(a, K, bias, b + j, ldb, K, c + j, ldc, n - VL);
    } else {
      gemm_micro<T, MR, 1, A>(a, K, bias, b + j, ldb, K, c + j, ldc, n);
    }
  }
}

// gemm_rows for a block of `rows` (1..kMaxRows) weight rows, the count made a template argument.
template <typename T, Act A, int MR = kMaxRows<T>>
void gemm_rows_dispatch(int64_t rows, const T* a, const T* bias, int64_t K, const T* b,
                        int64_t ldb, T* c, int64_t ldc, int64_t j0, int64_t j1) {
  if constexpr (MR >= 1) {
    if (rows == MR) return gemm_rows<T, MR, A>(a, bias, K, b, ldb, c, ldc, j0, j1);
    gemm_rows_dispatch<T, A, MR - 1>(rows, a, bias, K, b, ldb, c, ldc, j0, j1);
  }
}

// c (M, n) = act(a (M, K) @ b (K, n) + bias): the primary conv of one band of pixels.
// Columns go in chunks whose slice of b fits in L1; rows in register blocks of near-equal size.
template <typename T, Act A>
void primary_gemm(const T* a, const T* bias, int64_t M, int64_t K, const T* b, int64_t ldb,
                  T* c, int64_t ldc, int64_t n) {
  constexpr int64_t NB = 2 * Vectorized<T>::size();
  const int64_t chunk = std::max<int64_t>(
      NB, (int64_t(24 * 1024) / (std::max<int64_t>(K, 1) * int64_t(sizeof(T)))) / NB * NB);
  const int64_t blocks = (M + kMaxRows<T> - 1) / kMaxRows<T>;
  for (int64_t j0 = 0; j0 < n; j0 += chunk) {
    const int64_t j1 = std::min(n, j0 + chunk);
    for (int64_t blk = 0, m = 0; blk < blocks; ++blk) {
      const int64_t rows = (M - m) / (blocks - blk);  // spreads the remainder evenly
      gemm_rows_dispatch<T, A>(rows, a + m * K, bias + m, K, b, ldb, c + m * ldc, ldc, j0, j1);
      m += rows;
    }
  }
}

// Column masks of the depthwise conv over a band flattened to rows `width` pixels wide:
// masks[dx * ld + i] has all bits set where tap dx of pixel i lies inside the image, else 0.
template <typename T>
void column_masks(int64_t d, int64_t width, T* masks, int64_t ld) {
  T ones;
  std::memset(&ones, 0xFF, sizeof(T));
  const int64_t h = d / 2;
  for (int64_t dx = 0; dx < d; ++dx)
    for (int64_t i = 0; i < ld; ++i) {
      const int64_t col = i % width + dx - h;
      masks[dx * ld + i] = (col >= 0 && col < width) ? ones : T(0);
    }
}

// dst (total pixels) = act(bias + depthwise d x d conv of src), src holding the band's rows
// plus h halo rows above and below, `width` pixels each (rows outside the image are zero).
// Vectors run over the flattened band, so a tap left or right of the image reads the
// neighbouring row: the column masks zero it. src needs h readable elements before it and a
// vector's worth after it; masks need `total` rounded up to whole vectors.
template <typename T, Act A, int D>
void depthwise_band(const T* src, const T* w, T bias, int64_t d_runtime, int64_t total,
                    int64_t width, const T* masks, int64_t mask_ld, T* dst) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int64_t d = D > 0 ? D : d_runtime;
  const int64_t h = d / 2;
  for (int64_t i = 0; i < total; i += VL) {
    const T* p = src + i - h;
    Vec acc(bias);
    for (int64_t dx = 0; dx < d; ++dx) {
      Vec tap(T(0));
      for (int64_t dy = 0; dy < d; ++dy)
        tap = at::vec::fmadd(Vec(w[dy * d + dx]), Vec::loadu(p + dy * width + dx), tap);
      acc = acc + (dx == h ? tap : tap & Vec::loadu(masks + dx * mask_ld + i));
    }
    activate_vec<A>(acc).store(dst + i, std::min(VL, total - i));
  }
}

// Writes `channels` planes of (rows, width) pixels, plane stride `ld` in src, to dst with the
// given element strides; the loop order follows whichever side is contiguous.
template <typename T>
void store_planes(const T* src, int64_t ld, int64_t channels, int64_t rows, int64_t width,
                  T* dst, int64_t sc, int64_t sh, int64_t sw) {
  if (sc == 1) {  // channels_last: channels innermost in dst
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t col = 0; col < width; ++col) {
        T* out = dst + r * sh + col * sw;
        const T* in = src + r * width + col;
        for (int64_t c = 0; c < channels; ++c) out[c] = in[c * ld];
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

// A large output is a fresh mapping that the kernel touches first: asking for transparent huge
// pages before that turns ~500 page faults per MiB into one per 2 MiB (measured: filling a
// fresh 77 MB tensor, 29 ms with 4 KiB pages, 4.4 ms with huge pages). Advice only.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Per-thread scratch, kept between calls so the hot path does not allocate.
template <typename T>
T* scratch(int64_t elements) {
  thread_local std::vector<T> buffer;
  if (int64_t(buffer.size()) < elements) buffer.assign(elements, T(0));
  return buffer.data();
}

template <typename T, Act A>
void eval_band(const EvalParams<T>& p, int64_t n, int64_t row0) {
  const GhostShape& s = p.s;
  const int64_t h = s.dw / 2, wo = s.out_w, ho = s.out_h;
  const int64_t rows = std::min(p.band_rows, ho - row0);
  const int64_t buf_rows = rows + 2 * h;  // buffer row r is output row row0 - h + r
  const int64_t lo = std::max<int64_t>(row0 - h, 0), hi = std::min(row0 + rows + h, ho);
  const int64_t plane = buf_rows * wo + 2 * h;  // h spare elements at each end
  const bool y_rows_contiguous = p.y_sw == 1 && p.y_sh == wo;
  const bool x_rows_contiguous = s.stride == 1 && p.x_sw == 1 && p.x_sh == s.width;
  const int64_t pixels = (hi - lo) * wo;

  constexpr int64_t VL = Vectorized<T>::size();
  const int64_t mask_ld = (rows * wo + VL - 1) / VL * VL;
  const int64_t intr_elems = s.init * plane + VL;  // + the depthwise's overreach past the end
  const int64_t pack_elems = x_rows_contiguous ? 0 : s.inp * pixels;
  const int64_t ghost_elems = y_rows_contiguous ? 0 : s.ghost * rows * wo;
  T* intr = scratch<T>(intr_elems + pack_elems + ghost_elems + s.dw * mask_ld);
  T* pack = intr + intr_elems;
  T* ghost_buf = pack + pack_elems;
  T* masks = ghost_buf + ghost_elems;

  // The pixels of rows [lo, hi) as a (inp, pixels) matrix: x itself, or packed when strided.
  const T* xn = p.x + n * p.x_sn;
  const T* b = xn + lo * s.stride * p.x_sh;
  int64_t ldb = p.x_sc;
  if (!x_rows_contiguous) {
    if (p.x_sc == 1) {  // channels_last: transpose pixel-major rows into channel planes
      for (int64_t r = lo; r < hi; ++r)
        for (int64_t col = 0; col < wo; ++col) {
          const T* in = xn + r * s.stride * p.x_sh + col * s.stride * p.x_sw;
          T* out = pack + (r - lo) * wo + col;
          for (int64_t k = 0; k < s.inp; ++k) out[k * pixels] = in[k];
        }
    } else {
      for (int64_t k = 0; k < s.inp; ++k)
        for (int64_t r = lo; r < hi; ++r) {
          const T* in = xn + k * p.x_sc + r * s.stride * p.x_sh;
          T* out = pack + k * pixels + (r - lo) * wo;
          for (int64_t col = 0; col < wo; ++col) out[col] = in[col * s.stride * p.x_sw];
        }
    }
    b = pack;
    ldb = pixels;
  }

  // Intrinsic channels of the band and its halo; rows outside the image are zero padding.
  T* first_row = intr + h;
  const int64_t pad_top = (lo - (row0 - h)) * wo, pad_bottom = (row0 + rows + h - hi) * wo;
  for (int64_t c = 0; c < s.init; ++c) {
    std::fill_n(first_row + c * plane, pad_top, T(0));
    std::fill_n(first_row + c * plane + pad_top + pixels, pad_bottom, T(0));
  }
  primary_gemm<T, A>(p.w1, p.b1, s.init, s.inp, b, ldb, first_row + pad_top, plane, pixels);

  T* yb = p.y + n * p.y_sn + row0 * p.y_sh;
  store_planes(first_row + h * wo, plane, s.init, rows, wo, yb, p.y_sc, p.y_sh, p.y_sw);

  // Ghost channels: ghost j is the depthwise conv of intrinsic j / (ratio - 1).
  column_masks(s.dw, wo, masks, mask_ld);
  for (int64_t j = 0; j < s.ghost; ++j) {
    const T* src = first_row + (j / (s.ratio - 1)) * plane;
    T* dst = y_rows_contiguous ? yb + (s.init + j) * p.y_sc : ghost_buf + j * rows * wo;
    const T* w = p.w2 + j * s.dw * s.dw;
    if (s.dw == 3) {
      depthwise_band<T, A, 3>(src, w, p.b2[j], 3, rows * wo, wo, masks, mask_ld, dst);
    } else {
      depthwise_band<T, A, 0>(src, w, p.b2[j], s.dw, rows * wo, wo, masks, mask_ld, dst);
    }
  }
  if (!y_rows_contiguous)
    store_planes<T>(ghost_buf, rows * wo, s.ghost, rows, wo, yb + s.init * p.y_sc, p.y_sc,
                    p.y_sh, p.y_sw);
}

// Output rows per task: the band's intrinsic buffer should stay in L2, and there should be
// enough tasks to keep every thread busy.
int64_t choose_band_rows(const GhostShape& s, int64_t elem_size) {
  const int64_t h = s.dw / 2;
  const int64_t bytes_per_row = (s.init + s.inp + s.ghost) * s.out_w * elem_size;
  const int64_t budget = 512 * 1024;
  int64_t rows = std::clamp<int64_t>(budget / std::max<int64_t>(bytes_per_row, 1) - 2 * h, 1,
                                     s.out_h);
  const int64_t threads = at::get_num_threads();
  const int64_t bands_wanted = (threads + s.batch - 1) / s.batch;
  if (bands_wanted > 1) rows = std::min(rows, (s.out_h + bands_wanted - 1) / bands_wanted);
  return std::max<int64_t>(rows, 1);
}

template <typename T, Act A>
void eval_run(const EvalParams<T>& p) {
  const int64_t bands = (p.s.out_h + p.band_rows - 1) / p.band_rows;
  at::parallel_for(0, p.s.batch * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      eval_band<T, A>(p, task / bands, (task % bands) * p.band_rows);
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
  const auto [w1, b1] = fold_bn(primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps);
  const auto [w2, b2] = fold_bn(cheap_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps);
  at::Tensor y = at::empty({s.batch, s.oup, s.out_h, s.out_w},
                           x.options().memory_format(x.suggest_memory_format()));
  if (y.numel() == 0) return y;
  advise_huge_pages(y.mutable_data_ptr(), y.nbytes());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_forward_eval_cpu", [&] {
    EvalParams<scalar_t> p{s,
                           x.const_data_ptr<scalar_t>(),
                           y.mutable_data_ptr<scalar_t>(),
                           w1.const_data_ptr<scalar_t>(),
                           b1.const_data_ptr<scalar_t>(),
                           w2.const_data_ptr<scalar_t>(),
                           b2.const_data_ptr<scalar_t>(),
                           x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                           y.stride(0), y.stride(1), y.stride(2), y.stride(3),
                           choose_band_rows(s, sizeof(scalar_t))};
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
