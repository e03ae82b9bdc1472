// Eval-mode 1x1 conv + BatchNorm + activation (+ a residual) on the CPU, one pass:
//   y[n][m] = act(sum_k W[m][k] s[m] x[n][k] + beta[m] - mean[m] s[m]) + residual[n][m],
//   s[m] = gamma[m] / sqrt(var[m] + eps).
// GhostNet's other pointwise convs: the shortcut's 1x1 conv + BN, whose output the bottleneck
// adds to its main branch (the residual), and the 1x1 ConvBnAct before the head. Stock PyTorch
// runs each as a conv, a BatchNorm pass and an add pass; at batch 1 the conv alone took
// 35-130 us through oneDNN or the im2col path for a few MFLOP.
// The GEMM is the Ghost module's (kernels.h), reading the weight in place (packed, with the BN
// scale folded in, only when its rows are not contiguous): tasks of (image, pixel chunk, block
// of output channels) write y's NCHW planes directly; the residual is added to each task's rows
// while they are in cache. 160->960 7x7 + BN + ReLU, batch 1: 60 us (104 with the weight
// packed every call; stock conv + BN + ReLU about 130).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>

#include "../ghost_common.h"
#include "kernels.h"
#include "output_pool.h"

namespace ghostops::cpu {
namespace {

template <typename T, Act A>
void pw_run(const T* x, const GemmWeight<T>& w, const T* bias, const T* residual, T* y, int64_t N,
            int64_t M, int64_t K, int64_t P) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size(), NB = kPanel<T>;
  // Pixel chunks whose output rows (M of them) stay in L2 for the residual pass: whole
  // panels, at most 64 KiB of output a chunk.
  const int64_t chunk_panels =
      std::max<int64_t>(1, (64 * 1024) / (M * NB * int64_t(sizeof(T))));
  int64_t chunk = std::min(P, chunk_panels * NB);
  int64_t chunks = (P + chunk - 1) / chunk;
  const int64_t blocks = row_blocks(M, kMaxRows<T>);
  const int64_t threads = at::get_num_threads();
  // Few tasks: as many chunks (whole panels) as make them a multiple of the threads, so that
  // each thread gets the same share.
  if (N * chunks < 8 * threads && P > NB) {
    const int64_t panels = (P + NB - 1) / NB;
    while (chunks < panels && (N * chunks) % threads != 0) ++chunks;
    chunk = (panels + chunks - 1) / chunks * NB;
    chunks = (P + chunk - 1) / chunk;
  }
  // Too few tasks for the threads (batch 1, small maps): split the output channels too.
  const int64_t channel_groups =
      N * chunks >= threads ? 1 : std::min(blocks, (threads + N * chunks - 1) / (N * chunks));
  at::parallel_for(0, N * chunks * channel_groups, 1, [&](int64_t begin, int64_t end) {
    T* panel = scratch<T>(K * NB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task % channel_groups;
      const int64_t n = task / channel_groups / chunks;
      const int64_t p0 = task / channel_groups % chunks * chunk;
      const int64_t len = std::min(chunk, P - p0);
      const int64_t blk0 = blocks * group / channel_groups;
      const int64_t blk1 = blocks * (group + 1) / channel_groups;
      const PixelMatrix<T> b{x + n * K * P + p0, P, K * P, len, 1};
      T* out = y + n * M * P + p0;
      primary_gemm<T, A>(w, bias, M, K, b, out, P, panel, blk0, blk1);
      if (residual == nullptr) continue;
      const int64_t m0 = row_block_start(M, blocks, blk0);
      const int64_t m1 = row_block_start(M, blocks, blk1);
      for (int64_t m = m0; m < m1; ++m) {
        T* row = out + m * P;
        const T* res = residual + n * M * P + m * P + p0;
        for (int64_t i = 0; i < len; i += VL) {
          const int64_t count = std::min(VL, len - i);
          (Vec::loadu(row + i, count) + Vec::loadu(res + i, count)).store(row + i, count);
        }
      }
    }
  });
}

at::Tensor pw_bn_eval_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                          const at::Tensor& bn_mean, const at::Tensor& bn_var, double eps,
                          c10::string_view act, const std::optional<at::Tensor>& residual) {
  const char* op = "pw_bn_eval";
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): dtype must be float32 or float64, got ", x.scalar_type());
  const int64_t N = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == K && weight.size(2) == 1 &&
                  weight.size(3) == 1,
              op, ": weight must have shape (C_out, ", K, ", 1, 1), got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device() && weight.scalar_type() == x.scalar_type(), op,
              ": weight must match x's device and dtype");
  const int64_t M = weight.size(0);
  TORCH_CHECK(M >= 1 && K >= 1, op, ": weight must have at least one input and one output "
              "channel, got ", weight.sizes());
  check_vector(op, bn_weight, "bn_weight", M, x);
  check_vector(op, bn_bias, "bn_bias", M, x);
  check_vector(op, bn_mean, "bn_mean", M, x);
  check_vector(op, bn_var, "bn_var", M, x);
  const Act activation = parse_act(std::string(act));
  at::Tensor res;
  if (residual.has_value()) {
    res = residual->contiguous();
    TORCH_CHECK(res.sizes() == at::IntArrayRef({N, M, H, W}), op, ": residual must have shape (",
                N, ", ", M, ", ", H, ", ", W, "), got ", residual->sizes());
    TORCH_CHECK(res.device() == x.device() && res.scalar_type() == x.scalar_type(), op,
                ": residual must match x's device and dtype");
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = pooled_empty({N, M, H, W}, x.options(), at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pw_bn_eval_cpu", [&] {
    using T = scalar_t;
    const int64_t lda = in_place_lda(M, K, weight.stride(0), weight.stride(1));
    const bool in_place = lda > 0;
    std::unique_ptr<T[]> folded(new T[2 * M + (in_place ? 0 : M * K)]);
    T* bias = folded.get();
    T* scale = bias + M;
    T* w = scale + M;  // the packed weight, if packed
    const at::Tensor g = bn_weight.contiguous(), b = bn_bias.contiguous();
    const at::Tensor mean = bn_mean.contiguous(), var = bn_var.contiguous();
    for (int64_t m = 0; m < M; ++m)
      std::tie(scale[m], bias[m]) =
          bn_affine(mean.const_data_ptr<T>()[m], var.const_data_ptr<T>()[m],
                    g.const_data_ptr<T>()[m], b.const_data_ptr<T>()[m], eps);
    GemmWeight<T> gw{w};
    if (in_place) {
      gw = GemmWeight<T>{weight.const_data_ptr<T>(), lda, scale};
    } else {
      pack_weight(weight.const_data_ptr<T>(), M, K, weight.stride(0), weight.stride(1),
                  static_cast<const T*>(scale), w);
    }
    const T* r = res.defined() ? res.const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    if (activation == Act::ReLU) {
      pw_run<T, Act::ReLU>(xc.const_data_ptr<T>(), gw, bias, r, yp, N, M, K, H * W);
    } else {
      pw_run<T, Act::Identity>(xc.const_data_ptr<T>(), gw, bias, r, yp, N, M, K, H * W);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CPU, m) { m.impl("pw_bn_eval", &pw_bn_eval_cpu); }

}  // namespace ghostops::cpu
