// The parallel layout and the pieces built on it, checked on 1, 2 and 4 ranks against one-rank computations:
// group membership, the paired row operations, vocab-parallel embedding and cross-entropy, ZeRO-1 + distributed Muon,
// and per-rank state slices read back under another split.
#include <gtest/gtest.h>

#include <optional>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "model/exec_path.h"
#include "model/embedding.h"
#include "optim/optimizer.h"
#include "runtime/comm.h"
#include "runtime/parallel.h"
#include "train/sharded_state.h"

namespace dsv4 {
namespace {

Tensor random_f32(const Shape& shape, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = u(rng);
  return t;
}

double max_rel_diff(const Tensor& a, const Tensor& b) {
  const auto x = a.contiguous().to_floats(), y = b.contiguous().to_floats();
  EXPECT_EQ(x.size(), y.size());
  double worst = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i)
    worst = std::max(worst, std::abs(static_cast<double>(x[i]) - y[i]) / std::max(1e-3, std::abs(static_cast<double>(y[i]))));
  return worst;
}

// Layouts a world of `size` ranks admits (tp and ep powers of two).
std::vector<ParallelDims> layouts(int64_t size) {
  std::vector<ParallelDims> out;
  for (int64_t tp = 1; tp <= size; tp *= 2)
    for (int64_t ep = 1; ep <= size; ep *= 2)
      if (size % tp == 0 && size % ep == 0) out.push_back(ParallelDims{size / tp, tp, ep});
  return out;
}

TEST(ParallelLayout, SplitRangeIsBalancedAndContiguous) {
  for (int64_t n : {0, 1, 7, 8, 129})
    for (int64_t parts : {1, 2, 3, 4, 8}) {
      int64_t next = 0;
      for (int64_t i = 0; i < parts; ++i) {
        const Range r = split_range(n, parts, i);
        EXPECT_EQ(r.begin, next);
        EXPECT_TRUE(r.size() == n / parts || r.size() == n / parts + 1);
        next = r.end;
      }
      EXPECT_EQ(next, n);
    }
}

TEST(ParallelLayout, GroupsFollowTheRankFormula) {
  const auto world = mpi_world();
  const int64_t W = world->size(), r = world->rank();
  for (const ParallelDims& d : layouts(W)) {
    SCOPED_TRACE(d.str());
    const Parallel par(world.get(), d);
    EXPECT_EQ(par.tp_rank(), r % d.tp);
    EXPECT_EQ(par.dp_rank(), r / d.tp);
    EXPECT_EQ(par.ep_rank(), r % d.ep);
    EXPECT_EQ(par.edp_rank(), r / d.ep);
    // Membership: the sum of world ranks over each group is the closed form of its members.
    auto sum_ranks = [&](const Communicator* g, int64_t expected) {
      EXPECT_EQ(group_rank(g), g ? g->rank() : 0);
      Tensor t = Tensor::from_vector<int64_t>({1}, {r});
      group_sum(g, t);
      EXPECT_EQ(t.data<int64_t>()[0], expected);
    };
    int64_t tp_sum = 0, dp_sum = 0, ep_sum = 0, edp_sum = 0;
    for (int64_t q = 0; q < W; ++q) {
      if (q / d.tp == r / d.tp) tp_sum += q;
      if (q % d.tp == r % d.tp) dp_sum += q;
      if (q / d.ep == r / d.ep) ep_sum += q;
      if (q % d.ep == r % d.ep) edp_sum += q;
    }
    sum_ranks(par.tp(), d.tp == 1 ? r : tp_sum);
    sum_ranks(par.dp(), d.dp == 1 ? r : dp_sum);
    sum_ranks(par.ep(), d.ep == 1 ? r : ep_sum);
    sum_ranks(par.edp(), W / d.ep == 1 ? r : edp_sum);
    for (int64_t e = 0; e < 8; ++e) {
      const int64_t owner = par.expert_owner(8, e);
      const Range mine = split_range(8, d.ep, owner);
      EXPECT_TRUE(e >= mine.begin && e < mine.end);
    }
  }
  EXPECT_THROW(Parallel(world.get(), ParallelDims{W + 1, 1, 1}), Error);
}

TEST(ParallelOps, GatherAndTakeRowsAreInverse) {
  const auto world = mpi_world();
  const int64_t W = world->size();
  for (int64_t n : {int64_t{0}, int64_t{1}, 2 * W + 1}) {
    const Tensor full = random_f32({n, 3}, 7);
    const std::vector<int64_t> rows = split_rows(world.get(), n);
    const Tensor mine = take_rows(world.get(), full, rows);
    EXPECT_EQ(mine.size(0), rows[static_cast<size_t>(world->rank())]);
    const Tensor back = gather_rows(world.get(), mine, rows);
    ASSERT_EQ(back.shape(), full.shape());
    EXPECT_EQ(max_rel_diff(back, full), 0.0);
  }
}

TEST(VocabParallel, CrossEntropyAndEmbeddingEqualTheWholeVocabulary) {
  const auto world = mpi_world();
  const int64_t V = 37, T = 9, D = 5;  // V not divisible by 2 or 4
  const Range r = split_range(V, world->size(), world->rank());
  const Tensor logits = random_f32({T, V}, 11, 4.0f);
  std::vector<int64_t> tv = {0, 36, 5, kIgnoreIndex, 18, 19, 2, 30, kIgnoreIndex};
  const Tensor targets = Tensor::from_vector<int64_t>({T}, tv);
  const CrossEntropyResult whole = cross_entropy(logits, targets, true, 3.0);
  const VocabShard shard{world->size() > 1 ? world.get() : nullptr, r.begin, V};
  const CrossEntropyResult part = cross_entropy(logits.slice(1, r.begin, r.end).contiguous(), targets, true, 3.0, shard);
  EXPECT_NEAR(part.loss, whole.loss, 1e-12 + 1e-9 * std::abs(whole.loss));
  EXPECT_EQ(part.counted, whole.counted);
  EXPECT_LE(max_rel_diff(part.dlogits_TV, whole.dlogits_TV.slice(1, r.begin, r.end)), 1e-6);

  Embedding full("embed.weight", V, D), sharded("embed.weight", V, D);
  full.weight.value.copy_from(random_f32({V, D}, 12));
  sharded.set_vocab_shard(shard.group, r.begin, r.size(), V);
  sharded.weight.value.copy_from(sharded.weight.local_part(full.weight.value));
  const Tensor ids = Tensor::from_vector<int64_t>({6}, {0, 36, 18, 18, 4, 20});
  EXPECT_EQ(max_rel_diff(sharded.forward(ids), full.forward(ids)), 0.0);
  const Tensor dh = random_f32({6, D}, 13);
  full.backward(dh, ids);
  sharded.backward(dh, ids);
  EXPECT_EQ(max_rel_diff(sharded.weight.grad, sharded.weight.local_part(full.weight.grad)), 0.0);
}

// ZeRO-1 and distributed Muon: 3 steps over tp-split, group-split and replicated parameters equal one rank's.
TEST(DistributedOptimizer, EqualsOneRankForEveryLayout) {
  const auto world = mpi_world();
  const ModelConfig cfg = [] {
    ModelConfig c = model_preset("tiny");
    c.o_groups = 4;
    c.n_heads = 4;
    return c;
  }();
  struct Spec {
    std::string name;
    Shape shape;
    int dim;  // tp split dim, -1 replicated
  };
  const std::vector<Spec> specs = {{"layers.0.attn.wq_b.weight", {12, 10}, 0},   // tp-split rows: gathered
                                   {"layers.0.attn.wo_b.weight", {9, 16}, 1},    // tp-split columns: gathered
                                   {"layers.0.attn.wo_a.weight", {16, 6}, 0},    // 4 groups of 4 rows: local NS
                                   {"layers.0.attn.wkv.weight", {7, 5}, -1},     // replicated Muon
                                   {"layers.0.attn_norm.weight", {11}, -1},      // replicated AdamW
                                   {"embed.weight", {10, 4}, 0}};                // tp-split AdamW
  // ops: the sharded optimizer runs its tensor-op path (ForceOpsPath: what a GPU run executes, same collectives).
  for (const bool ops : {false, true})
  for (const bool zero1 : {true, false})
    for (const ParallelDims& d : layouts(world->size())) {
      if (d.ep != 1) continue;
      SCOPED_TRACE(fmt::format("{} zero1={} ops={}", d.str(), zero1, ops));
      const Parallel par(world.get(), d);
      std::vector<Param> ref(specs.size()), mine(specs.size());
      for (size_t i = 0; i < specs.size(); ++i) {
        ref[i] = Param(specs[i].name, specs[i].shape);
        ref[i].value.copy_from(random_f32(specs[i].shape, 100 + i, 0.5f));
        mine[i] = Param(specs[i].name, specs[i].shape);
        if (specs[i].dim >= 0 && d.tp > 1) {
          const Range r = split_range(specs[i].shape[specs[i].dim], d.tp, par.tp_rank());
          Shape local = specs[i].shape;
          local[specs[i].dim] = r.size();
          mine[i] = Param(specs[i].name, local);
          mine[i].set_tp_split(specs[i].dim, r.begin, specs[i].shape[specs[i].dim]);
        }
        mine[i].value.copy_from(mine[i].local_part(ref[i].value));
      }
      std::vector<Param*> ref_ptrs, mine_ptrs;
      for (size_t i = 0; i < specs.size(); ++i) {
        ref_ptrs.push_back(&ref[i]);
        mine_ptrs.push_back(&mine[i]);
      }
      OptimizerConfig oc = OptimizerConfig::for_model(cfg);
      Optimizer one(ref_ptrs, oc);
      Optimizer many(mine_ptrs, oc, OptimizerSharding{&par, zero1});
      for (int step = 0; step < 3; ++step) {
        for (size_t i = 0; i < specs.size(); ++i) {
          ref[i].grad_buffer().copy_from(random_f32(specs[i].shape, 1000 * step + i));
          mine[i].grad_buffer().copy_from(mine[i].local_part(ref[i].grad));
        }
        one.step(1e-2);
        std::optional<ForceOpsPath> scope;
        if (ops) scope.emplace();
        many.step(1e-2);
      }
      for (size_t i = 0; i < specs.size(); ++i)
        EXPECT_LE(max_rel_diff(mine[i].value, mine[i].local_part(ref[i].value)), 2e-5) << specs[i].name;
      if (zero1) {  // each state lives on one rank of the replicas: world for whole tensors, dp for tp slices
        for (size_t i = 0; i < specs.size(); ++i) {
          const bool split = specs[i].dim >= 0 && d.tp > 1;
          Tensor owners = Tensor::from_vector<int64_t>({1}, {many.owns(specs[i].name) ? 1 : 0});
          group_sum(split ? par.dp() : par.world(), owners);
          EXPECT_EQ(owners.data<int64_t>()[0], 1) << specs[i].name;
        }
      }
    }
}

TEST(ShardedState, SlicesWrittenUnderOneSplitReadUnderAnother) {
  const auto world = mpi_world();
  const int64_t W = world->size(), R = world->rank();
  Tensor name_buf = Tensor::zeros({256}, DType::U8);
  if (R == 0) {
    const std::string dir = (std::filesystem::temp_directory_path() / fmt::format("dsv4-sharded-{}", getpid())).string();
    std::filesystem::create_directories(dir);
    std::copy(dir.begin(), dir.end(), name_buf.data<uint8_t>());
  }
  world->broadcast(name_buf, 0);
  const std::string dir(reinterpret_cast<const char*>(name_buf.data<uint8_t>()));
  const Tensor a = random_f32({10, 3}, 21), b = random_f32({4, 7}, 22), c = random_f32({5}, 23);
  std::vector<StateSlice> slices;
  const Range ra = split_range(10, W, R), rb = split_range(7, W, R);
  if (W > 1) {
    slices.push_back({"a", a.slice(0, ra.begin, ra.end).contiguous(), 0, ra.begin, a.shape()});
    slices.push_back({"b", b.slice(1, rb.begin, rb.end).contiguous(), 1, rb.begin, b.shape()});
  } else {
    slices.push_back({"a", a, -1, 0, a.shape()});
    slices.push_back({"b", b, -1, 0, b.shape()});
  }
  if (R == 0) slices.push_back({"c", c, -1, 0, c.shape()});
  write_state_slices(dir, "state", R, W, slices);
  world->barrier();
  const ShardedState st = ShardedState::open(dir, "state");
  EXPECT_EQ(st.global_shape("a"), a.shape());
  EXPECT_EQ(max_rel_diff(st.read("a"), a), 0.0);
  EXPECT_EQ(max_rel_diff(st.read("b"), b), 0.0);
  EXPECT_EQ(max_rel_diff(st.read("c"), c), 0.0);
  Tensor rows = Tensor::empty({3, 3}, DType::F32);  // a range that straddles the writers' slices
  st.read_into("a", rows, 0, 4);
  EXPECT_EQ(max_rel_diff(rows, a.slice(0, 4, 7)), 0.0);
  Tensor cols = Tensor::empty({4, 2}, DType::F32);
  st.read_into("b", cols, 1, 5);
  EXPECT_EQ(max_rel_diff(cols, b.slice(1, 5, 7)), 0.0);
  EXPECT_THROW(st.read("missing"), Error);
  world->barrier();
  if (R == 0) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dsv4

namespace dsv4 {
namespace {

// Every rank of an mpirun on one host: its local rank is its world rank (ranks grouped by host name). A CPU run has
// no device twins: attach_device(cpu) keeps them null.
TEST(ParallelLayout, LocalRankOnOneHostIsTheRank) {
  const auto world = mpi_world();
  EXPECT_EQ(local_rank(world.get()), world->rank());
  EXPECT_EQ(local_rank(nullptr), 0);
  Parallel par(world.get(), ParallelDims{world->size(), 1, 1});
  par.attach_device(Device::cpu());
  if (par.dp()) EXPECT_EQ(par.dp()->device_twin(), nullptr);
}

}  // namespace
}  // namespace dsv4
