// The dtypes of the CUDA kernels, one dispatch for the eval and training ops: float, half and
// bfloat16, float arithmetic inside. float64 is refused with a clear error rather than run in
// float (ghostops runs it through the reference, ghostops/ops.py).
#pragma once

#include <ATen/ATen.h>

namespace ghostops::cuda {

// Calls f(T{}) for x's dtype T: float, at::Half or at::BFloat16; any other dtype is an error
// naming op.
template <typename F>
void dispatch_gpu_dtype(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default:
      TORCH_CHECK(false, op, ": x must be float32, float16 or bfloat16 on the GPU, got ", dtype,
                  " (ghostops runs other dtypes through the reference)");
  }
}

}  // namespace ghostops::cuda
