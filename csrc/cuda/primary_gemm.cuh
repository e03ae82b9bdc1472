// The primary 1x1 conv's GEMM tile, shared by the eval kernel (ghost_forward_eval.cu) and the
// training forward (ghost_forward_train.cu), float accumulation, in two implementations behind
// one entry point, primary_gemm_tile. The weights come in x's dtype (the eval's folded W1
// rounded to it, as the Triton backend's tl.dot takes them), so a K slice of them moves half
// the bytes of float weights in half precision (every block re-reads its rows' slab per tile).
//   half / bfloat16 on sm_80 and later: tensor cores (WMMA, 16 x 16 x 16 fragments), K in
//     slices of 64 through shared memory, the next slice's loads in flight while the tensor
//     cores work on this one;
//   float (and half / bfloat16 on older GPUs): float FMAs over shared-memory tiles.
// Both produce the same per-thread tile (acc below), so the kernels' epilogues are shared. A
// block's tile is kRows output channels (32, 64 or 128: gemm_rows) x 64 pixels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace ghostops::cuda {

constexpr int kTileP = 64, kTileK = 16, kGemmThreads = 256;

// The rows (output channels) of a block's tile for M of them: the fewest tiles that cover M,
// so x is read once per 128 channels rather than once per 32 (every tile of a pixel tile reads
// its x, and every pixel tile its rows' slab of w, so bigger tiles cut both); past 128 rows,
// 64-row tiles where 128-row ones would compute more empty rows (M = 130: 192 rows, not 256).
// GHOSTOPS_CUDA_GEMM_ROWS=32/64/128 forces the rows (for measuring the choice on a GPU; the
// element-wise path below keeps 32 whatever is asked).
inline int gemm_rows(int64_t M) {
  const char* forced = std::getenv("GHOSTOPS_CUDA_GEMM_ROWS");
  const std::string f = forced == nullptr ? "auto" : forced;
  TORCH_CHECK(f == "auto" || f == "32" || f == "64" || f == "128", "GHOSTOPS_CUDA_GEMM_ROWS='",
              f, "': expected auto, 32, 64 or 128");
  if (f != "auto") return std::stoi(f);
  if (M <= 32) return 32;
  if (M <= 64) return 64;
  if (M <= 128) return 128;
  return (M + 63) / 64 * 64 < (M + 127) / 128 * 128 ? 64 : 128;
}

// f(std::integral_constant<int, rows>{}, std::bool_constant<x_vectors>{}): the GEMM kernels
// are templated on both, so a kernel holds registers for one way of reading x, not for both.
// x_vectors (x_channel_vectors: channels_last, C a multiple of 8 in half precision) takes
// gemm_rows(M); element-wise x (NCHW, other C) keeps 32-row tiles, its 16 loads a slice
// leaving no registers for more rows at two blocks an SM.
template <typename F>
void dispatch_gemm_tile(int64_t M, bool x_vectors, F&& f) {
  const int rows = gemm_rows(M);  // (checks GHOSTOPS_CUDA_GEMM_ROWS whichever path runs)
  if (!x_vectors) return f(std::integral_constant<int, 32>{}, std::false_type{});
  switch (rows) {
    case 32: f(std::integral_constant<int, 32>{}, std::true_type{}); break;
    case 64: f(std::integral_constant<int, 64>{}, std::true_type{}); break;
    default: f(std::integral_constant<int, 128>{}, std::true_type{});
  }
}

// Sizes and element strides the GEMM reads: M output channels from C input channels, pixels
// over all images (N * Ho * Wo of them), x sampled every `stride` rows and columns.
struct GemmShape {
  int64_t N, C, M, Ho, Wo, stride;
  int64_t sxn, sxc, sxh, sxw;  // x
};

// Whether every sampled pixel's channels of x are whole, aligned vectors of v elements (16
// bytes): channels innermost (channels_last; NCHW on a 1x1 map), C and the strides the pixels
// step by multiples of v, the data 16-byte aligned.
template <typename T>
__host__ __device__ inline bool x_channel_vectors(const T* x, const GemmShape& g, int64_t v) {
  return g.sxc == 1 && g.C % v == 0 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0 &&
         (g.N == 1 || g.sxn % v == 0) && (g.Ho == 1 || g.sxh % v == 0) &&
         (g.Wo == 1 || g.sxw % v == 0);
}

// x's offset of the (strided) input pixel of output pixel pix (flat over images).
__device__ __forceinline__ int64_t x_pixel_offset(const GemmShape& g, int64_t pix) {
  const int64_t P = g.Ho * g.Wo, n = pix / P, r = pix % P, ho = r / g.Wo, wo = r % g.Wo;
  return n * g.sxn + ho * g.stride * g.sxh + wo * g.stride * g.sxw;
}

// The float FMA implementation of primary_gemm_tile.
template <typename T, int kRows, bool kXVectors>
__device__ __forceinline__ void primary_gemm_tile_fma(const T* __restrict__ x,
                                                      const T* __restrict__ w,
                                                      const GemmShape& g,
                                                      float (&acc)[kRows / 16][4]) {
  constexpr int R = kRows / 16;  // a thread's rows
  // Rows padded by 2: the k-fastest stores (of w, and of x in channels_last) hit distinct banks.
  __shared__ float ws[kTileK][kRows + 2];
  __shared__ float xs[kTileK][kTileP + 2];
  const int64_t n_pix = g.N * g.Ho * g.Wo;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileP, m0 = int64_t(blockIdx.y) * kRows;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const bool x_channels_inner = g.sxc == 1;  // channels_last: consecutive threads, channels
  constexpr int kVec = 16 / sizeof(T), kPerPixel = kTileK / kVec;
  static_assert(kTileK % kVec == 0, "a K tile holds whole vectors");
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < g.C; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTileK * kRows; i += kGemmThreads) {
      const int k = i % kTileK, m = i / kTileK;
      const bool ok = m0 + m < g.M && k0 + k < g.C;
      ws[k][m] = ok ? static_cast<float>(w[(m0 + m) * g.C + k0 + k]) : 0.f;
    }
    if constexpr (kXVectors) {
      // A thread loads one 16-byte vector, kVec consecutive channels of one pixel; in a warp,
      // (2 (k + u) + q) % 32 differ, so the stores into xs hit distinct banks.
      for (int i = threadIdx.x; i < kTileP * kPerPixel; i += kGemmThreads) {
        const int q = i / kPerPixel, k = (i % kPerPixel) * kVec;
        const int64_t pix = pix0 + q;
        float v[kVec];
        if (pix < n_pix && k0 + k < g.C) {  // C a multiple of kVec: the whole vector is in x
          const uint4 raw =
              *reinterpret_cast<const uint4*>(x + x_pixel_offset(g, pix) + k0 + k);
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int u = 0; u < kVec; ++u) v[u] = static_cast<float>(e[u]);
        } else {
#pragma unroll
          for (int u = 0; u < kVec; ++u) v[u] = 0.f;
        }
#pragma unroll
        for (int u = 0; u < kVec; ++u) xs[k + u][q] = v[u];
      }
    } else {
      for (int i = threadIdx.x; i < kTileK * kTileP; i += kGemmThreads) {
        const int q = x_channels_inner ? i / kTileK : i % kTileP;
        const int k = x_channels_inner ? i % kTileK : i / kTileP;
        const int64_t pix = pix0 + q;
        float v = 0.f;
        if (pix < n_pix && k0 + k < g.C) {
          v = static_cast<float>(x[x_pixel_offset(g, pix) + (k0 + k) * g.sxc]);
        }
        xs[k][q] = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float wk[R];
#pragma unroll
      for (int i = 0; i < R; ++i) wk[i] = ws[k][R * ty + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float v = xs[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < R; ++i) acc[i][j] = fmaf(wk[i], v, acc[i][j]);
      }
    }
    __syncthreads();
  }
}

// The CUDA type WMMA takes for a half-precision T, and float -> that type.
template <typename T>
struct MmaElement;
template <>
struct MmaElement<c10::Half> {
  using type = __half;
  static __device__ __forceinline__ type from_float(float v) { return __float2half_rn(v); }
};
template <>
struct MmaElement<c10::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_float(float v) { return __float2bfloat16_rn(v); }
};

// The tensor-core implementation's K slice, and its shared-memory row length in elements: a
// multiple of 8 (WMMA's ldm), padded by 8 so that the 8 rows a fragment load reads at once
// (144 bytes apart) cover all 32 banks once.
constexpr int kMmaK = 64, kMmaLd = kMmaK + 8;
// The accumulator tile's row length (floats): rows 2 apart (the two ty of a warp in the final
// read of a 32-row tile) sit 16 banks apart.
constexpr int kMmaCLd = kTileP + 8;

// The tensor-core implementation of primary_gemm_tile, T half or bfloat16. A warp owns 32 x 32
// of the products (2 x 2 fragments, so each fragment it loads from shared memory feeds two
// multiplies): rows 32 rg of the tile at pixels 32 h, for the 16-wide steps s of each K slice
// with s % groups == group, where the block's 8 warps are (group, rg, h) = (v / (2 kRows / 32),
// (v / 2) % (kRows / 32), v % 2): 4 step groups at 32 rows, 2 at 64, 1 at 128. The step groups'
// partial tiles are summed through shared memory at the end, in a fixed order. Warps skip the
// fragments of rows past M (a last tile's empty rows cost no multiplies).
// Per K slice a thread loads kRows / 32 vectors of 8 weights (row t / 8 + 32 u, k 8 (t % 8)...:
// 16-byte loads where w's rows are whole aligned vectors, C a multiple of 8) and either two
// 16-byte vectors of x (x_channel_vectors: pixels t / 8 and t / 8 + 32, channels 8 (t % 8)...)
// or 16 elements (channels t % 64 of pixels t / 64 + 4 r where x's channel stride is 1, else
// pixel t % 64's channels t / 64 + 4 r: consecutive threads read consecutive addresses); those
// loads for slice s + 1 are issued before the fragments of slice s are multiplied.
template <typename T, int kRows, bool kXVectors>
__device__ __forceinline__ void primary_gemm_tile_mma(const T* __restrict__ x,
                                                      const T* __restrict__ w,
                                                      const GemmShape& g,
                                                      float (&acc)[kRows / 16][4]) {
  using E = typename MmaElement<T>::type;
  namespace wmma = nvcuda::wmma;
  constexpr int R = kRows / 16;                                     // a thread's rows in acc
  constexpr int kVec = 16 / sizeof(E);                              // elements a 16-byte vector
  constexpr int kThreadsPerRow = kMmaK / kVec;                      // 8 (weights)
  constexpr int kWVecLoads = kRows * kThreadsPerRow / kGemmThreads;  // 1, 2, 4 vectors
  constexpr int kXLoads = kTileP * kMmaK / kGemmThreads;            // 16 scalar elements
  constexpr int kXVecLoads = kTileP * kMmaK / kVec / kGemmThreads;  // 2 vectors
  constexpr int kThreadsPerPixel = kMmaK / kVec;                    // 8 (vector path)
  constexpr int kStep = kGemmThreads / kMmaK;                       // 4: rows / pixels apart
  constexpr int kRowGroups = kRows / 32;
  constexpr int kGroups = kGemmThreads / 32 / (2 * kRowGroups);     // step groups: 4, 2, 1
  static_assert(kXVecLoads == 2 && kTileP == kMmaK && kGemmThreads % kMmaK == 0 &&
                    kWVecLoads * kGemmThreads == kRows * kThreadsPerRow,
                "the load mappings below assume these tile sizes");
  static_assert((kRows == 32 || kRows == 64 || kRows == 128) && kTileP == 64 &&
                    (kMmaK / 16) % kGroups == 0,
                "the warps' 32 x 32 parts and step groups below assume these sizes");
  // A: ws (row m, k) row-major; B: xs (k, pixel q) column-major, so xs[q] holds pixel q's K
  // slice and a 16-byte vector of its channels is one store. C (after the K loop, over them).
  constexpr int kABytes = kRows * kMmaLd * int(sizeof(E));
  constexpr int kBBytes = kTileP * kMmaLd * int(sizeof(E));
  constexpr int kCBytes = kGroups * kRows * kMmaCLd * int(sizeof(float));
  constexpr int kBytes = kABytes + kBBytes > kCBytes ? kABytes + kBBytes : kCBytes;
  __shared__ __align__(32) unsigned char smem[kBytes];
  __shared__ int64_t s_pix[kTileP];  // x's offset of each pixel of the tile, -1 past the end
  auto ws = reinterpret_cast<E(*)[kMmaLd]>(smem);
  auto xs = reinterpret_cast<E(*)[kMmaLd]>(smem + kABytes);
  auto cs = reinterpret_cast<float(*)[kRows][kMmaCLd]>(smem);  // [step group][row][pixel]

  const int t = threadIdx.x;
  const int64_t n_pix = g.N * g.Ho * g.Wo;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileP, m0 = int64_t(blockIdx.y) * kRows;
  if (t < kTileP) s_pix[t] = pix0 + t < n_pix ? x_pixel_offset(g, pix0 + t) : -1;
  __syncthreads();
  const E* xe = reinterpret_cast<const E*>(x);
  const E* we = reinterpret_cast<const E*>(w);
  const bool w_vectors = g.C % kVec == 0 && reinterpret_cast<std::uintptr_t>(w) % 16 == 0;
  const bool x_channels_inner = g.sxc == 1;
  // Weights: rows m_w + 32 u, k k_w..+7; w_row is row m_w's k_w (an offset: past M's rows it
  // is never made a pointer), rows_left counts the rows of M from m_w on.
  const int m_w = t / kThreadsPerRow, k_w = (t % kThreadsPerRow) * kVec;
  const int64_t w_row = (m0 + m_w) * g.C + k_w, rows_left = g.M - m0 - m_w;
  const int q_vec = t / kThreadsPerPixel;            // x vectors: pixels q_vec, q_vec + 32,
  const int k_vec = (t % kThreadsPerPixel) * kVec;   // channels k_vec..+7
  // x scalars: (pixel, channel) (t / 64 + 4 r, t % 64) or (t % 64, t / 64 + 4 r).
  auto x_scalar = [&](int r, int& q, int& k) {
    const int lane = t % kMmaK, step = t / kMmaK + r * kStep;
    q = x_channels_inner ? step : lane;
    k = x_channels_inner ? lane : step;
  };

  // The next slice in registers: either path of w fills the same vectors.
  alignas(16) E w_next[kWVecLoads][kVec];
  uint4 xv_next[kXVectors ? kXVecLoads : 1];
  E x_next[kXVectors ? 1 : kXLoads];
  auto fetch = [&](int64_t k0) {  // slice k0 from global memory into registers
    const int64_t k = k0 + k_w;
#pragma unroll
    for (int u = 0; u < kWVecLoads; ++u) {
      const bool row_ok = 32 * u < rows_left;
      const E* src = we + (row_ok ? w_row + 32 * u * g.C + k0 : 0);
      if (w_vectors) {  // C a multiple of kVec: the vector is wholly inside or outside w's row
        *reinterpret_cast<uint4*>(w_next[u]) =
            row_ok && k < g.C ? __ldg(reinterpret_cast<const uint4*>(src))
                              : make_uint4(0u, 0u, 0u, 0u);  // +0.0 in half and bfloat16
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          w_next[u][e] = row_ok && k + e < g.C ? src[e] : MmaElement<T>::from_float(0.f);
        }
      }
    }
    if constexpr (kXVectors) {
#pragma unroll
      for (int u = 0; u < kXVecLoads; ++u) {
        // C is a multiple of kVec here: the vector is wholly inside or outside x.
        const int64_t off = s_pix[q_vec + u * (kTileP / kXVecLoads)];
        xv_next[u] = off >= 0 && k0 + k_vec < g.C
                         ? __ldg(reinterpret_cast<const uint4*>(xe + off + k0 + k_vec))
                         : make_uint4(0u, 0u, 0u, 0u);
      }
    } else {
#pragma unroll
      for (int r = 0; r < kXLoads; ++r) {
        int q, k;
        x_scalar(r, q, k);
        const int64_t off = s_pix[q];
        x_next[r] = off >= 0 && k0 + k < g.C ? xe[off + (k0 + k) * g.sxc]
                                             : MmaElement<T>::from_float(0.f);
      }
    }
  };
  auto stash = [&]() {  // the fetched slice into shared memory
#pragma unroll
    for (int u = 0; u < kWVecLoads; ++u) {
      *reinterpret_cast<uint4*>(&ws[m_w + 32 * u][k_w]) =
          *reinterpret_cast<const uint4*>(w_next[u]);
    }
    if constexpr (kXVectors) {
#pragma unroll
      for (int u = 0; u < kXVecLoads; ++u) {
        *reinterpret_cast<uint4*>(&xs[q_vec + u * (kTileP / kXVecLoads)][k_vec]) = xv_next[u];
      }
    } else {
#pragma unroll
      for (int r = 0; r < kXLoads; ++r) {
        int q, k;
        x_scalar(r, q, k);
        xs[q][k] = x_next[r];
      }
    }
  };

  const int warp = t / 32, group = warp / (2 * kRowGroups);
  const int m_f = 32 * ((warp / 2) % kRowGroups), p_f = 32 * (warp % 2);  // the warp's part
  // Its row fragments that hold rows of M (the same for the whole warp).
  const bool live0 = m0 + m_f < g.M, live1 = m0 + m_f + 16 < g.M;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int q = 0; q < 2; ++q) wmma::fill_fragment(c[r][q], 0.f);
  fetch(0);
  for (int64_t k0 = 0; k0 < g.C; k0 += kMmaK) {
    stash();
    __syncthreads();
    if (k0 + kMmaK < g.C) fetch(k0 + kMmaK);  // in flight during the multiplies
    if (live0) {
#pragma unroll(kXVectors ? 4 : 1)
      for (int step = 0; step < kMmaK / 16 / kGroups; ++step) {
        const int kk = 16 * (group + kGroups * step);
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b[2];
        wmma::load_matrix_sync(a[0], &ws[m_f][kk], kMmaLd);
        if (live1) wmma::load_matrix_sync(a[1], &ws[m_f + 16][kk], kMmaLd);
#pragma unroll
        for (int q = 0; q < 2; ++q) wmma::load_matrix_sync(b[q], &xs[p_f + 16 * q][kk], kMmaLd);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          wmma::mma_sync(c[0][q], a[0], b[q], c[0][q]);
          if (live1) wmma::mma_sync(c[1][q], a[1], b[q], c[1][q]);
        }
      }
    }
    __syncthreads();  // every warp is done with ws / xs: the next stash, or cs, may overwrite
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      wmma::store_matrix_sync(&cs[group][m_f + 16 * r][p_f + 16 * q], c[r][q], kMmaCLd,
                              wmma::mem_row_major);
    }
  __syncthreads();
  const int tx = t % 16, ty = t / 16;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < kGroups; ++s) sum += cs[s][R * ty + i][tx + 16 * j];
      acc[i][j] = sum;
    }
}

// WMMA in half and bfloat16 needs sm_80 (bfloat16; half has it from sm_70, kept to one rule).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kHasMma = false;
#else
constexpr bool kHasMma = true;
#endif

// acc[i][j] = sum_k w[m0 + R ty + i, k] x[k, pixel pix0 + tx + 16 j] (R = kRows / 16) for this
// block's kRows x 64 tile of (channel, pixel), m0 = kRows blockIdx.y, pix0 = 64 blockIdx.x,
// 16 x 16 threads (tx = threadIdx.x % 16, ty = threadIdx.x / 16), each R channels x 4 pixels.
// w: (M, C) in x's dtype, contiguous. kXVectors: x_channel_vectors(x, g, 16 / sizeof(T)).
// Out-of-range rows and pixels accumulate zeros. Every thread of the block calls it, once per
// kernel (its shared memory is not guarded against a second call).
template <typename T, int kRows, bool kXVectors>
__device__ __forceinline__ void primary_gemm_tile(const T* __restrict__ x,
                                                  const T* __restrict__ w,
                                                  const GemmShape& g,
                                                  float (&acc)[kRows / 16][4]) {
  if constexpr (kHasMma && !std::is_same_v<T, float>) {
    primary_gemm_tile_mma<T, kRows, kXVectors>(x, w, g, acc);
  } else {
    primary_gemm_tile_fma<T, kRows, kXVectors>(x, w, g, acc);
  }
}

}  // namespace ghostops::cuda
