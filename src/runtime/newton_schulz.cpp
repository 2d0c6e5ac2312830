// Newton-Schulz orthogonalisation of Muon (see newton_schulz.h); moved here from optim/update_rules.cpp so the
// runtime-level optimizer ops (runtime/model_ops.h) can use it as the CPU twin of their CUDA version.
#include "runtime/newton_schulz.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "runtime/cpu_blas.h"
#include "runtime/dtype.h"
#include "runtime/error.h"

namespace dsv4 {

std::vector<NsStage> hybrid_ns_schedule() { return {{8, 3.4445, -4.7750, 2.0315}, {2, 2.0, -1.5, 0.5}}; }

namespace {

void round_bf16_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

// NS on a wide (r <= c) contiguous matrix X [r, c], in place.
void ns_wide(float* X, int64_t r, int64_t c, const std::vector<NsStage>& schedule, double eps, NsPrecision prec) {
  const int64_t n = r * c;
  const bool bf = prec == NsPrecision::BF16;
  if (bf) round_bf16_inplace(X, n);  // the BF16 copy of U
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(X[i]) * X[i];
  if (bf) {
    // As torch in BF16: the norm is a BF16 value and the division rounds to BF16.
    const float nrm = round_bf16(static_cast<float>(std::max(std::sqrt(ss), eps)));
    for (int64_t i = 0; i < n; ++i) X[i] = round_bf16(X[i] / nrm);
  } else {
    const float inv = static_cast<float>(1.0 / std::max(std::sqrt(ss), eps));
    for (int64_t i = 0; i < n; ++i) X[i] *= inv;
  }
  std::vector<float> A(static_cast<size_t>(r * r)), B(static_cast<size_t>(r * r)), Y(static_cast<size_t>(n));
  float* x = X;
  float* y = Y.data();
  int64_t iters = 0;
  for (const NsStage& st : schedule) {
    const float a = static_cast<float>(st.a), b = static_cast<float>(st.b), cc = static_cast<float>(st.c);
    for (int64_t k = 0; k < st.steps; ++k, ++iters) {
      cpu_gemm(false, true, r, r, c, 1.0f, x, c, x, c, 0.0f, A.data(), r);  // A = X X^T
      if (bf) round_bf16_inplace(A.data(), r * r);
      for (int64_t i = 0; i < r * r; ++i) B[static_cast<size_t>(i)] = b * A[static_cast<size_t>(i)];
      cpu_gemm(false, false, r, r, r, cc, A.data(), r, A.data(), r, 1.0f, B.data(), r);  // B = b A + c A A
      if (bf) round_bf16_inplace(B.data(), r * r);
      for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
      cpu_gemm(false, false, r, c, r, 1.0f, B.data(), r, x, c, 1.0f, y, c);  // Y = a X + B X
      if (bf) round_bf16_inplace(y, n);
      std::swap(x, y);
    }
  }
  if (x != X) std::memcpy(X, x, static_cast<size_t>(n) * sizeof(float));
}

}  // namespace

double newton_schulz_flops(int64_t rows, int64_t cols, const std::vector<NsStage>& schedule) {
  const double r = static_cast<double>(std::min(rows, cols)), c = static_cast<double>(std::max(rows, cols));
  int64_t iters = 0;
  for (const NsStage& st : schedule) iters += st.steps;
  return static_cast<double>(iters) * (4 * r * r * c + 2 * r * r * r);
}

void newton_schulz(const float* x, float* out, int64_t rows, int64_t cols, const std::vector<NsStage>& schedule,
                   double eps, NsPrecision precision) {
  DSV4_CHECK(rows >= 1 && cols >= 1, "newton_schulz: bad shape [{}, {}]", rows, cols);
  const int64_t n = rows * cols;
  if (rows <= cols) {
    if (out != x) std::memcpy(out, x, static_cast<size_t>(n) * sizeof(float));
    ns_wide(out, rows, cols, schedule, eps, precision);
    return;
  }
  // Tall: work on the transpose [cols, rows].
  std::vector<float> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t[static_cast<size_t>(j * rows + i)] = x[i * cols + j];
  ns_wide(t.data(), cols, rows, schedule, eps, precision);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = t[static_cast<size_t>(j * rows + i)];
}

}  // namespace dsv4
