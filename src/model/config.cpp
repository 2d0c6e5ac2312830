#include "model/config.h"

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/error.h"

namespace dsv4 {

using nlohmann::json;

std::string attn_kind_name(AttnKind k) {
  switch (k) {
    case AttnKind::SlidingWindow: return "sliding_attention";
    case AttnKind::CompressedSparse: return "compressed_sparse_attention";
    case AttnKind::HeavilyCompressed: return "heavily_compressed_attention";
  }
  return "?";
}

int64_t ModelConfig::compress_ratio(int64_t layer) const {
  DSV4_CHECK(layer >= 0 && layer < static_cast<int64_t>(compress_ratios.size()),
             "layer {} outside the {} layers (main + MTP) of {}", layer, compress_ratios.size(), name);
  return compress_ratios[static_cast<size_t>(layer)];
}

AttnKind ModelConfig::attn_kind(int64_t layer) const {
  const int64_t m = compress_ratio(layer);
  return m == 0 ? AttnKind::SlidingWindow : m == 4 ? AttnKind::CompressedSparse : AttnKind::HeavilyCompressed;
}

namespace {

const char* score_func_name(ScoreFunc f) {
  switch (f) {
    case ScoreFunc::SqrtSoftplus: return "sqrtsoftplus";
    case ScoreFunc::Softmax: return "softmax";
    case ScoreFunc::Sigmoid: return "sigmoid";
  }
  return "?";
}

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

}  // namespace

void ModelConfig::validate(const std::string& source) const {
  auto positive = [&](const char* key, int64_t v) {
    DSV4_CHECK(v > 0, "{}: '{}' = {} must be a positive integer", source, key, v);
  };
  positive("vocab_size", vocab_size);
  positive("dim", dim);
  positive("n_layers", n_layers);
  positive("n_heads", n_heads);
  positive("head_dim", head_dim);
  positive("q_lora_rank", q_lora_rank);
  positive("o_groups", o_groups);
  positive("o_lora_rank", o_lora_rank);
  positive("window_size", window_size);
  positive("n_routed_experts", n_routed_experts);
  positive("n_activated_experts", n_activated_experts);
  positive("moe_inter_dim", moe_inter_dim);
  positive("hc_mult", hc_mult);
  positive("hc_sinkhorn_iters", hc_sinkhorn_iters);
  DSV4_CHECK(rope_head_dim > 0 && rope_head_dim % 2 == 0 && rope_head_dim <= head_dim,
             "{}: 'rope_head_dim' = {} must be even and in (0, head_dim = {}]", source, rope_head_dim, head_dim);
  DSV4_CHECK(n_heads % o_groups == 0, "{}: 'o_groups' = {} must divide n_heads = {}", source, o_groups, n_heads);
  DSV4_CHECK(n_activated_experts <= n_routed_experts, "{}: 'n_activated_experts' = {} exceeds n_routed_experts = {}",
             source, n_activated_experts, n_routed_experts);
  DSV4_CHECK(n_shared_experts == 1, "{}: 'n_shared_experts' = {}; DeepSeek-V4 has exactly one shared expert", source,
             n_shared_experts);
  DSV4_CHECK(n_hash_layers >= 0 && n_hash_layers <= n_layers, "{}: 'n_hash_layers' = {} must be in [0, n_layers = {}]",
             source, n_hash_layers, n_layers);
  DSV4_CHECK(n_mtp_layers >= 0, "{}: 'n_mtp_layers' = {} must be >= 0", source, n_mtp_layers);
  DSV4_CHECK(static_cast<int64_t>(compress_ratios.size()) == n_layers + n_mtp_layers,
             "{}: 'compress_ratios' has {} entries, expected n_layers + n_mtp_layers = {}", source,
             compress_ratios.size(), n_layers + n_mtp_layers);
  bool any_csa = false;
  for (size_t i = 0; i < compress_ratios.size(); ++i) {
    const int64_t m = compress_ratios[i];
    DSV4_CHECK(m == 0 || m == 4 || (m >= 8 && is_pow2(m)),
               "{}: 'compress_ratios[{}]' = {}: expected 0 (sliding window), 4 (CSA) or a power of two >= 8 (HCA)",
               source, i, m);
    any_csa |= m == 4;
  }
  if (any_csa) {
    positive("index_n_heads", index_n_heads);
    positive("index_topk", index_topk);
    DSV4_CHECK(is_pow2(index_head_dim) && index_head_dim >= rope_head_dim,
               "{}: 'index_head_dim' = {} must be a power of two (Hadamard rotation) and >= rope_head_dim = {}", source,
               index_head_dim, rope_head_dim);
  }
  DSV4_CHECK(hc_eps > 0 && norm_eps > 0, "{}: 'hc_eps' and 'norm_eps' must be > 0 (got {}, {})", source, hc_eps,
             norm_eps);
  DSV4_CHECK(route_scale > 0, "{}: 'route_scale' = {} must be > 0", source, route_scale);
  DSV4_CHECK(swiglu_limit >= 0, "{}: 'swiglu_limit' = {} must be >= 0 (0 disables the clamp)", source, swiglu_limit);
  DSV4_CHECK(rope_theta > 0 && compress_rope_theta > 0, "{}: 'rope_theta' and 'compress_rope_theta' must be > 0",
             source);
  if (yarn.enabled)
    DSV4_CHECK(yarn.factor >= 1 && yarn.original_seq_len > 0 && yarn.beta_fast > yarn.beta_slow && yarn.beta_slow > 0,
               "{}: 'rope_scaling' (yarn) needs factor >= 1, original_max_position_embeddings > 0 and beta_fast > "
               "beta_slow > 0 (got {}, {}, {}, {})",
               source, yarn.factor, yarn.original_seq_len, yarn.beta_fast, yarn.beta_slow);
  DSV4_CHECK(bos_token_id >= 0 && bos_token_id < vocab_size && eos_token_id >= 0 && eos_token_id < vocab_size,
             "{}: bos/eos ids {}/{} must be inside the vocabulary ({})", source, bos_token_id, eos_token_id, vocab_size);
  DSV4_CHECK(weight_dtype == "fp8" || weight_dtype == "bf16", "{}: 'dtype' = '{}': expected fp8 or bf16", source,
             weight_dtype);
  DSV4_CHECK(expert_dtype == "fp4" || expert_dtype == "fp8" || expert_dtype == "bf16",
             "{}: 'expert_dtype' = '{}': expected fp4, fp8 or bf16", source, expert_dtype);
  DSV4_CHECK(scale_fmt == "ue8m0" || scale_fmt == "fp32", "{}: 'scale_fmt' = '{}': expected ue8m0 or fp32", source,
             scale_fmt);
}

std::string ModelConfig::to_json() const {
  json j = {
      {"name", name},
      {"vocab_size", vocab_size},
      {"dim", dim},
      {"n_layers", n_layers},
      {"n_heads", n_heads},
      {"head_dim", head_dim},
      {"rope_head_dim", rope_head_dim},
      {"q_lora_rank", q_lora_rank},
      {"o_groups", o_groups},
      {"o_lora_rank", o_lora_rank},
      {"window_size", window_size},
      {"compress_ratios", compress_ratios},
      {"n_routed_experts", n_routed_experts},
      {"n_activated_experts", n_activated_experts},
      {"n_shared_experts", n_shared_experts},
      {"moe_inter_dim", moe_inter_dim},
      {"n_hash_layers", n_hash_layers},
      {"score_func", score_func_name(score_func)},
      {"route_scale", route_scale},
      {"swiglu_limit", swiglu_limit},
      {"index_n_heads", index_n_heads},
      {"index_head_dim", index_head_dim},
      {"index_topk", index_topk},
      {"hc_mult", hc_mult},
      {"hc_sinkhorn_iters", hc_sinkhorn_iters},
      {"hc_eps", hc_eps},
      {"norm_eps", norm_eps},
      {"rope_theta", rope_theta},
      {"compress_rope_theta", compress_rope_theta},
      {"n_mtp_layers", n_mtp_layers},
      {"bos_token_id", bos_token_id},
      {"eos_token_id", eos_token_id},
      {"tie_word_embeddings", tie_word_embeddings},
      {"dtype", weight_dtype},
      {"expert_dtype", expert_dtype},
      {"scale_fmt", scale_fmt},
  };
  if (yarn.enabled) {
    j["rope_factor"] = yarn.factor;
    j["original_seq_len"] = yarn.original_seq_len;
    j["beta_fast"] = yarn.beta_fast;
    j["beta_slow"] = yarn.beta_slow;
  } else {
    j["original_seq_len"] = 0;  // native convention: no YaRN
  }
  return j.dump(2);
}

namespace {

// Reads typed values by one of several key spellings (native name first), with errors naming the key.
class Reader {
 public:
  Reader(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  const json* find(std::initializer_list<const char*> keys, std::string* found = nullptr) const {
    for (const char* k : keys) {
      auto it = j_.find(k);
      if (it != j_.end() && !it->is_null()) {
        if (found) *found = k;
        return &*it;
      }
    }
    return nullptr;
  }
  void integer(std::initializer_list<const char*> keys, int64_t& out) const {
    std::string key;
    if (const json* v = find(keys, &key)) {
      DSV4_CHECK(v->is_number_integer(), "{}: '{}' must be an integer, got {}", source_, key, v->dump());
      out = v->get<int64_t>();
    }
  }
  void number(std::initializer_list<const char*> keys, double& out) const {
    std::string key;
    if (const json* v = find(keys, &key)) {
      DSV4_CHECK(v->is_number(), "{}: '{}' must be a number, got {}", source_, key, v->dump());
      out = v->get<double>();
    }
  }
  void boolean(std::initializer_list<const char*> keys, bool& out) const {
    std::string key;
    if (const json* v = find(keys, &key)) {
      DSV4_CHECK(v->is_boolean(), "{}: '{}' must be true or false, got {}", source_, key, v->dump());
      out = v->get<bool>();
    }
  }
  void string(std::initializer_list<const char*> keys, std::string& out) const {
    std::string key;
    if (const json* v = find(keys, &key)) {
      DSV4_CHECK(v->is_string(), "{}: '{}' must be a string, got {}", source_, key, v->dump());
      out = v->get<std::string>();
    }
  }
  std::vector<std::string> string_list(const char* key) const {
    const json* v = find({key});
    if (!v) return {};
    DSV4_CHECK(v->is_array(), "{}: '{}' must be a list of strings", source_, key);
    std::vector<std::string> out;
    for (const auto& e : *v) {
      DSV4_CHECK(e.is_string(), "{}: '{}' must be a list of strings, found {}", source_, key, e.dump());
      out.push_back(e.get<std::string>());
    }
    return out;
  }
  const std::string& source() const { return source_; }

 private:
  const json& j_;
  std::string source_;
};

}  // namespace

ModelConfig model_config_from_json_text(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    DSV4_FAIL("{}: not valid JSON: {}", source, e.what());
  }
  DSV4_CHECK(j.is_object(), "{}: expected a JSON object at the top level", source);
  Reader r(j, source);
  ModelConfig c;
  c.name = source;
  r.integer({"vocab_size"}, c.vocab_size);
  r.integer({"dim", "hidden_size"}, c.dim);
  r.integer({"n_layers", "num_hidden_layers"}, c.n_layers);
  r.integer({"n_heads", "num_attention_heads"}, c.n_heads);
  r.integer({"head_dim"}, c.head_dim);
  r.integer({"rope_head_dim", "qk_rope_head_dim"}, c.rope_head_dim);
  if (const json* prf = r.find({"partial_rotary_factor"}); prf && !r.find({"rope_head_dim", "qk_rope_head_dim"})) {
    DSV4_CHECK(prf->is_number(), "{}: 'partial_rotary_factor' must be a number", source);
    c.rope_head_dim = static_cast<int64_t>(static_cast<double>(c.head_dim) * prf->get<double>());
  }
  r.integer({"q_lora_rank"}, c.q_lora_rank);
  r.integer({"o_groups"}, c.o_groups);
  r.integer({"o_lora_rank"}, c.o_lora_rank);
  r.integer({"window_size", "sliding_window"}, c.window_size);
  r.integer({"n_routed_experts", "num_local_experts"}, c.n_routed_experts);
  r.integer({"n_activated_experts", "num_experts_per_tok"}, c.n_activated_experts);
  r.integer({"n_shared_experts"}, c.n_shared_experts);
  r.integer({"moe_inter_dim", "moe_intermediate_size", "intermediate_size"}, c.moe_inter_dim);
  r.integer({"n_hash_layers", "num_hash_layers"}, c.n_hash_layers);
  r.number({"route_scale", "routed_scaling_factor"}, c.route_scale);
  r.number({"swiglu_limit"}, c.swiglu_limit);
  r.integer({"index_n_heads"}, c.index_n_heads);
  r.integer({"index_head_dim"}, c.index_head_dim);
  r.integer({"index_topk"}, c.index_topk);
  r.integer({"hc_mult"}, c.hc_mult);
  r.integer({"hc_sinkhorn_iters"}, c.hc_sinkhorn_iters);
  r.number({"hc_eps"}, c.hc_eps);
  r.number({"norm_eps", "rms_norm_eps"}, c.norm_eps);
  r.number({"rope_theta"}, c.rope_theta);
  r.number({"compress_rope_theta"}, c.compress_rope_theta);
  r.integer({"n_mtp_layers", "num_nextn_predict_layers"}, c.n_mtp_layers);
  r.integer({"bos_token_id"}, c.bos_token_id);
  r.integer({"eos_token_id"}, c.eos_token_id);
  r.boolean({"tie_word_embeddings"}, c.tie_word_embeddings);
  // "dtype" is the release's weight format (fp8 / bf16) in native configs but the torch dtype in transformers
  // configs (float32, bfloat16, ...), which says nothing about the checkpoint format: keep the default then.
  std::string dtype = c.weight_dtype;
  r.string({"dtype"}, dtype);
  if (dtype != "float32" && dtype != "bfloat16" && dtype != "float16" && dtype != "float") c.weight_dtype = dtype;
  r.string({"expert_dtype"}, c.expert_dtype);
  r.string({"scale_fmt"}, c.scale_fmt);
  std::string score = "sqrtsoftplus";
  r.string({"score_func", "scoring_func"}, score);
  if (score == "sqrtsoftplus") c.score_func = ScoreFunc::SqrtSoftplus;
  else if (score == "softmax") c.score_func = ScoreFunc::Softmax;
  else if (score == "sigmoid") c.score_func = ScoreFunc::Sigmoid;
  else DSV4_FAIL("{}: 'scoring_func' = '{}': expected sqrtsoftplus, softmax or sigmoid", source, score);

  if (const json* kvh = r.find({"num_key_value_heads"})) {
    DSV4_CHECK(kvh->is_number_integer() && kvh->get<int64_t>() == 1,
               "{}: 'num_key_value_heads' = {}: DeepSeek-V4 uses one shared K=V head", source, kvh->dump());
  }
  if (const json* q = r.find({"quantization_config"})) {
    DSV4_CHECK(q->is_object(), "{}: 'quantization_config' must be an object", source);
    // Instruct releases say "ue8m0" (E8M0 block scales); base releases store F32 scales (null / absent).
    if (auto it = q->find("scale_fmt"); it != q->end()) c.scale_fmt = it->is_string() ? it->get<std::string>() : "fp32";
    if (auto it = q->find("weight_block_size"); it != q->end())
      DSV4_CHECK(*it == json::array({128, 128}), "{}: 'quantization_config.weight_block_size' = {}: expected [128, 128]",
                 source, it->dump());
  }

  // RoPE / YaRN: native flat keys, the HF rope_scaling dict, or the transformers rope_parameters.compress dict.
  int64_t original_seq_len = c.yarn.original_seq_len;
  r.integer({"original_seq_len"}, original_seq_len);
  r.number({"rope_factor"}, c.yarn.factor);
  r.number({"beta_fast"}, c.yarn.beta_fast);
  r.number({"beta_slow"}, c.yarn.beta_slow);
  if (r.find({"original_seq_len"})) c.yarn.enabled = original_seq_len > 0;
  c.yarn.original_seq_len = original_seq_len;
  auto read_yarn = [&](const json& d, const std::string& key) {
    DSV4_CHECK(d.is_object(), "{}: '{}' must be an object", source, key);
    Reader y(d, source + ":" + key);
    std::string type = "default";
    y.string({"type", "rope_type"}, type);
    c.yarn.enabled = type == "yarn";
    DSV4_CHECK(type == "yarn" || type == "default", "{}: '{}.type' = '{}': expected yarn or default", source, key,
               type);
    y.number({"factor"}, c.yarn.factor);
    y.integer({"original_max_position_embeddings"}, c.yarn.original_seq_len);
    y.number({"beta_fast"}, c.yarn.beta_fast);
    y.number({"beta_slow"}, c.yarn.beta_slow);
    y.number({"rope_theta"}, c.compress_rope_theta);
  };
  if (const json* rs = r.find({"rope_scaling"})) read_yarn(*rs, "rope_scaling");
  if (const json* rp = r.find({"rope_parameters"})) {
    DSV4_CHECK(rp->is_object(), "{}: 'rope_parameters' must be an object", source);
    if (rp->contains("compress")) {
      read_yarn(rp->at("compress"), "rope_parameters.compress");
      if (rp->contains("main") && rp->at("main").contains("rope_theta"))
        c.rope_theta = rp->at("main").at("rope_theta").get<double>();
    } else {
      read_yarn(*rp, "rope_parameters");
    }
  }

  // Per-layer attention: compress_ratios (native / release), else layer_types (transformers), else the
  // transformers default pattern.
  const int64_t total = c.n_layers + c.n_mtp_layers;
  if (const json* cr = r.find({"compress_ratios"})) {
    DSV4_CHECK(cr->is_array(), "{}: 'compress_ratios' must be a list of integers", source);
    for (const auto& e : *cr) {
      DSV4_CHECK(e.is_number_integer(), "{}: 'compress_ratios' must be a list of integers, found {}", source, e.dump());
      c.compress_ratios.push_back(e.get<int64_t>());
    }
    DSV4_CHECK(static_cast<int64_t>(c.compress_ratios.size()) >= c.n_layers,
               "{}: 'compress_ratios' has {} entries but the model has {} layers", source, c.compress_ratios.size(),
               c.n_layers);
    // Entries past the main layers belong to MTP blocks (missing ones are sliding-window, as in the release);
    // later releases append draft-model stages, which this model does not instantiate.
    c.compress_ratios.resize(static_cast<size_t>(total), 0);
  } else {
    int64_t csa = 4, hca = 128;
    if (const json* rates = r.find({"compress_rates"})) {
      Reader rr(*rates, source + ":compress_rates");
      rr.integer({"compressed_sparse_attention"}, csa);
      rr.integer({"heavily_compressed_attention"}, hca);
    }
    r.integer({"compress_rate_csa"}, csa);
    r.integer({"compress_rate_hca"}, hca);
    const auto types = r.string_list("layer_types");
    if (!types.empty()) {
      DSV4_CHECK(static_cast<int64_t>(types.size()) >= c.n_layers, "{}: 'layer_types' has {} entries, expected {}",
                 source, types.size(), c.n_layers);
      for (int64_t i = 0; i < c.n_layers; ++i) {
        const std::string& t = types[static_cast<size_t>(i)];
        if (t == "sliding_attention") c.compress_ratios.push_back(0);
        else if (t == "compressed_sparse_attention") c.compress_ratios.push_back(csa);
        else if (t == "heavily_compressed_attention") c.compress_ratios.push_back(hca);
        else
          DSV4_FAIL("{}: 'layer_types[{}]' = '{}': expected sliding_attention, compressed_sparse_attention or "
                    "heavily_compressed_attention",
                    source, i, t);
      }
    } else {
      for (int64_t i = 0; i < c.n_layers; ++i) c.compress_ratios.push_back(i < 2 ? hca : ((i - 2) % 2 ? csa : hca));
    }
    c.compress_ratios.resize(static_cast<size_t>(total), 0);
  }
  // Hash-routed layers from mlp_layer_types (transformers form): a prefix of "hash_moe", then "moe".
  const auto mlp_types = r.string_list("mlp_layer_types");
  if (!mlp_types.empty()) {
    int64_t n_hash = 0;
    bool seen_moe = false;
    for (size_t i = 0; i < mlp_types.size() && static_cast<int64_t>(i) < c.n_layers; ++i) {
      const std::string& t = mlp_types[i];
      DSV4_CHECK(t == "hash_moe" || t == "moe", "{}: 'mlp_layer_types[{}]' = '{}': expected hash_moe or moe", source, i,
                 t);
      DSV4_CHECK(!(t == "hash_moe" && seen_moe),
                 "{}: 'mlp_layer_types[{}]' = hash_moe after a moe layer: hash routing must be a prefix", source, i);
      seen_moe |= t == "moe";
      n_hash += t == "hash_moe";
    }
    c.n_hash_layers = n_hash;
  }
  c.validate(source);
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  std::ifstream in(path);
  DSV4_CHECK(in.good(), "cannot open model config '{}'", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return model_config_from_json_text(ss.str(), path);
}

namespace {

std::vector<int64_t> ratios(std::initializer_list<int64_t> head, std::initializer_list<int64_t> repeat, int64_t times,
                            std::initializer_list<int64_t> tail) {
  std::vector<int64_t> v(head);
  for (int64_t t = 0; t < times; ++t) v.insert(v.end(), repeat);
  v.insert(v.end(), tail);
  return v;
}

ModelConfig flash() {
  ModelConfig c;  // the defaults are V4-Flash's released values
  c.name = "flash";
  c.compress_ratios = ratios({0, 0}, {4, 128}, 20, {4, 0});
  return c;
}

ModelConfig pro() {
  ModelConfig c = flash();
  c.name = "pro";
  c.dim = 7168;
  c.n_layers = 61;
  c.n_heads = 128;
  c.q_lora_rank = 1536;
  c.o_groups = 16;
  c.index_topk = 1024;
  c.moe_inter_dim = 3072;
  c.n_routed_experts = 384;
  c.route_scale = 2.5;
  c.compress_ratios = ratios({128, 128}, {4, 128}, 29, {4, 0});
  return c;
}

// Proxies of shared/design/BENCHMARKS.md: V4's shape rules, smaller width/depth/experts.
ModelConfig proxy(const char* name, int64_t dim, int64_t layers, int64_t heads, int64_t q_lora, int64_t groups,
                  int64_t o_lora, int64_t experts, int64_t inter, int64_t index_heads, int64_t index_dim,
                  int64_t index_topk) {
  ModelConfig c = flash();
  c.name = name;
  c.dim = dim;
  c.n_layers = layers;
  c.n_heads = heads;
  c.q_lora_rank = q_lora;
  c.o_groups = groups;
  c.o_lora_rank = o_lora;
  c.n_routed_experts = experts;
  c.moe_inter_dim = inter;
  c.index_n_heads = index_heads;
  c.index_head_dim = index_dim;
  c.index_topk = index_topk;
  c.compress_ratios = {0, 0};  // SWA, SWA, then CSA/HCA alternating, then MTP (SWA)
  for (int64_t i = 2; i < layers; ++i) c.compress_ratios.push_back(i % 2 == 0 ? 4 : 128);
  c.compress_ratios.push_back(0);
  return c;
}

ModelConfig tiny() {
  ModelConfig c = flash();
  c.name = "tiny";
  c.vocab_size = 2048;
  c.dim = 64;
  c.n_layers = 4;
  c.n_heads = 4;
  c.head_dim = 32;
  c.rope_head_dim = 8;
  c.q_lora_rank = 32;
  c.o_groups = 2;
  c.o_lora_rank = 16;
  c.window_size = 8;
  c.compress_ratios = {0, 4, 8, 4, 0};  // SWA, CSA, HCA, CSA, MTP
  c.n_routed_experts = 8;
  c.n_activated_experts = 2;
  c.moe_inter_dim = 32;
  c.index_n_heads = 2;
  c.index_head_dim = 16;
  c.index_topk = 2;
  c.yarn.original_seq_len = 64;  // so YaRN's ramp is active at the tiny sequence lengths
  c.yarn.factor = 4;
  return c;
}

}  // namespace

std::vector<std::string> model_preset_names() { return {"tiny", "small", "proxy-2b", "flash", "pro"}; }

ModelConfig model_preset(const std::string& name) {
  ModelConfig c;
  if (name == "flash") c = flash();
  else if (name == "pro") c = pro();
  else if (name == "tiny") c = tiny();
  else if (name == "small") c = proxy("small", 256, 6, 4, 128, 2, 64, 16, 128, 4, 64, 16);
  else if (name == "proxy-2b") c = proxy("proxy-2b", 2048, 8, 16, 512, 4, 512, 32, 1024, 16, 128, 512);
  else
    DSV4_FAIL("unknown model preset '{}' (expected one of: tiny, small, proxy-2b, flash, pro)", name);
  c.validate("preset " + name);
  return c;
}

}  // namespace dsv4
