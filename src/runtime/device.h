// Devices and allocators. CPU memory is 64-byte aligned; CUDA memory comes from the caching allocator
// in kernels/ (only when dsv4 is built with CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv4 {

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  static Device cpu() { return {DeviceType::CPU, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::CUDA, index}; }
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device&) const = default;
  std::string str() const;  // "cpu" or "cuda:N"
};

// Statistics every allocator keeps (bytes as requested by callers).
struct AllocatorStats {
  int64_t allocated_bytes = 0;  // currently handed out
  int64_t peak_bytes = 0;       // high-water mark of allocated_bytes
  int64_t reserved_bytes = 0;   // held from the system (>= allocated for caching allocators)
  int64_t num_allocs = 0;       // allocate() calls
  int64_t num_system_allocs = 0;  // calls that went to the system (malloc / cudaMalloc)
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t nbytes) = 0;
  virtual void deallocate(void* ptr, size_t nbytes) = 0;
  virtual AllocatorStats stats() const = 0;
  virtual void reset_peak() = 0;
  // Returns cached blocks to the system (no-op for non-caching allocators).
  virtual void empty_cache() {}
};

inline constexpr size_t kCpuAlignment = 64;

// The allocator for a device. Throws dsv4::Error for CUDA when dsv4 was built without CUDA or the
// device index does not exist.
Allocator& allocator_for(Device device);

// True when this binary has the CUDA backend compiled in.
bool cuda_built();
// Number of visible CUDA devices (0 when not built or no GPU / driver).
int cuda_device_count();

}  // namespace dsv4
