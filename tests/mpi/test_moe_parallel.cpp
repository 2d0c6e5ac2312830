// MoE under tensor (sequence-parallel tokens) and expert parallelism against a single-rank reference: outputs, dx,
// gradients completed per Param::placement, loads summed over the world, the balance term and its gradient.
// Every layout (dp, tp, ep) the world size allows is checked; the reference runs on every rank for every dp rank's
// batch (the same deterministic weights everywhere).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <optional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/lora.h"
#include "model/model.h"
#include "model/exec_path.h"
#include "model/moe.h"
#include "runtime/comm.h"
#include "runtime/parallel.h"

namespace dsv4 {
namespace {

void fill_normal(Tensor& t, uint64_t seed, float stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, stddev);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = nd(rng);
}

uint64_t name_seed(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}

enum class Case { Learned, BalanceOnly, Hash, Starved, Lora };
const char* case_name(Case c) {
  switch (c) {
    case Case::Learned: return "learned";
    case Case::BalanceOnly: return "balance-only";
    case Case::Hash: return "hash";
    case Case::Starved: return "starved";
    case Case::Lora: return "lora";
  }
  return "?";
}

// Adapters on routed experts (by GLOBAL index), the router and the shared expert; same structure on every rank.
void attach_lora(MoE& m) {
  const int64_t D = m.dim(), I = m.inter_dim(), E = m.n_experts();
  const std::string p = "layers.0.ffn.";
  for (int64_t i = 0; i < m.n_local_experts(); ++i) {
    const int64_t e = m.expert_begin() + i;
    ExpertWeights& ew = m.experts[static_cast<size_t>(i)];
    const std::string u = p + "experts." + std::to_string(e) + ".";
    ew.lora_w13 = LoraAdapter(u + "w13", 4, D, 2 * I, 0.5);
    if (e % 2 == 0) ew.lora_w2 = LoraAdapter(u + "w2", 2, I, D, 0.5);
  }
  m.gate_lora = LoraAdapter(p + "gate", 2, D, E, 0.5);
  m.shared.lora_w1 = LoraAdapter(p + "shared_experts.w1", 2, D, I, 0.5);
}

// Deterministic weights by parameter name (identical on every rank and for every layout).
void init_weights(MoE& m, Case c) {
  m.visit([&](Param& p) {
    if (p.name.find("tid2eid") != std::string::npos) {
      std::mt19937_64 rng(name_seed(p.name));
      int64_t* t = p.value.data<int64_t>();
      const int64_t V = p.value.size(0), K = p.value.size(1), E = m.n_experts();
      for (int64_t v = 0; v < V; ++v) {
        std::vector<int64_t> perm(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e) perm[static_cast<size_t>(e)] = e;
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int64_t j = 0; j < K; ++j) t[v * K + j] = perm[static_cast<size_t>(j)];
      }
      return;
    }
    const bool bias = p.name.find("gate.bias") != std::string::npos;
    fill_normal(p.value, name_seed(p.name), bias ? 0.05f : 0.15f);
    if (bias && c == Case::Starved) {  // experts 4 and 5 never selected: some ep ranks receive no slot
      p.value.data<float>()[4] = -1e3f;
      p.value.data<float>()[5] = -1e3f;
    }
  });
}

std::unique_ptr<MoE> make_moe(const ModelConfig& cfg, Case c, const Parallel* par) {
  auto m = std::make_unique<MoE>("layers.0.ffn.", cfg, c == Case::Hash, par);
  if (c == Case::Lora) attach_lora(*m);
  init_weights(*m, c);
  m->visit([](Param& p) { p.zero_grad(); });
  return m;
}

double max_abs(const float* a, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<double>(a[i])));
  return m;
}

// max |a - b| / max(max |b|, 1e-6)
double rel_err(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  if (!(a.shape() == b.shape())) return 1e30;
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  double d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::fabs(static_cast<double>(pa[i]) - pb[i]));
  return d / std::max(max_abs(pb, b.numel()), 1e-6);
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  if (!(a.shape() == b.shape())) return false;
  return std::equal(a.data<float>(), a.data<float>() + a.numel(), b.data<float>());
}

struct Batch {
  Tensor x, ids, dy;
};

Batch make_batch(const ModelConfig& cfg, Case c, int64_t T, int64_t d) {
  const uint64_t seed = 1000 * (static_cast<uint64_t>(c) + 1) + static_cast<uint64_t>(d);
  Batch b;
  b.x = Tensor::empty({T, cfg.dim}, DType::F32);
  fill_normal(b.x, seed, 1.0f);
  b.dy = Tensor::empty({T, cfg.dim}, DType::F32);
  fill_normal(b.dy, seed + 77, 1.0f);
  if (c == Case::BalanceOnly) ops::fill(b.dy, 0.0);
  b.ids = Tensor::empty({T}, DType::I64);
  std::mt19937_64 rng(seed + 5);
  std::uniform_int_distribution<int64_t> pick(0, cfg.vocab_size - 1);
  for (int64_t t = 0; t < T; ++t) b.ids.data<int64_t>()[t] = pick(rng);
  return b;
}

// ops: the parallel module runs its tensor-op path (ForceOpsPath: what CUDA tensors run, with the same collectives).
void check_layout(const Communicator* world, ParallelDims dims, Case c, bool ops = false) {
  SCOPED_TRACE(fmt::format("layout {} case {}{}", dims.str(), case_name(c), ops ? " (tensor-op path)" : ""));
  const ModelConfig cfg = model_preset("tiny");
  Parallel par(world, dims);
  const int64_t B = 3, S = 13, T = B * S;  // T = 39: not divisible by tp 2 or 4
  const SeqLayout layout(B, S);
  const double alpha = c == Case::BalanceOnly ? 1.0 : 0.1;

  // ---- reference on every dp rank's batch ----
  auto ref = make_moe(cfg, c, nullptr);
  std::vector<int64_t> ref_load(static_cast<size_t>(cfg.n_routed_experts), 0);
  Tensor ref_y, ref_dx;
  double ref_term = 0;
  Batch mine;
  for (int64_t d = 0; d < par.dp_size(); ++d) {
    Batch b = make_batch(cfg, c, T, d);
    MoECtx ctx;
    MoEStats st;
    Tensor y = ref->forward(b.x, b.ids, layout, &ctx, &st);
    Tensor dx = ref->backward(b.dy, ctx, alpha);
    for (size_t e = 0; e < ref_load.size(); ++e) ref_load[e] += st.load[e];
    if (d == par.dp_rank()) {
      ref_y = y;
      ref_dx = dx;
      ref_term = st.balance_term;
      mine = b;
    }
  }
  if (c == Case::Starved) {
    ASSERT_EQ(ref_load[4], 0);
    ASSERT_EQ(ref_load[5], 0);
  }
  std::map<std::string, Tensor> ref_grad;
  ref->visit([&](Param& p) {
    if (p.grad.defined()) ref_grad[p.name] = p.grad;
  });

  // ---- parallel run ----
  auto pm = make_moe(cfg, c, &par);
  const Range local = par.local_experts(cfg.n_routed_experts);
  EXPECT_EQ(pm->expert_begin(), local.begin);
  EXPECT_EQ(pm->n_local_experts(), local.size());
  EXPECT_EQ(pm->n_experts(), cfg.n_routed_experts);
  MoECtx ctx;
  MoEStats st;
  Tensor y, dx;
  {
    std::optional<ForceOpsPath> scope;
    if (ops) scope.emplace();
    y = pm->forward(mine.x, mine.ids, layout, &ctx, &st);
    dx = pm->backward(mine.dy, ctx, alpha);
  }
  EXPECT_EQ(ctx.ops_path, ops);

  EXPECT_LE(rel_err(y, ref_y), 1e-5) << "output";
  EXPECT_LE(rel_err(dx, ref_dx), 1e-5) << "dx";
  if (dims.tp == 1 && dims.ep == 1) {  // no exchange at all: bit-identical to the single-rank module
    EXPECT_TRUE(bit_equal(y, ref_y)) << "output not bit-identical";
    EXPECT_TRUE(bit_equal(dx, ref_dx)) << "dx not bit-identical";
  }
  // FP32 affinities: the router GEMM on a tp slice may round differently from the one on all rows
  EXPECT_NEAR(st.balance_term, ref_term, 1e-6 * std::max(1.0, std::fabs(ref_term))) << "balance term";
  std::vector<int64_t> load = st.load;
  group_sum(par.world(), load);
  EXPECT_EQ(load, ref_load) << "loads summed over the world";

  // ---- gradients completed per placement ----
  int64_t checked = 0, experts_seen = 0;
  pm->visit([&](Param& p) {
    if (!p.trainable) return;
    SCOPED_TRACE(p.name);
    const bool routed = p.name.find(".experts.") != std::string::npos;
    if (routed) {
      ++experts_seen;
      EXPECT_EQ(p.placement, Placement::Expert);
    } else {
      EXPECT_EQ(p.placement, dims.tp > 1 ? Placement::TpPartial : Placement::Replicated);
    }
    Tensor g = p.grad.defined() ? p.grad.contiguous().clone() : Tensor::zeros(p.value.shape(), DType::F32);
    switch (p.placement) {
      case Placement::Replicated:
      case Placement::TpSplit: group_sum(par.dp(), g); break;
      case Placement::TpPartial: group_sum(par.world(), g); break;
      case Placement::Expert: group_sum(par.edp(), g); break;
    }
    auto it = ref_grad.find(p.name);
    Tensor r = it != ref_grad.end() ? it->second : Tensor::zeros(p.value.shape(), DType::F32);
    EXPECT_LE(rel_err(g, r), 1e-5) << "gradient";
    ++checked;
  });
  EXPECT_GT(checked, 0);
  int64_t expected_routed = 0;
  for (int64_t e = local.begin; e < local.end; ++e) expected_routed += 3 + (c == Case::Lora ? 2 + (e % 2 == 0 ? 2 : 0) : 0);
  EXPECT_EQ(experts_seen, expected_routed) << "visit() must visit exactly the local experts";
}

std::vector<ParallelDims> layouts(int64_t world) {
  std::vector<ParallelDims> out;
  for (int64_t tp : {1, 2, 4})
    for (int64_t ep : {1, 2, 4})
      if (world % tp == 0 && world % ep == 0) out.push_back(ParallelDims{world / tp, tp, ep});
  return out;
}

TEST(MoEParallel, MatchesSingleRank) {
  auto world = mpi_world();
  for (const ParallelDims& dims : layouts(world->size()))
    for (Case c : {Case::Learned, Case::BalanceOnly, Case::Hash, Case::Starved, Case::Lora})
      check_layout(world.get(), dims, c);
}

// The tensor-op path under every layout (tp token split, ep all-to-all, adapters with the reference's masks).
TEST(MoEParallel, OpsPathMatchesSingleRank) {
  auto world = mpi_world();
  for (const ParallelDims& dims : layouts(world->size()))
    for (Case c : {Case::Learned, Case::Hash, Case::Starved, Case::Lora}) check_layout(world.get(), dims, c, true);
}

// A single-rank Parallel (and a null one) runs no collective and is bit-identical to the module without one.
TEST(MoEParallel, SingleRankLayoutIsIdentity) {
  const ModelConfig cfg = model_preset("tiny");
  Parallel one;
  auto a = make_moe(cfg, Case::Lora, nullptr);
  auto b = make_moe(cfg, Case::Lora, &one);
  const Batch bt = make_batch(cfg, Case::Lora, 26, 0);
  const SeqLayout layout(2, 13);
  MoECtx ca, cb;
  Tensor ya = a->forward(bt.x, bt.ids, layout, &ca), yb = b->forward(bt.x, bt.ids, layout, &cb);
  Tensor da = a->backward(bt.dy, ca, 0.1), db = b->backward(bt.dy, cb, 0.1);
  EXPECT_TRUE(bit_equal(ya, yb));
  EXPECT_TRUE(bit_equal(da, db));
  std::map<std::string, Tensor> ga;
  a->visit([&](Param& p) {
    if (p.grad.defined()) ga[p.name] = p.grad;
  });
  b->visit([&](Param& p) {
    if (!p.grad.defined()) return;
    ASSERT_TRUE(ga.count(p.name)) << p.name;
    EXPECT_TRUE(bit_equal(p.grad, ga[p.name])) << p.name;
  });
}

// Model-level expert parallelism (ep = world, tp = 1): init_random gives the local experts the single-rank values,
// load_state takes a full state dict (other ranks' experts ignored, unknown names still rejected), apply_lora
// accepts a pattern naming another rank's expert and adapts only local experts.
TEST(MoEParallel, ModelExpertParallelInitLoadLora) {
  auto world = mpi_world();
  const int64_t W = world->size();
  if (W == 1 || 8 % W != 0) GTEST_SKIP() << "needs 2 or 4 ranks";
  const ModelConfig cfg = model_preset("tiny");
  Parallel par(world.get(), ParallelDims{W, 1, W});
  ModelOptions opts;
  opts.parallel = &par;
  Model ref(cfg);
  ref.init_random(11);
  Model m(cfg, opts);
  m.init_random(11);
  std::map<std::string, Tensor> full;
  ref.visit([&](Param& p) { full[p.name] = p.value; });
  int64_t experts = 0, compared = 0;
  m.visit([&](Param& p) {
    ASSERT_TRUE(full.count(p.name)) << p.name;
    if (p.name.find(".experts.") != std::string::npos) ++experts;
    if (p.value.dtype() == DType::F32)
      EXPECT_TRUE(bit_equal(p.value, full[p.name])) << p.name << " differs from the single-rank init";
    ++compared;
  });
  const int64_t moes = static_cast<int64_t>(m.layers.size() + m.mtp.size());
  EXPECT_EQ(experts, moes * 3 * cfg.n_routed_experts / W);
  EXPECT_TRUE(m.foreign_expert("layers.0.ffn.experts." + std::to_string((par.ep_rank() + 1) % W * (8 / W)) +
                               ".w1.weight"));
  EXPECT_FALSE(m.foreign_expert("layers.0.ffn.experts." + std::to_string(par.ep_rank() * (8 / W)) + ".w1.weight"));

  Model m2(cfg, opts);
  EXPECT_NO_THROW(m2.load_state(full, "full state"));
  m2.visit([&](Param& p) {
    if (p.value.dtype() == DType::F32) EXPECT_TRUE(bit_equal(p.value, full[p.name])) << p.name;
  });
  std::map<std::string, Tensor> bad = full;
  bad["layers.0.ffn.experts.99.w1.weight"] = full.begin()->second;
  EXPECT_THROW(m2.load_state(bad, "bad state"), Error);

  LoraConfig lc;
  lc.rank = 2;
  lc.targets = {"layers.0.ffn.experts.7.w2"};  // held by the last ep rank only
  const int64_t n = apply_lora(m2, lc);
  EXPECT_EQ(n, par.ep_rank() == W - 1 ? 1 : 0);
}

}  // namespace
}  // namespace dsv4
