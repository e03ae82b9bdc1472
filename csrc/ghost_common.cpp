#include "ghost_common.h"

#include <ATen/ATen.h>

namespace ghostops {

void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t size,
                  const at::Tensor& x, VectorDtype dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape (", size,
              "), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  if (dtype == VectorDtype::AnyFloat) {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
                " must be floating point, got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                t.scalar_type(), " but x has dtype ", x.scalar_type());
  }
}

GhostShape check_ghost_shape(const char* op, const at::Tensor& x,
                             const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
                             int64_t oup, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got ",
              x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(primary_weight.dim() == 4 && primary_weight.size(2) == 1 &&
                  primary_weight.size(3) == 1,
              op, ": primary_weight must have shape (init, C_in, 1, 1), got ",
              primary_weight.sizes());
  TORCH_CHECK(cheap_weight.dim() == 4 && cheap_weight.size(1) == 1 &&
                  cheap_weight.size(2) == cheap_weight.size(3) && cheap_weight.size(2) % 2 == 1,
              op, ": cheap_weight must have shape (new, 1, d, d) with d odd, got ",
              cheap_weight.sizes());
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  GhostShape s;
  s.batch = x.size(0);
  s.inp = x.size(1);
  s.height = x.size(2);
  s.width = x.size(3);
  s.init = primary_weight.size(0);
  const int64_t new_channels = cheap_weight.size(0);
  TORCH_CHECK(s.init >= 1 && new_channels >= s.init && new_channels % s.init == 0,
              op, ": cheap_weight has ", new_channels,
              " output channels, which must be a positive multiple of the ", s.init,
              " intrinsic channels (ratio - 1 per intrinsic channel)");
  s.ratio = new_channels / s.init + 1;
  TORCH_CHECK(oup >= 1 && (oup + s.ratio - 1) / s.ratio == s.init,
              op, ": oup=", oup, " does not match ", s.init,
              " intrinsic channels at ratio ", s.ratio, " (init must be ceil(oup / ratio))");
  s.oup = oup;
  s.ghost = oup - s.init;
  s.dw = cheap_weight.size(2);
  s.stride = stride;
  TORCH_CHECK(s.inp == primary_weight.size(1), op, ": x has ", s.inp,
              " channels but primary_weight expects ", primary_weight.size(1));
  // (As Conv2d's floor((size - 1) / stride) + 1, and 0 for an empty map: C++'s division
  // truncates -1 / 2 to 0.)
  s.out_h = s.height == 0 ? 0 : (s.height - 1) / stride + 1;
  s.out_w = s.width == 0 ? 0 : (s.width - 1) / stride + 1;
  for (auto [t, name] : {std::pair{&primary_weight, "primary_weight"},
                         std::pair{&cheap_weight, "cheap_weight"}}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
                " but x is on ", x.device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name,
                " has dtype ", t->scalar_type(), " but x has dtype ", x.scalar_type());
  }
  return s;
}

GhostShape check_ghost_args(const at::Tensor& x, const at::Tensor& primary_weight,
                            const at::Tensor& bn1_weight, const at::Tensor& bn1_bias,
                            const at::Tensor& bn1_mean, const at::Tensor& bn1_var,
                            const at::Tensor& cheap_weight, const at::Tensor& bn2_weight,
                            const at::Tensor& bn2_bias, const at::Tensor& bn2_mean,
                            const at::Tensor& bn2_var, int64_t oup, int64_t stride,
                            VectorDtype vectors) {
  const char* op = "ghost_forward_eval";
  const GhostShape s = check_ghost_shape(op, x, primary_weight, cheap_weight, oup, stride);
  const int64_t new_channels = cheap_weight.size(0);
  check_vector(op, bn1_weight, "bn1_weight", s.init, x, vectors);
  check_vector(op, bn1_bias, "bn1_bias", s.init, x, vectors);
  check_vector(op, bn1_mean, "bn1_mean", s.init, x, vectors);
  check_vector(op, bn1_var, "bn1_var", s.init, x, vectors);
  check_vector(op, bn2_weight, "bn2_weight", new_channels, x, vectors);
  check_vector(op, bn2_bias, "bn2_bias", new_channels, x, vectors);
  check_vector(op, bn2_mean, "bn2_mean", new_channels, x, vectors);
  check_vector(op, bn2_var, "bn2_var", new_channels, x, vectors);
  return s;
}

}  // namespace ghostops
