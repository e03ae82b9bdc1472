// The training kernels' per-channel reductions on the device: the kernels leave per-tile rows
// (rows, C) (a tile's mean and M2 of z1 or z2 in the forward; its sums of ga and ga xhat, or
// its cheap-weight gradient, in the backward), and these kernels sum their columns in float64,
// in a fixed order (no atomics: results do not depend on timing), and finish them into what
// the next pass reads: the batch statistics with BatchNorm's scale and shift, or a BatchNorm
// backward's terms. One launch where a table has at most kReduceIters rows per row lane, else
// two (chunk sums, then the finish over them). They replace about twenty ATen ops per
// BatchNorm per call. The Triton backend's `_reduce_rows` (ghostops/backends/triton_train.py)
// is the same design.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace ghostops::cuda {

constexpr int kReduceThreads = 256;  // a block: channel lanes x row lanes
constexpr int kReduceIters = 8;      // rows a row lane sums in one chunk

// Two (rows, C) row-major tables a and b (b may be null: sums of a alone). With tile > 0 they
// are tiles' (mean, M2), row r over count(r) = min(tile, group_pixels - (r % group_tiles) tile)
// values (tiles cut each group of group_pixels, such as an image's plane, in order), and what
// is summed is (count mean, M2 + count mean^2): the first and second raw moments (Chan et al.;
// within a tile the moment stays centred, so only the spread of the tile means cancels, in
// float64).
template <typename TIn>
struct RowTables {
  const TIn* a;
  const TIn* b;
  int64_t rows, cols;
  int64_t tile, group_pixels, group_tiles;
};

// This thread's column and its sums over rows r0 + threadIdx.y, r0 + threadIdx.y +
// blockDim.y, ... < r1, then summed over the block's row lanes (a fixed tree) into the
// threadIdx.y == 0 lane. Every thread of the block must call it.
template <typename TIn>
__device__ __forceinline__ void column_sums(const RowTables<TIn>& t, int64_t r0, int64_t r1,
                                            double& sa, double& sb) {
  __shared__ double s[2][kReduceThreads];
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  sa = 0.0;
  sb = 0.0;
  if (c < t.cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const double a = static_cast<double>(t.a[r * t.cols + c]);
      if (t.b == nullptr) {
        sa += a;
        continue;
      }
      const double b = static_cast<double>(t.b[r * t.cols + c]);
      if (t.tile > 0) {
        const int64_t left = t.group_pixels - (r % t.group_tiles) * t.tile;
        const double n = double(left < t.tile ? left : t.tile);
        sa += n * a;
        sb += b + n * a * a;
      } else {
        sa += a;
        sb += b;
      }
    }
  }
  const int lane = threadIdx.y * blockDim.x + threadIdx.x;
  s[0][lane] = sa;
  s[1][lane] = sb;
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {  // blockDim.y is a power of two
    if (threadIdx.y < half) {
      s[0][lane] += s[0][lane + half * blockDim.x];
      s[1][lane] += s[1][lane + half * blockDim.x];
    }
    __syncthreads();
  }
  sa = s[0][threadIdx.x];
  sb = s[1][threadIdx.x];
}

// Chunk y of the rows (kReduceIters per row lane) into part (2, chunks, C): sums of a, of b.
template <typename TIn>
__global__ void __launch_bounds__(kReduceThreads)
    chunk_sums_kernel(RowTables<TIn> t, double* __restrict__ part) {
  const int64_t chunk = blockIdx.y, rows = int64_t(kReduceIters) * blockDim.y;
  const int64_t end = (chunk + 1) * rows;
  double sa, sb;
  column_sums(t, chunk * rows, end < t.rows ? end : t.rows, sa, sb);
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (threadIdx.y == 0 && c < t.cols) {
    part[chunk * t.cols + c] = sa;
    part[(gridDim.y + chunk) * t.cols + c] = sb;
  }
}

// Sums over all rows, handed per column to finish(c, sum a, sum b).
template <typename TIn, typename Finish>
__global__ void __launch_bounds__(kReduceThreads)
    finish_kernel(RowTables<TIn> t, Finish finish) {
  double sa, sb;
  column_sums(t, 0, t.rows, sa, sb);
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (threadIdx.y == 0 && c < t.cols) finish(c, sa, sb);
}

// A BatchNorm with float32 statistics as x -> scale x + shift. Correctly rounded sqrt and
// division (the build's --use_fast_math would approximate them): the forward's kernels and
// the backward's recomputation take it from here and agree bit for bit.
struct BnAffine {
  float scale, shift, invstd;
};

__device__ __forceinline__ BnAffine bn_affine_of(float mean, float var, float gamma, float beta,
                                                 float eps) {
  const float invstd = __fdiv_rn(1.f, __fsqrt_rn(var + eps));
  const float scale = gamma * invstd;
  return {scale, beta - mean * scale, invstd};
}

// finish: batch mean and biased variance of C channels of n values each, from their raw
// moments, and BatchNorm's scale and shift with them (float32 outputs, float32 BN vectors).
struct StatsFinish {
  const float *gamma, *beta;
  float eps;
  double n;
  float *mean, *var, *scale, *shift;
  __device__ void operator()(int64_t c, double s1, double s2) const {
    const double mu = s1 / n;
    const float m = static_cast<float>(mu);
    const float v = static_cast<float>(fmax(s2 / n - mu * mu, 0.0));
    mean[c] = m;
    var[c] = v;
    const BnAffine a = bn_affine_of(m, v, gamma[c], beta[c], eps);
    scale[c] = a.scale;
    shift[c] = a.shift;
  }
};

// finish: a BatchNorm backward's terms from the sums of ga and ga xhat over n values: dbeta,
// dgamma, and coef (3, C) = (k = gamma invstd, mean ga, mean ga xhat), float32.
struct GradFinish {
  const float *gamma, *invstd;
  float n;
  int64_t cols;
  float *dbeta, *dgamma, *coef;
  __device__ void operator()(int64_t c, double sa, double sb) const {
    const float db = static_cast<float>(sa), dg = static_cast<float>(sb);
    dbeta[c] = db;
    dgamma[c] = dg;
    coef[c] = gamma[c] * invstd[c];
    coef[cols + c] = db / n;
    coef[2 * cols + c] = dg / n;
  }
};

// finish: the column sums of a, float32.
struct SumFinish {
  float* out;
  __device__ void operator()(int64_t c, double sa, double) const {
    out[c] = static_cast<float>(sa);
  }
};

// Runs finish over the columns of t: directly where every row lane has at most kReduceIters
// rows, else over chunk_sums_kernel's float64 sums (already raw moments: tile 0). `like`
// gives the device for the chunk buffer. On the current stream; every launch checked.
template <typename Finish>
void reduce_rows(const RowTables<float>& t, const Finish& finish, const at::Tensor& like) {
  if (t.cols == 0) return;
  int lanes_c = 1;
  while (lanes_c < t.cols && lanes_c < 32) lanes_c *= 2;
  const dim3 block(lanes_c, kReduceThreads / lanes_c);
  const int64_t blocks_c = (t.cols + lanes_c - 1) / lanes_c;
  const int64_t chunk = int64_t(kReduceIters) * block.y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (t.rows <= chunk) {
    finish_kernel<<<dim3(blocks_c), block, 0, stream>>>(t, finish);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t chunks = (t.rows + chunk - 1) / chunk;
  TORCH_CHECK(chunks <= 65535, "reduce_rows: ", t.rows, " rows are more than its grid holds");
  const at::Tensor part = at::empty({2, chunks, t.cols}, like.options().dtype(at::kDouble));
  double* p = part.mutable_data_ptr<double>();
  chunk_sums_kernel<<<dim3(blocks_c, chunks), block, 0, stream>>>(t, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const RowTables<double> sums{p, t.b == nullptr ? nullptr : p + chunks * t.cols,
                               chunks, t.cols, 0, 0, 1};
  finish_kernel<<<dim3(blocks_c), block, 0, stream>>>(sums, finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ghostops::cuda
