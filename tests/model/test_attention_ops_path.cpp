// Attention's tensor-op path (the forward / backward CUDA tensors take) run on CPU tensors under ForceOpsPath, against
// the reference path (Attention::forward / backward outside the scope): output, dx and every parameter gradient, for
// the tiny preset's SWA (layer 0), CSA (layer 1, ratio 4, indexer top-k) and HCA (layer 2, ratio 8) layers, on
// layouts with odd sequence lengths, packed documents and sequences too short for a compressed block.
//
// Tolerance: none, bit for bit. On CPU tensors the ops path calls the same CPU functions in the same order as the
// reference: Linear / RMSNorm take their CPU paths, the per-head q norm runs cpu::rmsnorm_forward / _backward (the
// loops of rmsnorm_forward_rows / rmsnorm_backward_rows), rope_apply's CPU twin is rope_rows_freq with the table's
// inv_freq, the compressor pools with compress_pool_forward / _backward<float>, the indexer scores with
// indexer_scores_rows<float> + Indexer::select_topk, the core is sparse_attn_forward / _backward<float> on the same
// SparseAttnIndex, grouped wo_a goes through pmatmul_xwT / pmatmul_dyW / pgemm_dW on column slices (fp32: the same
// cpu_gemm calls as pgemm_*_rows), and every gradient / dx accumulation is one elementwise add in the reference's
// order (the sink's gradient summed from zero, then added, as the reference does).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <string>

#include "fd_check.h"
#include "model/attention.h"
#include "model/quant.h"
#include "model/exec_path.h"

namespace dsv4 {
namespace {

using testing::random_tensor;

constexpr int64_t kSwa = 0, kCsa = 1, kHca = 2;  // layers of the tiny preset: ratios 0, 4, 8

std::string prefix_of(int64_t layer) { return "layers." + std::to_string(layer) + ".attn."; }

void randomize(Attention& a, uint32_t seed) {
  std::mt19937 rng(seed);
  a.visit([&](Param& p) {
    float lo = -1, hi = 1;
    if (p.name.ends_with("norm.weight")) lo = 0.8f, hi = 1.2f;
    else if (p.name.ends_with("ape")) lo = -0.5f, hi = 0.5f;
    else if (!p.name.ends_with("attn_sink")) hi = 1.0f / std::sqrt(static_cast<float>(p.value.size(1))), lo = -hi;
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(static_cast<size_t>(p.value.numel()));
    for (float& x : v) x = u(rng);
    p.value = Tensor::from_floats(p.value.shape(), v);
  });
}

struct PathRun {
  Tensor out, dx;
  std::map<std::string, Tensor> grads;
  SparseAttnIndex index;
};

// Forward (under ForceOpsPath when ops) and backward; the backward runs outside the scope: it follows the path the
// forward recorded in its context.
PathRun run(Attention& a, const Tensor& x, const Tensor& dy, const SeqLayout& L, bool ops) {
  a.visit([](Param& p) { p.grad = Tensor(); });
  PathRun r;
  AttentionCtx ctx;
  {
    std::optional<ForceOpsPath> scope;
    if (ops) scope.emplace();
    r.out = a.forward(x, L, &ctx);
  }
  EXPECT_EQ(ctx.ops_path, ops);
  r.dx = a.backward(dy, ctx);
  r.index = ctx.index;
  a.visit([&](Param& p) {
    if (p.grad.defined()) r.grads[p.name] = p.grad.clone();
  });
  return r;
}

void expect_same_bits(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_TRUE(got.defined() && want.defined()) << what;
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const auto g = got.to_floats(), w = want.to_floats();
  size_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < g.size(); ++i)
    if (std::memcmp(&g[i], &w[i], sizeof(float)) != 0) {
      ++bad;
      worst = std::max(worst, std::abs(static_cast<double>(g[i]) - w[i]));
    }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << g.size() << " values differ (max |diff| " << worst << ")";
}

void compare(int64_t layer, const SeqLayout& L, uint32_t seed, MatmulPrecision precision = MatmulPrecision::F32) {
  const ModelConfig cfg = model_preset("tiny");
  Attention a(prefix_of(layer), cfg, layer);
  randomize(a, seed);
  a.set_matmul_precision(precision);
  std::mt19937 rng(seed + 1);
  const Tensor x = random_tensor({L.tokens(), cfg.dim}, rng), dy = random_tensor({L.tokens(), cfg.dim}, rng);
  const PathRun ref = run(a, x, dy, L, false), ops = run(a, x, dy, L, true);
  const std::string tag = "layer " + std::to_string(layer) + " (" + std::string(matmul_precision_name(precision)) +
                          ", " + std::to_string(L.batch) + "x" + std::to_string(L.seq) + (L.packed() ? " packed" : "") +
                          ") ";
  EXPECT_EQ(ops.index.comp_offsets, ref.index.comp_offsets) << tag;
  EXPECT_EQ(ops.index.comp_ids, ref.index.comp_ids) << tag;
  EXPECT_EQ(ops.index.win_begin, ref.index.win_begin) << tag;
  expect_same_bits(ops.out, ref.out, tag + "out");
  expect_same_bits(ops.dx, ref.dx, tag + "dx");
  ASSERT_EQ(ops.grads.size(), ref.grads.size()) << tag;
  size_t expected = 0;
  a.visit([&](Param& p) { expected += p.trainable ? 1 : 0; });
  EXPECT_EQ(ref.grads.size(), expected) << tag << "every trainable parameter has a gradient";
  for (const auto& [name, g] : ref.grads) {
    ASSERT_TRUE(ops.grads.count(name)) << tag << name;
    expect_same_bits(ops.grads.at(name), g, tag + name);
  }
}

SeqLayout three_docs() {  // one row of 32: documents [0, 5), [5, 18), [18, 32)
  SeqLayout L(1, 32);
  L.doc_start.resize(32);
  for (int64_t s = 0; s < 32; ++s) L.doc_start[static_cast<size_t>(s)] = s < 5 ? 0 : s < 18 ? 5 : 18;
  return L;
}

// 2 x 27: not a multiple of 4 or 8, longer than the window (8); CSA sees up to 6 entries (> index_topk 2).
TEST(AttentionOpsPath, SlidingWindowBitIdenticalToReference) {
  compare(kSwa, SeqLayout(2, 27), 1);
  compare(kSwa, three_docs(), 2);
}
TEST(AttentionOpsPath, CompressedSparseBitIdenticalToReference) {
  compare(kCsa, SeqLayout(2, 27), 3);
  compare(kCsa, three_docs(), 4);
  compare(kCsa, SeqLayout(3, 13), 5);
}
TEST(AttentionOpsPath, HeavilyCompressedBitIdenticalToReference) {
  compare(kHca, SeqLayout(2, 27), 6);
  compare(kHca, three_docs(), 7);
  compare(kHca, SeqLayout(1, 41), 8);
}
TEST(AttentionOpsPath, SequencesShorterThanABlock) {  // no compressed entry anywhere: zero compressor gradients
  for (int64_t layer : {kCsa, kHca}) compare(layer, SeqLayout(2, 3), 9);
}
TEST(AttentionOpsPath, Bf16GroupedGemmsBitIdenticalToReference) {  // precision through the column-slice wo_a GEMMs
  compare(kCsa, SeqLayout(2, 27), 10, MatmulPrecision::BF16);
  compare(kHca, three_docs(), 11, MatmulPrecision::BF16);
}

// A context reused across paths: each forward records its own path, and backward follows the latest one.
TEST(AttentionOpsPath, ContextReusedAcrossPaths) {
  const ModelConfig cfg = model_preset("tiny");
  Attention a(prefix_of(kCsa), cfg, kCsa);
  randomize(a, 31);
  const SeqLayout L(2, 27);
  std::mt19937 rng(32);
  const Tensor x = random_tensor({L.tokens(), cfg.dim}, rng), dy = random_tensor({L.tokens(), cfg.dim}, rng);
  const PathRun ref = run(a, x, dy, L, false);
  AttentionCtx ctx;
  {
    ForceOpsPath scope;
    a.forward(x, L, &ctx);
  }
  EXPECT_TRUE(ctx.ops_path);
  EXPECT_TRUE(ctx.compressor.ops_path);
  a.visit([](Param& p) { p.grad = Tensor(); });
  expect_same_bits(a.forward(x, L, &ctx), ref.out, "reference forward after an ops forward");
  EXPECT_FALSE(ctx.ops_path);
  EXPECT_FALSE(ctx.compressor.ops_path);
  expect_same_bits(a.backward(dy, ctx), ref.dx, "reference backward");
  expect_same_bits(a.attn_sink.grad, ref.grads.at(a.attn_sink.name), "attn_sink grad");
}

// What the tensor-op path does not support yet fails with one line naming the module and what is missing.
void expect_ops_error(Attention& a, const std::string& needle) {
  const ModelConfig cfg = model_preset("tiny");
  const SeqLayout L(1, 9);
  std::mt19937 rng(3);
  const Tensor x = random_tensor({L.tokens(), cfg.dim}, rng);
  ForceOpsPath scope;
  try {
    a.forward(x, L, nullptr);
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_NE(msg.find("tensor-op path"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  }
}

TEST(AttentionOpsPath, UnsupportedCasesFailClearly) {
  const ModelConfig cfg = model_preset("tiny");
  auto make = [&](int64_t layer, AttentionOptions opts = {}) {
    Attention a(prefix_of(layer), cfg, layer, opts);
    randomize(a, 21);
    return a;
  };
  {
    AttentionOptions opts;
    opts.simulate_release_quant = true;
    Attention a = make(kCsa, opts);
    expect_ops_error(a, "simulate_release_quant");
  }
}

// Adapters on the Linears (the Linear's own tensor-op path, lora.h's tensor forms with dropout) and frozen FP8 Linears
// (qmatmul) inside the attention: bitwise the reference, CSA layer (compressor and indexer Linears adapted too).
TEST(AttentionOpsPath, LinearAdaptersAndFrozenLinearsBitIdentical) {
  const ModelConfig cfg = model_preset("tiny");
  // variant 0: per-group wo_a adapters (group 1 only) over a frozen FP8 wo_a; 1: one shared-A wo_a adapter, F32 wo_a.
  auto build = [&](int variant) {
    Attention a(prefix_of(kCsa), cfg, kCsa);
    randomize(a, 41);
    a.wkv.set_frozen(quantize_weight(a.wkv.weight.value, WeightFormat::FP8, ScaleFormat::E8M0, a.wkv.weight.name));
    uint32_t seed = 50;
    auto fill = [&](LoraAdapter& ad) {
      std::mt19937 rng(seed++);
      ad.A.value = random_tensor(ad.A.value.shape(), rng, 0.3f);
      ad.B.value = random_tensor(ad.B.value.shape(), rng, 0.3f);
      ad.train = true;
    };
    for (Linear* l : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_b, &a.compressor.wkv, &a.indexer.weights_proj}) {
      l->lora.emplace(l->weight.name, 3, l->in_features(), l->out_features(), 1.5, 0.25, seed);
      fill(*l->lora);
    }
    const int64_t G = a.o_groups(), R = a.o_lora_rank(), K = a.wo_a_in();
    if (variant == 0) {
      a.set_wo_a_frozen(quantize_weight(a.wo_a.value, WeightFormat::FP8, ScaleFormat::E8M0, a.wo_a.name));
      a.wo_a_lora.groups.resize(static_cast<size_t>(G));
      a.wo_a_lora.groups[1].emplace("layers.1.attn.wo_a.1", 2, K, R, 2.0, 0.3, 77);
      fill(*a.wo_a_lora.groups[1]);
    } else {
      a.wo_a_lora.shared.emplace("layers.1.attn.wo_a", 2, K, G * R, 2.0, 0.3, 78);
      fill(*a.wo_a_lora.shared);
    }
    return a;
  };
  const SeqLayout L(2, 27);
  std::mt19937 rng(42);
  const Tensor x = random_tensor({L.tokens(), cfg.dim}, rng), dy = random_tensor({L.tokens(), cfg.dim}, rng);
  for (int variant : {0, 1}) {
    SCOPED_TRACE(variant);
    Attention ref_a = build(variant), ops_a = build(variant);
    const PathRun ref = run(ref_a, x, dy, L, false), got = run(ops_a, x, dy, L, true);
    expect_same_bits(got.out, ref.out, "out");
    expect_same_bits(got.dx, ref.dx, "dx");
    ASSERT_EQ(got.grads.size(), ref.grads.size());
    for (const auto& [name, g] : ref.grads) expect_same_bits(got.grads.at(name), g, name);
    EXPECT_GT(ref.grads.count("layers.1.attn.wq_b.weight.lora_A"), 0u);
    EXPECT_GT(ref.grads.count(variant == 0 ? "layers.1.attn.wo_a.1.lora_B" : "layers.1.attn.wo_a.lora_B"), 0u);
  }
}

}  // namespace
}  // namespace dsv4
