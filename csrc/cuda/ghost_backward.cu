// Backward of the CUDA training forward (ghost_forward_train.cu), CUDA C++: the CUDA
// implementation of ghostops::ghost_backward (schema in csrc/ops.cpp). From x, the saved z1
// and the batch statistics (y is not read, so callers may modify it in place), on the current
// stream, mirroring the Triton backward (ghostops/backends/triton_train.py):
//   b1_ghost_sums  z2 recomputed exactly as the forward computed it (train_common.cuh);
//                  per-tile sums of ga2 = dy2 act'(a2) and ga2 x2hat;
//   b2_dz2         dz2 (BN2's backward) into a float buffer, and per tile and tap the cheap
//                  weight's gradient sum dz2[q] x1[q + tap];
//   b3_dx1         dx1 = dy1 + dwconv^T(dz2), ga1 = dx1 act'(a1) into a float buffer, per-tile
//                  sums of ga1 and ga1 x1hat;
//   b4_dz1         dz1 (BN1's backward) in x's dtype;
// then the primary conv's two GEMMs with ATen (cuBLAS). Partial sums are per tile, reduced on
// the device in a fixed order (bn_reduce.cuh): results do not depend on timing. BatchNorm
// vectors are read as float32.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bn_reduce.cuh"
#include "train_common.cuh"

namespace ghostops::cuda {
namespace {

// BN2's side of the backward at one pixel of ghost channel j: ga2 = dy2 act'(a2) and x2hat,
// zero for pixels outside the plane. z2 is rounded to T first, as the forward stored it in y
// before BN2 and the activation (f2 / f3): the ReLU mask then is the forward's.
struct GhostGrad {
  float ga, xh;
};

template <typename T, Act A>
__device__ __forceinline__ GhostGrad ghost_grad(
    const PlaneIndex& i, const float* __restrict__ z1, const T* __restrict__ gy,
    const float* __restrict__ w2, const float* __restrict__ sc1, const float* __restrict__ sh1,
    const float* __restrict__ sc2, const float* __restrict__ sh2,
    const float* __restrict__ mean2, const float* __restrict__ invstd2, const TrainParams& p) {
  if (!i.ok) return {0.f, 0.f};
  const int64_t j = i.ch, c = j / p.per;
  const float z2 = static_cast<float>(static_cast<T>(z2_at<A>(
      z1 + (i.n * p.init + c) * p.P, w2 + j * p.d * p.d, i.ho, i.wo, p, sc1[c], sh1[c])));
  float ga = static_cast<float>(
      gy[i.n * p.syn + (p.init + j) * p.syc + i.ho * p.syh + i.wo * p.syw]);
  if constexpr (A == Act::ReLU) ga = fmaf(z2, sc2[j], sh2[j]) > 0.f ? ga : 0.f;
  return {ga, (z2 - mean2[j]) * invstd2[j]};
}

// Grid (N * ghost, pixel tiles): sum_ga / sum_gx (N * tiles, ghost).
template <typename T, Act A>
__global__ void __launch_bounds__(kPlaneThreads)
    b1_ghost_sums(const float* __restrict__ z1, const T* __restrict__ gy,
                  const float* __restrict__ w2, const float* __restrict__ sc1,
                  const float* __restrict__ sh1, const float* __restrict__ sc2,
                  const float* __restrict__ sh2, const float* __restrict__ mean2,
                  const float* __restrict__ invstd2, float* __restrict__ sum_ga,
                  float* __restrict__ sum_gx, TrainParams p) {
  const PlaneIndex i = plane_index(p.ghost, p);
  const GhostGrad gg = ghost_grad<T, A>(i, z1, gy, w2, sc1, sh1, sc2, sh2, mean2, invstd2, p);
  float sums[2] = {gg.ga, gg.ga * gg.xh};
  block_sums(sums);
  if (threadIdx.x == 0) {
    const int64_t part = (i.n * gridDim.y + blockIdx.y) * p.ghost + i.ch;
    sum_ga[part] = sums[0];
    sum_gx[part] = sums[1];
  }
}

// Grid (N * ghost, pixel tiles): dz2 = k2 (ga2 - mean(ga2) - x2hat mean(ga2 x2hat)) into dz2
// (N, ghost, P); the cheap weight's gradient per tile and tap into dw_part (N * tiles, ghost,
// d * d).
template <typename T, Act A>
__global__ void __launch_bounds__(kPlaneThreads)
    b2_dz2(const float* __restrict__ z1, const T* __restrict__ gy, const float* __restrict__ w2,
           const float* __restrict__ sc1, const float* __restrict__ sh1,
           const float* __restrict__ sc2, const float* __restrict__ sh2,
           const float* __restrict__ mean2, const float* __restrict__ invstd2,
           const float* __restrict__ k2, const float* __restrict__ mg2,
           const float* __restrict__ mx2, float* __restrict__ dz2, float* __restrict__ dw_part,
           TrainParams p) {
  const PlaneIndex i = plane_index(p.ghost, p);
  const GhostGrad gg = ghost_grad<T, A>(i, z1, gy, w2, sc1, sh1, sc2, sh2, mean2, invstd2, p);
  const int64_t j = i.ch, c = j / p.per;
  const int d = int(p.d), h = d / 2;
  const float dz = i.ok ? k2[j] * (gg.ga - mg2[j] - gg.xh * mx2[j]) : 0.f;
  if (i.ok) dz2[(i.n * p.ghost + j) * p.P + i.q] = dz;
  const float* z = z1 + (i.n * p.init + c) * p.P;
  const int64_t part = ((i.n * gridDim.y + blockIdx.y) * p.ghost + j) * d * d;
  // The weight gradient's per-tap block sums, kTaps taps a round of block_sums.
  constexpr int kTaps = 8;
  for (int t0 = 0; t0 < d * d; t0 += kTaps) {
    float v[kTaps];
#pragma unroll
    for (int u = 0; u < kTaps; ++u) {
      const int t = t0 + u, dy = t / d, dx = t % d;
      v[u] = i.ok && t < d * d
                 ? dz * x1_at<A>(z, i.ho + dy - h, i.wo + dx - h, p, sc1[c], sh1[c])
                 : 0.f;
    }
    block_sums(v);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int u = 0; u < kTaps; ++u) {
        if (t0 + u < d * d) dw_part[part + t0 + u] = v[u];
      }
    }
  }
}

// Grid (N * init, pixel tiles): ga1 (N, init, P) and sum_ga / sum_gx (N * tiles, init).
template <typename T, Act A>
__global__ void __launch_bounds__(kPlaneThreads)
    b3_dx1(const float* __restrict__ z1, const T* __restrict__ gy,
           const float* __restrict__ dz2, const float* __restrict__ w2,
           const float* __restrict__ sc1, const float* __restrict__ sh1,
           const float* __restrict__ mean1, const float* __restrict__ invstd1,
           float* __restrict__ ga1, float* __restrict__ sum_ga, float* __restrict__ sum_gx,
           TrainParams p) {
  const PlaneIndex i = plane_index(p.init, p);
  const int64_t c = i.ch;
  const int d = int(p.d), h = d / 2;
  float ga = 0.f, xh = 0.f;
  if (i.ok) {
    float dx =
        static_cast<float>(gy[i.n * p.syn + c * p.syc + i.ho * p.syh + i.wo * p.syw]);
    for (int64_t jj = 0; jj < p.per; ++jj) {
      const int64_t j = c * p.per + jj;
      if (j >= p.ghost) break;
      const float* plane = dz2 + (i.n * p.ghost + j) * p.P;
      for (int ty = 0; ty < d; ++ty) {  // the transposed conv: taps from the far side
        const int64_t hi = i.ho - (ty - h);
        if (hi < 0 || hi >= p.Ho) continue;
        for (int tx = 0; tx < d; ++tx) {
          const int64_t wi = i.wo - (tx - h);
          if (wi < 0 || wi >= p.Wo) continue;
          dx = fmaf(w2[(j * d + ty) * d + tx], plane[hi * p.Wo + wi], dx);
        }
      }
    }
    const int64_t e = (i.n * p.init + c) * p.P + i.q;
    const float z = z1[e];
    ga = dx;
    if constexpr (A == Act::ReLU) ga = fmaf(z, sc1[c], sh1[c]) > 0.f ? ga : 0.f;
    ga1[e] = ga;
    xh = (z - mean1[c]) * invstd1[c];
  }
  float sums[2] = {ga, ga * xh};
  block_sums(sums);
  if (threadIdx.x == 0) {
    const int64_t part = (i.n * gridDim.y + blockIdx.y) * p.init + c;
    sum_ga[part] = sums[0];
    sum_gx[part] = sums[1];
  }
}

// Both BatchNorms as the forward's kernels used them, one launch: out = sc1 | sh1 | invstd1
// (init each), then sc2 | sh2 | invstd2 (new each), from the saved float32 statistics.
__global__ void __launch_bounds__(kPlaneThreads)
    bn_affine_kernel(const float* __restrict__ mean1, const float* __restrict__ var1,
                     const float* __restrict__ g1, const float* __restrict__ b1, float eps1,
                     const float* __restrict__ mean2, const float* __restrict__ var2,
                     const float* __restrict__ g2, const float* __restrict__ b2, float eps2,
                     float* __restrict__ out, int64_t init, int64_t new_ch) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < init) {
    const BnAffine a = bn_affine_of(mean1[e], var1[e], g1[e], b1[e], eps1);
    out[e] = a.scale;
    out[init + e] = a.shift;
    out[2 * init + e] = a.invstd;
  }
  if (e < new_ch) {
    const BnAffine a = bn_affine_of(mean2[e], var2[e], g2[e], b2[e], eps2);
    float* o = out + 3 * init;
    o[e] = a.scale;
    o[new_ch + e] = a.shift;
    o[2 * new_ch + e] = a.invstd;
  }
}

// dz1 = k1 (ga1 - mean(ga1) - x1hat mean(ga1 x1hat)) in T, grid-stride over the contiguous
// (N, init, P) z1, ga1 and dz1; coef = (k1, mean ga1, mean ga1 x1hat) rows (3, init).
template <typename T>
__global__ void __launch_bounds__(kPlaneThreads)
    b4_dz1(const float* __restrict__ z1, const float* __restrict__ ga1, T* __restrict__ dz1,
           const float* __restrict__ mean1, const float* __restrict__ invstd1,
           const float* __restrict__ coef, int64_t total, int64_t P, int64_t init) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e / P % init;
    const float xh = (z1[e] - mean1[c]) * invstd1[c];
    dz1[e] = static_cast<T>(coef[c] * (ga1[e] - coef[init + c] - xh * coef[2 * init + c]));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ghost_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z1,
                    const at::Tensor& primary_weight, const at::Tensor& bn1_weight,
                    const at::Tensor& bn1_bias, const at::Tensor& mean1,
                    const at::Tensor& var1, double bn1_eps, const at::Tensor& cheap_weight,
                    const at::Tensor& bn2_weight, const at::Tensor& bn2_bias,
                    const at::Tensor& mean2, const at::Tensor& var2, double bn2_eps,
                    int64_t stride, c10::string_view act, std::array<bool, 2> output_mask) {
  constexpr const char* op = "ghost_backward (CUDA kernel)";
  TORCH_CHECK(grad_y.dim() == 4, op, ": grad_y must be 4-D, got ", grad_y.sizes());
  const GhostShape s =
      check_ghost_shape(op, x, primary_weight, cheap_weight, grad_y.size(1), stride);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  const int64_t new_ch = s.init * (s.ratio - 1), P = s.out_h * s.out_w, M = s.batch * P;
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({s.batch, s.oup, s.out_h, s.out_w}) &&
                  grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              op, ": grad_y must be (", s.batch, ", ", s.oup, ", ", s.out_h, ", ", s.out_w,
              ") ", x.scalar_type(), " on x's device, got ", grad_y.sizes(), " ",
              grad_y.scalar_type());
  TORCH_CHECK(z1.sizes() == at::IntArrayRef({s.batch, s.init, s.out_h, s.out_w}) &&
                  z1.scalar_type() == at::kFloat && z1.device() == x.device(),
              op, ": z1 must be the forward's (", s.batch, ", ", s.init, ", ", s.out_h, ", ",
              s.out_w, ") float32, got ", z1.sizes(), " ", z1.scalar_type());
  for (const auto& [t, name] : {std::pair{&primary_weight, "primary_weight"},
                                std::pair{&cheap_weight, "cheap_weight"}}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(), op, ": ",
                name, " must match x's device and dtype");
  }
  check_vector(op, bn1_weight, "bn1_weight", s.init, x, VectorDtype::AnyFloat);
  check_vector(op, bn1_bias, "bn1_bias", s.init, x, VectorDtype::AnyFloat);
  check_vector(op, mean1, "mean1", s.init, x, VectorDtype::AnyFloat);
  check_vector(op, var1, "var1", s.init, x, VectorDtype::AnyFloat);
  check_vector(op, bn2_weight, "bn2_weight", new_ch, x, VectorDtype::AnyFloat);
  check_vector(op, bn2_bias, "bn2_bias", new_ch, x, VectorDtype::AnyFloat);
  check_vector(op, mean2, "mean2", new_ch, x, VectorDtype::AnyFloat);
  check_vector(op, var2, "var2", new_ch, x, VectorDtype::AnyFloat);
  TORCH_CHECK(M > 0, op, ": needs at least one output pixel");
  check_plane_grid(op, s);
  const Act activation = parse_act(std::string(act));
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);

  auto as_float = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor mean1f = as_float(mean1), var1f = as_float(var1), g1 = as_float(bn1_weight),
                   b1 = as_float(bn1_bias);
  const at::Tensor mean2f = as_float(mean2), var2f = as_float(var2), g2 = as_float(bn2_weight),
                   b2 = as_float(bn2_bias);
  const at::Tensor affine = at::empty({3 * (s.init + new_ch)}, f32);
  bn_affine_kernel<<<cdiv(std::max(s.init, new_ch), kPlaneThreads), kPlaneThreads, 0, stream>>>(
      mean1f.const_data_ptr<float>(), var1f.const_data_ptr<float>(), g1.const_data_ptr<float>(),
      b1.const_data_ptr<float>(), float(bn1_eps), mean2f.const_data_ptr<float>(),
      var2f.const_data_ptr<float>(), g2.const_data_ptr<float>(), b2.const_data_ptr<float>(),
      float(bn2_eps), affine.mutable_data_ptr<float>(), s.init, new_ch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const float* const sc1 = affine.const_data_ptr<float>();
  const float* const sh1 = sc1 + s.init;
  const float* const invstd1 = sh1 + s.init;
  const float* const sc2 = invstd1 + s.init;
  const float* const sh2 = sc2 + new_ch;
  const float* const invstd2 = sh2 + new_ch;
  const at::Tensor w2 =
      cheap_weight.reshape({new_ch, s.dw * s.dw}).to(at::kFloat).contiguous();
  const at::Tensor z = z1.contiguous();
  // The plane kernels' threads run along a channel plane's pixels: grad_y in NCHW, so that
  // their reads coalesce (a channels_last grad_y is transposed once, by ATen's copy).
  const at::Tensor gy_nchw = grad_y.contiguous();
  const int64_t tiles = cdiv(P, kPlaneThreads), ghost = s.ghost;
  const TrainParams p{s.batch,          s.out_h,          s.out_w,          P,
                      s.init,           ghost,            new_ch,           s.ratio - 1,
                      s.dw,             gy_nchw.stride(0), gy_nchw.stride(1), gy_nchw.stride(2),
                      gy_nchw.stride(3)};

  // Ghost channels past oup (j >= ghost) change nothing: their gradients are zero.
  auto grads2 = [&](at::IntArrayRef size) {
    return ghost == new_ch ? at::empty(size, f32) : at::zeros(size, f32);
  };
  at::Tensor dgamma2 = grads2({new_ch}), dbeta2 = grads2({new_ch});
  at::Tensor dw2 = grads2({new_ch, s.dw * s.dw});
  at::Tensor dz2 = at::empty({s.batch, std::max<int64_t>(ghost, 1), P}, f32);
  at::Tensor ga1 = at::empty({s.batch, s.init, P}, f32);
  at::Tensor sum_ga1 = at::empty({s.batch * tiles, s.init}, f32);
  at::Tensor sum_gx1 = at::empty_like(sum_ga1);
  at::Tensor dbeta1 = at::empty({s.init}, f32), dgamma1 = at::empty_like(dbeta1);
  const at::Tensor coef1 = at::empty({3, s.init}, f32);  // k1, mean ga1, mean ga1 x1hat
  const bool need_dz1 = output_mask[0] || output_mask[1];
  at::Tensor dz1;  // (N, init, P) in x's dtype, where the GEMMs need it
  dispatch_gpu_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto passes = [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      const T* gy = gy_nchw.const_data_ptr<T>();
      if (ghost > 0) {
        at::Tensor sum_ga = at::empty({s.batch * tiles, ghost}, f32);
        at::Tensor sum_gx = at::empty_like(sum_ga);
        const dim3 grid(s.batch * ghost, tiles);
        b1_ghost_sums<T, A><<<grid, kPlaneThreads, 0, stream>>>(
            z.const_data_ptr<float>(), gy, w2.const_data_ptr<float>(), sc1, sh1, sc2, sh2,
            mean2f.const_data_ptr<float>(), invstd2, sum_ga.mutable_data_ptr<float>(),
            sum_gx.mutable_data_ptr<float>(), p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const at::Tensor coef2 = at::empty({3, ghost}, f32);  // k2, mean ga2, mean ga2 x2hat
        float* const k2 = coef2.mutable_data_ptr<float>();
        reduce_rows(RowTables<float>{sum_ga.const_data_ptr<float>(),
                                     sum_gx.const_data_ptr<float>(), s.batch * tiles, ghost, 0,
                                     0, 1},
                    GradFinish{g2.const_data_ptr<float>(), invstd2, float(M), ghost,
                               dbeta2.mutable_data_ptr<float>(),
                               dgamma2.mutable_data_ptr<float>(), k2},
                    x);
        at::Tensor dw_part = at::empty({s.batch * tiles, ghost, s.dw * s.dw}, f32);
        b2_dz2<T, A><<<grid, kPlaneThreads, 0, stream>>>(
            z.const_data_ptr<float>(), gy, w2.const_data_ptr<float>(), sc1, sh1, sc2, sh2,
            mean2f.const_data_ptr<float>(), invstd2, k2, k2 + ghost, k2 + 2 * ghost,
            dz2.mutable_data_ptr<float>(), dw_part.mutable_data_ptr<float>(), p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        reduce_rows(RowTables<float>{dw_part.const_data_ptr<float>(), nullptr, s.batch * tiles,
                                     ghost * s.dw * s.dw, 0, 0, 1},
                    SumFinish{dw2.mutable_data_ptr<float>()}, x);
      }
      b3_dx1<T, A><<<dim3(s.batch * s.init, tiles), kPlaneThreads, 0, stream>>>(
          z.const_data_ptr<float>(), gy, dz2.const_data_ptr<float>(),
          w2.const_data_ptr<float>(), sc1, sh1, mean1f.const_data_ptr<float>(), invstd1,
          ga1.mutable_data_ptr<float>(), sum_ga1.mutable_data_ptr<float>(),
          sum_gx1.mutable_data_ptr<float>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (activation == Act::ReLU) {
      passes(std::integral_constant<Act, Act::ReLU>{});
    } else {
      passes(std::integral_constant<Act, Act::Identity>{});
    }
    reduce_rows(RowTables<float>{sum_ga1.const_data_ptr<float>(),
                                 sum_gx1.const_data_ptr<float>(), s.batch * tiles, s.init, 0, 0,
                                 1},
                GradFinish{g1.const_data_ptr<float>(), invstd1, float(M), s.init,
                           dbeta1.mutable_data_ptr<float>(), dgamma1.mutable_data_ptr<float>(),
                           coef1.mutable_data_ptr<float>()},
                x);
    if (need_dz1) {
      dz1 = at::empty({s.batch, s.init, P}, x.options());
      const int64_t total = s.batch * s.init * P;
      const int64_t blocks = std::min<int64_t>(cdiv(total, kPlaneThreads), 65535 * 8);
      b4_dz1<T><<<blocks, kPlaneThreads, 0, stream>>>(
          z.const_data_ptr<float>(), ga1.const_data_ptr<float>(), dz1.mutable_data_ptr<T>(),
          mean1f.const_data_ptr<float>(), invstd1, coef1.const_data_ptr<float>(), total, P,
          s.init);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  // The primary conv's GEMMs, where their gradients are asked for, in x's dtype (cuBLAS:
  // tensor cores for half inputs, float32 accumulation, as cuDNN's conv backward and the
  // Triton backend's). Outputs contiguous, as the CPU kernel's and the fake's.
  at::Tensor grad_x = x.new_empty({0}), grad_w1 = x.new_empty({0});
  if (need_dz1) {
    const at::Tensor w1 = primary_weight.reshape({s.init, s.inp});  // x's dtype (checked above)
    if (output_mask[0]) {
      const at::Tensor gxs = at::matmul(w1.t(), dz1).reshape({s.batch, s.inp, s.out_h, s.out_w});
      if (stride == 1) {
        grad_x = gxs.contiguous();
      } else {
        grad_x = at::zeros(x.sizes(), x.options());
        grad_x.slice(2, 0, s.height, stride).slice(3, 0, s.width, stride).copy_(gxs);
      }
    }
    if (output_mask[1]) {
      const at::Tensor xs =
          x.slice(2, 0, s.height, stride).slice(3, 0, s.width, stride).reshape({s.batch, s.inp, P});
      grad_w1 = at::einsum("nip,ncp->ic", {dz1, xs})
                    .reshape(primary_weight.sizes())
                    .to(primary_weight.scalar_type());
    }
  }
  return {grad_x,
          grad_w1,
          dgamma1.to(bn1_weight.scalar_type()),
          dbeta1.to(bn1_bias.scalar_type()),
          dw2.reshape(cheap_weight.sizes()).to(cheap_weight.scalar_type()),
          dgamma2.to(bn2_weight.scalar_type()),
          dbeta2.to(bn2_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CUDA, m) { m.impl("ghost_backward", &ghost_backward_cuda); }

}  // namespace ghostops::cuda
