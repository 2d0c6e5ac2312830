#include "model/checkpoint_io.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>
#include <sstream>

#include "model/hf_names.h"
#include "runtime/safetensors.h"

namespace dsv4 {

namespace fs = std::filesystem;
using nlohmann::json;

std::string_view checkpoint_layout_name(CheckpointLayout l) {
  return l == CheckpointLayout::Release ? "release" : "transformers";
}

namespace {

// At most `cap` items, then a count (one error message must stay readable for a 69k-tensor checkpoint).
std::string join_list(const std::vector<std::string>& v, size_t cap = 200) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < cap; ++i) s += (i ? "; " : "") + v[i];
  if (v.size() > cap) s += fmt::format("; ... ({} in all)", v.size());
  return s;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  DSV4_CHECK(in.good(), "cannot open '{}'", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json read_config_json(const std::string& dir) {
  const std::string path = (fs::path(dir) / "config.json").string();
  DSV4_CHECK(fs::exists(path), "checkpoint directory '{}' has no config.json", dir);
  try {
    return json::parse(read_text(path));
  } catch (const json::parse_error& e) {
    DSV4_FAIL("'{}': not valid JSON: {}", path, e.what());
  }
}

bool is_float_dtype_on_disk(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

std::string tensor_desc(DType t, const Shape& s) { return fmt::format("{}{}", dtype_name(t), s.str()); }

}  // namespace

// ---- slots -------------------------------------------------------------------------------------------------
bool WeightSlot::frozen() const { return frozen_weight() != nullptr; }

const QuantizedWeight* WeightSlot::frozen_weight() const {
  if (linear && linear->is_frozen()) return &linear->frozen;
  if (expert && expert->frozen(k).defined()) return &expert->frozen(k);
  if (attn && attn->wo_a_frozen.defined()) return &attn->wo_a_frozen;
  return nullptr;
}

void WeightSlot::set_frozen(QuantizedWeight q) {
  if (linear) {
    linear->set_frozen(std::move(q));
  } else if (expert) {
    expert->set_frozen(k, std::move(q), shape);
  } else if (attn) {
    attn->set_wo_a_frozen(std::move(q));
  } else {
    DSV4_FAIL("{}: a plain parameter cannot be held as a frozen quantized weight", param->name);
  }
}

Tensor& WeightSlot::f32_value() {
  if (linear && linear->is_frozen()) linear->frozen = QuantizedWeight();
  if (expert && expert->frozen(k).defined()) expert->frozen(k) = QuantizedWeight();
  if (attn && attn->wo_a_frozen.defined()) attn->wo_a_frozen = QuantizedWeight();
  Tensor& v = param->value;
  if (!v.defined() || v.dtype() != DType::F32 || !(v.shape() == shape) || !v.is_contiguous() || !v.device().is_cpu())
    v = Tensor::zeros(shape, DType::F32);
  return v;
}

Tensor WeightSlot::f32_copy() const {
  if (const QuantizedWeight* q = frozen_weight()) return q->dequantize();
  DSV4_CHECK(param->value.defined(), "{}: the parameter has no value", param->name);
  return param->value.dtype() == DType::F32 ? param->value : param->value.to(DType::F32);
}

std::map<std::string, WeightSlot> model_weight_slots(Model& model) {
  std::map<std::string, WeightSlot> slots;
  model.visit([&](Param& p) {
    WeightSlot& s = slots[p.name];
    s.param = &p;
    s.shape = p.value.shape();
  });
  auto lin = [&](Linear& l) {
    WeightSlot& s = slots[l.weight.name];
    s.param = &l.weight;
    s.linear = &l;
    s.shape = Shape{l.out_features(), l.in_features()};
  };
  auto experts = [&](MoE& m, ExpertWeights& ew) {
    for (int k = 1; k <= 3; ++k) {
      WeightSlot& s = slots[ew.param(k).name];
      s.param = &ew.param(k);
      s.expert = &ew;
      s.k = k;
      s.shape = m.expert_weight_shape(k);
    }
  };
  auto block = [&](Block& b) {
    Attention& a = b.attn;
    {
      WeightSlot& s = slots[a.wo_a.name];
      s.param = &a.wo_a;
      s.attn = &a;
      s.shape = Shape{a.o_groups() * a.o_lora_rank(), a.wo_a_in()};
    }
    lin(a.wq_a);
    lin(a.wq_b);
    lin(a.wkv);
    lin(a.wo_b);
    if (a.has_compressor()) {
      lin(a.compressor.wkv);
      lin(a.compressor.wgate);
    }
    if (a.has_indexer()) {
      lin(a.indexer.wq_b);
      lin(a.indexer.weights_proj);
      lin(a.indexer.compressor.wkv);
      lin(a.indexer.compressor.wgate);
    }
    for (ExpertWeights& ew : b.ffn.experts) experts(b.ffn, ew);
    if (b.ffn.has_shared()) experts(b.ffn, b.ffn.shared);
  };
  lin(model.head);
  for (auto& l : model.layers) block(*l);
  for (auto& m : model.mtp) {
    lin(m->e_proj);
    lin(m->h_proj);
    block(m->block);
  }
  return slots;
}

// ---- configuration ----------------------------------------------------------------------------------------
ModelConfig load_checkpoint_config(const std::string& dir) {
  json j = read_config_json(dir);
  DSV4_CHECK(j.is_object(), "'{}/config.json': expected a JSON object", dir);
  // transformers 5.x writes the torch dtype as "dtype" ("float32", "bfloat16"); the native key of that name is the
  // weight format ("fp8", "bf16").
  if (auto it = j.find("dtype"); it != j.end() && (!it->is_string() || (it->get<std::string>() != "fp8" &&
                                                                        it->get<std::string>() != "bf16")))
    j.erase(it);
  return model_config_from_json_text(j.dump(), (fs::path(dir) / "config.json").string());
}

CheckpointFormat checkpoint_format_of(const std::string& dir) {
  const json j = read_config_json(dir);
  if (auto it = j.find("dsv4_weight_format"); it != j.end() && it->is_string())
    return CheckpointFormat::named(it->get<std::string>());
  return CheckpointFormat::from_config(load_checkpoint_config(dir));
}

namespace {

json rope_scaling_json(const ModelConfig& c) {
  if (!c.yarn.enabled) return json{{"type", "default"}};
  return json{{"type", "yarn"},
              {"factor", c.yarn.factor},
              {"original_max_position_embeddings", c.yarn.original_seq_len},
              {"beta_fast", c.yarn.beta_fast},
              {"beta_slow", c.yarn.beta_slow}};
}

const char* score_func_name(ScoreFunc f) {
  switch (f) {
    case ScoreFunc::SqrtSoftplus: return "sqrtsoftplus";
    case ScoreFunc::Softmax: return "softmax";
    case ScoreFunc::Sigmoid: return "sigmoid";
  }
  return "?";
}

json common_hf_keys(const ModelConfig& c) {
  return json{{"architectures", {"DeepseekV4ForCausalLM"}},
              {"model_type", "deepseek_v4"},
              {"vocab_size", c.vocab_size},
              {"hidden_size", c.dim},
              {"num_hidden_layers", c.n_layers},
              {"num_attention_heads", c.n_heads},
              {"num_key_value_heads", 1},
              {"head_dim", c.head_dim},
              {"qk_rope_head_dim", c.rope_head_dim},
              {"q_lora_rank", c.q_lora_rank},
              {"o_groups", c.o_groups},
              {"o_lora_rank", c.o_lora_rank},
              {"sliding_window", c.window_size},
              {"n_routed_experts", c.n_routed_experts},
              {"num_experts_per_tok", c.n_activated_experts},
              {"n_shared_experts", c.n_shared_experts},
              {"moe_intermediate_size", c.moe_inter_dim},
              {"scoring_func", score_func_name(c.score_func)},
              {"routed_scaling_factor", c.route_scale},
              {"norm_topk_prob", true},
              {"swiglu_limit", c.swiglu_limit},
              {"index_n_heads", c.index_n_heads},
              {"index_head_dim", c.index_head_dim},
              {"index_topk", c.index_topk},
              {"hc_mult", c.hc_mult},
              {"hc_sinkhorn_iters", c.hc_sinkhorn_iters},
              {"hc_eps", c.hc_eps},
              {"rms_norm_eps", c.norm_eps},
              {"rope_theta", c.rope_theta},
              {"compress_rope_theta", c.compress_rope_theta},
              {"num_nextn_predict_layers", c.n_mtp_layers},
              {"bos_token_id", c.bos_token_id},
              {"eos_token_id", c.eos_token_id},
              {"tie_word_embeddings", c.tie_word_embeddings},
              {"hidden_act", "silu"},
              {"attention_bias", false}};
}

// The YaRN target length, as the release states it (65536 * 16 = 1048576 for V4).
void add_max_positions(json& j, const ModelConfig& c) {
  if (c.yarn.enabled)
    j["max_position_embeddings"] = static_cast<int64_t>(static_cast<double>(c.yarn.original_seq_len) * c.yarn.factor);
}

}  // namespace

std::string release_config_json(const ModelConfig& c, const CheckpointFormat& f) {
  json j = common_hf_keys(c);
  j["num_hash_layers"] = c.n_hash_layers;
  j["compress_ratios"] = c.compress_ratios;
  j["rope_scaling"] = rope_scaling_json(c);
  j["topk_method"] = "noaux_tc";
  add_max_positions(j, c);
  j["torch_dtype"] = "bfloat16";
  if (f.dense == WeightFormat::FP8)
    j["quantization_config"] = {{"activation_scheme", "dynamic"},
                                {"fmt", "e4m3"},
                                {"quant_method", "fp8"},
                                {"scale_fmt", f.scale == ScaleFormat::E8M0 ? json("ue8m0") : json(nullptr)},
                                {"weight_block_size", {kFp8Block, kFp8Block}}};
  else
    j["dtype"] = "bf16";  // native key: unquantised dense weights (F32 checkpoints say so in dsv4_weight_format)
  j["expert_dtype"] = f.expert == WeightFormat::F32 ? std::string("bf16") : std::string(weight_format_name(f.expert));
  if (f.name != "custom") j["dsv4_weight_format"] = f.name;
  return j.dump(2) + "\n";
}

std::string transformers_config_json(const ModelConfig& c, const CheckpointFormat& f) {
  DSV4_CHECK(!f.quantized(), "{}: the transformers layout holds unquantised weights (f32 or bf16), not {}", c.name,
             f.str());
  json j = common_hf_keys(c);
  int64_t hca = 128;
  bool have_hca = false;
  std::vector<std::string> types;
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const int64_t m = c.compress_ratio(i);
    if (m == 0) {
      types.push_back("sliding_attention");
    } else if (m == 4) {
      types.push_back("compressed_sparse_attention");
    } else {
      DSV4_CHECK(!have_hca || m == hca, "{}: transformers has one HCA compress rate; layers use {} and {}", c.name, hca, m);
      hca = m;
      have_hca = true;
      types.push_back("heavily_compressed_attention");
    }
  }
  std::vector<std::string> mlp;
  for (int64_t i = 0; i < c.n_layers; ++i) mlp.push_back(i < c.n_hash_layers ? "hash_moe" : "moe");
  j["layer_types"] = types;
  j["mlp_layer_types"] = mlp;
  j["compress_rates"] = {{"compressed_sparse_attention", 4}, {"heavily_compressed_attention", hca}};
  const double prf = static_cast<double>(c.rope_head_dim) / static_cast<double>(c.head_dim);
  j["partial_rotary_factor"] = prf;
  json compress = {{"rope_theta", c.compress_rope_theta}, {"partial_rotary_factor", prf}};
  if (c.yarn.enabled) {
    compress["rope_type"] = "yarn";
    compress["factor"] = c.yarn.factor;
    compress["original_max_position_embeddings"] = c.yarn.original_seq_len;
    compress["beta_fast"] = c.yarn.beta_fast;
    compress["beta_slow"] = c.yarn.beta_slow;
    compress["attention_factor"] = 1.0;
  } else {
    compress["rope_type"] = "default";
  }
  j["rope_parameters"] = {
      {"main", {{"rope_type", "default"}, {"rope_theta", c.rope_theta}, {"partial_rotary_factor", prf}}},
      {"compress", compress}};
  j["mlp_bias"] = false;
  add_max_positions(j, c);
  j["dsv4_weight_format"] = f.name;
  return j.dump(2) + "\n";
}

// ---- loading --------------------------------------------------------------------------------------------------
CheckpointLayout detect_layout(const std::vector<std::string>& names) {
  for (const std::string& n : names)
    if (n.rfind("model.", 0) == 0 || n.rfind("lm_head.", 0) == 0) return CheckpointLayout::Transformers;
  return CheckpointLayout::Release;
}

namespace {

// dst (contiguous F32) = src converted element by element, without a converted temporary of src.
void convert_to_f32(const Tensor& src, Tensor& dst) {
  if (!src.is_contiguous() || !src.device().is_cpu()) {
    ops::copy(src, dst);
    return;
  }
  float* d = dst.data<float>();
  const int64_t n = src.numel();
  switch (src.dtype()) {
    case DType::F32: std::memcpy(d, src.raw_data(), static_cast<size_t>(n) * sizeof(float)); return;
    case DType::BF16: {
      const uint16_t* p = src.data_u16();
      for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(p[i]);
      return;
    }
    case DType::F16: {
      const uint16_t* p = src.data_u16();
      for (int64_t i = 0; i < n; ++i) d[i] = f16_to_f32(p[i]);
      return;
    }
    default: ops::copy(src, dst);
  }
}

}  // namespace

TpPart tp_local_part(const Param& p, const Shape& local_shape, const Tensor& w, const Tensor& s, const std::string& name) {
  if (p.placement != Placement::TpSplit) return {w, s};
  const int dim = p.shard_dim;
  DSV4_CHECK(dim >= 0 && dim < w.ndim() && dim < local_shape.ndim(), "{}: tp split dim {} outside the tensor {}", name,
             dim, w.str());
  const int64_t off = p.shard_offset, n = local_shape[dim], global = w.size(dim);
  DSV4_CHECK(global == p.global_dim && off >= 0 && off + n <= global,
             "{}: tp slice [{}, {}) of dim {} does not fit the checkpoint tensor {} (global size {})", name, off, off + n,
             dim, w.str(), p.global_dim);
  const bool fp8 = w.dtype() == DType::F8_E4M3;
  const bool fp4 = w.dtype() == DType::F4_E2M1 || w.dtype() == DType::I8 || w.dtype() == DType::U8;
  if (!fp8 && !fp4) return {w.slice(dim, off, off + n), s};
  DSV4_CHECK(w.ndim() == 2 && s.defined() && s.ndim() == 2, "{}: a quantized weight {} needs a 2-D scale, got {}",
             name, w.str(), s.defined() ? s.str() : std::string("none"));
  // FP8: 128x128 scale blocks; FP4: 1x32 blocks along the columns (rows are independent).
  const int64_t block = fp8 ? 128 : (dim == 1 ? 32 : 1);
  DSV4_CHECK(off % block == 0 && ((off + n) % block == 0 || off + n == global),
             "{}: the tp slice [{}, {}) of dim {} (size {}) is not aligned to the {} scale block of {}", name, off,
             off + n, dim, global, fp8 ? "FP8 128x128" : "FP4 1x32", block);
  const int64_t s0 = off / block, s1 = (off + n + block - 1) / block;
  Tensor data;
  if (fp4 && dim == 1 && w.dtype() != DType::F4_E2M1) {
    // packed bytes [out, in/2] with a logical width of 2 * size(1)
    DSV4_CHECK(off % 2 == 0 && n % 2 == 0, "{}: tp slice [{}, {}) splits a packed FP4 byte", name, off, off + n);
    data = w.slice(1, off / 2, (off + n) / 2);
  } else {
    data = w.slice(dim, off, off + n);
  }
  return {data.contiguous(), s.slice(dim, s0, s1).contiguous()};
}

namespace {

// Copies / converts one checkpoint tensor (w, with its scale s) into the model: for a TpSplit parameter only this
// rank's slice (tp_local_part: a view over the mapping, so only the slice's pages are read; a frozen quantized weight
// sliced in storage precision with its scales; a quantized weight loaded as F32 dequantised from its rows, which
// needs no scale-block alignment).
void load_entry(WeightSlot& slot, const ParamEntry& e, const Tensor& w_full, const Tensor& s_full, LoadMode mode,
                bool frozen_wo_a, LoadReport& r) {
  Param& p = *slot.param;
  const bool quantized = w_full.dtype() == DType::F8_E4M3 || w_full.dtype() == DType::I8 || w_full.dtype() == DType::U8;
  const bool frozen = mode == LoadMode::FrozenQuantized && e.role != TensorRole::Index &&
                      (e.holder != WeightHolder::Param || (frozen_wo_a && slot.attn));
  if (quantized && !frozen && p.placement == Placement::TpSplit) {
    // Dequantised into an F32 slice: from the whole weight's rows (no scale-block alignment needed).
    const QuantizedWeight q = QuantizedWeight::from_tensors(w_full, s_full, e.name);
    Tensor& dst = slot.f32_value();
    const int64_t off = p.shard_offset, n = slot.shape[p.shard_dim];
    DSV4_CHECK(q.shape().ndim() == 2 && p.shard_dim >= 0 && p.shard_dim < 2 && off + n <= q.shape()[p.shard_dim],
               "{}: tp slice [{}, {}) of dim {} does not fit the checkpoint weight {}", e.name, off, off + n,
               p.shard_dim, q.str());
    if (p.shard_dim == 0) {
      q.dequant_rows(off, off + n, dst.data<float>());
    } else {
      const int64_t cols = q.cols(), chunk = 128;
      std::vector<float> rows(static_cast<size_t>(chunk * cols));
      for (int64_t r0 = 0; r0 < q.rows(); r0 += chunk) {
        const int64_t r1 = std::min(q.rows(), r0 + chunk);
        q.dequant_rows(r0, r1, rows.data());
        for (int64_t i = r0; i < r1; ++i)
          std::memcpy(dst.data<float>() + i * n, rows.data() + (i - r0) * cols + off, static_cast<size_t>(n) * 4);
      }
    }
    p.trainable = e.trainable;
    return;
  }
  const TpPart part = tp_local_part(p, slot.shape, w_full, s_full, e.name);
  const Tensor& w = part.data;
  const Tensor& s = part.scale;
  if (e.role == TensorRole::Index) {  // tid2eid: I64 in the release; I32 cast on load
    DSV4_CHECK(p.value.dtype() == DType::I64 && p.value.shape() == w.shape() && p.value.is_contiguous(),
               "{}: the model holds {}, the checkpoint {}", e.name, p.value.str(), w.str());
    int64_t* dst = p.value.data<int64_t>();
    const Tensor src = w.contiguous();
    if (src.dtype() == DType::I64) {
      std::memcpy(dst, src.raw_data(), static_cast<size_t>(src.nbytes()));
    } else {
      const int32_t* s32 = src.data<int32_t>();
      for (int64_t i = 0; i < src.numel(); ++i) dst[i] = s32[i];
    }
    p.trainable = false;
    return;
  }
  if (frozen) {
    const Tensor data = w.dtype() == DType::F16 ? w.to(DType::F32) : w.contiguous();
    QuantizedWeight q = QuantizedWeight::from_tensors(data, quantized ? s : Tensor(), e.name).clone();
    ++r.frozen_weights;
    r.frozen_bytes += q.nbytes();
    slot.set_frozen(std::move(q));
    return;
  }
  Tensor& dst = slot.f32_value();
  if (quantized) {  // dequantised straight into the parameter
    const QuantizedWeight q = QuantizedWeight::from_tensors(w, s, e.name);
    q.dequant_rows(0, q.rows(), dst.data<float>());
  } else {
    DSV4_CHECK(w.shape() == dst.shape(), "{}: checkpoint {} does not fit the parameter {}", e.name, w.str(), dst.str());
    convert_to_f32(w, dst);
  }
  p.trainable = e.trainable;
}

void throw_mismatch(const std::string& path, const ParamTable& table, CheckpointLayout layout,
                    const std::vector<std::string>& missing, const std::vector<std::string>& unexpected,
                    const std::vector<std::string>& wrong) {
  if (missing.empty() && unexpected.empty() && wrong.empty()) return;
  DSV4_FAIL(
      "checkpoint '{}' ({} layout) does not match the parameter table of model '{}' (format {}): "
      "{} missing [{}]; {} unexpected [{}]; {} with a wrong shape or dtype [{}]",
      path, checkpoint_layout_name(layout), table.config().name, table.format().str(), missing.size(),
      join_list(missing), unexpected.size(), join_list(unexpected), wrong.size(), join_list(wrong));
}

std::map<std::string, std::vector<std::string>> names_by_file(const SafetensorsCheckpoint& ck) {
  std::map<std::string, std::vector<std::string>> by_file;
  for (const std::string& n : ck.names()) by_file[ck.file_of(n)].push_back(n);
  return by_file;
}

// Checks a release-layout checkpoint against the table (one error listing every problem); returns the table's disk
// tensors by name.
std::map<std::string, ParamTable::DiskTensor> validate_release(const SafetensorsCheckpoint& ck, const std::string& path,
                                                               const ParamTable& table, LoadReport& r) {
  std::map<std::string, ParamTable::DiskTensor> expected;
  for (const auto& d : table.disk_tensors()) expected.emplace(d.name, d);
  const auto by_file = names_by_file(ck);
  std::vector<std::string> missing, unexpected, wrong;
  for (const auto& [file, names] : by_file) {
    const SafetensorsFile& f = ck.shard(file);
    r.max_shard_bytes = std::max(r.max_shard_bytes, f.file_size());
    for (const std::string& name : names) {
      const SafetensorsEntry& se = f.entry(name);
      auto it = expected.find(name);
      if (it == expected.end()) {
        unexpected.push_back(fmt::format("{} ({} in {})", name, tensor_desc(se.dtype, se.shape), file));
        continue;
      }
      const auto& d = it->second;
      const bool dtype_ok =
          se.dtype == d.dtype || (d.entry->role == TensorRole::Index && !d.is_scale && se.dtype == DType::I32);
      if (!dtype_ok || !(se.shape == d.shape))
        wrong.push_back(fmt::format("{} in {}: expected {}, got {}", name, file, tensor_desc(d.dtype, d.shape),
                                    tensor_desc(se.dtype, se.shape)));
    }
    ck.release_shards();
  }
  for (const auto& [name, d] : expected)
    if (!ck.contains(name)) missing.push_back(fmt::format("{} ({})", name, tensor_desc(d.dtype, d.shape)));
  throw_mismatch(path, table, CheckpointLayout::Release, missing, unexpected, wrong);
  return expected;
}

void load_release(Model& model, const SafetensorsCheckpoint& ck, const std::string& path, const ParamTable& table,
                  LoadMode mode, bool frozen_wo_a, LoadReport& r) {
  const auto expected = validate_release(ck, path, table, r);
  const auto by_file = names_by_file(ck);
  auto slots = model_weight_slots(model);
  for (const auto& [file, names] : by_file) {
    for (const std::string& name : names) {
      const auto& d = expected.at(name);
      if (d.is_scale) continue;
      const ParamEntry& e = *d.entry;
      auto sit = slots.find(e.name);
      if (sit == slots.end() && model.foreign_expert(e.name)) continue;  // another rank's expert: not read
      DSV4_CHECK(sit != slots.end(), "the model has no parameter '{}' (table and model disagree)", e.name);
      load_entry(sit->second, e, ck.view(name), e.scale ? ck.view(e.scale->name) : Tensor(), mode, frozen_wo_a, r);
      r.tensors += e.scale ? 2 : 1;
      r.bytes += e.disk_bytes();
    }
    ck.release_shards();  // nothing of this shard stays mapped
  }
  r.shards = static_cast<int64_t>(by_file.size());
}

// transformers names -> native. Part: 0 the whole tensor, 1 / 3 the w1 / w3 rows of a stacked gate_up_proj,
// 2 one expert of a stacked down_proj.
struct HfTarget {
  const ParamEntry* entry;
  int part = 0;
  int64_t expert = -1;
};

const std::regex kHfStacked(R"(^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$)");
const std::regex kSavedKvNorm(R"(^(layers\.\d+\.attn\.)norm\.weight$)");

// The native name of a transformers-layout tensor (state-dict names, or the names save_pretrained writes).
std::optional<std::string> hf_name_to_native(const std::string& n, const ParamTable& table) {
  if (auto native = hf_to_native_name(n); native && table.find(*native)) return native;
  std::string s = n.rfind("model.", 0) == 0 ? n.substr(6) : n;
  if (s == "embed_tokens.weight") s = "embed.weight";
  else if (s == "lm_head.weight") s = "head.weight";
  else if (s.rfind("hc_head.hc_", 0) == 0) s = "hc_head_" + s.substr(11);
  std::smatch m;
  if (std::regex_match(s, m, kSavedKvNorm)) s = m[1].str() + "kv_norm.weight";
  if (table.find(s)) return s;
  return std::nullopt;
}

// Checks a transformers-layout checkpoint against the table (one error listing every problem); returns what each
// checkpoint tensor fills. MTP entries it lacks go to r.not_in_checkpoint.
std::map<std::string, std::vector<HfTarget>> plan_transformers(const SafetensorsCheckpoint& ck, const std::string& path,
                                                               const ParamTable& table, LoadReport& r) {
  const ModelConfig& c = table.config();
  const auto by_file = names_by_file(ck);
  std::map<std::string, std::vector<HfTarget>> targets;  // checkpoint name -> what it fills
  std::map<std::string, std::string> covered;            // native name -> checkpoint name
  std::vector<std::string> missing, unexpected, wrong;
  for (const auto& [file, names] : by_file) {
    const SafetensorsFile& f = ck.shard(file);
    r.max_shard_bytes = std::max(r.max_shard_bytes, f.file_size());
    for (const std::string& name : names) {
      const SafetensorsEntry& se = f.entry(name);
      std::vector<HfTarget> ts;
      Shape want;
      bool index = false;
      std::smatch m;
      if (std::regex_match(name, m, kHfStacked)) {
        const std::string base = "layers." + m[1].str() + ".ffn.experts.";
        const bool gate_up = m[2] == "gate_up_proj";
        for (int64_t e = 0; e < c.n_routed_experts; ++e) {
          const std::string eb = base + std::to_string(e) + ".";
          for (int k : gate_up ? std::vector<int>{1, 3} : std::vector<int>{2})
            if (const ParamEntry* pe = table.find(eb + "w" + std::to_string(k) + ".weight")) ts.push_back({pe, k, e});
        }
        want = gate_up ? Shape{c.n_routed_experts, 2 * c.moe_inter_dim, c.dim}
                       : Shape{c.n_routed_experts, c.dim, c.moe_inter_dim};
        if (ts.empty()) {
          unexpected.push_back(fmt::format("{} ({} in {})", name, tensor_desc(se.dtype, se.shape), file));
          continue;
        }
      } else if (const auto native = hf_name_to_native(name, table)) {
        const ParamEntry& pe = table.at(*native);
        ts.push_back({&pe, 0, -1});
        want = pe.shape;
        index = pe.role == TensorRole::Index;
      } else {
        unexpected.push_back(fmt::format("{} ({} in {})", name, tensor_desc(se.dtype, se.shape), file));
        continue;
      }
      const bool dtype_ok = index ? (se.dtype == DType::I64 || se.dtype == DType::I32) : is_float_dtype_on_disk(se.dtype);
      if (!dtype_ok || !(se.shape == want))
        wrong.push_back(fmt::format("{} in {}: expected {}{}, got {}", name, file, index ? "I64" : "F32/BF16/F16",
                                    want.str(), tensor_desc(se.dtype, se.shape)));
      for (const HfTarget& t : ts) {
        const auto [it, inserted] = covered.emplace(t.entry->name, name);
        if (!inserted)
          wrong.push_back(fmt::format("{} is given twice: by {} and by {} (in {})", t.entry->name, it->second, name, file));
      }
      targets[name] = std::move(ts);
    }
    ck.release_shards();
  }
  for (const ParamEntry& e : table.entries()) {
    if (covered.count(e.name)) continue;
    if (e.name.rfind("mtp.", 0) == 0) r.not_in_checkpoint.push_back(e.name);  // transformers has no MTP block
    else missing.push_back(fmt::format("{} ({}{})", e.name, e.role == TensorRole::Index ? "I64" : "F32", e.shape.str()));
  }
  throw_mismatch(path, table, CheckpointLayout::Transformers, missing, unexpected, wrong);
  return targets;
}

// The slice of checkpoint tensor v that target t fills.
Tensor hf_part(const Tensor& v, const HfTarget& t, int64_t inter) {
  Tensor part = v;
  if (t.expert >= 0) {
    part = v.select(0, t.expert);
    if (t.part == 1) part = part.slice(0, 0, inter);
    if (t.part == 3) part = part.slice(0, inter, 2 * inter);
  }
  return part;
}

void load_transformers(Model& model, const SafetensorsCheckpoint& ck, const std::string& path, const ParamTable& table,
                       LoadMode mode, bool frozen_wo_a, LoadReport& r) {
  const ModelConfig& c = table.config();
  const auto targets = plan_transformers(ck, path, table, r);
  const auto by_file = names_by_file(ck);
  auto slots = model_weight_slots(model);
  for (const auto& [file, names] : by_file) {
    for (const std::string& name : names) {
      const Tensor v = ck.view(name);
      for (const HfTarget& t : targets.at(name)) {
        if (!slots.count(t.entry->name) && model.foreign_expert(t.entry->name)) continue;  // another rank's expert
        load_entry(slots.at(t.entry->name), *t.entry, hf_part(v, t, c.moe_inter_dim), Tensor(), mode, frozen_wo_a, r);
      }
      ++r.tensors;
      r.bytes += v.nbytes();
    }
    ck.release_shards();
  }
  r.shards = static_cast<int64_t>(by_file.size());
}

}  // namespace

LoadReport load_checkpoint(Model& model, const std::string& dir, const LoadOptions& opts) {
  const SafetensorsCheckpoint ck = SafetensorsCheckpoint::open(dir);
  LoadReport r;
  r.path = dir;
  r.layout = detect_layout(ck.names());
  ParamTableOptions topts;
  topts.frozen_base = opts.mode == LoadMode::FrozenQuantized;
  topts.optimizer_group = opts.optimizer_group;
  if (r.layout == CheckpointLayout::Release) {
    if (opts.format) topts.format = *opts.format;
    else if (fs::is_directory(dir) && fs::exists(fs::path(dir) / "config.json")) topts.format = checkpoint_format_of(dir);
    const ParamTable table = ParamTable::build(model.config(), topts);
    r.format = table.format();
    load_release(model, ck, dir, table, opts.mode, opts.frozen_wo_a, r);
  } else {
    topts.format = CheckpointFormat::named("f32");  // shapes only: float dtypes are accepted as they come
    const ParamTable table = ParamTable::build(model.config(), topts);
    r.format = table.format();
    r.format.name = "unquantised (F32/BF16/F16 as stored)";
    load_transformers(model, ck, dir, table, opts.mode, opts.frozen_wo_a, r);
  }
  return r;
}

std::unique_ptr<Model> load_model(const std::string& dir, const LoadOptions& opts, const ModelOptions& model_opts,
                                  LoadReport* report) {
  std::unique_ptr<Model> model;
  {
    DeferredWeightStorage defer;  // Linear / expert weights get their storage from the checkpoint only
    model = std::make_unique<Model>(load_checkpoint_config(dir), model_opts);
  }
  LoadReport r = load_checkpoint(*model, dir, opts);
  // Weights the checkpoint does not hold (MTP of a transformers checkpoint) start at zero, as in a new Model.
  for (auto& [name, slot] : model_weight_slots(*model))
    if (!slot.frozen() && !slot.param->value.defined()) slot.f32_value();
  if (report) *report = std::move(r);
  return model;
}

// ---- writing --------------------------------------------------------------------------------------------------
Tensor WeightValue::to_f32(bool owned) const {
  if (quantized.defined()) return quantized.dequantize();
  DSV4_CHECK(plain.defined(), "WeightValue::to_f32: no value");
  if (plain.dtype() == DType::F32) return owned ? plain.clone() : plain;
  return plain.to(DType::F32);
}

namespace {

// The release-layout tensors of one entry (the weight, and its scale when quantised).
void release_tensors(const ParamEntry& e, const WeightValue& v, const CheckpointFormat& fmt,
                     std::vector<std::pair<std::string, Tensor>>& out) {
  DSV4_CHECK(v.defined(), "writing '{}': no value", e.name);
  if (e.role == TensorRole::Index) {
    DSV4_CHECK(v.plain.defined(), "writing '{}': expected an integer table", e.name);
    out.emplace_back(e.name, v.plain.dtype() == DType::I64 ? v.plain : v.plain.to(DType::I64));
    return;
  }
  const QuantizedWeight& fz = v.quantized;
  if (fz.defined() && fz.format == e.format && (e.format != WeightFormat::FP8 || fz.scale_format() == fmt.scale)) {
    out.emplace_back(e.name, fz.data);  // byte for byte (packed FP4 is written as I8 [out, in/2])
    if (e.scale) out.emplace_back(e.scale->name, fz.scale);
    return;
  }
  const Tensor f32 = v.to_f32();
  DSV4_CHECK(f32.shape() == e.shape, "writing '{}': value {} does not match {}", e.name, f32.str(), e.shape.str());
  if (e.format == WeightFormat::FP8 || e.format == WeightFormat::FP4) {
    QuantizedWeight q = quantize_weight(f32, e.format, fmt.scale, e.name);
    out.emplace_back(e.name, q.data);
    out.emplace_back(e.scale->name, q.scale);
    return;
  }
  out.emplace_back(e.name, f32.to(e.disk_dtype));
}

ParamTable writer_table(const ModelConfig& cfg, const SaveOptions& opts, const std::string& dir) {
  DSV4_CHECK(opts.layout != CheckpointLayout::Transformers || !opts.format.quantized(),
             "writing '{}': the transformers layout is unquantised (f32 or bf16), not {}", dir, opts.format.str());
  ParamTableOptions topts;
  topts.format = opts.format;
  return ParamTable::build(cfg, topts);
}

}  // namespace

CheckpointWriter::CheckpointWriter(const ModelConfig& cfg, std::string dir, const SaveOptions& opts)
    : cfg_(cfg), dir_(std::move(dir)), opts_(opts), table_(writer_table(cfg, opts, dir_)) {
  const bool hf = opts_.layout == CheckpointLayout::Transformers;
  // Shard groups: release = the table's files; transformers = the same without the MTP file.
  n_shards_ = hf ? static_cast<int>(cfg_.n_layers + 2) : table_.num_shards();
  groups_.assign(static_cast<size_t>(n_shards_) + 1, {});
  written_.assign(static_cast<size_t>(n_shards_) + 1, false);
  for (const ParamEntry& e : table_.entries())
    if (e.shard_file <= n_shards_) groups_[static_cast<size_t>(e.shard_file)].push_back(&e);
  fs::create_directories(dir_);
}

int64_t CheckpointWriter::write_shard(int s, const std::function<WeightValue(const ParamEntry&)>& value) {
  DSV4_CHECK(s >= 1 && s <= n_shards_, "CheckpointWriter('{}'): shard {} outside 1..{}", dir_, s, n_shards_);
  DSV4_CHECK(!written_[static_cast<size_t>(s)], "CheckpointWriter('{}'): shard {} written twice", dir_, s);
  const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", s, n_shards_);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const ParamEntry* e : groups_[static_cast<size_t>(s)]) release_tensors(*e, value(*e), opts_.format, tensors);
  if (opts_.layout == CheckpointLayout::Transformers) {
    std::map<std::string, Tensor> native(tensors.begin(), tensors.end());
    const std::map<std::string, Tensor> hf_state = native_state_to_hf(native);
    tensors.assign(hf_state.begin(), hf_state.end());
  }
  int64_t bytes = 0;
  for (const auto& [name, t] : tensors) {
    weight_map_[name] = file;
    bytes += t.nbytes();
  }
  rep_.total_size += bytes;
  rep_.tensors += static_cast<int64_t>(tensors.size());
  write_safetensors((fs::path(dir_) / file).string(), tensors, {{"format", "pt"}});
  written_[static_cast<size_t>(s)] = true;
  return bytes;
}

SaveReport CheckpointWriter::finish() {
  for (int s = 1; s <= n_shards_; ++s)
    DSV4_CHECK(written_[static_cast<size_t>(s)], "CheckpointWriter('{}'): shard {} of {} was never written", dir_, s,
               n_shards_);
  const bool hf = opts_.layout == CheckpointLayout::Transformers;
  rep_.shards = n_shards_;
  write_safetensors_index((fs::path(dir_) / "model.safetensors.index.json").string(), weight_map_, rep_.total_size);
  if (opts_.write_config)
    write_file_atomic((fs::path(dir_) / "config.json").string(),
                      hf ? transformers_config_json(cfg_, opts_.format) : release_config_json(cfg_, opts_.format));
  return rep_;
}

SaveReport save_checkpoint(Model& model, const std::string& dir, const SaveOptions& opts) {
  CheckpointWriter w(model.config(), dir, opts);
  auto slots = model_weight_slots(model);
  for (const ParamEntry& e : w.table().entries())
    DSV4_CHECK(slots.count(e.name), "save_checkpoint: the model has no parameter '{}'", e.name);
  for (int s = 1; s <= w.num_shards(); ++s)
    w.write_shard(s, [&](const ParamEntry& e) {
      const WeightSlot& slot = slots.at(e.name);
      WeightValue v;
      if (const QuantizedWeight* q = slot.frozen_weight()) {
        v.quantized = *q;
      } else {
        DSV4_CHECK(slot.param->value.defined(), "{}: the parameter has no value", e.name);
        v.plain = slot.param->value;
      }
      return v;
    });
  return w.finish();
}

// ---- streaming reader -------------------------------------------------------------------------------------------
struct CheckpointReader::Impl {
  std::string dir;
  ModelConfig cfg;
  CheckpointLayout layout = CheckpointLayout::Release;
  CheckpointFormat format;
  SafetensorsCheckpoint ck;
  std::unique_ptr<ParamTable> table;
  std::map<std::string, ParamTable::DiskTensor> release;        // release layout: disk tensors by name
  std::map<std::string, std::pair<std::string, HfTarget>> hf;   // transformers layout: native -> (tensor, part)
};

CheckpointReader::CheckpointReader(const std::string& dir) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.dir = dir;
  m.cfg = load_checkpoint_config(dir);
  m.ck = SafetensorsCheckpoint::open(dir);
  m.layout = detect_layout(m.ck.names());
  LoadReport r;
  ParamTableOptions topts;
  if (m.layout == CheckpointLayout::Release) {
    topts.format = checkpoint_format_of(dir);
    m.table = std::make_unique<ParamTable>(ParamTable::build(m.cfg, topts));
    m.format = m.table->format();
    m.release = validate_release(m.ck, dir, *m.table, r);
  } else {
    topts.format = CheckpointFormat::named("f32");
    m.table = std::make_unique<ParamTable>(ParamTable::build(m.cfg, topts));
    m.format = m.table->format();
    for (const auto& [name, ts] : plan_transformers(m.ck, dir, *m.table, r))
      for (const HfTarget& t : ts) m.hf.emplace(t.entry->name, std::make_pair(name, t));
  }
  m.ck.release_shards();
}

CheckpointReader::~CheckpointReader() = default;
CheckpointReader::CheckpointReader(CheckpointReader&&) noexcept = default;
CheckpointReader& CheckpointReader::operator=(CheckpointReader&&) noexcept = default;

const std::string& CheckpointReader::dir() const { return impl_->dir; }
const ModelConfig& CheckpointReader::config() const { return impl_->cfg; }
CheckpointLayout CheckpointReader::layout() const { return impl_->layout; }
const CheckpointFormat& CheckpointReader::format() const { return impl_->format; }

bool CheckpointReader::contains(const std::string& native_name) const {
  return impl_->layout == CheckpointLayout::Release ? impl_->release.count(native_name) != 0
                                                    : impl_->hf.count(native_name) != 0;
}

WeightValue CheckpointReader::get(const ParamEntry& e) const {
  const Impl& m = *impl_;
  WeightValue v;
  if (m.layout == CheckpointLayout::Transformers) {
    auto it = m.hf.find(e.name);
    DSV4_CHECK(it != m.hf.end(), "checkpoint '{}' (transformers layout) has no tensor for '{}'", m.dir, e.name);
    v.plain = hf_part(m.ck.view(it->second.first), it->second.second, m.cfg.moe_inter_dim);
    if (e.role == TensorRole::Index && v.plain.dtype() != DType::I64) v.plain = v.plain.to(DType::I64);
    return v;
  }
  DSV4_CHECK(m.release.count(e.name), "checkpoint '{}' has no tensor '{}'", m.dir, e.name);
  const ParamEntry& own = m.table->at(e.name);  // this checkpoint's format (e may come from another table)
  const Tensor w = m.ck.view(own.name);
  const bool quantized = w.dtype() == DType::F8_E4M3 || w.dtype() == DType::I8 || w.dtype() == DType::U8;
  if (own.role == TensorRole::Index) {
    v.plain = w.dtype() == DType::I64 ? w : w.to(DType::I64);
  } else if (own.holder != WeightHolder::Param || quantized) {
    v.quantized =
        QuantizedWeight::from_tensors(w, quantized && own.scale ? m.ck.view(own.scale->name) : Tensor(), own.name);
  } else {
    v.plain = w;
  }
  return v;
}

void CheckpointReader::release() const { impl_->ck.release_shards(); }

// ---- tiny checkpoints ----------------------------------------------------------------------------------------
CheckpointFormat format_for_quant(const std::string& quant) {
  if (quant == "fp8") return CheckpointFormat::named("instruct");
  if (quant == "fp8-base") return CheckpointFormat::named("base");
  if (quant == "bf16") return CheckpointFormat::named("bf16");
  if (quant == "none" || quant == "f32") return CheckpointFormat::named("f32");
  DSV4_FAIL("unknown quantisation '{}' (expected fp8, fp8-base, bf16 or none)", quant);
}

SaveReport make_tiny_checkpoint(const std::string& dir, const MakeTinyOptions& opts) {
  ModelConfig cfg = model_preset(opts.preset);
  Model model(cfg);
  model.init_random(opts.seed, opts.stddev);
  if (opts.full_random) {
    std::mt19937_64 rng(opts.seed ^ 0x9E3779B97F4A7C15ull);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
    auto ends = [](const std::string& s, const char* suffix) {
      const size_t n = std::strlen(suffix);
      return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
    };
    model.visit([&](Param& p) {
      if (p.value.dtype() != DType::F32) return;
      float* v = p.value.data<float>();
      const int64_t n = p.value.numel();
      const std::string& name = p.name;
      if (ends(name, "norm.weight")) {
        for (int64_t i = 0; i < n; ++i) v[i] = 1.0f + 0.1f * normal(rng);
      } else if (name.find("hc_") != std::string::npos && ends(name, "_base")) {
        for (int64_t i = 0; i < n; ++i) v[i] = 0.5f * normal(rng);
      } else if (name.find("hc_") != std::string::npos && ends(name, "_scale")) {
        for (int64_t i = 0; i < n; ++i) v[i] = uniform(rng);
      } else if (ends(name, "attn_sink") || ends(name, ".ape")) {
        for (int64_t i = 0; i < n; ++i) v[i] = 0.5f * normal(rng);
      } else if (ends(name, "gate.bias")) {
        for (int64_t i = 0; i < n; ++i) v[i] = 0.3f * normal(rng);
      }
    });
  }
  SaveOptions so;
  so.layout = opts.layout;
  so.format = format_for_quant(opts.quant);
  return save_checkpoint(model, dir, so);
}

}  // namespace dsv4
