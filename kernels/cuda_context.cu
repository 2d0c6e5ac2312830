// Device discovery, current streams, byte copies and synchronisation (kernels/cuda_runtime_api.h).
//
// Streams: every device has one process-wide default dsv4 stream, created with cudaStreamNonBlocking on
// first use (so it never synchronises with the legacy NULL stream) and never destroyed (it must outlive
// tensors with static lifetime). A thread may override the current stream of a device with
// set_current_stream(); the override is thread-local, and set_current_stream(device, nullptr) goes back to
// the default dsv4 stream. All dsv4 kernels, cuBLAS calls and copies of a thread run on its current stream.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <array>
#include <mutex>

#include "kernels/cuda_runtime_api.h"
#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

constexpr int kMaxDevices = 64;

struct DefaultStreams {
  std::array<std::once_flag, kMaxDevices> once;
  std::array<cudaStream_t, kMaxDevices> stream{};
};
DefaultStreams& default_streams() {
  static DefaultStreams* s = new DefaultStreams;  // leaked on purpose: used until process exit
  return *s;
}

struct StreamOverride {
  std::array<cudaStream_t, kMaxDevices> stream{};
  std::array<bool, kMaxDevices> set{};
};
thread_local StreamOverride t_override;

void check_device(int device) {
  const int n = device_count();
  DSV4_CHECK(device >= 0 && device < n && device < kMaxDevices, "cuda:{} does not exist ({} CUDA device{} visible)",
             device, n, n == 1 ? "" : "s");
}

}  // namespace

int device_count() {
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();  // no driver / no device: clear the error, report none
      return 0;
    }
    return n;
  }();
  return count;
}

void* current_stream(int device) {
  check_device(device);
  const auto d = static_cast<size_t>(device);
  if (t_override.set[d]) return t_override.stream[d];
  DefaultStreams& s = default_streams();
  std::call_once(s.once[d], [&] {
    detail::DeviceGuard guard(device);
    CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream[d], cudaStreamNonBlocking));
  });
  return s.stream[d];
}

void set_current_stream(int device, void* stream) {
  check_device(device);
  const auto d = static_cast<size_t>(device);
  t_override.stream[d] = static_cast<cudaStream_t>(stream);
  t_override.set[d] = stream != nullptr;
}

void synchronize(int device) {
  check_device(device);
  detail::DeviceGuard guard(device);
  CUDA_CHECK(cudaStreamSynchronize(detail::stream_of(device)));
}

namespace {
void copy_bytes(void* dst, const void* src, size_t nbytes, int device, cudaMemcpyKind kind) {
  check_device(device);
  if (nbytes == 0) return;
  detail::DeviceGuard guard(device);
  const cudaStream_t stream = detail::stream_of(device);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, kind, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}
}  // namespace

// From pageable host memory (every host tensor here: malloc'd or memory-mapped) the copy is enqueued on the device's
// stream without waiting for it: cudaMemcpyAsync has staged the host bytes when it returns ("API synchronization
// behavior": pageable host memory is copied to a staging buffer immediately, no device synchronization), so the host
// buffer may change or go away, and later work on the stream sees the data. A synchronising copy here drained the
// GPU's queue at every index upload of the step. Pinned (page-locked or registered) sources are read by the DMA later,
// so those copies still wait.
void memcpy_h2d(void* dst, const void* src, size_t nbytes, int device) {
  check_device(device);
  if (nbytes == 0) return;
  cudaPointerAttributes attr{};
  CUDA_CHECK(cudaPointerGetAttributes(&attr, src));
  if (attr.type != cudaMemoryTypeUnregistered) {
    copy_bytes(dst, src, nbytes, device, cudaMemcpyHostToDevice);
    return;
  }
  detail::DeviceGuard guard(device);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, detail::stream_of(device)));
}
void memcpy_d2h(void* dst, const void* src, size_t nbytes, int device) {
  copy_bytes(dst, src, nbytes, device, cudaMemcpyDeviceToHost);
}
void memcpy_d2d(void* dst, const void* src, size_t nbytes, int device) {
  copy_bytes(dst, src, nbytes, device, cudaMemcpyDeviceToDevice);
}

}  // namespace dsv4::cuda
