// Linear, RMSNorm, RoPE/YaRN: forward against closed forms, backward against finite differences.
#include <gtest/gtest.h>

#include "fd_check.h"
#include "model/layers.h"
#include "model/rope.h"

namespace dsv4 {
namespace {

using testing::dot;
using testing::random_tensor;

TEST(RMSNorm, ForwardMatchesFormula) {
  RMSNorm norm("n.weight", 4, 1e-6);
  norm.weight.value = Tensor::from_floats({4}, {1, 2, 0.5f, -1});
  const Tensor x = Tensor::from_floats({1, 4}, {1, -2, 3, 4});
  const auto y = norm.forward(x, nullptr).to_floats();
  const double rstd = 1.0 / std::sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-6);
  EXPECT_NEAR(y[0], 1 * 1 * rstd, 1e-6);
  EXPECT_NEAR(y[1], -2 * 2 * rstd, 1e-6);
  EXPECT_NEAR(y[2], 3 * 0.5 * rstd, 1e-6);
  EXPECT_NEAR(y[3], 4 * -1 * rstd, 1e-6);
}

TEST(RMSNorm, BackwardDoublePrecisionCore) {
  const int64_t rows = 3, dim = 5;
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<double> x(rows * dim), w(dim), dy(rows * dim);
  for (auto& v : x) v = u(rng);
  for (auto& v : w) v = u(rng);
  for (auto& v : dy) v = u(rng);
  auto loss = [&] {
    std::vector<double> y(rows * dim), rstd(rows);
    rmsnorm_forward_rows<double>(x.data(), w.data(), y.data(), rstd.data(), rows, dim, 1e-6);
    double s = 0;
    for (size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
    return s;
  };
  std::vector<double> y(rows * dim), rstd(rows), dx(rows * dim), dw(dim, 0.0);
  rmsnorm_forward_rows<double>(x.data(), w.data(), y.data(), rstd.data(), rows, dim, 1e-6);
  rmsnorm_backward_rows<double>(dy.data(), x.data(), w.data(), rstd.data(), dx.data(), dw.data(), rows, dim);
  testing::fd_check_double("rmsnorm dx", x, dx, loss);
  testing::fd_check_double("rmsnorm dw", w, dw, loss);
  // Unweighted.
  rmsnorm_backward_rows<double>(dy.data(), x.data(), nullptr, rstd.data(), dx.data(), nullptr, rows, dim);
  auto loss0 = [&] {
    std::vector<double> y0(rows * dim), r0(rows);
    rmsnorm_forward_rows<double>(x.data(), nullptr, y0.data(), r0.data(), rows, dim, 1e-6);
    double s = 0;
    for (size_t i = 0; i < y0.size(); ++i) s += y0[i] * dy[i];
    return s;
  };
  testing::fd_check_double("unweighted rmsnorm dx", x, dx, loss0);
}

TEST(RMSNorm, TensorBackwardAccumulatesWeightGrad) {
  std::mt19937 rng(5);
  RMSNorm norm("n.weight", 6, 1e-6);
  norm.weight.value = random_tensor({6}, rng);
  Tensor x = random_tensor({4, 6}, rng);
  const Tensor dy = random_tensor({4, 6}, rng);
  RMSNormCtx ctx;
  norm.forward(x, &ctx);
  const Tensor dx = norm.backward(dy, ctx);
  const Tensor dw1 = norm.weight.grad.clone();
  norm.backward(dy, ctx);  // accumulates
  const auto g1 = dw1.to_floats(), g2 = norm.weight.grad.to_floats();
  for (size_t i = 0; i < g1.size(); ++i) EXPECT_NEAR(g2[i], 2 * g1[i], 1e-5);
  auto loss = [&] { return dot(norm.forward(x, nullptr), dy); };
  testing::fd_check_tensor("rmsnorm x", x, dx, loss, 1e-2, 1e-3, 1e-2);
  testing::fd_check_tensor("rmsnorm w", norm.weight.value, dw1, loss, 1e-2, 1e-3, 1e-2);
}

TEST(Linear, ForwardBackward) {
  std::mt19937 rng(7);
  Linear lin("l.weight", 5, 3);
  lin.weight.value = random_tensor({3, 5}, rng);
  Tensor x = random_tensor({4, 5}, rng);
  const Tensor dy = random_tensor({4, 3}, rng);
  LinearCtx ctx;
  const Tensor y = lin.forward(x, &ctx);
  // y[t, o] = sum_i x[t, i] W[o, i]
  const auto xv = x.to_floats(), wv = lin.weight.value.to_floats(), yv = y.to_floats();
  for (int t = 0; t < 4; ++t)
    for (int o = 0; o < 3; ++o) {
      double s = 0;
      for (int i = 0; i < 5; ++i) s += static_cast<double>(xv[t * 5 + i]) * wv[o * 5 + i];
      EXPECT_NEAR(yv[t * 3 + o], s, 1e-5);
    }
  const Tensor dx = lin.backward(dy, ctx);
  auto loss = [&] { return dot(lin.forward(x, nullptr), dy); };
  testing::fd_check_tensor("linear x", x, dx, loss, 1e-2, 1e-3, 1e-2);
  testing::fd_check_tensor("linear w", lin.weight.value, lin.weight.grad, loss, 1e-2, 1e-3, 1e-2);
  lin.weight.trainable = false;
  lin.weight.zero_grad();
  lin.backward(dy, ctx);
  for (float g : lin.weight.grad.to_floats()) EXPECT_EQ(g, 0.0f);
}

TEST(Rope, InterleavedRotationOfTheLastDims) {
  RopeTable t = RopeTable::plain(4, 10000.0);
  ASSERT_EQ(t.inv_freq.size(), 2u);
  EXPECT_FLOAT_EQ(t.inv_freq[0], 1.0f);
  EXPECT_FLOAT_EQ(t.inv_freq[1], 0.01f);
  // Row of 6: two untouched "nope" dims, then pairs (2,3) and (4,5) rotated.
  std::vector<float> x = {7, 8, 1, 0, 0, 1};
  const int64_t pos = 3;
  rope_rows<float>(x.data(), 1, 6, 6, &pos, t, false);
  EXPECT_FLOAT_EQ(x[0], 7);
  EXPECT_FLOAT_EQ(x[1], 8);
  EXPECT_NEAR(x[2], std::cos(3.0f), 1e-6);
  EXPECT_NEAR(x[3], std::sin(3.0f), 1e-6);
  EXPECT_NEAR(x[4], -std::sin(0.03f), 1e-6);
  EXPECT_NEAR(x[5], std::cos(0.03f), 1e-6);
  rope_rows<float>(x.data(), 1, 6, 6, &pos, t, true);  // inverse restores
  EXPECT_NEAR(x[2], 1, 1e-6);
  EXPECT_NEAR(x[3], 0, 1e-6);
  EXPECT_NEAR(x[4], 0, 1e-6);
  EXPECT_NEAR(x[5], 1, 1e-6);
}

TEST(Rope, YarnMatchesDeepSeekFormulaForFlash) {
  // Flash: theta 160000, r 64, factor 16, original 65536, beta 32/1: low = 15, high = 25 (reference §2.3).
  const ModelConfig c = model_preset("flash");
  const RopeTable y = RopeTable::for_ratio(c, 4);
  const RopeTable p = RopeTable::plain(64, 160000.0);
  ASSERT_EQ(y.inv_freq.size(), 32u);
  for (int i = 0; i < 32; ++i) {
    const double ramp = std::clamp((i - 15.0) / (25.0 - 15.0), 0.0, 1.0);
    const double expected = p.inv_freq[i] / 16.0 * ramp + p.inv_freq[i] * (1 - ramp);
    EXPECT_NEAR(y.inv_freq[i], expected, 1e-6 * expected) << i;
  }
  // Sliding-window layers use plain RoPE with rope_theta.
  const RopeTable m = RopeTable::for_ratio(c, 0);
  EXPECT_FLOAT_EQ(m.inv_freq[1], 1.0f / std::pow(10000.0f, 2.0f / 64.0f));
}

}  // namespace
}  // namespace dsv4
