// Eval-mode squeeze-and-excitation of GhostNet's bottlenecks on the CPU, as one op:
//   s[n] = mean of x[n] over (h, w)                           (C)
//   r[n] = relu(W_r s[n] + b_r)                                (R = W_r's rows)
//   g[n] = relu6(W_e r[n] + b_e + 3) / 6                        (C, the hard-sigmoid gate)
//   y[n][c] = x[n][c] * g[n][c]
// Stock PyTorch runs it as eight ops (pool, two 1x1 convs on 1x1 maps through the im2col
// path, ReLU, add, relu6, div, mul); at batch 1 their fixed costs are most of the time.
// Here: one pass over x for the means, the two small matrix-vector products from cache, one
// pass reading x and writing y.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>

#include "../ghost_common.h"
#include "kernels.h"
#include "output_pool.h"

namespace ghostops::cpu {
namespace {

template <typename T>
T sum_of(const T* p, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  Vec acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * VL <= n; i += 2 * VL) {
    acc0 += Vec::loadu(p + i);
    acc1 += Vec::loadu(p + i + VL);
  }
  for (; i < n; i += VL) acc0 += Vec::loadu(p + i, std::min(VL, n - i));  // zero-filled tail
  return at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc0 + acc1);
}

// Tasks of `work_per_task` multiply-adds each: a grain of about 16K of them, so that the small
// products of batch 1 stay on one thread instead of paying a thread wake-up.
int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_task, 1));
}

void check_se_args(const at::Tensor& x, const at::Tensor& rw, const at::Tensor& rb,
                   const at::Tensor& ew, const at::Tensor& eb) {
  const char* op = "se_eval";
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): dtype must be float32 or float64, got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(rw.dim() == 4 && rw.size(1) == C && rw.size(2) == 1 && rw.size(3) == 1, op,
              ": reduce_weight must have shape (R, ", C, ", 1, 1), got ", rw.sizes());
  const int64_t R = rw.size(0);
  TORCH_CHECK(R >= 1, op, ": reduce_weight must have at least one output channel");
  TORCH_CHECK(ew.dim() == 4 && ew.size(0) == C && ew.size(1) == R && ew.size(2) == 1 &&
                  ew.size(3) == 1,
              op, ": expand_weight must have shape (", C, ", ", R, ", 1, 1), got ", ew.sizes());
  for (const at::Tensor* w : {&rw, &ew})
    TORCH_CHECK(w->device() == x.device() && w->scalar_type() == x.scalar_type(), op,
                ": the weights must match x's device and dtype");
  check_vector(op, rb, "reduce_bias", R, x);
  check_vector(op, eb, "expand_bias", C, x);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": x must have a non-empty map, got ",
              x.sizes());
}

at::Tensor se_eval_cpu(const at::Tensor& x, const at::Tensor& reduce_weight,
                       const at::Tensor& reduce_bias, const at::Tensor& expand_weight,
                       const at::Tensor& expand_bias) {
  check_se_args(x, reduce_weight, reduce_bias, expand_weight, expand_bias);
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t R = reduce_weight.size(0);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = pooled_empty(xc.sizes(), xc.options(), at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "se_eval_cpu", [&] {
    using T = scalar_t;
    using Vec = Vectorized<T>;
    constexpr int64_t VL = Vec::size();
    const at::Tensor rw = reduce_weight.contiguous(), ew = expand_weight.contiguous();
    const at::Tensor rb = reduce_bias.contiguous(), eb = expand_bias.contiguous();
    const T* xp = xc.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    // Per image: the channel means (C), the reduced vector (R) and the gates (C).
    std::unique_ptr<T[]> buf(new T[N * (2 * C + R)]);
    T* mean = buf.get();
    T* red = mean + N * C;
    T* gate = red + N * R;
    const T inv_p = T(1) / T(P);
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) mean[t] = sum_of(xp + t * P, P) * inv_p;
    });
    const T *rwp = rw.const_data_ptr<T>(), *rbp = rb.const_data_ptr<T>();
    const T *ewp = ew.const_data_ptr<T>(), *ebp = eb.const_data_ptr<T>();
    at::parallel_for(0, N * R, grain_for(C), [&](int64_t begin, int64_t end) {
      matvec_rows(rwp, C, rbp, mean, N, R, C, red, begin, end,
                  [](T v) { return activate<Act::ReLU>(v); });
    });
    at::parallel_for(0, N * C, grain_for(R), [&](int64_t begin, int64_t end) {
      matvec_rows(ewp, R, ebp, red, N, C, R, gate, begin, end,
                  [](T v) { return std::min(std::max(v + T(3), T(0)), T(6)) / T(6); });
    });
    at::parallel_for(0, N * C, grain_for(P), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Vec g(gate[t]);
        const T* in = xp + t * P;
        T* out = yp + t * P;
        for (int64_t i = 0; i < P; i += VL) {
          const int64_t count = std::min(VL, P - i);
          (Vec::loadu(in + i, count) * g).store(out + i, count);
        }
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CPU, m) { m.impl("se_eval", &se_eval_cpu); }

}  // namespace ghostops::cpu
