// Eval-mode Ghost module on the GPU, CUDA C++: the CUDA implementation of
// ghostops::ghost_forward_eval (schema in csrc/ops.cpp, same contract as the CPU kernel).
//
// First version, two kernels on the current stream, both BatchNorms folded beforehand:
//   primary_kernel  the 1x1 conv as a shared-memory tiled GEMM (primary_gemm.cuh: 32 channels
//                   x 64 pixels a block, float accumulation), BN1 + act in its epilogue, into
//                   y[:, :init];
//   cheap_kernel    the depthwise cheap op reading those channels back (from L2), BN2 + act,
//                   into y[:, init:oup]; ghost channels past oup are never computed.
// Any strides (NCHW, channels_last, views): the output follows the input's memory format.
// float / half / bfloat16 in memory, float arithmetic. The one-pass form (intrinsic tile and
// halo kept in shared memory) is the next step, with the training kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ghost_common.h"
#include "primary_gemm.cuh"

namespace ghostops::cuda {
namespace {

// Sizes and element strides of one call.
struct EvalParams {
  int64_t N, C, Ho, Wo, init, ghost, per, d, stride;
  int64_t sxn, sxc, sxh, sxw;  // x
  int64_t syn, syc, syh, syw;  // y
};

constexpr int kThreads = kGemmThreads;

// y[n, m, p] = act(b[m] + sum_k w[m, k] x[n, k, p * stride]) for a 32 x 64 tile of (channel,
// pixel) (primary_gemm.cuh); pixels run over all images (n * Ho * Wo of them).
template <typename T, Act A>
__global__ void __launch_bounds__(kThreads)
    primary_kernel(const T* __restrict__ x, const float* __restrict__ w,
                   const float* __restrict__ b, T* __restrict__ y, EvalParams p) {
  const GemmShape g{p.N, p.C, p.init, p.Ho, p.Wo, p.stride, p.sxn, p.sxc, p.sxh, p.sxw};
  float acc[2][4];
  primary_gemm_tile(x, w, g, acc);
  const int64_t P = p.Ho * p.Wo, n_pix = p.N * P;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileP, m0 = int64_t(blockIdx.y) * kTileM;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t m = m0 + 2 * ty + i;
    if (m >= p.init) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t pix = pix0 + tx + 16 * j;
      if (pix >= n_pix) continue;
      const int64_t n = pix / P, r = pix % P, ho = r / p.Wo, wo = r % p.Wo;
      y[n * p.syn + m * p.syc + ho * p.syh + wo * p.syw] =
          static_cast<T>(activate<A>(acc[i][j] + b[m]));
    }
  }
}

// y[n, init + j, ho, wo] = act(b[j] + sum over taps of w[j, tap] y[n, j / per, ho + dy - h,
// wo + dx - h]), zero outside the map. One thread an output element, grid-stride.
template <typename T, Act A>
__global__ void __launch_bounds__(kThreads)
    cheap_kernel(T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b,
                 EvalParams p) {
  const int64_t P = p.Ho * p.Wo, total = p.N * p.ghost * P, h = p.d / 2;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i % P, j = (i / P) % p.ghost, n = i / (P * p.ghost);
    const int64_t ho = r / p.Wo, wo = r % p.Wo;
    const T* src = y + n * p.syn + (j / p.per) * p.syc;
    const float* wj = w + j * p.d * p.d;
    float acc = b[j];
    for (int64_t dy = 0; dy < p.d; ++dy) {
      const int64_t hi = ho + dy - h;
      if (hi < 0 || hi >= p.Ho) continue;
      for (int64_t dx = 0; dx < p.d; ++dx) {
        const int64_t wi = wo + dx - h;
        if (wi < 0 || wi >= p.Wo) continue;
        acc = fmaf(wj[dy * p.d + dx], static_cast<float>(src[hi * p.syh + wi * p.syw]), acc);
      }
    }
    y[n * p.syn + (p.init + j) * p.syc + ho * p.syh + wo * p.syw] =
        static_cast<T>(activate<A>(acc));
  }
}

template <typename T, Act A>
void launch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
            const at::Tensor& w2, const at::Tensor& b2, at::Tensor& y, const EvalParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_pix = p.N * p.Ho * p.Wo;
  const dim3 grid((n_pix + kTileP - 1) / kTileP, (p.init + kTileM - 1) / kTileM);
  primary_kernel<T, A><<<grid, kThreads, 0, stream>>>(
      x.const_data_ptr<T>(), w1.const_data_ptr<float>(), b1.const_data_ptr<float>(),
      y.mutable_data_ptr<T>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.ghost > 0) {
    const int64_t total = p.N * p.ghost * p.Ho * p.Wo;
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
    cheap_kernel<T, A><<<blocks, kThreads, 0, stream>>>(
        y.mutable_data_ptr<T>(), w2.const_data_ptr<float>(), b2.const_data_ptr<float>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor ghost_forward_eval_cuda(const at::Tensor& x, const at::Tensor& primary_weight,
                                   const at::Tensor& bn1_weight, const at::Tensor& bn1_bias,
                                   const at::Tensor& bn1_mean, const at::Tensor& bn1_var,
                                   double bn1_eps, const at::Tensor& cheap_weight,
                                   const at::Tensor& bn2_weight, const at::Tensor& bn2_bias,
                                   const at::Tensor& bn2_mean, const at::Tensor& bn2_var,
                                   double bn2_eps, int64_t oup, int64_t stride,
                                   c10::string_view act) {
  const GhostShape s = check_ghost_args(x, primary_weight, bn1_weight, bn1_bias, bn1_mean,
                                        bn1_var, cheap_weight, bn2_weight, bn2_bias, bn2_mean,
                                        bn2_var, oup, stride, VectorDtype::AnyFloat);
  TORCH_CHECK(x.is_cuda(), "ghost_forward_eval (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const Act activation = parse_act(std::string(act));
  auto fold = [](const at::Tensor& w, const at::Tensor& g, const at::Tensor& bt,
                 const at::Tensor& m, const at::Tensor& v, double eps) {
    auto [folded, bias] = fold_bn(w.to(at::kFloat), g.to(at::kFloat), bt.to(at::kFloat),
                                  m.to(at::kFloat), v.to(at::kFloat), eps);
    return std::pair{folded.contiguous(), bias.contiguous()};
  };
  const auto [w1, b1] = fold(primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps);
  const auto [w2, b2] = fold(cheap_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps);
  at::Tensor y = at::empty({s.batch, s.oup, s.out_h, s.out_w},
                           x.options().memory_format(x.suggest_memory_format()));
  if (y.numel() == 0) return y;
  const EvalParams p{s.batch,     s.inp,       s.out_h,     s.out_w,     s.init,
                     s.ghost,     s.ratio - 1, s.dw,        s.stride,    x.stride(0),
                     x.stride(1), x.stride(2), x.stride(3), y.stride(0), y.stride(1),
                     y.stride(2), y.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "ghost_forward_eval_cuda", [&] {
                                    if (activation == Act::ReLU) {
                                      launch<scalar_t, Act::ReLU>(x, w1, b1, w2, b2, y, p);
                                    } else {
                                      launch<scalar_t, Act::Identity>(x, w1, b1, w2, b2, y, p);
                                    }
                                  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CUDA, m) { m.impl("ghost_forward_eval", &ghost_forward_eval_cuda); }

}  // namespace ghostops::cuda
