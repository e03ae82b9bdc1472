// The ghostops:: op schemas, defined once. Kernels register per device in their own files
// (csrc/cpu/*.cpp, csrc/cuda/*.cu); fake implementations and autograd live in ghostops/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/output_pool.h"
#include "cpu/peak.h"

TORCH_LIBRARY(ghostops, m) {
  m.set_python_module("ghostops.ops");
  // Eval-mode Ghost module, both BatchNorms folded, one pass: x (N, C_in, H, W) ->
  // (N, oup, Ho, Wo) in x's memory format. act: "relu" or "identity".
  m.def(
      "ghost_forward_eval(Tensor x, Tensor primary_weight, Tensor bn1_weight, Tensor bn1_bias, "
      "Tensor bn1_mean, Tensor bn1_var, float bn1_eps, Tensor cheap_weight, Tensor bn2_weight, "
      "Tensor bn2_bias, Tensor bn2_mean, Tensor bn2_var, float bn2_eps, int oup, int stride, "
      "str act) -> Tensor");
  // Training-mode forward, batch-statistics BatchNorm (nothing mutated: the caller updates the
  // running statistics from the returned batch mean and biased variance). Returns y (x's
  // memory format), z1 = the primary conv before BN1 (N, init, Ho, Wo), saved for the
  // backward, mean1, var1 (init) and mean2, var2 (init * (ratio - 1)).
  m.def(
      "ghost_forward_train(Tensor x, Tensor primary_weight, Tensor bn1_weight, Tensor bn1_bias, "
      "float bn1_eps, Tensor cheap_weight, Tensor bn2_weight, Tensor bn2_bias, float bn2_eps, "
      "int oup, int stride, str act) -> (Tensor y, Tensor z1, Tensor mean1, Tensor var1, "
      "Tensor mean2, Tensor var2)");
  // Backward of ghost_forward_train from its input x, its z1 and batch statistics (not y).
  // output_mask: whether grad_x and grad_primary_weight are wanted (an unwanted one comes back
  // empty).
  m.def(
      "ghost_backward(Tensor grad_y, Tensor x, Tensor z1, Tensor primary_weight, "
      "Tensor bn1_weight, Tensor bn1_bias, Tensor mean1, Tensor var1, float bn1_eps, "
      "Tensor cheap_weight, Tensor bn2_weight, Tensor bn2_bias, Tensor mean2, Tensor var2, "
      "float bn2_eps, int stride, str act, bool[2] output_mask) -> (Tensor grad_x, "
      "Tensor grad_primary_weight, Tensor grad_bn1_weight, Tensor grad_bn1_bias, "
      "Tensor grad_cheap_weight, Tensor grad_bn2_weight, Tensor grad_bn2_bias)");
  // Eval-mode depthwise conv (groups = C, d x d, d odd, padding d / 2, no bias) + BatchNorm
  // (running statistics) + act: GhostNet's depthwise convs outside the Ghost modules.
  // x (N, C, H, W) -> (N, C, Ho, Wo), contiguous.
  m.def(
      "dw_bn_eval(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor bn_mean, "
      "Tensor bn_var, float eps, int stride, str act) -> Tensor");
  // Its training forward (batch statistics; nothing mutated): y, z = the conv's output (saved
  // for the backward), the batch mean and biased variance (C).
  m.def(
      "dw_bn_train(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, float eps, "
      "int stride, str act) -> (Tensor y, Tensor z, Tensor mean, Tensor var)");
  // Its backward from x, z and the batch statistics; grad_x comes back empty unless need_x.
  m.def(
      "dw_bn_backward(Tensor grad_y, Tensor x, Tensor z, Tensor weight, Tensor bn_weight, "
      "Tensor bn_bias, Tensor mean, Tensor var, float eps, int stride, str act, bool need_x) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // Eval-mode squeeze-and-excitation (GhostNet's, hard-sigmoid gate): y = x * relu6(W_e
  // relu(W_r mean_hw(x) + b_r) + b_e + 3) / 6, weights (R, C, 1, 1) and (C, R, 1, 1).
  // x (N, C, H, W) -> contiguous, same shape.
  m.def(
      "se_eval(Tensor x, Tensor reduce_weight, Tensor reduce_bias, Tensor expand_weight, "
      "Tensor expand_bias) -> Tensor");
  // Eval-mode 1x1 conv (no bias) + BatchNorm (running statistics) + act, plus residual if
  // given (added after act): GhostNet's shortcut 1x1 conv + BN + the bottleneck's add, and its
  // 1x1 ConvBnAct. x (N, C_in, H, W), weight (C_out, C_in, 1, 1) -> (N, C_out, H, W),
  // contiguous.
  m.def(
      "pw_bn_eval(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor bn_mean, "
      "Tensor bn_var, float eps, str act, Tensor? residual=None) -> Tensor");
  // Eval-mode dense d x d conv (groups 1, d odd, padding d / 2, no bias) + BatchNorm (running
  // statistics) + act for inputs of 1 to 8 channels: GhostNet's stem.
  // x (N, C, H, W) -> (N, C_out, Ho, Wo), contiguous.
  m.def(
      "conv_bn_eval(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor bn_mean, "
      "Tensor bn_var, float eps, int stride, str act) -> Tensor");
  // Eval-mode linear layer + act: x (N, K), weight (M, K), bias (M) -> (N, M). GhostNet's head
  // (its 1x1 conv on the pooled map, its classifier).
  m.def("linear_eval(Tensor x, Tensor weight, Tensor? bias, str act) -> Tensor");
}

namespace {
bool built_with_cuda() {
#ifdef GHOSTOPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ghostops compiled kernels; the ops themselves are torch.ops.ghostops.*";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels (csrc/cuda) were built");
  m.def("cpu_peak_gflops", &ghostops::cpu::peak_fma_gflops, pybind11::arg("iterations"),
        "measured peak float32 FMA rate of this CPU in GFLOP/s (csrc/cpu/peak.h)");
  m.def("output_pool_cached_bytes", &ghostops::cpu::output_pool_cached_bytes,
        "bytes of free blocks the CPU ops' output pool holds (csrc/cpu/output_pool.h)");
  m.def("set_output_pool_limit", &ghostops::cpu::set_output_pool_limit, pybind11::arg("bytes"),
        "how many bytes of free blocks the output pool may keep (0: no pool); frees the rest");
}
