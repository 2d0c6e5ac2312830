// Learning-rate and loss-weight schedules, as functions of the optimizer step s = 0, 1, 2, ... (the index of the
// update about to be applied; the first update uses lr_at(0)).
//
//   warm-up   s < W:          lr = peak * (s + 1) / W                 (linear; W = 0 disables it)
//   WSD       W <= s < D:     lr = peak                               (stable until decay_start D)
//             D <= s:         lr = min + (peak - min) * (1 + cos(pi * p)) / 2,   p = min(1, (s - D) / (total - D))
//   cosine    as WSD with D = W (decay right after warm-up)
//   constant  lr = peak after warm-up (min_lr unused)
// so lr = peak at s = D and lr = min_lr from s = total on.
//
// DeepSeek-V4 (report, dsv4-architecture.md §4): warm-up 2000 steps, constant, cosine to 0.1 x peak near the end;
// the MTP loss weight is 0.3 and drops to 0.1 when the LR decay starts; the sequence-wise balance loss weight is 1e-4.
#pragma once

#include <cstdint>
#include <string_view>

#include "model/model.h"

namespace dsv4 {

enum class LrDecay : uint8_t { Constant, Cosine, WSD };
std::string_view lr_decay_name(LrDecay d);          // "constant", "cosine", "wsd"
LrDecay lr_decay_from_name(std::string_view name);  // throws naming the valid names

struct LrSchedule {
  LrDecay decay = LrDecay::WSD;
  double peak_lr = 2.7e-4;
  double min_lr = 2.7e-5;
  int64_t warmup_steps = 0;
  int64_t decay_start = 0;  // WSD only: first step of the cosine decay (>= warmup_steps, <= total_steps)
  int64_t total_steps = 1;  // decay ends here (lr = min_lr from this step on)

  void validate() const;  // throws naming the bad field
  double lr_at(int64_t step) const;
  // First step of the decay: decay_start (WSD), warmup_steps (cosine), never = INT64_MAX (constant).
  int64_t decay_begin() const;
};

struct LossSchedule {
  double mtp_weight = 0.3;              // before the switch
  double mtp_weight_after = 0.1;        // from the switch on
  int64_t mtp_switch_step = -1;         // < 0: when the LR decay starts (LrSchedule::decay_begin)
  double balance_alpha = 1e-4;          // sequence-wise balance loss weight (constant)

  void validate() const;
};

double mtp_weight_at(const LossSchedule& ls, const LrSchedule& lr, int64_t step);
LossWeights loss_weights_at(const LossSchedule& ls, const LrSchedule& lr, int64_t step);

}  // namespace dsv4
