// dsv4-plan's per-rank estimate under a parallel layout against the CPU allocator's measured peak of one training
// micro-step (tiny preset, 4 x 128 tokens per dp rank, F32, ZeRO-1 on): rank 0's state (weights, gradients,
// optimizer shard) within 10%, the total within 10% of rank 0's peak without ep and of the mean peak over ranks with ep
// (the plan assumes balanced routing).
#include <gtest/gtest.h>

#include <random>

#include "model/model.h"
#include "optim/optimizer.h"
#include "runtime/comm.h"
#include "runtime/device.h"
#include "runtime/parallel.h"
#include "train/plan.h"
#include "train/train_config.h"

namespace dsv4 {
namespace {

TEST(PlanParallel, RankZeroPeakWithinTenPercentOfTheEstimate) {
  const auto world = mpi_world();
  const int64_t W = world->size();
  for (int64_t tp = 1; tp <= std::min<int64_t>(W, 2); tp *= 2)
    for (int64_t ep : W > 1 ? std::vector<int64_t>{1, W} : std::vector<int64_t>{1}) {
      if (W % tp != 0) continue;
      const ParallelDims dims{W / tp, tp, ep};
      SCOPED_TRACE(dims.str());
      const TrainConfig cfg = parse_train_config(
          "model:\n  preset: tiny\ndata:\n  train: [synthetic]\n", "plan.yaml",
          {"data.seq_len=128", "data.micro_batch=4", fmt::format("parallel.dp={}", dims.dp),
           fmt::format("parallel.tp={}", tp), fmt::format("parallel.ep={}", ep)});
      const PlanSetup setup = plan_setup(cfg, "plan.yaml");
      const PlanReport r = plan(setup, HardwareSpec::named("cpu"));

      const Parallel par(world.get(), dims);
      Allocator& host = allocator_for(Device::cpu());
      world->barrier();
      const int64_t base = host.stats().allocated_bytes;
      int64_t state = 0, peak = 0;
      {
        ModelOptions o;
        o.parallel = &par;
        Model model(setup.model, o);
        Optimizer opt(model, OptimizerConfig::for_model(setup.model), OptimizerSharding{&par, true});
        std::vector<Param*> params = model_params(model);
        const auto assignment = opt.assignment();
        for (size_t i = 0; i < params.size(); ++i)
          if (assignment[i].second != OptGroup::None) params[i]->grad_buffer();
        state = host.stats().allocated_bytes - base;
        host.reset_peak();
        std::mt19937_64 rng(3 + static_cast<uint64_t>(par.dp_rank()));
        std::uniform_int_distribution<int64_t> tok(0, setup.model.vocab_size - 1);
        std::vector<int64_t> ids(4 * 128);
        for (int64_t& t : ids) t = tok(rng);
        const Tensor ids_T = Tensor::from_vector<int64_t>({4 * 128}, ids);
        LossWeights w;
        w.mtp = cfg.loss.mtp_weight;
        w.balance_alpha = cfg.loss.balance_alpha;
        model.forward_backward(ids_T, ids_T, SeqLayout(4, 128), w);
        peak = host.stats().peak_bytes - base;
      }
      // Every rank's peak (routing imbalance shows as a spread under ep).
      Tensor peaks = Tensor::zeros({W}, DType::I64);
      peaks.data<int64_t>()[world->rank()] = peak;
      world->all_reduce(peaks, CommReduce::Sum);
      if (world->rank() != 0) continue;
      std::string all;
      double mean = 0;
      for (int64_t q = 0; q < W; ++q) {
        all += fmt::format("{}{}", q ? " " : "", peaks.data<int64_t>()[q]);
        mean += static_cast<double>(peaks.data<int64_t>()[q]) / static_cast<double>(W);
      }
      std::printf("[plan %s] peaks by rank: %s; estimate / mean peak %.3f\n", dims.str().c_str(), all.c_str(),
                  static_cast<double>(r.total) / mean);
      // The plan assumes balanced routing; a random tiny router is not balanced, so the ranks holding the popular
      // experts peak higher under ep (printed above): the estimate is checked against the mean over ranks.
      EXPECT_NEAR(static_cast<double>(r.total) / mean, 1.0, 0.10);
      const int64_t est_state = r.weights + r.grads + r.optimizer;
      std::printf("[plan %s] rank 0: estimated state %lld B + activations %lld B = %lld B; measured state %lld B, "
                  "peak %lld B; estimate / measured: state %.3f, total %.3f\n",
                  dims.str().c_str(), static_cast<long long>(est_state), static_cast<long long>(r.activations),
                  static_cast<long long>(r.total), static_cast<long long>(state), static_cast<long long>(peak),
                  static_cast<double>(est_state) / static_cast<double>(state),
                  static_cast<double>(r.total) / static_cast<double>(peak));
      EXPECT_NEAR(static_cast<double>(est_state) / static_cast<double>(state), 1.0, 0.10);
      if (ep == 1) EXPECT_NEAR(static_cast<double>(r.total) / static_cast<double>(peak), 1.0, 0.10);
    }
}

}  // namespace
}  // namespace dsv4
