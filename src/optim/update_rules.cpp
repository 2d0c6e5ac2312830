#include "optim/update_rules.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "runtime/cpu_blas.h"
#include "runtime/dtype.h"
#include "runtime/error.h"

namespace dsv4 {

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

void muon_momentum(const float* g, float* momentum, float* u, int64_t n, const MuonConfig& cfg) {
  const float mu = static_cast<float>(cfg.momentum);
  for (int64_t i = 0; i < n; ++i) muon_momentum_element(g[i], momentum[i], u[i], mu, cfg.nesterov);
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
  const MuonApplyScalars s = muon_apply_scalars(lr, cfg.weight_decay, cfg.update_scale, block_rows, cols);
  for (int64_t i = 0; i < n; ++i) w[i] = muon_apply_element(w[i], o[i], s);
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
  const AdamWScalars s = adamw_scalars(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, step, lr);
  for (int64_t i = 0; i < n; ++i) adamw_element(w[i], g[i], exp_avg[i], exp_avg_sq[i], s);
}

}  // namespace dsv4
