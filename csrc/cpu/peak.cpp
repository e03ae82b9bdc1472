#include "peak.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <chrono>
#include <vector>

namespace ghostops::cpu {

double peak_fma_gflops(int64_t iterations) {
  using Vec = at::vec::Vectorized<float>;
  // Independent chains: enough to cover the FMA latency on every pipe (4 cycles x 2 pipes needs
  // 8; 12 leave room), few enough to stay in registers (16 with AVX2, 32 with AVX-512).
  constexpr int kChains = 12;
  const int64_t threads = at::get_num_threads();
  std::vector<float> sink(threads, 0.0f);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Vec acc[kChains];
      for (int i = 0; i < kChains; ++i) acc[i] = Vec(1e-3f * float(i + t));
      const Vec a(0.999999f), b(1e-7f);
      for (int64_t it = 0; it < iterations; ++it)
        for (int i = 0; i < kChains; ++i) acc[i] = at::vec::fmadd(acc[i], a, b);
      Vec total = acc[0];
      for (int i = 1; i < kChains; ++i) total = total + acc[i];
      float lanes[Vec::size()];
      total.store(lanes);
      sink[t] = lanes[0];  // keeps the chains alive
    }
  });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float keep = 0;
  for (float s : sink) keep = keep + s;
  const double flops = 2.0 * kChains * Vec::size() * double(iterations) * double(threads);
  return flops / seconds / 1e9;
}

}  // namespace ghostops::cpu
