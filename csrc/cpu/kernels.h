// Building blocks of the fused CPU kernels (eval, training forward, backward): the packed
// register-blocked GEMM of the primary 1x1 conv, the masked depthwise conv over flattened
// bands, and per-thread scratch. Templates on the element type; vectors are at::vec's, so the
// same code builds for AVX-512, AVX2 or plain C++ (setup.py picks the ISA).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ghost_common.h"

namespace ghostops::cpu {

using at::vec::Vectorized;

template <Act A, typename T>
inline Vectorized<T> activate_vec(Vectorized<T> v) {
  if constexpr (A == Act::ReLU) {
    return at::vec::maximum(v, Vectorized<T>(T(0)));
  } else {
    return v;
  }
}

// Rows per register block: 24 accumulators fit the 32 registers of AVX-512, 12 the 16 of AVX2.
template <typename T>
constexpr int64_t kMaxRows = Vectorized<T>::size() * sizeof(T) >= 64 ? 12 : 6;
// Pixels per packed panel: two vectors (gemm_micro's row step).
template <typename T>
constexpr int64_t kPanel = 2 * Vectorized<T>::size();

// v.store(p, count), or with `stream` and when p is a full, aligned vector of floats (AVX-512
// or AVX2), a non-temporal store: it writes the line without reading it first, and leaves
// the cache to the data still to be read. Outputs much larger than the cache take it; the
// writer must _mm_sfence() (stream_fence) before others read them.
template <typename T>
inline void store_maybe_streaming(Vectorized<T> v, T* p, int64_t count, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t VL = Vectorized<T>::size();
    if (stream && count == VL && reinterpret_cast<uintptr_t>(p) % (VL * sizeof(T)) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      return _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
      return _mm256_stream_ps(p, v);
#endif
    }
  }
  v.store(p, count);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// The weight operand of the primary GEMM: packed by pack_weight (lda == 0, any BatchNorm
// scale already folded in), or read in place, row-major with rows lda apart, each row's
// accumulator multiplied by scale[row] (a BatchNorm folded in) before the bias. In place needs
// no packing pass: on batch-1 maps the pass cost as much as the GEMM it prepared.
template <typename T>
struct GemmWeight {
  const T* data;
  int64_t lda = 0;
  const T* scale = nullptr;
};

// The row stride (GemmWeight::lda) with which an (M, K) weight, element (m, k) at
// m * s0 + k * s1, is read in place, or 0 where it must be packed: k not contiguous, or rows
// of stride 0 (an expanded weight: lda 0 would read as "packed"). One row's stride is never
// used, so it reads as K.
inline int64_t in_place_lda(int64_t M, int64_t K, int64_t s0, int64_t s1) {
  if (s1 != 1) return 0;
  if (M == 1) return std::max<int64_t>(K, 1);
  return std::max<int64_t>(s0, 0);
}

// Register-blocked micro-kernel of the primary GEMM, on a packed panel of pixels:
//   c[m][j] = act(s[m] * sum_k a[k][m] * b[k][j] + bias[m]),  m < MR, j < (NV - 1) * VL + last,
// s[m] = 1 for a packed weight block (a: MR values per k, k-major), scale[m] in place (a: row
// m at a + m * lda). b: kPanel elements per k, NV vectors of them used. The last vector
// stores `last` (1..VL) pixels.
template <typename T, int MR, int NV, Act A, bool IN_PLACE>
inline void gemm_micro(const T* a, int64_t lda, const T* scale, const T* bias, const T* b,
                       int64_t K, T* c, int64_t ldc, int64_t last) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = IN_PLACE ? Vec(T(0)) : Vec(bias[m]);
  for (int64_t k = 0; k < K; ++k, a += IN_PLACE ? 1 : MR, b += kPanel<T>) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + v * VL);
    for (int m = 0; m < MR; ++m) {
      const Vec av(IN_PLACE ? a[m * lda] : a[m]);
      for (int v = 0; v < NV; ++v) acc[m][v] = at::vec::fmadd(av, bv[v], acc[m][v]);
    }
  }
  if constexpr (IN_PLACE) {
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v)
        acc[m][v] = at::vec::fmadd(acc[m][v], Vec(scale[m]), Vec(bias[m]));
  }
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV - 1; ++v) activate_vec<A>(acc[m][v]).store(c + m * ldc + v * VL);
    activate_vec<A>(acc[m][NV - 1]).store(c + m * ldc + (NV - 1) * VL, last);
  }
}

// The weight's rows split into register blocks of near-equal size: block `blk` of `blocks`
// starts at row row_block_start(M, blk).
inline int64_t row_blocks(int64_t M, int64_t max_rows) { return (M + max_rows - 1) / max_rows; }
inline int64_t row_block_start(int64_t M, int64_t blocks, int64_t blk) {
  return M / blocks * blk + std::min(blk, M % blocks);
}

// Packs a weight matrix (M, K), element (m, k) at w[m * sm + k * sk], block by block, k-major
// inside a block: the layout gemm_micro reads. Block starting at row m occupies
// [m * K, (m + rows) * K). With row_scale, row m is multiplied by row_scale[m] on the way (a
// BatchNorm folded in). Reads follow whichever of w's strides is smaller.
// Only blocks [blk0, blk1) of the row_blocks(M, kMaxRows) when given.
template <typename T>
void pack_weight(const T* w, int64_t M, int64_t K, int64_t sm, int64_t sk, const T* row_scale,
                 T* packed, int64_t blk0 = 0, int64_t blk1 = -1) {
  const int64_t blocks = row_blocks(M, kMaxRows<T>);
  if (blk1 < 0) blk1 = blocks;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t m0 = row_block_start(M, blocks, blk);
    const int64_t rows = row_block_start(M, blocks, blk + 1) - m0;
    T* out = packed + m0 * K;
    auto put = [&](int64_t r, int64_t k) {
      const T v = w[(m0 + r) * sm + k * sk];
      out[k * rows + r] = row_scale != nullptr ? v * row_scale[m0 + r] : v;
    };
    if (sk <= sm) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) put(r, k);
    } else {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < rows; ++r) put(r, k);
    }
  }
}

template <typename T, Act A, int64_t MR = kMaxRows<T>>
void gemm_block_dispatch(int64_t rows, bool two_vectors, const GemmWeight<T>& w, int64_t m0,
                         int64_t K, const T* bias, const T* panel, T* c, int64_t ldc,
                         int64_t last) {
  if constexpr (MR >= 1) {
    if (rows != MR)
      return gemm_block_dispatch<T, A, MR - 1>(rows, two_vectors, w, m0, K, bias, panel, c,
                                               ldc, last);
    if (w.lda == 0) {  // packed: block m0 starts at m0 * K
      const T* a = w.data + m0 * K;
      if (two_vectors) return gemm_micro<T, MR, 2, A, false>(a, 0, nullptr, bias + m0, panel,
                                                             K, c, ldc, last);
      return gemm_micro<T, MR, 1, A, false>(a, 0, nullptr, bias + m0, panel, K, c, ldc, last);
    }
    const T* a = w.data + m0 * w.lda;
    if (two_vectors) return gemm_micro<T, MR, 2, A, true>(a, w.lda, w.scale + m0, bias + m0,
                                                          panel, K, c, ldc, last);
    gemm_micro<T, MR, 1, A, true>(a, w.lda, w.scale + m0, bias + m0, panel, K, c, ldc, last);
  }
}

// The pixels the primary GEMM reads, as a (K, images * npx) matrix: `images` images of `npx`
// pixels each, contiguous within a row; rows `ld` apart, images `image_stride` apart.
template <typename T>
struct PixelMatrix {
  const T* data;
  int64_t ld, image_stride, npx, images;
};

// Copies columns [j, j + cols) of b, all K rows, into a k-major panel of kPanel columns.
// A panel may straddle images. Lanes past `cols` are left as they are (never stored).
template <typename T>
void pack_panel(const PixelMatrix<T>& b, int64_t K, int64_t j, int64_t cols, T* panel) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size(), NB = kPanel<T>;
  for (int64_t q = j; q < j + cols;) {
    const int64_t g = q / b.npx, px = q % b.npx;
    const int64_t len = std::min(b.npx - px, j + cols - q);
    const T* src = b.data + g * b.image_stride + px;
    T* dst = panel + (q - j);
    if (len == NB) {
      for (int64_t k = 0; k < K; ++k, src += b.ld, dst += NB) {
        // Dozens of channel rows stream at once, more than the hardware prefetcher follows.
        __builtin_prefetch(src + 8 * NB);
        __builtin_prefetch(src + 8 * NB + VL);
        Vec::loadu(src).store(dst);
        Vec::loadu(src + VL).store(dst + VL);
      }
    } else {
      for (int64_t k = 0; k < K; ++k, src += b.ld, dst += NB)
        for (int64_t o = 0; o < len; o += VL) {
          const int64_t count = std::min(VL, len - o);
          Vec::loadu(src + o, count).store(dst + o, count);
        }
    }
    q += len;
  }
}

// c (M, n) = act(w (M, K) @ b (K, n) + bias): the primary conv of one task's pixels.
// a: the weight, packed by pack_weight or in place (GemmWeight). Each panel of kPanel pixels
// is packed once into `panel` (K * kPanel elements) and swept by every register block of
// weight rows, or only by blocks [blk0, blk1) of the row_blocks(M, kMaxRows) (rows of c
// outside them are not written).
template <typename T, Act A>
void primary_gemm(const GemmWeight<T>& a, const T* bias, int64_t M, int64_t K,
                  const PixelMatrix<T>& b, T* c, int64_t ldc, T* panel, int64_t blk0 = 0,
                  int64_t blk1 = -1) {
  constexpr int64_t VL = Vectorized<T>::size(), NB = kPanel<T>;
  const int64_t blocks = row_blocks(M, kMaxRows<T>);
  if (blk1 < 0) blk1 = blocks;
  const int64_t n = b.images * b.npx;
  for (int64_t j = 0; j < n; j += NB) {
    const int64_t cols = std::min(NB, n - j);
    pack_panel(b, K, j, cols, panel);
    const int64_t last = cols > VL ? cols - VL : cols;
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t m0 = row_block_start(M, blocks, blk);
      const int64_t rows = row_block_start(M, blocks, blk + 1) - m0;
      gemm_block_dispatch<T, A>(rows, cols > VL, a, m0, K, bias, panel, c + m0 * ldc + j, ldc,
                                last);
    }
  }
}

// Tap masks of the depthwise conv over output rows [row0, row0 + rows) of an image of
// (height, width), flattened; `ld` (a multiple of the vector size) entries each.
// col[dx * ld + i] / row[dy * ld + i] have all bits set where tap (dy, dx) of pixel i lies
// inside the image, else 0.
template <typename T>
void tap_masks(int64_t d, int64_t row0, int64_t rows, int64_t height, int64_t width, T* col,
               T* row, int64_t ld) {
  T ones;
  std::memset(&ones, 0xFF, sizeof(T));
  const int64_t h = d / 2;
  for (int64_t t = 0; t < d; ++t)
    for (int64_t i = 0, r = row0, c = 0; i < ld; ++i) {
      col[t * ld + i] = (c + t - h >= 0 && c + t - h < width) ? ones : T(0);
      row[t * ld + i] = (r + t - h >= 0 && r + t - h < height && r < row0 + rows) ? ones : T(0);
      if (++c == width) c = 0, ++r;
    }
}

// dst[i] = act(bias + depthwise d x d conv of src around pixel i), i in [begin, end) of a
// band flattened row by row (`width` pixels a row). Vectors run over the flattened band, so
// taps off the image's left or right edge read the neighbouring row and taps above or below
// it read whatever lies there: the masks zero both (ROW_MASKS: rows near the image's top or
// bottom edge; elsewhere every row tap is inside). src must be readable h rows + h elements
// before and after the band, plus a vector's worth.
template <typename T, Act A, int D, bool ROW_MASKS>
void depthwise_range(const T* src, const T* w, T bias, int64_t d_runtime, int64_t width,
                     const T* col_masks, const T* row_masks, int64_t mask_ld, int64_t begin,
                     int64_t end, T* dst, bool stream) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int64_t d = D > 0 ? D : d_runtime;
  const int64_t h = d / 2;
  for (int64_t i = begin; i < end; i += VL) {
    const T* p = src + i - h * width - h;
    Vec acc(bias);
    for (int64_t dx = 0; dx < d; ++dx) {
      Vec tap(T(0));
      for (int64_t dy = 0; dy < d; ++dy) {
        Vec v = Vec::loadu(p + dy * width + dx);
        if (ROW_MASKS && dy != h) v = v & Vec::loadu(row_masks + dy * mask_ld + i);
        tap = at::vec::fmadd(Vec(w[dy * d + dx]), v, tap);
      }
      acc = acc + (dx == h ? tap : tap & Vec::loadu(col_masks + dx * mask_ld + i));
    }
    store_maybe_streaming(activate_vec<A>(acc), dst + i, std::min(VL, end - i), stream);
  }
}

// One ghost channel of one image's band (`total` = rows * width pixels): the rows whose taps
// can leave the image (top_rows at the start, bottom_rows at the end) run with row masks.
template <typename T, Act A, int D>
void depthwise_band(const T* src, const T* w, T bias, int64_t d, int64_t width, int64_t total,
                    int64_t top_rows, int64_t bottom_rows, const T* col_masks,
                    const T* row_masks, int64_t mask_ld, T* dst, bool stream = false) {
  constexpr int64_t VL = Vectorized<T>::size();
  const int64_t a = std::min(total, (top_rows * width + VL - 1) / VL * VL);
  const int64_t b = std::max(a, (total - bottom_rows * width) / VL * VL);
  depthwise_range<T, A, D, true>(src, w, bias, d, width, col_masks, row_masks, mask_ld, 0, a,
                                 dst, stream);
  depthwise_range<T, A, D, false>(src, w, bias, d, width, col_masks, row_masks, mask_ld, a, b,
                                  dst, stream);
  depthwise_range<T, A, D, true>(src, w, bias, d, width, col_masks, row_masks, mask_ld, b,
                                 total, dst, stream);
}

// A large output is a fresh mapping that the kernel touches first: asking for transparent huge
// pages before that turns ~500 page faults per MiB into one per 2 MiB (measured: filling a
// fresh 77 MB tensor, 29 ms with 4 KiB pages, 4.4 ms with huge pages). Advice only.
inline void advise_huge_pages(void* data, size_t bytes) {
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

// The affine x -> scale x + shift of a BatchNorm with mean / variance: running statistics
// (eval: folded into the convs), or batch statistics as rounded to T and returned by a training
// forward, whose backward derives it here from the same values and so recomputes the forward's
// activations bit for bit.
template <typename T>
std::pair<T, T> bn_affine(T mean, T var, T gamma, T beta, double eps) {
  const double invstd = 1.0 / std::sqrt(double(var) + eps);
  return {T(double(gamma) * invstd), T(double(beta) - double(mean) * double(gamma) * invstd)};
}

// Reductions: vectors of T over runs of kRun elements, each run's total added in double.
constexpr int64_t kRun = 256;
constexpr int kMaxCorrelationTaps = 49;  // 7 x 7

// gw[t] += sum over i in [begin, end) of g[i] * src[off[t] + i], for t < taps: a depthwise
// weight's gradient, all taps in one pass over g (the Ghost backward's padded planes, the
// depthwise op's phase planes). TAPS: the tap count at compile time (0: taps, at most
// kMaxCorrelationTaps, at run time). Lanes past end load as zero.
template <typename T, int TAPS>
void tap_correlation(const T* g, int64_t begin, int64_t end, const T* src, const int64_t* off,
                     int64_t taps, double* gw) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int64_t n = TAPS > 0 ? TAPS : taps;
  Vec acc[TAPS > 0 ? TAPS : kMaxCorrelationTaps];
  for (int64_t t = 0; t < n; ++t) acc[t] = Vec(T(0));
  auto flush = [&] {
    for (int64_t t = 0; t < n; ++t) {
      gw[t] += double(at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc[t]));
      acc[t] = Vec(T(0));
    }
  };
  int64_t run = 0;
  for (int64_t i = begin; i < end; i += VL) {
    const int64_t count = std::min(VL, end - i);
    const Vec gv = Vec::loadu(g + i, count);
    for (int64_t t = 0; t < n; ++t)
      acc[t] = at::vec::fmadd(gv, Vec::loadu(src + off[t] + i, count), acc[t]);
    if (++run == kRun / VL) flush(), run = 0;
  }
  flush();
}

// Vector of the elements p[0], p[stride], ..., p[(VL - 1) * stride] of a padded row: one load
// (S == 1), two loads deinterleaved to their even elements (S == 2), else gathered one by one
// (S == 0, stride at run time). The dense and depthwise convs' input taps.
template <typename T, int S>
inline Vectorized<T> strided_load(const T* p, int64_t stride) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  if constexpr (S == 1) {
    return Vec::loadu(p);
  } else if constexpr (S == 2) {
    return at::vec::deinterleave2(Vec::loadu(p), Vec::loadu(p + VL)).first;
  } else {
    T lanes[VL];
    for (int64_t i = 0; i < VL; ++i) lanes[i] = p[i * stride];
    return Vec::loadu(lanes);
  }
}

// Tasks [begin, end) of out[n][r] = epilogue(W[r] . v[n] + b[r]) (b may be null) for images'
// vectors v (images, cols) contiguous, W (rows, cols) with rows ldw apart, out (images, rows).
// Task index row * images + image: consecutive tasks reuse one weight row from L1. Four
// accumulators: one chain of dependent FMAs would wait on the FMA latency.
template <typename T, typename Epilogue>
void matvec_rows(const T* w, int64_t ldw, const T* b, const T* v, int64_t images, int64_t rows,
                 int64_t cols, T* out, int64_t begin, int64_t end, Epilogue epilogue) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t r = t / images, n = t % images;
    const T* wr = w + r * ldw;
    const T* vn = v + n * cols;
    Vec acc[4] = {Vec(T(0)), Vec(T(0)), Vec(T(0)), Vec(T(0))};
    int64_t i = 0;
    for (; i + 4 * VL <= cols; i += 4 * VL)
      for (int u = 0; u < 4; ++u)
        acc[u] = at::vec::fmadd(Vec::loadu(wr + i + u * VL), Vec::loadu(vn + i + u * VL), acc[u]);
    for (; i < cols; i += VL) {
      const int64_t count = std::min(VL, cols - i);
      acc[0] = at::vec::fmadd(Vec::loadu(wr + i, count), Vec::loadu(vn + i, count), acc[0]);
    }
    const Vec sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    const T dot = at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, sum);
    out[n * rows + r] = epilogue(b != nullptr ? dot + b[r] : dot);
  }
}

// Per-thread scratch, kept between calls so the hot path does not allocate.
template <typename T>
T* scratch(int64_t elements) {
  thread_local std::vector<T> buffer;
  if (int64_t(buffer.size()) < elements) buffer.assign(elements, T(0));
  return buffer.data();
}


}  // namespace ghostops::cpu
