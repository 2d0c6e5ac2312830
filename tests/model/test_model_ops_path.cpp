// The model on its tensor-op path (model/exec_path.h: what CUDA parameters run) against the CPU reference, on the CPU:
// a ForceOpsPath scope makes every module that has an ops path take it on CPU tensors, so the model-level glue
// (stream expansion, MTP combination, targets, cross-entropy, embedding, output head) and each module's ops-path
// orchestration are checked without a GPU. Modules without an ops path yet run their reference under the scope too,
// so these tests hold at any stage of that work.
//
// Tolerances. Embedding and cross_entropy run the same CPU functions on both paths: bit-identical. The whole model:
// losses within 1e-6 relative and each parameter gradient within 1e-4 * max|reference gradient| (per tensor), room for
// modules whose ops path sums in another order than their reference (today every module's ops path on CPU tensors is
// the reference's own loops or the same CPU twin, and the results are bit-identical; the test prints the largest
// differences it sees).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <random>

#include "fd_check.h"
#include "model/exec_path.h"
#include "model/model.h"
#include "model/quant.h"

namespace dsv4 {
namespace {

using testing::random_ids;

Tensor random_floats(const Shape& shape, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (auto& x : v) x = u(rng);
  return Tensor::from_floats(shape, v, DType::F32);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (!(a.shape() == b.shape()) || a.dtype() != b.dtype()) return false;
  const Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()) == 0;
}

// max |got - want| / max |want| (0 when both are all zeros).
double scaled_diff(const Tensor& got, const Tensor& want) {
  const auto g = got.to_floats(), w = want.to_floats();
  double mx = 0, d = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    mx = std::max(mx, std::fabs(double(w[i])));
    d = std::max(d, std::fabs(double(g[i]) - double(w[i])));
  }
  return d == 0 ? 0.0 : d / std::max(mx, 1e-30);
}

double rel_diff(double got, double want) { return std::fabs(got - want) / std::max(std::fabs(want), 1e-30); }

// ---- Embedding and cross-entropy --------------------------------------------------------------------------------

TEST(ModelOpsPath, EmbeddingMatchesReference) {
  Embedding ref("embed.weight", 37, 12);
  ref.weight.value = random_floats({37, 12}, -1, 1, 1);
  Embedding ops = ref;
  const Tensor ids = random_ids(29, 37, 2), dh = random_floats({29, 12}, -1, 1, 3);
  const Tensor h_ref = ref.forward(ids);
  ref.backward(dh, ids);
  ref.backward(dh, ids);  // gradients accumulate
  Tensor h_ops;
  {
    ForceOpsPath force;
    h_ops = ops.forward(ids);
    ops.backward(dh, ids);
    ops.backward(dh, ids);
  }
  EXPECT_TRUE(same_bits(h_ops, h_ref));
  EXPECT_TRUE(same_bits(ops.weight.grad, ref.weight.grad));
  // Rows are the weight's rows; repeated ids accumulate.
  const auto w = ref.weight.value.to_floats(), h = h_ref.to_floats();
  const int64_t* id = ids.data<int64_t>();
  for (int64_t t = 0; t < 29; ++t)
    for (int64_t k = 0; k < 12; ++k) ASSERT_EQ(h[t * 12 + k], w[id[t] * 12 + k]);
  EXPECT_THROW(ref.forward(Tensor::from_vector<int64_t>({2}, {0, 37})), Error);
}

// log-softmax cross-entropy in double straight from the definition.
struct NaiveCe {
  double loss = 0;
  int64_t counted = 0;
  std::vector<double> dlogits;
};
NaiveCe naive_ce(const Tensor& logits, const Tensor& targets, double normalizer) {
  const int64_t T = logits.size(0), V = logits.size(1);
  const auto z = logits.to_floats();
  const int64_t* y = targets.data<int64_t>();
  NaiveCe r;
  r.dlogits.assign(static_cast<size_t>(T * V), 0.0);
  for (int64_t t = 0; t < T; ++t) r.counted += y[t] != kIgnoreIndex;
  const double norm = normalizer > 0 ? normalizer : double(r.counted);
  double total = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (y[t] == kIgnoreIndex) continue;
    double m = -INFINITY, s = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, double(z[t * V + v]));
    for (int64_t v = 0; v < V; ++v) s += std::exp(double(z[t * V + v]) - m);
    const double lse = m + std::log(s);
    total += lse - z[t * V + y[t]];
    for (int64_t v = 0; v < V; ++v)
      r.dlogits[t * V + v] = (std::exp(double(z[t * V + v]) - lse) - (v == y[t] ? 1.0 : 0.0)) / norm;
  }
  r.loss = norm > 0 ? total / norm : 0.0;
  return r;
}

TEST(ModelOpsPath, CrossEntropyMatchesReference) {
  struct Case {
    int64_t T, V;
    double normalizer;
    int ignore_every;  // 0: none ignored, 1: all ignored, k: every k-th
  };
  for (const Case& c : {Case{11, 37, 0, 3}, Case{8, 101, 0, 0}, Case{6, 13, 0, 1}, Case{9, 64, 23.0, 2},
                        Case{5, 7, 4.0, 1}}) {
    SCOPED_TRACE(::testing::Message() << "T " << c.T << " V " << c.V << " normalizer " << c.normalizer
                                      << " ignore_every " << c.ignore_every);
    const Tensor logits = random_floats({c.T, c.V}, -4, 4, static_cast<uint32_t>(c.T * 100 + c.V));
    Tensor targets = random_ids(c.T, c.V, static_cast<uint32_t>(c.V));
    for (int64_t t = 0; t < c.T; ++t)
      if (c.ignore_every && t % c.ignore_every == 0) targets.data<int64_t>()[t] = kIgnoreIndex;
    const CrossEntropyResult ref = cross_entropy(logits, targets, true, c.normalizer);
    CrossEntropyResult ops;
    {
      ForceOpsPath force;
      ops = cross_entropy(logits, targets, true, c.normalizer);
    }
    EXPECT_EQ(std::memcmp(&ops.loss, &ref.loss, sizeof(double)), 0) << ops.loss << " vs " << ref.loss;
    EXPECT_EQ(ops.counted, ref.counted);
    EXPECT_TRUE(same_bits(ops.dlogits_TV, ref.dlogits_TV));
    // Both against the definition.
    const NaiveCe want = naive_ce(logits, targets, c.normalizer);
    EXPECT_EQ(ref.counted, want.counted);
    EXPECT_NEAR(ref.loss, want.loss, 1e-6 * std::max(1.0, std::fabs(want.loss)));
    const auto d = ref.dlogits_TV.to_floats();
    for (size_t i = 0; i < d.size(); ++i) ASSERT_NEAR(d[i], want.dlogits[i], 1e-6) << "dlogits element " << i;
    if (c.ignore_every == 1) {
      EXPECT_EQ(ref.counted, 0);
      EXPECT_EQ(ref.loss, 0.0);
      for (float v : d) ASSERT_EQ(v, 0.0f);
    }
    // Without the gradient: the same loss, no tensor.
    const CrossEntropyResult no_grad = cross_entropy(logits, targets, false, c.normalizer);
    EXPECT_EQ(no_grad.loss, ref.loss);
    EXPECT_FALSE(no_grad.dlogits_TV.defined());
  }
  // A non-contiguous target view is read like its contiguous copy; a target outside [0, V) names its position.
  const Tensor logits = random_floats({4, 9}, -1, 1, 5);
  const Tensor wide = Tensor::from_vector<int64_t>({4, 2}, {1, 0, 8, 0, kIgnoreIndex, 0, 3, 0});
  EXPECT_EQ(cross_entropy(logits, wide.select(1, 0), false).loss,
            cross_entropy(logits, wide.select(1, 0).contiguous(), false).loss);
  EXPECT_THROW(cross_entropy(logits, Tensor::from_vector<int64_t>({4}, {0, 9, 1, 2}), false), Error);
}

// ---- the whole model ----------------------------------------------------------------------------------------------

struct ModelRun {
  LossResult loss;
  LossResult eval;
  std::map<std::string, Tensor> grads;
};

ModelRun run_model(const ModelConfig& cfg, bool ops_path, bool recompute, const Tensor& ids, const Tensor& labels,
              const SeqLayout& layout, const LossWeights& w) {
  ModelOptions opts;
  opts.recompute = recompute;
  Model m(cfg, opts);
  m.init_random(11, 0.1);
  ModelRun r;
  std::optional<ForceOpsPath> force;
  if (ops_path) force.emplace();
  r.loss = m.forward_backward(ids, labels, layout, w);
  r.eval = m.evaluate(ids, labels, layout, w);
  m.visit([&](Param& p) { r.grads[p.name] = p.grad; });
  return r;
}

// A batch of two rows of the tiny preset (hash-routed, SWA, CSA and HCA layers, one MTP block) with some labels
// ignored; the loss weights switch on every term.
class TinyOpsPath : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg = model_preset("tiny");
    cfg.vocab_size = 97;  // odd, and small enough to keep the test fast
    ids = random_ids(layout.tokens(), cfg.vocab_size, 21);
    labels = ids.clone();
    for (int64_t t = 0; t < layout.tokens(); t += 5) labels.data<int64_t>()[t] = kIgnoreIndex;
  }
  void compare(const ModelRun& got, const ModelRun& want, const std::string& what) {
    SCOPED_TRACE(what);
    constexpr double kLossRtol = 1e-6, kGradRtol = 1e-4;
    EXPECT_EQ(got.loss.tokens, want.loss.tokens);
    EXPECT_LE(rel_diff(got.loss.total, want.loss.total), kLossRtol) << got.loss.total << " vs " << want.loss.total;
    EXPECT_LE(rel_diff(got.loss.lm, want.loss.lm), kLossRtol) << got.loss.lm << " vs " << want.loss.lm;
    ASSERT_EQ(got.loss.mtp.size(), want.loss.mtp.size());
    for (size_t j = 0; j < want.loss.mtp.size(); ++j) EXPECT_LE(rel_diff(got.loss.mtp[j], want.loss.mtp[j]), kLossRtol);
    EXPECT_LE(std::fabs(got.loss.balance - want.loss.balance), kLossRtol * std::max(want.loss.balance, 1e-12));
    EXPECT_LE(rel_diff(got.eval.total, want.eval.total), kLossRtol);
    ASSERT_EQ(got.loss.output.moe_stats.size(), want.loss.output.moe_stats.size());
    for (size_t i = 0; i < want.loss.output.moe_stats.size(); ++i)
      EXPECT_EQ(got.loss.output.moe_stats[i].load, want.loss.output.moe_stats[i].load) << "MoE layer " << i;
    EXPECT_LE(scaled_diff(got.loss.output.logits_TV, want.loss.output.logits_TV), kGradRtol);
    ASSERT_EQ(got.grads.size(), want.grads.size());
    double worst = 0;
    std::string worst_name;
    size_t identical = 0, defined = 0;
    for (const auto& [name, g] : want.grads) {
      const Tensor& o = got.grads.at(name);
      ASSERT_EQ(o.defined(), g.defined()) << name;
      if (!g.defined()) continue;
      ++defined;
      ASSERT_EQ(o.shape(), g.shape()) << name;
      EXPECT_TRUE(o.device().is_cpu()) << name;
      const double d = scaled_diff(o, g);
      EXPECT_LE(d, kGradRtol) << name;
      identical += same_bits(o, g);
      if (d >= worst) worst = d, worst_name = name;
    }
    std::printf("[ %s ] loss %.9g vs %.9g; %zu of %zu gradients bit-identical, largest difference %.3g of max|ref| "
                "(%s)\n",
                what.c_str(), got.loss.total, want.loss.total, identical, defined, worst,
                worst_name.c_str());
  }

  ModelConfig cfg;
  SeqLayout layout{2, 16};
  Tensor ids, labels;
  LossWeights weights{/*mtp=*/0.3, /*balance_alpha=*/0.01};
};

TEST_F(TinyOpsPath, ForwardBackwardMatchesReference) {
  const ModelRun ref = run_model(cfg, false, false, ids, labels, layout, weights);
  ASSERT_GT(ref.loss.lm, 0.0);
  ASSERT_GT(ref.loss.balance, 0.0);
  ASSERT_EQ(ref.loss.mtp.size(), 1u);
  compare(run_model(cfg, true, false, ids, labels, layout, weights), ref, "ops path");
  // Recomputation re-runs each block's forward (on the ops path too) and gives the same results.
  compare(run_model(cfg, true, true, ids, labels, layout, weights), ref, "ops path, recompute");
}

// Packed documents (targets across a document boundary ignored) and the global-mean normalisers.
TEST_F(TinyOpsPath, PackedRowsAndNormalizersMatchReference) {
  SeqLayout packed(2, 16);
  packed.doc_start.resize(32);
  for (int64_t t = 0; t < 32; ++t) packed.doc_start[t] = t < 16 ? (t % 16 < 7 ? 0 : 7) : 0;
  LossWeights w = weights;
  w.lm_normalizer = 50;
  w.mtp_normalizer = 45;
  const ModelRun ref = run_model(cfg, false, false, ids, labels, packed, w);
  compare(run_model(cfg, true, false, ids, labels, packed, w), ref, "packed, normalizers");
}

// Model::to(cpu) keeps frozen weights in their own format (FP4 stays FP4: the conversion to FP8 is for devices).
TEST(ModelOpsPath, ToCpuKeepsFrozenFormats) {
  ModelConfig cfg = model_preset("tiny");
  cfg.vocab_size = 64;
  Model m(cfg);
  ExpertWeights& ew = m.layers[1]->ffn.experts[2];
  ew.set_frozen(2, quantize_weight(ew.w2.value, WeightFormat::FP4, ScaleFormat::E8M0, ew.w2.name),
                m.layers[1]->ffn.expert_weight_shape(2));
  Attention& a = m.layers[2]->attn;
  a.set_wo_a_frozen(quantize_weight(a.wo_a.value, WeightFormat::FP8, ScaleFormat::E8M0, a.wo_a.name));
  m.to(Device::cpu());
  EXPECT_EQ(ew.w2_frozen.format, WeightFormat::FP4);
  EXPECT_EQ(a.wo_a_frozen.format, WeightFormat::FP8);
  EXPECT_TRUE(m.head.weight.value.device().is_cpu());
}

}  // namespace
}  // namespace dsv4
