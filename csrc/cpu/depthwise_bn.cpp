// Eval-mode depthwise conv + BatchNorm + activation on the CPU: GhostNet's stride-2 depthwise
// conv of a bottleneck and the depthwise half of its shortcut, outside the Ghost modules.
//   y[n][c] = act(dwconv(x[n][c], w[c] s[c], stride, padding d / 2) + beta[c] - mean[c] s[c]),
//   s[c] = gamma[c] / sqrt(var[c] + eps).
// One task per (image, channel) plane: the plane is copied into a zero-padded buffer, then each
// output row is vectors of outputs, every tap a vector load (stride 1) or two loads
// deinterleaved to their even elements (stride 2); other strides gather element by element.
// Stock PyTorch (oneDNN, NCHW) took 0.6 ms at batch 1 and 22 ms at batch 32 for GhostNet's
// 48-channel 112x112 stride-2 conv alone. Below it, the training pair: dw_bn_train (batch
// statistics) and dw_bn_backward (over phase planes, see there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "../ghost_common.h"
#include "kernels.h"
#include "output_pool.h"

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
      for (int64_t dx = 0; dx < d; ++dx)
        acc = at::vec::fmadd(Vec(w[dy * d + dx]), strided_load<T, S>(row + dx, stride), acc);
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

// The checks every dw_bn op makes of x, the conv weight and the BN affine parameters.
void check_dw_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& gamma, const at::Tensor& beta, int64_t stride) {
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
  check_vector(op, gamma, "bn_weight", C, x);
  check_vector(op, beta, "bn_bias", C, x);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": x must have a non-empty map, got ",
              x.sizes());
}

at::Tensor dw_bn_eval_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                          const at::Tensor& bn_mean, const at::Tensor& bn_var, double eps,
                          int64_t stride, c10::string_view act) {
  const char* op = "dw_bn_eval";
  check_dw_args(op, x, weight, bn_weight, bn_bias, stride);
  const int64_t C = x.size(1);
  check_vector(op, bn_mean, "bn_mean", C, x);
  check_vector(op, bn_var, "bn_var", C, x);
  const Act activation = parse_act(std::string(act));
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), d = weight.size(2);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const at::Tensor xc = x.contiguous();
  // Pooled, as the Ghost module's output: a fresh 19 MB output (48 channels 112x112 -> 56x56,
  // batch 32) was faulted in and zeroed by the kernel on every call.
  at::Tensor y = pooled_empty({N, C, Ho, Wo}, x.options(), at::MemoryFormat::Contiguous);
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
      const auto [scale, shift] = bn_affine(m[c], v[c], g[c], b[c], eps);
      bias[c] = shift;
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

// ---------------------------------------------------------------------------------------------
// Training: batch-statistics BatchNorm. The forward returns z (the conv's output, saved for the
// backward), the batch mean and biased variance (rounded to T; the caller updates the running
// statistics); the backward recomputes the forward's BN affine from them, so the ReLU mask is
// the forward's bit for bit.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_train_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, double eps, int64_t stride, c10::string_view act) {
  const char* op = "dw_bn_train";
  check_dw_args(op, x, weight, bn_weight, bn_bias, stride);
  const Act activation = parse_act(std::string(act));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), d = weight.size(2);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, P = Ho * Wo;
  TORCH_CHECK(N * P > 1, op, ": expected more than 1 value per channel when training, got input ",
              "size ", x.sizes());
  const at::Tensor xc = x.contiguous();
  at::Tensor z = at::empty({N, C, Ho, Wo}, x.options());
  at::Tensor y = at::empty({N, C, Ho, Wo}, x.options());
  at::Tensor mean = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_bn_train_cpu", [&] {
    using T = scalar_t;
    using Vec = Vectorized<T>;
    const at::Tensor wc = weight.contiguous();
    const std::vector<T> zero(C, T(0));
    const DwParams<T> p{xc.const_data_ptr<T>(), z.mutable_data_ptr<T>(), wc.const_data_ptr<T>(),
                        zero.data(), N, C, H, W, d, stride, Ho, Wo};
    if (stride == 1) {
      dw_run<T, Act::Identity, 1>(p);
    } else if (stride == 2) {
      dw_run<T, Act::Identity, 2>(p);
    } else {
      dw_run<T, Act::Identity, 0>(p);
    }
    const at::Tensor gc = bn_weight.contiguous(), bc = bn_bias.contiguous();
    const T *g = gc.const_data_ptr<T>(), *b = bc.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    T *yp = y.mutable_data_ptr<T>(), *mp = mean.mutable_data_ptr<T>();
    T* vp = var.mutable_data_ptr<T>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        // Two passes, each plane's sum in T vectors, the planes' sums in double, in order.
        auto plane_sum = [&](auto term) {
          double total = 0;
          for (int64_t n = 0; n < N; ++n) {
            const T* zn = zp + (n * C + c) * P;
            Vec acc(T(0));
            for (int64_t i = 0; i < P; i += Vec::size())
              acc = acc + term(Vec::loadu(zn + i, std::min<int64_t>(Vec::size(), P - i)),
                               std::min<int64_t>(Vec::size(), P - i));
            total += double(at::vec::vec_reduce_all<T>([](Vec u, Vec t) { return u + t; }, acc));
          }
          return total;
        };
        const double mu = plane_sum([](Vec v, int64_t) { return v; }) / double(N * P);
        const Vec muv = Vec(T(mu));
        const double m2 = plane_sum([&](Vec v, int64_t count) {
          const Vec dv = count == Vec::size() ? v - muv : Vec::set(Vec(T(0)), v - muv, count);
          return dv * dv;
        });
        mp[c] = T(mu);
        vp[c] = T(m2 / double(N * P));
        const auto [scale, shift] = bn_affine(mp[c], vp[c], g[c], b[c], eps);
        const Vec sc(scale), sh(shift);
        for (int64_t n = 0; n < N; ++n) {
          const T* zn = zp + (n * C + c) * P;
          T* yn = yp + (n * C + c) * P;
          for (int64_t i = 0; i < P; i += Vec::size()) {
            const int64_t count = std::min<int64_t>(Vec::size(), P - i);
            Vec v = at::vec::fmadd(Vec::loadu(zn + i, count), sc, sh);
            if (activation == Act::ReLU) v = at::vec::maximum(v, Vec(T(0)));
            v.store(yn + i, count);
          }
        }
      }
    });
  });
  return {y, z, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, double eps, int64_t stride, c10::string_view act, bool need_x) {
  const char* op = "dw_bn_backward";
  check_dw_args(op, x, weight, bn_weight, bn_bias, stride);
  const Act activation = parse_act(std::string(act));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), d = weight.size(2);
  const int64_t h = d / 2, Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, P = Ho * Wo;
  for (auto [t, name] : {std::pair{&grad_y, "grad_y"}, std::pair{&z, "z"}}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({N, C, Ho, Wo}), op, ": ", name, " has shape ",
                t->sizes(), ", expected (", N, ", ", C, ", ", Ho, ", ", Wo, ")");
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(), op, ": ",
                name, " must match x's device and dtype");
  }
  check_vector(op, mean, "mean", C, x);
  check_vector(op, var, "var", C, x);
  const at::Tensor xc = x.contiguous(), gy = grad_y.contiguous(), zc = z.contiguous();
  // Every element written; pooled as the Ghost backward's input gradient (measured: the 77 MB
  // gradient of GhostNet's 48-channel 112x112 stride-2 conv, 19 -> 13 ms a call).
  at::Tensor gx = pooled_empty({need_x ? N : 0, C, H, W}, x.options(),
                               at::MemoryFormat::Contiguous);
  const auto dopts = x.options().dtype(at::kDouble);
  at::Tensor gw = at::zeros({C, 1, d, d}, dopts);
  at::Tensor gg = at::zeros({C}, dopts), gb = at::zeros({C}, dopts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_bn_backward_cpu", [&] {
    using T = scalar_t;
    const at::Tensor wc = weight.contiguous(), gc = bn_weight.contiguous();
    const at::Tensor bc = bn_bias.contiguous(), mc = mean.contiguous(), vc = var.contiguous();
    const T *w = wc.const_data_ptr<T>(), *g = gc.const_data_ptr<T>(), *b = bc.const_data_ptr<T>();
    const T *mp = mc.const_data_ptr<T>(), *vp = vc.const_data_ptr<T>();
    const T *xp = xc.const_data_ptr<T>(), *gyp = gy.const_data_ptr<T>();
    const T* zp = zc.const_data_ptr<T>();
    T* gxp = need_x ? gx.mutable_data_ptr<T>() : nullptr;
    double *gwp = gw.mutable_data_ptr<double>(), *ggp = gg.mutable_data_ptr<double>();
    double* gbp = gb.mutable_data_ptr<double>();
    const double M = double(N * P);
    using Vec = Vectorized<T>;
    constexpr int64_t VL = Vec::size();
    auto hsum = [](Vec v) {
      return double(at::vec::vec_reduce_all<T>([](Vec u, Vec t) { return u + t; }, v));
    };
    // The conv in phase planes: the zero-padded input (hp, wp) split by the parity of its row
    // and column under the stride (s * s planes of (hs, ws); one plane, the padded input, at
    // stride 1). Output (r, q) with tap (dy, dx) reads plane (dy % s, dx % s) at
    // (r + dy / s, q + dx / s): in planes flattened with rows of ws, one offset per tap, so the
    // weight gradient and the transposed conv run as vectors over flat ranges (outputs on rows
    // of ws, the columns past Wo zero), whatever the width. Row by row they were masked
    // vectors 7 wide at 7x7 outputs, and the transposed conv's overlapping read-modify-writes
    // waited on store forwarding.
    const int64_t st = stride, hp = H + 2 * h, wp = W + 2 * h;
    const int64_t hs = (hp + st - 1) / st, ws = (wp + st - 1) / st, taps = d * d;
    const int64_t span = ((d - 1) / st) * ws + (d - 1) / st;  // the largest tap offset
    const int64_t plane = hs * ws + span + 2 * VL;            // a phase plane, with slack
    const int64_t front = (span + VL - 1) / VL * VL;          // zeros before dz
    const int64_t outs = Ho * ws;                             // flat outputs
    std::vector<int64_t> off(taps), tap_src(taps);  // tap_src: where in xph tap t starts
    std::vector<std::vector<int64_t>> phase_taps(st * st);
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t dy = t / d, dx = t % d, ph = (dy % st) * st + dx % st;
      off[t] = (dy / st) * ws + dx / st;
      tap_src[t] = ph * plane + off[t];
      phase_taps[ph].push_back(t);
    }
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> xph(st * st * plane, T(0)), gph(st * st * plane, T(0));
      // line: a padded input row (its padding stays zero); out_line: a gradient row.
      std::vector<T> dzf(front + plane + VL, T(0)), line(wp + 2 * VL, T(0)), out_line(line);
      for (int64_t c = begin; c < end; ++c) {
        const auto [scale, shift] = bn_affine(mp[c], vp[c], g[c], b[c], eps);
        const double invstd = 1.0 / std::sqrt(double(vp[c]) + eps);
        const Vec sc(scale), sh(shift), mean(mp[c]), zero(T(0));
        // ga = dL/da with a = z * scale + shift, as the forward computed a (same bits).
        auto grad_a = [&](const T* zn, const T* gn, int64_t i, int64_t count, Vec& zv) {
          zv = Vec::loadu(zn + i, count);
          Vec ga = Vec::loadu(gn + i, count);
          if (activation == Act::ReLU) ga = ga & (at::vec::fmadd(zv, sc, sh) > zero);
          return ga;
        };
        double sum_ga = 0, sum_gx = 0;  // per plane in T vectors, across planes in double
        for (int64_t n = 0; n < N; ++n) {
          const T *zn = zp + (n * C + c) * P, *gn = gyp + (n * C + c) * P;
          Vec acc_ga(T(0)), acc_gx(T(0));
          for (int64_t i = 0; i < P; i += VL) {
            Vec zv;
            const Vec ga = grad_a(zn, gn, i, std::min(VL, P - i), zv);
            acc_ga = acc_ga + ga;
            acc_gx = at::vec::fmadd(ga, zv - mean, acc_gx);  // lanes past P: ga is 0
          }
          sum_ga += hsum(acc_ga);
          sum_gx += hsum(acc_gx) * invstd;
        }
        gbp[c] = sum_ga;
        ggp[c] = sum_gx;
        const Vec k = Vec(T(double(g[c]) * invstd)), is = Vec(T(invstd));
        const Vec mg = Vec(T(sum_ga / M)), mx = Vec(T(sum_gx / M));
        const T* wc_ = w + c * taps;
        double* gwc = gwp + c * taps;
        T* dz = dzf.data() + front;  // rows of ws, zero past Wo and past the last row
        for (int64_t n = 0; n < N; ++n) {
          const T *zn = zp + (n * C + c) * P, *gn = gyp + (n * C + c) * P;
          for (int64_t r = 0; r < Ho; ++r)
            for (int64_t q = 0; q < Wo; q += VL) {
              const int64_t count = std::min(VL, Wo - q);
              Vec zv;
              const Vec ga = grad_a(zn, gn, r * Wo + q, count, zv);
              (k * (ga - mg - (zv - mean) * is * mx)).store(dz + r * ws + q, count);
            }
          // x into its phase planes (their padding stays zero from the start).
          const T* xn = xp + (n * C + c) * H * W;
          for (int64_t y = 0; y < H; ++y) {
            const int64_t R = y + h;
            T* dst = xph.data() + (R % st) * st * plane + (R / st) * ws;
            if (st == 1) {
              std::copy(xn + y * W, xn + (y + 1) * W, dst + h);
            } else {
              std::copy(xn + y * W, xn + (y + 1) * W, line.begin() + h);
              if (st == 2) {
                for (int64_t j = 0; 2 * j < wp; j += VL) {
                  const auto [even, odd] = at::vec::deinterleave2(
                      Vec::loadu(line.data() + 2 * j), Vec::loadu(line.data() + 2 * j + VL));
                  even.store(dst + j, std::min(VL, ws - j));
                  odd.store(dst + plane + j, std::min(VL, ws - j));
                }
              } else {
                for (int64_t X = 0; X < wp; ++X) dst[(X % st) * plane + X / st] = line[X];
              }
            }
          }
          // Weight gradient: every tap's products over the flat outputs (dz is zero on the
          // columns past Wo, so those add nothing).
          const T* xs_ = xph.data();
          const int64_t* src = tap_src.data();
          switch (taps) {  // the accumulators in registers for GhostNet's 3x3 and 5x5
            case 9: tap_correlation<T, 9>(dz, 0, outs, xs_, src, taps, gwc); break;
            case 25: tap_correlation<T, 25>(dz, 0, outs, xs_, src, taps, gwc); break;
            default:
              for (int64_t t0 = 0; t0 < taps; t0 += kMaxCorrelationTaps)
                tap_correlation<T, 0>(dz, 0, outs, xs_, src + t0,
                                      std::min<int64_t>(kMaxCorrelationTaps, taps - t0),
                                      gwc + t0);
          }
          if (!need_x) continue;
          // The transposed conv as a gather: each phase plane of the padded input's gradient
          // sums its taps' w * dz shifted back (dz has zeros before it), one store a vector.
          for (int64_t ph = 0; ph < st * st; ++ph) {
            T* gp = gph.data() + ph * plane;
            const auto& mine = phase_taps[ph];
            for (int64_t f = 0; f < hs * ws; f += VL) {
              Vec a(T(0));
              for (const int64_t t : mine)
                a = at::vec::fmadd(Vec(wc_[t]), Vec::loadu(dz + f - off[t]), a);
              a.store(gp + f);
            }
          }
          T* gxn = gxp + (n * C + c) * H * W;
          for (int64_t y = 0; y < H; ++y) {
            const int64_t R = y + h;
            const T* src = gph.data() + (R % st) * st * plane + (R / st) * ws;
            if (st == 1) {
              std::copy(src + h, src + h + W, gxn + y * W);
            } else if (st == 2) {  // the row's even and odd columns interleaved back
              for (int64_t j = 0; 2 * j < wp; j += VL) {
                const auto [lo, hi] =
                    at::vec::interleave2(Vec::loadu(src + j), Vec::loadu(src + plane + j));
                lo.store(out_line.data() + 2 * j);
                hi.store(out_line.data() + 2 * j + VL);
              }
              std::copy(out_line.begin() + h, out_line.begin() + h + W, gxn + y * W);
            } else {
              for (int64_t x = 0; x < W; ++x) {
                const int64_t X = x + h;
                gxn[y * W + x] = src[(X % st) * plane + X / st];
              }
            }
          }
        }
      }
    });
  });
  const auto dt = x.scalar_type();
  return {gx, gw.to(dt), gg.to(dt), gb.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CPU, m) {
  m.impl("dw_bn_eval", &dw_bn_eval_cpu);
  m.impl("dw_bn_train", &dw_bn_train_cpu);
  m.impl("dw_bn_backward", &dw_bn_backward_cpu);
}

}  // namespace ghostops::cpu
