// The per-device cuBLAS handle shared by the BF16/F32 GEMMs (ops_gemm.cu) and the grouped expert GEMMs
// (ops_grouped_gemm.cu): created on first use with CUBLAS_DEFAULT_MATH | DISALLOW_REDUCED_PRECISION_REDUCTION (no
// TF32, FP32 accumulation for BF16 inputs) and a 32 MiB workspace; callers hold `mu` while they set the stream and
// workspace and enqueue. Defined in ops_gemm.cu.
#pragma once

#include <cublas_v2.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <mutex>

#include "runtime/dtype.h"

namespace dsv4::cuda::detail {

inline constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

struct CublasHandle {
  std::mutex mu;
  cublasHandle_t handle = nullptr;
  void* workspace = nullptr;
};

CublasHandle& cublas_for(int device);

// cuBLAS's type of an F32 / BF16 operand; `op` names the caller in the error for any other dtype.
cudaDataType_t cublas_type(DType t, const char* op);
// A size as cuBLAS's int; `op` / `what` name it in the error when it does not fit.
int cublas_int(int64_t v, const char* op, const char* what);

}  // namespace dsv4::cuda::detail
