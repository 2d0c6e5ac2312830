// The whole model under every layout the world admits (tp <= 2 for the tiny preset's 4 heads / 2 groups / 2 indexer
// heads; ep 1, 2, 4): init_random gives each rank its part of the single-rank model, and one training micro-step
// (every dp rank its own packed batch, global-token normalisation, MTP, balance loss) gives the single-rank losses and,
// after complete_gradients, the single-rank gradient of every parameter, compared tensor by tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "model/exec_path.h"
#include "model/model.h"
#include "optim/grad_sync.h"
#include "runtime/backend_dispatch.h"
#include "runtime/comm.h"
#include "runtime/parallel.h"

namespace dsv4 {
namespace {

struct Batch {
  Tensor ids, labels;
  SeqLayout layout;
};

// Batch of dp rank `d`: 2 rows of 21 tokens, packed documents, some ignored labels.
Batch make_batch(int64_t d, int64_t vocab) {
  Batch b;
  b.layout = SeqLayout(2, 21);
  b.layout.doc_start.assign(42, 0);
  for (int64_t t = 0; t < 42; ++t) b.layout.doc_start[static_cast<size_t>(t)] = (t % 21) < 9 ? 0 : 9;
  std::mt19937_64 rng(77 + static_cast<uint64_t>(d));
  std::uniform_int_distribution<int64_t> tok(0, vocab - 1);
  std::vector<int64_t> ids(42), labels(42);
  for (int64_t t = 0; t < 42; ++t) {
    ids[static_cast<size_t>(t)] = tok(rng);
    labels[static_cast<size_t>(t)] = t % 7 == 3 ? kIgnoreIndex : ids[static_cast<size_t>(t)];
  }
  b.ids = Tensor::from_vector<int64_t>({42}, ids);
  b.labels = Tensor::from_vector<int64_t>({42}, labels);
  return b;
}

double rel_err(const Tensor& a, const Tensor& b) {
  const auto x = a.contiguous().to_floats(), y = b.contiguous().to_floats();
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(x[i]) - y[i]));
    den = std::max(den, std::abs(static_cast<double>(y[i])));
  }
  return num / std::max(den, 1e-12);
}

// ops: the parallel model runs every module's tensor-op path (ForceOpsPath: what a GPU run executes, with the same
// collectives; the reference stays the single-rank CPU reference). flat_grads: gradients in the trainer's flat buffers
// (Model::allocate_grads in gradient_sync_order, reduced in place) instead of allocated on first use (copied into
// buckets and back); every parameter then has a gradient, zero where the reference has none.
void check_layouts(bool ops, bool flat_grads) {
  const auto world = mpi_world();
  const int64_t W = world->size();
  const ModelConfig cfg = model_preset("tiny");
  ASSERT_GE(cfg.n_mtp_layers, 1);
  const uint64_t seed = 5;
  for (int64_t tp = 1; tp <= std::min<int64_t>(W, 2); tp *= 2)
    for (int64_t ep = 1; ep <= W; ep *= 2) {
      if (W % tp != 0 || W % ep != 0) continue;
      const ParallelDims dims{W / tp, tp, ep};
      SCOPED_TRACE(dims.str());
      const Parallel par(world.get(), dims);
      // Global normalisers over every dp rank's batch.
      std::vector<Batch> batches;
      double lm_count = 0, mtp_count = 0;
      for (int64_t d = 0; d < dims.dp; ++d) {
        batches.push_back(make_batch(d, cfg.vocab_size));
        const TargetCounts c = count_targets(batches.back().labels, batches.back().layout, cfg.n_mtp_layers);
        lm_count += static_cast<double>(c.lm);
        mtp_count += static_cast<double>(c.mtp[0]);
      }
      LossWeights w;
      w.mtp = 0.3;
      w.balance_alpha = 1e-2 / static_cast<double>(dims.dp);
      w.lm_normalizer = lm_count;
      w.mtp_normalizer = mtp_count;

      Model ref(cfg);
      ref.init_random(seed, 0.1);
      double ref_total = 0;
      for (const Batch& b : batches) ref_total += ref.forward_backward(b.ids, b.labels, b.layout, w).total;

      ModelOptions o;
      o.parallel = &par;
      Model m(cfg, o);
      m.init_random(seed, 0.1);
      std::map<std::string, Param*> ref_params;
      ref.visit([&](Param& p) { ref_params[p.name] = &p; });
      std::vector<Param*> params;
      m.visit([&](Param& p) {
        params.push_back(&p);
        ASSERT_TRUE(ref_params.count(p.name)) << p.name;
        EXPECT_EQ(rel_err(p.value, p.local_part(ref_params[p.name]->value)), 0.0) << "init of " << p.name;
      });
      if (flat_grads) m.allocate_grads(gradient_sync_order(params));
      const Batch& mine = batches[static_cast<size_t>(par.dp_rank())];
      std::optional<ForceOpsPath> scope;
      if (ops) scope.emplace();
      const LossResult r = m.forward_backward(mine.ids, mine.labels, mine.layout, w);
      scope.reset();
      std::vector<double> total = {r.total};
      group_sum(par.dp(), total);
      EXPECT_NEAR(total[0], ref_total, 1e-6 * std::abs(ref_total));

      const auto ops_before = op_counts_by_name();
      complete_gradients(par, params);
      const auto sync_ops = op_counts_between(ops_before, op_counts_by_name());
      if (flat_grads) EXPECT_EQ(sync_ops.count("copy"), 0u) << "flat buffers are reduced in place";
      else if (W > 1) EXPECT_GT(sync_ops.count("copy"), 0u);
      int64_t compared = 0;
      double worst = 0;
      std::string worst_name;
      for (Param* p : params) {
        const Param& q = *ref_params[p->name];
        if (!q.grad.defined()) {
          EXPECT_EQ(p->grad.defined(), flat_grads) << p->name;
          if (flat_grads) EXPECT_EQ(rel_err(p->grad, Tensor::zeros(p->grad.shape(), DType::F32)), 0.0) << p->name;
          continue;
        }
        ASSERT_TRUE(p->grad.defined()) << p->name;
        const double e = rel_err(p->grad, p->local_part(q.grad));
        if (e > worst) {
          worst = e;
          worst_name = p->name;
        }
        EXPECT_LE(e, 2e-5) << p->name;
        ++compared;
      }
      if (world->rank() == 0)
        std::printf("[model %s%s] %lld gradients on rank 0, worst relative error %.2e (%s)\n", dims.str().c_str(),
                    ops ? " ops path" : "", static_cast<long long>(compared), worst, worst_name.c_str());
    }
}

TEST(ModelParallel, LossesAndEveryGradientEqualOneRank) { check_layouts(false, false); }

// The tensor-op path under every layout (tp: heads, vocabulary, MoE tokens; ep: the all-to-all; dp), as a GPU run.
// With the trainer's flat gradient buffers.
TEST(ModelParallel, OpsPathLossesAndEveryGradientEqualOneRank) { check_layouts(true, true); }

}  // namespace
}  // namespace dsv4
