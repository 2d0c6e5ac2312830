// ModelConfig: release config.json (HF keys), native inference keys, transformers form, presets, validation.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "runtime/error.h"

namespace dsv4 {
namespace {

using nlohmann::json;

// The V4-Flash release config.json (shared/reference/dsv4-architecture.md §1.1).
json flash_release_json() {
  std::vector<int> ratios = {0, 0};
  for (int i = 0; i < 20; ++i) ratios.insert(ratios.end(), {4, 128});
  ratios.insert(ratios.end(), {4, 0});
  return json{{"architectures", {"DeepseekV4ForCausalLM"}}, {"model_type", "deepseek_v4"},
              {"attention_bias", false}, {"bos_token_id", 0}, {"eos_token_id", 1}, {"hc_eps", 1e-6}, {"hc_mult", 4},
              {"hc_sinkhorn_iters", 20}, {"head_dim", 512}, {"hidden_act", "silu"}, {"hidden_size", 4096},
              {"index_head_dim", 128}, {"index_n_heads", 64}, {"index_topk", 512},
              {"max_position_embeddings", 1048576}, {"moe_intermediate_size", 2048}, {"n_routed_experts", 256},
              {"n_shared_experts", 1}, {"norm_topk_prob", true}, {"num_attention_heads", 64},
              {"num_experts_per_tok", 6}, {"num_hidden_layers", 43}, {"num_hash_layers", 3},
              {"num_key_value_heads", 1}, {"num_nextn_predict_layers", 1}, {"o_groups", 8}, {"o_lora_rank", 1024},
              {"q_lora_rank", 1024}, {"qk_rope_head_dim", 64},
              {"quantization_config",
               {{"activation_scheme", "dynamic"}, {"fmt", "e4m3"}, {"quant_method", "fp8"}, {"scale_fmt", "ue8m0"},
                {"weight_block_size", {128, 128}}}},
              {"rms_norm_eps", 1e-6},
              {"rope_scaling",
               {{"beta_fast", 32}, {"beta_slow", 1}, {"factor", 16}, {"original_max_position_embeddings", 65536},
                {"type", "yarn"}}},
              {"rope_theta", 10000}, {"routed_scaling_factor", 1.5}, {"scoring_func", "sqrtsoftplus"},
              {"sliding_window", 128}, {"swiglu_limit", 10.0}, {"tie_word_embeddings", false},
              {"topk_method", "noaux_tc"}, {"torch_dtype", "bfloat16"}, {"vocab_size", 129280},
              {"compress_rope_theta", 160000}, {"compress_ratios", ratios}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ModelConfig, FlashReleaseJsonMatchesPreset) {
  const ModelConfig c = model_config_from_json_text(flash_release_json().dump(), "flash/config.json");
  const ModelConfig p = model_preset("flash");
  EXPECT_EQ(c.dim, 4096);
  EXPECT_EQ(c.n_layers, 43);
  EXPECT_EQ(c.rope_head_dim, 64);
  EXPECT_EQ(c.window_size, 128);
  EXPECT_EQ(c.compress_ratios, p.compress_ratios);
  EXPECT_EQ(c.compress_ratios.size(), 44u);
  EXPECT_DOUBLE_EQ(c.yarn.factor, 16);
  EXPECT_EQ(c.yarn.original_seq_len, 65536);
  EXPECT_TRUE(c.yarn.enabled);
  EXPECT_EQ(c.scale_fmt, "ue8m0");
  EXPECT_EQ(c.to_json().size(), [&] { ModelConfig q = p; q.name = c.name; return q.to_json().size(); }());
  // Schedule of §1.4: layers 0-1 SWA, even CSA, odd HCA, layer 42 CSA, MTP SWA; layers 0-2 hash-routed.
  EXPECT_EQ(c.attn_kind(0), AttnKind::SlidingWindow);
  EXPECT_EQ(c.attn_kind(1), AttnKind::SlidingWindow);
  EXPECT_EQ(c.attn_kind(2), AttnKind::CompressedSparse);
  EXPECT_EQ(c.attn_kind(3), AttnKind::HeavilyCompressed);
  EXPECT_EQ(c.attn_kind(42), AttnKind::CompressedSparse);
  EXPECT_EQ(c.attn_kind(43), AttnKind::SlidingWindow);  // MTP block
  int csa = 0, hca = 0, swa = 0;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const AttnKind k = c.attn_kind(l);
    csa += k == AttnKind::CompressedSparse;
    hca += k == AttnKind::HeavilyCompressed;
    swa += k == AttnKind::SlidingWindow;
  }
  EXPECT_EQ(csa, 21);
  EXPECT_EQ(hca, 20);
  EXPECT_EQ(swa, 2);
  EXPECT_EQ(c.router_kind(2), RouterKind::Hash);
  EXPECT_EQ(c.router_kind(3), RouterKind::Learned);
  EXPECT_THROW(c.compress_ratio(44), Error);
}

TEST(ModelConfig, ProPresetSchedule) {
  const ModelConfig p = model_preset("pro");
  EXPECT_EQ(p.compress_ratios.size(), 62u);
  int csa = 0, hca = 0;
  for (int64_t l = 0; l < p.n_layers; ++l) {
    csa += p.attn_kind(l) == AttnKind::CompressedSparse;
    hca += p.attn_kind(l) == AttnKind::HeavilyCompressed;
  }
  EXPECT_EQ(csa, 30);
  EXPECT_EQ(hca, 31);
  EXPECT_EQ(p.heads_per_group(), 8);
}

TEST(ModelConfig, NativeKeysRoundTrip) {
  for (const std::string& name : model_preset_names()) {
    const ModelConfig p = model_preset(name);
    const ModelConfig back = model_config_from_json_text(p.to_json(), name);
    EXPECT_EQ(back.to_json(), p.to_json()) << name;
  }
}

TEST(ModelConfig, TransformersFormLayerTypes) {
  json j = {{"hidden_size", 64},        {"num_hidden_layers", 4},   {"num_attention_heads", 4},
            {"head_dim", 32},           {"partial_rotary_factor", 0.25}, {"q_lora_rank", 32},
            {"o_groups", 2},            {"o_lora_rank", 16},        {"sliding_window", 8},
            {"vocab_size", 128},        {"n_routed_experts", 8},    {"num_experts_per_tok", 2},
            {"moe_intermediate_size", 32}, {"index_n_heads", 2},    {"index_head_dim", 16},
            {"index_topk", 2},
            {"layer_types", {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                             "compressed_sparse_attention"}},
            {"mlp_layer_types", {"hash_moe", "hash_moe", "moe", "moe"}},
            {"compress_rates", {{"compressed_sparse_attention", 4}, {"heavily_compressed_attention", 8}}},
            {"rope_parameters",
             {{"main", {{"rope_type", "default"}, {"rope_theta", 10000.0}}},
              {"compress",
               {{"rope_type", "yarn"}, {"rope_theta", 160000.0}, {"factor", 4.0},
                {"original_max_position_embeddings", 64}, {"beta_fast", 32}, {"beta_slow", 1}}}}}};
  const ModelConfig c = model_config_from_json_text(j.dump(), "hf.json");
  EXPECT_EQ(c.rope_head_dim, 8);
  EXPECT_EQ(c.compress_ratios, (std::vector<int64_t>{0, 4, 8, 4, 0}));
  EXPECT_EQ(c.n_hash_layers, 2);
  EXPECT_EQ(c.yarn.original_seq_len, 64);
  EXPECT_DOUBLE_EQ(c.compress_rope_theta, 160000.0);
  j["mlp_layer_types"] = {"moe", "hash_moe", "moe", "moe"};
  EXPECT_NE(error_of([&] { model_config_from_json_text(j.dump(), "hf.json"); }).find("prefix"), std::string::npos);
  j["mlp_layer_types"] = {"hash_moe", "moe", "moe", "moe"};
  j["layer_types"][2] = "full_attention";
  EXPECT_NE(error_of([&] { model_config_from_json_text(j.dump(), "hf.json"); }).find("'layer_types[2]' = 'full_attention'"),
            std::string::npos);
}

TEST(ModelConfig, DefaultPatternWithoutRatios) {
  json j = flash_release_json();
  j.erase("compress_ratios");
  j["num_hidden_layers"] = 6;
  const ModelConfig c = model_config_from_json_text(j.dump(), "x.json");
  EXPECT_EQ(c.compress_ratios, (std::vector<int64_t>{128, 128, 128, 4, 128, 4, 0}));
}

TEST(ModelConfig, ValidationNamesTheKey) {
  json j = flash_release_json();
  j["o_groups"] = 6;
  EXPECT_NE(error_of([&] { model_config_from_json_text(j.dump(), "bad.json"); })
                .find("bad.json: 'o_groups' = 6 must divide n_heads = 64"),
            std::string::npos);
  j = flash_release_json();
  j["qk_rope_head_dim"] = 63;
  EXPECT_NE(error_of([&] { model_config_from_json_text(j.dump(), "bad.json"); }).find("'rope_head_dim' = 63"),
            std::string::npos);
  j = flash_release_json();
  j["compress_ratios"][3] = 64 + 1;
  EXPECT_NE(error_of([&] { model_config_from_json_text(j.dump(), "bad.json"); }).find("'compress_ratios[3]' = 65"),
            std::string::npos);
  j = flash_release_json();
  j["hidden_size"] = "4096";
  EXPECT_NE(error_of([&] { model_config_from_json_text(j.dump(), "bad.json"); }).find("'hidden_size' must be an integer"),
            std::string::npos);
  j = flash_release_json();
  j["num_key_value_heads"] = 8;
  EXPECT_NE(error_of([&] { model_config_from_json_text(j.dump(), "bad.json"); }).find("num_key_value_heads"),
            std::string::npos);
  j = flash_release_json();
  j["compress_ratios"] = {0, 0, 4};
  EXPECT_NE(error_of([&] { model_config_from_json_text(j.dump(), "bad.json"); }).find("3 entries"), std::string::npos);
  EXPECT_NE(error_of([&] { model_config_from_json_text("{not json", "broken.json"); }).find("broken.json: not valid JSON"),
            std::string::npos);
  EXPECT_NE(error_of([] { model_preset("flash-lora"); }).find("tiny, small, proxy-2b, flash, pro"), std::string::npos);
  EXPECT_NE(error_of([] { load_model_config("/nonexistent/config.json"); }).find("/nonexistent/config.json"),
            std::string::npos);
}

TEST(ModelConfig, TransformersTorchDtypeIsNotTheWeightFormat) {
  json j = flash_release_json();
  j["dtype"] = "float32";
  EXPECT_EQ(model_config_from_json_text(j.dump(), "hf.json").weight_dtype, "fp8");
  j["dtype"] = "bf16";
  EXPECT_EQ(model_config_from_json_text(j.dump(), "native.json").weight_dtype, "bf16");
}

TEST(ModelConfig, BaseCheckpointScalesAreFp32) {
  json j = flash_release_json();
  j["quantization_config"]["scale_fmt"] = nullptr;
  EXPECT_EQ(model_config_from_json_text(j.dump(), "base.json").scale_fmt, "fp32");
}

TEST(ModelConfig, TinyPresetExercisesEveryPath) {
  const ModelConfig t = model_preset("tiny");
  EXPECT_EQ(t.attn_kind(0), AttnKind::SlidingWindow);
  EXPECT_EQ(t.attn_kind(1), AttnKind::CompressedSparse);
  EXPECT_EQ(t.attn_kind(2), AttnKind::HeavilyCompressed);
  EXPECT_EQ(t.router_kind(0), RouterKind::Hash);
  EXPECT_EQ(t.router_kind(3), RouterKind::Learned);
  EXPECT_EQ(t.n_mtp_layers, 1);
  EXPECT_LE(t.vocab_size, 2048);
}

}  // namespace
}  // namespace dsv4
