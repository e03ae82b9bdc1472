// Eval-mode linear layer + activation on the CPU for a few rows of input:
//   y[n] = act(W x[n] + b),  x (N, K), W (M, K) with contiguous rows, y (N, M).
// GhostNet's head at batch 1 (the 1x1 conv 960 -> 1280 on the pooled map, and the classifier
// 1280 -> 1000): two matrix-vector products whose 5 MB weights come from memory every call.
// Stock addmm read them at about 21 GB/s; this kernel splits the weight's rows over the
// threads and streams each row once for all the inputs (a plain read ran at 43 GB/s). More
// than kMaxGemvRows inputs: ATen's addmm (a GEMM re-reads nothing from memory then).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "../ghost_common.h"
#include "kernels.h"

namespace ghostops::cpu {
namespace {

constexpr int64_t kMaxGemvRows = 4;

at::Tensor linear_eval_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, c10::string_view act) {
  const char* op = "linear_eval";
  TORCH_CHECK(x.dim() == 2, op, ": x must be a 2-D (N, K) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): dtype must be float32 or float64, got ", x.scalar_type());
  const int64_t N = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, op, ": weight must have shape (M, ", K,
              "), got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device() && weight.scalar_type() == x.scalar_type(), op,
              ": weight must match x's device and dtype");
  const int64_t M = weight.size(0);
  if (bias.has_value()) check_vector(op, *bias, "bias", M, x);
  const Act activation = parse_act(std::string(act));
  if (N > kMaxGemvRows || K == 0) {
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    return activation == Act::ReLU ? y.relu_() : y;
  }
  at::Tensor y = at::empty({N, M}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_eval_cpu", [&] {
    using T = scalar_t;
    const at::Tensor xc = x.contiguous();
    const at::Tensor wc = weight.stride(1) == 1 ? weight : weight.contiguous();
    const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    const T* b = bc.defined() ? bc.const_data_ptr<T>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 16384 / K);
    at::parallel_for(0, M * N, grain, [&](int64_t begin, int64_t end) {
      auto run = [&](auto epilogue) {
        matvec_rows(wc.const_data_ptr<T>(), wc.stride(0), b, xc.const_data_ptr<T>(), N, M, K,
                    y.mutable_data_ptr<T>(), begin, end, epilogue);
      };
      if (activation == Act::ReLU) {
        run([](T v) { return activate<Act::ReLU>(v); });
      } else {
        run([](T v) { return v; });
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CPU, m) { m.impl("linear_eval", &linear_eval_cpu); }

}  // namespace ghostops::cpu
