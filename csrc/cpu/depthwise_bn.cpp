// Eval-mode depthwise conv + BatchNorm + activation on the CPU: GhostNet's stride-2 depthwise
// conv of a bottleneck and the depthwise half of its shortcut, outside the Ghost modules.
//   y[n][c] = act(dwconv(x[n][c], w[c] s[c], stride, padding d / 2) + beta[c] - mean[c] s[c]),
//   s[c] = gamma[c] / sqrt(var[c] + eps).
// One task per (image, channel) plane: the plane is copied into a zero-padded buffer, then each
// output row is vectors of outputs, every tap a vector load (stride 1) or two loads
// deinterleaved to their even elements (stride 2); other strides gather element by element.
// Stock PyTorch (oneDNN, NCHW) took 0.6 ms at batch 1 and 22 ms at batch 32 for GhostNet's
// 48-channel 112x112 stride-2 conv alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "../ghost_common.h"
#include "kernels.h"

namespace ghostops::cpu {
namespace {

template <typename T>
struct DwParams {
  const T* x;     // (N, C, H, W), contiguous
  T* y;           // (N, C, Ho, Wo), contiguous
  const T* w;     // folded weights (C, d * d)
  const T* bias;  // folded bias (C)
  int64_t N, C, H, W, d, stride, Ho, Wo;
};

// Output row r of channel c from the padded plane xp (rows of wp elements, pixel (0, 0) of the
// image at (h, h)). S: the stride if 1 or 2, else 0 (p.stride at run time).
template <typename T, Act A, int S>
void dw_row(const DwParams<T>& p, const T* xp, int64_t wp, int64_t c, int64_t r, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int64_t d = p.d, stride = S > 0 ? S : p.stride;
  const T* w = p.w + c * d * d;
  for (int64_t c0 = 0; c0 < p.Wo; c0 += VL) {
    Vec acc(p.bias[c]);
    for (int64_t dy = 0; dy < d; ++dy) {
      const T* row = xp + (r * stride + dy) * wp + c0 * stride;
      for (int64_t dx = 0; dx < d; ++dx) {
        Vec v;
        if constexpr (S == 1) {
          v = Vec::loadu(row + dx);
        } else if constexpr (S == 2) {
          v = at::vec::deinterleave2(Vec::loadu(row + dx), Vec::loadu(row + dx + VL)).first;
        } else {
          T lanes[VL];
          for (int64_t i = 0; i < VL; ++i) lanes[i] = row[dx + i * stride];
          v = Vec::loadu(lanes);
        }
        acc = at::vec::fmadd(Vec(w[dy * d + dx]), v, acc);
      }
    }
    activate_vec<A>(acc).store(out + c0, std::min(VL, p.Wo - c0));
  }
}

template <typename T, Act A, int S>
void dw_run(const DwParams<T>& p) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int64_t h = p.d / 2, wp = p.W + 2 * h, hp = p.H + 2 * h;
  // The last output vector of a row reads up to (VL - 1) * stride + VL elements past its
  // first tap: slack after the last row, zero like the padding (those lanes are not stored).
  const int64_t size = hp * wp + VL * (p.stride + 1);
  at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
    T* xp = scratch<T>(size);
    std::fill(xp, xp + size, T(0));  // padding rows and columns stay zero
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % p.C;
      const T* plane = p.x + t * p.H * p.W;
      for (int64_t r = 0; r < p.H; ++r) {
        T* dst = xp + (r + h) * wp + h;
        for (int64_t i = 0; i < p.W; i += VL) {
          const int64_t count = std::min(VL, p.W - i);
          Vec::loadu(plane + r * p.W + i, count).store(dst + i, count);
        }
      }
      T* out = p.y + t * p.Ho * p.Wo;
      for (int64_t r = 0; r < p.Ho; ++r) dw_row<T, A, S>(p, xp, wp, c, r, out + r * p.Wo);
    }
  });
}

at::Tensor dw_bn_eval_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                          const at::Tensor& bn_mean, const at::Tensor& bn_var, double eps,
                          int64_t stride, c10::string_view act) {
  const char* op = "dw_bn_eval";
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): dtype must be float32 or float64, got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              op, ": weight must have shape (", C, ", 1, d, d) with d odd, got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device() && weight.scalar_type() == x.scalar_type(), op,
              ": weight must match x's device and dtype");
  for (auto [t, name] : {std::pair{&bn_weight, "bn_weight"}, std::pair{&bn_bias, "bn_bias"},
                         std::pair{&bn_mean, "bn_mean"}, std::pair{&bn_var, "bn_var"}})
    check_vector(op, *t, name, C, x);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": x must have a non-empty map, got ",
              x.sizes());
  const Act activation = parse_act(std::string(act));
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), d = weight.size(2);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({N, C, Ho, Wo}, x.options());
  if (y.numel() == 0) return y;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_bn_eval_cpu", [&] {
    using T = scalar_t;
    // BatchNorm folded into the weights, in double, rounded to T.
    const at::Tensor gc = bn_weight.contiguous(), bc = bn_bias.contiguous();
    const at::Tensor mc = bn_mean.contiguous(), vc = bn_var.contiguous();
    const at::Tensor wc = weight.contiguous();
    const T *g = gc.const_data_ptr<T>(), *b = bc.const_data_ptr<T>();
    const T *m = mc.const_data_ptr<T>(), *v = vc.const_data_ptr<T>();
    const T* w0 = wc.const_data_ptr<T>();
    std::unique_ptr<T[]> folded(new T[C * d * d + C]);
    T* w = folded.get();
    T* bias = w + C * d * d;
    for (int64_t c = 0; c < C; ++c) {
      const T scale = T(double(g[c]) / std::sqrt(double(v[c]) + eps));
      bias[c] = T(double(b[c]) - double(m[c]) * double(scale));
      for (int64_t k = 0; k < d * d; ++k) w[c * d * d + k] = w0[c * d * d + k] * scale;
    }
    const DwParams<T> p{xc.const_data_ptr<T>(), y.mutable_data_ptr<T>(), w, bias, N, C, H, W, d,
                        stride, Ho, Wo};
    auto run = [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      if (stride == 1) {
        dw_run<T, A, 1>(p);
      } else if (stride == 2) {
        dw_run<T, A, 2>(p);
      } else {
        dw_run<T, A, 0>(p);
      }
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

TORCH_LIBRARY_IMPL(ghostops, CPU, m) { m.impl("dw_bn_eval", &dw_bn_eval_cpu); }

}  // namespace ghostops::cpu
