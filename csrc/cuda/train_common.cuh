// Shared by the CUDA training forward (ghost_forward_train.cu) and backward
// (ghost_backward.cu) of the Ghost module: the sizes of a call, the recomputation of x1 and of
// the cheap op's pre-BN output z2 from the saved z1 (one definition, so the forward and the
// backward round alike) and deterministic block sums. The per-channel reductions of the
// kernels' per-tile rows are in bn_reduce.cuh.
// The same decomposition as the Triton backend (ghostops/backends/triton_train.py), whose
// docstring lists the passes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <utility>

#include "../ghost_common.h"
#include "dtype_dispatch.cuh"

namespace ghostops::cuda {

// Threads a block of the plane kernels: one output pixel each, a tile of a (image, channel)
// plane per block.
constexpr int kPlaneThreads = 256;

// Sizes of a training call. z1 (and the float buffers of the backward) are contiguous
// (N, init or ghost, P); s?n..s?w are the element strides of y (forward) or grad_y (backward).
struct TrainParams {
  int64_t N, Ho, Wo, P, init, ghost, new_ch, per, d;
  int64_t syn, syc, syh, syw;
};

// x1 = act(z1 sc + sh) at (hi, wi) of the contiguous Ho x Wo plane z, zero outside the map
// (the cheap op's zero padding).
template <Act A>
__device__ __forceinline__ float x1_at(const float* z, int64_t hi, int64_t wi,
                                       const TrainParams& p, float sc, float sh) {
  if (hi < 0 || hi >= p.Ho || wi < 0 || wi >= p.Wo) return 0.f;
  return activate<A>(fmaf(z[hi * p.Wo + wi], sc, sh));
}

// z2 at (ho, wo): the d x d depthwise conv (weights w, row-major taps) of x1 recomputed from
// the plane z.
template <Act A>
__device__ __forceinline__ float z2_at(const float* z, const float* w, int64_t ho, int64_t wo,
                                       const TrainParams& p, float sc, float sh) {
  const int d = int(p.d), h = d / 2;
  float acc = 0.f;
  for (int dy = 0; dy < d; ++dy) {
    for (int dx = 0; dx < d; ++dx) {
      acc = fmaf(w[dy * d + dx], x1_at<A>(z, ho + dy - h, wo + dx - h, p, sc, sh), acc);
    }
  }
  return acc;
}

// The sum of v over the block (kPlaneThreads threads), returned to every thread, in a fixed
// order (so results do not depend on timing). Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[kPlaneThreads / 32];
  __shared__ float total;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // the previous call's readers are done with partial and total
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kPlaneThreads / 32; ++i) s += partial[i];
    total = s;
  }
  __syncthreads();
  return total;
}

// block_sum of each of v[0..N) at once, the sums returned in v to every thread: one pair of
// barriers for all N (block_sum takes three a value), the same fixed order (so each sum is
// block_sum's, bit for bit). Every thread of the block must call it.
template <int N>
__device__ __forceinline__ void block_sums(float (&v)[N]) {
  constexpr int kWarps = kPlaneThreads / 32;
  __shared__ float partial[N][kWarps];
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
    }
  }
  __syncthreads();  // the previous call's readers are done with partial
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) partial[i][threadIdx.x / 32] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += partial[i][w];
    v[i] = s;
  }
}

// The (image, channel) plane and the pixel of this thread in a plane kernel whose grid is
// (images x channels, pixel tiles) of kPlaneThreads pixels.
struct PlaneIndex {
  int64_t n, ch, q, ho, wo;
  bool ok;  // q inside the plane
};

__device__ __forceinline__ PlaneIndex plane_index(int64_t channels, const TrainParams& p) {
  PlaneIndex i;
  i.n = int64_t(blockIdx.x) / channels;
  i.ch = int64_t(blockIdx.x) % channels;
  i.q = int64_t(blockIdx.y) * kPlaneThreads + threadIdx.x;
  i.ok = i.q < p.P;
  i.ho = i.ok ? i.q / p.Wo : 0;
  i.wo = i.ok ? i.q % p.Wo : 0;
  return i;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The plane kernels' grid is (images x channels, pixel tiles): a map's tiles must fit in
// gridDim.y.
inline void check_plane_grid(const char* op, const GhostShape& s) {
  TORCH_CHECK(cdiv(s.out_h * s.out_w, kPlaneThreads) <= 65535, op, ": maps of more than ",
              65535 * kPlaneThreads, " output pixels are not supported, got ", s.out_h, "x",
              s.out_w);
}

}  // namespace ghostops::cuda
