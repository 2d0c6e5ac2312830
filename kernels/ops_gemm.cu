// gemm through cuBLAS (backend_ops.def): c = alpha * op(a) @ op(b) + beta * c, 2-D or 3-D batched.
//
// Row-major operands are handed to column-major cuBLAS as their transposes: C^T = op(B)^T op(A)^T, so
// the operands are swapped and each keeps its own transpose flag; leading dims are the row strides.
// A batch of 1 broadcasts with batch stride 0. Precision: F32 uses CUBLAS_COMPUTE_32F with the default
// math mode (no TF32), so results match the CPU to FP32 rounding; BF16 a/b accumulate in FP32 and write
// F32 or BF16 c, with reduced-precision split-K reductions disallowed. F32 a/b with a BF16 c (no cuBLAS
// kernel) go through an F32 temporary.
//
// One cuBLAS handle per device with a 32 MiB workspace, created on first use and never destroyed; calls
// are serialised per device by a mutex, and the handle is bound to the caller's current stream each call.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cublas_v2.h>

#include <array>
#include <climits>
#include <mutex>

#include "kernels/cublas_handle.cuh"
#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

cudaDataType_t cuda_type(DType t) { return detail::cublas_type(t, "cuda::gemm"); }
int to_int(int64_t v, const char* what) { return detail::cublas_int(v, "cuda::gemm", what); }

// Leading dim (row stride) of a row-major matrix view; a single row may carry any stride.
int64_t leading_dim(const Tensor& t) {
  const int r = t.ndim() - 2;
  const int64_t rows = t.size(r), cols = t.size(r + 1);
  if (rows <= 1) return std::max<int64_t>(cols, 1);
  return t.stride(r);
}

// Returns t, or a contiguous copy when its rows overlap (leading dim shorter than a row).
Tensor usable_operand(const Tensor& t) {
  const int64_t cols = t.size(t.ndim() - 1);
  return leading_dim(t) >= std::max<int64_t>(cols, 1) ? t : t.contiguous();
}

}  // namespace

void gemm(const Tensor& a_in, bool trans_a, const Tensor& b_in, bool trans_b, float alpha, float beta, Tensor& c) {
  const int device = c.device().index;
  detail::DeviceGuard guard(device);
  const int r = a_in.ndim() - 2;
  const int64_t m = c.size(r), n = c.size(r + 1);
  const int64_t k = trans_a ? a_in.size(r) : a_in.size(r + 1);
  const int64_t batch = r == 1 ? c.size(0) : 1;
  if (batch == 0 || m == 0 || n == 0) return;

  if (c.dtype() == DType::BF16 && a_in.dtype() == DType::F32) {
    Tensor tmp = Tensor::empty(c.shape(), DType::F32, c.device());
    if (beta != 0.0f) convert(c, tmp);
    gemm(a_in, trans_a, b_in, trans_b, alpha, beta, tmp);
    convert(tmp, c);
    return;
  }
  if (k == 0) {  // empty sum: c = beta * c (beta == 0 overwrites, as cuBLAS does)
    if (beta == 0.0f)
      fill(c, 0.0);
    else
      affine(c, beta, 0.0, c);
    return;
  }

  const Tensor a = usable_operand(a_in), b = usable_operand(b_in);
  const int64_t ldc = leading_dim(c);
  DSV4_CHECK(ldc >= n, "cuda::gemm: output {} has overlapping rows (row stride {} < {})", c.str(), ldc, n);
  const auto batch_stride = [&](const Tensor& t) -> long long {
    return (r == 1 && t.size(0) > 1) ? static_cast<long long>(t.stride(0)) : 0LL;
  };

  detail::CublasHandle& blas = detail::cublas_for(device);
  std::lock_guard<std::mutex> lock(blas.mu);
  CUBLAS_CHECK(cublasSetStream(blas.handle, detail::stream_of(device)));
  CUBLAS_CHECK(cublasSetWorkspace(blas.handle, blas.workspace, detail::kCublasWorkspaceBytes));  // SetStream resets it
  // Column-major: C^T (n x m) = op(B)^T (n x k) * op(A)^T (k x m).
  CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      blas.handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, to_int(n, "n"),
      to_int(m, "m"), to_int(k, "k"), &alpha, b.raw_data(), cuda_type(b.dtype()), to_int(leading_dim(b), "ldb"),
      batch_stride(b), a.raw_data(), cuda_type(a.dtype()), to_int(leading_dim(a), "lda"), batch_stride(a), &beta,
      c.raw_data(), cuda_type(c.dtype()), to_int(ldc, "ldc"), batch_stride(c), to_int(batch, "batch"),
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

namespace detail {

CublasHandle& cublas_for(int device) {
  constexpr int kMaxDevices = 64;
  DSV4_CHECK(device >= 0 && device < kMaxDevices, "cuda:{}: device index out of range", device);
  static auto* once = new std::array<std::once_flag, kMaxDevices>;
  static auto* handles = new std::array<CublasHandle, kMaxDevices>;  // leaked on purpose (used until exit)
  CublasHandle& b = (*handles)[static_cast<size_t>(device)];
  std::call_once((*once)[static_cast<size_t>(device)], [&] {
    CUBLAS_CHECK(cublasCreate(&b.handle));
    CUBLAS_CHECK(cublasSetMathMode(
        b.handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    CUDA_CHECK(cudaMalloc(&b.workspace, kCublasWorkspaceBytes));
  });
  return b;
}

cudaDataType_t cublas_type(DType t, const char* op) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    default: DSV4_FAIL("{}: unsupported dtype {}", op, dtype_name(t));
  }
}

int cublas_int(int64_t v, const char* op, const char* what) {
  DSV4_CHECK(v >= 0 && v <= INT_MAX, "{}: {} = {} exceeds cuBLAS's int range", op, what, v);
  return static_cast<int>(v);
}

}  // namespace detail
}  // namespace dsv4::cuda
