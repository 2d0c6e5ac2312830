#include "model/param_table.h"

#include "runtime/error.h"

namespace dsv4 {

std::string_view tensor_role_name(TensorRole r) {
  switch (r) {
    case TensorRole::Dense: return "dense";
    case TensorRole::Expert: return "expert";
    case TensorRole::Plain: return "plain";
    case TensorRole::F32: return "f32";
    case TensorRole::Index: return "index";
  }
  return "?";
}

// ---- CheckpointFormat ------------------------------------------------------------------------------------
CheckpointFormat CheckpointFormat::named(const std::string& name) {
  CheckpointFormat f;
  f.name = name;
  if (name == "instruct") {
    f.dense = WeightFormat::FP8, f.expert = WeightFormat::FP4, f.scale = ScaleFormat::E8M0, f.plain = DType::BF16;
  } else if (name == "base") {
    f.dense = WeightFormat::FP8, f.expert = WeightFormat::FP8, f.scale = ScaleFormat::F32, f.plain = DType::BF16;
  } else if (name == "bf16") {
    f.dense = WeightFormat::BF16, f.expert = WeightFormat::BF16, f.scale = ScaleFormat::E8M0, f.plain = DType::BF16;
  } else if (name == "f32") {
    f.dense = WeightFormat::F32, f.expert = WeightFormat::F32, f.scale = ScaleFormat::E8M0, f.plain = DType::F32;
  } else {
    DSV4_FAIL("unknown checkpoint format '{}' (expected instruct, base, bf16 or f32)", name);
  }
  return f;
}

CheckpointFormat CheckpointFormat::from_config(const ModelConfig& cfg) {
  auto fmt = [&](const std::string& s, const char* key) {
    if (s == "fp8") return WeightFormat::FP8;
    if (s == "fp4") return WeightFormat::FP4;
    if (s == "bf16") return WeightFormat::BF16;
    if (s == "f32" || s == "fp32") return WeightFormat::F32;
    DSV4_FAIL("{}: '{}' = '{}' is not a weight format (fp8, fp4, bf16)", cfg.name, key, s);
  };
  CheckpointFormat f;
  f.dense = fmt(cfg.weight_dtype, "dtype");
  f.expert = fmt(cfg.expert_dtype, "expert_dtype");
  DSV4_CHECK(f.dense != WeightFormat::FP4, "{}: dense weights are never fp4", cfg.name);
  f.scale = cfg.scale_fmt == "fp32" ? ScaleFormat::F32 : ScaleFormat::E8M0;
  f.plain = DType::BF16;
  f.name = "custom";
  for (const char* n : {"instruct", "base", "bf16"}) {
    const CheckpointFormat g = named(n);
    const bool scales_matter = g.quantized();
    if (g.dense == f.dense && g.expert == f.expert && g.plain == f.plain && (!scales_matter || g.scale == f.scale)) {
      f.name = n;
      f.scale = g.scale;
      break;
    }
  }
  return f;
}

std::string CheckpointFormat::str() const {
  return fmt::format("{} (dense {}, experts {}, {} scales, plain {})", name, weight_format_name(dense),
                     weight_format_name(expert), scale_format_name(scale), dtype_name(plain));
}

// ---- ShardSpec -------------------------------------------------------------------------------------------
std::string ShardSpec::str() const {
  switch (kind) {
    case Kind::Replicated: return "replicated";
    case Kind::Split: return fmt::format("{}:dim{}", axis, dim);
    case Kind::Expert: return fmt::format("{}:expert {}/{}", axis, expert, n_experts);
  }
  return "?";
}

bool ShardSpec::owns(int64_t rank, int64_t size) const {
  DSV4_CHECK(size >= 1 && rank >= 0 && rank < size, "shard rank {} of {}", rank, size);
  if (kind != Kind::Expert) return true;
  DSV4_CHECK(n_experts % size == 0, "{} experts do not split over {} ranks", n_experts, size);
  const int64_t local = n_experts / size;
  return expert >= rank * local && expert < (rank + 1) * local;
}

Tensor ShardSpec::local_view(const Tensor& full, int64_t rank, int64_t size, const std::string& name) const {
  if (kind == Kind::Replicated || size == 1) return full;
  if (kind == Kind::Expert) {
    DSV4_CHECK(owns(rank, size), "{}: expert {} is not held by {} rank {} of {}", name, expert, axis, rank, size);
    return full;
  }
  const int d = dim < 0 ? dim + full.ndim() : dim;
  DSV4_CHECK(d >= 0 && d < full.ndim(), "{}: split dim {} of {}", name, dim, full.str());
  const int64_t n = full.size(d);
  DSV4_CHECK(n % size == 0, "{}: dim {} of {} ({}) does not split over {} {} ranks", name, d, full.str(), n, size, axis);
  const int64_t part = n / size;
  return full.slice(d, rank * part, (rank + 1) * part);
}

int64_t ParamEntry::disk_bytes() const {
  int64_t b = dtype_nbytes(disk_dtype, disk_shape.numel());
  if (scale) b += dtype_nbytes(scale->dtype, scale->shape.numel());
  return b;
}

// ---- building ----------------------------------------------------------------------------------------------
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

class Builder {
 public:
  Builder(const ModelConfig& cfg, const CheckpointFormat& fmt, bool frozen_base)
      : cfg_(cfg), fmt_(fmt), frozen_(frozen_base) {}

  void add(const std::string& name, const Shape& shape, TensorRole role, WeightHolder holder, int shard_file,
           bool trainable = true, ShardSpec shard = {}) {
    ParamEntry e;
    e.name = name;
    e.shape = shape;
    e.role = role;
    e.holder = holder;
    e.shard_file = shard_file;
    e.trainable = trainable && !frozen_;
    e.shard = std::move(shard);
    e.disk_shape = shape;
    switch (role) {
      case TensorRole::Dense: set_matrix(e, fmt_.dense); break;
      case TensorRole::Expert: set_matrix(e, fmt_.expert); break;
      case TensorRole::Plain:
        e.format = fmt_.plain == DType::F32 ? WeightFormat::F32 : WeightFormat::BF16;
        e.disk_dtype = fmt_.plain;
        break;
      case TensorRole::F32:
        e.format = WeightFormat::F32;
        e.disk_dtype = DType::F32;
        break;
      case TensorRole::Index:
        e.format = WeightFormat::F32;  // unused
        e.disk_dtype = DType::I64;
        break;
    }
    entries.push_back(std::move(e));
  }

  std::vector<ParamEntry> entries;

 private:
  void set_matrix(ParamEntry& e, WeightFormat f) {
    e.format = f;
    const int64_t out = e.shape[0], in = e.shape[1];
    const std::string base = ends_with(e.name, ".weight") ? e.name.substr(0, e.name.size() - 7) : e.name;
    switch (f) {
      case WeightFormat::F32: e.disk_dtype = DType::F32; break;
      case WeightFormat::BF16: e.disk_dtype = DType::BF16; break;
      case WeightFormat::FP8:
        e.disk_dtype = DType::F8_E4M3;
        e.scale = ScaleSpec{base + ".scale", fp8_scale_shape(out, in),
                            fmt_.scale == ScaleFormat::E8M0 ? DType::F8_E8M0 : DType::F32};
        break;
      case WeightFormat::FP4:
        DSV4_CHECK(in % 2 == 0, "{}: packed FP4 needs an even input dim, got {}", e.name, e.shape.str());
        e.disk_dtype = DType::I8;
        e.disk_shape = Shape{out, in / 2};
        e.scale = ScaleSpec{base + ".scale", fp4_scale_shape(out, in), DType::F8_E8M0};
        break;
    }
  }

  const ModelConfig& cfg_;
  const CheckpointFormat& fmt_;
  bool frozen_;
};

ShardSpec split(int dim) {
  ShardSpec s;
  s.kind = ShardSpec::Kind::Split;
  s.axis = "tp";
  s.dim = dim;
  return s;
}

ShardSpec by_expert(int64_t e, int64_t n) {
  ShardSpec s;
  s.kind = ShardSpec::Kind::Expert;
  s.axis = "ep";
  s.expert = e;
  s.n_experts = n;
  return s;
}

// One decoder block (main layer or MTP block) under `p`.
void add_block(Builder& b, const ModelConfig& c, const std::string& p, int64_t layer, bool hash, int file) {
  const int64_t D = c.dim, n = c.hc_mult, H = c.n_heads, C = c.head_dim, Q = c.q_lora_rank, G = c.o_groups,
                R = c.o_lora_rank, E = c.n_routed_experts, I = c.moe_inter_dim, m = c.compress_ratio(layer);
  using R_ = TensorRole;
  using W = WeightHolder;
  for (const char* hc : {"hc_attn_", "hc_ffn_"}) {
    b.add(p + hc + "fn", Shape{(2 + n) * n, n * D}, R_::F32, W::Param, file);
    b.add(p + hc + "base", Shape{(2 + n) * n}, R_::F32, W::Param, file);
    b.add(p + hc + "scale", Shape{3}, R_::F32, W::Param, file);
  }
  b.add(p + "attn_norm.weight", Shape{D}, R_::Plain, W::Param, file);
  b.add(p + "ffn_norm.weight", Shape{D}, R_::Plain, W::Param, file);
  const std::string a = p + "attn.";
  b.add(a + "wq_a.weight", Shape{Q, D}, R_::Dense, W::Linear, file);
  b.add(a + "q_norm.weight", Shape{Q}, R_::Plain, W::Param, file);
  b.add(a + "wq_b.weight", Shape{H * C, Q}, R_::Dense, W::Linear, file, true, split(0));
  b.add(a + "wkv.weight", Shape{C, D}, R_::Dense, W::Linear, file);
  b.add(a + "kv_norm.weight", Shape{C}, R_::Plain, W::Param, file);
  b.add(a + "wo_a.weight", Shape{G * R, H * C / G}, R_::Dense, W::Param, file, true, split(0));
  b.add(a + "wo_b.weight", Shape{D, G * R}, R_::Dense, W::Linear, file, true, split(1));
  b.add(a + "attn_sink", Shape{H}, R_::F32, W::Param, file, true, split(0));
  auto compressor = [&](const std::string& cp, int64_t ratio, int64_t hd, bool trainable) {
    const int64_t Wd = (ratio == 4 ? 2 : 1) * hd;
    b.add(cp + "wkv.weight", Shape{Wd, D}, R_::Plain, W::Linear, file, trainable);
    b.add(cp + "wgate.weight", Shape{Wd, D}, R_::Plain, W::Linear, file, trainable);
    b.add(cp + "ape", Shape{ratio, Wd}, R_::F32, W::Param, file, trainable);
    b.add(cp + "norm.weight", Shape{hd}, R_::Plain, W::Param, file, trainable);
  };
  if (m > 0) compressor(a + "compressor.", m, C, true);
  if (m == 4) {  // the indexer gets no gradient from the LM loss: not trainable (as in the model)
    const std::string ix = a + "indexer.";
    b.add(ix + "wq_b.weight", Shape{c.index_n_heads * c.index_head_dim, Q}, R_::Dense, W::Linear, file, false, split(0));
    b.add(ix + "weights_proj.weight", Shape{c.index_n_heads, D}, R_::Plain, W::Linear, file, false, split(0));
    compressor(ix + "compressor.", 4, c.index_head_dim, false);
  }
  const std::string f = p + "ffn.";
  b.add(f + "gate.weight", Shape{E, D}, R_::Plain, W::Param, file);
  if (hash)
    b.add(f + "gate.tid2eid", Shape{c.vocab_size, c.n_activated_experts}, R_::Index, W::Param, file, false);
  else
    b.add(f + "gate.bias", Shape{E}, R_::F32, W::Param, file, false);
  for (int64_t e = 0; e < E; ++e) {
    const std::string x = f + "experts." + std::to_string(e) + ".";
    b.add(x + "w1.weight", Shape{I, D}, R_::Expert, W::Expert, file, true, by_expert(e, E));
    b.add(x + "w2.weight", Shape{D, I}, R_::Expert, W::Expert, file, true, by_expert(e, E));
    b.add(x + "w3.weight", Shape{I, D}, R_::Expert, W::Expert, file, true, by_expert(e, E));
  }
  if (c.n_shared_experts == 1) {
    b.add(f + "shared_experts.w1.weight", Shape{I, D}, R_::Dense, W::Expert, file);
    b.add(f + "shared_experts.w2.weight", Shape{D, I}, R_::Dense, W::Expert, file);
    b.add(f + "shared_experts.w3.weight", Shape{I, D}, R_::Dense, W::Expert, file);
  }
}

}  // namespace

ParamTable ParamTable::build(const ModelConfig& cfg, const ParamTableOptions& opts) {
  cfg.validate(cfg.name);
  ParamTable t;
  t.cfg_ = cfg;
  t.format_ = opts.format ? *opts.format : CheckpointFormat::from_config(cfg);
  Builder b(cfg, t.format_, opts.frozen_base);
  const int64_t L = cfg.n_layers, D = cfg.dim, n = cfg.hc_mult;
  b.add("embed.weight", Shape{cfg.vocab_size, D}, TensorRole::Plain, WeightHolder::Param, 1, true, split(0));
  for (int64_t i = 0; i < L; ++i)
    add_block(b, cfg, fmt::format("layers.{}.", i), i, i < cfg.n_hash_layers, static_cast<int>(2 + i));
  const int head_file = static_cast<int>(L + 2);
  b.add("head.weight", Shape{cfg.vocab_size, D}, TensorRole::Plain, WeightHolder::Linear, head_file, true, split(0));
  b.add("norm.weight", Shape{D}, TensorRole::Plain, WeightHolder::Param, head_file);
  b.add("hc_head_fn", Shape{n, n * D}, TensorRole::F32, WeightHolder::Param, head_file);
  b.add("hc_head_base", Shape{n}, TensorRole::F32, WeightHolder::Param, head_file);
  b.add("hc_head_scale", Shape{1}, TensorRole::F32, WeightHolder::Param, head_file);
  t.num_shards_ = head_file;
  for (int64_t j = 0; j < cfg.n_mtp_layers; ++j) {
    const int file = head_file + 1;  // all MTP blocks share the last shard
    t.num_shards_ = file;
    const std::string p = fmt::format("mtp.{}.", j);
    add_block(b, cfg, p, L + j, false, file);
    b.add(p + "e_proj.weight", Shape{D, D}, TensorRole::Dense, WeightHolder::Linear, file);
    b.add(p + "h_proj.weight", Shape{D, D}, TensorRole::Dense, WeightHolder::Linear, file);
    b.add(p + "enorm.weight", Shape{D}, TensorRole::Plain, WeightHolder::Param, file);
    b.add(p + "hnorm.weight", Shape{D}, TensorRole::Plain, WeightHolder::Param, file);
    b.add(p + "norm.weight", Shape{D}, TensorRole::Plain, WeightHolder::Param, file);
    b.add(p + "hc_head_fn", Shape{n, n * D}, TensorRole::F32, WeightHolder::Param, file);
    b.add(p + "hc_head_base", Shape{n}, TensorRole::F32, WeightHolder::Param, file);
    b.add(p + "hc_head_scale", Shape{1}, TensorRole::F32, WeightHolder::Param, file);
  }
  t.entries_ = std::move(b.entries);
  for (size_t i = 0; i < t.entries_.size(); ++i) {
    const auto [it, inserted] = t.index_.emplace(t.entries_[i].name, i);
    DSV4_CHECK(inserted, "parameter table: duplicate name '{}'", t.entries_[i].name);
  }
  if (opts.optimizer_group) t.assign_optimizer_groups(opts.optimizer_group);
  return t;
}

const ParamEntry* ParamTable::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

const ParamEntry& ParamTable::at(const std::string& name) const {
  const ParamEntry* e = find(name);
  DSV4_CHECK(e != nullptr, "the parameter table of {} has no tensor '{}'", cfg_.name, name);
  return *e;
}

std::vector<ParamTable::DiskTensor> ParamTable::disk_tensors() const {
  std::vector<DiskTensor> out;
  out.reserve(entries_.size() * 2);
  for (const ParamEntry& e : entries_) {
    out.push_back({e.name, e.disk_dtype, e.disk_shape, &e, false});
    if (e.scale) out.push_back({e.scale->name, e.scale->dtype, e.scale->shape, &e, true});
  }
  return out;
}

int64_t ParamTable::num_disk_tensors() const {
  int64_t n = 0;
  for (const ParamEntry& e : entries_) n += e.scale ? 2 : 1;
  return n;
}

int64_t ParamTable::total_disk_bytes() const {
  int64_t n = 0;
  for (const ParamEntry& e : entries_) n += e.disk_bytes();
  return n;
}

std::string ParamTable::shard_file_name(int shard) const {
  DSV4_CHECK(shard >= 1 && shard <= num_shards_, "shard {} outside 1..{}", shard, num_shards_);
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", shard, num_shards_);
}

void ParamTable::assign_optimizer_groups(const std::function<std::string(const ParamEntry&)>& group) {
  for (ParamEntry& e : entries_) e.optimizer_group = group ? group(e) : std::string();
}

}  // namespace dsv4
