// LoRA adapters in the PEFT format, checked against PEFT 0.21.2 + transformers 5.23.0 (fixtures written by
// tests/ref/lora/gen_lora_fixtures.py on tests/fixtures/ckpt/hf_saved_tiny):
//  * an adapter made by PEFT loads in dsv4 and gives PEFT's logits;
//  * an adapter written by dsv4 (per-group wo_a, fused / w1-only / w2 routed experts, a router, a compressor
//    projection) is byte-stable, loads in PEFT (the fixture's logits are PEFT's) and gives dsv4 the same logits;
//  * from one adapter file, 10 AdamW steps in dsv4 and in PEFT + torch.optim.AdamW give the same losses;
//  * round trips, resume into apply_lora'd models, and errors that name the file and the key.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/peft.h"
#include "optim/optimizer.h"
#include "test_lora_util.h"

namespace dsv4 {
namespace {

using namespace lora_test;
using nlohmann::json;

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The adapter the dsv4-written fixture holds (see tests/fixtures/lora/README.md).
LoraConfig dsv4_fixture_config() {
  LoraConfig c;
  c.rank = 2;
  c.alpha = 5;
  c.seed = 11;
  c.targets = {"wq_a", "wq_b", "wkv", "wo_a", "wo_b", "shared_experts.w{1,2}", "layers.1.ffn.experts.{0,2}.w{1,3}",
               "layers.1.ffn.experts.1.w1", "layers.1.ffn.experts.3.w2", "layers.2.ffn.experts.*.w2",
               "layers.2.ffn.gate", "layers.1.attn.compressor.wkv"};
  return c;
}

TEST(LoraPeft, PeftAdapterLogitsMatchPeft) {
  const SafetensorsFile ref = SafetensorsFile::open(kLoraDir + "/peft_adapter.logits.safetensors");
  const Batch b = read_ids(ref);
  auto m = load_frozen();
  const int64_t n = load_peft_adapter(*m, kLoraDir + "/peft_adapter");
  // Per layer: q_a, q_b, kv, o_b, shared-A o_a, 3 shared-expert projections, the router, 4 x (w13 + w2).
  EXPECT_EQ(n, 3 * (4 + 1 + 3 + 1 + 8));
  std::set<std::string> units;
  for (LoraAdapter* ad : lora_adapters(*m)) units.insert(ad->unit);
  EXPECT_TRUE(units.count("layers.0.attn.wo_a"));  // PEFT's form: one adapter on the whole o_a_proj weight
  EXPECT_FALSE(units.count("layers.0.attn.wo_a.0"));
  EXPECT_TRUE(units.count("layers.2.ffn.experts.3.w13"));
  EXPECT_TRUE(units.count("layers.0.ffn.experts.0.w2"));
  EXPECT_TRUE(units.count("layers.0.ffn.gate"));  // the hash layer's router weight too
  for (Param* p : lora_params(*m)) EXPECT_TRUE(p->trainable) << p->name;
  const double err = max_abs_diff(logits(*m, b), ref.load("logits").to_floats());
  EXPECT_LE(err, 1e-4);
  std::printf("[peer PEFT adapter -> dsv4] logits max abs err %.3g (%lld adapters)\n", err, static_cast<long long>(n));
}

TEST(LoraPeft, Dsv4AdapterMatchesFixtureAndPeft) {
  const LoraConfig cfg = dsv4_fixture_config();
  auto m = load_frozen();
  const int64_t n = apply_lora(*m, cfg);
  // 3 layers x (wq_a, wq_b, wkv, 2 wo_a groups, wo_b, shared w1, w2) + layer 1: w13 x 2, w1, w2 + layer 2: 4 w2 + gate
  // + layer 1 compressor.wkv
  EXPECT_EQ(n, 3 * 8 + 4 + 5 + 1);
  fill_B(*m, 99, 0.4f);
  PeftSaveOptions so;
  so.config = cfg;
  so.base_model_name_or_path = "tests/fixtures/ckpt/hf_saved_tiny";
  if (const char* out = std::getenv("DSV4_LORA_WRITE_FIXTURES")) {  // tests/ref/lora/gen_lora_fixtures.py
    save_peft_adapter(*m, std::string(out) + "/dsv4_adapter", so);
    std::printf("wrote %s/dsv4_adapter\n", out);
    return;
  }
  // 1. dsv4 writes the committed fixture again, byte for byte.
  TmpDir d("dsv4_adapter");
  save_peft_adapter(*m, d.str(), so);
  const std::string fix = kLoraDir + "/dsv4_adapter";
  ASSERT_TRUE(fs::exists(fix + "/adapter_model.safetensors")) << fix;
  EXPECT_EQ(read_text(d.str("adapter_config.json")), read_text(fix + "/adapter_config.json"));
  EXPECT_TRUE(read_text(d.str("adapter_model.safetensors")) == read_text(fix + "/adapter_model.safetensors"))
      << "adapter_model.safetensors changed: if on purpose, regenerate with tests/ref/lora/gen_lora_fixtures.py";
  const json j = json::parse(read_text(fix + "/adapter_config.json"));
  EXPECT_EQ(j.at("r"), 2);
  EXPECT_EQ(j.at("lora_alpha"), 5);
  // per-group wo_a: rank 2 * o_groups, alpha scaled to keep s = 5 / 2
  EXPECT_EQ(j.at("rank_pattern").at(R"(model\.layers\.0\.self_attn\.o_a_proj\.weight)"), 4);
  EXPECT_EQ(j.at("alpha_pattern").at(R"(model\.layers\.0\.self_attn\.o_a_proj\.weight)"), 10);
  const SafetensorsFile f = SafetensorsFile::open(fix + "/adapter_model.safetensors");
  EXPECT_EQ(f.entry("base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight").shape, (Shape{2 * 4, 32}));
  EXPECT_EQ(f.entry("base_model.model.model.layers.1.mlp.experts.lora_B.weight").shape, (Shape{32, 2 * 4}));
  EXPECT_EQ(f.entry("base_model.model.model.layers.2.mlp.experts.lora_A.weight").shape, (Shape{2 * 4, 16}));
  EXPECT_EQ(f.entry("base_model.model.model.layers.0.self_attn.o_a_proj.lora_B.weight").shape, (Shape{16, 4}));

  // 2. PEFT's logits of the committed adapter = dsv4's.
  const SafetensorsFile ref = SafetensorsFile::open(kLoraDir + "/dsv4_adapter.logits.safetensors");
  const Batch b = read_ids(ref);
  const double err = max_abs_diff(logits(*m, b), ref.load("logits").to_floats());
  EXPECT_LE(err, 1e-4);
  std::printf("[peer dsv4 adapter -> PEFT] logits max abs err %.3g (%lld adapters)\n", err, static_cast<long long>(n));

  // 3. Reading it back gives the very same adapters.
  auto m2 = load_frozen();
  EXPECT_EQ(load_peft_adapter(*m2, fix), n);
  const auto a1 = lora_adapters(*m), a2 = lora_adapters(*m2);
  ASSERT_EQ(a1.size(), a2.size());
  for (size_t i = 0; i < a1.size(); ++i) {
    EXPECT_EQ(a1[i]->unit, a2[i]->unit);
    EXPECT_TRUE(bytes_equal(a1[i]->A.value, a2[i]->A.value)) << a1[i]->unit;
    EXPECT_TRUE(bytes_equal(a1[i]->B.value, a2[i]->B.value)) << a1[i]->unit;
    EXPECT_DOUBLE_EQ(a1[i]->scale, a2[i]->scale) << a1[i]->unit;
  }
}

TEST(LoraPeft, AdamWTenStepsMatchPeft) {
  const SafetensorsFile fix = SafetensorsFile::open(kLoraDir + "/peft_adapter.train.safetensors");
  const Batch b = read_ids(fix);
  const std::vector<float> want = fix.load("losses").to_floats();
  ASSERT_EQ(want.size(), 11u);
  auto m = load_frozen();
  load_peft_adapter(*m, kLoraDir + "/peft_adapter");
  OptimizerConfig oc;
  oc.groups = GroupTable::adamw_everywhere();
  oc.adamw.beta1 = 0.9;
  oc.adamw.beta2 = 0.95;
  oc.adamw.eps = 1e-8;
  oc.adamw.weight_decay = 0.1;
  Optimizer opt(lora_params(*m), oc);
  EXPECT_EQ(opt.count(OptGroup::AdamW), static_cast<int64_t>(lora_params(*m).size()));
  const LossWeights w{0.0, 0.0};
  double worst = 0;
  for (int k = 0; k <= 10; ++k) {
    double loss;
    if (k < 10) {
      m->zero_grad();
      loss = m->forward_backward(b.ids, b.ids, b.layout, w).lm;
      const OptimizerStepStats st = opt.step(5e-3);
      EXPECT_EQ(st.adamw, static_cast<int64_t>(lora_params(*m).size()));
    } else {
      loss = m->evaluate(b.ids, b.ids, b.layout, w).lm;
    }
    worst = std::max(worst, std::abs(loss - want[static_cast<size_t>(k)]));
    std::printf("[AdamW parity] step %2d  dsv4 %.7f  PEFT %.7f  diff %.2e\n", k, loss, want[static_cast<size_t>(k)],
                loss - want[static_cast<size_t>(k)]);
  }
  EXPECT_LE(worst, 1e-4);
  EXPECT_LT(want[10], want[0] - 1.0);  // the steps do move the loss
  // The adapter after 10 steps equals PEFT's.
  const AdapterSet after = read_peft_adapter(kLoraDir + "/peft_adapter_after10", m->config());
  double max_diff = 0, max_val = 0;
  for (LoraAdapter* ad : lora_adapters(*m)) {
    const AdapterTensors* t = after.find(ad->unit);
    ASSERT_NE(t, nullptr) << ad->unit;
    max_diff = std::max({max_diff, max_abs_diff(ad->A.value.to_floats(), t->A.to_floats()),
                         max_abs_diff(ad->B.value.to_floats(), t->B.to_floats())});
    for (float v : t->B.to_floats()) max_val = std::max(max_val, static_cast<double>(std::abs(v)));
  }
  std::printf("[AdamW parity] losses max diff %.2e; adapter after 10 steps max abs diff %.2e (max |B| %.3f)\n", worst,
              max_diff, max_val);
  EXPECT_LE(max_diff, 5e-4);
}

TEST(LoraPeft, SaveLoadRoundTripAndResume) {
  for (bool per_group : {true, false}) {
    LoraConfig cfg;
    cfg.rank = 3;
    cfg.alpha = 4.5;
    cfg.rslora = !per_group;
    cfg.dropout = 0.1;
    cfg.seed = 5;
    cfg.wo_a_per_group = per_group;
    cfg.targets = {"attn.*", "ffn.gate", "shared_experts.*", "experts.*.w{1,2,3}", "indexer.wq_b"};
    auto m = load_frozen();
    apply_lora(*m, cfg);
    fill_B(*m, 3, 0.3f);
    TmpDir d("roundtrip");
    PeftSaveOptions so;
    so.config = cfg;
    save_peft_adapter(*m, d.str(), so);
    const json j = json::parse(read_text(d.str("adapter_config.json")));
    EXPECT_EQ(j.at("use_rslora"), cfg.rslora);
    EXPECT_EQ(j.at("lora_dropout"), 0.0);  // PEFT's ParamWrapper (target_parameters) refuses dropout
    const AdapterSet set = read_peft_adapter(d.str(), m->config());
    EXPECT_TRUE(set.from_dsv4);
    EXPECT_DOUBLE_EQ(set.dropout, 0.1);  // kept in dsv4's metadata
    const auto ads = lora_adapters(*m);
    ASSERT_EQ(set.adapters.size(), ads.size());
    for (LoraAdapter* ad : ads) {
      const AdapterTensors* t = set.find(ad->unit);
      ASSERT_NE(t, nullptr) << ad->unit;
      EXPECT_TRUE(bytes_equal(t->A, ad->A.value)) << ad->unit;
      EXPECT_TRUE(bytes_equal(t->B, ad->B.value)) << ad->unit;
      EXPECT_NEAR(t->scale, ad->scale, 1e-12 * ad->scale) << ad->unit;
    }
    // Resume: a model with the same apply_lora config takes the values (B was zero there).
    auto m2 = load_frozen();
    apply_lora(*m2, cfg);
    EXPECT_EQ(load_peft_adapter(*m2, d.str()), static_cast<int64_t>(ads.size()));
    const auto ads2 = lora_adapters(*m2);
    for (size_t i = 0; i < ads.size(); ++i) EXPECT_TRUE(bytes_equal(ads[i]->B.value, ads2[i]->B.value)) << ads[i]->unit;
    // A model with other adapters: one error naming the differences.
    LoraConfig other = cfg;
    other.targets = {"wq_a"};
    auto m3 = load_frozen();
    apply_lora(*m3, other);
    expect_error([&] { load_peft_adapter(*m3, d.str()); }, {d.str(), "in the file, not in the model"}, "resume mismatch");
    // Loaded into a fresh model: everything but the adapters is frozen.
    auto m4 = load_frozen();
    load_peft_adapter(*m4, d.str());
    std::set<const Param*> adapter;
    for (Param* p : lora_params(*m4)) adapter.insert(p);
    m4->visit([&](Param& p) { EXPECT_EQ(p.trainable, adapter.count(&p) > 0) << p.name; });
  }
}

TEST(LoraPeft, MtpAdaptersUseNativeKeys) {
  ModelConfig c = model_preset("tiny");
  c.vocab_size = 64;
  Model m(c);
  m.init_random(2, 0.1);
  LoraConfig cfg;
  cfg.rank = 2;
  cfg.targets = {"wq_a", "mtp.0.attn.wq_a", "mtp.0.e_proj"};
  EXPECT_EQ(apply_lora(m, cfg), c.n_layers + 2);
  fill_B(m, 1, 0.2f);
  TmpDir d("mtp");
  save_peft_adapter(m, d.str());
  const SafetensorsFile f = SafetensorsFile::open(d.str("adapter_model.safetensors"));
  EXPECT_TRUE(f.contains("base_model.model.mtp.0.attn.wq_a.lora_A.weight"));
  EXPECT_TRUE(f.contains("base_model.model.model.layers.3.self_attn.q_a_proj.lora_B.weight"));
  const json j = json::parse(read_text(d.str("adapter_config.json")));
  for (const auto& t : j.at("target_modules")) EXPECT_EQ(t.get<std::string>().rfind("mtp.", 0), std::string::npos);
  Model m2(c);
  m2.init_random(2, 0.1);
  load_peft_adapter(m2, d.str());
  const auto a = lora_adapters(m), b2 = lora_adapters(m2);
  ASSERT_EQ(a.size(), b2.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(bytes_equal(a[i]->B.value, b2[i]->B.value)) << a[i]->unit;
}

// Rewrites DIR/adapter_model.safetensors with `edit` applied to its tensors.
void edit_weights(const std::string& dir, const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
  const std::string path = dir + "/adapter_model.safetensors";
  std::vector<std::pair<std::string, Tensor>> t;
  std::map<std::string, std::string> meta;
  {
    const SafetensorsFile f = SafetensorsFile::open(path);
    for (const std::string& n : f.names()) t.emplace_back(n, f.load(n));
    meta = f.metadata();
  }
  edit(t);
  write_safetensors(path, t, meta);
}

void edit_config(const std::string& dir, const std::function<void(json&)>& edit) {
  const std::string path = dir + "/adapter_config.json";
  json j = json::parse(read_text(path));
  edit(j);
  write_file_atomic(path, j.dump(2));
}

TEST(LoraPeft, ErrorsNameFileAndKey) {
  auto m = load_frozen();
  const ModelConfig cfg = m->config();
  TmpDir d("errors");
  const std::string src = kLoraDir + "/peft_adapter";
  auto fresh = [&](const std::string& name) {
    const std::string dir = d.str(name);
    fs::create_directories(dir);
    fs::copy(src, dir, fs::copy_options::overwrite_existing | fs::copy_options::recursive);
    return dir;
  };
  const std::string qa = "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight";
  {
    const std::string dir = fresh("noconfig");
    fs::remove(dir + "/adapter_config.json");
    expect_error([&] { read_peft_adapter(dir, cfg); }, {dir, "adapter_config.json"}, "no config");
  }
  {
    const std::string dir = fresh("type");
    edit_config(dir, [](json& j) { j["peft_type"] = "PREFIX_TUNING"; });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"adapter_config.json", "peft_type", "PREFIX_TUNING"}, "type");
  }
  {
    const std::string dir = fresh("dora");
    edit_config(dir, [](json& j) { j["use_dora"] = true; });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"adapter_config.json", "use_dora"}, "dora");
  }
  {
    const std::string dir = fresh("bin");
    fs::rename(dir + "/adapter_model.safetensors", dir + "/adapter_model.bin");
    expect_error([&] { read_peft_adapter(dir, cfg); }, {dir, "adapter_model.bin"}, "bin");
  }
  {
    const std::string dir = fresh("badkey");
    edit_weights(dir, [&](auto& t) { t[0].first = "base_model.model.model.layers.0.self_attn.q_a_proj.lora_X.weight"; });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"adapter_model.safetensors", "lora_X"}, "bad key");
  }
  {
    const std::string dir = fresh("shape");
    edit_weights(dir, [&](auto& t) {
      for (auto& [n, v] : t)
        if (n == qa) v = Tensor::zeros({4, 31}, DType::F32);
    });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"adapter_model.safetensors", qa, "[4, 31]"}, "shape");
  }
  {
    const std::string dir = fresh("rank");
    edit_config(dir, [](json& j) { j["r"] = 3; });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"adapter_model.safetensors", "lora_A.weight", "rank 3"}, "rank");
  }
  {
    const std::string dir = fresh("module");
    edit_weights(dir, [&](auto& t) {
      for (auto& [n, v] : t)
        if (n == qa) n = "base_model.model.model.layers.0.self_attn.foo_proj.lora_A.weight";
    });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"foo_proj"}, "module");
  }
  {
    const std::string dir = fresh("layer");
    edit_weights(dir, [&](auto& t) {
      for (auto& [n, v] : t)
        if (n.find("layers.0.self_attn.q_a_proj") != std::string::npos) n.replace(n.find("layers.0"), 8, "layers.7");
    });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"adapter_model.safetensors", "layers.7", "not a LoRA site"},
                 "layer");
  }
  {
    const std::string dir = fresh("params");
    edit_config(dir, [](json& j) { j["target_parameters"] = {"self_attn.o_a_proj.weight", "mlp.gate.weight"}; });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"adapter_model.safetensors", "mlp.experts", "target_parameters"},
                 "target_parameters");
  }
  {
    const std::string dir = fresh("pair");
    edit_weights(dir, [&](auto& t) {
      t.erase(std::remove_if(t.begin(), t.end(), [&](const auto& p) { return p.first == qa; }), t.end());
    });
    expect_error([&] { read_peft_adapter(dir, cfg); }, {"adapter_model.safetensors", qa, "missing"}, "pair");
  }
}

}  // namespace
}  // namespace dsv4
