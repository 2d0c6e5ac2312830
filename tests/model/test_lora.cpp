// LoRA adapters (src/model/lora.h): target patterns, initialisation (bit-exact with torch's kaiming_uniform_),
// finite-difference checks of the adapter gradients through Linear, the grouped wo_a, the routed / shared experts and
// the router (on F32 and on frozen FP8 / FP4 bases), dropout, and the frozen base kept in storage precision (bytes per
// parameter reported).
#include <gtest/gtest.h>

#include <set>

#include "fd_check.h"
#include "model/peft.h"
#include "optim/optimizer.h"
#include "test_lora_util.h"

namespace dsv4 {
namespace {

using namespace lora_test;

// ---- patterns -----------------------------------------------------------------------------------------------------
TEST(LoraPatterns, GlobSuffixAndExplicitOnlyRules) {
  struct Case {
    const char* pattern;
    const char* unit;
    bool match;
  };
  const Case cases[] = {
      {"wq_a", "layers.0.attn.wq_a", true},
      {"wq_a", "mtp.0.attn.wq_a", false},                 // MTP only when named
      {"mtp.*.attn.wq_a", "mtp.0.attn.wq_a", true},
      {"mtp.**", "mtp.0.ffn.experts.3.w1", true},
      {"**", "mtp.0.attn.wq_a", false},
      {"**", "layers.3.ffn.experts.1.w2", true},
      {"wq_b", "layers.1.attn.indexer.wq_b", false},      // indexer only when named
      {"indexer.wq_b", "layers.1.attn.indexer.wq_b", true},
      {"wkv", "layers.1.attn.compressor.wkv", false},     // compressor only when named
      {"wkv", "layers.1.attn.wkv", true},
      {"compressor.wkv", "layers.1.attn.compressor.wkv", true},
      {"compressor.wkv", "layers.1.attn.indexer.compressor.wkv", false},
      {"indexer.compressor.wkv", "layers.1.attn.indexer.compressor.wkv", true},
      {"attn.wo_{a,b}", "layers.2.attn.wo_a", true},
      {"attn.wo_{a,b}", "layers.2.attn.wo_b", true},
      {"attn.wo_{a,b}", "layers.2.attn.wo_a.1", false},
      {"wo_a.1", "layers.2.attn.wo_a.1", true},
      {"layers.{0,1}.attn.*", "layers.1.attn.wq_a", true},
      {"layers.{0,1}.attn.*", "layers.2.attn.wq_a", false},
      {"layers.*.attn.*", "layers.0.attn.wo_a.1", false},  // `*` stays inside one name component
      {"experts.*.w2", "layers.0.ffn.experts.3.w2", true},
      {"experts.*.w2", "layers.0.ffn.shared_experts.w2", false},
      {"w2", "layers.0.ffn.shared_experts.w2", true},
      {"shared_experts.*", "layers.0.ffn.shared_experts.w3", true},
      {"layers.0.attn.wq_a.weight", "layers.0.attn.wq_a", true},
      {"ffn.gate", "layers.0.ffn.gate", true},
      {"gate", "layers.1.attn.compressor.wgate", false},
      {"?q_a", "layers.0.attn.wq_a", true},
      {"w?", "layers.0.ffn.experts.3.w13", false},
      {"attn.wq", "layers.0.attn.wq_a", false},
  };
  for (const Case& c : cases)
    EXPECT_EQ(lora_pattern_matches(c.pattern, c.unit), c.match) << "'" << c.pattern << "' vs " << c.unit;
}

ModelConfig tiny_config() {
  ModelConfig c = model_preset("tiny");
  c.vocab_size = 64;
  return c;
}

TEST(LoraApply, UnitsNamesShapesAndFreezing) {
  const ModelConfig c = tiny_config();
  Model m(c);
  m.init_random(1, 0.1);
  const Batch b{random_ids(2 * 13, c.vocab_size, 3), SeqLayout(2, 13)};
  const std::vector<float> base = logits(m, b);
  const int64_t params_before = m.num_params();
  LoraConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.targets = {"wq_a", "wq_b", "wkv", "wo_a", "wo_b", "shared_experts.*", "experts.*.w{1,2,3}", "ffn.gate"};
  const int64_t n = apply_lora(m, cfg);
  // per layer: wq_a, wq_b, wkv, 2 wo_a groups, wo_b, 3 shared, 8 x (w13 + w2), gate = 26; MTP not named: none there
  EXPECT_EQ(n, c.n_layers * 26);
  const auto ads = lora_adapters(m);
  ASSERT_EQ(static_cast<int64_t>(ads.size()), n);
  std::map<std::string, LoraAdapter*> by;
  for (LoraAdapter* a : ads) by[a->unit] = a;
  const int64_t HC = c.n_heads * c.head_dim, K = HC / c.o_groups, I = c.moe_inter_dim, D = c.dim;
  auto shape = [&](const std::string& u, Shape a, Shape bb) {
    ASSERT_TRUE(by.count(u)) << u;
    EXPECT_EQ(by[u]->A.value.shape(), a) << u;
    EXPECT_EQ(by[u]->B.value.shape(), bb) << u;
    EXPECT_EQ(by[u]->A.name, u + ".lora_A");
    EXPECT_EQ(by[u]->B.name, u + ".lora_B");
    EXPECT_DOUBLE_EQ(by[u]->scale, 2.0) << u;
  };
  shape("layers.0.attn.wq_a", {4, D}, {c.q_lora_rank, 4});
  shape("layers.0.attn.wo_a.1", {4, K}, {c.o_lora_rank, 4});
  shape("layers.3.ffn.experts.7.w13", {4, D}, {2 * I, 4});
  shape("layers.3.ffn.experts.7.w2", {4, I}, {D, 4});
  shape("layers.2.ffn.shared_experts.w3", {4, D}, {I, 4});
  shape("layers.2.ffn.gate", {4, D}, {c.n_routed_experts, 4});
  EXPECT_FALSE(by.count("layers.0.attn.wo_a"));
  EXPECT_FALSE(by.count("layers.3.ffn.experts.7.w1"));  // fused into w13 (transformers' gate_up_proj)
  EXPECT_FALSE(by.count("mtp.0.attn.wq_a"));
  EXPECT_FALSE(by.count("layers.1.attn.compressor.wkv"));
  // Kaiming bound 1/sqrt(in), B zero: the model computes exactly what it computed before.
  for (LoraAdapter* a : ads) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(a->in_features()));
    for (float v : a->A.value.to_floats()) EXPECT_LE(std::abs(v), bound) << a->unit;
    for (float v : a->B.value.to_floats()) EXPECT_EQ(v, 0.0f) << a->unit;
  }
  EXPECT_EQ(logits(m, b), base);
  // Only adapters train; Model::visit (hence optimizers and checkpoints) sees them.
  std::set<const Param*> adapter;
  for (Param* p : lora_params(m)) adapter.insert(p);
  EXPECT_EQ(adapter.size(), 2 * ads.size());
  int64_t visited = 0, adapter_numel = 0;
  m.visit([&](Param& p) {
    EXPECT_EQ(p.trainable, adapter.count(&p) > 0) << p.name;
    if (adapter.count(&p)) {
      ++visited;
      adapter_numel += p.value.numel();
    }
  });
  EXPECT_EQ(visited, static_cast<int64_t>(adapter.size()));
  EXPECT_EQ(m.num_params(), params_before + adapter_numel);
  // The same sites from the config alone.
  std::set<std::string> from_model, from_cfg;
  for (const LoraSite& s : lora_sites(m)) from_model.insert(s.unit + "|" + s.weight + "|" + std::to_string(s.in) + "|" + std::to_string(s.out));
  for (const LoraSite& s : lora_sites(c)) from_cfg.insert(s.unit + "|" + s.weight + "|" + std::to_string(s.in) + "|" + std::to_string(s.out));
  EXPECT_EQ(from_model, from_cfg);

  // Errors: a second apply, a pattern that selects nothing, a bad config.
  expect_error([&] { apply_lora(m, cfg); }, {"layers.0.attn.wq_a", "already has an adapter"}, "apply twice");
  Model m2(c);
  LoraConfig bad = cfg;
  bad.targets = {"wq_a", "nonexistent_proj", "layers.9.attn.wq_a"};
  expect_error([&] { apply_lora(m2, bad); }, {"'nonexistent_proj'", "'layers.9.attn.wq_a'"}, "unmatched");
  EXPECT_TRUE(lora_adapters(m2).empty());  // nothing attached on error
  bad = cfg;
  bad.rank = 0;
  expect_error([&] { apply_lora(m2, bad); }, {"rank"}, "rank");
  bad = cfg;
  bad.dropout = 1.0;
  expect_error([&] { apply_lora(m2, bad); }, {"dropout"}, "dropout");

  // Shared-A wo_a, lone w1, explicit compressor / indexer / MTP units, rsLoRA scale.
  Model m3(c);
  LoraConfig other;
  other.rank = 4;
  other.alpha = 8;
  other.rslora = true;
  other.wo_a_per_group = false;
  other.targets = {"layers.0.attn.wo_a", "layers.1.ffn.experts.0.w1", "layers.1.attn.compressor.wkv",
                   "layers.1.attn.indexer.wq_b", "mtp.0.ffn.shared_experts.w2"};
  EXPECT_EQ(apply_lora(m3, other), 5);
  std::set<std::string> units;
  for (LoraAdapter* a : lora_adapters(m3)) {
    units.insert(a->unit);
    EXPECT_DOUBLE_EQ(a->scale, 4.0);  // 8 / sqrt(4)
  }
  EXPECT_EQ(units, (std::set<std::string>{"layers.0.attn.wo_a", "layers.1.ffn.experts.0.w1", "layers.1.attn.compressor.wkv",
                                          "layers.1.attn.indexer.wq_b", "mtp.0.ffn.shared_experts.w2"}));
  EXPECT_EQ(m3.layers[0]->attn.wo_a_lora.shared->B.value.shape(), (Shape{c.o_groups * c.o_lora_rank, 4}));
  // Conflicting attachments.
  expect_error([&] { attach_lora(m3, "layers.0.attn.wo_a.0", 2, 1.0); }, {"layers.0.attn.wo_a.0", "conflicts"}, "wo_a");
  expect_error([&] { attach_lora(m3, "layers.1.ffn.experts.0.w13", 2, 1.0); }, {"w13", "conflicts"}, "w13");
  expect_error([&] { attach_lora(m3, "layers.1.attn.wo_x", 2, 1.0); }, {"layers.1.attn.wo_x", "not an adapter site"}, "site");
  remove_lora(m3);
  EXPECT_TRUE(lora_adapters(m3).empty());
}

// ---- initialisation -----------------------------------------------------------------------------------------------
TEST(LoraInit, KaimingUniformMatchesTorchBitForBit) {
  const SafetensorsFile f = SafetensorsFile::open(kLoraDir + "/kaiming_init.safetensors");
  int cases = 0;
  for (const std::string& name : f.names()) {
    const Tensor want = f.load(name);
    Tensor got = Tensor::zeros(want.shape(), DType::F32);
    uint32_t seed;
    if (name.rfind("unit_", 0) == 0) {
      seed = lora_init_seed(1234, "layers.0.attn.wq_a");
      EXPECT_EQ(std::to_string(seed), f.metadata().at("unit_torch_seed"));
    } else {
      seed = static_cast<uint32_t>(std::stoull(name.substr(4, name.find('_') - 4)));
    }
    kaiming_uniform_like_torch(got, seed);
    EXPECT_TRUE(bytes_equal(got, want)) << name;
    ++cases;
  }
  EXPECT_EQ(cases, 6);
  // apply_lora draws A exactly so: the wq_a adapter of a model with config seed 1234.
  ModelConfig c = tiny_config();
  c.dim = 32;
  c.hc_mult = 4;
  Model m(c);
  LoraConfig cfg;
  cfg.rank = 4;
  cfg.seed = 1234;
  cfg.targets = {"layers.0.attn.wq_a"};
  apply_lora(m, cfg);
  EXPECT_TRUE(bytes_equal(m.layers[0]->attn.wq_a.lora->A.value, f.load("unit_layers.0.attn.wq_a_seed1234_r4_in32")));
}

// ---- gradients ------------------------------------------------------------------------------------------------------
void randomize(Tensor& t, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = (static_cast<float>(rng() >> 8) * 0x1p-24f - 0.5f) * 2.0f * scale;
}

TEST(LoraGrad, LinearFiniteDifferencesOnF32AndFp8Bases) {
  for (int variant = 0; variant < 3; ++variant) {  // 0: F32 base, 1: frozen FP8 base, 2: FP8 + dropout
    std::mt19937 rng(7);
    Linear lin("x.weight", 24, 20);
    lin.weight.value = testing::random_tensor({20, 24}, rng, 0.5f);
    if (variant > 0) lin.set_frozen(quantize_weight(lin.weight.value, WeightFormat::FP8, ScaleFormat::E8M0, "x"));
    lin.lora.emplace("x", 3, 24, 20, 1.7, variant == 2 ? 0.3 : 0.0, 99);
    LoraAdapter& ad = *lin.lora;
    ad.train = true;
    randomize(ad.A.value, 1, 0.4f);
    randomize(ad.B.value, 2, 0.4f);
    Tensor x = testing::random_tensor({6, 24}, rng);
    const Tensor g = testing::random_tensor({6, 20}, rng);
    auto loss = [&] {
      ad.draws = 5;  // the same dropout mask in every evaluation
      return testing::dot(lin.forward(x, nullptr), g);
    };
    ad.draws = 5;
    LinearCtx ctx;
    const Tensor y = lin.forward(x, &ctx);
    EXPECT_EQ(ctx.lora_draw, variant == 2 ? 5u : 0u);
    const Tensor dx = lin.backward(g, ctx);
    if (variant > 0) EXPECT_FALSE(lin.weight.grad.defined());
    const std::string tag = variant == 0 ? "f32" : variant == 1 ? "fp8" : "fp8+dropout";
    testing::fd_check_tensor(tag + " lora_A", ad.A.value, ad.A.grad.clone(), loss, 1e-2, 2e-4, 1e-2, 40);
    testing::fd_check_tensor(tag + " lora_B", ad.B.value, ad.B.grad.clone(), loss, 1e-2, 2e-4, 1e-2, 40);
    testing::fd_check_tensor(tag + " dx", x, dx, loss, 1e-2, 2e-4, 1e-2, 40);
    if (variant == 2) {  // about 30% of the adapter input dropped, the same in forward and backward
      int64_t dropped = 0;
      for (uint64_t i = 0; i < 10000; ++i) dropped += lora_dropout_keep(ad, 5, i) ? 0 : 1;
      EXPECT_NEAR(static_cast<double>(dropped) / 1e4, 0.3, 0.02);
    }
  }
}

// Central differences at h and h/2 for probed entries of x; a probe whose two estimates disagree (a discrete decision
// of the model — a router or indexer top-k — flipped inside +-h) is skipped, every other one must match the analytic
// gradient: |fd - an| <= atol + rtol * max(|fd|, |an|). At most a third of the probes may be skipped.
struct FdTally {
  int checked = 0, skipped = 0;
};

void fd_check_smooth(const std::string& what, Tensor& x, const Tensor& analytic, const std::function<double()>& loss,
                     double h, double atol, double rtol, int probes, FdTally& tally, uint32_t seed = 1) {
  ASSERT_EQ(x.shape(), analytic.shape()) << what;
  const auto an = analytic.to_floats();
  float* p = x.data<float>();
  std::mt19937 rng(seed);
  int failures = 0, skipped = 0;
  for (int k = 0; k < probes; ++k) {
    const int64_t i = static_cast<int64_t>(rng() % static_cast<uint32_t>(x.numel()));
    const float saved = p[i];
    auto central = [&](double step) {
      p[i] = saved + static_cast<float>(step);
      const double up = loss();
      p[i] = saved - static_cast<float>(step);
      const double down = loss();
      p[i] = saved;
      return (up - down) / (static_cast<double>(saved + static_cast<float>(step)) -
                            static_cast<double>(saved - static_cast<float>(step)));
    };
    const double fd = central(h), fd2 = central(h / 2);
    if (std::abs(fd - fd2) > 2 * atol + 0.1 * std::max(std::abs(fd), std::abs(fd2))) {
      ++skipped;
      continue;
    }
    const double a = an[static_cast<size_t>(i)];
    if (std::abs(fd - a) > atol + rtol * std::max(std::abs(fd), std::abs(a)) && failures++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: finite difference " << fd << " (h/2: " << fd2 << ") vs analytic " << a;
  }
  tally.checked += probes - skipped;
  tally.skipped += skipped;
  EXPECT_EQ(failures, 0) << what << ": " << failures << " of " << probes << " probes disagree";
  EXPECT_LE(3 * skipped, probes) << what << ": " << skipped << " of " << probes << " probes hit a discrete decision";
}

// Model-level FD: every adapter kind, on an F32 model (frozen base params) with balance loss on so the router
// adapter also gets the balance-loss gradient.
TEST(LoraGrad, ModelFiniteDifferencesEveryAdapterKind) {
  const ModelConfig c = tiny_config();
  Model m(c);
  m.init_random(7, 0.2);
  LoraConfig cfg;
  cfg.rank = 3;
  cfg.alpha = 4.0;
  cfg.targets = {"layers.{0,1}.attn.{wq_a,wq_b,wkv,wo_a,wo_b}", "layers.1.ffn.experts.{0,1,2,3,4,5,6,7}.w{1,3}",
                 "layers.1.ffn.experts.*.w2", "layers.0.ffn.experts.*.w1", "layers.{0,1}.ffn.shared_experts.*",
                 "layers.{0,1}.ffn.gate", "layers.1.attn.compressor.wgate"};
  apply_lora(m, cfg);
  LoraConfig shared_a = cfg;  // layer 2: the shared-A wo_a form
  shared_a.wo_a_per_group = false;
  shared_a.targets = {"layers.2.attn.wo_a"};
  apply_lora(m, shared_a);
  fill_B(m, 5, 0.3f);
  const SeqLayout layout(2, 13);
  const Tensor ids = random_ids(layout.tokens(), c.vocab_size, 11);
  const LossWeights w{0.0, 1e-2};
  m.zero_grad();
  m.forward_backward(ids, ids, layout, w);
  auto loss = [&] { return m.evaluate(ids, ids, layout, w).total; };
  std::map<std::string, LoraAdapter*> by;
  for (LoraAdapter* a : lora_adapters(m)) by[a->unit] = a;
  FdTally tally;
  for (const char* u : {"layers.0.attn.wq_a", "layers.1.attn.wq_b", "layers.0.attn.wkv", "layers.1.attn.wo_a.0",
                        "layers.0.attn.wo_a.1", "layers.2.attn.wo_a", "layers.1.attn.wo_b", "layers.1.ffn.experts.2.w13",
                        "layers.1.ffn.experts.5.w2", "layers.0.ffn.experts.3.w1", "layers.0.ffn.shared_experts.w1",
                        "layers.1.ffn.shared_experts.w2", "layers.0.ffn.shared_experts.w3", "layers.1.ffn.gate",
                        "layers.0.ffn.gate", "layers.1.attn.compressor.wgate"}) {
    ASSERT_TRUE(by.count(u)) << u;
    LoraAdapter& ad = *by[u];
    ASSERT_TRUE(ad.A.grad.defined() && ad.B.grad.defined()) << u;
    fd_check_smooth(std::string(u) + ".lora_A", ad.A.value, ad.A.grad.clone(), loss, 1e-2, 6e-5, 3e-2, 6, tally);
    fd_check_smooth(std::string(u) + ".lora_B", ad.B.value, ad.B.grad.clone(), loss, 1e-2, 6e-5, 3e-2, 6, tally);
  }
  std::printf("[lora fd, F32 base] %d probes within tolerance, %d skipped (a top-k flipped within +-h)\n", tally.checked,
              tally.skipped);
  // Nothing but adapters got a gradient buffer.
  std::set<const Param*> adapter;
  for (Param* p : lora_params(m)) adapter.insert(p);
  m.visit([&](Param& p) { EXPECT_TRUE(adapter.count(&p) || !p.grad.defined()) << p.name; });
}

// ---- the frozen base: storage precision, memory, gradients through FP8 / FP4 -------------------------------------------
TEST(LoraMemory, FrozenBaseStaysFp8AndFp4) {
  TmpDir d("memory");
  MakeTinyOptions mo;
  mo.preset = "tiny";
  mo.seed = 4;
  mo.stddev = 0.2;
  mo.quant = "fp8";  // instruct: FP8 dense + FP4 experts, E8M0 scales
  make_tiny_checkpoint(d.str(), mo);
  LoadReport rep;
  LoadOptions lo;
  lo.mode = LoadMode::FrozenQuantized;
  lo.frozen_wo_a = true;  // wo_a too stays FP8 (the default keeps it as an F32 Param)
  auto m = load_model(d.str(), lo, {}, &rep);
  {  // The same logits as with the default policy (F32 wo_a), to FP32 rounding.
    LoadOptions lo2;
    lo2.mode = LoadMode::FrozenQuantized;
    auto m2 = load_model(d.str(), lo2);
    EXPECT_FALSE(model_weight_slots(*m2).at("layers.1.attn.wo_a.weight").frozen());
    const Batch b{random_ids(2 * 9, m->config().vocab_size, 1), SeqLayout(2, 9)};
    EXPECT_LE(max_abs_diff(logits(*m, b), logits(*m2, b)), 1e-5);
  }
  LoraConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.targets = {"attn.*", "shared_experts.*", "experts.*.w{1,2,3}", "ffn.gate"};
  const int64_t n = apply_lora(*m, cfg);
  fill_B(*m, 8, 0.05f);
  const SeqLayout layout(2, 17);
  const Tensor ids = random_ids(layout.tokens(), m->config().vocab_size, 2);
  const LossWeights w{0.3, 1e-3};
  m->zero_grad();
  m->forward_backward(ids, ids, layout, w);

  // Every Linear / expert weight is a frozen QuantizedWeight: no F32 value, no gradient, not visited.
  int64_t fp8_numel = 0, fp8_bytes = 0, fp4_numel = 0, fp4_bytes = 0, other_frozen = 0;
  for (auto& [name, slot] : model_weight_slots(*m)) {
    if (!slot.linear && !slot.expert && !slot.attn) continue;
    if (name.find(".lora_") != std::string::npos) continue;
    const QuantizedWeight* q = slot.frozen_weight();
    ASSERT_NE(q, nullptr) << name;
    EXPECT_FALSE(slot.param->value.defined()) << name;
    EXPECT_FALSE(slot.param->grad.defined()) << name;
    EXPECT_FALSE(slot.param->trainable) << name;
    if (q->format == WeightFormat::FP8) {
      EXPECT_EQ(q->data.dtype(), DType::F8_E4M3);
      fp8_numel += q->data.numel();
      fp8_bytes += q->nbytes();
    } else if (q->format == WeightFormat::FP4) {
      fp4_numel += q->data.numel();
      fp4_bytes += q->nbytes();
    } else {
      ++other_frozen;  // BF16 head / compressor / indexer weights of the instruct format
    }
  }
  ASSERT_GT(fp8_numel, 0);
  ASSERT_GT(fp4_numel, 0);
  const double fp8_bpp = static_cast<double>(fp8_bytes) / static_cast<double>(fp8_numel);
  const double fp4_bpp = static_cast<double>(fp4_bytes) / static_cast<double>(fp4_numel);
  EXPECT_LT(fp8_bpp, 1.01);       // 1 byte + one E8M0 scale byte per 128 x 128 block
  EXPECT_DOUBLE_EQ(fp4_bpp, 0.5 + 1.0 / 32);  // half a byte + one E8M0 scale byte per 32
  // Gradients and optimizer state only for adapters.
  std::set<const Param*> adapter;
  for (Param* p : lora_params(*m)) adapter.insert(p);
  int64_t adapter_numel = 0, frozen_f32_numel = 0;
  m->visit([&](Param& p) {
    if (adapter.count(&p)) {
      EXPECT_TRUE(p.grad.defined()) << p.name;
      adapter_numel += p.value.numel();
    } else {
      EXPECT_FALSE(p.trainable) << p.name;
      EXPECT_FALSE(p.grad.defined()) << p.name;
      if (p.value.dtype() == DType::F32) frozen_f32_numel += p.value.numel();
    }
  });
  OptimizerConfig oc;
  oc.groups = GroupTable::adamw_everywhere();
  Optimizer opt(lora_params(*m), oc);
  EXPECT_EQ(opt.count(OptGroup::AdamW), static_cast<int64_t>(adapter.size()));
  int64_t state_numel = 0;
  for (const auto& [k, t] : opt.state_dict())
    if (t.dtype() == DType::F32) state_numel += t.numel();
  EXPECT_EQ(state_numel, 2 * adapter_numel);  // exp_avg + exp_avg_sq, adapters only
  std::printf("[lora memory] frozen FP8 dense (wo_a included) %lld params, %.4f bytes/param; frozen FP4 experts %lld "
              "params, %.4f bytes/param; other frozen matrices %lld; frozen F32 params (embed, norms, hc, gate, ...) %lld; "
              "%lld adapters, %lld trainable params (+%lld F32 grad, +%lld AdamW state)\n",
              static_cast<long long>(fp8_numel), fp8_bpp, static_cast<long long>(fp4_numel), fp4_bpp,
              static_cast<long long>(other_frozen), static_cast<long long>(frozen_f32_numel), static_cast<long long>(n),
              static_cast<long long>(adapter_numel), static_cast<long long>(adapter_numel),
              static_cast<long long>(state_numel));

  // Adapter gradients through the frozen FP8 / FP4 weights match finite differences.
  auto loss = [&] { return m->evaluate(ids, ids, layout, w).total; };
  std::map<std::string, LoraAdapter*> by;
  for (LoraAdapter* a : lora_adapters(*m)) by[a->unit] = a;
  FdTally tally;
  for (const char* u : {"layers.0.attn.wq_a", "layers.1.attn.wo_a.1", "layers.2.ffn.experts.4.w13",
                        "layers.3.ffn.experts.1.w2", "layers.1.ffn.shared_experts.w2"}) {
    LoraAdapter& ad = *by.at(u);
    fd_check_smooth(std::string(u) + ".lora_A", ad.A.value, ad.A.grad.clone(), loss, 3e-3, 1.5e-4, 3e-2, 6, tally);
    fd_check_smooth(std::string(u) + ".lora_B", ad.B.value, ad.B.grad.clone(), loss, 3e-3, 1.5e-4, 3e-2, 6, tally);
  }
  std::printf("[lora fd, FP8/FP4 base] %d probes within tolerance, %d skipped (a top-k flipped within +-h)\n",
              tally.checked, tally.skipped);
}

// ---- dropout -----------------------------------------------------------------------------------------------------------
TEST(LoraDropout, TrainEvalAndReproducibleStreams) {
  const ModelConfig c = tiny_config();
  Model m(c);
  m.init_random(3, 0.2);
  LoraConfig cfg;
  cfg.rank = 4;
  cfg.dropout = 0.25;
  cfg.seed = 9;
  cfg.targets = {"wq_a", "wo_a", "experts.*.w{1,2,3}", "shared_experts.w2", "ffn.gate"};
  apply_lora(m, cfg);
  fill_B(m, 2, 0.3f);
  const SeqLayout layout(2, 11);
  const Tensor ids = random_ids(layout.tokens(), c.vocab_size, 4);
  const Batch b{ids, layout};
  // Eval mode (the default): no dropout, deterministic, equal to an adapter with p = 0.
  const std::vector<float> e1 = logits(m, b), e2 = logits(m, b);
  EXPECT_EQ(e1, e2);
  // Train mode: masks change from draw to draw, and set_lora_dropout_step replays them.
  set_lora_train_mode(m, true);
  set_lora_dropout_step(m, 3);
  const std::vector<float> t1 = logits(m, b), t2 = logits(m, b);
  EXPECT_NE(t1, e1);
  EXPECT_NE(t1, t2);
  set_lora_dropout_step(m, 3);
  EXPECT_EQ(logits(m, b), t1);
  // A forward + backward uses one mask: the loss it reports is the loss of that mask.
  set_lora_dropout_step(m, 3);
  m.zero_grad();
  const double l1 = m.forward_backward(ids, ids, layout, LossWeights{0, 0}).lm;
  set_lora_dropout_step(m, 3);
  EXPECT_EQ(m.evaluate(ids, ids, layout, LossWeights{0, 0}).lm, l1);
  set_lora_train_mode(m, false);
  EXPECT_EQ(logits(m, b), e1);
}

}  // namespace
}  // namespace dsv4
