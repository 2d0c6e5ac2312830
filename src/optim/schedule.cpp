#include "optim/schedule.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>

#include "runtime/error.h"

namespace dsv4 {

std::string_view lr_decay_name(LrDecay d) {
  switch (d) {
    case LrDecay::Constant: return "constant";
    case LrDecay::Cosine: return "cosine";
    case LrDecay::WSD: return "wsd";
  }
  return "?";
}

LrDecay lr_decay_from_name(std::string_view name) {
  if (name == "constant") return LrDecay::Constant;
  if (name == "cosine") return LrDecay::Cosine;
  if (name == "wsd") return LrDecay::WSD;
  DSV4_FAIL("unknown LR schedule '{}' (expected one of: constant, cosine, wsd)", name);
}

void LrSchedule::validate() const {
  DSV4_CHECK(std::isfinite(peak_lr) && peak_lr >= 0, "lr schedule: peak_lr = {} must be >= 0", peak_lr);
  DSV4_CHECK(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= peak_lr,
             "lr schedule: min_lr = {} must be in [0, peak_lr = {}]", min_lr, peak_lr);
  DSV4_CHECK(warmup_steps >= 0, "lr schedule: warmup_steps = {} must be >= 0", warmup_steps);
  DSV4_CHECK(total_steps >= 1, "lr schedule: total_steps = {} must be >= 1", total_steps);
  if (decay != LrDecay::Constant)
    DSV4_CHECK(warmup_steps <= total_steps, "lr schedule: warmup_steps = {} exceeds total_steps = {}", warmup_steps,
               total_steps);
  if (decay == LrDecay::WSD)
    DSV4_CHECK(decay_start >= warmup_steps && decay_start <= total_steps,
               "lr schedule: decay_start = {} must be in [warmup_steps = {}, total_steps = {}]", decay_start,
               warmup_steps, total_steps);
}

int64_t LrSchedule::decay_begin() const {
  switch (decay) {
    case LrDecay::Constant: return std::numeric_limits<int64_t>::max();
    case LrDecay::Cosine: return warmup_steps;
    case LrDecay::WSD: return decay_start;
  }
  return std::numeric_limits<int64_t>::max();
}

double LrSchedule::lr_at(int64_t step) const {
  DSV4_CHECK(step >= 0, "lr schedule: step {} < 0", step);
  if (step < warmup_steps) return peak_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  const int64_t d = decay_begin();
  if (step < d) return peak_lr;
  if (step >= total_steps || d >= total_steps) return min_lr;
  const double p = static_cast<double>(step - d) / static_cast<double>(total_steps - d);
  return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
}

void LossSchedule::validate() const {
  DSV4_CHECK(std::isfinite(mtp_weight) && mtp_weight >= 0, "loss schedule: mtp_weight = {} must be >= 0", mtp_weight);
  DSV4_CHECK(std::isfinite(mtp_weight_after) && mtp_weight_after >= 0,
             "loss schedule: mtp_weight_after = {} must be >= 0", mtp_weight_after);
  DSV4_CHECK(std::isfinite(balance_alpha) && balance_alpha >= 0, "loss schedule: balance_alpha = {} must be >= 0",
             balance_alpha);
}

double mtp_weight_at(const LossSchedule& ls, const LrSchedule& lr, int64_t step) {
  const int64_t sw = ls.mtp_switch_step >= 0 ? ls.mtp_switch_step : lr.decay_begin();
  return step < sw ? ls.mtp_weight : ls.mtp_weight_after;
}

LossWeights loss_weights_at(const LossSchedule& ls, const LrSchedule& lr, int64_t step) {
  LossWeights w;
  w.mtp = mtp_weight_at(ls, lr, step);
  w.balance_alpha = ls.balance_alpha;
  return w;
}

}  // namespace dsv4
