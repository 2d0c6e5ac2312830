#include "runtime/device.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <new>

#include "runtime/error.h"

#if defined(DSV4_WITH_CUDA)
#include "kernels/cuda_runtime_api.h"
#endif

namespace dsv4 {

std::string Device::str() const { return is_cpu() ? std::string("cpu") : fmt::format("cuda:{}", index); }

namespace {

class CpuAllocator final : public Allocator {
 public:
  void* allocate(size_t nbytes) override {
    const size_t rounded = (nbytes + kCpuAlignment - 1) / kCpuAlignment * kCpuAlignment;
    void* p = std::aligned_alloc(kCpuAlignment, rounded == 0 ? kCpuAlignment : rounded);
    if (!p) throw std::bad_alloc();
    std::lock_guard<std::mutex> lock(mu_);
    stats_.allocated_bytes += static_cast<int64_t>(nbytes);
    stats_.reserved_bytes += static_cast<int64_t>(nbytes);
    if (stats_.allocated_bytes > stats_.peak_bytes) stats_.peak_bytes = stats_.allocated_bytes;
    ++stats_.num_allocs;
    ++stats_.num_system_allocs;
    return p;
  }
  void deallocate(void* ptr, size_t nbytes) override {
    std::free(ptr);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.allocated_bytes -= static_cast<int64_t>(nbytes);
    stats_.reserved_bytes -= static_cast<int64_t>(nbytes);
  }
  AllocatorStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void reset_peak() override {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_bytes = stats_.allocated_bytes;
  }

 private:
  mutable std::mutex mu_;
  AllocatorStats stats_;
};

}  // namespace

Allocator& allocator_for(Device device) {
  if (device.is_cpu()) {
    static CpuAllocator cpu;  // never destroyed before tensors with static lifetime: function-local static
    return cpu;
  }
#if defined(DSV4_WITH_CUDA)
  return cuda::caching_allocator(device.index);
#else
  DSV4_FAIL("tensor on {} requested, but dsv4 was built without CUDA (reconfigure with -DDSV4_CUDA=ON)",
            device.str());
#endif
}

bool cuda_built() {
#if defined(DSV4_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#if defined(DSV4_WITH_CUDA)
  return cuda::device_count();
#else
  return 0;
#endif
}

}  // namespace dsv4
