// The MoE's tensor-op path (the one CUDA tensors take, model/moe_ops.cpp) run on the CPU under ForceOpsPath against
// the reference loops (moe.cpp): output, load / balance statistics, dx and every gradient. fp32: bit-identical (the
// same CPU GEMMs and element-wise cores in the same order). bf16 / fp8: the only difference is dX = dG W1 + dU W3,
// which the ops path accumulates inside the second GEMM (beta = 1) and the reference adds after rounding the product
// to a row buffer; bound 1e-5 relative to the largest |value| of each tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>

#include "fd_check.h"
#include "model/exec_path.h"
#include "model/moe.h"
#include "runtime/backend_dispatch.h"
#include "model/quant.h"

namespace dsv4 {
namespace {

using testing::random_tensor;

ModelConfig moe_config() {
  ModelConfig c;
  c.dim = 136;  // > 128: two FP8 blocks along D, the second partial
  c.n_routed_experts = 7;
  c.n_activated_experts = 3;
  c.moe_inter_dim = 40;
  c.n_shared_experts = 1;
  c.vocab_size = 32;
  c.route_scale = 1.5;
  c.swiglu_limit = 0.9;
  return c;
}

std::unique_ptr<MoE> make_moe(bool hash, MatmulPrecision p, uint64_t seed) {
  auto m = std::make_unique<MoE>("layers.0.ffn.", moe_config(), hash);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  m->visit([&](Param& q) {
    if (q.value.dtype() != DType::F32) return;
    q.value = random_tensor(q.value.shape(), rng, q.name.ends_with("gate.bias") ? 0.3f : 0.5f);
  });
  if (hash) {
    int64_t* tab = m->tid2eid.value.data<int64_t>();
    std::uniform_int_distribution<int64_t> pick(0, m->n_experts() - 1);
    for (int64_t i = 0; i < m->tid2eid.value.numel(); ++i) tab[i] = pick(rng);  // duplicates allowed (HF's init)
  }
  for (auto& ew : m->experts) ew.precision = p;
  m->shared.precision = p;
  return m;
}

void expect_close(const std::string& what, const Tensor& ref, const Tensor& got, double rel) {
  ASSERT_EQ(ref.shape(), got.shape()) << what;
  const std::vector<float> a = ref.to_floats(), b = got.to_floats();
  double amax = 0, err = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    amax = std::max(amax, std::abs(static_cast<double>(a[i])));
    err = std::max(err, std::abs(static_cast<double>(a[i]) - b[i]));
    if (rel == 0) ASSERT_EQ(a[i], b[i]) << what << " element " << i;
  }
  EXPECT_LE(err, rel * amax) << what;
}

struct MoeRun {
  Tensor y, dx;
  MoEStats stats;
  std::map<std::string, Tensor> grads;
};

MoeRun run(MoE& m, const Tensor& x, const Tensor& ids, const SeqLayout& layout, const Tensor& dy, double alpha) {
  MoeRun r;
  MoECtx ctx;
  r.y = m.forward(x, ids, layout, &ctx, &r.stats);
  EXPECT_EQ(ctx.ops_path, ForceOpsPath::active());
  r.dx = m.backward(dy, ctx, alpha);
  m.visit([&](Param& p) {
    if (p.grad.defined()) r.grads[p.name] = p.grad.clone();
  });
  return r;
}

void compare(bool hash, MatmulPrecision p, int64_t batch, int64_t seq, double rel) {
  SCOPED_TRACE(std::string(hash ? "hash" : "learned") + " " + std::string(matmul_precision_name(p)) + " T=" +
               std::to_string(batch * seq));
  const int64_t T = batch * seq, D = moe_config().dim;
  std::mt19937 rng(7);
  const Tensor x = random_tensor({T, D}, rng, 1.0f), dy = random_tensor({T, D}, rng, 1.0f);
  std::vector<int64_t> idv(static_cast<size_t>(T));
  std::uniform_int_distribution<int64_t> pick(0, moe_config().vocab_size - 1);
  for (auto& v : idv) v = pick(rng);
  const Tensor ids = Tensor::from_vector<int64_t>({T}, idv);
  const SeqLayout layout(batch, seq);
  auto ref_m = make_moe(hash, p, 11), ops_m = make_moe(hash, p, 11);
  const MoeRun ref = run(*ref_m, x, ids, layout, dy, 0.01);
  MoeRun got;
  {
    ForceOpsPath scope;
    got = run(*ops_m, x, ids, layout, dy, 0.01);
  }
  expect_close("y", ref.y, got.y, rel);
  expect_close("dx", ref.dx, got.dx, rel);
  EXPECT_EQ(ref.stats.load, got.stats.load);
  EXPECT_EQ(ref.stats.balance_term, got.stats.balance_term);
  ASSERT_EQ(ref.grads.size(), got.grads.size());
  for (const auto& [name, g] : ref.grads) {
    ASSERT_TRUE(got.grads.count(name)) << name;
    expect_close(name, g, got.grads.at(name), rel);
  }
}

TEST(MoEOpsPath, Fp32BitIdenticalToReference) {
  compare(false, MatmulPrecision::F32, 2, 19, 0.0);
  compare(true, MatmulPrecision::F32, 1, 23, 0.0);
  compare(false, MatmulPrecision::F32, 1, 1, 0.0);  // one token: most experts idle
}

TEST(MoEOpsPath, Bf16AndFp8MatchReference) {
  compare(false, MatmulPrecision::BF16, 2, 13, 1e-5);
  compare(false, MatmulPrecision::FP8, 2, 13, 1e-5);
  compare(true, MatmulPrecision::FP8, 1, 17, 1e-5);
}

// Adapters everywhere (router, routed w1 / w2 / w3 singles and a fused w13, shared expert), dropout on, over frozen
// FP8 and FP4 expert weights: bit-identical to the reference (the same CPU GEMMs, masks and draws in the same order).
std::unique_ptr<MoE> make_adapted_moe(uint64_t seed, MatmulPrecision p = MatmulPrecision::F32) {
  auto m = make_moe(false, p, seed);
  const ModelConfig c = moe_config();
  const int64_t D = c.dim, I = c.moe_inter_dim, E = c.n_routed_experts;
  std::mt19937 rng(static_cast<uint32_t>(seed + 100));
  uint64_t key = 1;
  auto attach = [&](std::optional<LoraAdapter>& slot, const std::string& unit, int64_t in, int64_t out) {
    slot.emplace(unit, 3, in, out, 1.25, 0.2, key++);
    slot->A.value = random_tensor(slot->A.value.shape(), rng, 0.3f);
    slot->B.value = random_tensor(slot->B.value.shape(), rng, 0.3f);
    slot->train = true;
  };
  attach(m->gate_lora, "layers.0.ffn.gate", D, E);
  attach(m->experts[0].lora_w1, "layers.0.ffn.experts.0.w1", D, I);
  attach(m->experts[0].lora_w2, "layers.0.ffn.experts.0.w2", I, D);
  attach(m->experts[1].lora_w13, "layers.0.ffn.experts.1.w13", D, 2 * I);
  attach(m->experts[2].lora_w3, "layers.0.ffn.experts.2.w3", D, I);
  attach(m->shared.lora_w1, "layers.0.ffn.shared_experts.w1", D, I);
  attach(m->shared.lora_w2, "layers.0.ffn.shared_experts.w2", I, D);
  for (int64_t e = 0; e < E; ++e) {
    ExpertWeights& ew = m->experts[static_cast<size_t>(e)];
    for (int k = 1; k <= 3; ++k)
      ew.set_frozen(k, quantize_weight(ew.param(k).value, e % 2 ? WeightFormat::FP4 : WeightFormat::FP8,
                                       ScaleFormat::E8M0, ew.param(k).name),
                    m->expert_weight_shape(k));
  }
  return m;
}

// In bf16 each expert's G | U is one GEMM against its [2I, D] w1 | w3 operand, and the Dgrad of dG | dU one GEMM:
// one forward and one backward GEMM per active expert (and the shared one) fewer than fp32, which runs them apart.
TEST(MoEOpsPath, Bf16FusesTheGateAndUpGemms) {
  const int64_t T = 26, D = moe_config().dim;
  std::mt19937 rng(5);
  const Tensor x = random_tensor({T, D}, rng, 1.0f), dy = random_tensor({T, D}, rng, 1.0f);
  std::map<MatmulPrecision, std::pair<int64_t, int64_t>> gemms;  // forward, backward
  int64_t active = 0;
  ForceOpsPath scope;
  for (MatmulPrecision p : {MatmulPrecision::F32, MatmulPrecision::BF16}) {
    auto m = make_moe(false, p, 11);
    MoECtx ctx;
    MoEStats stats;
    const auto c0 = op_counts_by_name();
    m->forward(x, Tensor(), SeqLayout(1, T), &ctx, &stats);
    const auto c1 = op_counts_by_name();
    m->backward(dy, ctx, 0.0);
    const auto c2 = op_counts_by_name();
    gemms[p] = {op_counts_between(c0, c1)["gemm"], op_counts_between(c1, c2)["gemm"]};
    active = std::count_if(stats.load.begin(), stats.load.end(), [](int64_t n) { return n > 0; });
  }
  ASSERT_GT(active, 1);
  const int64_t calls = active + (moe_config().n_shared_experts > 0 ? 1 : 0);
  EXPECT_EQ(gemms[MatmulPrecision::F32].first - gemms[MatmulPrecision::BF16].first, calls);
  EXPECT_EQ(gemms[MatmulPrecision::F32].second - gemms[MatmulPrecision::BF16].second, calls);
}

TEST(MoEOpsPath, AdaptersOverFrozenExpertsBitIdentical) {
  const int64_t T = 29, D = moe_config().dim;
  std::mt19937 rng(9);
  const Tensor x = random_tensor({T, D}, rng, 1.0f), dy = random_tensor({T, D}, rng, 1.0f);
  for (MatmulPrecision p : {MatmulPrecision::F32, MatmulPrecision::BF16, MatmulPrecision::FP8}) {
    SCOPED_TRACE(std::string(matmul_precision_name(p)));
    auto ref_m = make_adapted_moe(5, p), ops_m = make_adapted_moe(5, p);
    const MoeRun ref = run(*ref_m, x, Tensor(), SeqLayout(1, T), dy, 0.01);
    MoeRun got;
    {
      ForceOpsPath scope;
      got = run(*ops_m, x, Tensor(), SeqLayout(1, T), dy, 0.01);
    }
    // bf16: the shared expert (not frozen) runs its w1 | w3 GEMMs fused, which sums dX in another order.
    const double rel = p == MatmulPrecision::BF16 ? 1e-5 : 0.0;
    expect_close("y", ref.y, got.y, rel);
    expect_close("dx", ref.dx, got.dx, rel);
    ASSERT_EQ(ref.grads.size(), got.grads.size());
    EXPECT_GT(ref.grads.count("layers.0.ffn.experts.1.w13.lora_A"), 0u);
    EXPECT_EQ(ref.grads.count("layers.0.ffn.experts.1.w1.weight"), 0u);  // frozen
    for (const auto& [name, g] : ref.grads) {
      ASSERT_TRUE(got.grads.count(name)) << name;
      expect_close(name, g, got.grads.at(name), rel);
    }
  }
}

}  // namespace
}  // namespace dsv4
