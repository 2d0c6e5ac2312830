// Error checking for the CUDA backend: one facility for every GPU library, throwing dsv4::Error (the
// type DSV4_CHECK throws) with the failed expression, file:line and the library's own error text.
//
//   CUDA_CHECK(cudaMalloc(&p, n));          CUDA runtime calls (cudaError_t)
//   CUDA_CHECK_LAUNCH();                    after a kernel launch: cudaGetLastError()
//   CUBLAS_CHECK(cublasSgemm(...));         cuBLAS (include <cublas_v2.h> before use)
//   NCCL_CHECK(ncclAllReduce(...));         NCCL (include <nccl.h> before use)
//   DSV4_GPU_LIBRARY_CHECK(call, success, "Name", to_string)   the generic hook the three are made of:
//                                           any library whose calls return a status with a to-string
//
//   DSV4_DEVICE_ASSERT(cond)                in device code: printf's file:line, block, thread and the
//                                           condition, then traps (the context is lost; the next CUDA
//                                           call on the host fails and CUDA_CHECK throws).
//
// Include this header first in every .cu file: it also makes fmt (pulled in by runtime/error.h) usable
// under nvcc (fmt 9 disables its constexpr support for __NVCC__ but keeps consteval format strings, which
// then fail to compile; FMT_USE_CONSTEXPR=1 keeps the two consistent).
#pragma once

#if defined(__NVCC__) && !defined(FMT_USE_CONSTEXPR)
#define FMT_USE_CONSTEXPR 1
#endif

#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "runtime/error.h"

namespace dsv4::cuda_detail {

// "<library> error <code> (<text>)"; the text may be null.
inline std::string library_error_message(const char* library, long long code, const char* text) {
  return fmt::format("{} error {} ({})", library, code, text ? text : "no description");
}

}  // namespace dsv4::cuda_detail

#define DSV4_GPU_LIBRARY_CHECK(call, success, library, to_string)                                         \
  do {                                                                                                    \
    const auto dsv4_status_ = (call);                                                                     \
    if (dsv4_status_ != (success)) [[unlikely]]                                                           \
      ::dsv4::throw_error(__FILE__, __LINE__, #call,                                                      \
                          ::dsv4::cuda_detail::library_error_message(                                     \
                              library, static_cast<long long>(dsv4_status_), to_string(dsv4_status_)));   \
  } while (0)

#define CUDA_CHECK(call) DSV4_GPU_LIBRARY_CHECK(call, cudaSuccess, "CUDA", ::cudaGetErrorString)
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
#define CUBLAS_CHECK(call) DSV4_GPU_LIBRARY_CHECK(call, CUBLAS_STATUS_SUCCESS, "cuBLAS", ::cublasGetStatusString)
#define NCCL_CHECK(call) DSV4_GPU_LIBRARY_CHECK(call, ncclSuccess, "NCCL", ::ncclGetErrorString)

#if defined(__CUDACC__)
#define DSV4_DEVICE_ASSERT(cond)                                                                          \
  do {                                                                                                    \
    if (!(cond)) {                                                                                        \
      printf("%s:%d: block [%d,%d,%d] thread [%d,%d,%d]: device assertion `%s` failed\n", __FILE__,       \
             __LINE__, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y),                        \
             static_cast<int>(blockIdx.z), static_cast<int>(threadIdx.x), static_cast<int>(threadIdx.y),  \
             static_cast<int>(threadIdx.z), #cond);                                                       \
      __trap();                                                                                           \
    }                                                                                                     \
  } while (0)
#endif
