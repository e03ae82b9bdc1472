// Eval-mode Ghost module on the GPU, CUDA C++: the CUDA implementation of
// ghostops::ghost_forward_eval (schema in csrc/ops.cpp, same contract as the CPU kernel), both
// BatchNorms folded beforehand, on the current stream. Two forms, picked per shape by
// `use_one_pass` (a documented heuristic; GHOSTOPS_CUDA_EVAL=one_pass / two_kernels forces one):
//   one_pass_kernel  DESIGN.md's one pass: a block owns an 8 x 16 tile of one image's output and
//                    16 intrinsic channels; it computes their x1 = act(BN1(W1 x)) on the tile
//                    plus its d / 2 halo (recomputed, never read from a neighbour) into shared
//                    memory, writes the interior to y[:, c], then the depthwise cheap op + BN2 +
//                    act for the ghost channels of those intrinsic channels into y[:, init + j].
//                    x read once (halo aside), y written once, nothing read back. d in {1, 3,
//                    5, 7}, float / half / bfloat16;
//   primary_kernel + cheap_kernel  the 1x1 conv as a shared-memory tiled GEMM
//                    (primary_gemm.cuh: 32 channels x 64 pixels a block, float accumulation),
//                    BN1 + act in its epilogue, into y[:, :init]; then the depthwise op reading
//                    those channels back (from L2), BN2 + act, into y[:, init:oup]: where the
//                    halo's recomputation would cost more than the re-read (wide primaries on
//                    small maps), and for other d.
// Ghost channels past oup are never computed. Any strides (NCHW, channels_last, views): the
// output follows the input's memory format; where x's or y's channel stride is 1
// (channels_last), every kernel has consecutive threads access its consecutive channels, so
// those accesses coalesce, and the GEMM reads x as 16-byte vectors where it can. float / half /
// bfloat16 (float64 is refused: ghostops runs it through the reference), float arithmetic, no
// tensor cores yet.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../ghost_common.h"
#include "dtype_dispatch.cuh"
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
// pixel) (primary_gemm.cuh); pixels run over all images (n * Ho * Wo of them). In channels_last
// the tile is staged in shared memory so that consecutive threads store consecutive channels.
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
  if (p.syc == 1) {
    // channels_last: the tile through shared memory, then written with the channel fastest.
    // Rows of kTileM + 2: each half-warp's float2 stores (a channel pair, 16 pixels) hit all
    // 32 banks once.
    __shared__ __align__(8) float out[kTileP][kTileM + 2];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      *reinterpret_cast<float2*>(&out[tx + 16 * j][2 * ty]) = make_float2(acc[0][j], acc[1][j]);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTileM * kTileP; i += kThreads) {
      const int c = i % kTileM, q = i / kTileM;
      const int64_t m = m0 + c, pix = pix0 + q;
      if (m >= p.init || pix >= n_pix) continue;
      const int64_t n = pix / P, r = pix % P, ho = r / p.Wo, wo = r % p.Wo;
      y[n * p.syn + m * p.syc + ho * p.syh + wo * p.syw] =
          static_cast<T>(activate<A>(out[q][c] + b[m]));
    }
    return;
  }
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
// wo + dx - h]), zero outside the map. One thread an output element, grid-stride; consecutive
// threads take consecutive pixels, or in channels_last consecutive j (so y's accesses coalesce).
template <typename T, Act A>
__global__ void __launch_bounds__(kThreads)
    cheap_kernel(T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b,
                 EvalParams p) {
  const int64_t P = p.Ho * p.Wo, total = p.N * p.ghost * P, h = p.d / 2;
  const bool y_channels_inner = p.syc == 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = y_channels_inner ? (i / p.ghost) % P : i % P;
    const int64_t j = y_channels_inner ? i % p.ghost : (i / P) % p.ghost;
    const int64_t n = i / (P * p.ghost);
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

// The one-pass tile: TH x TW output pixels, kOnePassChannels intrinsic channels, the halo
// of a D x D cheap op around it; K (input channels) in slices of kOnePassK through shared
// memory.
constexpr int kOnePassTH = 8, kOnePassTW = 16, kOnePassChannels = 16, kOnePassK = 16;

template <int D>
struct OnePassTile {
  static constexpr int kHalo = D / 2, kRows = kOnePassTH + 2 * kHalo,
                       kCols = kOnePassTW + 2 * kHalo, kPixels = kRows * kCols;
  // GEMM outputs (channel, halo pixel) per thread.
  static constexpr int kOuts = (kOnePassChannels * kPixels + kThreads - 1) / kThreads;
};

// Grid (images x tile rows x tile columns, intrinsic channel blocks).
template <typename T, Act A, int D>
__global__ void __launch_bounds__(kThreads)
    one_pass_kernel(const T* __restrict__ x, const float* __restrict__ w1,
                    const float* __restrict__ b1, const float* __restrict__ w2,
                    const float* __restrict__ b2, T* __restrict__ y, EvalParams p) {
  using Tile = OnePassTile<D>;
  constexpr int CB = kOnePassChannels, KC = kOnePassK, TH = kOnePassTH, TW = kOnePassTW;
  constexpr int h = Tile::kHalo, HW = Tile::kCols, HP = Tile::kPixels;
  __shared__ float s_x[KC][HP];
  __shared__ float s_w[CB][KC];
  __shared__ float s_x1[CB][HP];
  const int64_t tiles_h = (p.Ho + TH - 1) / TH, tiles_w = (p.Wo + TW - 1) / TW;
  const int64_t n = int64_t(blockIdx.x) / (tiles_h * tiles_w);
  const int64_t tile = int64_t(blockIdx.x) % (tiles_h * tiles_w);
  const int64_t r0 = tile / tiles_w * TH, c0 = tile % tiles_w * TW;
  const int64_t m0 = int64_t(blockIdx.y) * CB;

  // x1 before BN1's shift on the tile and its halo: (channel, halo pixel) outputs o =
  // threadIdx.x + i * kThreads.
  float acc[Tile::kOuts];
#pragma unroll
  for (int i = 0; i < Tile::kOuts; ++i) acc[i] = 0.f;
  const bool x_channels_inner = p.sxc == 1;  // channels_last: consecutive threads, channels
  for (int64_t k0 = 0; k0 < p.C; k0 += KC) {
    for (int i = threadIdx.x; i < CB * KC; i += kThreads) {
      const int cb = i / KC, k = i % KC;
      s_w[cb][k] = m0 + cb < p.init && k0 + k < p.C ? w1[(m0 + cb) * p.C + k0 + k] : 0.f;
    }
    for (int i = threadIdx.x; i < KC * HP; i += kThreads) {
      const int k = x_channels_inner ? i % KC : i / HP;
      const int hp = x_channels_inner ? i / KC : i % HP;
      const int64_t ho = r0 - h + hp / HW, wo = c0 - h + hp % HW;
      float v = 0.f;
      if (k0 + k < p.C && ho >= 0 && ho < p.Ho && wo >= 0 && wo < p.Wo) {
        v = static_cast<float>(x[n * p.sxn + (k0 + k) * p.sxc + ho * p.stride * p.sxh +
                                 wo * p.stride * p.sxw]);
      }
      s_x[k][hp] = v;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < Tile::kOuts; ++i) {
      const int o = threadIdx.x + i * kThreads;
      if (o < CB * HP) {
        const int cb = o / HP, hp = o % HP;
        float a = acc[i];
#pragma unroll
        for (int k = 0; k < KC; ++k) a = fmaf(s_w[cb][k], s_x[k][hp], a);
        acc[i] = a;
      }
    }
    __syncthreads();
  }
  // x1 = act(z + b1) into shared memory; zero outside the map (the cheap op's zero padding)
  // and for channels past init.
#pragma unroll
  for (int i = 0; i < Tile::kOuts; ++i) {
    const int o = threadIdx.x + i * kThreads;
    if (o < CB * HP) {
      const int cb = o / HP, hp = o % HP;
      const int64_t ho = r0 - h + hp / HW, wo = c0 - h + hp % HW, m = m0 + cb;
      const bool inside = m < p.init && ho >= 0 && ho < p.Ho && wo >= 0 && wo < p.Wo;
      s_x1[cb][hp] = inside ? activate<A>(acc[i] + b1[m]) : 0.f;
    }
  }
  __syncthreads();
  const bool y_channels_inner = p.syc == 1;
  // The intrinsic channels: the tile's interior into y[:, m].
  for (int i = threadIdx.x; i < CB * TH * TW; i += kThreads) {
    const int cb = y_channels_inner ? i % CB : i / (TH * TW);
    const int pix = y_channels_inner ? i / CB : i % (TH * TW);
    const int ty = pix / TW, tx = pix % TW;
    const int64_t ho = r0 + ty, wo = c0 + tx, m = m0 + cb;
    if (m < p.init && ho < p.Ho && wo < p.Wo) {
      y[n * p.syn + m * p.syc + ho * p.syh + wo * p.syw] =
          static_cast<T>(s_x1[cb][(ty + h) * HW + tx + h]);
    }
  }
  // The ghost channels j = c * per + jj of this block's intrinsic channels c, j < ghost.
  const int64_t ghosts = CB * p.per, j0 = m0 * p.per;
  for (int64_t i = threadIdx.x; i < ghosts * TH * TW; i += kThreads) {
    const int64_t g = y_channels_inner ? i % ghosts : i / (TH * TW);
    const int pix = int(y_channels_inner ? i / ghosts : i % (TH * TW));
    const int ty = pix / TW, tx = pix % TW;
    const int64_t j = j0 + g, ho = r0 + ty, wo = c0 + tx;
    if (j >= p.ghost || ho >= p.Ho || wo >= p.Wo) continue;
    const float* src = &s_x1[g / p.per][ty * HW + tx];  // tap (dy, dx) at src[dy * HW + dx]
    const float* wj = w2 + j * D * D;
    float a = b2[j];
#pragma unroll
    for (int dy = 0; dy < D; ++dy) {
#pragma unroll
      for (int dx = 0; dx < D; ++dx) a = fmaf(wj[dy * D + dx], src[dy * HW + dx], a);
    }
    y[n * p.syn + (p.init + j) * p.syc + ho * p.syh + wo * p.syw] =
        static_cast<T>(activate<A>(a));
  }
}

// One-pass launch for a d the kernel is instantiated for; false for other d.
template <typename T, Act A>
bool launch_one_pass(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                     const at::Tensor& w2, const at::Tensor& b2, at::Tensor& y,
                     const EvalParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles = ((p.Ho + kOnePassTH - 1) / kOnePassTH) *
                        ((p.Wo + kOnePassTW - 1) / kOnePassTW);
  const dim3 grid(p.N * tiles, (p.init + kOnePassChannels - 1) / kOnePassChannels);
  auto go = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(x.const_data_ptr<T>(), w1.const_data_ptr<float>(),
                                          b1.const_data_ptr<float>(), w2.const_data_ptr<float>(),
                                          b2.const_data_ptr<float>(), y.mutable_data_ptr<T>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  };
  switch (p.d) {
    case 1: return go(one_pass_kernel<T, A, 1>);
    case 3: return go(one_pass_kernel<T, A, 3>);
    case 5: return go(one_pass_kernel<T, A, 5>);
    case 7: return go(one_pass_kernel<T, A, 7>);
    default: return false;
  }
}

// The one-pass kernel recomputes the primary conv on the halo: (tile + halo) / tile times its
// flops. Taken while those flops stay within this many per byte the module moves (x read, y
// written): about the float FMA rate over the memory bandwidth of an H100 (67 TFLOP/s over
// 3.35 TB/s), so the recompute hides under the memory traffic it saves. A first guess, to be
// tuned on a GPU (GHOSTOPS_CUDA_EVAL forces a form).
constexpr double kOnePassMaxFlopsPerByte = 24;

bool use_one_pass(const EvalParams& p, int64_t oup, int64_t element_size) {
  const char* form = std::getenv("GHOSTOPS_CUDA_EVAL");
  const std::string f = form == nullptr ? "auto" : form;
  TORCH_CHECK(f == "auto" || f == "one_pass" || f == "two_kernels",
              "GHOSTOPS_CUDA_EVAL='", f, "': expected auto, one_pass or two_kernels");
  if (f != "auto") return f == "one_pass";
  const double tiles = double((p.Ho + kOnePassTH - 1) / kOnePassTH) *
                       double((p.Wo + kOnePassTW - 1) / kOnePassTW);
  const double halo = p.d / 2;
  const double computed = tiles * (kOnePassTH + 2 * halo) * (kOnePassTW + 2 * halo);
  const double flops = 2.0 * p.C * p.init * computed / double(p.Ho * p.Wo);
  return flops / (double(p.C + oup) * element_size) <= kOnePassMaxFlopsPerByte;
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
    std::pair<at::Tensor, at::Tensor> folded =
        fold_bn(w.to(at::kFloat), g.to(at::kFloat), bt.to(at::kFloat), m.to(at::kFloat),
                v.to(at::kFloat), eps);
    return std::pair{folded.first.contiguous(), folded.second.contiguous()};
  };
  // (Plain variables, not structured bindings: the lambdas below capture them, which C++17
  // does not allow for bindings.)
  at::Tensor w1, b1, w2, b2;
  std::tie(w1, b1) = fold(primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps);
  std::tie(w2, b2) = fold(cheap_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps);
  at::Tensor y = at::empty({s.batch, s.oup, s.out_h, s.out_w},
                           x.options().memory_format(x.suggest_memory_format()));
  if (y.numel() == 0) return y;
  const EvalParams p{s.batch,     s.inp,       s.out_h,     s.out_w,     s.init,
                     s.ghost,     s.ratio - 1, s.dw,        s.stride,    x.stride(0),
                     x.stride(1), x.stride(2), x.stride(3), y.stride(0), y.stride(1),
                     y.stride(2), y.stride(3)};
  const bool one_pass = use_one_pass(p, s.oup, x.element_size());
  dispatch_gpu_dtype("ghost_forward_eval (CUDA kernel)", x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      if (one_pass && launch_one_pass<T, A>(x, w1, b1, w2, b2, y, p)) return;
      launch<T, A>(x, w1, b1, w2, b2, y, p);
    };
    if (activation == Act::ReLU) {
      run(std::integral_constant<Act, Act::ReLU>{});
    } else {
      run(std::integral_constant<Act, Act::Identity>{});
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CUDA, m) { m.impl("ghost_forward_eval", &ghost_forward_eval_cuda); }

}  // namespace ghostops::cuda
