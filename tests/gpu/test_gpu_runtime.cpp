// CUDA runtime pieces: error checks, device discovery, current streams, copies, the caching allocator.
// Tests that need a GPU skip when none is visible; the CUDA_CHECK tests and the no-device behaviour run
// everywhere the CUDA backend is built.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <thread>
#include <vector>

#include "gpu_test_util.h"
#include "kernels/cuda_check.cuh"
#include "kernels/cuda_runtime_api.h"

namespace dsv4::gputest {
namespace {

// ---- no GPU needed -------------------------------------------------------------------------------------

TEST(CudaCheck, ThrowsErrorWithExpressionLocationAndLibraryText) {
  try {
    CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "CUDA_CHECK did not throw";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("test_gpu_runtime.cpp:"), std::string::npos) << what;
    EXPECT_NE(what.find("cudaErrorInvalidValue"), std::string::npos) << what;  // the expression
    EXPECT_NE(what.find("CUDA error 1"), std::string::npos) << what;
    EXPECT_NE(what.find(cudaGetErrorString(cudaErrorInvalidValue)), std::string::npos) << what;
  }
  EXPECT_NO_THROW(CUDA_CHECK(cudaSuccess));
}

TEST(CudaCheck, CublasAndGenericHook) {
  try {
    CUBLAS_CHECK(CUBLAS_STATUS_NOT_INITIALIZED);
    FAIL() << "CUBLAS_CHECK did not throw";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("cuBLAS error"), std::string::npos) << what;
    EXPECT_NE(what.find(cublasGetStatusString(CUBLAS_STATUS_NOT_INITIALIZED)), std::string::npos) << what;
  }
  // Any library with a status code and a to-string function plugs into the same facility.
  const auto describe = [](int code) { return code == 7 ? "seven" : "other"; };
  try {
    DSV4_GPU_LIBRARY_CHECK(7, 0, "FakeLib", describe);
    FAIL() << "DSV4_GPU_LIBRARY_CHECK did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("FakeLib error 7 (seven)"), std::string::npos) << e.what();
  }
}

TEST(CudaRuntime, DeviceCountNeverThrows) {
  EXPECT_TRUE(cuda_built());
  int n = -1;
  EXPECT_NO_THROW(n = cuda_device_count());
  EXPECT_GE(n, 0);
  int driver = 0;
  if (cudaGetDeviceCount(&driver) != cudaSuccess) {
    (void)cudaGetLastError();
    driver = 0;
  }
  EXPECT_EQ(n, driver);
}

TEST(CudaRuntime, WithoutDeviceCudaTensorsFailWithAClearError) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is visible";
  try {
    Tensor::empty({4}, DType::F32, kGpu);
    FAIL() << "allocation on cuda:0 without a device did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda:0 does not exist"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cuda::current_stream(0), Error);
}

// ---- devices and streams ---------------------------------------------------------------------------------

class GpuRuntime : public GpuTest {};

TEST_F(GpuRuntime, InvalidDeviceIndicesThrow) {
  const int n = cuda_device_count();
  EXPECT_THROW(cuda::current_stream(n), Error);
  EXPECT_THROW(cuda::current_stream(-1), Error);
  EXPECT_THROW(cuda::caching_allocator(n), Error);
  EXPECT_THROW(Tensor::empty({2}, DType::F32, Device::cuda(n)), Error);
  EXPECT_NO_THROW(cuda::synchronize(0));
}

TEST_F(GpuRuntime, DefaultStreamIsNonBlockingAndStable) {
  void* s = cuda::current_stream(0);
  ASSERT_NE(s, nullptr);  // never the legacy NULL stream
  EXPECT_EQ(cuda::current_stream(0), s);
  unsigned flags = 0;
  CUDA_CHECK(cudaStreamGetFlags(static_cast<cudaStream_t>(s), &flags));
  EXPECT_EQ(flags & cudaStreamNonBlocking, static_cast<unsigned>(cudaStreamNonBlocking));
  // Other threads share the process-wide default stream.
  void* other = nullptr;
  std::thread([&] { other = cuda::current_stream(0); }).join();
  EXPECT_EQ(other, s);
}

// Host-to-device copies from pageable memory return without waiting for the device: the host buffer may change or
// be freed right away, and later work on the stream sees the uploaded values. Pinned sources too (those copies wait).
TEST_F(GpuRuntime, HostToDeviceCopiesConsumeTheHostBytes) {
  const int64_t n = int64_t{1} << 24;  // 64 MiB: large enough to be in flight when the call returns, if it were
  Tensor host = rand_cpu({n});
  const std::vector<float> want = host.to_floats();
  Tensor busy = ops::matmul(rand_cpu({2048, 2048}).to(kGpu), rand_cpu({2048, 2048}).to(kGpu));  // queued work first
  Tensor dev = host.to(kGpu);
  std::fill(host.data<float>(), host.data<float>() + n, -1.0f);
  host = Tensor();  // freed
  EXPECT_EQ(dev.to_floats(), want);
  float* pinned = nullptr;
  CUDA_CHECK(cudaMallocHost(&pinned, 1024 * sizeof(float)));
  for (int i = 0; i < 1024; ++i) pinned[i] = static_cast<float>(i);
  std::shared_ptr<const void> none(pinned, [](const void*) {});
  const Tensor from_pinned = Tensor::from_blob(pinned, {1024}, DType::F32, kCpu, none).to(kGpu);
  for (int i = 0; i < 1024; ++i) pinned[i] = -1.0f;
  const std::vector<float> got = from_pinned.to_floats();
  for (int i = 0; i < 1024; ++i) EXPECT_EQ(got[static_cast<size_t>(i)], static_cast<float>(i)) << i;
  CUDA_CHECK(cudaFreeHost(pinned));
  (void)busy;
}

TEST_F(GpuRuntime, StreamOverrideIsPerThreadAndOrdersWork) {
  void* def = cuda::current_stream(0);
  cudaStream_t user = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&user, cudaStreamNonBlocking));
  cuda::set_current_stream(0, user);
  EXPECT_EQ(cuda::current_stream(0), static_cast<void*>(user));
  void* seen_elsewhere = nullptr;
  std::thread([&] { seen_elsewhere = cuda::current_stream(0); }).join();
  EXPECT_EQ(seen_elsewhere, def);

  // Work launched on the user stream, read back through the same stream.
  const Tensor a = rand_cpu({300, 200});
  const Tensor b = rand_cpu({200, 100});
  const Tensor c = ops::matmul(a.to(kGpu), b.to(kGpu));
  Tensor y = ops::affine(c, 2.0, 1.0);
  cuda::synchronize(0);
  expect_close(y, ops::affine(ops::matmul(a, b), 2.0, 1.0), 1e-4, 1e-4, "matmul+affine on a user stream");

  cuda::set_current_stream(0, nullptr);  // back to the default dsv4 stream
  EXPECT_EQ(cuda::current_stream(0), def);
  // Blocks allocated on `user` return to the cache under that stream when freed; destroying the stream
  // after its work is done is safe.
  CUDA_CHECK(cudaStreamSynchronize(user));
  CUDA_CHECK(cudaStreamDestroy(user));
}

// ---- copies ----------------------------------------------------------------------------------------------

TEST_F(GpuRuntime, RawMemcpyRoundTrip) {
  std::vector<uint8_t> host(1000003);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<uint8_t>(i * 7 + 3);
  Allocator& alloc = allocator_for(kGpu);
  void* d1 = alloc.allocate(host.size());
  void* d2 = alloc.allocate(host.size());
  cuda::memcpy_h2d(d1, host.data(), host.size(), 0);
  cuda::memcpy_d2d(d2, d1, host.size(), 0);
  std::vector<uint8_t> back(host.size(), 0);
  cuda::memcpy_d2h(back.data(), d2, back.size(), 0);
  EXPECT_EQ(back, host);
  cuda::memcpy_h2d(d1, host.data(), 0, 0);  // zero bytes: no-op
  alloc.deallocate(d1, host.size());
  alloc.deallocate(d2, host.size());
}

TEST_F(GpuRuntime, TensorRoundTripEveryDtypeAndSize) {
  for (int di = 0; di < kNumDTypes; ++di) {
    const auto dt = static_cast<DType>(di);
    for (const Shape& shape : {Shape{0}, Shape{2}, Shape{1, 2}, Shape{3, 34}, Shape{257, 130}, Shape{}}) {
      if (dt == DType::F4_E2M1 && shape.ndim() == 0) continue;
      Tensor h = Tensor::empty(shape, dt);
      auto* p = static_cast<uint8_t*>(h.raw_data());
      for (int64_t i = 0; i < h.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng()());
      const Tensor d = h.to(kGpu);
      EXPECT_TRUE(d.device().is_cuda());
      expect_same_bits(d.to(kCpu), h, fmt::format("{} {}", dtype_name(dt), shape.str()));
    }
  }
}

TEST_F(GpuRuntime, CrossDeviceCopyIntoStridedViews) {
  // Host -> non-contiguous device view (staging + strided copy) and device view -> host.
  const Tensor src = rand_cpu({6, 5});
  Tensor big = Tensor::zeros({5, 8}, DType::F32, kGpu);
  Tensor view = big.slice(1, 1, 7).transpose(0, 1);  // [6, 5], strided
  view.copy_from(src);
  expect_same_bits(view, src, "h2d into a transposed slice");
  const Tensor back = view.to(kCpu);
  expect_same_bits(back, src, "d2h of a transposed slice");
  // Untouched columns stay zero.
  const auto all = big.to_floats();
  for (int r = 0; r < 5; ++r) {
    EXPECT_EQ(all[static_cast<size_t>(r * 8)], 0.0f);
    EXPECT_EQ(all[static_cast<size_t>(r * 8 + 7)], 0.0f);
  }
  // Cross-device copy with conversion.
  Tensor bf = Tensor::empty({6, 5}, DType::BF16, kGpu);
  bf.copy_from(src);
  expect_same_bits(bf, src.to(DType::BF16), "h2d with F32 -> BF16 conversion");
}

// ---- caching allocator -----------------------------------------------------------------------------------

TEST_F(GpuRuntime, CachingAllocatorReusesFreedBlocks) {
  Allocator& alloc = allocator_for(kGpu);
  const size_t n = (size_t{3} << 20) + 123;  // not a multiple of anything
  void* p = alloc.allocate(n);
  const AllocatorStats s1 = alloc.stats();
  alloc.deallocate(p, n);
  void* q = alloc.allocate(n);
  const AllocatorStats s2 = alloc.stats();
  EXPECT_NE(q, nullptr);
  EXPECT_EQ(s2.num_system_allocs, s1.num_system_allocs) << "second allocation of the same size hit cudaMalloc";
  EXPECT_EQ(s2.num_allocs, s1.num_allocs + 1);
  alloc.deallocate(q, n);

  // Same through tensors: a freed tensor's block serves the next tensor of that size.
  { const Tensor t = Tensor::empty({1000, 1000}, DType::F32, kGpu); }
  const AllocatorStats s3 = alloc.stats();
  { const Tensor t = Tensor::empty({1000, 1000}, DType::F32, kGpu); }
  EXPECT_EQ(alloc.stats().num_system_allocs, s3.num_system_allocs);
}

TEST_F(GpuRuntime, CachingAllocatorStatsAndEmptyCache) {
  Allocator& alloc = allocator_for(kGpu);
  alloc.empty_cache();
  const AllocatorStats s0 = alloc.stats();
  alloc.reset_peak();
  void* a = alloc.allocate(5000);
  void* b = alloc.allocate(size_t{7} << 20);
  const AllocatorStats s1 = alloc.stats();
  EXPECT_EQ(s1.allocated_bytes - s0.allocated_bytes, 5000 + (int64_t{7} << 20));
  EXPECT_GE(s1.peak_bytes, s1.allocated_bytes);
  EXPECT_GE(s1.reserved_bytes, s1.allocated_bytes);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 256, 0u);  // cudaMalloc alignment kept for blocks
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 256, 0u);
  alloc.deallocate(a, 5000);
  alloc.deallocate(b, size_t{7} << 20);
  const AllocatorStats s2 = alloc.stats();
  EXPECT_EQ(s2.allocated_bytes, s0.allocated_bytes);
  EXPECT_EQ(s2.reserved_bytes, s1.reserved_bytes);  // cached, not returned
  alloc.empty_cache();
  EXPECT_LT(alloc.stats().reserved_bytes, s2.reserved_bytes);
  void* c = alloc.allocate(size_t{7} << 20);  // cache was emptied: goes to cudaMalloc again
  EXPECT_EQ(alloc.stats().num_system_allocs, s2.num_system_allocs + 1);
  alloc.deallocate(c, size_t{7} << 20);
}

TEST_F(GpuRuntime, CachingAllocatorOutOfMemoryThrowsDsv4Error) {
  Allocator& alloc = allocator_for(kGpu);
  try {
    alloc.allocate(size_t{1} << 50);  // 1 PiB
    FAIL() << "a 1 PiB allocation succeeded";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("out of memory"), std::string::npos) << what;
    EXPECT_NE(what.find("requested 1125899906842624 bytes"), std::string::npos) << what;
    EXPECT_NE(what.find("allocated"), std::string::npos) << what;
    EXPECT_NE(what.find("reserved"), std::string::npos) << what;
  }
  // The device and the allocator still work afterwards.
  const Tensor t = rand_cpu({100});
  expect_same_bits(t.to(kGpu).to(kCpu), t, "round trip after OOM");
}

TEST_F(GpuRuntime, ZeroSizeTensors) {
  const Tensor e = Tensor::empty({0, 3}, DType::F32, kGpu);
  EXPECT_EQ(e.nbytes(), 0);
  EXPECT_EQ(e.to(kCpu).numel(), 0);
  Tensor z = Tensor::zeros({0}, DType::BF16, kGpu);
  ops::fill(z, 1.0);
  EXPECT_EQ(ops::add(e, e).numel(), 0);
}

TEST_F(GpuRuntime, SecondDeviceWhenPresent) {
  if (cuda_device_count() < 2) GTEST_SKIP() << "needs two GPUs";
  const Device d1 = Device::cuda(1);
  const Tensor a = rand_cpu({33, 17}), b = rand_cpu({17, 9});
  const Tensor c = ops::matmul(a.to(d1), b.to(d1));
  EXPECT_EQ(c.device(), d1);
  expect_close(c, ops::matmul(a, b), 1e-5, 1e-5, "matmul on cuda:1");
  EXPECT_NE(cuda::current_stream(1), cuda::current_stream(0));
  int current = -1;
  CUDA_CHECK(cudaGetDevice(&current));
  EXPECT_EQ(current, 0) << "ops on cuda:1 must restore the current device";
}

}  // namespace
}  // namespace dsv4::gputest
