#pragma once
#include <cstdint>

namespace ghostops::cpu {

// The CPU's measured peak multiply-add rate in GFLOP/s (an FMA counts as two flops), float32,
// with the vector ISA this extension was built for and at::get_num_threads() threads: each
// thread runs `iterations` rounds of independent FMA chains held in registers (no memory
// traffic). The roofline's compute bound in bench/fused_vs_ref.py.
double peak_fma_gflops(int64_t iterations);

}  // namespace ghostops::cpu
