#include "train/plan.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "model/checkpoint_io.h"
#include "model/lora.h"
#include "optim/groups.h"
#include "runtime/error.h"

namespace dsv4 {

namespace fs = std::filesystem;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

int64_t to_bytes(double b) { return static_cast<int64_t>(std::llround(b)); }

std::string flop_rate(double f) {
  return f >= 1e12 ? fmt::format("{:.0f} TFLOP/s", f / 1e12) : fmt::format("{:.0f} GFLOP/s", f / 1e9);
}

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

}  // namespace

// ---- hardware ------------------------------------------------------------------------------------------------
HardwareSpec HardwareSpec::named(const std::string& name) {
  HardwareSpec h;
  h.name = name;
  if (name == "h100" || name == "h200") {
    const bool h200 = name == "h200";
    h.description = h200 ? "NVIDIA H200 SXM 141GB (143771 MiB), 8 per node, NVLink 4 + 400 Gb/s InfiniBand per GPU"
                         : "NVIDIA H100 SXM 80GB (81559 MiB), 8 per node, NVLink 4 + 400 Gb/s InfiniBand per GPU";
    h.memory_bytes = (h200 ? int64_t{143771} : int64_t{81559}) * 1024 * 1024;
    h.reserved_bytes = int64_t{3} * 1024 * 1024 * 1024;  // CUDA context, NCCL buffers, cuBLAS workspace, allocator slack
    h.peak_flops = 989e12;   // dense BF16, H100/H200 SXM
    h.efficiency = 0.35;     // Megatron's best published V3-class H100 number: 338 TFLOP/s = 34% (anchors §0)
    h.intra_bw = 360e9;      // NVLink 4: 450 GB/s per direction; NCCL all-reduce bus bandwidth about 80% of it
    h.intra_a2a_bw = 150e9;  // DeepEP V1 intranode dispatch/combine, 153-158 GB/s measured (H800)
    h.inter_bw = 45e9;       // 400 Gb/s NDR per GPU = 50 GB/s; DeepEP internode RDMA 43-58 GB/s
    h.gpus_per_node = 8;
    h.act_bytes = 2;
    h.index_bytes = 4;
    h.gpu = true;
  } else if (name == "cpu") {
    h.description = "CPU FP32 reference (one host, one rank)";
    h.memory_bytes = 0;  // dsv4-plan fills in the host's memory
    h.reserved_bytes = 0;
    h.peak_flops = 1e11;  // an assumed FP32 GEMM rate of one host
    h.efficiency = 0.5;
    h.intra_bw = 10e9;  // shared-memory MPI
    h.intra_a2a_bw = 10e9;
    h.inter_bw = 10e9;
    h.gpus_per_node = 1 << 20;
    h.act_bytes = 4;
    h.index_bytes = 8;
    h.gpu = false;
  } else {
    DSV4_FAIL("unknown target '{}' (expected h100, h200 or cpu)", name);
  }
  return h;
}

std::string_view weight_class_name(WeightClass c) {
  switch (c) {
    case WeightClass::FP8: return "FP8 E4M3";
    case WeightClass::FP4: return "FP4 (packed)";
    case WeightClass::BF16: return "BF16";
    case WeightClass::F32: return "F32";
    case WeightClass::I64: return "I64";
    case WeightClass::Scales: return "block scales";
  }
  return "?";
}

std::string format_bytes(double b) {
  const double a = std::fabs(b);
  if (a >= kGiB) return fmt::format("{:.2f} GiB", b / kGiB);
  if (a >= 1024.0 * 1024.0) return fmt::format("{:.1f} MiB", b / (1024.0 * 1024.0));
  if (a >= 1024.0) return fmt::format("{:.1f} KiB", b / 1024.0);
  return fmt::format("{:.0f} B", b);
}

// ---- setup from a training config ---------------------------------------------------------------------------
PlanSetup plan_setup(const TrainConfig& cfg, const std::string& source, const std::string& checkpoint_format) {
  PlanSetup s;
  s.source = source;
  const std::string& ckpt = cfg.model.checkpoint;
  const bool ckpt_config = !ckpt.empty() && fs::exists(fs::path(ckpt) / "config.json");
  if (!cfg.model.preset.empty()) {
    s.model = model_preset(cfg.model.preset);
  } else if (!cfg.model.config.empty()) {
    s.model = load_model_config(cfg.model.config);
  } else if (ckpt_config) {
    s.model = load_checkpoint_config(ckpt);
  } else {
    DSV4_FAIL("{}: model.checkpoint '{}' has no config.json here; to plan without the files, name the model too "
              "(model.preset=flash or model.preset=pro, or model.config=PATH)",
              source, ckpt);
  }
  if (!ckpt.empty()) {
    if (!checkpoint_format.empty()) {
      s.checkpoint = CheckpointFormat::named(checkpoint_format);
    } else if (ckpt_config) {
      try {
        s.checkpoint = checkpoint_format_of(ckpt);
      } catch (const Error&) {
        s.checkpoint = CheckpointFormat::from_config(s.model);
      }
    } else {
      s.checkpoint = CheckpointFormat::from_config(s.model);  // the release format of the named model
    }
  } else if (!checkpoint_format.empty()) {
    DSV4_FAIL("{}: --checkpoint-format '{}' given but model.checkpoint is not set", source, checkpoint_format);
  }
  s.dp = cfg.parallel.dp;
  s.tp = cfg.parallel.tp;
  s.ep = cfg.parallel.ep;
  s.seq_len = cfg.data.seq_len;
  s.micro_batch = cfg.data.micro_batch;
  s.grad_accum = cfg.data.grad_accum;
  s.recompute = cfg.train.recompute;
  s.precision = cfg.train.precision;
  s.zero1 = cfg.parallel.zero1;
  s.mtp_backward = cfg.loss.mtp_weight != 0 || cfg.loss.mtp_weight_after_decay != 0 || cfg.loss.balance_alpha != 0;
  s.optimizer = cfg.optim.type;
  s.lora = cfg.lora;
  return s;
}

// ---- layout -------------------------------------------------------------------------------------------------
void validate_layout(const ModelConfig& m, int64_t dp, int64_t tp, int64_t ep, int64_t world) {
  std::vector<std::string> bad;
  if (dp < 1) bad.push_back(fmt::format("parallel.dp = {} must be >= 1", dp));
  if (tp < 1) bad.push_back(fmt::format("parallel.tp = {} must be >= 1", tp));
  if (ep < 1) bad.push_back(fmt::format("parallel.ep = {} must be >= 1", ep));
  if (bad.empty()) {
    if (dp * tp != world)
      bad.push_back(fmt::format("dp {} x tp {} = {} is not the world size {}", dp, tp, dp * tp, world));
    if (m.n_heads % tp != 0) bad.push_back(fmt::format("n_heads {} is not divisible by tp {}", m.n_heads, tp));
    if (m.o_groups % tp != 0) bad.push_back(fmt::format("o_groups {} is not divisible by tp {}", m.o_groups, tp));
    if (m.index_n_heads % tp != 0)
      bad.push_back(fmt::format("index_n_heads {} is not divisible by tp {}", m.index_n_heads, tp));
    if (m.vocab_size < tp)
      bad.push_back(fmt::format("vocab_size {} is smaller than tp {} (vocab-parallel embedding and head)", m.vocab_size, tp));
    if (m.n_routed_experts % ep != 0)
      bad.push_back(fmt::format("n_routed_experts {} is not divisible by ep {}", m.n_routed_experts, ep));
    if (world % ep != 0)
      bad.push_back(fmt::format("world size {} is not divisible by ep {} (experts fold onto the dp x tp ranks)",
                                world, ep));
  }
  if (!bad.empty()) {
    std::string msg;
    for (const std::string& b : bad) msg += (msg.empty() ? "" : "; ") + b;
    DSV4_FAIL("layout dp={} tp={} ep={} (world {}) does not fit model '{}': {}", dp, tp, ep, world, m.name, msg);
  }
}

// ---- LoRA adapters from the config alone (mirrors lora_sites / apply_lora of model/lora.cpp) ----------------
namespace {

struct PlanSite {
  std::string unit;
  std::string weight;        // the base weight's native name
  int64_t in = 0, out = 0;
  bool pattern_unit = true;  // false: routed w13 and wo_a.{g} (derived units)
  int64_t group = -1;        // wo_a: -1 the shared-A unit, else the group
  bool wo_a = false;
  bool expert = false, routed = false;
  int k = 0;                 // expert matrix 1, 2, 3, 13
  int64_t layer = 0;         // index into compress_ratios (main layers, then MTP blocks)
  bool attention_z = false;  // its adapter activation z [T, r] is kept in the attention context
};

void sites_attention(std::vector<PlanSite>& out, const ModelConfig& c, const std::string& p, int64_t layer) {
  const int64_t D = c.dim, Q = c.q_lora_rank, HC = c.n_heads * c.head_dim, C = c.head_dim, G = c.o_groups,
                R = c.o_lora_rank, K = HC / G, m = c.compress_ratio(layer);
  auto lin = [&](const std::string& name, int64_t in, int64_t o, bool z) {
    PlanSite s;
    s.unit = p + name;
    s.weight = p + name + ".weight";
    s.in = in;
    s.out = o;
    s.layer = layer;
    s.attention_z = z;
    out.push_back(s);
  };
  lin("wq_a", D, Q, true);
  lin("wq_b", Q, HC, true);
  lin("wkv", D, C, true);
  {
    PlanSite s;
    s.unit = p + "wo_a";
    s.weight = p + "wo_a.weight";
    s.in = K;
    s.out = G * R;
    s.wo_a = true;
    s.layer = layer;
    s.attention_z = true;
    out.push_back(s);
  }
  for (int64_t g = 0; g < G; ++g) {
    PlanSite s;
    s.unit = p + "wo_a." + std::to_string(g);
    s.weight = p + "wo_a.weight";
    s.in = K;
    s.out = R;
    s.wo_a = true;
    s.group = g;
    s.layer = layer;
    s.attention_z = true;
    out.push_back(s);
  }
  lin("wo_b", G * R, D, true);
  if (m > 0) {
    const int64_t W = (m == 4 ? 2 : 1) * C;
    lin("compressor.wkv", D, W, true);
    lin("compressor.wgate", D, W, true);
  }
  if (m == 4) {  // the indexer runs without a context: nothing kept
    const int64_t W = 2 * c.index_head_dim;
    lin("indexer.wq_b", Q, c.index_n_heads * c.index_head_dim, false);
    lin("indexer.weights_proj", D, c.index_n_heads, false);
    lin("indexer.compressor.wkv", D, W, false);
    lin("indexer.compressor.wgate", D, W, false);
  }
}

void sites_moe(std::vector<PlanSite>& out, const ModelConfig& c, const std::string& p, int64_t layer) {
  const int64_t D = c.dim, I = c.moe_inter_dim;
  {
    PlanSite s;
    s.unit = p + "gate";
    s.weight = p + "gate.weight";
    s.in = D;
    s.out = c.n_routed_experts;
    s.layer = layer;
    out.push_back(s);
  }
  auto expert = [&](const std::string& ep, bool routed) {
    auto one = [&](int k, int64_t in, int64_t o, bool pattern_unit) {
      PlanSite s;
      s.unit = ep + "w" + std::to_string(k);
      s.weight = ep + "w" + std::to_string(k == 13 ? 1 : k) + ".weight";
      s.in = in;
      s.out = o;
      s.pattern_unit = pattern_unit;
      s.expert = true;
      s.routed = routed;
      s.k = k;
      s.layer = layer;
      out.push_back(s);
    };
    one(1, D, I, true);
    if (routed) one(13, D, 2 * I, false);
    one(2, I, D, true);
    one(3, D, I, true);
  };
  for (int64_t e = 0; e < c.n_routed_experts; ++e) expert(p + "experts." + std::to_string(e) + ".", true);
  if (c.n_shared_experts == 1) expert(p + "shared_experts.", false);
}

std::vector<PlanSite> plan_sites(const ModelConfig& c) {
  std::vector<PlanSite> out;
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    sites_attention(out, c, p + "attn.", i);
    sites_moe(out, c, p + "ffn.", i);
  }
  for (int64_t j = 0; j < c.n_mtp_layers; ++j) {
    const std::string p = "mtp." + std::to_string(j) + ".";
    const int64_t layer = c.n_layers + j;
    for (const char* proj : {"e_proj", "h_proj"}) {
      PlanSite s;
      s.unit = p + proj;
      s.weight = p + proj + ".weight";
      s.in = c.dim;
      s.out = c.dim;
      s.layer = layer;
      out.push_back(s);
    }
    sites_attention(out, c, p + "attn.", layer);
    sites_moe(out, c, p + "ffn.", layer);
  }
  return out;
}

struct PlanAdapter {
  const PlanSite* site = nullptr;
  int64_t rank = 0;
};

// The adapters apply_lora would attach: pattern units the targets select, wo_a expanded to its groups (or the
// shared-A unit), routed w1 + w3 of one expert fused into w13. Throws naming patterns that select nothing.
std::vector<PlanAdapter> plan_adapters(const std::vector<PlanSite>& sites, const ModelConfig& c, const LoraSection& l) {
  LoraConfig lc;
  lc.rank = l.rank;
  lc.alpha = l.alpha;
  lc.rslora = l.rslora;
  lc.dropout = l.dropout;
  lc.targets = l.targets;
  lc.validate();
  std::set<std::string> selected;
  std::vector<std::string> unmatched;
  for (const std::string& pat : lc.targets) {
    bool any = false;
    for (const PlanSite& s : sites)
      if (s.pattern_unit && lora_pattern_matches(pat, s.unit)) {
        selected.insert(s.unit);
        any = true;
      }
    if (!any) unmatched.push_back("'" + pat + "'");
  }
  if (!unmatched.empty()) {
    std::string list;
    for (const auto& u : unmatched) list += (list.empty() ? "" : ", ") + u;
    DSV4_FAIL("lora.targets: pattern(s) {} match no adapter site of model '{}'", list, c.name);
  }
  std::map<std::string, const PlanSite*> by_unit;
  for (const PlanSite& s : sites) by_unit[s.unit] = &s;
  std::vector<PlanAdapter> out;
  std::set<std::string> seen;
  auto add = [&](const std::string& u) {
    if (seen.insert(u).second) out.push_back({by_unit.at(u), lc.rank});
  };
  for (const PlanSite& s : sites) {
    const std::string& u = s.unit;
    if (!selected.count(u)) continue;
    if (s.wo_a && s.group < 0) {
      for (int64_t g = 0; g < c.o_groups; ++g) add(u + "." + std::to_string(g));  // per-group adapters (default)
    } else if (s.expert && s.routed && (s.k == 1 || s.k == 3)) {
      const std::string base = u.substr(0, u.size() - 2);
      if (selected.count(base + "w1") && selected.count(base + "w3")) add(base + "w13");
      else add(u);
    } else {
      add(u);
    }
  }
  return out;
}

// Fractions of an adapter's A [r, in] and B [out, r] one rank holds, following its base weight's ShardSpec.
struct AdapterShare {
  double a = 1, b = 1;
};
AdapterShare adapter_share(const PlanSite& s, const ParamTable& table, int64_t tp, int64_t ep, int64_t G) {
  if (s.wo_a && s.group >= 0) {
    const bool owned = s.group < G / tp;  // rank 0 holds groups [0, G/tp)
    return owned ? AdapterShare{1, 1} : AdapterShare{0, 0};
  }
  const ParamEntry& e = table.at(s.weight);
  switch (e.shard.kind) {
    case ShardSpec::Kind::Replicated: return {1, 1};
    case ShardSpec::Kind::Split:
      return e.shard.dim == 0 ? AdapterShare{1, 1.0 / static_cast<double>(tp)}
                              : AdapterShare{1.0 / static_cast<double>(tp), 1};
    case ShardSpec::Kind::Expert: return e.shard.owns(0, ep) ? AdapterShare{1, 1} : AdapterShare{0, 0};
  }
  return {1, 1};
}

double rank_fraction(const ParamEntry& e, int64_t tp, int64_t ep) {
  switch (e.shard.kind) {
    case ShardSpec::Kind::Replicated: return 1.0;
    case ShardSpec::Kind::Split: return 1.0 / static_cast<double>(tp);
    case ShardSpec::Kind::Expert: return e.shard.owns(0, ep) ? 1.0 : 0.0;
  }
  return 1.0;
}

// Over which ranks a tensor's gradient is summed: routed experts world/ep; tensors every tp rank holds whole but
// back-propagates only partly — the MoE's router and shared expert (token slices) and the attention's replicated
// projections (wq_a, q_norm, wkv, kv_norm, compressors: each tp rank its heads) — the world; everything else dp.
enum class Replicas { Dp, World, Edp };
Replicas replicas_of(const ParamEntry& e) {
  if (e.shard.kind == ShardSpec::Kind::Expert) return Replicas::Edp;
  if (e.shard.kind == ShardSpec::Kind::Replicated &&
      (contains(e.name, ".ffn.") || contains(e.name, ".attn.wq_a") || contains(e.name, ".attn.q_norm") ||
       contains(e.name, ".attn.wkv") || contains(e.name, ".attn.kv_norm") || contains(e.name, ".attn.compressor.")))
    return Replicas::World;
  return Replicas::Dp;
}
// Among which ranks ZeRO-1 picks a tensor's owner: every rank holding the whole tensor (the world for replicated
// ones), the dp group for tp slices, world/ep for routed experts.
Replicas zero1_replicas_of(const ParamEntry& e) {
  if (e.shard.kind == ShardSpec::Kind::Expert) return Replicas::Edp;
  return e.shard.kind == ShardSpec::Kind::Replicated ? Replicas::World : Replicas::Dp;
}

WeightClass class_of_dtype(DType d) {
  switch (d) {
    case DType::F8_E4M3: return WeightClass::FP8;
    case DType::I8: return WeightClass::FP4;  // packed FP4 pairs
    case DType::BF16: return WeightClass::BF16;
    case DType::I64: return WeightClass::I64;
    default: return WeightClass::F32;
  }
}

double mean_csa_topk(const ModelConfig& c, int64_t seq) {
  double s = 0;
  for (int64_t t = 0; t < seq; ++t) s += static_cast<double>(std::min<int64_t>(c.index_topk, (t + 1) / 4));
  return seq > 0 ? s / static_cast<double>(seq) : 0.0;
}

double mean_visible(int64_t seq, int64_t m) {
  double s = 0;
  for (int64_t t = 0; t < seq; ++t) s += static_cast<double>((t + 1) / m);
  return seq > 0 ? s / static_cast<double>(seq) : 0.0;
}

}  // namespace

// ---- activations ------------------------------------------------------------------------------------------------
// Bytes one micro-batch keeps, derived from what the forward contexts of model.h / attention.h / moe.h / mhc.h hold.
// T = micro_batch x seq_len tokens per dp rank; Tm = T / tp tokens whose MoE the rank runs (tokens are split over
// the tp ranks for the MoE); a = activation bytes (F32 on the CPU, BF16 on GPUs), f = 4 (F32 statistics: rstd, lse,
// mHC mixes, router logits/weights), i = index bytes (I64 CPU, I32 GPU), Em = micro_batch x floor(seq/m) compressed
// entries; n = hc_mult, D, Q = q_lora_rank, H, C = head_dim, G x R = o_groups x o_lora_rank, E routed experts, K
// activated, I = moe_inter_dim, V vocab; H, G*R and V are split over tp.
//
// Per decoder block (BlockCtx), bytes:
//   streams    2 n D a T                           X1 (after the attention hyper-connection) and the block output
//                                                  (the block input is the previous block's output)
//   mHC pre    2 (D a + (n + n^2 + (2+n) n + 1) f) T  x2: collapsed input x, post, comb, mixes, rstd (HcPreCtx + post)
//   mHC post   2 D a T                             the sub-layer output F (HcPostCtx.F; X, post, comb are shared)
//   norms      2 (D a + f) T                       attn_norm / ffn_norm outputs (attention and MoE inputs), rstd
//   attention  (2 Q a + f + 2 C a + f) T           wq_a output, q_norm rstd, qr; wkv output, kv_norm rstd, kv
//              (4 (H/tp) C a + 2 (H/tp) f) T       q_raw, q, o, o_rot; q_rstd, lse
//              (G R / tp) a T                      wo_a output y (wo_b input)
//   compressor 2 W a T + Em (2 C a + f)            (m > 0, W = 2C for CSA, C for HCA) kv and gate projections;
//                                                  pooled, rstd and entries ckv
//   CSA ids    mean(min(topk, visible)) i T        GPU only (the CPU reference keeps them in host vectors)
//   MoE        (2 E f + K f + K i + 2 K I a + 2 I a) Tm    gate logits s, affinities aff, weights w, ids idx, routed
//                                                  w1/w3 pre-activations g, u [T*K, I], shared expert g, u [T, I]
//              + K D a Tm on GPUs                  the dispatched input rows (the CPU gathers them from x)
//   LoRA       r a T per attention adapter (wq_a, wq_b, wkv, wo_b, compressor; wo_a per group held)   z = A x
// Outside the blocks: the first streams n D a T; the head (HcHeadCtx mixes, rstd, hf, norm rstd, norm output)
// (n f + 2 f + 2 D a) T; per MTP block (MtpCtx) next ids i T, embedding, enorm (2 D a + f) T, hnorm (n f + n D a) T,
// its block input n D a T, its own head; ids, labels and (1 + n_mtp) shifted targets i T; logits (1 + n_mtp) (V/tp)
// 4 T (F32), and the loss gradients kept through the backward: (1 + n_mtp) (V/tp) 4 T.
// Peak = all of it + the larger of (a) the MTP cross-entropy gradient being built ((V/tp) 4 T) and (b) one block's
// backward working set: (3 n D + 4 D) a T + 2 (n + n^2) f T (dX in, HcPostGrads x2, dm_in, dx2) plus the largest of
// the attention query path ((G R/tp + 3 (H/tp) C + C + 2 D + 2 Q) a T + Em C a), its compressor path
// ((G R/tp + 2 (H/tp) C + C + 2 W + 2 D) a T + 3 Em C a) and the MoE backward ((D a + 2 E f) Tm, on GPUs
// + (2 K D + 3 K I) a Tm for the dispatched rows).
// With per-layer recomputation the blocks keep only their input streams (L n D a T); one block's context is rebuilt
// at a time: peak = checkpoints + the largest block context + the rest as above.
ActivationEstimate activation_estimate(const PlanSetup& s, const HardwareSpec& hw) {
  const ModelConfig& c = s.model;
  ActivationEstimate a;
  const int64_t tp = std::max<int64_t>(1, s.tp);
  a.tokens = s.micro_batch * s.seq_len;
  a.moe_tokens = (a.tokens + tp - 1) / tp;
  const double T = static_cast<double>(a.tokens), Tm = static_cast<double>(a.moe_tokens);
  const double ab = static_cast<double>(hw.act_bytes), f = 4.0, ib = static_cast<double>(hw.index_bytes), lb = 4.0;
  const double D = static_cast<double>(c.dim), n = static_cast<double>(c.hc_mult), Q = static_cast<double>(c.q_lora_rank);
  const double C = static_cast<double>(c.head_dim), Ht = static_cast<double>(c.n_heads) / static_cast<double>(tp);
  const double HCt = Ht * C, GRt = static_cast<double>(c.o_groups * c.o_lora_rank) / static_cast<double>(tp);
  const double E = static_cast<double>(c.n_routed_experts), K = static_cast<double>(c.n_activated_experts);
  const double I = static_cast<double>(c.moe_inter_dim), Vt = static_cast<double>(c.vocab_size) / static_cast<double>(tp);
  const double n_mtp = static_cast<double>(c.n_mtp_layers);

  // LoRA adapter activations per layer (z vectors per token held by this rank).
  std::vector<double> lora_z(static_cast<size_t>(c.n_layers + c.n_mtp_layers), 0.0);
  if (s.lora.enabled) {
    const std::vector<PlanSite> sites = plan_sites(c);
    for (const PlanAdapter& ad : plan_adapters(sites, c, s.lora)) {
      const PlanSite& st = *ad.site;
      if (!st.attention_z) continue;
      double share = 1.0;
      if (st.wo_a && st.group >= 0) share = st.group < c.o_groups / tp ? 1.0 : 0.0;
      lora_z[static_cast<size_t>(st.layer)] += share * static_cast<double>(ad.rank);
    }
  }

  auto block = [&](int64_t layer, bool mtp) {
    const int64_t m = c.compress_ratio(layer);
    const double W = m > 0 ? (m == 4 ? 2.0 : 1.0) * C : 0.0;
    const double Em = m > 0 ? static_cast<double>(s.micro_batch * (s.seq_len / m)) : 0.0;
    double saved = 0;
    saved += 2 * n * D * ab * T;                                  // streams
    saved += 2 * (D * ab + (n + n * n + (2 + n) * n + 1) * f) * T;  // mHC pre x2
    saved += 2 * D * ab * T;                                      // mHC post x2: F
    saved += 2 * (D * ab + f) * T;                                // attn_norm, ffn_norm
    saved += (2 * Q * ab + f + 2 * C * ab + f) * T;               // q low-rank path, kv path
    saved += (4 * HCt * ab + 2 * Ht * f) * T;                     // q_raw, q, o, o_rot; q_rstd, lse
    saved += GRt * ab * T;                                        // y
    if (m > 0) saved += 2 * W * ab * T + Em * (2 * C * ab + f);   // compressor
    if (m == 4 && hw.gpu) saved += mean_csa_topk(c, s.seq_len) * ib * T;
    const double shared = c.n_shared_experts == 1 ? 2 * I * ab : 0.0;
    saved += (2 * E * f + K * f + K * ib + 2 * K * I * ab + shared + (hw.gpu ? K * D * ab : 0.0)) * Tm;  // MoE
    saved += lora_z[static_cast<size_t>(layer)] * ab * T;
    // Backward working set.
    const double blk = (3 * n * D + 4 * D) * ab * T + 2 * (n + n * n) * f * T;
    const double attn_q = (GRt + 3 * HCt + C + 2 * D + 2 * Q) * ab * T + Em * C * ab;
    const double attn_c = m > 0 ? (GRt + 2 * HCt + C + 2 * W + 2 * D) * ab * T + 3 * Em * C * ab : 0.0;
    const double moe = (D * ab + 2 * E * f) * Tm + (hw.gpu ? (2 * K * D + 3 * K * I) * ab * Tm : 0.0);
    ActivationEstimate::Layer l;
    const AttnKind kind = c.attn_kind(layer);
    l.kind = std::string(kind == AttnKind::SlidingWindow ? "SWA" : kind == AttnKind::CompressedSparse ? "CSA" : "HCA") +
             (mtp ? " (MTP)" : "");
    l.saved = to_bytes(saved);
    l.transient = to_bytes(blk + std::max({attn_q, attn_c, moe}));
    return l;
  };
  for (int64_t i = 0; i < c.n_layers; ++i) a.layers.push_back(block(i, false));
  for (int64_t j = 0; j < c.n_mtp_layers; ++j) a.layers.push_back(block(c.n_layers + j, true));

  int64_t max_saved = 0, max_transient = 0;
  for (const auto& l : a.layers) {
    a.saved_layers += l.saved;
    max_saved = std::max(max_saved, l.saved);
    max_transient = std::max(max_transient, l.transient);
  }
  double other = n * D * ab * T;                           // first streams (expanded embedding)
  other += (n * f + 2 * f + 2 * D * ab) * T;               // head: mixes, rstd, hf, norm rstd, norm output
  other += (2 + 1 + n_mtp) * ib * T;                       // ids, labels, shifted targets
  other += n_mtp * (ib + 2 * D * ab + f + n * f + n * D * ab + n * D * ab + n * f + 2 * f + 2 * D * ab) * T;  // MTP
  a.saved_other = to_bytes(other);
  a.logits = to_bytes((1 + n_mtp) * Vt * lb * T);
  const double n_mtp_grads = s.mtp_backward ? n_mtp : 0.0;
  a.loss_grads = to_bytes((1 + n_mtp_grads) * Vt * lb * T);
  const int64_t ce = n_mtp_grads > 0 ? to_bytes(Vt * lb * T) : 0;
  a.transient = std::max(ce, max_transient);
  a.total = a.saved_layers + a.saved_other + a.logits + a.loss_grads + a.transient;
  a.checkpoints = to_bytes(static_cast<double>(c.n_layers) * n * D * ab * T);
  a.recompute_total = a.checkpoints + max_saved + a.saved_other + a.logits + a.loss_grads + a.transient;
  return a;
}

// ---- the plan ----------------------------------------------------------------------------------------------------
PlanReport plan(const PlanSetup& setup, const HardwareSpec& hw) {
  PlanReport r;
  r.setup = setup;
  r.hw = hw;
  const ModelConfig& c = setup.model;
  c.validate(c.name);
  const int64_t dp = setup.dp, tp = setup.tp, ep = setup.ep;
  r.world = setup.world > 0 ? setup.world : dp * tp;
  validate_layout(c, dp, tp, ep, r.world);
  DSV4_CHECK(setup.seq_len >= 1 && setup.micro_batch >= 1 && setup.grad_accum >= 1,
             "data.seq_len, data.micro_batch and data.grad_accum must be >= 1");
  DSV4_CHECK(setup.optimizer == "muon" || setup.optimizer == "adamw", "optim.type '{}' (expected muon or adamw)",
             setup.optimizer);
  r.edp = r.world / ep;
  r.experts_per_rank = c.n_routed_experts / ep;
  const bool lora = setup.lora.enabled;
  // ZeRO-1 as built shards the optimizer states (one owner per tensor among its replicas); on a GPU the plan also
  // assumes the design's BF16 working weights with an F32 master shard (the GPU trainer is not built yet).
  const bool zero1 = setup.zero1;
  const bool zero1_masters = setup.zero1 && hw.gpu;
  const bool quantized_base = lora && setup.checkpoint.has_value();

  // Every ParamTable entry; frozen flags as the model has them.
  ParamTableOptions opts;
  if (setup.checkpoint) opts.format = *setup.checkpoint;
  const ParamTable table = ParamTable::build(c, opts);
  for (const ParamTable::DiskTensor& t : table.disk_tensors()) {
    const WeightClass k = t.is_scale ? WeightClass::Scales : class_of_dtype(t.dtype);
    r.checkpoint_bytes[static_cast<size_t>(k)] += dtype_nbytes(t.dtype, t.shape.numel());
  }
  r.checkpoint_total = table.total_disk_bytes();

  const GroupTable groups =
      setup.optimizer == "adamw" ? GroupTable::adamw_everywhere() : GroupTable::deepseek_v4(c.o_groups);
  auto replicas = [&](Replicas k) {
    return static_cast<double>(k == Replicas::Edp ? r.edp : k == Replicas::World ? r.world : dp);
  };
  std::array<double, 3> grad_by_replicas{};  // F32 gradient bytes of this rank by Replicas (for the DP sync)
  std::array<double, kWeightClasses> wb{};
  double muon = 0, adamw = 0, muon_z1 = 0, adamw_z1 = 0, master = 0;
  for (const ParamEntry& e : table.entries()) {
    const double numel = static_cast<double>(e.shape.numel());
    const double frac = rank_fraction(e, tp, ep);
    r.params_total += e.shape.numel();
    r.params_rank += static_cast<int64_t>(std::llround(numel * frac));
    const bool trainable = e.trainable && !lora && e.role != TensorRole::Index;
    const double reps = replicas(zero1_replicas_of(e));
    // Residency.
    if (e.role == TensorRole::Index) {
      wb[static_cast<size_t>(WeightClass::I64)] += numel * 8 * frac;
    } else if (quantized_base && e.holder != WeightHolder::Param) {
      const double w = static_cast<double>(dtype_nbytes(e.disk_dtype, e.disk_shape.numel()));
      wb[static_cast<size_t>(class_of_dtype(e.disk_dtype))] += w * frac;
      if (e.scale)
        wb[static_cast<size_t>(WeightClass::Scales)] +=
            static_cast<double>(dtype_nbytes(e.scale->dtype, e.scale->shape.numel())) * frac;
    } else if (zero1_masters && trainable && reps > 1) {  // one replica: the F32 master is the working weight
      wb[static_cast<size_t>(WeightClass::BF16)] += numel * 2 * frac;  // working copy
      wb[static_cast<size_t>(WeightClass::F32)] += numel * 4 * frac / reps;
      master += numel * 4 * frac / reps;
    } else {
      wb[static_cast<size_t>(WeightClass::F32)] += numel * 4 * frac;
    }
    if (!trainable) continue;
    r.trainable_total += e.shape.numel();
    r.trainable_rank += static_cast<int64_t>(std::llround(numel * frac));
    grad_by_replicas[static_cast<size_t>(replicas_of(e))] += numel * 4 * frac;
    const OptGroup g = group_of(e.name, e.shape, groups);
    if (g == OptGroup::Muon) {
      muon += numel * 4 * frac;
      muon_z1 += numel * 4 * frac / reps;
    } else if (g == OptGroup::AdamW) {
      adamw += numel * 8 * frac;
      adamw_z1 += numel * 8 * frac / reps;
    }
  }
  double grads = 0;
  for (double g : grad_by_replicas) grads += g;

  // LoRA adapters: F32 A and B, F32 gradients, optimizer state by the same group rules (2-D: Muon).
  double lw = 0, lmuon = 0, ladamw = 0, lmuon_z1 = 0, ladamw_z1 = 0;
  if (lora) {
    const std::vector<PlanSite> sites = plan_sites(c);
    const std::vector<PlanAdapter> adapters = plan_adapters(sites, c, setup.lora);
    r.lora_adapters = static_cast<int64_t>(adapters.size());
    for (const PlanAdapter& ad : adapters) {
      const PlanSite& st = *ad.site;
      const double ra = static_cast<double>(ad.rank);
      const double na = ra * static_cast<double>(st.in), nb = static_cast<double>(st.out) * ra;
      r.lora_params_total += static_cast<int64_t>(na + nb);
      const AdapterShare sh = adapter_share(st, table, tp, ep, c.o_groups);
      const double held = na * sh.a + nb * sh.b;
      r.lora_params_rank += static_cast<int64_t>(std::llround(held));
      lw += held * 4;
      const double reps = replicas(zero1_replicas_of(table.at(st.weight)));
      grad_by_replicas[static_cast<size_t>(replicas_of(table.at(st.weight)))] += held * 4;
      for (const auto& [suffix, numel, shape] :
           {std::tuple{".lora_A", na * sh.a, Shape{ad.rank, st.in}}, std::tuple{".lora_B", nb * sh.b, Shape{st.out, ad.rank}}}) {
        const OptGroup g = group_of(st.unit + suffix, shape, groups);
        if (g == OptGroup::Muon) {
          lmuon += numel * 4;
          lmuon_z1 += numel * 4 / reps;
        } else if (g == OptGroup::AdamW) {
          ladamw += numel * 8;
          ladamw_z1 += numel * 8 / reps;
        }
      }
    }
  }

  for (int k = 0; k < kWeightClasses; ++k) r.weight_bytes[static_cast<size_t>(k)] = to_bytes(wb[static_cast<size_t>(k)]);
  for (int64_t b : r.weight_bytes) r.weights += b;
  r.master_shard = to_bytes(master);
  r.grads = to_bytes(grads);
  r.optimizer_unsharded = to_bytes(muon + adamw);
  r.optimizer_zero1 = to_bytes(muon_z1 + adamw_z1);
  r.opt_muon = to_bytes(zero1 ? muon_z1 : muon);
  r.opt_adamw = to_bytes(zero1 ? adamw_z1 : adamw);
  r.optimizer = r.opt_muon + r.opt_adamw;
  r.lora_weights = to_bytes(lw);
  r.lora_grads = lora ? to_bytes(lw) : 0;
  r.lora_optimizer = to_bytes(zero1 ? lmuon_z1 + ladamw_z1 : lmuon + ladamw);
  r.act = activation_estimate(setup, hw);
  r.activations = setup.recompute ? r.act.recompute_total : r.act.total;
  r.reserved = hw.reserved_bytes;
  r.total = r.weights + r.grads + r.optimizer + r.lora_weights + r.lora_grads + r.lora_optimizer + r.activations +
            r.reserved;
  r.capacity = hw.memory_bytes;
  r.fits = r.capacity <= 0 || r.total <= r.capacity;
  {
    size_t top = 0;
    for (size_t k = 1; k < r.weight_bytes.size(); ++k)
      if (r.weight_bytes[k] > r.weight_bytes[top]) top = k;
    const std::vector<std::pair<std::string, int64_t>> parts = {
        {fmt::format("weights (mostly {})", weight_class_name(static_cast<WeightClass>(top))), r.weights},
        {"gradients", r.grads},
        {"optimizer state", r.optimizer},
        {"LoRA adapters + gradients + state", r.lora_weights + r.lora_grads + r.lora_optimizer},
        {setup.recompute ? "activations (with recomputation)" : "activations", r.activations}};
    auto best = std::max_element(parts.begin(), parts.end(), [](const auto& x, const auto& y) { return x.second < y.second; });
    r.biggest = fmt::format("{} {} ({:.0f}%)", best->first, format_bytes(static_cast<double>(best->second)),
                            r.total > 0 ? 100.0 * static_cast<double>(best->second) / static_cast<double>(r.total) : 0.0);
  }

  // ---- communication per optimizer step (bytes each rank sends) ----
  const double gpn = static_cast<double>(hw.gpus_per_node);
  auto spans_nodes = [&](double size, double stride) { return size > 1 && size * stride > gpn; };
  auto bw = [&](bool inter) { return inter ? hw.inter_bw : hw.intra_bw; };
  auto link = [&](bool inter) { return std::string(hw.gpu ? (inter ? "InfiniBand" : "NVLink") : "shared memory"); };
  auto add = [&](const std::string& what, double bytes, double seconds, const std::string& l) {
    if (bytes <= 0) return;
    r.comm.push_back({what, bytes, seconds, l});
    r.comm_bytes += bytes;
    r.comm_seconds += seconds;
  };
  const double ga = static_cast<double>(setup.grad_accum);
  const double T = static_cast<double>(r.act.tokens), Tm = static_cast<double>(r.act.moe_tokens);
  const double ab = static_cast<double>(hw.act_bytes);
  const double D = static_cast<double>(c.dim);
  const double blocks = static_cast<double>(c.n_layers + c.n_mtp_layers);
  const double fwd_passes = setup.recompute ? 2.0 : 1.0;
  {  // data parallel gradient synchronisation (once per step)
    struct G {
      Replicas k;
      const char* name;
      double size, stride;
      const char* what;
    };
    const std::vector<G> gs = {{Replicas::Dp, "dp", static_cast<double>(dp), static_cast<double>(tp), ""},
                               {Replicas::World, "world", static_cast<double>(r.world), 1, ", router + shared expert"},
                               {Replicas::Edp, "expert replicas", static_cast<double>(r.edp),
                                static_cast<double>(ep), ", routed experts"}};
    for (const G& g : gs) {
      const double bytes = grad_by_replicas[static_cast<size_t>(g.k)];
      if (g.size <= 1 || bytes <= 0) continue;
      const bool inter = spans_nodes(g.size, g.stride);
      const double part = (g.size - 1) / g.size;
      if (zero1 && !hw.gpu) {  // as built on CPU: all-reduce F32 gradients, owners broadcast their new F32 weights
        const double ar = 2 * part * bytes, bc = part * bytes;
        add(fmt::format("gradient all-reduce over {} {}{} (F32, ring)", g.name, g.size, g.what), ar, ar / bw(inter),
            link(inter));
        add(fmt::format("ZeRO-1 owner broadcasts over {} {}{} (F32)", g.name, g.size, g.what), bc, bc / bw(inter),
            link(inter));
      } else if (zero1) {
        const double rs = part * bytes, agb = part * bytes / 2;  // reduce-scatter F32 grads, all-gather BF16 weights
        add(fmt::format("ZeRO-1 gradient reduce-scatter over {} {}{} (F32)", g.name, g.size, g.what), rs, rs / bw(inter),
            link(inter));
        add(fmt::format("ZeRO-1 weight all-gather over {} {}{} (BF16)", g.name, g.size, g.what), agb, agb / bw(inter),
            link(inter));
      } else {
        const double ar = 2 * part * bytes;
        add(fmt::format("gradient all-reduce over {} {}{} (F32, ring)", g.name, g.size, g.what), ar, ar / bw(inter),
            link(inter));
      }
    }
  }
  if (tp > 1) {  // tensor parallel, per micro-batch
    const double t = static_cast<double>(tp), part = (t - 1) / t;
    const bool inter = spans_nodes(t, 1);
    const double ar_fwd = blocks * 2 * part * T * D * ab + (1 + static_cast<double>(c.n_mtp_layers)) * 2 * part * T * D * ab;
    const double ag_fwd = blocks * part * T * D * ab;
    double csa = 0;
    for (int64_t l = 0; l < c.n_layers + c.n_mtp_layers; ++l)
      if (c.compress_ratio(l) == 4) csa += 2 * part * T * mean_visible(setup.seq_len, 4) * 4;
    // Backward: the attention input gradient [T, D] summed over tp once per block (the replicated projections keep
    // partial gradients, summed with the data-parallel sync), the head's d(hidden) per output head.
    const double ar_bwd = blocks * 2 * part * T * D * ab + (1 + static_cast<double>(c.n_mtp_layers)) * 2 * part * T * D * ab;
    const double ag_bwd = blocks * part * T * D * ab;
    const double fwd = (ar_fwd + ag_fwd + csa) * fwd_passes * ga, bwd = (ar_bwd + ag_bwd) * ga;
    add(fmt::format("TP forward{}: all-reduce wo_b out, embedding [T,D]; all-gather MoE out [T,D]; CSA scores",
                    setup.recompute ? " x2" : ""),
        fwd, fwd / bw(inter), link(inter));
    add("TP backward: all-reduce d(attn in) [T,D], head d(hidden) [T,D]; all-gather d(MoE in) [T,D]", bwd,
        bwd / bw(inter), link(inter));
  }
  if (ep > 1) {  // expert parallel all-to-all, per micro-batch
    const double e = static_cast<double>(ep);
    const double per = Tm * static_cast<double>(c.n_activated_experts) * D * ab * (e - 1) / e;  // one dispatch
    const double count = (2 * fwd_passes + 2) * blocks;  // dispatch + combine, forward (and recompute) and backward
    const double bytes = per * count * ga;
    const double local = std::min(e, gpn);
    const double intra = bytes * (local - 1) / std::max(1.0, e - 1), inter = bytes - intra;
    const double secs = std::max(intra / hw.intra_a2a_bw, inter > 0 ? inter / hw.inter_bw : 0.0);
    add(fmt::format("EP all-to-all over ep {}: dispatch+combine, {} rows x D ({}) per token-layer, fwd{}+bwd",
                    ep, c.n_activated_experts, format_bytes(static_cast<double>(c.n_activated_experts) * D * ab),
                    setup.recompute ? " x2" : ""),
        bytes, secs, e > gpn ? (hw.gpu ? "NVLink+InfiniBand" : "shared memory") : link(false));
  }

  // ---- time ----
  r.flops = model_flops_per_token(c, setup.seq_len);
  const double tokens_rank_group = T * ga;  // tokens of one dp rank's step (shared by its tp ranks)
  r.tokens_per_step = tokens_rank_group * static_cast<double>(dp);
  r.model_flops_rank = r.flops.training() * tokens_rank_group / static_cast<double>(tp);
  const double passes = (lora ? 2.0 : 3.0) + (setup.recompute ? 1.0 : 0.0);  // LoRA: no weight-gradient GEMMs
  r.hw_flops_rank = r.flops.forward * passes * tokens_rank_group / static_cast<double>(tp);
  // train.precision = fp8 on a GPU: the FP8 weight GEMMs (Fprop, Dgrad, Wgrad and the recomputed forward alike) at
  // twice the BF16 rate (Hopper dense FP8 1979 vs BF16 989 TFLOP/s), same efficiency; LoRA runs its frozen base
  // through the storage-precision path, so nothing there changes.
  const bool fp8 = hw.gpu && setup.precision == "fp8" && !lora && r.flops.forward > 0;
  r.fp8_flops_rank = fp8 ? r.hw_flops_rank * (r.flops.fp8_gemm / r.flops.forward) : 0.0;
  r.compute_seconds = (r.hw_flops_rank - r.fp8_flops_rank / 2) / (hw.peak_flops * hw.efficiency);
  r.step_seconds = r.compute_seconds + r.comm_seconds;
  r.step_seconds_overlap = std::max(r.compute_seconds, r.comm_seconds);
  r.tokens_per_second_gpu = r.tokens_per_step / r.step_seconds / static_cast<double>(r.world);
  r.mfu = r.model_flops_rank / r.step_seconds / hw.peak_flops;
  r.hfu = r.hw_flops_rank / r.step_seconds / hw.peak_flops;

  // ---- assumptions ----
  auto& as = r.assumptions;
  as.push_back(fmt::format("{}: {} of memory, {} held back ({}), peak {} dense {}, {:.0f}% of it achieved",
                           hw.name, format_bytes(static_cast<double>(hw.memory_bytes)),
                           format_bytes(static_cast<double>(hw.reserved_bytes)),
                           hw.gpu ? "CUDA context, NCCL buffers, cuBLAS workspace, allocator slack" : "none",
                           flop_rate(hw.peak_flops), hw.gpu ? "BF16" : "FP32 (assumed)", hw.efficiency * 100));
  if (hw.gpu)
    as.push_back(fmt::format("bandwidth per GPU: {:.0f} GB/s collectives inside a node (NVLink 4, 450 GB/s per "
                             "direction), {:.0f} GB/s all-to-all inside a node (DeepEP-class), {:.0f} GB/s across "
                             "nodes (400 Gb/s InfiniBand); {} GPUs per node; ranks ordered tp fastest, then dp; ep "
                             "groups are consecutive ranks",
                             hw.intra_bw / 1e9, hw.intra_a2a_bw / 1e9, hw.inter_bw / 1e9, hw.gpus_per_node));
  as.push_back("step time = compute + communication (no overlap); the overlapped bound max(compute, communication) is "
               "printed next to it");
  if (fp8)
    as.push_back(fmt::format("train.precision fp8: {:.0f}% of the executed FLOPs are FP8 weight GEMMs, counted at twice "
                             "the BF16 rate; MFU stays against the BF16 peak",
                             100 * r.fp8_flops_rank / r.hw_flops_rank));
  else if (setup.precision != "fp32" && !hw.gpu)
    as.push_back(fmt::format("train.precision {}: emulated on the CPU (slower than fp32), not modelled",
                             setup.precision));
  as.push_back(fmt::format("activations {} ({} B per element), statistics and logits F32; balanced routing (every "
                           "expert gets T*K/E rows); one document per sequence (most compressed entries)",
                           hw.gpu ? "BF16" : "F32", hw.act_bytes));
  if (tp > 1)
    as.push_back("tensor parallel: attention heads, o_groups, indexer heads and vocabulary split over tp; the MoE "
                 "(router, shared expert, dispatch) runs on T/tp tokens per rank; mHC streams replicated");
  if (lora)
    as.push_back("LoRA: the base is frozen (no weight gradients: hardware FLOPs = 2 x forward), adapters are F32 "
                 "with F32 gradients; MoE adapter activations are not counted");
  if (setup.zero1)
    as.push_back(hw.gpu ? "ZeRO-1: optimizer states and F32 master weights sharded over the replicas of each tensor (dp; "
                          "world/ep for routed experts) with BF16 working weights (the GPU design; the CPU trainer "
                          "shards the optimizer states only)"
                        : "ZeRO-1 (parallel.zero1): each tensor's optimizer state held by one owner among its replicas "
                          "(dp; world/ep for routed experts); F32 weights on every replica");
  if (setup.recompute)
    as.push_back("per-layer recomputation (train.recompute): each block keeps its input streams and reruns its "
                 "forward in the backward (+1 forward of FLOPs and forward communication)");
  return r;
}

// ---- text ----------------------------------------------------------------------------------------------------------
namespace {

std::string num(double v) {
  if (std::fabs(v) >= 1e12) return fmt::format("{:.3f}T", v / 1e12);
  if (std::fabs(v) >= 1e9) return fmt::format("{:.2f}B", v / 1e9);
  if (std::fabs(v) >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (std::fabs(v) >= 1e3) return fmt::format("{:.1f}K", v / 1e3);
  return fmt::format("{:.0f}", v);
}

std::string seconds(double s) {
  if (s >= 1) return fmt::format("{:.2f} s", s);
  if (s >= 1e-3) return fmt::format("{:.1f} ms", s * 1e3);
  return fmt::format("{:.1f} us", s * 1e6);
}

std::string line(const std::string& label, double bytes, const std::string& note = "") {
  return fmt::format("  {:<44}{:>12}{}{}\n", label, format_bytes(bytes), note.empty() ? "" : "   ", note);
}

}  // namespace

std::string format_plan(const PlanReport& r) {
  const PlanSetup& s = r.setup;
  const ModelConfig& c = s.model;
  std::string o;
  o += fmt::format("dsv4-plan: {} on {}\n", s.source, r.hw.name);
  std::string kinds;
  {
    int64_t swa = 0, csa = 0, hca = 0;
    for (int64_t i = 0; i < c.n_layers; ++i) {
      const AttnKind k = c.attn_kind(i);
      (k == AttnKind::SlidingWindow ? swa : k == AttnKind::CompressedSparse ? csa : hca)++;
    }
    kinds = fmt::format("{} SWA, {} CSA, {} HCA", swa, csa, hca);
  }
  o += fmt::format("model     {}: {} layers ({}) + {} MTP, dim {}, {} heads x {}, {} routed experts (top-{}) x {}, "
                   "vocab {}\n",
                   c.name, c.n_layers, kinds, c.n_mtp_layers, c.dim, c.n_heads, c.head_dim, c.n_routed_experts,
                   c.n_activated_experts, c.moe_inter_dim, c.vocab_size);
  o += fmt::format("          {} parameters incl. MTP ({} active per token)", num(static_cast<double>(r.params_total)),
                   num(r.flops.active_params));
  if (s.checkpoint)
    o += fmt::format("; checkpoint {}: {} on disk", s.checkpoint->str(), format_bytes(static_cast<double>(r.checkpoint_total)));
  o += "\n";
  o += fmt::format("layout    world {} = dp {} x tp {}; ep {}: {} routed experts per rank, each held by world/ep = {} "
                   "rank{}\n",
                   r.world, s.dp, s.tp, s.ep, r.experts_per_rank, r.edp, r.edp == 1 ? "" : "s");
  o += fmt::format("batch     micro_batch {} x seq_len {} = {} tokens per micro-batch per dp rank; grad_accum {}; {} "
                   "tokens per step\n",
                   s.micro_batch, s.seq_len, r.act.tokens, s.grad_accum, num(r.tokens_per_step));
  if (s.lora.enabled) {
    std::string targets;
    for (const auto& t : s.lora.targets) targets += (targets.empty() ? "" : ", ") + t;
    o += fmt::format("training  LoRA r={} alpha {} on [{}]: {} adapters, {} trainable parameters ({} on this rank); "
                     "base frozen{}; optimizer {}\n",
                     s.lora.rank, s.lora.alpha, targets, r.lora_adapters, num(static_cast<double>(r.lora_params_total)),
                     num(static_cast<double>(r.lora_params_rank)),
                     s.checkpoint ? " in the checkpoint's precision" : " (F32)", s.optimizer);
  } else {
    o += fmt::format("training  full: {} trainable parameters ({} on this rank), F32 masters{}; optimizer {}{}\n",
                     num(static_cast<double>(r.trainable_total)), num(static_cast<double>(r.trainable_rank)),
                     s.checkpoint ? " (from the checkpoint)" : " (from scratch)",
                     s.optimizer == "muon" ? "Muon (matrices) + AdamW (the rest)" : "AdamW",
                     s.zero1 ? ", ZeRO-1" : "");
  }
  o += fmt::format("target    {}\n", r.hw.description);

  o += "\nMemory per rank (every rank holds the same amounts under this layout)\n";
  o += line("weights", static_cast<double>(r.weights));
  for (int k = 0; k < kWeightClasses; ++k)
    if (r.weight_bytes[static_cast<size_t>(k)] > 0)
      o += line(fmt::format("  {}", weight_class_name(static_cast<WeightClass>(k))),
                static_cast<double>(r.weight_bytes[static_cast<size_t>(k)]),
                k == static_cast<int>(WeightClass::F32) && r.master_shard > 0
                    ? fmt::format("incl. ZeRO-1 F32 master shard {}", format_bytes(static_cast<double>(r.master_shard)))
                    : "");
  o += line("gradients (F32)", static_cast<double>(r.grads), s.lora.enabled ? "base frozen" : "");
  o += line("optimizer state", static_cast<double>(r.optimizer),
            fmt::format("Muon momentum {}, AdamW moments {}", format_bytes(static_cast<double>(r.opt_muon)),
                        format_bytes(static_cast<double>(r.opt_adamw))));
  if (!s.lora.enabled && r.hw.gpu && s.dp * s.tp > 1)
    o += line(s.zero1 ? "  (without ZeRO-1)" : "  (with ZeRO-1: parallel.zero1=true)",
              static_cast<double>(s.zero1 ? r.optimizer_unsharded : r.optimizer_zero1));
  if (s.lora.enabled) {
    o += line("LoRA adapters (F32)", static_cast<double>(r.lora_weights));
    o += line("LoRA gradients (F32)", static_cast<double>(r.lora_grads));
    o += line("LoRA optimizer state", static_cast<double>(r.lora_optimizer));
  }
  o += line("activations, no recomputation", static_cast<double>(r.act.total), s.recompute ? "" : "<- used");
  o += line("activations, per-layer recomputation", static_cast<double>(r.act.recompute_total),
            s.recompute ? "<- used (train.recompute)" : "(train.recompute=true)");
  if (r.reserved > 0) o += line("reserved", static_cast<double>(r.reserved));
  o += line("total", static_cast<double>(r.total));
  if (r.capacity > 0) {
    o += fmt::format("  verdict: {} ({} of {}, {:.0f}%); biggest consumer: {}\n",
                     r.fits ? "FITS" : "DOES NOT FIT", format_bytes(static_cast<double>(r.total)),
                     format_bytes(static_cast<double>(r.capacity)),
                     100.0 * static_cast<double>(r.total) / static_cast<double>(r.capacity), r.biggest);
  } else {
    o += fmt::format("  verdict: no memory size given; biggest consumer: {}\n", r.biggest);
  }

  const ActivationEstimate& a = r.act;
  o += fmt::format("\nActivations of one micro-batch ({} tokens; MoE on {} tokens per rank)\n", a.tokens, a.moe_tokens);
  {
    std::map<std::string, std::pair<int, ActivationEstimate::Layer>> by_kind;
    std::vector<std::string> order;
    for (const auto& l : a.layers) {
      if (!by_kind.count(l.kind)) order.push_back(l.kind);
      auto& e = by_kind[l.kind];
      e.first++;
      e.second = l;
    }
    for (const auto& k : order) {
      const auto& [count, l] = by_kind[k];
      o += line(fmt::format("{} x {} block", count, k), static_cast<double>(l.saved) * count,
                fmt::format("{} per block, {} per token", format_bytes(static_cast<double>(l.saved)),
                            format_bytes(static_cast<double>(l.saved) / static_cast<double>(a.tokens))));
    }
  }
  o += line("streams, head, MTP extras, ids", static_cast<double>(a.saved_other));
  o += line("logits (F32)", static_cast<double>(a.logits));
  o += line("loss gradients (F32)", static_cast<double>(a.loss_grads));
  o += line("backward working set (largest)", static_cast<double>(a.transient));
  o += line("with recomputation: stream checkpoints", static_cast<double>(a.checkpoints));

  o += "\nCommunication per step (bytes sent per rank)\n";
  if (r.comm.empty()) o += "  none (one rank)\n";
  for (const CommItem& ci : r.comm)
    o += fmt::format("  {:<86}{:>11} {:>9}  {}\n", ci.what, format_bytes(ci.bytes), seconds(ci.seconds), ci.link);
  if (!r.comm.empty())
    o += fmt::format("  {:<86}{:>11} {:>9}\n", "total", format_bytes(r.comm_bytes), seconds(r.comm_seconds));

  o += "\nStep time estimate\n";
  o += fmt::format("  model FLOPs per token {} (3 x forward {}; {} active parameters, {:.1f} mean visible keys)\n",
                   num(r.flops.training()), num(r.flops.forward), num(r.flops.active_params), r.flops.mean_visible_keys);
  o += fmt::format("  per rank per step: {} model FLOPs, {} executed{}\n", num(r.model_flops_rank), num(r.hw_flops_rank),
                   s.lora.enabled ? " (no weight gradients of the frozen base)" : s.recompute ? " (+1 forward)" : "");
  o += fmt::format("  compute {} at {:.0f}% of {}; communication {}; step {} (overlapped: {})\n",
                   seconds(r.compute_seconds), r.hw.efficiency * 100, flop_rate(r.hw.peak_flops), seconds(r.comm_seconds),
                   seconds(r.step_seconds), seconds(r.step_seconds_overlap));
  o += fmt::format("  => {:.0f} tokens/s per {}, {:.0f} tokens/s in all; MFU {:.1f}% (model FLOPs, 3 x forward), "
                   "executed {:.1f}% of peak\n",
                   r.tokens_per_second_gpu, r.hw.gpu ? "GPU" : "rank", r.tokens_per_second_gpu * static_cast<double>(r.world), r.mfu * 100,
                   r.hfu * 100);

  o += "\nAssumptions\n";
  for (const std::string& x : r.assumptions) o += "  - " + x + "\n";
  return o;
}

std::string plan_json(const PlanReport& r) {
  using json = nlohmann::ordered_json;
  const PlanSetup& s = r.setup;
  json weights = json::object(), ckpt = json::object();
  for (int k = 0; k < kWeightClasses; ++k) {
    weights[std::string(weight_class_name(static_cast<WeightClass>(k)))] = r.weight_bytes[static_cast<size_t>(k)];
    ckpt[std::string(weight_class_name(static_cast<WeightClass>(k)))] = r.checkpoint_bytes[static_cast<size_t>(k)];
  }
  json layers = json::array();
  for (const auto& l : r.act.layers) layers.push_back({{"kind", l.kind}, {"saved", l.saved}, {"transient", l.transient}});
  json comm = json::array();
  for (const CommItem& c : r.comm) comm.push_back({{"what", c.what}, {"bytes", c.bytes}, {"seconds", c.seconds}, {"link", c.link}});
  json j = {
      {"source", s.source},
      {"target", r.hw.name},
      {"model", s.model.name},
      {"checkpoint_format", s.checkpoint ? s.checkpoint->name : ""},
      {"layout", {{"world", r.world}, {"dp", s.dp}, {"tp", s.tp}, {"ep", s.ep}, {"expert_replicas", r.edp},
                  {"experts_per_rank", r.experts_per_rank}}},
      {"batch", {{"seq_len", s.seq_len}, {"micro_batch", s.micro_batch}, {"grad_accum", s.grad_accum},
                 {"tokens_per_micro_batch", r.act.tokens}, {"tokens_per_step", r.tokens_per_step}}},
      {"params", {{"total", r.params_total}, {"rank", r.params_rank}, {"trainable_total", r.trainable_total},
                  {"trainable_rank", r.trainable_rank}}},
      {"checkpoint_bytes", ckpt},
      {"checkpoint_total", r.checkpoint_total},
      {"lora", {{"enabled", s.lora.enabled}, {"adapters", r.lora_adapters}, {"params_total", r.lora_params_total},
                {"params_rank", r.lora_params_rank}}},
      {"memory", {{"weights", r.weights}, {"weights_by_class", weights}, {"master_shard", r.master_shard},
                  {"gradients", r.grads}, {"optimizer", r.optimizer}, {"optimizer_muon", r.opt_muon},
                  {"optimizer_adamw", r.opt_adamw}, {"optimizer_unsharded", r.optimizer_unsharded},
                  {"optimizer_zero1", r.optimizer_zero1}, {"lora_weights", r.lora_weights},
                  {"lora_gradients", r.lora_grads}, {"lora_optimizer", r.lora_optimizer},
                  {"activations", r.activations}, {"activations_no_recompute", r.act.total},
                  {"activations_recompute", r.act.recompute_total}, {"reserved", r.reserved}, {"total", r.total},
                  {"capacity", r.capacity}, {"fits", r.fits}, {"biggest", r.biggest}}},
      {"activations", {{"tokens", r.act.tokens}, {"moe_tokens", r.act.moe_tokens}, {"layers", layers},
                       {"saved_layers", r.act.saved_layers}, {"saved_other", r.act.saved_other},
                       {"logits", r.act.logits}, {"loss_grads", r.act.loss_grads}, {"transient", r.act.transient},
                       {"checkpoints", r.act.checkpoints}}},
      {"communication", {{"items", comm}, {"bytes", r.comm_bytes}, {"seconds", r.comm_seconds}}},
      {"time", {{"flops_per_token_training", r.flops.training()}, {"flops_per_token_forward", r.flops.forward},
                {"active_params", r.flops.active_params}, {"model_flops_rank", r.model_flops_rank},
                {"hw_flops_rank", r.hw_flops_rank}, {"fp8_flops_rank", r.fp8_flops_rank},
                {"compute_seconds", r.compute_seconds},
                {"step_seconds", r.step_seconds}, {"step_seconds_overlapped", r.step_seconds_overlap},
                {"tokens_per_second_gpu", r.tokens_per_second_gpu}, {"mfu", r.mfu}, {"hfu", r.hfu}}},
      {"assumptions", r.assumptions},
  };
  return j.dump(2) + "\n";
}

}  // namespace dsv4
