// PEFT adapter I/O and merge/export (see peft.h for the layout).
#include "model/peft.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "model/hf_names.h"
#include "model/model.h"
#include "runtime/cpu_blas.h"
#include "runtime/safetensors.h"

namespace dsv4 {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kPrefix = "base_model.model.";
constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";
constexpr const char* kMetaUnits = "dsv4.units";
constexpr const char* kMetaDropout = "dsv4.lora_dropout";

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
std::string strip_suffix(const std::string& s, const std::string& suffix) {
  return s.substr(0, s.size() - suffix.size());
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  DSV4_CHECK(in.good(), "cannot open '{}'", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string regex_escape(const std::string& s) {
  static const std::string special = R"(\^$.|?*+()[]{})";
  std::string out;
  for (char c : s) {
    if (special.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

std::map<std::string, LoraSite> sites_by_unit(const ModelConfig& cfg) {
  std::map<std::string, LoraSite> m;
  for (LoraSite& s : lora_sites(cfg)) m.emplace(s.unit, std::move(s));
  return m;
}

// The transformers module of a non-MTP unit that PEFT addresses directly ("model.layers.0.self_attn.q_a_proj").
std::optional<std::string> hf_module_of(const std::string& unit) {
  const auto hf = native_to_hf_name(unit + ".weight");
  if (!hf || !ends_with(*hf, ".weight")) return std::nullopt;
  return strip_suffix(*hf, ".weight");
}

// Units PEFT holds as target_parameters on their module (the router weight, o_a_proj's weight).
bool is_param_unit(const std::string& unit) { return ends_with(unit, ".ffn.gate") || ends_with(unit, ".attn.wo_a"); }

const std::regex kRoutedUnit(R"(^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3|w13)$)");
const std::regex kGroupUnit(R"(^layers\.(\d+)\.attn\.wo_a\.(\d+)$)");
const std::regex kPeftExperts(R"(^model\.layers\.(\d+)\.mlp\.experts((\.base_layer)*)$)");
const std::regex kPeftOa(R"(^model\.layers\.(\d+)\.self_attn\.o_a_proj$)");

Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t.contiguous().clone() : t.to(DType::F32).contiguous(); }

bool all_zero(const Tensor& t) {
  const Tensor c = t.contiguous();
  const float* p = c.data<float>();
  for (int64_t i = 0; i < c.numel(); ++i)
    if (p[i] != 0.0f) return false;
  return true;
}

// dst[r0 + i, c0 + j] = src[i, j] (dst contiguous F32 2-D).
void put_block(Tensor& dst, int64_t r0, int64_t c0, const Tensor& src) {
  const Tensor s = src.contiguous();
  const int64_t rows = s.size(0), cols = s.size(1), ld = dst.size(1);
  float* d = dst.data<float>();
  const float* p = s.data<float>();
  for (int64_t i = 0; i < rows; ++i) std::copy(p + i * cols, p + (i + 1) * cols, d + (r0 + i) * ld + c0);
}

Tensor get_block(const Tensor& src, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
  return src.slice(0, r0, r0 + rows).slice(1, c0, c0 + cols).contiguous();
}

// PEFT's 3-D ParamWrapper B column layout: B_e[:, rho] = B[:, rho * E + e].
Tensor expert_B(const Tensor& B, int64_t E, int64_t e, int64_t r) {
  const int64_t out = B.size(0);
  Tensor be = Tensor::empty({out, r}, DType::F32);
  const float* p = B.data<float>();
  float* q = be.data<float>();
  for (int64_t o = 0; o < out; ++o)
    for (int64_t rho = 0; rho < r; ++rho) q[o * r + rho] = p[o * (r * E) + rho * E + e];
  return be;
}
void put_expert_B(Tensor& B, int64_t E, int64_t e, int64_t r, int64_t row0, const Tensor& be) {
  const Tensor c = be.contiguous();
  const int64_t rows = c.size(0);
  float* p = B.data<float>();
  const float* q = c.data<float>();
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t rho = 0; rho < r; ++rho) p[(row0 + o) * (r * E) + rho * E + e] = q[o * r + rho];
}

double scale_of(double alpha, int64_t r, bool rslora) {
  return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

json number(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::abs(v) < 9.0e15) return json(static_cast<int64_t>(v));
  return json(v);
}

// One PEFT module as written / read.
struct PeftModule {
  std::string path;         // "model.layers.0.self_attn.q_a_proj" or "model.layers.1.mlp.experts.base_layer"
  std::string current_key;  // what PEFT matches rank_pattern / alpha_pattern against
  bool is_param = false;    // a target_parameters entry (current_key is it)
  bool native = false;      // an MTP unit written under its native name
  Tensor A, B;
  int64_t rank = 0;         // the rank PEFT's scaling uses (rows of A / experts)
  double scale = 1.0;
};

}  // namespace

const AdapterTensors* AdapterSet::find(const std::string& unit) const {
  const auto it = std::lower_bound(adapters.begin(), adapters.end(), unit,
                                   [](const AdapterTensors& a, const std::string& u) { return a.unit < u; });
  if (it != adapters.end() && it->unit == unit) return &*it;
  for (const AdapterTensors& a : adapters)  // not sorted (built by hand): linear search
    if (a.unit == unit) return &a;
  return nullptr;
}

// ---- writing ------------------------------------------------------------------------------------------------------
void write_peft_adapter(const std::string& dir, const AdapterSet& set, const ModelConfig& cfg) {
  const auto sites = sites_by_unit(cfg);
  const int64_t E = cfg.n_routed_experts, I = cfg.moe_inter_dim, D = cfg.dim, G = cfg.o_groups, R = cfg.o_lora_rank;
  DSV4_CHECK(!set.adapters.empty(), "write_peft_adapter('{}'): no adapters", dir);

  std::vector<PeftModule> modules;
  std::map<std::string, std::map<int64_t, const AdapterTensors*>> groups;  // layer -> g -> adapter (per-group wo_a)
  // layer -> expert -> {gate_up adapter + its kind, down adapter}
  struct ExpertAdapters {
    const AdapterTensors* gate_up = nullptr;
    std::string kind;  // "w13", "w1", "w3"
    const AdapterTensors* down = nullptr;
  };
  std::map<std::string, std::map<int64_t, ExpertAdapters>> experts;
  std::vector<std::string> units;

  for (const AdapterTensors& a : set.adapters) {
    auto it = sites.find(a.unit);
    DSV4_CHECK(it != sites.end(), "write_peft_adapter('{}'): '{}' is not a LoRA site of model '{}'", dir, a.unit,
               cfg.name);
    const LoraSite& site = it->second;
    DSV4_CHECK(a.A.defined() && a.B.defined() && a.A.ndim() == 2 && a.B.ndim() == 2 && a.A.size(1) == site.in &&
                   a.B.size(0) == site.out && a.B.size(1) == a.A.size(0),
               "write_peft_adapter('{}'): adapter {} is A {}, B {}; the site needs A [r, {}], B [{}, r]", dir, a.unit,
               a.A.defined() ? a.A.str() : "none", a.B.defined() ? a.B.str() : "none", site.in, site.out);
    units.push_back(a.unit);
    std::smatch m;
    if (starts_with(a.unit, "mtp.")) {  // no transformers module: native name, matched like the others when read
      modules.push_back({a.unit, is_param_unit(a.unit) ? a.unit + ".weight" : a.unit, false, true, as_f32(a.A),
                         as_f32(a.B), a.A.size(0), a.scale});
    } else if (std::regex_match(a.unit, m, kGroupUnit)) {
      groups[m[1].str()][std::stoll(m[2].str())] = &a;
    } else if (std::regex_match(a.unit, m, kRoutedUnit)) {
      ExpertAdapters& ea = experts[m[1].str()][std::stoll(m[2].str())];
      if (m[3] == "w2") {
        ea.down = &a;
      } else {
        DSV4_CHECK(!ea.gate_up, "write_peft_adapter('{}'): layers.{}.ffn.experts.{} has separate {} and {} adapters; "
                   "PEFT's gate_up_proj adapter has one A per expert (use one fused w13 adapter)",
                   dir, m[1].str(), m[2].str(), ea.kind, m[3].str());
        ea.gate_up = &a;
        ea.kind = m[3].str();
      }
    } else {
      const auto hf = hf_module_of(a.unit);
      DSV4_CHECK(hf.has_value(), "write_peft_adapter('{}'): no transformers module corresponds to '{}'", dir, a.unit);
      const bool param = is_param_unit(a.unit);
      modules.push_back({*hf, param ? *hf + ".weight" : *hf, param, false, as_f32(a.A), as_f32(a.B), a.A.size(0),
                         a.scale});
    }
  }

  // Per-group wo_a -> one block-diagonal o_a_proj adapter of rank G*r.
  for (const auto& [layer, by_group] : groups) {
    const AdapterTensors& first = *by_group.begin()->second;
    const int64_t r = first.A.size(0), K = first.A.size(1);
    for (const auto& [g, a] : by_group)
      DSV4_CHECK(a->A.size(0) == r && std::abs(a->scale - first.scale) <= 1e-12 * std::abs(first.scale),
                 "write_peft_adapter('{}'): the per-group wo_a adapters of layer {} differ in rank or scale ({}: rank {}, "
                 "scale {}; {}: rank {}, scale {}); PEFT holds them as one o_a_proj adapter",
                 dir, layer, first.unit, r, first.scale, a->unit, a->A.size(0), a->scale);
    Tensor A = Tensor::zeros({G * r, K}, DType::F32), B = Tensor::zeros({G * R, G * r}, DType::F32);
    for (const auto& [g, a] : by_group) {
      put_block(A, g * r, 0, as_f32(a->A));
      put_block(B, g * R, g * r, as_f32(a->B));
    }
    const std::string path = "model.layers." + layer + ".self_attn.o_a_proj";
    modules.push_back({path, path + ".weight", true, false, A, B, G * r, first.scale});
  }

  // Routed experts -> the stacked gate_up_proj / down_proj adapters.
  for (const auto& [layer, by_expert] : experts) {
    const AdapterTensors *gu0 = nullptr, *dn0 = nullptr;
    for (const auto& [e, ea] : by_expert) {
      if (ea.gate_up && !gu0) gu0 = ea.gate_up;
      if (ea.down && !dn0) dn0 = ea.down;
    }
    const std::string base = "model.layers." + layer + ".mlp.experts";
    auto stack = [&](const AdapterTensors* first, bool gate_up, const std::string& path) {
      const int64_t r = first->A.size(0), in = gate_up ? D : I, out = gate_up ? 2 * I : D;
      Tensor A = Tensor::zeros({r * E, in}, DType::F32), B = Tensor::zeros({out, r * E}, DType::F32);
      for (const auto& [e, ea] : by_expert) {
        const AdapterTensors* a = gate_up ? ea.gate_up : ea.down;
        if (!a) continue;
        DSV4_CHECK(a->A.size(0) == r && std::abs(a->scale - first->scale) <= 1e-12 * std::abs(first->scale),
                   "write_peft_adapter('{}'): the routed-expert adapters of {} differ in rank or scale ({}: rank {}, "
                   "scale {}; {}: rank {}, scale {}); PEFT holds them as one adapter",
                   dir, base + (gate_up ? ".gate_up_proj" : ".down_proj"), first->unit, r, first->scale, a->unit,
                   a->A.size(0), a->scale);
        put_block(A, e * r, 0, as_f32(a->A));
        const int64_t row0 = gate_up && ea.kind == "w3" ? I : 0;
        put_expert_B(B, E, e, r, row0, as_f32(a->B));
      }
      modules.push_back({path, base + (gate_up ? ".gate_up_proj" : ".down_proj"), true, false, A, B, r, first->scale});
    };
    // Both parameters targeted: gate_up_proj is the inner wrapper ("experts.base_layer"), down_proj the outer.
    if (gu0) stack(gu0, true, dn0 ? base + ".base_layer" : base);
    if (dn0) stack(dn0, false, base);
  }

  // Global r / alpha, then the per-module patterns.
  std::map<int64_t, int> rank_count;
  for (const PeftModule& m : modules) ++rank_count[m.rank];
  int64_t r = set.r;
  if (r <= 0)
    r = std::max_element(rank_count.begin(), rank_count.end(), [](auto& a, auto& b) { return a.second < b.second; })
            ->first;
  const bool rslora = set.use_rslora;
  double alpha = set.lora_alpha;
  if (alpha <= 0) {
    alpha = 0;
    for (const PeftModule& m : modules)
      if (m.rank == r) {
        alpha = m.scale * (rslora ? std::sqrt(static_cast<double>(r)) : static_cast<double>(r));
        break;
      }
    if (alpha <= 0) alpha = modules[0].scale * (rslora ? std::sqrt(static_cast<double>(r)) : static_cast<double>(r));
  }
  json rank_pattern = json::object(), alpha_pattern = json::object();
  std::set<std::string> target_modules, target_parameters;
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const PeftModule& m : modules) {
    const double alpha_m = m.scale * (rslora ? std::sqrt(static_cast<double>(m.rank)) : static_cast<double>(m.rank));
    const std::string key = regex_escape(m.current_key);
    if (m.rank != r) rank_pattern[key] = m.rank;
    if (std::abs(scale_of(alpha, m.rank, rslora) - m.scale) > 1e-12 * std::abs(m.scale)) alpha_pattern[key] = number(alpha_m);
    if (m.is_param) target_parameters.insert(m.current_key);
    else if (!m.native) target_modules.insert(m.path);
    tensors.emplace_back(kPrefix + m.path + ".lora_A.weight", m.A);
    tensors.emplace_back(kPrefix + m.path + ".lora_B.weight", m.B);
  }
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::sort(units.begin(), units.end());

  const bool params = !target_parameters.empty();
  json j = {
      {"alora_invocation_tokens", nullptr},
      {"alpha_pattern", alpha_pattern},
      {"arrow_config", nullptr},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", set.base_model_name_or_path.empty() ? json(nullptr) : json(set.base_model_name_or_path)},
      {"bias", "none"},
      {"corda_config", nullptr},
      {"ensure_weight_tying", false},
      {"eva_config", nullptr},
      {"exclude_modules", nullptr},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"kasa_config", nullptr},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", json::object()},
      {"lora_alpha", number(alpha)},
      {"lora_bias", false},
      {"lora_dropout", params ? 0.0 : set.dropout},
      {"lora_ga_config", nullptr},
      {"megatron_config", nullptr},
      {"megatron_core", "megatron.core"},
      {"modules_to_save", nullptr},
      {"monteclora_config", nullptr},
      {"peft_type", "LORA"},
      {"qalora_group_size", 16},
      {"r", r},
      {"rank_pattern", rank_pattern},
      {"revision", nullptr},
      {"target_modules", std::vector<std::string>(target_modules.begin(), target_modules.end())},
      {"target_parameters", params ? json(std::vector<std::string>(target_parameters.begin(), target_parameters.end()))
                                   : json(nullptr)},
      {"task_type", "CAUSAL_LM"},
      {"trainable_token_indices", nullptr},
      {"use_bdlora", nullptr},
      {"use_dora", false},
      {"use_qalora", false},
      {"use_rslora", rslora},
      {"velora_config", nullptr},
  };
  fs::create_directories(dir);
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {kMetaUnits, json(units).dump()}, {kMetaDropout, fmt::format("{}", set.dropout)}};
  write_safetensors((fs::path(dir) / kWeightsFile).string(), tensors, meta);
  write_file_atomic((fs::path(dir) / kConfigFile).string(), j.dump(2) + "\n");
}

// ---- reading ------------------------------------------------------------------------------------------------------
namespace {

struct PeftConfigView {
  std::string path;
  int64_t r = 8;
  double alpha = 8;
  bool rslora = false;
  double dropout = 0;
  std::vector<std::pair<std::string, int64_t>> rank_pattern;  // in file (sorted) order
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<std::string> target_parameters;
  std::string base_model;

  // PEFT's get_pattern_key: the first key k with re.match(rf"(.*\.)?({k})$", current_key).
  template <typename T>
  std::optional<T> pattern(const std::vector<std::pair<std::string, T>>& pats, const std::string& key,
                           const char* field) const {
    for (const auto& [k, v] : pats) {
      try {
        if (std::regex_match(key, std::regex("(.*\\.)?(" + k + ")"))) return v;
      } catch (const std::regex_error& e) {
        DSV4_FAIL("'{}': {} key '{}' is not a regular expression dsv4 can use: {}", path, field, k, e.what());
      }
    }
    return std::nullopt;
  }
  int64_t rank_for(const std::string& key) const { return pattern(rank_pattern, key, "rank_pattern").value_or(r); }
  double scale_for(const std::string& key) const {
    return scale_of(pattern(alpha_pattern, key, "alpha_pattern").value_or(alpha), rank_for(key), rslora);
  }
  bool targets_param(const std::string& full) const {
    for (const std::string& t : target_parameters)
      if (full == t || ends_with(full, "." + t)) return true;
    return false;
  }
};

PeftConfigView read_config(const std::string& dir) {
  PeftConfigView c;
  c.path = (fs::path(dir) / kConfigFile).string();
  DSV4_CHECK(fs::exists(c.path), "PEFT adapter '{}' has no {}", dir, kConfigFile);
  json j;
  try {
    j = json::parse(read_text(c.path));
  } catch (const json::parse_error& e) {
    DSV4_FAIL("'{}': not valid JSON: {}", c.path, e.what());
  }
  DSV4_CHECK(j.is_object(), "'{}': expected a JSON object", c.path);
  auto get = [&](const char* key) -> const json* {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  const json* type = get("peft_type");
  DSV4_CHECK(type && type->is_string() && type->get<std::string>() == "LORA",
             "'{}': peft_type must be \"LORA\", got {}", c.path, type ? type->dump() : "nothing");
  auto require_false = [&](const char* key) {
    const json* v = get(key);
    DSV4_CHECK(!v || (v->is_boolean() && !v->get<bool>()), "'{}': {} = {} is not supported by dsv4 (plain LoRA only)",
               c.path, key, v ? v->dump() : "");
  };
  for (const char* key : {"use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"}) require_false(key);
  for (const char* key : {"layer_replication", "trainable_token_indices", "velora_config", "kasa_config"})
    DSV4_CHECK(!get(key), "'{}': {} = {} is not supported by dsv4", c.path, key, get(key)->dump());
  if (const json* v = get("modules_to_save"))
    DSV4_CHECK(v->is_array() && v->empty(), "'{}': modules_to_save = {} is not supported by dsv4 (adapters only)",
               c.path, v->dump());
  if (const json* v = get("bias"))
    DSV4_CHECK(v->is_string() && v->get<std::string>() == "none", "'{}': bias = {} is not supported by dsv4", c.path,
               v->dump());
  try {
    if (const json* v = get("r")) c.r = v->get<int64_t>();
    if (const json* v = get("lora_alpha")) c.alpha = v->get<double>();
    if (const json* v = get("use_rslora")) c.rslora = v->get<bool>();
    if (const json* v = get("lora_dropout")) c.dropout = v->get<double>();
    if (const json* v = get("rank_pattern"))
      for (auto it = v->begin(); it != v->end(); ++it) c.rank_pattern.emplace_back(it.key(), it.value().get<int64_t>());
    if (const json* v = get("alpha_pattern"))
      for (auto it = v->begin(); it != v->end(); ++it) c.alpha_pattern.emplace_back(it.key(), it.value().get<double>());
    if (const json* v = get("target_parameters")) c.target_parameters = v->get<std::vector<std::string>>();
    if (const json* v = get("base_model_name_or_path")) c.base_model = v->get<std::string>();
  } catch (const json::exception& e) {
    DSV4_FAIL("'{}': {}", c.path, e.what());
  }
  DSV4_CHECK(c.r >= 1, "'{}': r = {} must be >= 1", c.path, c.r);
  DSV4_CHECK(c.alpha > 0, "'{}': lora_alpha = {} must be positive", c.path, c.alpha);
  DSV4_CHECK(c.dropout >= 0 && c.dropout < 1, "'{}': lora_dropout = {} outside [0, 1)", c.path, c.dropout);
  return c;
}

}  // namespace

AdapterSet read_peft_adapter(const std::string& dir, const ModelConfig& cfg) {
  const PeftConfigView pc = read_config(dir);
  const std::string wpath = (fs::path(dir) / kWeightsFile).string();
  if (!fs::exists(wpath) && fs::exists(fs::path(dir) / "adapter_model.bin"))
    DSV4_FAIL("PEFT adapter '{}' is a PyTorch pickle (adapter_model.bin); dsv4 reads safetensors only (save with "
              "safe_serialization=True)",
              dir);
  DSV4_CHECK(fs::exists(wpath), "PEFT adapter '{}' has no {}", dir, kWeightsFile);
  const SafetensorsFile f = SafetensorsFile::open(wpath);
  const auto sites = sites_by_unit(cfg);
  const int64_t E = cfg.n_routed_experts, I = cfg.moe_inter_dim, G = cfg.o_groups, R = cfg.o_lora_rank;

  AdapterSet set;
  set.r = pc.r;
  set.lora_alpha = pc.alpha;
  set.use_rslora = pc.rslora;
  set.dropout = pc.dropout;
  set.base_model_name_or_path = pc.base_model;
  std::optional<std::set<std::string>> dsv4_units;
  const auto& meta = f.metadata();
  if (auto it = meta.find(kMetaUnits); it != meta.end()) {
    try {
      const auto v = json::parse(it->second).get<std::vector<std::string>>();
      dsv4_units = std::set<std::string>(v.begin(), v.end());
    } catch (const json::exception& e) {
      DSV4_FAIL("'{}': metadata {} is not a JSON list of strings: {}", wpath, kMetaUnits, e.what());
    }
    set.from_dsv4 = true;
  }
  if (auto it = meta.find(kMetaDropout); it != meta.end()) {
    try {
      set.dropout = std::stod(it->second);
    } catch (const std::exception&) {
      DSV4_FAIL("'{}': metadata {} = '{}' is not a number", wpath, kMetaDropout, it->second);
    }
  }

  // Modules: path -> (A, B).
  std::map<std::string, std::pair<Tensor, Tensor>> mods;
  for (const std::string& key : f.names()) {
    const bool a = ends_with(key, ".lora_A.weight"), b = ends_with(key, ".lora_B.weight");
    DSV4_CHECK(starts_with(key, kPrefix) && (a || b),
               "'{}': key '{}' is not a LoRA weight (expected base_model.model.<module>.lora_A.weight / .lora_B.weight)",
               wpath, key);
    const std::string path = strip_suffix(key.substr(std::strlen(kPrefix)), a ? ".lora_A.weight" : ".lora_B.weight");
    const Tensor t = f.view(key);
    DSV4_CHECK(t.ndim() == 2 && (t.dtype() == DType::F32 || t.dtype() == DType::BF16 || t.dtype() == DType::F16),
               "'{}': key '{}' must be a 2-D F32/BF16/F16 tensor, got {}", wpath, key, t.str());
    (a ? mods[path].first : mods[path].second) = as_f32(t);
  }
  for (const auto& [path, ab] : mods)
    DSV4_CHECK(ab.first.defined() && ab.second.defined(), "'{}': {}{}.lora_{}.weight is missing (its pair is there)",
               wpath, kPrefix, path, ab.first.defined() ? "B" : "A");

  auto key_of = [&](const std::string& path, bool a) { return kPrefix + path + (a ? ".lora_A.weight" : ".lora_B.weight"); };
  auto listed = [&](const std::string& unit) { return !dsv4_units || dsv4_units->count(unit) > 0; };
  auto add = [&](const std::string& unit, Tensor A, Tensor B, double scale, const std::string& path) {
    DSV4_CHECK(listed(unit), "'{}': {} holds an adapter for '{}', which the file's {} does not list", wpath,
               key_of(path, true), unit, kMetaUnits);
    auto it = sites.find(unit);
    DSV4_CHECK(it != sites.end(), "'{}': {} maps to '{}', which is not a LoRA site of model '{}'", wpath,
               key_of(path, true), unit, cfg.name);
    DSV4_CHECK(A.size(1) == it->second.in && B.size(0) == it->second.out && B.size(1) == A.size(0),
               "'{}': {} / lora_B: adapter {} is A {}, B {}; model '{}' needs A [r, {}], B [{}, r]", wpath,
               key_of(path, true), unit, A.str(), B.str(), cfg.name, it->second.in, it->second.out);
    set.adapters.push_back({unit, std::move(A), std::move(B), scale});
  };
  auto check_rank = [&](const std::string& path, const Tensor& A, int64_t rank, int64_t experts) {
    DSV4_CHECK(A.size(0) == rank * experts, "'{}': {} is {}, but adapter_config.json gives that module rank {}{}", wpath,
               key_of(path, true), A.str(), rank, experts > 1 ? fmt::format(" (x {} experts = {} rows)", experts, rank * experts) : "");
  };
  auto require_zero = [&](const Tensor& t, const std::string& path, const std::string& what) {
    DSV4_CHECK(all_zero(t), "'{}': {} has non-zero values for {}, which the file's {} does not list", wpath,
               key_of(path, true), what, kMetaUnits);
  };

  // Experts per layer: depth (number of ".base_layer") -> module path.
  std::map<std::string, std::map<size_t, std::string>> expert_mods;
  for (const auto& [path, ab] : mods) {
    const Tensor& A = ab.first;
    const Tensor& B = ab.second;
    std::smatch m;
    if (std::regex_match(path, m, kPeftExperts)) {
      expert_mods[m[1].str()][m[2].str().size() / std::strlen(".base_layer")] = path;
    } else if (std::regex_match(path, m, kPeftOa)) {
      const std::string layer = m[1].str(), unit = "layers." + layer + ".attn.wo_a";
      const std::string ck = path + ".weight";
      const int64_t rank = pc.rank_for(ck);
      check_rank(path, A, rank, 1);
      const double scale = pc.scale_for(ck);
      bool per_group = false;
      for (int64_t g = 0; g < G && dsv4_units; ++g) per_group = per_group || dsv4_units->count(unit + "." + std::to_string(g));
      if (!per_group) {
        add(unit, A, B, scale, path);
        continue;
      }
      DSV4_CHECK(rank % G == 0 && B.size(0) == G * R && B.size(1) == rank,
                 "'{}': {} holds per-group wo_a adapters ({}) but is A {}, B {} (expected A [{} * r, K], B [{}, {} * r])",
                 wpath, key_of(path, true), kMetaUnits, A.str(), B.str(), G, G * R, G);
      const int64_t r = rank / G;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t h = 0; h < G; ++h)
          if (h != g || !listed(unit + "." + std::to_string(g)))
            require_zero(get_block(B, g * R, R, h * r, r), path,
                         fmt::format("the lora_B block of group {} x rank block {}", g, h));
      for (int64_t g = 0; g < G; ++g) {
        const std::string gu = unit + "." + std::to_string(g);
        if (!listed(gu)) continue;
        add(gu, get_block(A, g * r, r, 0, A.size(1)), get_block(B, g * R, R, g * r, r), scale, path);
      }
    } else {
      std::string unit;
      if (starts_with(path, "mtp.")) {
        unit = path;
      } else {
        const auto native = hf_to_native_name(path + ".weight");
        DSV4_CHECK(native && ends_with(*native, ".weight"),
                   "'{}': key '{}' names module '{}', which has no DeepSeek-V4 counterpart", wpath, key_of(path, true),
                   path);
        unit = strip_suffix(*native, ".weight");
      }
      const std::string ck = is_param_unit(unit) ? path + ".weight" : path;
      check_rank(path, A, pc.rank_for(ck), 1);
      add(unit, A, B, pc.scale_for(ck), path);
    }
  }

  for (const auto& [layer, by_depth] : expert_mods) {
    const std::string base = "model.layers." + layer + ".mlp.experts";
    std::vector<std::string> targeted;  // in named_parameters order (innermost wrapper first)
    for (const char* p : {"gate_up_proj", "down_proj"})
      if (pc.targets_param(base + "." + p)) targeted.push_back(p);
    std::string tp;
    for (const auto& t : pc.target_parameters) tp += (tp.empty() ? "" : ", ") + t;
    for (const auto& [depth, path] : by_depth)
      DSV4_CHECK(depth < targeted.size(),
                 "'{}': key '{}' does not fit adapter_config.json's target_parameters [{}] ({} of {}.gate_up_proj / "
                 "down_proj targeted)",
                 wpath, key_of(path, true), tp, targeted.size(), base);
    for (size_t i = 0; i < targeted.size(); ++i) {
      const size_t depth = targeted.size() - 1 - i;
      auto it = by_depth.find(depth);
      std::string want = base;
      for (size_t k = 0; k < depth; ++k) want += ".base_layer";
      DSV4_CHECK(it != by_depth.end(), "'{}': target_parameters names {}.{} but {} is missing", wpath, base,
                 targeted[i], key_of(want, true));
      const std::string& path = it->second;
      const Tensor& A = mods.at(path).first;
      const Tensor& B = mods.at(path).second;
      const bool gate_up = targeted[i] == "gate_up_proj";
      const std::string ck = base + "." + targeted[i];
      const int64_t r = pc.rank_for(ck);
      check_rank(path, A, r, E);
      DSV4_CHECK(B.size(0) == (gate_up ? 2 * I : cfg.dim) && B.size(1) == r * E && A.size(1) == (gate_up ? cfg.dim : I),
                 "'{}': {} / lora_B are A {}, B {}; {} needs A [{} * {}, {}], B [{}, {} * {}]", wpath,
                 key_of(path, true), A.str(), B.str(), ck, r, E, gate_up ? cfg.dim : I, gate_up ? 2 * I : cfg.dim, r,
                 E);
      const double scale = pc.scale_for(ck);
      for (int64_t e = 0; e < E; ++e) {
        const std::string eu = "layers." + layer + ".ffn.experts." + std::to_string(e) + ".";
        const Tensor Ae = get_block(A, e * r, r, 0, A.size(1));
        const Tensor Be = expert_B(B, E, e, r);
        if (!gate_up) {
          if (listed(eu + "w2")) {
            add(eu + "w2", Ae, Be, scale, path);
          } else {
            require_zero(Be, path, "expert " + std::to_string(e) + " (w2)");
            require_zero(Ae, path, "expert " + std::to_string(e) + " (w2)");
          }
          continue;
        }
        if (listed(eu + "w13")) {
          add(eu + "w13", Ae, Be, scale, path);
        } else if (dsv4_units && dsv4_units->count(eu + "w1")) {
          require_zero(get_block(Be, I, I, 0, r), path, "expert " + std::to_string(e) + " (w3 rows of a w1 adapter)");
          add(eu + "w1", Ae, get_block(Be, 0, I, 0, r), scale, path);
        } else if (dsv4_units && dsv4_units->count(eu + "w3")) {
          require_zero(get_block(Be, 0, I, 0, r), path, "expert " + std::to_string(e) + " (w1 rows of a w3 adapter)");
          add(eu + "w3", Ae, get_block(Be, I, I, 0, r), scale, path);
        } else {
          require_zero(Be, path, "expert " + std::to_string(e) + " (gate_up)");
          require_zero(Ae, path, "expert " + std::to_string(e) + " (gate_up)");
        }
      }
    }
  }

  std::sort(set.adapters.begin(), set.adapters.end(),
            [](const AdapterTensors& a, const AdapterTensors& b) { return a.unit < b.unit; });
  for (size_t i = 1; i < set.adapters.size(); ++i)
    DSV4_CHECK(set.adapters[i].unit != set.adapters[i - 1].unit, "'{}': two adapters for '{}'", wpath,
               set.adapters[i].unit);
  if (dsv4_units) {
    std::vector<std::string> lost;
    for (const std::string& u : *dsv4_units)
      if (!set.find(u)) lost.push_back(u);
    DSV4_CHECK(lost.empty(), "'{}': metadata {} lists {} adapter(s) the tensors do not hold, e.g. '{}'", wpath,
               kMetaUnits, lost.size(), lost.empty() ? "" : lost[0]);
  }
  DSV4_CHECK(!set.adapters.empty(), "PEFT adapter '{}' holds no LoRA weights", dir);
  return set;
}

// ---- model <-> adapter set ----------------------------------------------------------------------------------------
AdapterSet adapter_set_of(Model& model) {
  AdapterSet set;
  for (LoraAdapter* ad : lora_adapters(model)) {
    set.adapters.push_back({ad->unit, ad->A.value.to(Device::cpu()), ad->B.value.to(Device::cpu()), ad->scale});
    set.dropout = ad->dropout;
  }
  std::sort(set.adapters.begin(), set.adapters.end(),
            [](const AdapterTensors& a, const AdapterTensors& b) { return a.unit < b.unit; });
  return set;
}

void install_adapter_set(Model& model, const AdapterSet& set, const std::string& source, uint64_t seed) {
  std::vector<LoraAdapter*> existing = lora_adapters(model);
  if (existing.empty()) {
    for (const AdapterTensors& a : set.adapters) {
      if (model.foreign_expert(a.unit + ".lora_A")) continue;  // another rank's routed expert (expert parallelism)
      LoraAdapter& ad = attach_lora(model, a.unit, a.A.size(0), a.scale, set.dropout, lora_dropout_key(seed, a.unit));
      DSV4_CHECK(ad.A.value.shape() == a.A.shape() && ad.B.value.shape() == a.B.shape(),
                 "{}: adapter {} is A {}, B {}; the model's site needs A {}, B {}", source, a.unit, a.A.str(), a.B.str(),
                 ad.A.value.str(), ad.B.value.str());
      ops::copy(a.A, ad.A.value);
      ops::copy(a.B, ad.B.value);
    }
    freeze_base(model);
    return;
  }
  std::map<std::string, LoraAdapter*> by_unit;
  for (LoraAdapter* ad : existing) by_unit[ad->unit] = ad;
  std::vector<std::string> problems;
  for (const AdapterTensors& a : set.adapters) {
    auto it = by_unit.find(a.unit);
    if (it == by_unit.end() && model.foreign_expert(a.unit + ".lora_A")) continue;
    if (it == by_unit.end()) {
      problems.push_back(a.unit + " (in the file, not in the model)");
      continue;
    }
    const LoraAdapter& ad = *it->second;
    if (!(ad.A.value.shape() == a.A.shape()) || !(ad.B.value.shape() == a.B.shape()))
      problems.push_back(fmt::format("{} (file A {}, B {}; model A {}, B {})", a.unit, a.A.shape().str(),
                                     a.B.shape().str(), ad.A.value.shape().str(), ad.B.value.shape().str()));
    else if (std::abs(ad.scale - a.scale) > 1e-9 * std::abs(ad.scale))
      problems.push_back(fmt::format("{} (file scale {}, model scale {})", a.unit, a.scale, ad.scale));
  }
  for (const auto& [unit, ad] : by_unit)
    if (!set.find(unit)) problems.push_back(unit + " (in the model, not in the file)");
  if (!problems.empty()) {
    std::string list;
    for (size_t i = 0; i < problems.size() && i < 20; ++i) list += (i ? "; " : "") + problems[i];
    if (problems.size() > 20) list += fmt::format("; ... ({} in all)", problems.size());
    DSV4_FAIL("{}: the adapters do not match the model's: {}", source, list);
  }
  for (const AdapterTensors& a : set.adapters) {
    if (!by_unit.count(a.unit)) continue;  // a foreign expert's adapter
    LoraAdapter& ad = *by_unit.at(a.unit);
    ops::copy(a.A, ad.A.value);
    ops::copy(a.B, ad.B.value);
  }
}

void save_peft_adapter(Model& model, const std::string& dir, const PeftSaveOptions& opts) {
  AdapterSet set = adapter_set_of(model);
  DSV4_CHECK(!set.adapters.empty(), "save_peft_adapter('{}'): the model has no adapters", dir);
  if (opts.config) {
    set.r = opts.config->rank;
    set.lora_alpha = opts.config->alpha;
    set.use_rslora = opts.config->rslora;
    set.dropout = opts.config->dropout;
  }
  set.base_model_name_or_path = opts.base_model_name_or_path;
  write_peft_adapter(dir, set, model.config());
}

int64_t load_peft_adapter(Model& model, const std::string& dir, uint64_t seed) {
  const AdapterSet set = read_peft_adapter(dir, model.config());
  install_adapter_set(model, set, "PEFT adapter '" + dir + "'", seed);
  return static_cast<int64_t>(set.adapters.size());
}

// ---- merging --------------------------------------------------------------------------------------------------------
namespace {

struct DeltaRef {
  const AdapterTensors* adapter;
  LoraDeltaPart part;
};

std::map<std::string, std::vector<DeltaRef>> delta_index(const AdapterSet& set, const ModelConfig& cfg) {
  const auto sites = sites_by_unit(cfg);
  std::map<std::string, std::vector<DeltaRef>> idx;
  for (const AdapterTensors& a : set.adapters) {
    auto it = sites.find(a.unit);
    DSV4_CHECK(it != sites.end(), "merge: '{}' is not a LoRA site of model '{}'", a.unit, cfg.name);
    for (const LoraDeltaPart& p : lora_unit_parts(it->second, cfg)) idx[p.weight].push_back({&a, p});
  }
  return idx;
}

int64_t apply_deltas(const std::vector<DeltaRef>& refs, const std::string& weight, Tensor& w) {
  DSV4_CHECK(w.dtype() == DType::F32 && w.ndim() == 2 && w.is_contiguous() && w.device().is_cpu(),
             "merge {}: expected a contiguous CPU F32 matrix, got {}", weight, w.str());
  for (const DeltaRef& d : refs) {
    const Tensor A = d.adapter->A.contiguous(), B = d.adapter->B.contiguous();
    const int64_t r = A.size(0), in = A.size(1);
    DSV4_CHECK(A.dtype() == DType::F32 && B.dtype() == DType::F32 && in == w.size(1) &&
                   d.part.weight_row0 + d.part.rows <= w.size(0) && d.part.b_row0 + d.part.rows <= B.size(0),
               "merge {}: adapter {} (A {}, B {}) does not fit the weight {}", weight, d.adapter->unit, A.str(), B.str(),
               w.str());
    cpu_gemm(false, false, d.part.rows, in, r, static_cast<float>(d.adapter->scale), B.data<float>() + d.part.b_row0 * r,
             r, A.data<float>(), in, 1.0f, w.data<float>() + d.part.weight_row0 * in, in);
  }
  return static_cast<int64_t>(refs.size());
}

}  // namespace

int64_t merge_adapter_deltas(const AdapterSet& set, const ModelConfig& cfg, const std::string& weight, Tensor& w) {
  const auto idx = delta_index(set, cfg);
  auto it = idx.find(weight);
  return it == idx.end() ? 0 : apply_deltas(it->second, weight, w);
}

ExportReport export_merged(const std::string& base, const std::string& adapter, const std::string& out,
                           const ExportOptions& opts) {
  DSV4_CHECK(fs::weakly_canonical(base) != fs::weakly_canonical(out) &&
                 fs::weakly_canonical(adapter) != fs::weakly_canonical(out),
             "--out '{}' must differ from --base and --adapter", out);
  CheckpointReader rd(base);
  const ModelConfig& cfg = rd.config();
  const AdapterSet set = read_peft_adapter(adapter, cfg);
  ExportReport rep;
  if (opts.adapter_only) {
    write_peft_adapter(out, set, cfg);
    rep.format = "peft";
    rep.tensors = static_cast<int64_t>(set.adapters.size());
    return rep;
  }
  CheckpointFormat format;
  if (opts.format == "release")
    format = rd.layout() == CheckpointLayout::Release && rd.format().quantized() ? rd.format()
                                                                                 : CheckpointFormat::named("instruct");
  else if (opts.format == "bf16" || opts.format == "f32")
    format = CheckpointFormat::named(opts.format);
  else
    DSV4_FAIL("export: unknown --format '{}' (expected release, bf16 or f32)", opts.format);
  DSV4_CHECK(opts.layout == CheckpointLayout::Release || !format.quantized(),
             "the transformers layout holds unquantised weights; use --format bf16 or f32 with --layout hf");
  rep.format = format.name;

  const auto idx = delta_index(set, cfg);
  SaveOptions so;
  so.layout = opts.layout;
  so.format = format;
  CheckpointWriter w(cfg, out, so);
  // Every delta must land in a written weight, and every written weight must be in the base.
  std::set<std::string> written;
  for (int s = 1; s <= w.num_shards(); ++s)
    for (const ParamEntry* e : w.shard_entries(s)) {
      written.insert(e->name);
      DSV4_CHECK(rd.contains(e->name),
                 "base '{}' ({} layout) has no '{}', which the {} layout needs (a transformers checkpoint "
                 "has no MTP block: export it with --layout hf)",
                 base, checkpoint_layout_name(rd.layout()), e->name, checkpoint_layout_name(opts.layout));
    }
  for (const auto& [weight, refs] : idx)
    DSV4_CHECK(written.count(weight), "adapter {} modifies '{}', which the {} layout does not hold",
               refs.front().adapter->unit, weight, checkpoint_layout_name(opts.layout));

  for (int s = 1; s <= w.num_shards(); ++s) {
    const int64_t bytes = w.write_shard(s, [&](const ParamEntry& e) {
      WeightValue v = rd.get(e);
      auto it = idx.find(e.name);
      if (it == idx.end()) return v;
      Tensor f32 = v.to_f32(/*owned=*/true);
      rep.deltas += apply_deltas(it->second, e.name, f32);
      ++rep.merged_weights;
      WeightValue merged;
      merged.plain = f32;
      return merged;
    });
    rep.max_shard_bytes = std::max(rep.max_shard_bytes, bytes);
    rd.release();
  }
  const SaveReport sr = w.finish();
  rep.shards = sr.shards;
  rep.tensors = sr.tensors;
  rep.total_size = sr.total_size;
  // Other files of the base (tokenizer, generation config, chat template, ...).
  if (fs::is_directory(base))
    for (const auto& de : fs::directory_iterator(base)) {
      const std::string name = de.path().filename().string();
      if (!de.is_regular_file() || ends_with(name, ".safetensors") || name == "model.safetensors.index.json" ||
          name == "config.json")
        continue;
      fs::copy_file(de.path(), fs::path(out) / name, fs::copy_options::overwrite_existing);
    }
  return rep;
}

}  // namespace dsv4
