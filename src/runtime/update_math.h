// Element-wise optimizer update rules (AdamW, Muon's momentum and apply), shared by the CPU loops of
// optim/update_rules.cpp and the CUDA kernels of kernels/ops_model_optim.cu (built with --fmad=false, so both
// compute the same bits). Scalars are formed on the host in double and applied in FP32, as described in
// optim/update_rules.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "runtime/dtype.h"  // DSV4_HD

namespace dsv4 {

struct AdamWScalars {
  float decay = 1, w1 = 0, b2 = 0, w2 = 0, neg_step_size = 0, bc2_sqrt = 1, eps = 0;
  bool lerp_low = true;
};

// step >= 1 (checked by the callers).
inline AdamWScalars adamw_scalars(double beta1, double beta2, double eps, double weight_decay, int64_t step,
                                  double lr) {
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.b2 = static_cast<float>(beta2);
  s.w2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  s.neg_step_size = static_cast<float>(-(lr / bc1));
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.lerp_low = s.w1 < 0.5f;
  return s;
}

DSV4_HD void adamw_element(float& w, float g, float& exp_avg, float& exp_avg_sq, const AdamWScalars& s) {
  w *= s.decay;
  const float gi = g;
  // torch.lerp(m, g, w1): m + w1 (g - m) for |w1| < 0.5, else g - (g - m)(1 - w1).
  exp_avg = s.lerp_low ? exp_avg + s.w1 * (gi - exp_avg) : gi - (gi - exp_avg) * (1.0f - s.w1);
  exp_avg_sq = exp_avg_sq * s.b2 + s.w2 * gi * gi;
  const float denom = sqrtf(exp_avg_sq) / s.bc2_sqrt + s.eps;
  w += s.neg_step_size * (exp_avg / denom);
}

// M <- mu M + G;  U <- mu M + G (Nesterov) or M.
DSV4_HD void muon_momentum_element(float g, float& momentum, float& u, float mu, bool nesterov) {
  momentum = mu * momentum + g;
  u = nesterov ? mu * momentum + g : momentum;
}

struct MuonApplyScalars {
  float decay = 1, step = 0;
};
inline MuonApplyScalars muon_apply_scalars(double lr, double weight_decay, double update_scale, int64_t block_rows,
                                           int64_t cols) {
  MuonApplyScalars s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.step = static_cast<float>(lr * update_scale * std::sqrt(static_cast<double>(std::max(block_rows, cols))));
  return s;
}
// W <- W (1 - lr wd) - lr gamma sqrt(max(n, m)) O
DSV4_HD float muon_apply_element(float w, float o, const MuonApplyScalars& s) { return w * s.decay - s.step * o; }

}  // namespace dsv4
