// Checkpoint I/O (src/model/checkpoint_io.h, param_table.h): the parameter table against the model and the release
// inventory, round trips for every format and both layouts, frozen quantized loading against the dequantised F32
// model, and the corrupted-file suite.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include <unistd.h>

#include "model/checkpoint_io.h"
#include "model/param_table.h"
#include "runtime/safetensors.h"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

struct TmpDir {
  fs::path path;
  explicit TmpDir(const std::string& tag) {
    path = fs::temp_directory_path() / fmt::format("dsv4_ckpt_{}_{}_{}", tag, ::getpid(), counter()++);
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TmpDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
  std::string file(const std::string& name) const { return (path / name).string(); }
  static int& counter() {
    static int c = 0;
    return c;
  }
};

Tensor fixed_ids(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> u(0, vocab - 1);
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = u(rng);
  return Tensor::from_vector<int64_t>({n}, v);
}

std::vector<float> logits_of(const Model& m, uint32_t seed = 5) {
  const SeqLayout layout(2, 16);
  return m.forward(fixed_ids(layout.tokens(), m.config().vocab_size, seed), layout, nullptr).logits_TV.to_floats();
}

// Every weight as floats, by native name (frozen weights dequantised).
std::map<std::string, std::vector<float>> values_of(Model& m) {
  std::map<std::string, std::vector<float>> out;
  for (auto& [name, slot] : model_weight_slots(m))
    out[name] = slot.param->value.defined() && slot.param->value.dtype() == DType::I64 ? slot.param->value.to_floats()
                                                                                       : slot.f32_copy().to_floats();
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

double max_abs(const std::vector<float>& a) {
  double m = 0;
  for (float v : a) m = std::max(m, std::abs(static_cast<double>(v)));
  return m;
}

std::unique_ptr<Model> random_model(uint64_t seed = 3, double std = 0.1, const std::string& preset = "tiny") {
  auto m = std::make_unique<Model>(model_preset(preset));
  m->init_random(seed, std);
  return m;
}

SaveOptions release(const std::string& format) {
  SaveOptions o;
  o.layout = CheckpointLayout::Release;
  o.format = CheckpointFormat::named(format);
  return o;
}

SaveOptions transformers(const std::string& format) {
  SaveOptions o;
  o.layout = CheckpointLayout::Transformers;
  o.format = CheckpointFormat::named(format);
  return o;
}

// The message of the error `f` throws ("" when it does not throw).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_CONTAINS(text, part) EXPECT_NE((text).find(part), std::string::npos) << "'" << (part) << "' not in: " << (text)

// ---- parameter table ------------------------------------------------------------------------------------------

ModelConfig tiny_variant() {  // another layer mix: CSA first, two HCA rates, one hash layer, no MTP
  ModelConfig c = model_preset("tiny");
  c.name = "tiny-variant";
  c.n_layers = 5;
  c.n_hash_layers = 1;
  c.n_mtp_layers = 0;
  c.compress_ratios = {4, 16, 0, 8, 4};
  c.validate();
  return c;
}

TEST(ParamTable, MatchesTheModelsParameters) {
  for (const ModelConfig& cfg : {model_preset("tiny"), tiny_variant()}) {
    const std::string preset = cfg.name;
    Model m(cfg);
    const ParamTable t = ParamTable::build(m.config());
    std::map<std::string, Param*> params;
    m.visit([&](Param& p) { params[p.name] = &p; });
    EXPECT_EQ(params.size(), t.size()) << preset;
    for (const auto& [name, p] : params) {
      const ParamEntry* e = t.find(name);
      ASSERT_NE(e, nullptr) << preset << ": the table lacks " << name;
      EXPECT_EQ(e->shape, p->value.shape()) << name;
      EXPECT_EQ(e->trainable, p->trainable) << name;
    }
    const auto slots = model_weight_slots(m);
    EXPECT_EQ(slots.size(), t.size());
    for (const ParamEntry& e : t.entries()) {
      const WeightSlot& s = slots.at(e.name);
      EXPECT_EQ(s.shape, e.shape) << e.name;
      EXPECT_EQ(s.linear != nullptr, e.holder == WeightHolder::Linear) << e.name;
      EXPECT_EQ(s.expert != nullptr, e.holder == WeightHolder::Expert) << e.name;
    }
    // LoRA mode: everything frozen.
    ParamTableOptions o;
    o.frozen_base = true;
    const ParamTable frozen = ParamTable::build(m.config(), o);
    for (const ParamEntry& e : frozen.entries()) EXPECT_FALSE(e.trainable) << e.name;
  }
}

TEST(ParamTable, ReleaseInventoryOfFlashAndPro) {
  // dsv4-architecture.md §3.1/3.2: Flash 69,187 tensors = 67,612 main + 1,575 MTP in 46 shards.
  const ParamTable flash = ParamTable::build(model_preset("flash"));
  EXPECT_EQ(flash.format().name, "instruct");
  EXPECT_EQ(flash.num_disk_tensors(), 69187);
  int64_t mtp = 0;
  for (const auto& d : flash.disk_tensors()) mtp += d.name.rfind("mtp.", 0) == 0;
  EXPECT_EQ(mtp, 1575);
  EXPECT_EQ(flash.num_shards(), 46);
  EXPECT_EQ(flash.shard_file_name(46), "model-00046-of-00046.safetensors");
  auto expect = [&](const ParamTable& t, const std::string& name, DType dt, Shape shape, DType sdt = DType::U8,
                    Shape sshape = {}) {
    const ParamEntry& e = t.at(name);
    EXPECT_EQ(e.disk_dtype, dt) << name;
    EXPECT_EQ(e.disk_shape, shape) << name;
    if (sdt == DType::U8) {
      EXPECT_FALSE(e.scale.has_value()) << name;
    } else {
      ASSERT_TRUE(e.scale.has_value()) << name;
      EXPECT_EQ(e.scale->dtype, sdt) << name;
      EXPECT_EQ(e.scale->shape, sshape) << name;
    }
  };
  expect(flash, "embed.weight", DType::BF16, {129280, 4096});
  expect(flash, "hc_head_fn", DType::F32, {4, 16384});
  expect(flash, "layers.5.hc_attn_fn", DType::F32, {24, 16384});
  expect(flash, "layers.5.attn.wq_a.weight", DType::F8_E4M3, {1024, 4096}, DType::F8_E8M0, {8, 32});
  expect(flash, "layers.5.attn.wq_b.weight", DType::F8_E4M3, {32768, 1024}, DType::F8_E8M0, {256, 8});
  expect(flash, "layers.5.attn.wkv.weight", DType::F8_E4M3, {512, 4096}, DType::F8_E8M0, {4, 32});
  expect(flash, "layers.5.attn.wo_a.weight", DType::F8_E4M3, {8192, 4096}, DType::F8_E8M0, {64, 32});
  expect(flash, "layers.5.attn.wo_b.weight", DType::F8_E4M3, {4096, 8192}, DType::F8_E8M0, {32, 64});
  expect(flash, "layers.5.attn.compressor.wkv.weight", DType::BF16, {512, 4096});   // HCA (odd layer)
  expect(flash, "layers.4.attn.compressor.wkv.weight", DType::BF16, {1024, 4096});  // CSA
  expect(flash, "layers.5.attn.compressor.ape", DType::F32, {128, 512});
  expect(flash, "layers.4.attn.compressor.ape", DType::F32, {4, 1024});
  expect(flash, "layers.4.attn.indexer.wq_b.weight", DType::F8_E4M3, {8192, 1024}, DType::F8_E8M0, {64, 8});
  expect(flash, "layers.4.attn.indexer.weights_proj.weight", DType::BF16, {64, 4096});
  expect(flash, "layers.4.attn.indexer.compressor.wkv.weight", DType::BF16, {256, 4096});
  expect(flash, "layers.4.attn.indexer.compressor.ape", DType::F32, {4, 256});
  expect(flash, "layers.2.ffn.gate.tid2eid", DType::I64, {129280, 6});
  expect(flash, "layers.3.ffn.gate.bias", DType::F32, {256});
  expect(flash, "layers.3.ffn.experts.255.w1.weight", DType::I8, {2048, 2048}, DType::F8_E8M0, {2048, 128});
  expect(flash, "layers.3.ffn.experts.0.w2.weight", DType::I8, {4096, 1024}, DType::F8_E8M0, {4096, 64});
  expect(flash, "layers.3.ffn.shared_experts.w1.weight", DType::F8_E4M3, {2048, 4096}, DType::F8_E8M0, {16, 32});
  expect(flash, "layers.3.ffn.shared_experts.w2.weight", DType::F8_E4M3, {4096, 2048}, DType::F8_E8M0, {32, 16});
  expect(flash, "mtp.0.e_proj.weight", DType::F8_E4M3, {4096, 4096}, DType::F8_E8M0, {32, 32});
  expect(flash, "mtp.0.ffn.gate.bias", DType::F32, {256});
  EXPECT_EQ(flash.find("layers.3.ffn.gate.tid2eid"), nullptr);
  EXPECT_EQ(flash.find("mtp.0.attn.compressor.ape"), nullptr);  // the MTP block is sliding-window only
  EXPECT_EQ(flash.at("embed.weight").shard_file, 1);
  EXPECT_EQ(flash.at("layers.0.attn.wq_a.weight").shard_file, 2);
  EXPECT_EQ(flash.at("layers.42.ffn.gate.bias").shard_file, 44);
  EXPECT_EQ(flash.at("head.weight").shard_file, 45);
  EXPECT_EQ(flash.at("hc_head_scale").shard_file, 45);
  EXPECT_EQ(flash.at("mtp.0.norm.weight").shard_file, 46);
  // Shard specs (convert.py).
  EXPECT_EQ(flash.at("embed.weight").shard.str(), "tp:dim0");
  EXPECT_EQ(flash.at("head.weight").shard.str(), "tp:dim0");
  EXPECT_EQ(flash.at("layers.4.attn.wq_b.weight").shard.str(), "tp:dim0");
  EXPECT_EQ(flash.at("layers.4.attn.wo_a.weight").shard.str(), "tp:dim0");
  EXPECT_EQ(flash.at("layers.4.attn.attn_sink").shard.str(), "tp:dim0");
  EXPECT_EQ(flash.at("layers.4.attn.indexer.wq_b.weight").shard.str(), "tp:dim0");
  EXPECT_EQ(flash.at("layers.4.attn.indexer.weights_proj.weight").shard.str(), "tp:dim0");
  EXPECT_EQ(flash.at("layers.4.attn.wo_b.weight").shard.str(), "tp:dim1");
  EXPECT_EQ(flash.at("layers.4.ffn.experts.7.w2.weight").shard.str(), "ep:expert 7/256");
  for (const char* rep : {"layers.4.attn.wkv.weight", "layers.4.attn.wq_a.weight", "layers.4.attn.compressor.wkv.weight",
                          "layers.4.ffn.shared_experts.w1.weight", "layers.4.ffn.gate.weight", "layers.4.hc_attn_fn",
                          "norm.weight"})
    EXPECT_EQ(flash.at(rep).shard.str(), "replicated") << rep;

  // Pro: 145,116 tensors, 64 shards, index metadata.total_size 864,704,792,696 bytes (measured on the release).
  const ParamTable pro = ParamTable::build(model_preset("pro"));
  EXPECT_EQ(pro.num_disk_tensors(), 145116);
  EXPECT_EQ(pro.num_shards(), 64);
  EXPECT_EQ(pro.total_disk_bytes(), 864704792696);
  expect(pro, "layers.3.ffn.experts.383.w1.weight", DType::I8, {3072, 3584}, DType::F8_E8M0, {3072, 224});
  expect(pro, "layers.3.ffn.experts.383.w2.weight", DType::I8, {7168, 1536}, DType::F8_E8M0, {7168, 96});

  // Base: FP8 everywhere with F32 scales.
  ParamTableOptions b;
  b.format = CheckpointFormat::named("base");
  const ParamTable base = ParamTable::build(model_preset("flash"), b);
  expect(base, "layers.3.ffn.experts.0.w1.weight", DType::F8_E4M3, {2048, 4096}, DType::F32, {16, 32});
  expect(base, "layers.3.ffn.experts.0.w2.weight", DType::F8_E4M3, {4096, 2048}, DType::F32, {32, 16});
  expect(base, "layers.5.attn.wq_a.weight", DType::F8_E4M3, {1024, 4096}, DType::F32, {8, 32});
  for (const auto& d : base.disk_tensors())
    if (d.is_scale) ASSERT_EQ(d.dtype, DType::F32) << d.name;
}

TEST(ParamTable, ShardViewsAndOptimizerGroupHook) {
  const ParamTable t = ParamTable::build(model_preset("tiny"));
  const ParamEntry& wqb = t.at("layers.1.attn.wq_b.weight");  // [128, 32] split rows over tp
  Tensor full = Tensor::zeros(wqb.shape, DType::F32);
  const Tensor part = wqb.shard.local_view(full, 2, 4, wqb.name);
  EXPECT_EQ(part.shape(), (Shape{32, 32}));
  EXPECT_EQ(part.offset(), 64 * 32);
  const ParamEntry& wob = t.at("layers.1.attn.wo_b.weight");  // [64, 32] split columns
  EXPECT_EQ(wob.shard.local_view(Tensor::zeros(wob.shape, DType::F32), 1, 2, wob.name).shape(), (Shape{64, 16}));
  const ParamEntry& ex = t.at("layers.3.ffn.experts.5.w1.weight");  // 8 experts over 4 ranks: 2 each
  EXPECT_FALSE(ex.shard.owns(0, 4));
  EXPECT_TRUE(ex.shard.owns(2, 4));
  EXPECT_TRUE(t.at("layers.1.attn.wkv.weight").shard.owns(3, 4));
  EXPECT_THROW(wqb.shard.local_view(full, 0, 3, wqb.name), Error);  // 128 rows do not split in 3

  ParamTableOptions o;
  o.optimizer_group = [](const ParamEntry& e) {
    return !e.trainable ? std::string("none") : e.shape.ndim() == 2 ? std::string("muon") : std::string("adamw");
  };
  const ParamTable g = ParamTable::build(model_preset("tiny"), o);
  EXPECT_EQ(g.at("layers.3.ffn.gate.bias").optimizer_group, "none");
  EXPECT_EQ(g.at("layers.3.attn.wq_a.weight").optimizer_group, "muon");
  EXPECT_EQ(g.at("norm.weight").optimizer_group, "adamw");
  EXPECT_TRUE(t.at("norm.weight").optimizer_group.empty()) << "no rules of our own";
}

// ---- configs ----------------------------------------------------------------------------------------------------

TEST(Checkpoint, ConfigJsonRoundTrips) {
  for (const char* preset : {"tiny", "flash", "pro"}) {
    ModelConfig c = model_preset(preset);
    for (const char* f : {"instruct", "base", "bf16", "f32"}) {
      TmpDir d("cfg");
      const CheckpointFormat fmt = CheckpointFormat::named(f);
      write_file_atomic(d.file("config.json"), release_config_json(c, fmt));
      ModelConfig back = load_checkpoint_config(d.str());
      EXPECT_EQ(checkpoint_format_of(d.str()).name, f);
      EXPECT_EQ(CheckpointFormat::from_config(back).name, std::string(f) == "f32" ? "bf16" : f);
      back.name = c.name;
      back.weight_dtype = c.weight_dtype, back.expert_dtype = c.expert_dtype, back.scale_fmt = c.scale_fmt;
      EXPECT_EQ(back.to_json(), c.to_json()) << preset << " " << f;
    }
  }
  // The transformers form (one HCA rate).
  ModelConfig c = model_preset("tiny");
  TmpDir d("cfg_hf");
  write_file_atomic(d.file("config.json"), transformers_config_json(c, CheckpointFormat::named("f32")));
  ModelConfig back = load_checkpoint_config(d.str());
  back.name = c.name;
  EXPECT_EQ(back.to_json(), c.to_json());
  EXPECT_THROW(transformers_config_json(c, CheckpointFormat::named("instruct")), Error);
}

// ---- round trips -------------------------------------------------------------------------------------------------

TEST(Checkpoint, ReleaseRoundTripEveryFormat) {
  for (const char* f : {"f32", "bf16", "instruct", "base"}) {
    SCOPED_TRACE(f);
    auto a = random_model();
    TmpDir d1("rt1"), d2("rt2");
    const SaveReport s = save_checkpoint(*a, d1.str(), release(f));
    EXPECT_EQ(s.shards, 7);  // embed, 4 layers, head, mtp
    LoadReport r1;
    auto b = load_model(d1.str(), {}, {}, &r1);
    EXPECT_EQ(r1.format.name, f);
    EXPECT_EQ(r1.tensors, ParamTable::build(a->config(), {CheckpointFormat::named(f)}).num_disk_tensors());
    const auto va = values_of(*a), vb = values_of(*b);
    if (std::string(f) == "f32") {
      EXPECT_EQ(va, vb);
      EXPECT_EQ(logits_of(*a), logits_of(*b));
    } else {  // quantisation error only
      for (const auto& [name, v] : va) {
        const double tol = std::string(f) == "bf16" ? 1.0 / 256 : name.find(".experts.") != std::string::npos && std::string(f) == "instruct" ? 0.5 : 1.0 / 16;
        ASSERT_LE(max_abs_diff(vb.at(name), v), tol * std::max(max_abs(v), 1e-30)) << name;
      }
    }
    // Written again and read back: the same values (quantisation is idempotent on dequantised values).
    save_checkpoint(*b, d2.str(), release(f));
    auto c = load_model(d2.str());
    const auto vc = values_of(*c);
    if (std::string(f) == "base") {  // F32 scales are recomputed from dequantised values: equal to an ulp or two
      for (const auto& [name, v] : vb) ASSERT_LE(max_abs_diff(vc.at(name), v), 2.5e-7 * std::max(max_abs(v), 1e-30)) << name;
      EXPECT_LE(max_abs_diff(logits_of(*c), logits_of(*b)), 1e-5);
    } else {
      EXPECT_EQ(vc, vb);
      EXPECT_EQ(logits_of(*c), logits_of(*b));
    }
  }
}

TEST(Checkpoint, ReleaseFilesHaveTheReleaseDtypes) {
  auto a = random_model();
  TmpDir d("dtypes");
  save_checkpoint(*a, d.str(), release("instruct"));
  const SafetensorsCheckpoint ck = SafetensorsCheckpoint::open(d.str());
  EXPECT_EQ(ck.file_of("embed.weight"), "model-00001-of-00007.safetensors");
  EXPECT_EQ(ck.file_of("layers.2.attn.wq_a.weight"), "model-00004-of-00007.safetensors");
  EXPECT_EQ(ck.file_of("layers.2.attn.wq_a.scale"), "model-00004-of-00007.safetensors");
  EXPECT_EQ(ck.file_of("head.weight"), "model-00006-of-00007.safetensors");
  EXPECT_EQ(ck.file_of("mtp.0.e_proj.scale"), "model-00007-of-00007.safetensors");
  EXPECT_EQ(ck.entry("layers.3.ffn.experts.2.w1.weight").dtype, DType::I8);
  EXPECT_EQ(ck.entry("layers.3.ffn.experts.2.w1.weight").shape, (Shape{32, 32}));
  EXPECT_EQ(ck.entry("layers.3.ffn.experts.2.w1.scale").dtype, DType::F8_E8M0);
  EXPECT_EQ(ck.entry("layers.3.ffn.experts.2.w1.scale").shape, (Shape{32, 2}));
  EXPECT_EQ(ck.entry("layers.3.ffn.shared_experts.w2.weight").dtype, DType::F8_E4M3);
  EXPECT_EQ(ck.entry("layers.3.attn.wo_a.scale").shape, (Shape{1, 1}));
  EXPECT_EQ(ck.entry("layers.0.ffn.gate.tid2eid").dtype, DType::I64);
  EXPECT_EQ(ck.entry("hc_head_fn").dtype, DType::F32);
  EXPECT_EQ(ck.entry("norm.weight").dtype, DType::BF16);
  int64_t total = 0;
  for (const std::string& n : ck.names()) total += ck.entry(n).end - ck.entry(n).begin;
  EXPECT_EQ(ck.index_metadata().at("total_size"), std::to_string(total));
}

TEST(Checkpoint, TransformersLayoutRoundTrip) {
  for (const char* f : {"f32", "bf16"}) {
    SCOPED_TRACE(f);
    auto a = random_model();
    TmpDir d("hf"), dr("hf_release");
    const SaveReport s = save_checkpoint(*a, d.str(), transformers(f));
    EXPECT_EQ(s.shards, 6);  // no MTP shard
    const SafetensorsCheckpoint ck = SafetensorsCheckpoint::open(d.str());
    EXPECT_EQ(ck.entry("model.layers.3.mlp.experts.gate_up_proj").shape, (Shape{8, 64, 64}));
    EXPECT_EQ(ck.entry("model.layers.3.mlp.experts.down_proj").shape, (Shape{8, 64, 32}));
    EXPECT_TRUE(ck.contains("lm_head.weight"));
    EXPECT_TRUE(ck.contains("model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight"));
    for (const std::string& n : ck.names()) EXPECT_EQ(n.find("mtp."), std::string::npos) << n;
    LoadReport r;
    auto b = load_model(d.str(), {}, {}, &r);
    EXPECT_EQ(r.layout, CheckpointLayout::Transformers);
    EXPECT_FALSE(r.not_in_checkpoint.empty());
    for (const std::string& n : r.not_in_checkpoint) EXPECT_EQ(n.rfind("mtp.", 0), 0u) << n;
    // Compare with the same model through the release layout in the same precision.
    save_checkpoint(*a, dr.str(), release(f));
    auto ref = load_model(dr.str());
    const auto vb = values_of(*b), vr = values_of(*ref);
    for (const auto& [name, v] : vr) {
      if (name.rfind("mtp.", 0) != 0) {
        ASSERT_EQ(vb.at(name), v) << name;
      } else if (name.find("tid2eid") == std::string::npos && name.find("norm.weight") == std::string::npos) {
        ASSERT_EQ(max_abs(vb.at(name)), 0.0) << name << ": not in the checkpoint, zero as in a new Model";
      }
    }
    EXPECT_EQ(logits_of(*b), logits_of(*ref));  // the main head does not depend on the MTP block
  }
}

// ---- frozen quantized ----------------------------------------------------------------------------------------------

TEST(Checkpoint, FrozenQuantizedLogitsEqualDequantisedF32) {
  for (const char* f : {"instruct", "base", "bf16"}) {
    SCOPED_TRACE(f);
    auto a = random_model(4, 0.1);
    TmpDir d("frozen");
    save_checkpoint(*a, d.str(), release(f));
    auto dense = load_model(d.str());
    LoadOptions lo;
    lo.mode = LoadMode::FrozenQuantized;
    LoadReport r;
    auto frozen = load_model(d.str(), lo, {}, &r);
    EXPECT_GT(r.frozen_weights, 0);
    auto slots = model_weight_slots(*frozen);
    const QuantizedWeight* wq = slots.at("layers.1.attn.wq_a.weight").frozen_weight();
    const QuantizedWeight* ex = slots.at("layers.3.ffn.experts.4.w2.weight").frozen_weight();
    const QuantizedWeight* head = slots.at("head.weight").frozen_weight();
    ASSERT_TRUE(wq && ex && head);
    const std::string fs = f;
    EXPECT_EQ(wq->format, fs == "bf16" ? WeightFormat::BF16 : WeightFormat::FP8);
    EXPECT_EQ(ex->format, fs == "instruct" ? WeightFormat::FP4 : fs == "base" ? WeightFormat::FP8 : WeightFormat::BF16);
    EXPECT_EQ(head->format, WeightFormat::BF16);
    EXPECT_FALSE(slots.at("layers.1.attn.wo_a.weight").frozen());  // wo_a: F32 Param (see checkpoint_io.h)
    EXPECT_FALSE(slots.at("embed.weight").param->trainable);
    int64_t trainable = 0;
    frozen->visit([&](Param& p) { trainable += p.trainable; });
    EXPECT_EQ(trainable, 0);
    // Same values, same logits to FP32 rounding.
    EXPECT_EQ(values_of(*frozen), values_of(*dense));
    const auto l1 = logits_of(*dense), l2 = logits_of(*frozen);
    EXPECT_LE(max_abs_diff(l2, l1), 1e-5 * std::max(1.0, max_abs(l1))) << "max |logit| " << max_abs(l1);
    // The frozen model trains nothing but runs backward (for adapters): no gradient lands on frozen weights.
    const SeqLayout layout(2, 16);
    const Tensor ids = fixed_ids(layout.tokens(), frozen->config().vocab_size, 9);
    const LossResult lr = frozen->forward_backward(ids, ids, layout, LossWeights{});
    EXPECT_NEAR(lr.total, dense->evaluate(ids, ids, layout, LossWeights{}).total, 1e-5);
    frozen->visit([&](Param& p) { EXPECT_FALSE(p.grad.defined()) << p.name; });
    // In-memory size: FP8/FP4 weights take 1 or 0.5 byte per element plus scales.
    if (fs == "instruct") EXPECT_LT(ex->nbytes(), 32 * 64);
  }
}

TEST(Checkpoint, FrozenWeightsAreWrittenByteForByte) {
  auto a = random_model(6, 0.1);
  TmpDir d1("bytes1"), d2("bytes2");
  save_checkpoint(*a, d1.str(), release("instruct"));
  LoadOptions lo;
  lo.mode = LoadMode::FrozenQuantized;
  auto m = load_model(d1.str(), lo);
  save_checkpoint(*m, d2.str(), release("instruct"));
  const SafetensorsCheckpoint c1 = SafetensorsCheckpoint::open(d1.str()), c2 = SafetensorsCheckpoint::open(d2.str());
  ASSERT_EQ(c1.names(), c2.names());
  for (const std::string& n : c1.names()) {
    const Tensor t1 = c1.view(n), t2 = c2.view(n);
    ASSERT_EQ(t1.dtype(), t2.dtype()) << n;
    ASSERT_EQ(t1.nbytes(), t2.nbytes()) << n;
    ASSERT_EQ(std::memcmp(t1.raw_data(), t2.raw_data(), static_cast<size_t>(t1.nbytes())), 0) << n;
  }
}

TEST(Checkpoint, FrozenThenTrainableReloadUnfreezes) {
  auto a = random_model(8, 0.1);
  TmpDir d("reload");
  save_checkpoint(*a, d.str(), release("instruct"));
  LoadOptions lo;
  lo.mode = LoadMode::FrozenQuantized;
  auto m = load_model(d.str(), lo);
  load_checkpoint(*m, d.str());  // trainable F32 into the same model
  auto ref = load_model(d.str());
  EXPECT_EQ(values_of(*m), values_of(*ref));
  for (auto& [name, s] : model_weight_slots(*m)) {
    EXPECT_FALSE(s.frozen()) << name;
    EXPECT_EQ(s.param->trainable, ParamTable::build(m->config()).at(name).trainable) << name;
  }
}

TEST(Checkpoint, DeferredWeightStorageAllocatesNoLinearWeights) {
  std::unique_ptr<Model> m;
  {
    DeferredWeightStorage defer;
    m = std::make_unique<Model>(model_preset("tiny"));
  }
  auto slots = model_weight_slots(*m);
  EXPECT_FALSE(slots.at("layers.1.attn.wq_a.weight").param->value.defined());
  EXPECT_FALSE(slots.at("layers.3.ffn.experts.0.w2.weight").param->value.defined());
  EXPECT_EQ(slots.at("layers.3.ffn.experts.0.w2.weight").shape, (Shape{64, 32}));
  EXPECT_TRUE(slots.at("embed.weight").param->value.defined());
  Model normal(model_preset("tiny"));  // the guard is gone
  EXPECT_TRUE(normal.layers[1]->attn.wq_a.weight.value.defined());
  // Filled by the loader in either mode.
  auto a = random_model();
  TmpDir d("defer");
  save_checkpoint(*a, d.str(), release("instruct"));
  load_checkpoint(*m, d.str());
  EXPECT_EQ(values_of(*m), values_of(*load_model(d.str())));
}

TEST(Checkpoint, LoadingReleasesEveryMapping) {
  auto a = random_model();
  TmpDir d("maps");
  save_checkpoint(*a, d.str(), release("instruct"));
  for (LoadMode mode : {LoadMode::TrainableF32, LoadMode::FrozenQuantized}) {
    LoadOptions lo;
    lo.mode = mode;
    LoadReport r;
    auto m = load_model(d.str(), lo, {}, &r);
    EXPECT_EQ(r.shards, 7);
    int64_t biggest = 0;
    for (const auto& e : fs::directory_iterator(d.path))
      if (e.path().extension() == ".safetensors") biggest = std::max<int64_t>(biggest, static_cast<int64_t>(e.file_size()));
    EXPECT_EQ(r.max_shard_bytes, biggest);
    // No tensor of the model keeps a shard mapped.
    std::ifstream maps("/proc/self/maps");
    std::string line;
    while (std::getline(maps, line)) EXPECT_EQ(line.find(d.str()), std::string::npos) << line;
  }
}

// ---- corrupted files -------------------------------------------------------------------------------------------------

// A written tiny instruct checkpoint and helpers to damage it.
class Corrupt : public ::testing::Test {
 protected:
  void SetUp() override {
    model = random_model();
    save_checkpoint(*model, dir.str(), release("instruct"));
  }
  std::string shard(int i) const { return fmt::format("model-{:05d}-of-00007.safetensors", i); }
  std::string load_error() {
    Model m(model->config());
    return error_of([&] { load_checkpoint(m, dir.str()); });
  }
  // Rewrites shard `file` with `edit` applied to its tensor list, and the index to match.
  void rewrite(const std::string& file, const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
    const SafetensorsCheckpoint ck = SafetensorsCheckpoint::open(dir.str());
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const std::string& n : ck.shard(file).names()) tensors.emplace_back(n, ck.shard(file).load(n));
    edit(tensors);
    std::map<std::string, std::string> wm;
    for (const std::string& n : ck.names())
      if (ck.file_of(n) != file) wm[n] = ck.file_of(n);
    for (const auto& [n, t] : tensors) wm[n] = file;
    ck.release_shards();
    write_safetensors(dir.file(file), tensors);
    write_safetensors_index(dir.file("model.safetensors.index.json"), wm, 0);
  }
  // Raw header text of a shard and a way to put a new one back (data unchanged).
  std::string header(const std::string& file, std::string* data = nullptr) const {
    std::ifstream in(dir.file(file), std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string bytes = ss.str();
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[static_cast<size_t>(i)]);
    if (data) *data = bytes.substr(8 + n);
    return bytes.substr(8, n);
  }
  void put_header(const std::string& file, const std::string& h, const std::string& data) {
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((h.size() >> (8 * i)) & 0xFF);
    out += h + data;
    std::ofstream(dir.file(file), std::ios::binary | std::ios::trunc) << out;
  }

  TmpDir dir{"corrupt"};
  std::unique_ptr<Model> model;
};

TEST_F(Corrupt, TruncatedShard) {
  fs::resize_file(dir.file(shard(3)), fs::file_size(dir.file(shard(3))) / 2);
  std::string e = load_error();
  EXPECT_CONTAINS(e, shard(3));
  EXPECT_CONTAINS(e, "outside");
  fs::resize_file(dir.file(shard(3)), 40);  // inside the header now
  e = load_error();
  EXPECT_CONTAINS(e, shard(3));
  EXPECT_CONTAINS(e, "header length");
}

TEST_F(Corrupt, HeaderPointsPastEof) {
  std::string data;
  std::string h = header(shard(2), &data);
  const std::string key = "\"layers.0.attn.wq_a.weight\":{\"data_offsets\":[";
  const size_t p = h.find(key);
  ASSERT_NE(p, std::string::npos) << h.substr(0, 200);
  const size_t comma = h.find(',', p + key.size()), close = h.find(']', comma);
  h.replace(comma + 1, close - comma - 1, "999999999");
  put_header(shard(2), h, data);
  const std::string e = load_error();
  EXPECT_CONTAINS(e, shard(2));
  EXPECT_CONTAINS(e, "layers.0.attn.wq_a.weight");
  EXPECT_CONTAINS(e, "outside");
}

TEST_F(Corrupt, UnknownDtypeString) {
  std::string data;
  std::string h = header(shard(2), &data);
  const size_t p = h.find("\"dtype\":\"F8_E4M3\"");
  ASSERT_NE(p, std::string::npos);
  h.replace(p, 17, "\"dtype\":\"F8_E5M2\"");
  put_header(shard(2), h, data);
  const std::string e = load_error();
  EXPECT_CONTAINS(e, shard(2));
  EXPECT_CONTAINS(e, "F8_E5M2");
  EXPECT_CONTAINS(e, "unsupported dtype");
}

TEST_F(Corrupt, WrongDtypeAgainstTheTable) {
  rewrite(shard(3), [](auto& ts) {
    for (auto& [n, t] : ts)
      if (n == "layers.1.attn.wq_a.weight") t = Tensor::zeros(t.shape(), DType::BF16);
  });
  const std::string e = load_error();
  EXPECT_CONTAINS(e, "1 with a wrong shape or dtype");
  EXPECT_CONTAINS(e, "layers.1.attn.wq_a.weight in " + shard(3) + ": expected F8_E4M3[32, 64], got BF16[32, 64]");
  EXPECT_CONTAINS(e, dir.str());
}

TEST_F(Corrupt, MissingTensor) {
  rewrite(shard(5), [](auto& ts) { std::erase_if(ts, [](const auto& p) { return p.first == "layers.3.ffn.experts.6.w3.scale"; }); });
  const std::string e = load_error();
  EXPECT_CONTAINS(e, "1 missing [layers.3.ffn.experts.6.w3.scale (F8_E8M0[32, 2])]");
  EXPECT_CONTAINS(e, "0 unexpected");
}

TEST_F(Corrupt, ExtraTensor) {
  rewrite(shard(6), [](auto& ts) { ts.emplace_back("head.bias", Tensor::zeros({2048}, DType::BF16)); });
  const std::string e = load_error();
  EXPECT_CONTAINS(e, "1 unexpected [head.bias (BF16[2048] in " + shard(6) + ")]");
}

TEST_F(Corrupt, ShapeMismatch) {
  rewrite(shard(2), [](auto& ts) {
    for (auto& [n, t] : ts)
      if (n == "layers.0.hc_ffn_base") t = Tensor::zeros({25}, DType::F32);
  });
  const std::string e = load_error();
  EXPECT_CONTAINS(e, "layers.0.hc_ffn_base in " + shard(2) + ": expected F32[24], got F32[25]");
}

TEST_F(Corrupt, IndexNamesAMissingShard) {
  fs::remove(dir.file(shard(4)));
  const std::string e = load_error();
  EXPECT_CONTAINS(e, "missing");
  EXPECT_CONTAINS(e, shard(4));
}

TEST_F(Corrupt, IndexListsATensorItsShardLacks) {
  rewrite(shard(4), [](auto& ts) { std::erase_if(ts, [](const auto& p) { return p.first == "layers.2.attn_norm.weight"; }); });
  // Put the name back into the index only.
  const SafetensorsCheckpoint ck = SafetensorsCheckpoint::open(dir.str());
  std::map<std::string, std::string> wm;
  for (const std::string& n : ck.names()) wm[n] = ck.file_of(n);
  wm["layers.2.attn_norm.weight"] = shard(4);
  write_safetensors_index(dir.file("model.safetensors.index.json"), wm, 0);
  const std::string e = load_error();
  EXPECT_CONTAINS(e, "layers.2.attn_norm.weight");
  EXPECT_CONTAINS(e, shard(4));
}

TEST_F(Corrupt, EveryMismatchInOneError) {
  rewrite(shard(5), [](auto& ts) {
    std::erase_if(ts, [](const auto& p) { return p.first == "layers.3.ffn.gate.bias" || p.first == "layers.3.attn.wkv.scale"; });
    ts.emplace_back("layers.3.ffn.gate.extra", Tensor::zeros({8}, DType::F32));
    for (auto& [n, t] : ts)
      if (n == "layers.3.ffn.gate.weight") t = Tensor::zeros({8, 63}, DType::BF16);
  });
  const std::string e = load_error();
  EXPECT_CONTAINS(e, "2 missing");
  EXPECT_CONTAINS(e, "layers.3.ffn.gate.bias (F32[8])");
  EXPECT_CONTAINS(e, "layers.3.attn.wkv.scale (F8_E8M0[1, 1])");
  EXPECT_CONTAINS(e, "1 unexpected [layers.3.ffn.gate.extra");
  EXPECT_CONTAINS(e, "layers.3.ffn.gate.weight in " + shard(5) + ": expected BF16[8, 64], got BF16[8, 63]");
}

TEST_F(Corrupt, WrongFormatForTheCheckpoint) {
  Model m(model->config());
  LoadOptions lo;
  lo.format = CheckpointFormat::named("base");  // an instruct checkpoint read as base: every scale / expert differs
  const std::string e = error_of([&] { load_checkpoint(m, dir.str(), lo); });
  EXPECT_CONTAINS(e, "format base");
  EXPECT_CONTAINS(e, "layers.3.ffn.experts.0.w1.weight in " + shard(5) + ": expected F8_E4M3[32, 64], got I8[32, 32]");
}

TEST_F(Corrupt, Tid2eidAsI32IsCastOnLoad) {
  rewrite(shard(2), [](auto& ts) {
    for (auto& [n, t] : ts)
      if (n == "layers.0.ffn.gate.tid2eid") t = t.to(DType::I32);
  });
  Model m(model->config());
  load_checkpoint(m, dir.str());
  EXPECT_EQ(m.layers[0]->ffn.tid2eid.value.dtype(), DType::I64);
  EXPECT_EQ(m.layers[0]->ffn.tid2eid.value.to_floats(), model->layers[0]->ffn.tid2eid.value.to_floats());
}

}  // namespace
}  // namespace dsv4
