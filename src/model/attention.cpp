// DeepSeek-V4 attention, forward and backward (see attention.h for the math).
//
// Official inference code (model.py / kernel.py of the release) vs the Hugging Face port, and what we do:
//  * KV FP8 fake-quant of the non-rope dims (raw and compressed KV), indexer Hadamard + FP4 fake-quant and
//    BF16 index scores: official only (and the release kernel's FP8 cast was a no-op, fixed later).
//    Behind AttentionOptions::simulate_release_quant, OFF by default (HF = our FP32 oracle has none).
//  * Index score: HF relu(q.k) * cI^-0.5 then * (weights_proj(x) * nI^-0.5), summed over heads; official
//    folds cI^-0.5 into the weights. Same value up to rounding; we follow HF's order.
//  * Softmax with sink: HF concatenates the sink logit and subtracts the max over [logits, sink]; the official
//    kernel keeps a running max over the logits only and adds exp(sink - max) at the end. Same math.
//  * Compressed entry position: both use i * m (the block's first token), RoPE after the entry's RMSNorm.
//  * Top-k ties: torch.topk leaves them unspecified; we take the lower entry id.
//  * Everything else (per-head unweighted q norm, K = V, inverse RoPE of o at the query position, grouped
//    wo_a, window i - w < j <= i, entry visibility e < (t+1) // m, overlap layout of ratio 4) is identical.
// Packed documents (not modelled by either): positions restart at each document, windows and compressed
// blocks never cross a document boundary, and each document is compressed on its own.
#include "model/attention.h"

#include <cmath>
#include <deque>
#include <mutex>

#include "model/exec_path.h"
#include "model/quant_sim.h"
#include "runtime/cpu_blas.h"
#include "runtime/model_ops.h"
#include "runtime/ops.h"

namespace dsv4 {

namespace {

// Device candidate lists of the layers whose lists follow from the layout alone (sliding window, and HCA: every
// visible entry): every such layer of a step, and every step with the same document layout, has the same lists, so
// they are built (host work while the GPU waits, then an upload) once per (positions, window, ratio, transpose,
// device). The few most recent are kept; the tensors are read-only once built. Leaked on purpose: the device
// allocator may be gone when static destructors run.
class LayoutIndexCache {
 public:
  SparseAttnDeviceIndex get(const SparseAttnIndex& idx, const std::vector<int64_t>& pos, int64_t window, int64_t ratio,
                            int64_t n_raw, int64_t n_comp, Device device, SparseAttnKeyMajor key_major) {
    if (device.is_cpu()) return SparseAttnDeviceIndex::build(idx, n_raw, n_comp, device, key_major);  // nothing to build
    std::lock_guard<std::mutex> lock(mu_);
    for (const Entry& e : entries_)
      if (e.window == window && e.ratio == ratio && e.n_comp == n_comp && e.device == device &&
          e.key_major == key_major && e.pos == pos)
        return e.index;
    if (entries_.size() == kEntries) entries_.pop_front();
    entries_.push_back({pos, window, ratio, n_comp, device, key_major,
                        SparseAttnDeviceIndex::build(idx, n_raw, n_comp, device, key_major)});
    return entries_.back().index;
  }

 private:
  static constexpr size_t kEntries = 8;
  struct Entry {
    std::vector<int64_t> pos;
    int64_t window, ratio, n_comp;
    Device device;
    SparseAttnKeyMajor key_major;
    SparseAttnDeviceIndex index;
  };
  std::mutex mu_;
  std::deque<Entry> entries_;
};

LayoutIndexCache& layout_index_cache() {
  static auto* cache = new LayoutIndexCache;
  return *cache;
}

std::vector<int64_t> per_head(const std::vector<int64_t>& pos, int64_t H) {
  std::vector<int64_t> out(pos.size() * static_cast<size_t>(H));
  for (size_t t = 0; t < pos.size(); ++t)
    for (int64_t h = 0; h < H; ++h) out[t * static_cast<size_t>(H) + static_cast<size_t>(h)] = pos[t];
  return out;
}

void add_into(Tensor& acc, const Tensor& x) {
  float* a = acc.data<float>();
  const float* b = x.data<float>();
  for (int64_t i = 0; i < acc.numel(); ++i) a[i] += b[i];
}
}  // namespace

Attention::Attention(std::string prefix, const ModelConfig& cfg, int64_t layer, AttentionOptions opts)
    : prefix_(std::move(prefix)), kind_(cfg.attn_kind(layer)), ratio_(cfg.compress_ratio(layer)), dim_(cfg.dim),
      heads_(cfg.n_heads), head_dim_(cfg.head_dim), rope_dim_(cfg.rope_head_dim), groups_(cfg.o_groups),
      o_lora_(cfg.o_lora_rank), window_(cfg.window_size), index_topk_(cfg.index_topk), eps_(cfg.norm_eps),
      ue8m0_(cfg.scale_fmt == "ue8m0"), opts_(opts), rope_(RopeTable::for_ratio(cfg, ratio_)) {
  DSV4_CHECK(heads_ > 0 && groups_ > 0 && heads_ % groups_ == 0, "Attention {}: n_heads {} not divisible by o_groups {}",
             prefix_, heads_, groups_);
  DSV4_CHECK(rope_dim_ > 0 && rope_dim_ % 2 == 0 && rope_dim_ <= head_dim_,
             "Attention {}: rope dim {} must be even and <= head_dim {}", prefix_, rope_dim_, head_dim_);
  DSV4_CHECK(window_ > 0, "Attention {}: window_size {} must be positive", prefix_, window_);
  const int64_t tp = opts_.parallel ? opts_.parallel->tp_size() : 1;
  const int64_t H = heads_, G = groups_;  // global counts
  if (tp > 1) {
    DSV4_CHECK(H % tp == 0, "Attention {}: config 'n_heads' = {} is not divisible by the tensor-parallel degree tp = {}",
               prefix_, H, tp);
    DSV4_CHECK(G % tp == 0, "Attention {}: config 'o_groups' = {} is not divisible by the tensor-parallel degree tp = {}",
               prefix_, G, tp);
    DSV4_CHECK(ratio_ != 4 || cfg.index_n_heads % tp == 0,
               "Attention {}: config 'index_n_heads' = {} is not divisible by the tensor-parallel degree tp = {}",
               prefix_, cfg.index_n_heads, tp);
    const int64_t r = opts_.parallel->tp_rank();
    tp_ = opts_.parallel->tp();
    heads_ = H / tp;
    groups_ = G / tp;
    head0_ = r * heads_;
    group0_ = r * groups_;
  }
  const int64_t HC = heads_ * head_dim_;  // this rank's heads
  const int64_t K = H * head_dim_ / G;    // wo_a's input width (one group's heads)
  wq_a = Linear(prefix_ + "wq_a.weight", dim_, cfg.q_lora_rank);
  q_norm = RMSNorm(prefix_ + "q_norm.weight", cfg.q_lora_rank, eps_);
  wq_b = Linear(prefix_ + "wq_b.weight", cfg.q_lora_rank, HC);
  wkv = Linear(prefix_ + "wkv.weight", dim_, head_dim_);
  kv_norm = RMSNorm(prefix_ + "kv_norm.weight", head_dim_, eps_);
  if (DeferredWeightStorage::active())  // a loader fills it (as a Param or frozen)
    wo_a.name = prefix_ + "wo_a.weight";
  else
    wo_a = Param(prefix_ + "wo_a.weight", Shape{groups_ * o_lora_, K});
  wo_b = Linear(prefix_ + "wo_b.weight", groups_ * o_lora_, dim_);
  attn_sink = Param(prefix_ + "attn_sink", Shape{heads_});
  if (ratio_ > 0)
    compressor = Compressor(prefix_ + "compressor.", cfg, ratio_, head_dim_, /*rotate=*/false,
                            opts_.simulate_release_quant);
  if (ratio_ == 4) {
    DSV4_CHECK(cfg.index_head_dim >= rope_dim_ && cfg.index_n_heads > 0 && cfg.index_topk > 0,
               "Attention {}: bad indexer shape (heads {}, head dim {}, topk {})", prefix_, cfg.index_n_heads,
               cfg.index_head_dim, cfg.index_topk);
    indexer = Indexer(prefix_ + "indexer.", cfg, opts_.simulate_release_quant, opts_.parallel);
  }
  if (tp > 1) {
    wq_b.weight.set_tp_split(0, head0_ * head_dim_, H * head_dim_);
    attn_sink.set_tp_split(0, head0_, H);
    wo_a.set_tp_split(0, group0_ * o_lora_, G * o_lora_);
    wo_b.weight.set_tp_split(1, group0_ * o_lora_, G * o_lora_);
    wo_b.set_row_parallel(tp_, opts_.parallel->tp_rank() == 0);
    auto partial = [](Param& p) { p.placement = Placement::TpPartial; };
    wq_a.visit(partial);
    q_norm.visit(partial);
    wkv.visit(partial);
    kv_norm.visit(partial);
    if (ratio_ > 0) compressor.visit(partial);
  }
}

void Attention::place_adapters() {
  if (!tp_) return;
  const int64_t tp = opts_.parallel->tp_size();
  auto partial = [](LoraAdapter& ad) {
    ad.A.placement = Placement::TpPartial;
    ad.B.placement = Placement::TpPartial;
  };
  if (wq_a.lora) partial(*wq_a.lora);
  if (wkv.lora) partial(*wkv.lora);
  if (ratio_ > 0) {
    if (compressor.wkv.lora) partial(*compressor.wkv.lora);
    if (compressor.wgate.lora) partial(*compressor.wgate.lora);
  }
  if (wq_b.lora) {
    wq_b.lora->A.placement = Placement::TpPartial;
    wq_b.lora->B.set_tp_split(0, head0_ * head_dim_, heads_ * tp * head_dim_);
  }
  if (wo_b.lora) {
    wo_b.lora->A.set_tp_split(1, group0_ * o_lora_, groups_ * tp * o_lora_);
    wo_b.lora->B.placement = Placement::Replicated;
  }
  for (auto& g : wo_a_lora.groups)  // per-group adapters live only on the tp rank holding their group
    if (g) {
      g->A.placement = Placement::TpLocal;
      g->B.placement = Placement::TpLocal;
    }
  if (wo_a_lora.shared) {
    wo_a_lora.shared->A.placement = Placement::TpPartial;
    wo_a_lora.shared->B.set_tp_split(0, group0_ * o_lora_, groups_ * tp * o_lora_);
  }
  if (ratio_ == 4) {
    const int64_t nI = indexer.local_heads(), cI = indexer.head_dim(), i0 = opts_.parallel->tp_rank() * nI;
    if (indexer.wq_b.lora) indexer.wq_b.lora->B.set_tp_split(0, i0 * cI, nI * tp * cI);
    if (indexer.weights_proj.lora) indexer.weights_proj.lora->B.set_tp_split(0, i0, nI * tp);
  }
}

void Attention::visit(const ParamVisitor& f) {
  wq_a.visit(f);
  q_norm.visit(f);
  wq_b.visit(f);
  wkv.visit(f);
  kv_norm.visit(f);
  if (!wo_a_frozen.defined()) f(wo_a);
  wo_a_lora.visit(f);
  wo_b.visit(f);
  f(attn_sink);
  if (ratio_ > 0) compressor.visit(f);
  if (ratio_ == 4) indexer.visit(f);
}

void Attention::set_wo_a_frozen(QuantizedWeight w) {
  w.validate(wo_a.name);
  DSV4_CHECK(w.rows() == groups_ * o_lora_ && w.cols() == wo_a_in(), "{}: frozen weight {} does not match [{}, {}]",
             wo_a.name, w.str(), groups_ * o_lora_, wo_a_in());
  wo_a_frozen = std::move(w);
  wo_a.value = Tensor();
  wo_a.grad = Tensor();
  wo_a.trainable = false;
}

LoraAdapter* Attention::wo_a_group_adapter(int64_t g) {
  if (wo_a_lora.shared) return &*wo_a_lora.shared;
  if (static_cast<size_t>(g) < wo_a_lora.groups.size() && wo_a_lora.groups[static_cast<size_t>(g)])
    return &*wo_a_lora.groups[static_cast<size_t>(g)];
  return nullptr;
}

const LoraAdapter* Attention::wo_a_group_adapter(int64_t g) const {
  return const_cast<Attention*>(this)->wo_a_group_adapter(g);
}

uint64_t Attention::wo_a_lora_offset(int64_t g, int64_t T) const {
  return wo_a_lora.shared ? static_cast<uint64_t>((group0_ + g) * T * wo_a_in()) : 0;
}

void Attention::check_wo_a_lora() const {
  const int64_t G = groups_, R = o_lora_, K = wo_a_in();
  bool any_group = false;
  for (const auto& g : wo_a_lora.groups) any_group = any_group || g.has_value();
  DSV4_CHECK(!(wo_a_lora.shared && any_group), "Attention {}: wo_a has both a shared-A adapter and per-group adapters",
             prefix_);
  DSV4_CHECK(wo_a_lora.groups.empty() || wo_a_lora.groups.size() == static_cast<size_t>(G),
             "Attention {}: {} per-group wo_a adapter slots for {} groups", prefix_, wo_a_lora.groups.size(), G);
  auto check = [&](const LoraAdapter& ad, int64_t out) {
    DSV4_CHECK(ad.in_features() == K && ad.out_features() == out,
               "Attention {}: wo_a adapter {} is A {}, B {}; expected A [r, {}], B [{}, r]", prefix_, ad.unit,
               ad.A.value.str(), ad.B.value.str(), K, out);
  };
  if (wo_a_lora.shared) check(*wo_a_lora.shared, G * R);
  for (const auto& g : wo_a_lora.groups)
    if (g) check(*g, R);
}

SparseAttnIndex Attention::build_index(const Tensor& x_TD, const Tensor& qr_TQ, const SeqLayout& layout,
                                       const std::vector<int64_t>& pos, const CompressPlan& plan,
                                       Tensor* comp_ids_device, bool host_ids) const {
  const int64_t T = layout.tokens();
  SparseAttnIndex idx;
  idx.win_begin.resize(static_cast<size_t>(T));
  idx.win_end.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t doc0 = t - pos[static_cast<size_t>(t)];  // global index of t's document start
    idx.win_begin[static_cast<size_t>(t)] = std::max(t - window_ + 1, doc0);
    idx.win_end[static_cast<size_t>(t)] = t + 1;
  }
  if (ratio_ == 4 && use_ops_path(x_TD)) {
    indexer.select_topk_ops(x_TD, qr_TQ, pos, plan, rope_, index_topk_, idx.comp_offsets, idx.comp_ids,
                            comp_ids_device, host_ids);
    idx.comp_ids_on_device = !host_ids && comp_ids_device && comp_ids_device->defined();
  } else if (ratio_ == 4) {
    const IndexScores s = indexer.scores(x_TD, qr_TQ, pos, plan, rope_);
    Indexer::select_topk(s, plan, index_topk_, idx.comp_offsets, idx.comp_ids);
  } else {
    idx.comp_offsets.assign(static_cast<size_t>(T + 1), 0);
    for (int64_t t = 0; t < T; ++t) {
      if (ratio_ > 0) {
        const int64_t fe = plan.first_entry[static_cast<size_t>(t)];
        for (int64_t e = 0; e < plan.n_visible[static_cast<size_t>(t)]; ++e) idx.comp_ids.push_back(fe + e);
      }
      idx.comp_offsets[static_cast<size_t>(t + 1)] = static_cast<int64_t>(idx.comp_ids.size());
    }
  }
  return idx;
}

int64_t Attention::compress_and_index(const Tensor& x_TD, const Tensor& qr_TQ, const SeqLayout& layout,
                                      AttentionCtx& c, bool keep_ctx, bool host_ids) const {
  if (ratio_ > 0) {
    c.plan = CompressPlan::build(layout, ratio_);
    c.ckv = compressor.forward(x_TD, c.plan, rope_, keep_ctx ? &c.compressor : nullptr);
  } else {
    c.plan = CompressPlan{};
    c.ckv = Tensor();
  }
  c.index = build_index(x_TD, qr_TQ, layout, c.pos, c.plan, &c.comp_ids_device, host_ids);
  const int64_t E = ratio_ > 0 ? c.plan.entries() : 0;
  c.index.validate(layout.tokens(), E);
  return E;
}

Tensor Attention::forward(const Tensor& x_TD, const SeqLayout& layout, AttentionCtx* ctx) const {
  if (use_ops_path(x_TD)) return forward_ops(x_TD, layout, ctx);
  if (ctx) ctx->ops_path = false;
  layout.validate("Attention.forward");
  const int64_t T = layout.tokens(), H = heads_, C = head_dim_, HC = H * C, G = groups_, R = o_lora_;
  DSV4_CHECK(x_TD.dtype() == DType::F32 && x_TD.ndim() == 2 && x_TD.size(0) == T && x_TD.size(1) == dim_ &&
                 x_TD.is_contiguous() && x_TD.device().is_cpu(),
             "Attention {}: input {} does not match [{} tokens, {}] (contiguous CPU F32)", prefix_, x_TD.str(), T, dim_);
  AttentionCtx local;
  AttentionCtx& c = ctx ? *ctx : local;
  c.pos.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) c.pos[static_cast<size_t>(t)] = layout.position(t);
  const std::vector<int64_t> head_pos = per_head(c.pos, H);

  // Queries: low-rank, per-head unweighted RMSNorm, RoPE on the last rope dims.
  const Tensor qr = q_norm.forward(wq_a.forward(x_TD, &c.wq_a), &c.q_norm);
  c.q_raw = wq_b.forward(qr, &c.wq_b);
  c.q = Tensor::empty({T, H, C}, DType::F32);
  c.q_rstd = Tensor::empty({T * H}, DType::F32);
  rmsnorm_forward_rows<float>(c.q_raw.data<float>(), nullptr, c.q.data<float>(), c.q_rstd.data<float>(), T * H, C, eps_);
  rope_rows<float>(c.q.data<float>(), T * H, C, C, head_pos.data(), rope_, false);

  // Shared K = V head.
  c.kv = kv_norm.forward(wkv.forward(x_TD, &c.wkv), &c.kv_norm);
  rope_rows<float>(c.kv.data<float>(), T, C, C, c.pos.data(), rope_, false);
  if (opts_.simulate_release_quant) fp8_block_fake_quant_rows(c.kv.data<float>(), T, C - rope_dim_, C, 64, ue8m0_);

  // Compressed entries and the candidate lists.
  const int64_t E = compress_and_index(x_TD, qr, layout, c, ctx != nullptr);

  // Core attention with sink, then the inverse RoPE at the query position.
  c.o = Tensor::empty({T, H, C}, DType::F32);
  c.lse = Tensor::empty({T, H}, DType::F32);
  const float scale = static_cast<float>(std::pow(static_cast<double>(C), -0.5));
  sparse_attn_forward<float>(c.index, c.q.data<float>(), c.kv.data<float>(), E ? c.ckv.data<float>() : nullptr,
                             attn_sink.value.data<float>(), H, C, scale, c.o.data<float>(), c.lse.data<float>());
  c.o_rot = c.o.clone().view({T, HC});
  rope_rows<float>(c.o_rot.data<float>(), T * H, C, C, head_pos.data(), rope_, true);

  // Grouped low-rank output: y[:, g] = o[:, g] @ wo_a_g^T, then wo_b.
  const int64_t K = HC / G;
  Tensor y = Tensor::empty({T, G * R}, DType::F32);
  DSV4_CHECK(wo_a_frozen.defined() || wo_a.value.defined(),
             "Attention {}: {} has no storage (built under DeferredWeightStorage and never loaded)", prefix_, wo_a.name);
  for (int64_t g = 0; g < G; ++g) {
    if (wo_a_frozen.defined())
      qgemm_xwT(wo_a_frozen, T, c.o_rot.data<float>() + g * K, HC, 0.0f, y.data<float>() + g * R, G * R, g * R,
                (g + 1) * R);
    else
      pgemm_xwT_rows(wo_a_precision_, T, K, R, c.o_rot.data<float>() + g * K, HC, wo_a.value.data<float>() + g * R * K,
                     0.0f, y.data<float>() + g * R, G * R);
  }
  if (!wo_a_lora.empty()) {
    // y_g += s B_g (A_g drop(o_g)): per group its own adapter; shared A: one adapter, B's rows [g*R, (g+1)*R).
    check_wo_a_lora();
    c.wo_a_lora_z.assign(static_cast<size_t>(G), Tensor());
    c.wo_a_lora_draws.assign(static_cast<size_t>(G), 0);
    const uint64_t shared_draw = wo_a_lora.shared ? wo_a_lora.shared->next_draw() : 0;
    for (int64_t g = 0; g < G; ++g) {
      const LoraAdapter* ad = wo_a_lora.shared ? &*wo_a_lora.shared : nullptr;
      if (!ad && wo_a_lora.groups[static_cast<size_t>(g)]) ad = &*wo_a_lora.groups[static_cast<size_t>(g)];
      if (!ad) continue;
      const uint64_t draw = wo_a_lora.shared ? shared_draw : ad->next_draw();
      const uint64_t offset = wo_a_lora.shared ? static_cast<uint64_t>((group0_ + g) * T * K) : 0;
      Tensor z = Tensor::empty({T, ad->rank()}, DType::F32);
      lora_down(*ad, T, c.o_rot.data<float>() + g * K, HC, draw, offset, z.data<float>());
      lora_up(*ad, T, z.data<float>(), wo_a_lora.shared ? g * R : 0, R, y.data<float>() + g * R, G * R);
      c.wo_a_lora_z[static_cast<size_t>(g)] = z;
      c.wo_a_lora_draws[static_cast<size_t>(g)] = draw;
    }
  }
  Tensor out = wo_b.forward(y, &c.wo_b);
  if (tp_) group_sum(tp_, out);  // row-parallel wo_b: each tp rank holds a partial sum over its groups
  return out;
}

Tensor Attention::backward(const Tensor& dout_TD, const AttentionCtx& c) {
  DSV4_CHECK(c.q.defined() && c.o_rot.defined(), "Attention {}: backward without a forward context", prefix_);
  if (c.ops_path) return backward_ops(dout_TD, c);
  const int64_t T = c.q.size(0), H = heads_, C = head_dim_, HC = H * C, G = groups_, R = o_lora_, K = HC / G;
  DSV4_CHECK(dout_TD.ndim() == 2 && dout_TD.size(0) == T && dout_TD.size(1) == dim_,
             "Attention {}: backward gradient {} does not match [{}, {}]", prefix_, dout_TD.str(), T, dim_);
  const std::vector<int64_t> head_pos = per_head(c.pos, H);

  // Output projections.
  const Tensor dy = wo_b.backward(dout_TD.contiguous(), c.wo_b);  // [T, G*R]
  Tensor d_o = Tensor::empty({T, H, C}, DType::F32);
  for (int64_t g = 0; g < G; ++g) {
    if (wo_a_frozen.defined()) {
      qgemm_dyW(wo_a_frozen, T, dy.data<float>() + g * R, G * R, 0.0f, d_o.data<float>() + g * K, HC, g * R,
                (g + 1) * R);
      continue;
    }
    pgemm_dyW_rows(wo_a_precision_, T, K, R, dy.data<float>() + g * R, G * R, wo_a.value.data<float>() + g * R * K,
                   0.0f, d_o.data<float>() + g * K, HC);
    if (wo_a.trainable)
      pgemm_dW_rows(wo_a_precision_, T, K, R, dy.data<float>() + g * R, G * R, c.o_rot.data<float>() + g * K, HC,
                    wo_a.grad_buffer().data<float>() + g * R * K);
  }
  if (!wo_a_lora.empty()) {
    check_wo_a_lora();
    DSV4_CHECK(c.wo_a_lora_z.size() == static_cast<size_t>(G),
               "Attention {}: backward through the wo_a adapters without their forward context", prefix_);
    for (int64_t g = 0; g < G; ++g) {
      LoraAdapter* ad = wo_a_lora.shared ? &*wo_a_lora.shared : nullptr;
      if (!ad && wo_a_lora.groups[static_cast<size_t>(g)]) ad = &*wo_a_lora.groups[static_cast<size_t>(g)];
      if (!ad) continue;
      const Tensor& z = c.wo_a_lora_z[static_cast<size_t>(g)];
      DSV4_CHECK(z.defined() && z.size(0) == T && z.size(1) == ad->rank(),
                 "Attention {}: backward through adapter {} without its forward context", prefix_, ad->unit);
      const uint64_t draw = c.wo_a_lora_draws[static_cast<size_t>(g)];
      const uint64_t offset = wo_a_lora.shared ? static_cast<uint64_t>((group0_ + g) * T * K) : 0;
      std::vector<float> dz(static_cast<size_t>(T * ad->rank()), 0.0f);
      lora_up_backward(*ad, T, dy.data<float>() + g * R, G * R, z.data<float>(), wo_a_lora.shared ? g * R : 0, R,
                       dz.data());
      lora_down_backward(*ad, T, dz.data(), c.o_rot.data<float>() + g * K, HC, draw, offset,
                         d_o.data<float>() + g * K, HC);
    }
  }
  rope_rows<float>(d_o.data<float>(), T * H, C, C, head_pos.data(), rope_, false);  // backward of the inverse

  // Core attention.
  const int64_t E = ratio_ > 0 ? c.plan.entries() : 0;
  Tensor dq = Tensor::empty({T, H, C}, DType::F32);
  Tensor dkv = Tensor::zeros({T, C}, DType::F32);
  Tensor dckv = Tensor::zeros({E, C}, DType::F32);
  std::vector<float> dsink(static_cast<size_t>(H), 0.0f);
  const float scale = static_cast<float>(std::pow(static_cast<double>(C), -0.5));
  sparse_attn_backward<float>(c.index, c.q.data<float>(), c.kv.data<float>(), E ? c.ckv.data<float>() : nullptr,
                              attn_sink.value.data<float>(), c.o.data<float>(), c.lse.data<float>(),
                              d_o.data<float>(), H, C, scale, dq.data<float>(), dkv.data<float>(),
                              E ? dckv.data<float>() : nullptr, dsink.data());
  if (attn_sink.trainable) {
    float* g = attn_sink.grad_buffer().data<float>();
    for (int64_t h = 0; h < H; ++h) g[h] += dsink[static_cast<size_t>(h)];
  }

  // Compressed entries (the indexer contributes nothing: its selection is not differentiable).
  Tensor dx = E > 0 ? compressor.backward(dckv, c.plan, rope_, c.compressor) : Tensor::zeros({T, dim_}, DType::F32);
  if (ratio_ > 0 && E == 0)  // no complete block anywhere: the compressor's gradients are zero, but defined
    compressor.visit([](Param& p) {
      if (p.trainable) p.grad_buffer();
    });

  // KV path (straight through the FP8 fake-quant when simulating).
  rope_rows<float>(dkv.data<float>(), T, C, C, c.pos.data(), rope_, true);
  add_into(dx, wkv.backward(kv_norm.backward(dkv, c.kv_norm), c.wkv));

  // Query path.
  rope_rows<float>(dq.data<float>(), T * H, C, C, head_pos.data(), rope_, true);
  Tensor dq_raw = Tensor::empty({T, HC}, DType::F32);
  rmsnorm_backward_rows<float>(dq.data<float>(), c.q_raw.data<float>(), nullptr, c.q_rstd.data<float>(),
                               dq_raw.data<float>(), nullptr, T * H, C);
  const Tensor dqr = wq_b.backward(dq_raw, c.wq_b);
  add_into(dx, wq_a.backward(q_norm.backward(dqr, c.q_norm), c.wq_a));
  // Under tp every rank back-propagated only its heads through the replicated parts: dx (linear in dout) is a partial
  // sum, completed here once (the TpPartial parameter gradients are completed by the trainer).
  if (tp_) group_sum(tp_, dx);
  return dx;
}

void Attention::set_matmul_precision(MatmulPrecision p) {
  for (Linear* l : {&wq_a, &wq_b, &wkv, &wo_b, &compressor.wkv, &compressor.wgate, &indexer.wq_b, &indexer.weights_proj,
                    &indexer.compressor.wkv, &indexer.compressor.wgate})
    l->set_precision(p);
  wo_a_precision_ = p;
}

// ---- tensor-op path --------------------------------------------------------------------------------------------
// The reference above, step by step, as runtime ops on x's device (same order of operations and accumulations).

void Attention::check_ops_path(Device device) const {
  const std::string module = "Attention " + prefix_;
  DSV4_CHECK(!opts_.simulate_release_quant,
             "{}: the tensor-op path (CUDA tensors) does not support simulate_release_quant yet", module);
  for (const Linear* l : {&wq_a, &wq_b, &wkv, &wo_b}) check_linear_for_ops(module, *l, device);
  for (const RMSNorm* n : {&q_norm, &kv_norm}) check_param_for_ops(module, n->weight, device);
  if (wo_a_frozen.defined())
    DSV4_CHECK(wo_a_frozen.data.device() == device, "{}: frozen weight {} is on {}, the input on {} (Model::to moves it)",
               module, wo_a.name, wo_a_frozen.data.device().str(), device.str());
  else
    check_param_for_ops(module, wo_a, device);
  for (int64_t g = 0; g < groups_; ++g)
    if (const LoraAdapter* ad = wo_a_group_adapter(g))
      for (const Param* p : {&ad->A, &ad->B}) check_param_for_ops(module, *p, device);
  check_param_for_ops(module, attn_sink, device);
  if (ratio_ > 0) compressor.check_ops_path(module, device);
  if (ratio_ == 4) indexer.check_ops_path(module, device);
}

Tensor Attention::forward_ops(const Tensor& x_TD, const SeqLayout& layout, AttentionCtx* ctx) const {
  layout.validate("Attention.forward");
  const int64_t T = layout.tokens(), H = heads_, C = head_dim_, HC = H * C, G = groups_, R = o_lora_, K = HC / G;
  const Device dev = x_TD.device();
  DSV4_CHECK(x_TD.dtype() == DType::F32 && x_TD.ndim() == 2 && x_TD.size(0) == T && x_TD.size(1) == dim_ &&
                 x_TD.is_contiguous(),
             "Attention {}: input {} does not match [{} tokens, {}] (contiguous F32)", prefix_, x_TD.str(), T, dim_);
  check_ops_path(dev);
  AttentionCtx local;
  AttentionCtx& c = ctx ? *ctx : local;
  c.ops_path = true;
  c.pos.resize(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) c.pos[static_cast<size_t>(t)] = layout.position(t);
  c.pos_t = index_tensor(c.pos, dev);
  c.inv_freq = rope_inv_freq(rope_, dev);

  // Queries: low-rank, per-head unweighted RMSNorm on the [T*H, C] rows, RoPE (row t*H + h at pos[t]).
  const Tensor qr = q_norm.forward(wq_a.forward(x_TD, &c.wq_a), &c.q_norm);
  c.q_raw = wq_b.forward(qr, &c.wq_b).contiguous();
  RmsNormOut qn = rmsnorm_forward(c.q_raw.view({T * H, C}), Tensor(), eps_);
  rope_apply(qn.y, c.pos_t, c.inv_freq, false);
  c.q = qn.y.view({T, H, C});
  c.q_rstd = qn.rstd;

  // Shared K = V head.
  c.kv = kv_norm.forward(wkv.forward(x_TD, &c.wkv), &c.kv_norm);
  rope_apply(c.kv, c.pos_t, c.inv_freq, false);

  // Compressed entries (the compressor's tensor-op path) and the candidate lists (host; CSA's top-k on x's device,
  // where it stays unless the FP32 backward's query-major key lists need it on the host).
  const SparseAttnKeyMajor key_major = ctx == nullptr ? SparseAttnKeyMajor::none
                                       : sparse_attn_tensor_cores_taken(opts_.tensor_cores, H, C)
                                           ? SparseAttnKeyMajor::positions
                                           : SparseAttnKeyMajor::queries;
  const int64_t E =
      compress_and_index(x_TD, qr, layout, c, ctx != nullptr, dev.is_cpu() || key_major == SparseAttnKeyMajor::queries);
  // CSA's lists come from the indexer's top-k of this step; the others from the layout alone.
  c.dindex = ratio_ == 4 ? SparseAttnDeviceIndex::build(c.index, T, E, dev, key_major, c.comp_ids_device)
                         : layout_index_cache().get(c.index, c.pos, window_, ratio_, T, E, dev, key_major);

  // Core attention with sink, then the inverse RoPE at the query position.
  const float scale = static_cast<float>(std::pow(static_cast<double>(C), -0.5));
  SparseAttnOut core = sparse_attn_forward_tensors(c.index, c.dindex, c.q, c.kv, c.ckv, attn_sink.value, scale,
                                                   opts_.tensor_cores);
  c.o = core.o;
  c.lse = core.lse;
  Tensor o_rows = c.o.clone().view({T * H, C});
  rope_apply(o_rows, c.pos_t, c.inv_freq, true);
  c.o_rot = o_rows.view({T, HC});

  // Grouped low-rank output: y[:, g] = o[:, g] @ wo_a_g^T (column slices), then the adapters, then wo_b.
  Tensor y = Tensor::empty({T, G * R}, DType::F32, dev);
  const Tensor wo_a_dev = wo_a_frozen.defined() && !dev.is_cpu() ? dequantize_on_device(wo_a_frozen) : Tensor();
  if (!wo_a_frozen.defined()) {
    c.o_rot_op = precision_operand(wo_a_precision_, c.o_rot);
    c.wo_a_op = precision_operand(wo_a_precision_, wo_a.value);
  }
  for (int64_t g = 0; g < G; ++g) {
    const Tensor o_g = c.o_rot.slice(1, g * K, (g + 1) * K);
    Tensor y_g = y.slice(1, g * R, (g + 1) * R);
    if (!wo_a_frozen.defined())
      pgemm_xwT(wo_a_precision_, c.o_rot_op.slice(1, g * K, (g + 1) * K), c.wo_a_op.slice(0, g * R, (g + 1) * R),
                0.0f, y_g);
    else if (dev.is_cpu())  // the reference's tile GEMMs on the group's rows
      qgemm_xwT(wo_a_frozen, T, o_g.data<float>(), HC, 0.0f, y_g.data<float>(), G * R, g * R, (g + 1) * R);
    else
      ops::gemm(o_g, false, wo_a_dev.slice(0, g * R, (g + 1) * R), true, 1.0f, 0.0f, y_g);
  }
  if (!wo_a_lora.empty()) {  // the reference's draws, mask offsets and order (Attention::forward)
    check_wo_a_lora();
    c.wo_a_lora_z.assign(static_cast<size_t>(G), Tensor());
    c.wo_a_lora_draws.assign(static_cast<size_t>(G), 0);
    const uint64_t shared_draw = wo_a_lora.shared ? wo_a_lora.shared->next_draw() : 0;
    for (int64_t g = 0; g < G; ++g) {
      const LoraAdapter* ad = wo_a_group_adapter(g);
      if (!ad) continue;
      const uint64_t draw = wo_a_lora.shared ? shared_draw : ad->next_draw();
      const Tensor z = lora_down(*ad, c.o_rot.slice(1, g * K, (g + 1) * K), draw, wo_a_lora_offset(g, T));
      Tensor y_g = y.slice(1, g * R, (g + 1) * R);
      lora_up(*ad, z, wo_a_lora.shared ? g * R : 0, y_g);
      c.wo_a_lora_z[static_cast<size_t>(g)] = z;
      c.wo_a_lora_draws[static_cast<size_t>(g)] = draw;
    }
  }
  Tensor out = wo_b.forward(y, &c.wo_b);
  if (tp_) group_sum(tp_, out);  // row-parallel wo_b: each tp rank holds a partial sum over its groups
  return out;
}

Tensor Attention::backward_ops(const Tensor& dout_TD, const AttentionCtx& c) {
  const int64_t T = c.q.size(0), H = heads_, C = head_dim_, HC = H * C, G = groups_, R = o_lora_, K = HC / G;
  const Device dev = c.q.device();
  DSV4_CHECK(dout_TD.ndim() == 2 && dout_TD.size(0) == T && dout_TD.size(1) == dim_ && dout_TD.device() == dev,
             "Attention {}: backward gradient {} does not match [{}, {}] on {}", prefix_, dout_TD.str(), T, dim_,
             dev.str());
  check_ops_path(dev);

  // Output projections: per group, d_o[:, g] = dy[:, g] wo_a_g and dwo_a_g += dy[:, g]^T o[:, g].
  const Tensor dy = wo_b.backward(dout_TD.contiguous(), c.wo_b);  // [T, G*R]
  Tensor d_o = Tensor::empty({T, HC}, DType::F32, dev);
  const Tensor wo_a_dev = wo_a_frozen.defined() && !dev.is_cpu() ? dequantize_on_device(wo_a_frozen) : Tensor();
  if (!wo_a_frozen.defined())
    DSV4_CHECK(c.o_rot_op.defined() && c.wo_a_op.defined(), "Attention {}: backward without the wo_a operands of its forward",
               prefix_);
  const Tensor dy_op = wo_a_frozen.defined() ? Tensor() : precision_operand(wo_a_precision_, dy);
  for (int64_t g = 0; g < G; ++g) {
    const Tensor dy_g = dy.slice(1, g * R, (g + 1) * R);
    Tensor d_o_g = d_o.slice(1, g * K, (g + 1) * K);
    if (wo_a_frozen.defined()) {
      if (dev.is_cpu())
        qgemm_dyW(wo_a_frozen, T, dy_g.data<float>(), G * R, 0.0f, d_o_g.data<float>(), HC, g * R, (g + 1) * R);
      else
        ops::gemm(dy_g, false, wo_a_dev.slice(0, g * R, (g + 1) * R), false, 1.0f, 0.0f, d_o_g);
      continue;
    }
    const Tensor dy_op_g = dy_op.slice(1, g * R, (g + 1) * R);
    pgemm_dyW(wo_a_precision_, dy_op_g, c.wo_a_op.slice(0, g * R, (g + 1) * R), 0.0f, d_o_g);
    if (wo_a.trainable) {
      Tensor dw_g = wo_a.grad_buffer().slice(0, g * R, (g + 1) * R);
      pgemm_dW(wo_a_precision_, dy_op_g, c.o_rot_op.slice(1, g * K, (g + 1) * K), dw_g);
    }
  }
  if (!wo_a_lora.empty()) {
    check_wo_a_lora();
    DSV4_CHECK(c.wo_a_lora_z.size() == static_cast<size_t>(G),
               "Attention {}: backward through the wo_a adapters without their forward context", prefix_);
    for (int64_t g = 0; g < G; ++g) {
      LoraAdapter* ad = wo_a_group_adapter(g);
      if (!ad) continue;
      const Tensor& z = c.wo_a_lora_z[static_cast<size_t>(g)];
      Tensor dz = Tensor::zeros({T, ad->rank()}, DType::F32, dev);
      lora_up_backward(*ad, dy.slice(1, g * R, (g + 1) * R), z, wo_a_lora.shared ? g * R : 0, dz);
      Tensor d_o_g = d_o.slice(1, g * K, (g + 1) * K);
      lora_down_backward(*ad, dz, c.o_rot.slice(1, g * K, (g + 1) * K), c.wo_a_lora_draws[static_cast<size_t>(g)],
                         wo_a_lora_offset(g, T), &d_o_g);
    }
  }
  Tensor d_o_rows = d_o.view({T * H, C});
  rope_apply(d_o_rows, c.pos_t, c.inv_freq, false);  // backward of the inverse

  // Core attention (the sink's gradient summed from zero, then added on the device).
  const float scale = static_cast<float>(std::pow(static_cast<double>(C), -0.5));
  SparseAttnGrads core = sparse_attn_backward_tensors(c.index, c.dindex, c.q, c.kv, c.ckv, attn_sink.value, c.o,
                                                      c.lse, d_o.view({T, H, C}), scale, opts_.tensor_cores);
  if (attn_sink.trainable) {
    Tensor& g = attn_sink.grad_buffer();
    ops::copy(ops::add(g, core.dsink), g);
  }

  // Compressed entries (the indexer contributes nothing).
  const int64_t E = ratio_ > 0 ? c.plan.entries() : 0;
  Tensor dx = E > 0 ? compressor.backward(core.dckv, c.plan, rope_, c.compressor)
                    : Tensor::zeros({T, dim_}, DType::F32, dev);
  if (ratio_ > 0 && E == 0)
    compressor.visit([](Param& p) {
      if (p.trainable) p.grad_buffer();
    });

  // KV path.
  rope_apply(core.dkv, c.pos_t, c.inv_freq, true);
  dx = ops::add(dx, wkv.backward(kv_norm.backward(core.dkv, c.kv_norm), c.wkv));

  // Query path: inverse RoPE, the per-head norm's backward on the [T*H, C] rows.
  Tensor dq_rows = core.dq.view({T * H, C});
  rope_apply(dq_rows, c.pos_t, c.inv_freq, true);
  const RmsNormGrad qn = rmsnorm_backward(dq_rows, c.q_raw.view({T * H, C}), Tensor(), c.q_rstd);
  const Tensor dqr = wq_b.backward(qn.dx.view({T, HC}), c.wq_b);
  dx = ops::add(dx, wq_a.backward(q_norm.backward(dqr, c.q_norm), c.wq_a));
  // Under tp every rank back-propagated only its heads through the replicated parts: dx is a partial sum.
  if (tp_) group_sum(tp_, dx);
  return dx;
}

}  // namespace dsv4
