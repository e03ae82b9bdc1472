// Shared by the CPU and CUDA kernels of ghostops: the activation functors, the argument
// checks of the ghostops:: ops and the sizes they derive. Math that runs on the device is
// marked GHOST_HOST_DEVICE so one definition serves both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#if defined(__CUDACC__)
#define GHOST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GHOST_HOST_DEVICE inline
#endif

namespace ghostops {

// The activation after each BatchNorm: a compile-time parameter of every kernel.
enum class Act { Identity, ReLU };

inline Act parse_act(const std::string& name) {
  if (name == "relu") return Act::ReLU;
  if (name == "identity") return Act::Identity;
  TORCH_CHECK(false, "ghostops: act must be 'relu' or 'identity', got '", name, "'");
}

template <Act A, typename T>
GHOST_HOST_DEVICE T activate(T v) {
  if constexpr (A == Act::ReLU) {
    return v <= T(0) ? T(0) : v;  // NaN stays NaN, as in F.relu and at::vec::maximum
  } else {
    return v;
  }
}

// Sizes of one Ghost module call, derived from the arguments and checked once.
struct GhostShape {
  int64_t batch, inp, height, width;  // x: (batch, inp, height, width)
  int64_t init, ghost, oup;           // intrinsic, ghost channels computed (oup - init), output
  int64_t ratio, dw, stride;          // ghost j reads intrinsic j / (ratio - 1); dw x dw cheap op
  int64_t out_h, out_w;               // spatial size of the output
};

// Checks x, the two conv weights, oup and stride for op `op` (named in messages) and returns
// the derived sizes.
GhostShape check_ghost_shape(const char* op, const at::Tensor& x,
                             const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
                             int64_t oup, int64_t stride);

// Whether per-channel vectors (BatchNorm parameters and statistics) must have x's dtype (the
// CPU kernels) or may be of any floating dtype (the CUDA kernels read them as float: float32
// BatchNorms with half activations, the usual mixed-precision layout).
enum class VectorDtype { SameAsX, AnyFloat };

// Checks a per-channel vector argument: shape (size), x's device, and its dtype as asked.
void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t size,
                  const at::Tensor& x, VectorDtype dtype = VectorDtype::SameAsX);

// Checks the arguments of ghost_forward_eval (names in messages are the schema's) and
// returns the derived sizes. Device and dtype agreement included (the vectors' dtype as
// `vectors` says).
GhostShape check_ghost_args(const at::Tensor& x, const at::Tensor& primary_weight,
                            const at::Tensor& bn1_weight, const at::Tensor& bn1_bias,
                            const at::Tensor& bn1_mean, const at::Tensor& bn1_var,
                            const at::Tensor& cheap_weight, const at::Tensor& bn2_weight,
                            const at::Tensor& bn2_bias, const at::Tensor& bn2_mean,
                            const at::Tensor& bn2_var, int64_t oup, int64_t stride,
                            VectorDtype vectors = VectorDtype::SameAsX);


}  // namespace ghostops
