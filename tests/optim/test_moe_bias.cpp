// Aux-loss-free MoE bias update: signs against the mean load, learned-routing layers only.
#include <gtest/gtest.h>

#include <random>

#include "optim/moe_bias.h"

namespace dsv4 {
namespace {

TEST(MoeBias, SignOfMeanMinusLoad) {
  Param b("layers.3.ffn.gate.bias", Shape{6});
  b.value.copy_from(Tensor::from_floats(Shape{6}, {0.0f, 0.5f, -0.25f, 1.0f, 0.0f, 0.125f}));
  // Mean = (10 + 2 + 5 + 5 + 0 + 8) / 6 = 5: overloaded 10, 8 -> -speed; under 2, 0 -> +speed; at the mean 5 -> 0.
  update_expert_bias(b, {10, 2, 5, 5, 0, 8}, 0.001);
  const std::vector<float> want = {0.0f - 0.001f, 0.5f + 0.001f, -0.25f, 1.0f, 0.0f + 0.001f, 0.125f - 0.001f};
  EXPECT_EQ(b.value.to_floats(), want);
  // Non-integer mean (7/3): loads 3 > mean, 2 < mean; no rounding can make them "equal".
  Param c("x", Shape{3});
  update_expert_bias(c, {3, 2, 2}, 0.5);
  EXPECT_EQ(c.value.to_floats(), (std::vector<float>{-0.5f, 0.5f, 0.5f}));
  // Uniform load: nothing moves. Speed 0 disables.
  update_expert_bias(c, {4, 4, 4}, 0.5);
  EXPECT_EQ(c.value.to_floats(), (std::vector<float>{-0.5f, 0.5f, 0.5f}));
  update_expert_bias(c, {9, 0, 0}, 0.0);
  EXPECT_EQ(c.value.to_floats(), (std::vector<float>{-0.5f, 0.5f, 0.5f}));
  EXPECT_THROW(update_expert_bias(c, {1, 2}, 0.1), Error);
  EXPECT_THROW(update_expert_bias(c, {1, -2, 3}, 0.1), Error);
}

TEST(MoeBias, LargeLoadsKeepExactSigns) {
  // Loads near 2^40: the integer rule (sum - E * load_i) decides; a float mean would lose the difference of 1.
  Param b("x", Shape{3});
  const int64_t big = int64_t{1} << 40;
  update_expert_bias(b, {big + 1, big, big - 1}, 0.25);
  EXPECT_EQ(b.value.to_floats(), (std::vector<float>{-0.25f, 0.0f, 0.25f}));
}

TEST(MoeBias, ModelUpdatesLearnedLayersFromForwardStats) {
  ModelConfig cfg = model_preset("tiny");
  cfg.vocab_size = 64;
  Model model(cfg);
  model.init_random(3, 0.2);
  const SeqLayout layout(2, 12);
  std::mt19937 rng(5);
  std::vector<int64_t> ids(static_cast<size_t>(layout.tokens()));
  for (auto& x : ids) x = static_cast<int64_t>(rng() % 64);
  const Tensor ids_T = Tensor::from_vector<int64_t>({layout.tokens()}, ids);
  // Two micro-batches' loads summed.
  std::vector<std::vector<int64_t>> acc;
  for (int mb = 0; mb < 2; ++mb) {
    const ModelOutput out = model.forward(ids_T, layout, nullptr);
    ASSERT_EQ(out.moe_stats.size(), model.layers.size() + model.mtp.size());
    accumulate_moe_loads(acc, out.moe_stats);
  }
  std::vector<MoE*> moes;
  for (auto& b : model.layers) moes.push_back(&b->ffn);
  for (auto& m : model.mtp) moes.push_back(&m->block.ffn);
  std::vector<std::vector<float>> before;
  int64_t learned = 0;
  for (MoE* m : moes) {
    before.push_back(m->gate_bias.value.defined() ? m->gate_bias.value.to_floats() : std::vector<float>{});
    learned += !m->hash_routed();
  }
  for (size_t l = 0; l < acc.size(); ++l) {
    int64_t sum = 0;
    for (int64_t x : acc[l]) sum += x;
    EXPECT_EQ(sum, 2 * layout.tokens() * cfg.n_activated_experts) << "layer " << l;
  }
  EXPECT_GT(learned, 0);
  EXPECT_EQ(update_moe_biases(model, acc, 0.001), learned);
  for (size_t l = 0; l < moes.size(); ++l) {
    if (moes[l]->hash_routed()) {
      EXPECT_FALSE(moes[l]->gate_bias.value.defined());
      continue;
    }
    const std::vector<float> after = moes[l]->gate_bias.value.to_floats();
    int64_t sum = 0;
    for (int64_t x : acc[l]) sum += x;
    const int64_t E = static_cast<int64_t>(acc[l].size());
    for (size_t e = 0; e < after.size(); ++e) {
      const int64_t d = sum - E * acc[l][e];
      const float want = d > 0 ? before[l][e] + 0.001f : d < 0 ? before[l][e] - 0.001f : before[l][e];
      EXPECT_EQ(after[e], want) << "layer " << l << " expert " << e;
    }
  }
  // Count mismatch is an error naming both counts.
  acc.pop_back();
  EXPECT_THROW(update_moe_biases(model, acc, 0.001), Error);
}

}  // namespace
}  // namespace dsv4
