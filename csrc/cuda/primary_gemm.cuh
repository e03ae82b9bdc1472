// The primary 1x1 conv's GEMM tile, shared by the eval kernel (ghost_forward_eval.cu) and the
// training forward (ghost_forward_train.cu): a shared-memory tiled GEMM, float accumulation.
#pragma once

#include <cstdint>

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

// acc[i][j] = sum_k w[m0 + 2 ty + i, k] x[k, pixel pix0 + tx + 16 j] for this block's 32 x 64
// tile of (channel, pixel), blockIdx (pixel tile, channel tile), 16 x 16 threads (tx =
// threadIdx.x % 16, ty = threadIdx.x / 16), each 2 channels x 4 pixels. w: (M, C) float,
// contiguous. Out-of-range rows and pixels accumulate zeros. Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ void primary_gemm_tile(const T* __restrict__ x,
                                                  const float* __restrict__ w,
                                                  const GemmShape& g, float (&acc)[2][4]) {
  // Rows padded by 2: the k-fastest stores (of w, and of x in channels_last) hit distinct banks.
  __shared__ float ws[kTileK][kTileM + 2];
  __shared__ float xs[kTileK][kTileP + 2];
  const int64_t P = g.Ho * g.Wo, n_pix = g.N * P;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileP, m0 = int64_t(blockIdx.y) * kTileM;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const bool x_channels_inner = g.sxc == 1;  // channels_last: consecutive threads, channels
  constexpr int kVec = 16 / sizeof(T), kPerPixel = kTileK / kVec;
  static_assert(kTileK % kVec == 0, "a K tile holds whole vectors");
  const bool x_vectors = x_channel_vectors(x, g, kVec);
  auto pixel = [&](int64_t pix) {  // x's offset of the (strided) input pixel of output pix
    const int64_t n = pix / P, r = pix % P, ho = r / g.Wo, wo = r % g.Wo;
    return n * g.sxn + ho * g.stride * g.sxh + wo * g.stride * g.sxw;
  };
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < g.C; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTileK * kTileM; i += kGemmThreads) {
      const int k = i % kTileK, m = i / kTileK;
      const bool ok = m0 + m < g.M && k0 + k < g.C;
      ws[k][m] = ok ? w[(m0 + m) * g.C + k0 + k] : 0.f;
    }
    if (x_vectors) {
      // A thread loads one 16-byte vector, kVec consecutive channels of one pixel; in a warp,
      // (2 (k + u) + q) % 32 differ, so the stores into xs hit distinct banks.
      for (int i = threadIdx.x; i < kTileP * kPerPixel; i += kGemmThreads) {
        const int q = i / kPerPixel, k = (i % kPerPixel) * kVec;
        const int64_t pix = pix0 + q;
        float v[kVec];
        if (pix < n_pix && k0 + k < g.C) {  // C a multiple of kVec: the whole vector is in x
          const uint4 raw = *reinterpret_cast<const uint4*>(x + pixel(pix) + k0 + k);
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
        if (pix < n_pix && k0 + k < g.C) v = static_cast<float>(x[pixel(pix) + (k0 + k) * g.sxc]);
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

}  // namespace ghostops::cuda
