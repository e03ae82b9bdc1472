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
    const int64_t wp = W + 2 * h, hp = H + 2 * h;
    const double M = double(N * P);
    using Vec = Vectorized<T>;
    constexpr int64_t VL = Vec::size();
    auto hsum = [](Vec v) {
      return double(at::vec::vec_reduce_all<T>([](Vec u, Vec t) { return u + t; }, v));
    };
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      // Slack after the padded plane: the last row's vector loads run up to 2 VL past it.
      std::vector<T> pad(hp * wp + 3 * VL, T(0)), dz(P + VL);
      // Stride 2's transposed conv: the padded plane's even and odd columns, wph each.
      const int64_t wph = (wp + 1) / 2 + VL;
      std::vector<T> phase(stride == 2 ? 2 * hp * wph : 0, T(0)), line(2 * wph + 2 * VL);
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
        const T* wc_ = w + c * d * d;
        double* gwc = gwp + c * d * d;
        for (int64_t n = 0; n < N; ++n) {
          const T *zn = zp + (n * C + c) * P, *gn = gyp + (n * C + c) * P;
          for (int64_t i = 0; i < P; i += VL) {
            const int64_t count = std::min(VL, P - i);
            Vec zv;
            const Vec ga = grad_a(zn, gn, i, count, zv);
            (k * (ga - mg - (zv - mean) * is * mx)).store(dz.data() + i, count);
          }
          // x padded by h zeros: the weight gradient correlates dz with it.
          const T* xn = xp + (n * C + c) * H * W;
          for (int64_t r = 0; r < H; ++r)
            std::copy(xn + r * W, xn + (r + 1) * W, pad.begin() + (r + h) * wp + h);
          for (int64_t dy = 0; dy < d; ++dy)
            for (int64_t dx = 0; dx < d; ++dx) {
              Vec acc(T(0));
              for (int64_t r = 0; r < Ho; ++r) {
                const T* row = pad.data() + (r * stride + dy) * wp + dx;
                const T* dzr = dz.data() + r * Wo;
                for (int64_t q = 0; q < Wo; q += VL) {
                  const Vec dv = Vec::loadu(dzr + q, std::min(VL, Wo - q));  // 0 past Wo
                  Vec xv;
                  if (stride == 1) {
                    xv = Vec::loadu(row + q);
                  } else if (stride == 2) {
                    xv = at::vec::deinterleave2(Vec::loadu(row + 2 * q),
                                                Vec::loadu(row + 2 * q + VL)).first;
                  } else {
                    T lanes[VL];
                    for (int64_t l = 0; l < VL; ++l)
                      lanes[l] = q + l < Wo ? row[(q + l) * stride] : T(0);
                    xv = Vec::loadu(lanes);
                  }
                  acc = at::vec::fmadd(dv, xv, acc);
                }
              }
              gwc[dy * d + dx] += hsum(acc);
            }
          if (!need_x) continue;
          // The transposed conv: every output scatters w * dz onto the taps it read (into the
          // padded plane, or at stride 2 its phase planes, whose padding is then dropped; it is
          // cleared again before reuse).
          if (stride != 2) std::fill(pad.begin(), pad.end(), T(0));
          for (int64_t dy = 0; dy < d; ++dy)
            for (int64_t dx = 0; dx < d; ++dx) {
              const T wt = wc_[dy * d + dx];
              for (int64_t r = 0; r < Ho; ++r) {
                T* row = pad.data() + (r * stride + dy) * wp + dx;
                const T* dzr = dz.data() + r * Wo;
                if (stride == 1 || stride == 2) {
                  // Stride 2: into the phase plane of the tap's column parity (even columns
                  // of the padded row, then odd ones), contiguous; interleaved below.
                  T* prow = stride == 1
                                ? row
                                : phase.data() + (dx % 2) * hp * wph + (r * 2 + dy) * wph + dx / 2;
                  const Vec wv(wt);
                  for (int64_t q = 0; q < Wo; q += VL) {
                    const int64_t count = std::min(VL, Wo - q);
                    at::vec::fmadd(wv, Vec::loadu(dzr + q, count), Vec::loadu(prow + q, count))
                        .store(prow + q, count);
                  }
                } else {
                  for (int64_t q = 0; q < Wo; ++q) row[q * stride] += wt * dzr[q];
                }
              }
            }
          T* gxn = gxp + (n * C + c) * H * W;
          for (int64_t r = 0; r < H; ++r) {
            const T* src = pad.data() + (r + h) * wp;
            if (stride == 2) {  // the row's even and odd columns interleaved back
              const T* even = phase.data() + (r + h) * wph;
              const T* odd = phase.data() + hp * wph + (r + h) * wph;
              for (int64_t j = 0; 2 * j < wp; j += VL) {
                const auto [lo, hi] =
                    at::vec::interleave2(Vec::loadu(even + j), Vec::loadu(odd + j));
                lo.store(line.data() + 2 * j);
                hi.store(line.data() + 2 * j + VL);
              }
              src = line.data();
            }
            std::copy(src + h, src + h + W, gxn + r * W);
          }
          if (stride == 2) {
            std::fill(phase.begin(), phase.end(), T(0));
          } else {
            std::fill(pad.begin(), pad.end(), T(0));
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
