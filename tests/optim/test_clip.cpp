// Global gradient-norm clipping and NaN/Inf detection.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "optim/clip.h"
#include "optim_test_util.h"

namespace dsv4 {
namespace {

std::vector<Param> make_params() {
  std::vector<Param> ps;
  ps.emplace_back("a.weight", Shape{3, 4});
  ps.emplace_back("b.bias", Shape{5});
  ps.emplace_back("frozen.weight", Shape{2, 2});
  ps.emplace_back("nograd.weight", Shape{2, 2});
  uint32_t seed = 1;
  for (Param& p : ps) {
    if (p.name == "nograd.weight") continue;
    const std::vector<float> g = testing::randn(static_cast<size_t>(p.value.numel()), seed++);
    p.grad_buffer().copy_from(Tensor::from_floats(p.value.shape(), g));
  }
  ps[2].trainable = false;
  return ps;
}

double norm_of(std::vector<Param>& ps, bool trainable_only = true) {
  double s = 0;
  for (Param& p : ps) {
    if (!p.grad.defined() || (trainable_only && !p.trainable)) continue;
    for (float v : p.grad.to_floats()) s += static_cast<double>(v) * v;
  }
  return std::sqrt(s);
}

std::vector<Param*> ptrs(std::vector<Param>& ps) {
  std::vector<Param*> out;
  for (Param& p : ps) out.push_back(&p);
  return out;
}

TEST(Clip, ScalesToMaxNormExactly) {
  std::vector<Param> ps = make_params();
  const double before = norm_of(ps);
  const std::vector<float> frozen_before = ps[2].grad.to_floats();
  const std::vector<float> a_before = ps[0].grad.to_floats();
  const double max_norm = before / 3;
  const ClipResult r = clip_grad_norm(ptrs(ps), max_norm);
  EXPECT_TRUE(r.finite);
  EXPECT_TRUE(r.clipped);
  EXPECT_NEAR(r.norm, before, 1e-12 * before);  // the pre-clip norm, over trainable params only
  EXPECT_DOUBLE_EQ(r.scale, max_norm / r.norm);
  EXPECT_NEAR(norm_of(ps), max_norm, 1e-6 * max_norm);
  EXPECT_EQ(ps[2].grad.to_floats(), frozen_before);  // untrainable: untouched
  const std::vector<float> a_after = ps[0].grad.to_floats();
  for (size_t i = 0; i < a_after.size(); ++i) EXPECT_EQ(a_after[i], a_before[i] * static_cast<float>(r.scale));
}

TEST(Clip, BelowThresholdOrDisabledLeavesGradients) {
  std::vector<Param> ps = make_params();
  const std::vector<float> a = ps[0].grad.to_floats();
  const double n = norm_of(ps);
  ClipResult r = clip_grad_norm(ptrs(ps), n * 2);
  EXPECT_FALSE(r.clipped);
  EXPECT_EQ(r.scale, 1.0);
  EXPECT_NEAR(r.norm, n, 1e-12 * n);
  EXPECT_EQ(ps[0].grad.to_floats(), a);
  r = clip_grad_norm(ptrs(ps), 0.0);  // measure only
  EXPECT_FALSE(r.clipped);
  EXPECT_EQ(ps[0].grad.to_floats(), a);
  // Hand-computed norm on a known gradient.
  std::vector<Param> one;
  one.emplace_back("x", Shape{2});
  one[0].grad_buffer().copy_from(Tensor::from_floats(Shape{2}, {3.0f, 4.0f}));
  r = clip_grad_norm(ptrs(one), 1.0);
  EXPECT_DOUBLE_EQ(r.norm, 5.0);
  EXPECT_EQ(one[0].grad.to_floats(), (std::vector<float>{0.6f, 0.8f}));
}

TEST(Clip, NonFiniteNamesTheParamAndDoesNotScale) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<Param> ps = make_params();
    ps[1].grad.data<float>()[2] = bad;
    const std::vector<float> a = ps[0].grad.to_floats();
    const ClipResult r = clip_grad_norm(ptrs(ps), 1e-3);
    EXPECT_FALSE(r.finite);
    EXPECT_FALSE(r.clipped);
    EXPECT_EQ(r.bad_param, "b.bias");
    EXPECT_EQ(r.bad_params, 1);
    EXPECT_FALSE(std::isfinite(r.norm));
    EXPECT_EQ(ps[0].grad.to_floats(), a);
  }
  // Two bad params: the first in order is named, both counted. A NaN in a frozen param is ignored.
  std::vector<Param> ps = make_params();
  ps[0].grad.data<float>()[0] = std::numeric_limits<float>::infinity();
  ps[1].grad.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  ps[2].grad.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  const GradNorm g = grad_sq_norm(ptrs(ps));
  EXPECT_EQ(g.bad_param, "a.weight");
  EXPECT_EQ(g.bad_params, 2);
  std::vector<Param> ok = make_params();
  ok[2].grad.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(grad_sq_norm(ptrs(ok)).finite);
}

}  // namespace
}  // namespace dsv4
