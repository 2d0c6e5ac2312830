// ModelConfig: the shape of a DeepSeek-V4 model, read from a release config.json (native DeepSeek keys or the
// Hugging Face transformers form) or taken from a named preset, and validated with errors that name the key.
#pragma once

#include <string>
#include <vector>

namespace dsv4 {

enum class AttnKind { SlidingWindow, CompressedSparse, HeavilyCompressed };  // SWA (m=0), CSA (m=4), HCA (m>4)
enum class RouterKind { Hash, Learned };
enum class ScoreFunc { SqrtSoftplus, Softmax, Sigmoid };

struct YarnConfig {
  bool enabled = true;          // applies to the compressed layers' RoPE only
  double factor = 16.0;
  int64_t original_seq_len = 65536;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

struct ModelConfig {
  std::string name = "custom";
  int64_t vocab_size = 129280;
  int64_t dim = 4096;              // hidden_size
  int64_t n_layers = 43;           // main layers (MTP blocks not counted)
  int64_t n_heads = 64;
  int64_t head_dim = 512;          // q, shared K=V, compressed entries
  int64_t rope_head_dim = 64;      // RoPE on the last rope_head_dim dims
  int64_t q_lora_rank = 1024;
  int64_t o_groups = 8;
  int64_t o_lora_rank = 1024;
  int64_t window_size = 128;       // sliding window incl. the query itself
  // One entry per main layer, then one per MTP block: 0 = SWA, 4 = CSA, > 4 = HCA.
  std::vector<int64_t> compress_ratios;
  int64_t n_routed_experts = 256;
  int64_t n_activated_experts = 6;
  int64_t n_shared_experts = 1;
  int64_t moe_inter_dim = 2048;    // routed and shared experts
  int64_t n_hash_layers = 3;       // layers [0, n_hash_layers) route by token id (tid2eid)
  ScoreFunc score_func = ScoreFunc::SqrtSoftplus;
  double route_scale = 1.5;
  double swiglu_limit = 10.0;
  int64_t index_n_heads = 64;
  int64_t index_head_dim = 128;
  int64_t index_topk = 512;
  int64_t hc_mult = 4;
  int64_t hc_sinkhorn_iters = 20;
  double hc_eps = 1e-6;
  double norm_eps = 1e-6;
  double rope_theta = 10000.0;           // SWA-only layers
  double compress_rope_theta = 160000.0; // CSA / HCA layers
  YarnConfig yarn;
  int64_t n_mtp_layers = 1;
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  bool tie_word_embeddings = false;
  // On-disk formats of the release ("fp8" dense weights; experts "fp4" in instruct, "fp8" in base checkpoints).
  std::string weight_dtype = "fp8";
  std::string expert_dtype = "fp4";
  std::string scale_fmt = "ue8m0";  // "ue8m0" (E8M0 block scales) or "fp32"

  // ---- derived ----
  int64_t compress_ratio(int64_t layer) const;  // layer in [0, n_layers + n_mtp_layers)
  AttnKind attn_kind(int64_t layer) const;
  RouterKind router_kind(int64_t layer) const { return layer < n_hash_layers ? RouterKind::Hash : RouterKind::Learned; }
  int64_t nope_head_dim() const { return head_dim - rope_head_dim; }
  int64_t heads_per_group() const { return n_heads / o_groups; }

  // Throws dsv4::Error naming `source` and the offending key with what was expected.
  void validate(const std::string& source = "model config") const;
  // Canonical JSON in the native key names (round-trips through from_json_text).
  std::string to_json() const;
};

// Parses config.json text (native inference keys, the HF release keys, or the transformers form with
// layer_types / mlp_layer_types / compress_rates). Unknown keys are ignored (release files carry many);
// known keys are type- and range-checked. `source` names the file in errors.
ModelConfig model_config_from_json_text(const std::string& text, const std::string& source = "config.json");
ModelConfig load_model_config(const std::string& path);

// Named presets: "flash", "pro" (release values), "tiny", "small", "proxy-2b" (shapes of
// shared/design/BENCHMARKS.md). Throws naming the valid names for an unknown one.
ModelConfig model_preset(const std::string& name);
std::vector<std::string> model_preset_names();

std::string attn_kind_name(AttnKind k);

}  // namespace dsv4
