// CPU reference of the grouped expert GEMMs (runtime/grouped_gemm.h): one FP32 CPU-BLAS GEMM (runtime/cpu_blas.h)
// per non-empty expert on row ranges of the expert-sorted operands. Inputs arrive F32 (the frontend widens BF16
// exactly); the CUDA twin is kernels/ops_grouped_gemm.cu.
#include "runtime/cpu_blas.h"
#include "runtime/error.h"
#include "runtime/grouped_gemm.h"

namespace dsv4::cpu {

void grouped_gemm_forward(const Tensor& x_TK, const Tensor& W_ENK, const std::vector<int64_t>& offsets,
                          GroupedGemmImpl /*impl*/, Tensor& y_TN) {
  const int64_t K = x_TK.size(1), E = W_ENK.size(0), N = W_ENK.size(1);
  const float* x = x_TK.data<float>();
  const float* W = W_ENK.data<float>();
  float* y = y_TN.data<float>();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[size_t(e)], m = offsets[size_t(e + 1)] - r0;
    if (m == 0) continue;
    // y_e [m, N] = x_e [m, K] · W_e [N, K]^T
    cpu_gemm(false, true, m, N, K, 1.0f, x + r0 * K, K, W + e * N * K, K, 0.0f, y + r0 * N, N);
  }
}

void grouped_gemm_dgrad(const Tensor& dy_TN, const Tensor& W_ENK, const std::vector<int64_t>& offsets,
                        GroupedGemmImpl /*impl*/, Tensor& dx_TK) {
  const int64_t N = dy_TN.size(1), E = W_ENK.size(0), K = W_ENK.size(2);
  const float* dy = dy_TN.data<float>();
  const float* W = W_ENK.data<float>();
  float* dx = dx_TK.data<float>();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[size_t(e)], m = offsets[size_t(e + 1)] - r0;
    if (m == 0) continue;
    // dx_e [m, K] = dy_e [m, N] · W_e [N, K]
    cpu_gemm(false, false, m, K, N, 1.0f, dy + r0 * N, N, W + e * N * K, K, 0.0f, dx + r0 * K, K);
  }
}

void grouped_gemm_wgrad(const Tensor& dy_TN, const Tensor& x_TK, const std::vector<int64_t>& offsets,
                        bool accumulate, GroupedGemmImpl /*impl*/, Tensor& dW_ENK) {
  const int64_t N = dy_TN.size(1), K = x_TK.size(1), E = dW_ENK.size(0);
  const float* dy = dy_TN.data<float>();
  const float* x = x_TK.data<float>();
  float* dW = dW_ENK.data<float>();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[size_t(e)], m = offsets[size_t(e + 1)] - r0;
    if (m == 0) continue;  // the frontend zeroed it (accumulate = false) or leaves it
    // dW_e [N, K] (+)= dy_e [m, N]^T · x_e [m, K]
    cpu_gemm(true, false, N, K, m, 1.0f, dy + r0 * N, N, x + r0 * K, K, accumulate ? 1.0f : 0.0f, dW + e * N * K, K);
  }
}

}  // namespace dsv4::cpu
