// LR schedules (warm-up, WSD, cosine, constant) at key steps, and the MTP / balance loss-weight schedule.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "optim/schedule.h"

namespace dsv4 {
namespace {

TEST(LrSchedule, WsdKeySteps) {
  LrSchedule s;
  s.decay = LrDecay::WSD;
  s.peak_lr = 2.7e-4;
  s.min_lr = 2.7e-5;
  s.warmup_steps = 2000;
  s.decay_start = 8000;
  s.total_steps = 10000;
  s.validate();
  EXPECT_DOUBLE_EQ(s.lr_at(0), 2.7e-4 / 2000);
  EXPECT_DOUBLE_EQ(s.lr_at(999), 2.7e-4 * 1000 / 2000);
  EXPECT_DOUBLE_EQ(s.lr_at(1999), 2.7e-4);
  EXPECT_DOUBLE_EQ(s.lr_at(2000), 2.7e-4);
  EXPECT_DOUBLE_EQ(s.lr_at(5000), 2.7e-4);
  EXPECT_DOUBLE_EQ(s.lr_at(7999), 2.7e-4);
  EXPECT_DOUBLE_EQ(s.lr_at(8000), 2.7e-4);                    // decay starts at peak
  EXPECT_NEAR(s.lr_at(9000), (2.7e-4 + 2.7e-5) / 2, 1e-18);   // halfway down the cosine
  EXPECT_NEAR(s.lr_at(8500), 2.7e-5 + 2.43e-4 * 0.5 * (1 + std::cos(std::numbers::pi / 4)), 1e-18);
  EXPECT_GT(s.lr_at(9999), 2.7e-5);
  EXPECT_DOUBLE_EQ(s.lr_at(10000), 2.7e-5);
  EXPECT_DOUBLE_EQ(s.lr_at(123456), 2.7e-5);
  EXPECT_EQ(s.decay_begin(), 8000);
  for (int64_t t = 8000; t < 10000; ++t) EXPECT_LE(s.lr_at(t + 1), s.lr_at(t)) << t;  // monotone decay
}

TEST(LrSchedule, CosineAndConstant) {
  LrSchedule s;
  s.decay = LrDecay::Cosine;
  s.peak_lr = 1.0;
  s.min_lr = 0.1;
  s.warmup_steps = 10;
  s.total_steps = 110;
  s.validate();
  EXPECT_DOUBLE_EQ(s.lr_at(0), 0.1);
  EXPECT_DOUBLE_EQ(s.lr_at(9), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_at(10), 1.0);  // decay starts right after warm-up
  EXPECT_NEAR(s.lr_at(60), 0.55, 1e-15);
  EXPECT_NEAR(s.lr_at(35), 0.1 + 0.9 * 0.5 * (1 + std::cos(std::numbers::pi / 4)), 1e-15);
  EXPECT_DOUBLE_EQ(s.lr_at(110), 0.1);
  EXPECT_EQ(s.decay_begin(), 10);
  // No warm-up.
  s.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(s.lr_at(0), 1.0);
  EXPECT_NEAR(s.lr_at(55), 0.55, 1e-15);
  // Constant after warm-up; min_lr unused.
  LrSchedule c;
  c.decay = LrDecay::Constant;
  c.peak_lr = 3e-4;
  c.min_lr = 0;
  c.warmup_steps = 4;
  c.total_steps = 10;
  c.validate();
  EXPECT_DOUBLE_EQ(c.lr_at(1), 1.5e-4);
  EXPECT_DOUBLE_EQ(c.lr_at(4), 3e-4);
  EXPECT_DOUBLE_EQ(c.lr_at(1000), 3e-4);
  EXPECT_THROW(c.lr_at(-1), Error);
}

TEST(LrSchedule, Validation) {
  LrSchedule s;
  s.peak_lr = 1e-3;
  s.min_lr = 1e-4;
  s.warmup_steps = 10;
  s.decay_start = 5;  // before warm-up ends
  s.total_steps = 100;
  EXPECT_THROW(s.validate(), Error);
  s.decay_start = 101;
  EXPECT_THROW(s.validate(), Error);
  s.decay_start = 50;
  s.validate();
  s.min_lr = 2e-3;
  EXPECT_THROW(s.validate(), Error);
  EXPECT_EQ(lr_decay_from_name("wsd"), LrDecay::WSD);
  EXPECT_EQ(lr_decay_name(LrDecay::Cosine), "cosine");
  EXPECT_THROW(lr_decay_from_name("linear"), Error);
}

TEST(LossSchedule, MtpWeightDropsWhenDecayStarts) {
  LrSchedule lr;
  lr.decay = LrDecay::WSD;
  lr.peak_lr = 1e-3;
  lr.min_lr = 1e-4;
  lr.warmup_steps = 10;
  lr.decay_start = 80;
  lr.total_steps = 100;
  LossSchedule ls;
  ls.validate();
  EXPECT_DOUBLE_EQ(mtp_weight_at(ls, lr, 0), 0.3);
  EXPECT_DOUBLE_EQ(mtp_weight_at(ls, lr, 79), 0.3);
  EXPECT_DOUBLE_EQ(mtp_weight_at(ls, lr, 80), 0.1);
  EXPECT_DOUBLE_EQ(mtp_weight_at(ls, lr, 500), 0.1);
  const LossWeights w = loss_weights_at(ls, lr, 85);
  EXPECT_DOUBLE_EQ(w.mtp, 0.1);
  EXPECT_DOUBLE_EQ(w.balance_alpha, 1e-4);
  // Explicit switch step, other weights.
  ls.mtp_switch_step = 20;
  ls.mtp_weight = 1.0;
  ls.mtp_weight_after = 0.5;
  EXPECT_DOUBLE_EQ(mtp_weight_at(ls, lr, 19), 1.0);
  EXPECT_DOUBLE_EQ(mtp_weight_at(ls, lr, 20), 0.5);
  // Cosine decays from the end of warm-up; constant never switches.
  LossSchedule d;
  lr.decay = LrDecay::Cosine;
  EXPECT_DOUBLE_EQ(mtp_weight_at(d, lr, 9), 0.3);
  EXPECT_DOUBLE_EQ(mtp_weight_at(d, lr, 10), 0.1);
  lr.decay = LrDecay::Constant;
  EXPECT_DOUBLE_EQ(mtp_weight_at(d, lr, 1000000), 0.3);
  d.balance_alpha = -1;
  EXPECT_THROW(d.validate(), Error);
}

}  // namespace
}  // namespace dsv4
