// CPU twins of runtime/model_ops.h against the model and optimizer code they mirror: bitwise.
#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <random>

#include "model/embedding.h"
#include "model/layers.h"
#include "optim/update_rules.h"
#include "runtime/model_ops.h"

namespace dsv4 {
namespace {

Tensor randn(const Shape& s, uint32_t seed, float lo = -1, float hi = 1) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(s.numel()));
  for (auto& x : v) x = d(gen);
  return Tensor::from_vector<float>(s, v);
}

void expect_bits(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.shape(), b.shape());
  ASSERT_EQ(a.nbytes(), b.nbytes());
  EXPECT_EQ(std::memcmp(a.contiguous().raw_data(), b.contiguous().raw_data(), static_cast<size_t>(a.nbytes())), 0);
}

TEST(ModelOpsCpu, RmsNormMatchesLayer) {
  RMSNorm norm("n", 37, 1e-6);
  norm.weight.value = randn({37}, 1, 0.5f, 1.5f);
  norm.weight.grad = Tensor::zeros({37}, DType::F32);
  const Tensor x = randn({5, 37}, 2), dy = randn({5, 37}, 3);
  RMSNormCtx ctx;
  const Tensor y = norm.forward(x, &ctx);
  const Tensor dx = norm.backward(dy, ctx);
  const auto f = rmsnorm_forward(x, norm.weight.value, 1e-6);
  expect_bits(f.y, y);
  const auto b = rmsnorm_backward(dy, x, norm.weight.value, f.rstd);
  expect_bits(b.dx, dx);
  expect_bits(b.dw, norm.weight.grad);
}

// cross_entropy runs on the ce_* partials; checked here against an independent evaluation in long double.
TEST(ModelOpsCpu, CrossEntropyPartialsGiveTheLossAndGradient) {
  const Tensor z = randn({6, 50}, 4, -5, 5);
  const Tensor y = Tensor::from_vector<int64_t>({6}, {3, 49, kIgnoreIndex, 0, 17, 17});
  const auto r = cross_entropy(z, y, true);
  long double total = 0;
  int64_t counted = 0;
  std::vector<long double> lse(6);
  for (int64_t t = 0; t < 6; ++t) {
    long double s = 0;
    for (int64_t v = 0; v < 50; ++v) s += std::exp(static_cast<long double>(z.data<float>()[t * 50 + v]));
    lse[static_cast<size_t>(t)] = std::log(s);
    const int64_t yt = y.data<int64_t>()[t];
    if (yt == kIgnoreIndex) continue;
    ++counted;
    total += lse[static_cast<size_t>(t)] - z.data<float>()[t * 50 + yt];
  }
  EXPECT_EQ(r.counted, counted);
  EXPECT_NEAR(r.loss, static_cast<double>(total / counted), 1e-12 * static_cast<double>(total));
  for (int64_t t = 0; t < 6; ++t)
    for (int64_t v = 0; v < 50; ++v) {
      const int64_t yt = y.data<int64_t>()[t];
      long double g = 0;
      if (yt != kIgnoreIndex)
        g = (std::exp(z.data<float>()[t * 50 + v] - lse[static_cast<size_t>(t)]) - (v == yt ? 1.0L : 0.0L)) / counted;
      EXPECT_NEAR(r.dlogits_TV.data<float>()[t * 50 + v], static_cast<double>(g), 1e-7) << t << "," << v;
    }
}

TEST(ModelOpsCpu, OptimizerStepsMatchUpdateRules) {
  const int64_t n = 300;
  const Tensor w0 = randn({n}, 5), g = randn({n}, 6), m0 = randn({n}, 7, -0.1f, 0.1f), v0 = randn({n}, 8, 0, 0.01f);
  AdamWConfig cfg;
  Tensor w1 = w0.clone(), m1 = m0.clone(), v1 = v0.clone();
  adamw_update(w1.data<float>(), g.data<float>(), m1.data<float>(), v1.data<float>(), n, 4, 1e-3, cfg);
  Tensor w2 = w0.clone(), m2 = m0.clone(), v2 = v0.clone();
  adamw_step(w2, g, m2, v2, adamw_scalars(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, 4, 1e-3));
  expect_bits(w2, w1);
  expect_bits(m2, m1);
  expect_bits(v2, v1);
  // Muon end to end: momentum, NS, apply on a [12, 25] matrix.
  MuonConfig mc;
  Tensor wa = randn({12, 25}, 9), ga = randn({12, 25}, 10), ma = randn({12, 25}, 11);
  Tensor wb = wa.clone(), mb = ma.clone();
  muon_update(wa.data<float>(), ga.data<float>(), ma.data<float>(), 12, 25, 1, 0.02, mc);
  Tensor u = Tensor::empty({12, 25}, DType::F32);
  muon_momentum_step(ga, mb, u, static_cast<float>(mc.momentum), mc.nesterov);
  newton_schulz_batched(u, mc.ns_schedule, mc.ns_eps);
  muon_apply_step(wb, u, muon_apply_scalars(0.02, mc.weight_decay, mc.update_scale, 12, 25));
  expect_bits(mb, ma);
  expect_bits(wb, wa);
}

TEST(ModelOpsCpu, ConvertToBf16IsTheExactRounding) {
  const std::vector<Tensor> xs = {randn({5}, 3), randn({0}, 4), randn({3, 7}, 5)};
  std::vector<Tensor> ys;
  for (const Tensor& x : xs) ys.push_back(Tensor::empty(x.shape(), DType::BF16));
  convert_to_bf16(xs, ys);
  for (size_t i = 0; i < xs.size(); ++i) expect_bits(ys[i], xs[i].to(DType::BF16));
  EXPECT_THROW(convert_to_bf16(xs, {ys[0]}), Error);
  EXPECT_THROW(convert_to_bf16({xs[0]}, {xs[0]}), Error);  // the output must be BF16
}

// The list forms check every list against the first one and name the mismatch.
TEST(ModelOpsCpu, OptimizerListFormsCheckTheirLists) {
  const Tensor a = randn({4}, 1), b = randn({5}, 2);
  try {
    muon_apply_steps({a, b}, {a.clone(), a.clone()}, MuonApplyScalars{});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("o[1]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(muon_momentum_steps({a}, {a.clone(), a.clone()}, {a.clone()}, 0.9f, true), Error);
  EXPECT_THROW(adamw_steps({a}, {a}, {a.clone()}, {a.clone()}, {}), Error);  // no scalars
  EXPECT_THROW(sum_squares({a, Tensor::zeros({2}, DType::I64)}), Error);
}

TEST(ModelOpsCpu, NewtonSchulzBatchedIsThePerMatrixRoutine) {
  // Wide, tall and square batches in both precisions: each matrix exactly newton_schulz(..., precision).
  for (NsPrecision prec : {NsPrecision::F32, NsPrecision::BF16})
    for (auto [B, r, c] : {std::array<int64_t, 3>{3, 7, 20}, {2, 20, 7}, {2, 9, 9}}) {
      const Tensor x = randn({B, r, c}, 12);
      Tensor batched = x.clone();
      newton_schulz_batched(batched, hybrid_ns_schedule(), 1e-7, prec);
      Tensor single = x.clone();
      for (int64_t b = 0; b < B; ++b) {
        float* m = single.data<float>() + b * r * c;
        newton_schulz(m, m, r, c, hybrid_ns_schedule(), 1e-7, prec);
      }
      expect_bits(batched, single);
      if (prec == NsPrecision::BF16)  // every output is a BF16 value
        for (float v : batched.to_floats()) ASSERT_EQ(v, round_bf16(v));
    }
}

TEST(ModelOpsCpu, SortPermuteUnpermute) {
  // T = 3, K = 2, E = 4: expert 1 and 3 empty, a token routed twice to expert 2.
  const Tensor idx = Tensor::from_vector<int64_t>({3, 2}, {2, 0, 2, 2, 0, 2});
  const auto s = moe_sort_slots(idx, 4);
  EXPECT_EQ(std::vector<int64_t>(s.offsets.data<int64_t>(), s.offsets.data<int64_t>() + 5), (std::vector<int64_t>{0, 2, 2, 6, 6}));
  EXPECT_EQ(std::vector<int64_t>(s.sorted_slot.data<int64_t>(), s.sorted_slot.data<int64_t>() + 6), (std::vector<int64_t>{1, 4, 0, 2, 3, 5}));
  const Tensor x = Tensor::from_vector<float>({3, 1}, {10, 20, 30});
  EXPECT_EQ(moe_permute(x, s.sorted_slot, 2).to_floats(), (std::vector<float>{10, 30, 10, 20, 20, 30}));
  const Tensor ys = Tensor::from_vector<float>({6, 1}, {1, 2, 3, 4, 5, 6});
  EXPECT_EQ(moe_unpermute(ys, s.sorted_slot, Tensor(), 3, 2).to_floats(), (std::vector<float>{4, 9, 8}));
}

}  // namespace
}  // namespace dsv4
