// The MoE's tensor-op path (the one CUDA tensors take, model/moe_ops.cpp) run on the CPU under ForceOpsPath against
// the reference loops (moe.cpp): output, load / balance statistics, dx and every gradient. fp32: bit-identical (the
// same CPU GEMMs and element-wise cores in the same order). bf16 / fp8: the only difference is dX = dG W1 + dU W3,
// which the ops path accumulates inside the second GEMM (beta = 1) and the reference adds after rounding the product
// to a row buffer; bound 1e-5 relative to the largest |value| of each tensor.
#include <gtest/gtest.h>

#include <random>

#include "fd_check.h"
#include "model/exec_path.h"
#include "model/moe.h"

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

struct Run {
  Tensor y, dx;
  MoEStats stats;
  std::map<std::string, Tensor> grads;
};

Run run(MoE& m, const Tensor& x, const Tensor& ids, const SeqLayout& layout, const Tensor& dy, double alpha) {
  Run r;
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
  const Run ref = run(*ref_m, x, ids, layout, dy, 0.01);
  Run got;
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

TEST(MoEOpsPath, UnsupportedCasesFailClearly) {
  auto m = make_moe(false, MatmulPrecision::F32, 3);
  m->gate_lora.emplace(LoraAdapter("layers.0.ffn.gate", 2, moe_config().dim, moe_config().n_routed_experts, 4.0));
  std::mt19937 rng(1);
  const Tensor x = random_tensor({4, moe_config().dim}, rng, 1.0f);
  ForceOpsPath scope;
  try {
    m->forward(x, Tensor(), SeqLayout(1, 4), nullptr);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("LoRA adapters"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv4
