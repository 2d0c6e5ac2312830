// Whole-model tests that no external oracle covers: MTP and balance-loss gradients by finite differences,
// packed documents equal separate sequences, state loading errors, determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "fd_check.h"
#include "model/model.h"
#include "runtime/backend_dispatch.h"

namespace dsv4 {
namespace {

using testing::random_ids;

Param& find_param(Model& m, const std::string& name) {
  Param* found = nullptr;
  m.visit([&](Param& p) {
    if (p.name == name) found = &p;
  });
  EXPECT_NE(found, nullptr) << name;
  return *found;
}

class TinyModel : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg = model_preset("tiny");
    cfg.vocab_size = 64;
    model = std::make_unique<Model>(cfg);
    model->init_random(7, 0.2);  // larger than the default init so every path carries signal
  }
  ModelConfig cfg;
  std::unique_ptr<Model> model;
};

TEST_F(TinyModel, MtpGradientsMatchFiniteDifferences) {
  const SeqLayout layout(2, 19);
  const Tensor ids = random_ids(layout.tokens(), cfg.vocab_size, 1);
  const LossWeights w{/*mtp=*/0.3, /*balance_alpha=*/0.0};
  model->zero_grad();
  const LossResult r = model->forward_backward(ids, ids, layout, w);
  ASSERT_EQ(r.mtp.size(), 1u);
  EXPECT_GT(r.mtp[0], 0.0);
  EXPECT_NEAR(r.total, r.lm + 0.3 * r.mtp[0], 1e-9);
  auto loss = [&] { return model->evaluate(ids, ids, layout, w).total; };
  for (const char* name : {"mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
                           "mtp.0.norm.weight", "mtp.0.hc_head_fn", "mtp.0.hc_attn_base", "mtp.0.attn.wkv.weight",
                           "mtp.0.ffn.shared_experts.w2.weight", "embed.weight", "head.weight", "layers.3.attn.wq_a.weight"}) {
    Param& p = find_param(*model, name);
    ASSERT_TRUE(p.grad.defined()) << name;
    const Tensor analytic = p.grad.clone();
    testing::fd_check_tensor(name, p.value, analytic, loss, 1e-3, 2e-4, 3e-2, 8);
  }
}

TEST_F(TinyModel, BalanceLossGradientMatchesFiniteDifferences) {
  const SeqLayout layout(2, 16);
  const Tensor ids = random_ids(layout.tokens(), cfg.vocab_size, 2);
  // The balance loss alone: labels all ignored, so the LM and MTP losses vanish.
  const Tensor labels = Tensor::from_vector<int64_t>({layout.tokens()},
                                                     std::vector<int64_t>(static_cast<size_t>(layout.tokens()), -100));
  const LossWeights w{/*mtp=*/0.0, /*balance_alpha=*/1.0};
  model->zero_grad();
  const LossResult r = model->forward_backward(ids, labels, layout, w);
  EXPECT_EQ(r.lm, 0.0);
  EXPECT_GT(r.balance, 0.0);
  auto loss = [&] { return model->evaluate(ids, labels, layout, w).total; };
  for (const char* name : {"layers.3.ffn.gate.weight", "mtp.0.ffn.gate.weight", "layers.3.ffn_norm.weight",
                           "layers.2.attn.wo_b.weight"}) {
    Param& p = find_param(*model, name);
    ASSERT_TRUE(p.grad.defined()) << name;
    const Tensor analytic = p.grad.clone();
    testing::fd_check_tensor(name, p.value, analytic, loss, 1e-3, 1e-5, 3e-2, 8);
  }
  // Hash-routed layers have fixed routing: their balance term does not count.
  double learned = 0;
  for (size_t i = 0; i < r.output.moe_stats.size(); ++i)
    if (i >= static_cast<size_t>(cfg.n_layers) || i >= static_cast<size_t>(cfg.n_hash_layers))
      learned += r.output.moe_stats[i].balance_loss(1.0);
  EXPECT_NEAR(r.balance, learned, 1e-12);
}

TEST_F(TinyModel, PackedDocumentsEqualSeparateSequences) {
  // One row holding documents of 13 and 11 tokens vs. the two documents as separate rows.
  const int64_t a = 13, b = 11;
  const Tensor ids = random_ids(a + b, cfg.vocab_size, 3);
  SeqLayout packed(1, a + b);
  for (int64_t t = 0; t < a + b; ++t) packed.doc_start.push_back(t < a ? 0 : a);
  const auto out = model->forward(ids, packed, nullptr);
  const auto doc_a = model->forward(ids.slice(0, 0, a).contiguous(), SeqLayout(1, a), nullptr);
  const auto doc_b = model->forward(ids.slice(0, a, a + b).contiguous(), SeqLayout(1, b), nullptr);
  const auto lp = out.logits_TV.to_floats(), la = doc_a.logits_TV.to_floats(), lb = doc_b.logits_TV.to_floats();
  const int64_t V = cfg.vocab_size;
  double err = 0, scale = 1;
  for (float v : la) scale = std::max(scale, static_cast<double>(std::abs(v)));
  for (int64_t i = 0; i < a * V; ++i) err = std::max(err, std::abs(static_cast<double>(lp[i]) - la[i]));
  for (int64_t i = 0; i < b * V; ++i) err = std::max(err, std::abs(static_cast<double>(lp[a * V + i]) - lb[i]));
  EXPECT_LE(err, 1e-5 * scale) << "logits scale " << scale;  // FP32 rounding of different GEMM shapes
}

TEST_F(TinyModel, PackedTargetsNeverCrossDocuments) {
  // One row of two documents (positions 0-4 and 5-9), every label valid: the LM target of position 4 and the MTP
  // (shift 2) targets of positions 3 and 4 belong to the second document and are not counted; the loss equals the
  // two documents' losses as separate rows.
  SeqLayout packed(1, 10);
  for (int64_t t = 0; t < 10; ++t) packed.doc_start.push_back(t < 5 ? 0 : 5);
  const Tensor ids = random_ids(10, cfg.vocab_size, 4);
  const TargetCounts c = count_targets(ids, packed, 1);
  EXPECT_EQ(c.lm, 8);
  ASSERT_EQ(c.mtp.size(), 1u);
  EXPECT_EQ(c.mtp[0], 6);
  const TargetCounts unpacked = count_targets(ids, SeqLayout(1, 10), 1);
  EXPECT_EQ(unpacked.lm, 9);
  EXPECT_EQ(unpacked.mtp[0], 8);
  const LossWeights w{0.3, 0.0};
  const LossResult whole = model->evaluate(ids, ids, packed, w);
  const Tensor a = ids.slice(0, 0, 5).contiguous(), b = ids.slice(0, 5, 10).contiguous();
  const LossResult ra = model->evaluate(a, a, SeqLayout(1, 5), w), rb = model->evaluate(b, b, SeqLayout(1, 5), w);
  EXPECT_NEAR(whole.lm, (ra.lm * 4 + rb.lm * 4) / 8, 1e-5);
  EXPECT_NEAR(whole.mtp[0], (ra.mtp[0] * 3 + rb.mtp[0] * 3) / 6, 1e-5);
}

TEST_F(TinyModel, BackwardIsDeterministicAndAccumulates) {
  {  // Two fresh backward passes give bit-identical gradients.
    const SeqLayout l(1, 12);
    const Tensor x = random_ids(l.tokens(), cfg.vocab_size, 5);
    model->zero_grad();
    model->forward_backward(x, x, l, LossWeights{});
    std::vector<std::vector<float>> g;
    model->visit([&](Param& p) { g.push_back(p.grad.defined() ? p.grad.to_floats() : std::vector<float>{}); });
    model->zero_grad();
    model->forward_backward(x, x, l, LossWeights{});
    size_t i = 0;
    model->visit([&](Param& p) {
      const auto& g1 = g[i++];
      if (!g1.empty()) ASSERT_EQ(p.grad.to_floats(), g1) << p.name;
    });
  }
  const SeqLayout layout(1, 12);
  const Tensor ids = random_ids(layout.tokens(), cfg.vocab_size, 4);
  model->zero_grad();
  model->forward_backward(ids, ids, layout, LossWeights{});
  std::vector<std::vector<float>> first;
  model->visit([&](Param& p) { first.push_back(p.grad.defined() ? p.grad.to_floats() : std::vector<float>{}); });
  model->forward_backward(ids, ids, layout, LossWeights{});
  size_t i = 0;
  model->visit([&](Param& p) {
    const auto& g1 = first[i++];
    if (g1.empty()) return;
    const auto g2 = p.grad.to_floats();
    // The second pass accumulates into the first (BLAS beta = 1 sums in another order): equal to FP32 rounding.
    double num = 0, den = 0;
    for (size_t k = 0; k < g1.size(); ++k) {
      num += (g2[k] - 2.0 * g1[k]) * (g2[k] - 2.0 * g1[k]);
      den += 4.0 * g1[k] * g1[k];
    }
    EXPECT_LE(std::sqrt(num), 1e-5 * std::sqrt(den) + 1e-12) << p.name;
  });
}

TEST_F(TinyModel, FlatGradientBuffersHoldTheSameGradientsAndClearInOneFill) {
  const SeqLayout l(1, 12);
  const Tensor x = random_ids(l.tokens(), cfg.vocab_size, 6);
  model->zero_grad();
  model->forward_backward(x, x, l, LossWeights{});
  std::map<std::string, std::vector<float>> lazy;
  model->visit([&](Param& p) {
    if (p.grad.defined()) lazy[p.name] = p.grad.to_floats();
  });

  Model flat_model(cfg);
  flat_model.init_random(7, 0.2);
  std::vector<Param*> all;
  flat_model.visit([&](Param& p) { all.push_back(&p); });
  std::reverse(all.begin(), all.end());  // any order: the buffer follows the list
  flat_model.allocate_grads(all);
  const char* base = static_cast<const char*>(all.front()->grad.raw_data());
  int64_t off = 0;
  for (const Param* p : all) {  // back to back in list order, zeroed
    ASSERT_EQ(static_cast<const char*>(p->grad.raw_data()), base + off) << p->name;
    ASSERT_EQ(p->grad.shape(), p->value.shape()) << p->name;
    off += p->grad.nbytes();
  }
  for (int pass = 0; pass < 2; ++pass) {  // the second pass after zero_grad on dirty buffers
    flat_model.forward_backward(x, x, l, LossWeights{});
    for (const Param* p : all) {
      const auto it = lazy.find(p->name);
      const std::vector<float> g = p->grad.to_floats();
      if (it == lazy.end()) {
        EXPECT_TRUE(std::all_of(g.begin(), g.end(), [](float v) { return v == 0.0f; })) << p->name;
      } else {
        ASSERT_EQ(g, it->second) << p->name;
      }
    }
    const auto before = op_counts_by_name();
    flat_model.zero_grad();
    const auto fills = op_counts_between(before, op_counts_by_name());
    EXPECT_EQ(fills.size(), 1u);
    EXPECT_EQ(fills.count("fill") ? fills.at("fill") : 0, 1);  // one buffer, one device
    for (const Param* p : all) EXPECT_EQ(p->grad.to_floats(), std::vector<float>(p->grad.numel(), 0.0f)) << p->name;
  }
}

TEST_F(TinyModel, RecomputationGivesIdenticalGradients) {
  ModelOptions ro;
  ro.recompute = true;
  Model recomputing(cfg, ro);
  std::map<std::string, Tensor> state;
  model->visit([&](Param& p) { state[p.name] = p.value.clone(); });
  recomputing.load_state(state, "same weights");
  const SeqLayout layout(2, 16);
  const Tensor ids = random_ids(layout.tokens(), cfg.vocab_size, 9);
  model->zero_grad();
  const LossResult a = model->forward_backward(ids, ids, layout, LossWeights{});
  const LossResult b = recomputing.forward_backward(ids, ids, layout, LossWeights{});
  EXPECT_EQ(a.total, b.total);
  std::map<std::string, std::vector<float>> grads;
  model->visit([&](Param& p) {
    if (p.grad.defined()) grads[p.name] = p.grad.to_floats();
  });
  int compared = 0;
  recomputing.visit([&](Param& p) {
    if (!p.grad.defined()) return;
    ASSERT_TRUE(grads.count(p.name)) << p.name;
    EXPECT_EQ(p.grad.to_floats(), grads[p.name]) << p.name;
    ++compared;
  });
  EXPECT_EQ(compared, static_cast<int>(grads.size()));
}

TEST_F(TinyModel, LoadStateNamesMissingUnexpectedAndMisshapedTensors) {
  std::map<std::string, Tensor> state;
  model->visit([&](Param& p) { state[p.name] = p.value.clone(); });
  EXPECT_NO_THROW(model->load_state(state, "ok.safetensors"));
  state.erase("layers.1.attn.wq_a.weight");
  state["layers.9.attn.bogus"] = Tensor::zeros({1}, DType::F32);
  state["norm.weight"] = Tensor::zeros({3}, DType::F32);
  try {
    model->load_state(state, "bad.safetensors");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find("missing [layers.1.attn.wq_a.weight]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("unexpected [layers.9.attn.bogus]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("norm.weight (expected F32[64], got F32[3] cpu)"), std::string::npos) << msg;
  }
}

TEST_F(TinyModel, ParameterNamesFollowTheRelease) {
  std::set<std::string> names;
  model->visit([&](Param& p) { EXPECT_TRUE(names.insert(p.name).second) << "duplicate " << p.name; });
  for (const char* n : {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.hc_attn_fn",
                        "layers.0.ffn.gate.tid2eid", "layers.3.ffn.gate.bias", "layers.1.attn.indexer.wq_b.weight",
                        "layers.2.attn.compressor.ape", "mtp.0.e_proj.weight", "mtp.0.hc_head_scale",
                        "mtp.0.ffn.experts.7.w2.weight"})
    EXPECT_TRUE(names.count(n)) << n;
  EXPECT_FALSE(names.count("layers.0.attn.compressor.ape"));  // sliding-window layer
  EXPECT_GT(model->num_params(), 0);
}

}  // namespace
}  // namespace dsv4
