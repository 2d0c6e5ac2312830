// Tensor-parallel attention (AttentionOptions::parallel) against the single-rank module.
// On every world size: each layout dp x tp the world allows (tp1 on one rank: bit-identical; tp2; tp2 x dp2 and tp4
// on four ranks). Each rank builds a reference Attention (parallel = null) with deterministic weights identical on
// every rank and a tp Attention holding the local_part of them, runs both on packed documents (its dp replica's
// data), and compares output, dx and the gradients completed per placement (TpPartial summed over tp, TpSplit against
// the local_part of the reference gradient, Replicated as is), for SWA, CSA (indexer) and HCA layers, with and without
// LoRA adapters (per-group and shared-A wo_a). Also: the loader's tp slicing of FP8 / FP4 weights with their scales
// and its alignment error, and apply_lora's A initialisation (each rank the slice of the single-rank draw).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "model/attention.h"
#include "model/checkpoint_io.h"
#include "model/lora.h"
#include "model/model.h"
#include "model/quant.h"
#include "runtime/comm.h"
#include "runtime/parallel.h"

namespace dsv4 {
namespace {

// tiny with more heads / groups / indexer heads so tp4 divides them; layers 0 SWA, 1 CSA, 2 HCA.
ModelConfig tp_config() {
  ModelConfig c = model_preset("tiny");
  c.n_heads = 8;
  c.head_dim = 16;
  c.o_groups = 4;
  c.o_lora_rank = 8;
  c.index_n_heads = 4;
  c.index_head_dim = 16;
  c.index_topk = 2;
  c.window_size = 6;
  c.n_layers = 3;
  c.n_mtp_layers = 1;
  c.n_hash_layers = 0;
  c.compress_ratios = {0, 4, 8, 0};
  c.validate("tp_config");
  return c;
}

uint64_t name_seed(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

void fill_uniform(Tensor& t, uint64_t seed, float lo, float hi) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = u(gen);
}

// Deterministic weights from the parameter names (identical on every rank).
void init_reference(Attention& a) {
  a.visit([](Param& p) {
    const uint64_t s = name_seed(p.name);
    if (p.value.ndim() == 1) {
      const bool norm = p.name.find("norm") != std::string::npos;
      fill_uniform(p.value, s, norm ? 0.8f : -0.5f, norm ? 1.2f : 0.5f);
    } else {
      const float b = 1.5f / std::sqrt(static_cast<float>(p.value.size(-1)));
      fill_uniform(p.value, s, -b, b);
    }
  });
}

std::map<std::string, Param*> params_by_name(Attention& a) {
  std::map<std::string, Param*> m;
  a.visit([&](Param& p) { m[p.name] = &p; });
  return m;
}

// Copies this rank's part of every reference parameter into the tp module.
void copy_local_parts(Attention& ref, Attention& par) {
  auto rm = params_by_name(ref);
  par.visit([&](Param& p) {
    auto it = rm.find(p.name);
    ASSERT_NE(it, rm.end()) << p.name;
    ops::copy(p.local_part(it->second->value), p.value);
  });
}

double max_rel(const Tensor& got, const Tensor& want) {
  const Tensor g = got.contiguous(), w = want.contiguous();
  EXPECT_EQ(g.shape(), w.shape());
  if (!(g.shape() == w.shape())) return 1e30;
  double diff = 0, ref = 0;
  for (int64_t i = 0; i < g.numel(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(g.data<float>()[i]) - w.data<float>()[i]));
    ref = std::max(ref, std::abs(static_cast<double>(w.data<float>()[i])));
  }
  return diff / std::max(ref, 1e-20);
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.contiguous().raw_data(), b.contiguous().raw_data(), static_cast<size_t>(a.nbytes())) == 0;
}

// One packed row of odd length: documents of 5 (shorter than the window), 3 and 21 tokens.
SeqLayout packed_layout() {
  SeqLayout l(1, 29);
  l.doc_start.resize(29);
  for (int64_t s = 0; s < 29; ++s) l.doc_start[static_cast<size_t>(s)] = s < 5 ? 0 : (s < 8 ? 5 : 8);
  return l;
}

struct Layout {
  int64_t dp, tp;
};
std::vector<Layout> layouts(int64_t world) {
  if (world == 1) return {{1, 1}};
  if (world == 2) return {{1, 2}};
  if (world == 4) return {{2, 2}, {1, 4}};
  return {{world, 1}};
}

enum class Lora { None, PerGroup, SharedA };

void add_adapters(Attention& a, Lora mode, bool parallel) {
  if (mode == Lora::None) return;
  const int64_t r = 4, G = a.o_groups(), R = a.o_lora_rank(), K = a.wo_a_in();
  auto lin = [&](Linear& l, const std::string& unit) {
    l.lora.emplace(unit, r, l.in_features(), l.out_features(), 0.75);
  };
  lin(a.wq_a, "attn.wq_a");
  lin(a.wq_b, "attn.wq_b");
  lin(a.wkv, "attn.wkv");
  lin(a.wo_b, "attn.wo_b");
  if (a.has_compressor()) lin(a.compressor.wkv, "attn.compressor.wkv");
  if (mode == Lora::SharedA) {
    a.wo_a_lora.shared.emplace("attn.wo_a", r, K, G * R, 0.5);
  } else {
    a.wo_a_lora.groups.resize(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g)
      a.wo_a_lora.groups[static_cast<size_t>(g)].emplace("attn.wo_a." + std::to_string(a.o_group_offset() + g), r, K,
                                                        R, 0.5);
  }
  if (parallel) a.place_adapters();
}

// Runs reference and tp module on this rank's dp replica's data and compares everything.
void check_attention(const Communicator* world, Layout lay, int64_t layer, Lora lora) {
  const ModelConfig cfg = tp_config();
  Parallel par(world, ParallelDims{lay.dp, lay.tp, 1});
  const std::string what = fmt::format("layer {} ({}) dp{} tp{} lora {}", layer, attn_kind_name(cfg.attn_kind(layer)),
                                       lay.dp, lay.tp, static_cast<int>(lora));
  SCOPED_TRACE(what);

  Attention ref("attn.", cfg, layer);
  add_adapters(ref, lora, false);
  init_reference(ref);  // adapters included: nonzero B exercises every adapter path
  AttentionOptions o;
  o.parallel = &par;
  Attention tpa("attn.", cfg, layer, o);
  add_adapters(tpa, lora, true);
  copy_local_parts(ref, tpa);

  const SeqLayout layout = packed_layout();
  const int64_t T = layout.tokens();
  Tensor x = Tensor::empty({T, cfg.dim}, DType::F32), dout = Tensor::empty({T, cfg.dim}, DType::F32);
  fill_uniform(x, 1000 + static_cast<uint64_t>(par.dp_rank()), -1.0f, 1.0f);
  fill_uniform(dout, 2000 + static_cast<uint64_t>(par.dp_rank()), -1.0f, 1.0f);

  AttentionCtx rc, pc;
  const Tensor ry = ref.forward(x, layout, &rc);
  const Tensor py = tpa.forward(x, layout, &pc);
  EXPECT_EQ(rc.index.comp_ids, pc.index.comp_ids) << "the tp indexer selects other entries";
  const Tensor rdx = ref.backward(dout, rc);
  const Tensor pdx = tpa.backward(dout, pc);
  if (lay.tp == 1) {  // no collective: the very same arithmetic
    EXPECT_TRUE(bit_equal(py, ry));
    EXPECT_TRUE(bit_equal(pdx, rdx));
  }
  EXPECT_LE(max_rel(py, ry), 1e-5) << "output";
  EXPECT_LE(max_rel(pdx, rdx), 1e-5) << "dx";

  auto rm = params_by_name(ref);
  int64_t compared = 0, partial = 0, split = 0;
  tpa.visit([&](Param& p) {
    const Param& rp = *rm.at(p.name);
    EXPECT_EQ(p.grad.defined(), rp.grad.defined()) << p.name;
    if (!rp.grad.defined() || !p.grad.defined()) return;
    if (lay.tp > 1) {
      const bool replicated_part = p.name.find("wq_a") != std::string::npos || p.name.find("wkv") != std::string::npos ||
                                   p.name.find("norm") != std::string::npos ||
                                   p.name.find("compressor") != std::string::npos;
      if (replicated_part && p.name.find("indexer") == std::string::npos)
        EXPECT_EQ(p.placement, Placement::TpPartial) << p.name;
    }
    Tensor g = p.grad.clone();
    if (p.placement == Placement::TpPartial) {
      group_sum(par.tp(), g);
      ++partial;
    }
    if (p.placement == Placement::TpSplit) ++split;
    EXPECT_LE(max_rel(g, p.local_part(rp.grad)), 1e-5) << p.name << " (" << static_cast<int>(p.placement) << ")";
    ++compared;
  });
  EXPECT_GE(compared, 8);
  if (lay.tp > 1) {
    EXPECT_GT(partial, 3);
    EXPECT_GE(split, 3);  // wq_b, wo_a, wo_b, attn_sink (+ adapters)
    if (lora != Lora::None) {
      EXPECT_EQ(tpa.wo_b.lora->A.placement, Placement::TpSplit);
      EXPECT_EQ(tpa.wo_b.lora->A.shard_dim, 1);
      EXPECT_EQ(tpa.wo_b.lora->B.placement, Placement::Replicated);
      EXPECT_EQ(tpa.wq_b.lora->A.placement, Placement::TpPartial);
      EXPECT_EQ(tpa.wq_b.lora->B.placement, Placement::TpSplit);
    }
  }
}

class AttentionTp : public testing::Test {
 protected:
  void SetUp() override { world_ = mpi_world(); }
  std::unique_ptr<Communicator> world_;
};

TEST_F(AttentionTp, MatchesOneRankForEveryKind) {
  for (const Layout& lay : layouts(world_->size()))
    for (int64_t layer : {0, 1, 2}) check_attention(world_.get(), lay, layer, Lora::None);
}

TEST_F(AttentionTp, LoraAdaptersMatchOneRank) {
  for (const Layout& lay : layouts(world_->size()))
    for (int64_t layer : {0, 1, 2}) {
      check_attention(world_.get(), lay, layer, Lora::PerGroup);
      check_attention(world_.get(), lay, layer, Lora::SharedA);
    }
}

TEST_F(AttentionTp, IndivisibleHeadsNameTheConfigKey) {
  const int64_t tp = world_->size();
  if (tp < 2) GTEST_SKIP() << "needs tp > 1";
  ModelConfig cfg = tp_config();
  cfg.o_groups = 1;  // 8 heads, 1 group: not divisible by tp
  Parallel par(world_.get(), ParallelDims{1, tp, 1});
  AttentionOptions o;
  o.parallel = &par;
  try {
    Attention a("attn.", cfg, 0, o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'o_groups'"), std::string::npos) << e.what();
  }
}

// apply_lora on a tp model: every A is the slice of the single-rank draw this rank holds (wo_b's A by columns; the
// others whole), placements as documented.
TEST_F(AttentionTp, LoraInitIsTheSliceOfTheOneRankDraw) {
  for (const Layout& lay : layouts(world_->size())) {
    const ModelConfig cfg = tp_config();
    Parallel par(world_.get(), ParallelDims{lay.dp, lay.tp, 1});
    Model ref(cfg);
    ModelOptions mo;
    mo.parallel = &par;
    Model tpm(cfg, mo);
    LoraConfig lc;
    lc.targets = {"wq_a", "wq_b", "wo_a", "wo_b"};
    lc.wo_a_per_group = false;
    lc.seed = 7;
    apply_lora(ref, lc);
    apply_lora(tpm, lc);
    std::map<std::string, Param*> rm;
    for (Param* p : lora_params(ref)) rm[p->name] = p;
    int64_t n = 0, split = 0;
    for (Param* p : lora_params(tpm)) {
      ASSERT_TRUE(rm.count(p->name)) << p->name;
      EXPECT_TRUE(bit_equal(p->value, p->local_part(rm.at(p->name)->value))) << p->name;
      if (p->placement == Placement::TpSplit) ++split;
      ++n;
    }
    EXPECT_EQ(n, static_cast<int64_t>(rm.size()));
    if (lay.tp > 1) EXPECT_GE(split, 3 * 3);  // per layer: wq_b.B, wo_b.A, wo_a.B
  }
}

// The loader's tp slicing (tp_local_part): FP8 with 128x128 scale blocks by rows and by columns, FP4 by rows and
// columns, plain tensors as views; misaligned slices fail naming the tensor, the split and the block.
TEST_F(AttentionTp, LoaderSlicesQuantizedWeightsWithTheirScales) {
  const int64_t tp = world_->size(), r = world_->rank();
  auto check = [&](WeightFormat fmt, int dim, int64_t rows, int64_t cols) {
    Tensor w = Tensor::empty({rows, cols}, DType::F32);
    fill_uniform(w, 42 + static_cast<uint64_t>(dim), -2.0f, 2.0f);
    const QuantizedWeight q = quantize_weight(w, fmt, ScaleFormat::E8M0, "t.weight");
    const Tensor full = q.dequantize();
    Shape local{rows, cols};
    local[dim] /= tp;
    Param p("t.weight", local);
    p.set_tp_split(dim, r * local[dim], local[dim] * tp);
    const TpPart part = tp_local_part(p, local, q.data, q.scale, "t.weight");
    const QuantizedWeight lq = QuantizedWeight::from_tensors(part.data, part.scale, "t.weight");
    EXPECT_TRUE(bit_equal(lq.dequantize(), p.local_part(full).contiguous())) << "format " << static_cast<int>(fmt)
                                                                              << " dim " << dim;
  };
  check(WeightFormat::FP8, 0, 128 * tp, 200);
  check(WeightFormat::FP8, 1, 70, 128 * tp);
  check(WeightFormat::FP4, 0, 3 * tp, 64);
  check(WeightFormat::FP4, 1, 5, 32 * tp);
  {  // plain F32: a view of the slice
    Tensor w = Tensor::empty({6, 4 * tp}, DType::F32);
    fill_uniform(w, 5, -1, 1);
    Param p("p.weight", Shape{6, 4});
    p.set_tp_split(1, 4 * r, 4 * tp);
    EXPECT_TRUE(bit_equal(tp_local_part(p, p.value.shape(), w, Tensor(), "p.weight").data, p.local_part(w)));
  }
  if (tp > 1) {
    Tensor w = Tensor::empty({64 * tp, 128}, DType::F32);
    fill_uniform(w, 9, -1, 1);
    const QuantizedWeight q = quantize_weight(w, WeightFormat::FP8, ScaleFormat::E8M0, "layers.0.attn.wq_b.weight");
    Param p("layers.0.attn.wq_b.weight", Shape{64, 128});
    p.set_tp_split(0, 64 * r, 64 * tp);
    try {
      tp_local_part(p, p.value.shape(), q.data, q.scale, p.name);
      if (r + 1 < tp) ADD_FAILURE() << "no alignment error";  // the last slice may end at the tensor's end
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("layers.0.attn.wq_b.weight"), std::string::npos) << m;
      EXPECT_NE(m.find("not aligned"), std::string::npos) << m;
      EXPECT_NE(m.find("128"), std::string::npos) << m;
    }
  }
}

// End to end through the release loader: a checkpoint of the single-rank model loaded into a tp model gives every
// weight this rank's slice of the single-rank load (F32 loads of FP8 / FP4 dequantise from the rows: no alignment
// needed; frozen BF16 sliced as stored); a frozen FP8 load with slices inside a 128-row scale block fails naming
// the tensor.
TEST_F(AttentionTp, ReleaseLoaderGivesEachRankItsSlice) {
  namespace fs = std::filesystem;
  const int64_t world = world_->size();
  const ModelConfig cfg = tp_config();
  Model src(cfg);
  src.visit([](Param& p) {
    if (p.value.dtype() != DType::F32) return;
    const bool norm = p.value.ndim() == 1 && p.name.find("norm") != std::string::npos;
    fill_uniform(p.value, name_seed(p.name), norm ? 0.8f : -0.1f, norm ? 1.2f : 0.1f);
  });
  const fs::path dir = fs::temp_directory_path() / fmt::format("dsv4_tp_load_{}_{}", ::getpid(), world_->rank());
  for (const char* f : {"instruct", "bf16"}) {
    fs::remove_all(dir);
    SaveOptions so;
    so.layout = CheckpointLayout::Release;
    so.format = CheckpointFormat::named(f);
    save_checkpoint(src, dir.string(), so);
    for (const Layout& lay : layouts(world)) {
      Parallel par(world_.get(), ParallelDims{lay.dp, lay.tp, 1});
      ModelOptions mo;
      mo.parallel = &par;
      for (LoadMode mode : {LoadMode::TrainableF32, LoadMode::FrozenQuantized}) {
        SCOPED_TRACE(fmt::format("{} dp{} tp{} mode {}", f, lay.dp, lay.tp, static_cast<int>(mode)));
        LoadOptions lo;
        lo.mode = mode;
        lo.frozen_wo_a = true;
        const bool misaligned = mode == LoadMode::FrozenQuantized && std::string(f) == "instruct" && lay.tp > 1;
        if (misaligned) {
          try {
            load_model(dir.string(), lo, mo);
            ADD_FAILURE() << "no alignment error";
          } catch (const Error& e) {
            const std::string m = e.what();
            EXPECT_NE(m.find("attn."), std::string::npos) << m;
            EXPECT_NE(m.find("not aligned"), std::string::npos) << m;
            EXPECT_NE(m.find("128"), std::string::npos) << m;
          }
          continue;
        }
        auto ref = load_model(dir.string(), lo);
        auto tpm = load_model(dir.string(), lo, mo);
        auto rs = model_weight_slots(*ref);
        int64_t n = 0, split = 0;
        for (auto& [name, slot] : model_weight_slots(*tpm)) {
          Tensor want = rs.at(name).f32_copy();
          const Param& p = *slot.param;
          if (p.placement == Placement::TpSplit) {
            want = want.slice(p.shard_dim, p.shard_offset, p.shard_offset + slot.shape[p.shard_dim]);
            ++split;
          }
          EXPECT_EQ(slot.frozen(), rs.at(name).frozen()) << name;
          EXPECT_TRUE(bit_equal(slot.f32_copy(), want.contiguous())) << name;
          ++n;
        }
        EXPECT_EQ(n, static_cast<int64_t>(rs.size()));
        if (lay.tp > 1) EXPECT_GE(split, 4 * 3 + 2);  // per layer wq_b, wo_a, wo_b, attn_sink (+ the CSA indexer)
      }
    }
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace dsv4
