#include "model/hf_names.h"

#include <array>
#include <regex>

#include "runtime/ops.h"

namespace dsv4 {

namespace {

// Global names.
constexpr std::array<std::pair<const char*, const char*>, 6> kGlobal = {{
    {"embed.weight", "model.embed_tokens.weight"},
    {"head.weight", "lm_head.weight"},
    {"norm.weight", "model.norm.weight"},
    {"hc_head_fn", "model.hc_head.hc_fn"},
    {"hc_head_base", "model.hc_head.hc_base"},
    {"hc_head_scale", "model.hc_head.hc_scale"},
}};

// Per-layer suffixes after "layers.N." / "model.layers.N.". Longer (more specific) entries first.
constexpr std::array<std::pair<const char*, const char*>, 34> kLayer = {{
    {"attn_norm.weight", "input_layernorm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"hc_attn_fn", "attn_hc.fn"},
    {"hc_attn_base", "attn_hc.base"},
    {"hc_attn_scale", "attn_hc.scale"},
    {"hc_ffn_fn", "ffn_hc.fn"},
    {"hc_ffn_base", "ffn_hc.base"},
    {"hc_ffn_scale", "ffn_hc.scale"},
    {"attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"},
    {"attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"},
    {"attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"},
    {"attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"},
    {"attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"},
    {"attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"},
    {"attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"},
    {"attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"},
    {"attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"},
    {"attn.compressor.ape", "self_attn.compressor.position_bias"},
    {"attn.wq_a.weight", "self_attn.q_a_proj.weight"},
    {"attn.q_norm.weight", "self_attn.q_a_norm.weight"},
    {"attn.wq_b.weight", "self_attn.q_b_proj.weight"},
    {"attn.wkv.weight", "self_attn.kv_proj.weight"},
    {"attn.kv_norm.weight", "self_attn.kv_norm.weight"},
    {"attn.wo_a.weight", "self_attn.o_a_proj.weight"},
    {"attn.wo_b.weight", "self_attn.o_b_proj.weight"},
    {"attn.attn_sink", "self_attn.sinks"},
    {"ffn.gate.weight", "mlp.gate.weight"},
    {"ffn.gate.bias", "mlp.gate.e_score_correction_bias"},
    {"ffn.gate.tid2eid", "mlp.gate.tid2eid"},
    {"ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"},
    {"ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"},
    {"ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"},
    {"ffn.experts.gate_up_proj", "mlp.experts.gate_up_proj"},  // stacked forms (state-dict conversion only)
    {"ffn.experts.down_proj", "mlp.experts.down_proj"},
}};

const std::regex kNativeLayer(R"(^layers\.(\d+)\.(.+)$)");
const std::regex kHfLayer(R"(^model\.layers\.(\d+)\.(.+)$)");
const std::regex kNativeExpert(R"(^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$)");

}  // namespace

std::optional<std::string> native_to_hf_name(const std::string& native) {
  for (const auto& [n, h] : kGlobal)
    if (native == n) return std::string(h);
  std::smatch m;
  if (std::regex_match(native, m, kNativeLayer)) {
    const std::string rest = m[2].str();
    for (const auto& [n, h] : kLayer)
      if (rest == n && rest.rfind("ffn.experts.", 0) != 0) return "model.layers." + m[1].str() + "." + h;
  }
  return std::nullopt;
}

std::optional<std::string> hf_to_native_name(const std::string& hf) {
  for (const auto& [n, h] : kGlobal)
    if (hf == h) return std::string(n);
  std::smatch m;
  if (std::regex_match(hf, m, kHfLayer)) {
    const std::string rest = m[2].str();
    for (const auto& [n, h] : kLayer)
      if (rest == h && rest.rfind("mlp.experts.", 0) != 0) return "layers." + m[1].str() + "." + n;
  }
  return std::nullopt;
}

std::map<std::string, Tensor> hf_state_to_native(const std::map<std::string, Tensor>& hf) {
  std::map<std::string, Tensor> out;
  for (const auto& [name, t] : hf) {
    std::smatch m;
    if (std::regex_match(name, m, kHfLayer) && (m[2] == "mlp.experts.gate_up_proj" || m[2] == "mlp.experts.down_proj")) {
      const std::string layer = m[1].str();
      DSV4_CHECK(t.ndim() == 3, "'{}' must be [experts, rows, cols], got {}", name, t.str());
      const bool gate_up = m[2] == "mlp.experts.gate_up_proj";
      if (gate_up) DSV4_CHECK(t.size(1) % 2 == 0, "'{}' has an odd row count {}: expected [E, 2I, D]", name, t.size(1));
      for (int64_t e = 0; e < t.size(0); ++e) {
        const Tensor te = t.select(0, e);
        const std::string base = "layers." + layer + ".ffn.experts." + std::to_string(e) + ".";
        if (gate_up) {
          const int64_t inter = t.size(1) / 2;
          out[base + "w1.weight"] = te.slice(0, 0, inter).contiguous();
          out[base + "w3.weight"] = te.slice(0, inter, 2 * inter).contiguous();
        } else {
          out[base + "w2.weight"] = te.contiguous();
        }
      }
      continue;
    }
    const auto native = hf_to_native_name(name);
    DSV4_CHECK(native.has_value(), "no DeepSeek-V4 parameter corresponds to the transformers name '{}'", name);
    out[*native] = t;
  }
  return out;
}

std::map<std::string, Tensor> native_state_to_hf(const std::map<std::string, Tensor>& native) {
  std::map<std::string, Tensor> out;
  // layer -> expert -> {w1, w2, w3}
  std::map<std::string, std::map<int64_t, std::array<Tensor, 3>>> experts;
  for (const auto& [name, t] : native) {
    std::smatch m;
    if (std::regex_match(name, m, kNativeExpert)) {
      const int w = m[3].str()[1] - '1';
      experts[m[1].str()][std::stoll(m[2].str())][static_cast<size_t>(w)] = t;
      continue;
    }
    if (name.rfind("mtp.", 0) == 0) continue;  // transformers has no MTP block
    const auto hf = native_to_hf_name(name);
    DSV4_CHECK(hf.has_value(), "no transformers name corresponds to the DeepSeek-V4 parameter '{}'", name);
    out[*hf] = t;
  }
  for (const auto& [layer, by_expert] : experts) {
    const int64_t E = static_cast<int64_t>(by_expert.size());
    DSV4_CHECK(by_expert.rbegin()->first == E - 1, "layer {}: routed experts are not numbered 0..{}", layer, E - 1);
    const auto& first = by_expert.begin()->second;
    for (int w = 0; w < 3; ++w)
      DSV4_CHECK(first[static_cast<size_t>(w)].defined(), "layer {}: expert 0 lacks w{}", layer, w + 1);
    const int64_t inter = first[0].size(0), dim = first[0].size(1);
    Tensor gate_up = Tensor::empty({E, 2 * inter, dim}, first[0].dtype());
    Tensor down = Tensor::empty({E, dim, inter}, first[1].dtype());
    for (const auto& [e, ws] : by_expert) {
      for (int w = 0; w < 3; ++w)
        DSV4_CHECK(ws[static_cast<size_t>(w)].defined(), "layer {}: expert {} lacks w{}", layer, e, w + 1);
      Tensor gu = gate_up.select(0, e);
      Tensor g = gu.slice(0, 0, inter), u = gu.slice(0, inter, 2 * inter);
      ops::copy(ws[0], g);
      ops::copy(ws[2], u);
      Tensor d = down.select(0, e);
      ops::copy(ws[1], d);
    }
    out["model.layers." + layer + ".mlp.experts.gate_up_proj"] = gate_up;
    out["model.layers." + layer + ".mlp.experts.down_proj"] = down;
  }
  return out;
}

}  // namespace dsv4
