#include "optim/update_rules.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "runtime/cpu_blas.h"
#include "runtime/dtype.h"
#include "runtime/error.h"

namespace dsv4 {

std::vector<NsStage> hybrid_ns_schedule() { return {{8, 3.4445, -4.7750, 2.0315}, {2, 2.0, -1.5, 0.5}}; }

void MuonConfig::validate() const {
  DSV4_CHECK(momentum >= 0 && momentum < 1, "muon.momentum = {} must be in [0, 1)", momentum);
  DSV4_CHECK(ns_eps > 0, "muon.ns_eps = {} must be > 0", ns_eps);
  DSV4_CHECK(update_scale > 0 && std::isfinite(update_scale), "muon.update_scale = {} must be > 0", update_scale);
  DSV4_CHECK(weight_decay >= 0 && std::isfinite(weight_decay), "muon.weight_decay = {} must be >= 0", weight_decay);
  DSV4_CHECK(!ns_schedule.empty(), "muon.ns_schedule is empty");
  for (const NsStage& s : ns_schedule)
    DSV4_CHECK(s.steps >= 0 && s.steps <= 100 && std::isfinite(s.a) && std::isfinite(s.b) && std::isfinite(s.c),
               "muon.ns_schedule stage ({} x {}, {}, {}) is invalid", s.steps, s.a, s.b, s.c);
}

void AdamWConfig::validate() const {
  DSV4_CHECK(beta1 >= 0 && beta1 < 1, "adamw.beta1 = {} must be in [0, 1)", beta1);
  DSV4_CHECK(beta2 >= 0 && beta2 < 1, "adamw.beta2 = {} must be in [0, 1)", beta2);
  DSV4_CHECK(eps > 0 && std::isfinite(eps), "adamw.eps = {} must be > 0", eps);
  DSV4_CHECK(weight_decay >= 0 && std::isfinite(weight_decay), "adamw.weight_decay = {} must be >= 0", weight_decay);
}

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

void muon_momentum(const float* g, float* momentum, float* u, int64_t n, const MuonConfig& cfg) {
  const float mu = static_cast<float>(cfg.momentum);
  for (int64_t i = 0; i < n; ++i) {
    momentum[i] = mu * momentum[i] + g[i];
    u[i] = cfg.nesterov ? mu * momentum[i] + g[i] : momentum[i];
  }
}

void muon_orthogonalize(float* u, int64_t rows, int64_t cols, int64_t row_blocks, const MuonConfig& cfg) {
  DSV4_CHECK(row_blocks >= 1 && rows % row_blocks == 0, "muon: {} rows do not split into {} blocks", rows, row_blocks);
  const int64_t br = rows / row_blocks;
  for (int64_t blk = 0; blk < row_blocks; ++blk) {
    float* ub = u + blk * br * cols;
    newton_schulz(ub, ub, br, cols, cfg.ns_schedule, cfg.ns_eps, cfg.precision);
  }
}

void muon_apply(float* w, const float* o, int64_t n, int64_t block_rows, int64_t cols, double lr, const MuonConfig& cfg) {
  const float decay = static_cast<float>(1.0 - lr * cfg.weight_decay);
  const float step =
      static_cast<float>(lr * cfg.update_scale * std::sqrt(static_cast<double>(std::max(block_rows, cols))));
  for (int64_t i = 0; i < n; ++i) w[i] = w[i] * decay - step * o[i];
}

void muon_update(float* w, const float* g, float* momentum, int64_t rows, int64_t cols, int64_t row_blocks, double lr,
                 const MuonConfig& cfg) {
  DSV4_CHECK(row_blocks >= 1 && rows % row_blocks == 0, "muon_update: {} rows do not split into {} blocks", rows,
             row_blocks);
  const int64_t n = rows * cols;
  std::vector<float> u(static_cast<size_t>(n));
  muon_momentum(g, momentum, u.data(), n, cfg);
  muon_orthogonalize(u.data(), rows, cols, row_blocks, cfg);
  muon_apply(w, u.data(), n, rows / row_blocks, cols, lr, cfg);
}

void adamw_update(float* w, const float* g, float* exp_avg, float* exp_avg_sq, int64_t n, int64_t step, double lr,
                  const AdamWConfig& cfg) {
  DSV4_CHECK(step >= 1, "adamw_update: step {} must be >= 1", step);
  const float decay = static_cast<float>(1.0 - lr * cfg.weight_decay);
  const float w1 = static_cast<float>(1.0 - cfg.beta1);
  const float b2 = static_cast<float>(cfg.beta2), w2 = static_cast<float>(1.0 - cfg.beta2);
  const double bc1 = 1.0 - std::pow(cfg.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(cfg.beta2, static_cast<double>(step));
  const float neg_step_size = static_cast<float>(-(lr / bc1));
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float eps = static_cast<float>(cfg.eps);
  const bool lerp_low = w1 < 0.5f;
  for (int64_t i = 0; i < n; ++i) {
    w[i] *= decay;
    const float gi = g[i];
    // torch.lerp(m, g, w1): m + w1 (g - m) for |w1| < 0.5, else g - (g - m)(1 - w1).
    exp_avg[i] = lerp_low ? exp_avg[i] + w1 * (gi - exp_avg[i]) : gi - (gi - exp_avg[i]) * (1.0f - w1);
    exp_avg_sq[i] = exp_avg_sq[i] * b2 + w2 * gi * gi;
    const float denom = std::sqrt(exp_avg_sq[i]) / bc2_sqrt + eps;
    w[i] += neg_step_size * (exp_avg[i] / denom);
  }
}

}  // namespace dsv4
