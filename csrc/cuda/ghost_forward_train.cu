// Training-mode Ghost module on the GPU, CUDA C++: the CUDA implementation of
// ghostops::ghost_forward_train (schema in csrc/ops.cpp, the CPU kernel's contract), with
// batch-statistics BatchNorms. Three passes on the current stream, as DESIGN.md section 2:
//   f1_primary     z1 = W1 x, the shared tiled GEMM (primary_gemm.cuh), stored as float
//                  (N, init, P); its epilogue stores each 64-pixel tile's per-channel mean and
//                  M2, which the host side combines on the device (Chan et al.);
//   f2_cheap       per (image, ghost channel j < new, pixel tile): x1 = act(BN1(z1))
//                  recomputed with the halo, the depthwise conv z2 into y[:, init + j] (j past
//                  oup: statistics only), x1 itself into y[:, c] (first ghost channel of c);
//                  per-tile moments of z2;
//   f3_affine_act  y[:, init:] = act(BN2(z2)) in place.
// Returns y (x's dtype and memory format), z1 and the four batch statistics in float32. No
// host sync: the statistics stay on the device; the caller updates the running statistics.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_reduce.cuh"
#include "primary_gemm.cuh"
#include "train_common.cuh"

namespace ghostops::cuda {
namespace {

// z1[n, m, q] = sum_k w[m, k] x[n, k, q strided]; the tile's per-channel mean and M2 over its
// valid pixels into part_mean / part_m2 (pixel tiles, M).
template <typename T, int kRows, bool kXVectors>
__global__ void __launch_bounds__(kGemmThreads, 2)
    f1_primary(const T* __restrict__ x, const T* __restrict__ w, float* __restrict__ z1,
               float* __restrict__ part_mean, float* __restrict__ part_m2, GemmShape g) {
  constexpr int R = kRows / 16;  // a thread's rows of the tile: R ty + i
  float acc[R][4];
  primary_gemm_tile<T, kRows, kXVectors>(x, w, g, acc);
  const int64_t P = g.Ho * g.Wo, n_pix = g.N * P;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileP, m0 = int64_t(blockIdx.y) * kRows;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float count = float(n_pix - pix0 < kTileP ? n_pix - pix0 : kTileP);
#pragma unroll
  for (int i = 0; i < R; ++i) {
    // The 16 threads of a half-warp (same ty) hold a channel's 64 pixels: sums over them by
    // xor shuffles inside the half-warp, every lane of the warp taking part.
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) s += pix0 + tx + 16 * j < n_pix ? acc[i][j] : 0.f;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float mean = s / count;
    float m2 = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float dv = pix0 + tx + 16 * j < n_pix ? acc[i][j] - mean : 0.f;
      m2 = fmaf(dv, dv, m2);
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) m2 += __shfl_xor_sync(0xffffffffu, m2, o);
    const int64_t m = m0 + R * ty + i;
    if (m >= g.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t pix = pix0 + tx + 16 * j;
      if (pix < n_pix) z1[(pix / P * g.M + m) * P + pix % P] = acc[i][j];
    }
    if (tx == 0) {
      part_mean[int64_t(blockIdx.x) * g.M + m] = mean;
      part_m2[int64_t(blockIdx.x) * g.M + m] = m2;
    }
  }
}

// Grid (N * new, pixel tiles). y gets x1 and the pre-BN z2; part_mean / part_m2 (N * tiles,
// new) the tile's moments of z2.
template <typename T, Act A>
__global__ void __launch_bounds__(kPlaneThreads)
    f2_cheap(const float* __restrict__ z1, T* __restrict__ y, const float* __restrict__ w2,
             const float* __restrict__ sc1, const float* __restrict__ sh1,
             float* __restrict__ part_mean, float* __restrict__ part_m2, TrainParams p) {
  const PlaneIndex i = plane_index(p.new_ch, p);
  const int64_t j = i.ch, c = j / p.per;
  const float* z = z1 + (i.n * p.init + c) * p.P;
  float acc = 0.f;
  if (i.ok) {
    acc = z2_at<A>(z, w2 + j * p.d * p.d, i.ho, i.wo, p, sc1[c], sh1[c]);
    T* yp = y + i.n * p.syn + i.ho * p.syh + i.wo * p.syw;
    if (j % p.per == 0) yp[c * p.syc] = static_cast<T>(x1_at<A>(z, i.ho, i.wo, p, sc1[c], sh1[c]));
    if (j < p.ghost) yp[(p.init + j) * p.syc] = static_cast<T>(acc);
  }
  const int64_t left = p.P - int64_t(blockIdx.y) * kPlaneThreads;
  const float count = float(left < kPlaneThreads ? left : kPlaneThreads);
  const float mean = block_sum(acc) / count;  // invalid pixels hold 0
  const float dv = i.ok ? acc - mean : 0.f;
  const float m2 = block_sum(dv * dv);
  if (threadIdx.x == 0) {
    const int64_t part = (i.n * gridDim.y + blockIdx.y) * p.new_ch + j;
    part_mean[part] = mean;
    part_m2[part] = m2;
  }
}

// y[:, init + j] = act(y sc2[j] + sh2[j]) for j < ghost, grid-stride; consecutive threads take
// consecutive pixels, or consecutive j where y's channel stride is 1 (so y's accesses
// coalesce; the forward passes an NCHW y, whose channel stride is 1 only on 1 x 1 maps).
template <typename T, Act A>
__global__ void __launch_bounds__(kPlaneThreads)
    f3_affine_act(T* __restrict__ y, const float* __restrict__ sc2,
                  const float* __restrict__ sh2, TrainParams p) {
  const int64_t total = p.N * p.ghost * p.P;
  const bool y_channels_inner = p.syc == 1;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = y_channels_inner ? (e / p.ghost) % p.P : e % p.P;
    const int64_t j = y_channels_inner ? e % p.ghost : (e / p.P) % p.ghost;
    const int64_t n = e / (p.P * p.ghost);
    T* v = y + n * p.syn + (p.init + j) * p.syc + q / p.Wo * p.syh + q % p.Wo * p.syw;
    *v = static_cast<T>(activate<A>(fmaf(static_cast<float>(*v), sc2[j], sh2[j])));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ghost_forward_train_cuda(const at::Tensor& x, const at::Tensor& primary_weight,
                         const at::Tensor& bn1_weight, const at::Tensor& bn1_bias,
                         double bn1_eps, const at::Tensor& cheap_weight,
                         const at::Tensor& bn2_weight, const at::Tensor& bn2_bias,
                         double bn2_eps, int64_t oup, int64_t stride, c10::string_view act) {
  constexpr const char* op = "ghost_forward_train (CUDA kernel)";
  const GhostShape s = check_ghost_shape(op, x, primary_weight, cheap_weight, oup, stride);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  for (const auto& [t, name] : {std::pair{&primary_weight, "primary_weight"},
                                std::pair{&cheap_weight, "cheap_weight"}}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(), op, ": ",
                name, " must match x's device and dtype");
  }
  const int64_t new_ch = s.init * (s.ratio - 1);
  check_vector(op, bn1_weight, "bn1_weight", s.init, x, VectorDtype::AnyFloat);
  check_vector(op, bn1_bias, "bn1_bias", s.init, x, VectorDtype::AnyFloat);
  check_vector(op, bn2_weight, "bn2_weight", new_ch, x, VectorDtype::AnyFloat);
  check_vector(op, bn2_bias, "bn2_bias", new_ch, x, VectorDtype::AnyFloat);
  const int64_t P = s.out_h * s.out_w, M = s.batch * P;
  TORCH_CHECK(M > 0, op, ": batch statistics need at least one output pixel, got x of ",
              x.sizes());
  check_plane_grid(op, s);
  const Act activation = parse_act(std::string(act));
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);

  // y is computed in NCHW and, for a channels_last x, transposed once at the end (ATen's copy):
  // f2_cheap's threads run along a channel plane's pixels, whose stores into a channels_last y
  // would land C elements apart (a 32-byte sector per 2 or 4 bytes written).
  const at::MemoryFormat y_format = x.suggest_memory_format();
  at::Tensor y = at::empty({s.batch, s.oup, s.out_h, s.out_w}, x.options());
  at::Tensor z1 = at::empty({s.batch, s.init, s.out_h, s.out_w}, f32);
  const at::Tensor w1 = primary_weight.reshape({s.init, s.inp}).contiguous();  // x's dtype
  const at::Tensor w2 =
      cheap_weight.reshape({new_ch, s.dw * s.dw}).to(at::kFloat).contiguous();
  const int64_t tiles1 = cdiv(M, kTileP), tiles = cdiv(P, kPlaneThreads);
  at::Tensor part_mean1 = at::empty({tiles1, s.init}, f32), part_m21 = at::empty_like(part_mean1);
  at::Tensor part_mean2 = at::empty({s.batch * tiles, new_ch}, f32);
  at::Tensor part_m22 = at::empty_like(part_mean2);
  const GemmShape g{s.batch, s.inp, s.init, s.out_h, s.out_w, s.stride,
                    x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const TrainParams p{s.batch,     s.out_h,     s.out_w,     P,           s.init,
                      s.ghost,     new_ch,      s.ratio - 1, s.dw,        y.stride(0),
                      y.stride(1), y.stride(2), y.stride(3)};
  // The batch statistics (outputs) and BatchNorm's scale and shift, float32, from the tiles'
  // moments (bn_reduce.cuh); the BatchNorm vectors read as float32.
  at::Tensor mean1 = at::empty({s.init}, f32), var1 = at::empty_like(mean1);
  at::Tensor mean2 = at::empty({new_ch}, f32), var2 = at::empty_like(mean2);
  const at::Tensor affine = at::empty({2 * (s.init + new_ch)}, f32);
  float* const sc1 = affine.mutable_data_ptr<float>();
  float* const sh1 = sc1 + s.init;
  float* const sc2 = sh1 + s.init;
  float* const sh2 = sc2 + new_ch;
  const at::Tensor g1 = bn1_weight.to(at::kFloat).contiguous();
  const at::Tensor b1 = bn1_bias.to(at::kFloat).contiguous();
  const at::Tensor g2 = bn2_weight.to(at::kFloat).contiguous();
  const at::Tensor b2 = bn2_bias.to(at::kFloat).contiguous();
  dispatch_gpu_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool x_vectors = x_channel_vectors(x.const_data_ptr<T>(), g, 16 / sizeof(T));
    dispatch_gemm_tile(s.init, x_vectors, [&](auto rows_tag, auto xv_tag) {
      constexpr int kRows = decltype(rows_tag)::value;
      const dim3 grid(tiles1, cdiv(s.init, kRows));
      f1_primary<T, kRows, decltype(xv_tag)::value><<<grid, kGemmThreads, 0, stream>>>(
          x.const_data_ptr<T>(), w1.const_data_ptr<T>(), z1.mutable_data_ptr<float>(),
          part_mean1.mutable_data_ptr<float>(), part_m21.mutable_data_ptr<float>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // F1's tiles run over the batch's M pixels; F2's over each image's plane of P.
    reduce_rows(RowTables<float>{part_mean1.const_data_ptr<float>(),
                                 part_m21.const_data_ptr<float>(), tiles1, s.init, kTileP, M,
                                 tiles1},
                StatsFinish{g1.const_data_ptr<float>(), b1.const_data_ptr<float>(),
                            float(bn1_eps), double(M), mean1.mutable_data_ptr<float>(),
                            var1.mutable_data_ptr<float>(), sc1, sh1},
                x);
    auto passes = [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      f2_cheap<T, A><<<dim3(s.batch * new_ch, tiles), kPlaneThreads, 0, stream>>>(
          z1.const_data_ptr<float>(), y.mutable_data_ptr<T>(), w2.const_data_ptr<float>(),
          sc1, sh1, part_mean2.mutable_data_ptr<float>(), part_m22.mutable_data_ptr<float>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduce_rows(RowTables<float>{part_mean2.const_data_ptr<float>(),
                                   part_m22.const_data_ptr<float>(), s.batch * tiles, new_ch,
                                   kPlaneThreads, P, tiles},
                  StatsFinish{g2.const_data_ptr<float>(), b2.const_data_ptr<float>(),
                              float(bn2_eps), double(M), mean2.mutable_data_ptr<float>(),
                              var2.mutable_data_ptr<float>(), sc2, sh2},
                  x);
      if (s.ghost > 0) {
        const int64_t total = s.batch * s.ghost * P;
        const int64_t blocks = std::min<int64_t>(cdiv(total, kPlaneThreads), 65535 * 8);
        f3_affine_act<T, A><<<blocks, kPlaneThreads, 0, stream>>>(y.mutable_data_ptr<T>(), sc2,
                                                                  sh2, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (activation == Act::ReLU) {
      passes(std::integral_constant<Act, Act::ReLU>{});
    } else {
      passes(std::integral_constant<Act, Act::Identity>{});
    }
  });
  return {y.contiguous(y_format), z1, mean1, var1, mean2, var2};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CUDA, m) {
  m.impl("ghost_forward_train", &ghost_forward_train_cuda);
}

}  // namespace ghostops::cuda
