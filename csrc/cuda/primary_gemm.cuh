// The primary 1x1 conv's GEMM tile, shared by the eval kernel (ghost_forward_eval.cu) and the
// training forward (ghost_forward_train.cu), float accumulation, in two implementations behind
// one entry point, primary_gemm_tile. The weights come in x's dtype (the eval's folded W1
// rounded to it, as the Triton backend's tl.dot takes them), so a K slice of them moves half
// the bytes of float weights in half precision (every block re-reads its rows' slab per tile).
//   half / bfloat16 on sm_80 and later: tensor cores (WMMA, 16 x 16 x 16 fragments), K in
//     slices of 64 through shared memory, the next slice's loads in flight while the tensor
//     cores work on this one;
//   float (and half / bfloat16 on older GPUs): float FMAs over shared-memory tiles.
// Both produce the same per-thread tile (acc below), so the kernels' epilogues are shared.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace ghostops::cuda {

constexpr int kTileM = 32, kTileP = 64, kTileK = 16, kGemmThreads = 256;

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
__device__ __forceinline__ bool x_channel_vectors(const T* x, const GemmShape& g, int64_t v) {
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
template <typename T>
__device__ __forceinline__ void primary_gemm_tile_fma(const T* __restrict__ x,
                                                      const T* __restrict__ w,
                                                      const GemmShape& g, float (&acc)[2][4]) {
  // Rows padded by 2: the k-fastest stores (of w, and of x in channels_last) hit distinct banks.
  __shared__ float ws[kTileK][kTileM + 2];
  __shared__ float xs[kTileK][kTileP + 2];
  const int64_t n_pix = g.N * g.Ho * g.Wo;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileP, m0 = int64_t(blockIdx.y) * kTileM;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const bool x_channels_inner = g.sxc == 1;  // channels_last: consecutive threads, channels
  constexpr int kVec = 16 / sizeof(T), kPerPixel = kTileK / kVec;
  static_assert(kTileK % kVec == 0, "a K tile holds whole vectors");
  const bool x_vectors = x_channel_vectors(x, g, kVec);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < g.C; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTileK * kTileM; i += kGemmThreads) {
      const int k = i % kTileK, m = i / kTileK;
      const bool ok = m0 + m < g.M && k0 + k < g.C;
      ws[k][m] = ok ? static_cast<float>(w[(m0 + m) * g.C + k0 + k]) : 0.f;
    }
    if (x_vectors) {
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
      const float w0 = ws[k][2 * ty], w1 = ws[k][2 * ty + 1];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float v = xs[k][tx + 16 * j];
        acc[0][j] = fmaf(w0, v, acc[0][j]);
        acc[1][j] = fmaf(w1, v, acc[1][j]);
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
// read) sit 16 banks apart.
constexpr int kMmaCLd = kTileP + 8;
// The K slice's 16-wide steps, one a warp group: warps 2 g and 2 g + 1 multiply step g.
constexpr int kMmaKGroups = kMmaK / 16;

// The tensor-core implementation of primary_gemm_tile, T half or bfloat16. Warp v (8 of them)
// owns a 32 x 32 quarter of the products: all 32 rows of the block's tile at pixels 32 (v % 2)
// on, 2 x 2 fragments, over the 16-wide step v / 2 of each K slice (so each fragment it loads
// from shared memory feeds two multiplies, not one); the four step groups' partial tiles are
// summed through shared memory at the end, in a fixed order.
// Per K slice a thread loads 8 weights (row t / 8, k 8 (t % 8)...: one 16-byte vector where w's
// rows are whole aligned vectors, C a multiple of 8) and either two 16-byte vectors of x (x_channel_vectors: pixels t / 8 and t / 8 + 32, channels 8 (t % 8)...) or 16
// elements (channels t % 64 of pixels t / 64 + 4 r where x's channel stride is 1, else pixel
// t % 64's channels t / 64 + 4 r: consecutive threads read consecutive addresses); those loads
// for slice s + 1 are issued before the fragments of slice s are multiplied.
template <typename T>
__device__ __forceinline__ void primary_gemm_tile_mma(const T* __restrict__ x,
                                                      const T* __restrict__ w,
                                                      const GemmShape& g, float (&acc)[2][4]) {
  using E = typename MmaElement<T>::type;
  namespace wmma = nvcuda::wmma;
  constexpr int kVec = 16 / sizeof(E);                              // elements a 16-byte vector
  constexpr int kThreadsPerRow = kMmaK / kVec;                      // 8 (weights)
  constexpr int kXLoads = kTileP * kMmaK / kGemmThreads;            // 16 scalar elements
  constexpr int kXVecLoads = kTileP * kMmaK / kVec / kGemmThreads;  // 2 vectors
  constexpr int kThreadsPerPixel = kMmaK / kVec;                    // 8 (vector path)
  constexpr int kStep = kGemmThreads / kMmaK;                       // 4: rows / pixels apart
  static_assert(kXVecLoads == 2 && kTileP == kMmaK && kGemmThreads % kMmaK == 0 &&
                    kTileM * kThreadsPerRow == kGemmThreads,
                "the load mappings below assume these tile sizes");
  static_assert(kTileM == 32 && kTileP == 64 && kGemmThreads / 32 == 2 * kMmaKGroups,
                "the warps' 32 x 32 quarters and step groups below assume these sizes");
  // A: ws (row m, k) row-major; B: xs (k, pixel q) column-major, so xs[q] holds pixel q's K
  // slice and a 16-byte vector of its channels is one store. C (after the K loop, over them).
  constexpr int kABytes = kTileM * kMmaLd * int(sizeof(E));
  constexpr int kBBytes = kTileP * kMmaLd * int(sizeof(E));
  constexpr int kCBytes = kMmaKGroups * kTileM * kMmaCLd * int(sizeof(float));
  constexpr int kBytes = kABytes + kBBytes > kCBytes ? kABytes + kBBytes : kCBytes;
  __shared__ __align__(32) unsigned char smem[kBytes];
  __shared__ int64_t s_pix[kTileP];  // x's offset of each pixel of the tile, -1 past the end
  auto ws = reinterpret_cast<E(*)[kMmaLd]>(smem);
  auto xs = reinterpret_cast<E(*)[kMmaLd]>(smem + kABytes);
  auto cs = reinterpret_cast<float(*)[kTileM][kMmaCLd]>(smem);  // [step group][row][pixel]

  const int t = threadIdx.x;
  const int64_t n_pix = g.N * g.Ho * g.Wo;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileP, m0 = int64_t(blockIdx.y) * kTileM;
  if (t < kTileP) s_pix[t] = pix0 + t < n_pix ? x_pixel_offset(g, pix0 + t) : -1;
  __syncthreads();
  const E* xe = reinterpret_cast<const E*>(x);
  const E* we = reinterpret_cast<const E*>(w);
  const bool x_vectors = x_channel_vectors(x, g, kVec);
  const bool w_vectors = g.C % kVec == 0 && reinterpret_cast<std::uintptr_t>(w) % 16 == 0;
  const bool x_channels_inner = g.sxc == 1;
  const int m_w = t / kThreadsPerRow, k_w = (t % kThreadsPerRow) * kVec;  // weights: row, k..+7
  const int q_vec = t / kThreadsPerPixel;            // x vectors: pixels q_vec, q_vec + 32,
  const int k_vec = (t % kThreadsPerPixel) * kVec;   // channels k_vec..+7
  // x scalars: (pixel, channel) (t / 64 + 4 r, t % 64) or (t % 64, t / 64 + 4 r).
  auto x_scalar = [&](int r, int& q, int& k) {
    const int lane = t % kMmaK, step = t / kMmaK + r * kStep;
    q = x_channels_inner ? step : lane;
    k = x_channels_inner ? lane : step;
  };

  alignas(16) E w_next[kVec];
  uint4 xv_next[kXVecLoads];
  E x_next[kXLoads];
  auto fetch = [&](int64_t k0) {  // slice k0 from global memory into registers
    const int64_t m = m0 + m_w, k = k0 + k_w;
    if (w_vectors) {  // C a multiple of kVec: the vector is wholly inside or outside w's row
      *reinterpret_cast<uint4*>(w_next) =
          m < g.M && k < g.C ? __ldg(reinterpret_cast<const uint4*>(we + m * g.C + k))
                             : make_uint4(0u, 0u, 0u, 0u);
    } else {
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        w_next[u] = m < g.M && k + u < g.C ? we[m * g.C + k + u] : MmaElement<T>::from_float(0.f);
      }
    }
    if (x_vectors) {
#pragma unroll
      for (int u = 0; u < kXVecLoads; ++u) {
        // C is a multiple of kVec here: the vector is wholly inside or outside x.
        const int64_t off = s_pix[q_vec + u * (kTileP / kXVecLoads)];
        xv_next[u] = off >= 0 && k0 + k_vec < g.C
                         ? __ldg(reinterpret_cast<const uint4*>(xe + off + k0 + k_vec))
                         : make_uint4(0u, 0u, 0u, 0u);  // +0.0 in half and bfloat16
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
    *reinterpret_cast<uint4*>(&ws[m_w][k_w]) = *reinterpret_cast<const uint4*>(w_next);
    if (x_vectors) {
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

  const int warp = t / 32, p_w = 32 * (warp % 2), group = warp / 2, kk = 16 * group;
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
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) wmma::load_matrix_sync(a[r], &ws[16 * r][kk], kMmaLd);
#pragma unroll
    for (int q = 0; q < 2; ++q) wmma::load_matrix_sync(b[q], &xs[p_w + 16 * q][kk], kMmaLd);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int q = 0; q < 2; ++q) wmma::mma_sync(c[r][q], a[r], b[q], c[r][q]);
    __syncthreads();  // every warp is done with ws / xs: the next stash, or cs, may overwrite
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      wmma::store_matrix_sync(&cs[group][16 * r][p_w + 16 * q], c[r][q], kMmaCLd,
                              wmma::mem_row_major);
    }
  __syncthreads();
  const int tx = t % 16, ty = t / 16;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < kMmaKGroups; ++s) sum += cs[s][2 * ty + i][tx + 16 * j];
      acc[i][j] = sum;
    }
}

// WMMA in half and bfloat16 needs sm_80 (bfloat16; half has it from sm_70, kept to one rule).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kHasMma = false;
#else
constexpr bool kHasMma = true;
#endif

// acc[i][j] = sum_k w[m0 + 2 ty + i, k] x[k, pixel pix0 + tx + 16 j] for this block's 32 x 64
// tile of (channel, pixel), blockIdx (pixel tile, channel tile), 16 x 16 threads (tx =
// threadIdx.x % 16, ty = threadIdx.x / 16), each 2 channels x 4 pixels. w: (M, C) in x's
// dtype, contiguous. Out-of-range rows and pixels accumulate zeros. Every thread of the block calls it,
// once per kernel (its shared memory is not guarded against a second call).
template <typename T>
__device__ __forceinline__ void primary_gemm_tile(const T* __restrict__ x,
                                                  const T* __restrict__ w,
                                                  const GemmShape& g, float (&acc)[2][4]) {
  if constexpr (kHasMma && !std::is_same_v<T, float>) {
    primary_gemm_tile_mma(x, w, g, acc);
  } else {
    primary_gemm_tile_fma(x, w, g, acc);
  }
}

}  // namespace ghostops::cuda
