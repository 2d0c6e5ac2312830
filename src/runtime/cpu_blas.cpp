#include "runtime/cpu_blas.h"

#include <cblas.h>

#include <algorithm>

#include "runtime/error.h"

namespace dsv4 {
namespace {

template <typename T, typename Gemm>
void gemm_impl(Gemm gemm, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  DSV4_CHECK(m >= 0 && n >= 0 && k >= 0, "cpu_gemm: negative size m={} n={} k={}", m, n, k);
  if (m == 0 || n == 0) return;
  if (beta == T(0))
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
  if (k == 0) {
    if (beta != T(0) && beta != T(1))
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] *= beta;
    return;
  }
  // BLAS wants leading dims >= the row length even when only one row exists.
  const int64_t row_a = trans_a ? m : k, row_b = trans_b ? k : n;
  gemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m),
       static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(std::max(lda, row_a)), b,
       static_cast<int>(std::max(ldb, row_b)), beta == T(0) ? T(0) : beta, c, static_cast<int>(std::max(ldc, n)));
}

}  // namespace

void cpu_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_impl<float>(cblas_sgemm, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cpu_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
              const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_impl<double>(cblas_dgemm, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void set_cpu_threads(int n) {
  if (n > 0) openblas_set_num_threads(n);
}
int cpu_threads() { return openblas_get_num_threads(); }

}  // namespace dsv4
