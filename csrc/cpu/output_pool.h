// A pool for the large outputs of the CPU ops (eval outputs, and the backward's temporaries and
// input gradients): freed blocks stay mapped and are handed out again,
// so calls that repeat the same shapes (an inference loop) write to memory that is already
// faulted in. Fresh memory costs the kernel a page fault and a zeroing per page before the op
// writes it: for 16->48 at 112x112, batch 32 (a 77 MB output, above glibc's mmap threshold, so
// freshly mapped on every call), about 2.6 ms of a 7 ms call.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace ghostops::cpu {

// at::empty(sizes, options with memory_format) for a CPU tensor; from the pool when it is at
// least 4 MiB and the pool's limit is not zero.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat memory_format);

// Bytes held by the pool now (free blocks, not those in use).
size_t output_pool_cached_bytes();

// Sets how many bytes of free blocks the pool may keep (default: GHOSTOPS_OUTPUT_POOL_MIB MiB,
// else 1024 MiB); releases free blocks beyond it. 0 disables the pool.
void set_output_pool_limit(size_t bytes);

}  // namespace ghostops::cpu
