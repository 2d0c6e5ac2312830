// The CUDA caching allocator: one BlockPool (kernels/block_pool.h, where the policy is described) per
// device over cudaMalloc/cudaFree. Blocks are keyed by the allocating thread's current stream of the device.
// Allocators are created on first use and never destroyed, so tensors with static lifetime can still be
// freed (into the cache) during process exit.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <array>
#include <memory>
#include <mutex>

#include "kernels/block_pool.h"
#include "kernels/cuda_runtime_api.h"
#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

constexpr int kMaxDevices = 64;

class CudaCachingAllocator final : public Allocator {
 public:
  explicit CudaCachingAllocator(int device)
      : device_(device),
        pool_(fmt::format("CUDA caching allocator of cuda:{}", device),
              [device](size_t nbytes) -> void* {
                detail::DeviceGuard guard(device);
                void* p = nullptr;
                const cudaError_t rc = cudaMalloc(&p, nbytes);
                if (rc == cudaErrorMemoryAllocation) {
                  (void)cudaGetLastError();  // not sticky: clear it, the pool frees its cache and retries
                  return nullptr;
                }
                CUDA_CHECK(rc);
                return p;
              },
              [device](void* p, size_t) {
                detail::DeviceGuard guard(device);
                CUDA_CHECK(cudaFree(p));  // synchronises the device: pending kernels finish first
              }) {}

  void* allocate(size_t nbytes) override {
    return pool_.allocate(nbytes, reinterpret_cast<uintptr_t>(current_stream(device_)));
  }
  void deallocate(void* ptr, size_t) override { pool_.deallocate(ptr); }
  AllocatorStats stats() const override { return pool_.stats(); }
  void reset_peak() override { pool_.reset_peak(); }
  void empty_cache() override {
    {
      detail::DeviceGuard guard(device_);
      CUDA_CHECK(cudaDeviceSynchronize());
    }
    pool_.empty_cache();
  }

 private:
  int device_;
  BlockPool pool_;
};

}  // namespace

Allocator& caching_allocator(int device_index) {
  const int n = device_count();
  DSV4_CHECK(device_index >= 0 && device_index < n && device_index < kMaxDevices,
             "cuda:{} does not exist ({} CUDA device{} visible)", device_index, n, n == 1 ? "" : "s");
  static std::array<std::once_flag, kMaxDevices>* once = new std::array<std::once_flag, kMaxDevices>;
  static std::array<CudaCachingAllocator*, kMaxDevices>* allocators =
      new std::array<CudaCachingAllocator*, kMaxDevices>{};
  const auto d = static_cast<size_t>(device_index);
  std::call_once((*once)[d], [&] { (*allocators)[d] = new CudaCachingAllocator(device_index); });
  return *(*allocators)[d];
}

}  // namespace dsv4::cuda
