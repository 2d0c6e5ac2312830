// Embedding, cross-entropy with ignore index, label shifting, HF <-> native names.
#include <gtest/gtest.h>

#include "fd_check.h"
#include "model/embedding.h"
#include "model/hf_names.h"

namespace dsv4 {
namespace {

TEST(Embedding, LookupAndGradientAccumulatesDuplicates) {
  Embedding emb("embed.weight", 5, 3);
  emb.weight.value = Tensor::from_floats({5, 3}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14});
  const Tensor ids = Tensor::from_vector<int64_t>({3}, {4, 1, 4});
  EXPECT_EQ(emb.forward(ids).to_floats(), (std::vector<float>{12, 13, 14, 3, 4, 5, 12, 13, 14}));
  emb.backward(Tensor::from_floats({3, 3}, {1, 1, 1, 2, 2, 2, 3, 3, 3}), ids);
  const auto g = emb.weight.grad.to_floats();
  EXPECT_EQ(std::vector<float>(g.begin() + 12, g.end()), (std::vector<float>{4, 4, 4}));
  EXPECT_EQ(std::vector<float>(g.begin() + 3, g.begin() + 6), (std::vector<float>{2, 2, 2}));
  EXPECT_EQ(g[0], 0.0f);
  EXPECT_THROW(emb.forward(Tensor::from_vector<int64_t>({1}, {5})), Error);
}

TEST(CrossEntropy, MatchesHandComputationAndIgnoresPadding) {
  const Tensor logits = Tensor::from_floats({3, 3}, {1, 2, 3, 0, 0, 0, 5, -1, 2});
  const Tensor targets = Tensor::from_vector<int64_t>({3}, {2, kIgnoreIndex, 0});
  const auto r = cross_entropy(logits, targets, true);
  const double l0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)) - 3.0;
  const double l2 = std::log(std::exp(5.0) + std::exp(-1.0) + std::exp(2.0)) - 5.0;
  EXPECT_EQ(r.counted, 2);
  EXPECT_NEAR(r.loss, (l0 + l2) / 2, 1e-6);
  const auto g = r.dlogits_TV.to_floats();
  EXPECT_EQ(g[3], 0.0f);  // ignored row has no gradient
  double row_sum = 0;
  for (int v = 0; v < 3; ++v) row_sum += g[v];
  EXPECT_NEAR(row_sum, 0.0, 1e-7);
  Tensor z = logits.clone();
  testing::fd_check_tensor("ce logits", z, r.dlogits_TV, [&] { return cross_entropy(z, targets, false).loss; }, 1e-2, 1e-4,
                           1e-2);
  // Explicit normaliser (sum / N), and all-ignored batches give 0 without NaN.
  EXPECT_NEAR(cross_entropy(logits, targets, false, 4.0).loss, (l0 + l2) / 4, 1e-6);
  const auto none = cross_entropy(logits, Tensor::from_vector<int64_t>({3}, {-100, -100, -100}), true);
  EXPECT_EQ(none.loss, 0.0);
  EXPECT_THROW(cross_entropy(logits, Tensor::from_vector<int64_t>({3}, {0, 3, 0}), false), Error);
}

TEST(CrossEntropy, ShiftTargetsWithinRows) {
  const Tensor labels = Tensor::from_vector<int64_t>({6}, {10, 11, 12, 20, 21, 22});
  const Tensor t1 = shift_targets(labels, 2, 3, 1), t2 = shift_targets(labels, 2, 3, 2);
  EXPECT_EQ(std::vector<int64_t>(t1.data<int64_t>(), t1.data<int64_t>() + 6),
            (std::vector<int64_t>{11, 12, -100, 21, 22, -100}));
  EXPECT_EQ(std::vector<int64_t>(t2.data<int64_t>(), t2.data<int64_t>() + 6),
            (std::vector<int64_t>{12, -100, -100, 22, -100, -100}));
}

TEST(HfNames, SingleNamesBothWays) {
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"embed.weight", "model.embed_tokens.weight"},
      {"hc_head_fn", "model.hc_head.hc_fn"},
      {"layers.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"},
      {"layers.2.hc_ffn_scale", "model.layers.2.ffn_hc.scale"},
      {"layers.1.attn.wq_b.weight", "model.layers.1.self_attn.q_b_proj.weight"},
      {"layers.1.attn.attn_sink", "model.layers.1.self_attn.sinks"},
      {"layers.1.attn.compressor.ape", "model.layers.1.self_attn.compressor.position_bias"},
      {"layers.1.attn.indexer.compressor.norm.weight", "model.layers.1.self_attn.compressor.indexer.kv_norm.weight"},
      {"layers.1.attn.indexer.weights_proj.weight",
       "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight"},
      {"layers.3.ffn.gate.bias", "model.layers.3.mlp.gate.e_score_correction_bias"},
      {"layers.3.ffn.shared_experts.w3.weight", "model.layers.3.mlp.shared_experts.up_proj.weight"},
  };
  for (const auto& [native, hf] : pairs) {
    EXPECT_EQ(native_to_hf_name(native), hf) << native;
    EXPECT_EQ(hf_to_native_name(hf), native) << hf;
  }
  EXPECT_FALSE(native_to_hf_name("mtp.0.e_proj.weight").has_value());
  EXPECT_FALSE(native_to_hf_name("layers.0.ffn.experts.3.w1.weight").has_value());
  EXPECT_FALSE(hf_to_native_name("model.layers.0.self_attn.nonexistent").has_value());
}

TEST(HfNames, StackedExpertsSplitAndRestack) {
  // E=2, I=2, D=3: gate_up [2, 4, 3] = cat(w1, w3) per expert; down [2, 3, 2].
  std::vector<float> gu(24), dn(12);
  for (int i = 0; i < 24; ++i) gu[i] = static_cast<float>(i);
  for (int i = 0; i < 12; ++i) dn[i] = static_cast<float>(100 + i);
  std::map<std::string, Tensor> hf = {
      {"model.layers.0.mlp.experts.gate_up_proj", Tensor::from_floats({2, 4, 3}, gu)},
      {"model.layers.0.mlp.experts.down_proj", Tensor::from_floats({2, 3, 2}, dn)},
      {"model.norm.weight", Tensor::from_floats({3}, {1, 1, 1})},
  };
  const auto native = hf_state_to_native(hf);
  EXPECT_EQ(native.size(), 7u);
  EXPECT_EQ(native.at("layers.0.ffn.experts.1.w1.weight").to_floats(), (std::vector<float>{12, 13, 14, 15, 16, 17}));
  EXPECT_EQ(native.at("layers.0.ffn.experts.1.w3.weight").to_floats(), (std::vector<float>{18, 19, 20, 21, 22, 23}));
  EXPECT_EQ(native.at("layers.0.ffn.experts.0.w2.weight").shape(), (Shape{3, 2}));
  const auto back = native_state_to_hf(native);
  EXPECT_EQ(back.size(), 3u);
  EXPECT_EQ(back.at("model.layers.0.mlp.experts.gate_up_proj").to_floats(), gu);
  EXPECT_EQ(back.at("model.layers.0.mlp.experts.down_proj").to_floats(), dn);
  EXPECT_THROW(hf_state_to_native({{"model.layers.0.bogus", Tensor::from_floats({1}, {0})}}), Error);
}

}  // namespace
}  // namespace dsv4

#include "model/flops.h"

namespace dsv4 {
namespace {

TEST(Flops, CountsMatmulsAndVisibleKeys) {
  // A hand-checkable config: 1 SWA layer, no MTP, seq 4 with window 2 -> keys per position 1, 2, 2, 2.
  ModelConfig c = model_preset("tiny");
  c.n_layers = 1;
  c.n_mtp_layers = 0;
  c.n_hash_layers = 0;
  c.compress_ratios = {0};
  c.window_size = 2;
  const FlopsPerToken f = model_flops_per_token(c, 4);
  const double D = 64, n = 4, H = 4, hd = 32, I = 32, k = 2, E = 8, V = 2048;
  const double params = 2 * n * D * (2 + n) * n + D * 32 + 32 * H * hd + D * hd + H * hd * 16 + 2 * 16 * D + D * E +
                        D * 3 * I + k * D * 3 * I + n * D * n + D * V;
  EXPECT_DOUBLE_EQ(f.active_params, params);
  EXPECT_DOUBLE_EQ(f.mean_visible_keys, 7.0 / 4.0);
  EXPECT_DOUBLE_EQ(f.attention, 2 * 2 * H * hd * 7.0 / 4.0);
  EXPECT_DOUBLE_EQ(f.forward, 2 * params + f.attention);
  EXPECT_DOUBLE_EQ(f.training(), 3 * f.forward);
  // Flash at 4K: about 13B active parameters per token (the release number, embedding excluded) plus MTP.
  const FlopsPerToken flash = model_flops_per_token(model_preset("flash"), 4096);
  EXPECT_GT(flash.active_params, 12e9);
  EXPECT_LT(flash.active_params, 15e9);
}

}  // namespace
}  // namespace dsv4
