#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ghostops::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinPooledBytes = size_t(4) << 20;

size_t default_limit() {
  constexpr size_t kDefault = size_t(1024) << 20;
  const char* env = std::getenv("GHOSTOPS_OUTPUT_POOL_MIB");
  if (env == nullptr || *env == '\0') return kDefault;
  char* end = nullptr;
  const unsigned long long mib = std::strtoull(env, &end, 10);
  if (*end != '\0' || env[0] == '-') {
    TORCH_WARN("ghostops: GHOSTOPS_OUTPUT_POOL_MIB must be a whole number of MiB, got '", env,
               "'; using 1024");
    return kDefault;
  }
  return size_t(mib) << 20;
}

// Blocks are 2 MiB aligned and a multiple of 2 MiB long, with transparent huge pages asked for.
// A request takes the smallest free block at least its size and at most a quarter larger (of
// several, the last one freed); freed blocks are kept while the free ones total at most the
// limit, else given back.
class OutputPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t size = (std::max<size_t>(n, 1) + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        it = std::prev(free_.upper_bound(it->first));  // of that size, the last one freed
        ptr = it->second;
        cached_ -= it->first;
        free_.erase(it);
      }
    }
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(kHugePage, size);
      TORCH_CHECK(ptr != nullptr, "ghostops: out of memory allocating ", size, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(ptr, size, MADV_HUGEPAGE);
#endif
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_[ptr] = size;
    }
    return {ptr, ptr, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  size_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    while (cached_ > limit_) {  // release the largest free blocks first
      auto it = std::prev(free_.end());
      cached_ -= it->first;
      blocks_.erase(it->second);
      std::free(it->second);
      free_.erase(it);
    }
  }

  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may outlive exit
    return *pool;
  }

 private:
  static void release(void* ptr) {
    OutputPool& pool = get();
    std::lock_guard<std::mutex> lock(pool.mutex_);
    const size_t size = pool.blocks_.at(ptr);
    if (pool.cached_ + size <= pool.limit_) {
      pool.free_.emplace(size, ptr);
      pool.cached_ += size;
    } else {
      pool.blocks_.erase(ptr);
      std::free(ptr);
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size -> free block
  std::map<void*, size_t> blocks_;     // every block this pool allocated and has not freed
  size_t cached_ = 0;
  size_t limit_ = default_limit();
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat memory_format) {
  OutputPool& pool = OutputPool::get();
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * options.dtype().itemsize();
  if (bytes < kMinPooledBytes || pool.limit() == 0)
    return at::empty(sizes, options.memory_format(memory_format));
  at::Tensor t =
      at::detail::empty_generic(sizes, &pool, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                c10::typeMetaToScalarType(options.dtype()), memory_format);
  // What at::empty does under torch.use_deterministic_algorithms with
  // torch.utils.deterministic.fill_uninitialized_memory: a reused block would otherwise hide
  // elements a kernel fails to write behind the previous call's values.
  const at::Context& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory() &&
      t.is_floating_point())
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

size_t output_pool_cached_bytes() { return OutputPool::get().cached(); }

void set_output_pool_limit(size_t bytes) { OutputPool::get().set_limit(bytes); }

}  // namespace ghostops::cpu
