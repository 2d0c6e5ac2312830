// Row-major GEMM on raw host pointers for CPU reference code that works below the Tensor level
// (templated module math instantiated for float, and for double in finite-difference tests).
//   C[m,n] = alpha * op(A) @ op(B) + beta * C,  op(A) is [m,k] (A stored [k,m] when trans_a), op(B) is [k,n].
// beta == 0 ignores C's old contents (NaN included).
#pragma once

#include <cstdint>

namespace dsv4 {

void cpu_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void cpu_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
              const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// Threads OpenBLAS uses for CPU GEMMs (n <= 0: leave the library default, e.g. OPENBLAS_NUM_THREADS).
void set_cpu_threads(int n);
int cpu_threads();

}  // namespace dsv4
