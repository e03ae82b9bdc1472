// Eval-mode dense conv + BatchNorm + activation on the CPU for few input channels (GhostNet's
// stem: 3 -> 16 channels, 3x3, stride 2, at 224x224):
//   y[n][o] = act(sum_{c, dy, dx} w[o][c][dy][dx] s[o] xpad[n][c][r * stride + dy][col * stride
//             + dx] + beta[o] - mean[o] s[o]),  s[o] = gamma[o] / sqrt(var[o] + eps).
// Stock PyTorch (oneDNN, NCHW) took 17 ms for the stem at batch 32 (a 3-channel input is a poor
// fit for its blocked layouts) and 0.1 ms at batch 1, plus the BatchNorm and ReLU passes.
// Tasks are bands of output rows of one image. A band's input rows are copied, zero-padded,
// into a per-thread buffer; each output vector then keeps up to 16 output channels in
// registers while every input tap is loaded once (stride 2: two loads deinterleaved to their
// even elements) and multiplied into all of them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>

#include "../ghost_common.h"
#include "kernels.h"
#include "output_pool.h"

namespace ghostops::cpu {
namespace {

// Input channels the kernel takes: each output vector makes C * d * d taps for every output
// channel, so the input should be thin (the stem has 3); wider ones run the reference.
constexpr int64_t kMaxConvInputChannels = 8;

template <typename T>
struct ConvParams {
  const T* x;     // (N, C, H, W), contiguous
  T* y;           // (N, O, Ho, Wo), contiguous
  const T* w;     // folded weights (O, C, d, d)
  const T* bias;  // folded bias (O)
  int64_t N, C, H, W, O, d, stride, Ho, Wo;
};

// Output row r of output channels [o0, o0 + OB) from the padded band xp (channel c's rows
// cs apart, rows wp apart, the band's first row at input row r0 * stride - d / 2).
// S: the stride if 1 or 2, else 0 (p.stride at run time).
template <typename T, Act A, int S, int OB>
void conv_row(const ConvParams<T>& p, const T* xp, int64_t cs, int64_t wp, int64_t band_row,
              int64_t o0, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int64_t d = p.d, stride = S > 0 ? S : p.stride, taps = p.C * d * d;
  const T* w = p.w + o0 * taps;
  const int64_t plane = p.Ho * p.Wo;
  for (int64_t c0 = 0; c0 < p.Wo; c0 += VL) {
    Vec acc[OB];
    for (int o = 0; o < OB; ++o) acc[o] = Vec(p.bias[o0 + o]);
    for (int64_t c = 0; c < p.C; ++c)
      for (int64_t dy = 0; dy < d; ++dy) {
        const T* row = xp + c * cs + (band_row * stride + dy) * wp + c0 * stride;
        const T* wt = w + (c * d + dy) * d;
        for (int64_t dx = 0; dx < d; ++dx) {
          const Vec v = strided_load<T, S>(row + dx, stride);
          for (int o = 0; o < OB; ++o)
            acc[o] = at::vec::fmadd(Vec(wt[o * taps + dx]), v, acc[o]);
        }
      }
    const int64_t count = std::min(VL, p.Wo - c0);
    for (int o = 0; o < OB; ++o) activate_vec<A>(acc[o]).store(out + o * plane + c0, count);
  }
}

template <typename T, Act A, int S>
void conv_rows(const ConvParams<T>& p, const T* xp, int64_t cs, int64_t wp, int64_t band_row,
               T* out_row) {
  // Output channels in register blocks of 16, then at most one each of 8, 4, 2 and 1.
  const int64_t plane = p.Ho * p.Wo;
  int64_t o0 = 0;
  auto blocks_of = [&](auto block) {
    constexpr int OB = decltype(block)::value;
    for (; o0 + OB <= p.O; o0 += OB)
      conv_row<T, A, S, OB>(p, xp, cs, wp, band_row, o0, out_row + o0 * plane);
  };
  blocks_of(std::integral_constant<int, 16>{});
  blocks_of(std::integral_constant<int, 8>{});
  blocks_of(std::integral_constant<int, 4>{});
  blocks_of(std::integral_constant<int, 2>{});
  blocks_of(std::integral_constant<int, 1>{});
}

template <typename T, Act A, int S>
void conv_run(const ConvParams<T>& p) {
  constexpr int64_t VL = Vectorized<T>::size();
  const int64_t h = p.d / 2;
  // Bands of output rows: about 8 per task, and at least two tasks a thread.
  const int64_t threads = at::get_num_threads();
  const int64_t per_image = std::max<int64_t>(1, (2 * threads + p.N - 1) / p.N);
  const int64_t band =
      std::max<int64_t>(1, std::min<int64_t>(8, (p.Ho + per_image - 1) / per_image));
  const int64_t bands = (p.Ho + band - 1) / band;
  // The padded band: input rows [r0 * stride - h, (r0 + band - 1) * stride + h], each of
  // W + 2h elements plus slack for the last vector's reads past the row (zero, not stored).
  const int64_t rows_in = (band - 1) * p.stride + p.d;
  const int64_t wp = p.W + 2 * h + VL * (p.stride + 1);
  const int64_t cs = rows_in * wp;
  at::parallel_for(0, p.N * bands, 1, [&](int64_t begin, int64_t end) {
    T* xp = scratch<T>(p.C * cs);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / bands, r0 = t % bands * band;
      const int64_t rows = std::min(band, p.Ho - r0);
      const int64_t top = r0 * p.stride - h;
      for (int64_t c = 0; c < p.C; ++c)
        for (int64_t i = 0; i < rows_in; ++i) {
          T* dst = xp + c * cs + i * wp;
          const int64_t r = top + i;
          std::fill(dst, dst + wp, T(0));
          if (r >= 0 && r < p.H)
            std::copy_n(p.x + ((n * p.C + c) * p.H + r) * p.W, p.W, dst + h);
        }
      T* out = p.y + n * p.O * p.Ho * p.Wo;
      for (int64_t i = 0; i < rows; ++i)
        conv_rows<T, A, S>(p, xp, cs, wp, i, out + (r0 + i) * p.Wo);
    }
  });
}

at::Tensor conv_bn_eval_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                            const at::Tensor& bn_mean, const at::Tensor& bn_var, double eps,
                            int64_t stride, c10::string_view act) {
  const char* op = "conv_bn_eval";
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): dtype must be float32 or float64, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C >= 1 && C <= kMaxConvInputChannels, op, ": x must have 1 to ",
              kMaxConvInputChannels, " channels, got ", C);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) >= 1 && weight.size(1) == C &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              op, ": weight must have shape (C_out, ", C, ", d, d) with d odd, got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device() && weight.scalar_type() == x.scalar_type(), op,
              ": weight must match x's device and dtype");
  const int64_t O = weight.size(0), d = weight.size(2);
  check_vector(op, bn_weight, "bn_weight", O, x);
  check_vector(op, bn_bias, "bn_bias", O, x);
  check_vector(op, bn_mean, "bn_mean", O, x);
  check_vector(op, bn_var, "bn_var", O, x);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(H > 0 && W > 0, op, ": x must have a non-empty map, got ", x.sizes());
  const Act activation = parse_act(std::string(act));
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = pooled_empty({N, O, Ho, Wo}, x.options(), at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_bn_eval_cpu", [&] {
    using T = scalar_t;
    const int64_t taps = C * d * d;
    std::unique_ptr<T[]> folded(new T[O * taps + O]);
    T* w = folded.get();
    T* bias = w + O * taps;
    const at::Tensor g = bn_weight.contiguous(), b = bn_bias.contiguous();
    const at::Tensor mean = bn_mean.contiguous(), var = bn_var.contiguous();
    const at::Tensor wc = weight.contiguous();
    const T* w0 = wc.const_data_ptr<T>();
    for (int64_t o = 0; o < O; ++o) {
      T scale;
      std::tie(scale, bias[o]) =
          bn_affine(mean.const_data_ptr<T>()[o], var.const_data_ptr<T>()[o],
                    g.const_data_ptr<T>()[o], b.const_data_ptr<T>()[o], eps);
      for (int64_t i = 0; i < taps; ++i) w[o * taps + i] = w0[o * taps + i] * scale;
    }
    const ConvParams<T> p{xc.const_data_ptr<T>(), y.mutable_data_ptr<T>(), w, bias, N, C, H, W,
                          O, d, stride, Ho, Wo};
    auto run = [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      if (stride == 1) return conv_run<T, A, 1>(p);
      if (stride == 2) return conv_run<T, A, 2>(p);
      conv_run<T, A, 0>(p);
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

TORCH_LIBRARY_IMPL(ghostops, CPU, m) { m.impl("conv_bn_eval", &conv_bn_eval_cpu); }

}  // namespace ghostops::cpu
