// CUDA twin of the grouped expert GEMMs (runtime/grouped_gemm.h; CPU reference src/runtime/cpu_grouped_gemm.cpp):
// forward y_e = x_e W_e^T, dgrad dx_e = dy_e W_e, wgrad dW_e (+)= dy_e^T x_e over the non-empty experts' row ranges.
//
// Row-major operands go to column-major cuBLAS as their transposes (as kernels/ops_gemm.cu does):
//   forward  Y_e^T [N x m]  = op_T(W_e: K x N col-major) · X_e^T (K x m)     transa T, transb N, (m,n,k) = (N, m, K)
//   dgrad    dX_e^T [K x m] = W_e^T (K x N)              · dY_e^T (N x m)    transa N, transb N, (m,n,k) = (K, m, N)
//   wgrad    dW_e^T [K x N] = X_e^T (K x m)              · op_T(dY_e^T) (m x N)  transa N, transb T, (m,n,k) = (K, N, m)
// Types: A/B CUDA_R_16BF (or CUDA_R_32F), C CUDA_R_32F, CUBLAS_COMPUTE_32F (FP32 accumulation; F32 inputs without
// TF32), the default math mode plus CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION.
//
// Two implementations (GroupedGemmImpl):
//   Loop     one cublasGemmEx per non-empty expert, in expert order, on the current stream.
//   Grouped  one cublasGemmGroupedBatchedEx (cuBLAS >= 12.5; signature checked in the installed
//            /usr/local/cuda/include/cublas_api.h, cuBLAS 13.1): one group of size 1 per non-empty expert; the
//            per-group transa/transb/m/n/k/ld/alpha/beta arrays are host arrays read during the call, the
//            A/B/C pointer arrays live in device memory. They are written into one pageable host vector and
//            copied with cudaMemcpyAsync on the current stream into a scratch tensor from the caching allocator:
//            a host-to-device copy from pageable memory has consumed (staged) the host buffer when cudaMemcpyAsync
//            returns (CUDA Runtime API, "API synchronization behavior"), so the vector may go out of scope, and the
//            scratch tensor's memory is reused only by work ordered after the GEMM on the same stream (the
//            allocator is stream-ordered, kernels/cuda_runtime_api.h).
// Both run under the per-device cuBLAS handle of kernels/cublas_handle.cuh (shared with ops_gemm.cu), serialised
// by its mutex and bound to the caller's current stream per call.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cublas_v2.h>

#include <array>
#include <climits>
#include <mutex>
#include <vector>

#include "kernels/cublas_handle.cuh"
#include "kernels/ops_common.cuh"
#include "runtime/grouped_gemm.h"

#if !defined(CUBLAS_VERSION) || CUBLAS_VERSION < 120500
#error "kernels/ops_grouped_gemm.cu needs cuBLAS >= 12.5 (cublasGemmGroupedBatchedEx)"
#endif

namespace dsv4::cuda {
namespace {

cudaDataType_t in_type(DType t) { return detail::cublas_type(t, "cuda::grouped_gemm"); }
int to_int(int64_t v, const char* what) { return detail::cublas_int(v, "cuda::grouped_gemm", what); }

// One column-major cuBLAS problem C = op(A) op(B) + beta C.
struct Problem {
  cublasOperation_t ta, tb;
  int m, n, k;
  const void* A;
  int lda;
  const void* B;
  int ldb;
  void* C;
  int ldc;
};

void run(const std::vector<Problem>& ps, cudaDataType_t ab_type, float beta, GroupedGemmImpl impl, int device) {
  if (ps.empty()) return;
  detail::CublasHandle& blas = detail::cublas_for(device);
  const cudaStream_t stream = detail::stream_of(device);
  const float alpha = 1.0f;
  if (impl == GroupedGemmImpl::Loop) {
    std::lock_guard<std::mutex> lock(blas.mu);
    CUBLAS_CHECK(cublasSetStream(blas.handle, stream));
    CUBLAS_CHECK(cublasSetWorkspace(blas.handle, blas.workspace, detail::kCublasWorkspaceBytes));  // SetStream resets it
    for (const Problem& p : ps)
      CUBLAS_CHECK(cublasGemmEx(blas.handle, p.ta, p.tb, p.m, p.n, p.k, &alpha, p.A, ab_type, p.lda, p.B, ab_type,
                                p.ldb, &beta, p.C, CUDA_R_32F, p.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return;
  }
  // cuBLAS's grouped GEMM needs C in the inputs' type (measured on an H100, cuBLAS 13.1: BF16 x BF16 -> F32 returns
  // CUBLAS_STATUS_NOT_SUPPORTED), so BF16 inputs with our F32 outputs run as Loop.
  DSV4_CHECK(ab_type == CUDA_R_32F,
             "grouped GEMM: GroupedGemmImpl::Grouped (cublasGemmGroupedBatchedEx) supports F32 inputs only here (C is F32; "
             "cuBLAS has no BF16 x BF16 -> F32 grouped GEMM); use Loop or Auto for BF16");
  // Grouped: host parameter arrays, device pointer arrays [A..., B..., C...].
  const size_t G = ps.size();
  std::vector<cublasOperation_t> ta(G), tb(G);
  std::vector<int> m(G), n(G), k(G), lda(G), ldb(G), ldc(G), group_size(G, 1);
  std::vector<float> alphas(G, alpha), betas(G, beta);
  std::vector<const void*> ptrs(3 * G);
  for (size_t g = 0; g < G; ++g) {
    const Problem& p = ps[g];
    ta[g] = p.ta, tb[g] = p.tb, m[g] = p.m, n[g] = p.n, k[g] = p.k, lda[g] = p.lda, ldb[g] = p.ldb, ldc[g] = p.ldc;
    ptrs[g] = p.A, ptrs[G + g] = p.B, ptrs[2 * G + g] = p.C;
  }
  static_assert(sizeof(void*) == sizeof(int64_t));
  Tensor dev_ptrs = Tensor::empty({static_cast<int64_t>(3 * G)}, DType::I64, Device::cuda(device));
  CUDA_CHECK(cudaMemcpyAsync(dev_ptrs.raw_data(), ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice,
                             stream));
  void** d = static_cast<void**>(dev_ptrs.raw_data());
  std::lock_guard<std::mutex> lock(blas.mu);
  CUBLAS_CHECK(cublasSetStream(blas.handle, stream));
  CUBLAS_CHECK(cublasSetWorkspace(blas.handle, blas.workspace, detail::kCublasWorkspaceBytes));
  CUBLAS_CHECK(cublasGemmGroupedBatchedEx(blas.handle, ta.data(), tb.data(), m.data(), n.data(), k.data(),
                                          alphas.data(), const_cast<const void* const*>(d), ab_type, lda.data(),
                                          const_cast<const void* const*>(d + G), ab_type, ldb.data(), betas.data(),
                                          d + 2 * G, CUDA_R_32F, ldc.data(), to_int(int64_t(G), "group count"),
                                          group_size.data(), CUBLAS_COMPUTE_32F));
}

// Auto: Loop. BF16 (the training inputs) can only run as Loop (see run()); F32 inputs are a test path.
GroupedGemmImpl resolve(GroupedGemmImpl impl) { return impl == GroupedGemmImpl::Auto ? GroupedGemmImpl::Loop : impl; }

const char* bytes(const Tensor& t, int64_t elem) {
  return static_cast<const char*>(t.raw_data()) + dtype_nbytes(t.dtype(), elem);
}

}  // namespace

void grouped_gemm_forward(const Tensor& x_TK, const Tensor& W_ENK, const std::vector<int64_t>& offsets,
                          GroupedGemmImpl impl, Tensor& y_TN) {
  const int device = y_TN.device().index;
  detail::DeviceGuard guard(device);
  const int64_t K = x_TK.size(1), E = W_ENK.size(0), N = W_ENK.size(1);
  std::vector<Problem> ps;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[size_t(e)], m = offsets[size_t(e + 1)] - r0;
    if (m == 0) continue;
    ps.push_back({CUBLAS_OP_T, CUBLAS_OP_N, to_int(N, "N"), to_int(m, "rows"), to_int(K, "K"), bytes(W_ENK, e * N * K),
                  to_int(K, "K"), bytes(x_TK, r0 * K), to_int(K, "K"), y_TN.data<float>() + r0 * N, to_int(N, "N")});
  }
  run(ps, in_type(x_TK.dtype()), 0.0f, resolve(impl), device);
}

void grouped_gemm_dgrad(const Tensor& dy_TN, const Tensor& W_ENK, const std::vector<int64_t>& offsets,
                        GroupedGemmImpl impl, Tensor& dx_TK) {
  const int device = dx_TK.device().index;
  detail::DeviceGuard guard(device);
  const int64_t N = dy_TN.size(1), E = W_ENK.size(0), K = W_ENK.size(2);
  std::vector<Problem> ps;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[size_t(e)], m = offsets[size_t(e + 1)] - r0;
    if (m == 0) continue;
    ps.push_back({CUBLAS_OP_N, CUBLAS_OP_N, to_int(K, "K"), to_int(m, "rows"), to_int(N, "N"), bytes(W_ENK, e * N * K),
                  to_int(K, "K"), bytes(dy_TN, r0 * N), to_int(N, "N"), dx_TK.data<float>() + r0 * K, to_int(K, "K")});
  }
  run(ps, in_type(dy_TN.dtype()), 0.0f, resolve(impl), device);
}

void grouped_gemm_wgrad(const Tensor& dy_TN, const Tensor& x_TK, const std::vector<int64_t>& offsets,
                        bool accumulate, GroupedGemmImpl impl, Tensor& dW_ENK) {
  const int device = dW_ENK.device().index;
  detail::DeviceGuard guard(device);
  const int64_t N = dy_TN.size(1), K = x_TK.size(1), E = dW_ENK.size(0);
  std::vector<Problem> ps;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[size_t(e)], m = offsets[size_t(e + 1)] - r0;
    if (m == 0) continue;  // zeroed by the frontend (accumulate = false) or left untouched
    ps.push_back({CUBLAS_OP_N, CUBLAS_OP_T, to_int(K, "K"), to_int(N, "N"), to_int(m, "rows"), bytes(x_TK, r0 * K),
                  to_int(K, "K"), bytes(dy_TN, r0 * N), to_int(N, "N"), dW_ENK.data<float>() + e * N * K,
                  to_int(K, "K")});
  }
  run(ps, in_type(x_TK.dtype()), accumulate ? 1.0f : 0.0f, resolve(impl), device);
}

}  // namespace dsv4::cuda
