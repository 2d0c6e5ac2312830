#include "model/model.h"

#include <algorithm>
#include <atomic>
#include <random>
#include <regex>
#include <set>
#include <thread>

namespace dsv4 {

namespace {

// X [T, n, D] with n copies of h [T, D].
Tensor expand_streams(const Tensor& h_TD, int64_t n) {
  const int64_t T = h_TD.size(0), D = h_TD.size(1);
  Tensor X = Tensor::empty({T, n, D}, DType::F32, h_TD.device());
  for (int64_t j = 0; j < n; ++j) {
    Tensor stream = X.select(1, j);
    ops::copy(h_TD, stream);
  }
  return X;
}

// The output head's input gradient: vocab-parallel heads give partial sums over their columns.
Tensor head_backward(Linear& head, const Tensor& dlogits_TV, const LinearCtx& ctx, const VocabShard& shard) {
  Tensor dx = head.backward(dlogits_TV, ctx);
  group_sum(shard.group, dx);
  return dx;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Seed of one parameter's initialisation stream: splitmix64 of the run seed and the FNV-1a hash of its name.
uint64_t param_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (h | 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

// ---- Block -------------------------------------------------------------------------------------------
namespace {
AttentionOptions attention_options(const ModelOptions& opts) {
  AttentionOptions a = opts.attention;
  a.parallel = opts.parallel;
  return a;
}
}  // namespace

Block::Block(const std::string& prefix, const ModelConfig& cfg, int64_t layer, bool hash_routed,
             const ModelOptions& opts)
    : hc_attn(prefix + "hc_attn_", cfg),
      hc_ffn(prefix + "hc_ffn_", cfg),
      attn_norm(prefix + "attn_norm.weight", cfg.dim, cfg.norm_eps),
      ffn_norm(prefix + "ffn_norm.weight", cfg.dim, cfg.norm_eps),
      attn(prefix + "attn.", cfg, layer, attention_options(opts)),
      ffn(prefix + "ffn.", cfg, hash_routed, opts.parallel) {}

Tensor Block::forward(const Tensor& X_TND, const Tensor& ids_T, const SeqLayout& layout, BlockCtx* ctx,
                      MoEStats* stats) const {
  const HcPreOut p = hc_attn.pre(X_TND, ctx ? &ctx->attn_pre : nullptr);
  const Tensor a_in = attn_norm.forward(p.x_TD, ctx ? &ctx->attn_norm : nullptr);
  const Tensor a = attn.forward(a_in, layout, ctx ? &ctx->attn : nullptr);
  const Tensor X1 = hc_attn.post(a, X_TND, p.post_TN, p.comb_TNN, ctx ? &ctx->attn_post : nullptr);
  const HcPreOut q = hc_ffn.pre(X1, ctx ? &ctx->ffn_pre : nullptr);
  const Tensor m_in = ffn_norm.forward(q.x_TD, ctx ? &ctx->ffn_norm : nullptr);
  const Tensor m = ffn.forward(m_in, ids_T, layout, ctx ? &ctx->ffn : nullptr, stats);
  return hc_ffn.post(m, X1, q.post_TN, q.comb_TNN, ctx ? &ctx->ffn_post : nullptr);
}

Tensor Block::backward(const Tensor& dX_TND, const BlockCtx& ctx, double balance_alpha) {
  HcPostGrads g2 = hc_ffn.post_backward(dX_TND, ctx.ffn_post);
  const Tensor dm_in = ffn.backward(g2.dF_TD, ctx.ffn, balance_alpha);
  const Tensor dx2 = ffn_norm.backward(dm_in, ctx.ffn_norm);
  Tensor dX1 = g2.dX_TND;
  hc_ffn.pre_backward_accumulate(dx2, g2.dpost_TN, g2.dcomb_TNN, ctx.ffn_pre, dX1);
  HcPostGrads g1 = hc_attn.post_backward(dX1, ctx.attn_post);
  const Tensor da_in = attn.backward(g1.dF_TD, ctx.attn);
  const Tensor dx1 = attn_norm.backward(da_in, ctx.attn_norm);
  Tensor dX0 = g1.dX_TND;
  hc_attn.pre_backward_accumulate(dx1, g1.dpost_TN, g1.dcomb_TNN, ctx.attn_pre, dX0);
  return dX0;
}

void Block::visit(const ParamVisitor& f) {
  hc_attn.visit(f);
  hc_ffn.visit(f);
  attn_norm.visit(f);
  ffn_norm.visit(f);
  attn.visit(f);
  ffn.visit(f);
}

// ---- MTP ---------------------------------------------------------------------------------------------
Mtp::Mtp(const std::string& prefix, const ModelConfig& cfg, int64_t layer, const ModelOptions& opts)
    : enorm(prefix + "enorm.weight", cfg.dim, cfg.norm_eps),
      hnorm(prefix + "hnorm.weight", cfg.dim, cfg.norm_eps),
      e_proj(prefix + "e_proj.weight", cfg.dim, cfg.dim),
      h_proj(prefix + "h_proj.weight", cfg.dim, cfg.dim),
      block(prefix, cfg, layer, /*hash_routed=*/false, opts),
      hc_head(prefix, cfg),
      norm(prefix + "norm.weight", cfg.dim, cfg.norm_eps) {}

namespace {
// Token t+1 of the same row at position t; the last position repeats its own token (its target is ignored). Built on
// the host from the ids wherever they are, then put on `device` (the MTP block's streams): one copy each way at most.
Tensor next_token_ids(const Tensor& ids_T, const SeqLayout& layout, Device device) {
  const int64_t T = ids_T.size(0);
  Tensor next = Tensor::empty({T}, DType::I64);
  const Tensor ids = ids_T.to(Device::cpu()).contiguous();
  for (int64_t t = 0; t < T; ++t)
    next.data<int64_t>()[t] = ids.data<int64_t>()[(t % layout.seq) + 1 < layout.seq ? t + 1 : t];
  return next.to(device);
}
}  // namespace

Tensor Mtp::forward(const Tensor& X_main_TND, const Tensor& ids_T, const SeqLayout& layout, const Embedding& embed,
                    const Linear& head, MtpCtx* ctx, MoEStats* stats) const {
  const int64_t T = X_main_TND.size(0), n = X_main_TND.size(1), D = X_main_TND.size(2);
  const Tensor next = next_token_ids(ids_T, layout, X_main_TND.device());
  const Tensor e = e_proj.forward(enorm.forward(embed.forward(next), ctx ? &ctx->enorm : nullptr),
                                  ctx ? &ctx->e_proj : nullptr);
  const Tensor h = h_proj.forward(hnorm.forward(X_main_TND.view({T * n, D}), ctx ? &ctx->hnorm : nullptr),
                                  ctx ? &ctx->h_proj : nullptr);
  const Tensor X = ops::add(h.view({T, n, D}), e.unsqueeze(1));
  const Tensor Xo = block.forward(X, next, layout, ctx ? &ctx->block : nullptr, stats);
  const Tensor hf = hc_head.forward(Xo, ctx ? &ctx->head : nullptr);
  const Tensor logits = head.forward(norm.forward(hf, ctx ? &ctx->norm : nullptr), ctx ? &ctx->out : nullptr);
  if (ctx) ctx->next_ids_T = next;
  return logits;
}

Tensor Mtp::backward(const Tensor& dlogits_TV, const MtpCtx& ctx, Embedding& embed, Linear& head,
                     double balance_alpha) {
  const Tensor dhf = norm.backward(head_backward(head, dlogits_TV, ctx.out, embed.shard()), ctx.norm);
  const Tensor dX = block.backward(hc_head.backward(dhf, ctx.head), ctx.block, balance_alpha);
  const int64_t T = dX.size(0), n = dX.size(1), D = dX.size(2);
  const Tensor de = ops::sum(dX, 1);  // e was broadcast over the streams
  embed.backward(enorm.backward(e_proj.backward(de, ctx.e_proj), ctx.enorm), ctx.next_ids_T);
  return hnorm.backward(h_proj.backward(dX.view({T * n, D}), ctx.h_proj), ctx.hnorm).view({T, n, D});
}

void Mtp::visit(const ParamVisitor& f) {
  enorm.visit(f);
  hnorm.visit(f);
  e_proj.visit(f);
  h_proj.visit(f);
  block.visit(f);
  hc_head.visit(f);
  norm.visit(f);
}

// ---- Model -------------------------------------------------------------------------------------------
Model::Model(const ModelConfig& cfg, const ModelOptions& opts)
    : embed("embed.weight", cfg.vocab_size, cfg.dim),
      hc_head("", cfg),
      norm("norm.weight", cfg.dim, cfg.norm_eps),
      head("head.weight", cfg.dim, cfg.vocab_size),
      cfg_(cfg),
      recompute_(opts.recompute),
      parallel_(opts.parallel) {
  cfg.validate(cfg.name);
  if (parallel_ && parallel_->tp()) {  // vocab-parallel embedding and output head
    const Range r = split_range(cfg.vocab_size, parallel_->tp_size(), parallel_->tp_rank());
    embed.set_vocab_shard(parallel_->tp(), r.begin, r.size(), cfg.vocab_size);
    head = Linear("head.weight", cfg.dim, r.size());
    head.weight.set_tp_split(0, r.begin, cfg.vocab_size);
  }
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    layers.push_back(std::make_unique<Block>(fmt::format("layers.{}.", i), cfg, i, i < cfg.n_hash_layers, opts));
  for (int64_t j = 0; j < cfg.n_mtp_layers; ++j)
    mtp.push_back(std::make_unique<Mtp>(fmt::format("mtp.{}.", j), cfg, cfg.n_layers + j, opts));
}

ModelOutput Model::forward(const Tensor& ids_T, const SeqLayout& layout, ModelCtx* ctx) const {
  layout.validate("Model.forward");
  DSV4_CHECK(ids_T.dtype() == DType::I64 && ids_T.ndim() == 1 && ids_T.size(0) == layout.tokens(),
             "Model.forward: ids must be I64 [{}] (batch {} x seq {}), got {}", layout.tokens(), layout.batch,
             layout.seq, ids_T.str());
  ModelOutput out;
  out.moe_stats.resize(layers.size() + mtp.size());
  if (ctx) {
    ctx->ids_T = ids_T;
    ctx->layout = layout;
    ctx->blocks.resize(layers.size());
    ctx->mtp.resize(mtp.size());
  }
  Tensor X = expand_streams(embed.forward(ids_T), cfg_.hc_mult);
  if (ctx && recompute_) ctx->block_inputs.resize(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    if (ctx && recompute_) ctx->block_inputs[i] = X;
    X = layers[i]->forward(X, ids_T, layout, ctx && !recompute_ ? &ctx->blocks[i] : nullptr, &out.moe_stats[i]);
  }
  if (ctx) ctx->X_final_TND = X;
  const Tensor hf = hc_head.forward(X, ctx ? &ctx->head : nullptr);
  out.logits_TV = head.forward(norm.forward(hf, ctx ? &ctx->norm : nullptr), ctx ? &ctx->out : nullptr);
  for (size_t j = 0; j < mtp.size(); ++j)
    out.mtp_logits_TV.push_back(mtp[j]->forward(X, ids_T, layout, embed, head, ctx ? &ctx->mtp[j] : nullptr,
                                                &out.moe_stats[layers.size() + j]));
  return out;
}

void Model::backward(const Tensor& dlogits_TV, const std::vector<Tensor>& dmtp_logits_TV, const ModelCtx& ctx,
                     double balance_alpha) {
  DSV4_CHECK(ctx.blocks.size() == layers.size(), "Model.backward: the context does not come from a forward with ctx");
  const Tensor dhf = norm.backward(head_backward(head, dlogits_TV, ctx.out, embed.shard()), ctx.norm);
  Tensor dX = hc_head.backward(dhf, ctx.head);
  for (size_t j = 0; j < mtp.size() && j < dmtp_logits_TV.size(); ++j) {
    if (!dmtp_logits_TV[j].defined()) continue;
    dX = ops::add(dX, mtp[j]->backward(dmtp_logits_TV[j], ctx.mtp[j], embed, head, balance_alpha));
  }
  for (size_t i = layers.size(); i-- > 0;) {
    const double alpha = layers[i]->ffn.tid2eid.value.defined() ? 0.0 : balance_alpha;  // hash layers: fixed routing
    if (!ctx.block_inputs.empty()) {  // recomputation: rebuild this block's context, use it, drop it
      BlockCtx block;
      layers[i]->forward(ctx.block_inputs[i], ctx.ids_T, ctx.layout, &block, nullptr);
      dX = layers[i]->backward(dX, block, alpha);
    } else {
      dX = layers[i]->backward(dX, ctx.blocks[i], alpha);
    }
  }
  embed.backward(ops::sum(dX, 1), ctx.ids_T);
}

namespace {
struct Targets {
  Tensor lm;
  std::vector<Tensor> mtp;
};
Targets make_targets(const Tensor& labels_T, const SeqLayout& layout, size_t n_mtp) {
  DSV4_CHECK(labels_T.dtype() == DType::I64 && labels_T.numel() == layout.tokens(),
             "labels must be I64 [{}], got {}", layout.tokens(), labels_T.str());
  // Packed rows: a target from another document than its position's is not predicted (for the LM the loader already
  // masks document starts; MTP's shift by 2 would otherwise pair a document's last token with the next one's second).
  auto within_documents = [&](Tensor targets, int64_t shift) {
    if (!layout.packed()) return targets;
    int64_t* y = targets.data<int64_t>();
    for (int64_t t = 0; t < layout.tokens(); ++t)
      if (t % layout.seq + shift < layout.seq && layout.doc_begin(t + shift) != layout.doc_begin(t)) y[t] = kIgnoreIndex;
    return targets;
  };
  Targets t;
  t.lm = within_documents(shift_targets(labels_T, layout.batch, layout.seq, 1), 1);
  for (size_t j = 0; j < n_mtp; ++j) {
    const int64_t shift = static_cast<int64_t>(j) + 2;
    t.mtp.push_back(within_documents(shift_targets(labels_T, layout.batch, layout.seq, shift), shift));
  }
  return t;
}

double balance_total(const Model& m, const ModelOutput& out, double alpha) {
  double b = 0;
  for (size_t i = 0; i < out.moe_stats.size(); ++i) {
    const bool hash = i < m.layers.size() && m.layers[i]->ffn.tid2eid.value.defined();
    if (!hash) b += out.moe_stats[i].balance_loss(alpha);
  }
  return b;
}
}  // namespace

TargetCounts count_targets(const Tensor& labels_T, const SeqLayout& layout, int64_t n_mtp) {
  const Targets t = make_targets(labels_T, layout, static_cast<size_t>(n_mtp));
  auto count = [](const Tensor& x) {
    int64_t n = 0;
    const int64_t* p = x.data<int64_t>();
    for (int64_t i = 0; i < x.numel(); ++i) n += p[i] != kIgnoreIndex;
    return n;
  };
  TargetCounts c;
  c.lm = count(t.lm);
  for (const Tensor& m : t.mtp) c.mtp.push_back(count(m));
  return c;
}

LossResult Model::forward_backward(const Tensor& ids_T, const Tensor& labels_T, const SeqLayout& layout,
                                   const LossWeights& weights) {
  ModelCtx ctx;
  LossResult r;
  r.output = forward(ids_T, layout, &ctx);
  const Targets targets = make_targets(labels_T, layout, mtp.size());
  const CrossEntropyResult lm = cross_entropy(r.output.logits_TV, targets.lm, true, weights.lm_normalizer, embed.shard());
  r.lm = lm.loss;
  r.tokens = lm.counted;
  std::vector<Tensor> dmtp;
  double mtp_total = 0;
  // The MTP block is back-propagated when its loss counts or when its MoE balance loss does.
  const bool mtp_backward = weights.mtp != 0 || weights.balance_alpha != 0;
  for (size_t j = 0; j < mtp.size(); ++j) {
    CrossEntropyResult ce =
        cross_entropy(r.output.mtp_logits_TV[j], targets.mtp[j], mtp_backward, weights.mtp_normalizer,
                      embed.shard());
    r.mtp.push_back(ce.loss);
    mtp_total += ce.loss;
    dmtp.push_back(mtp_backward ? ops::affine(ce.dlogits_TV, weights.mtp, 0.0) : Tensor());
  }
  r.balance = balance_total(*this, r.output, weights.balance_alpha);
  r.total = r.lm + weights.mtp * mtp_total + r.balance;
  backward(lm.dlogits_TV, dmtp, ctx, weights.balance_alpha);
  return r;
}

LossResult Model::evaluate(const Tensor& ids_T, const Tensor& labels_T, const SeqLayout& layout,
                           const LossWeights& weights) const {
  LossResult r;
  r.output = forward(ids_T, layout, nullptr);
  const Targets targets = make_targets(labels_T, layout, mtp.size());
  const CrossEntropyResult lm = cross_entropy(r.output.logits_TV, targets.lm, false, 0, embed.shard());
  r.lm = lm.loss;
  r.tokens = lm.counted;
  double mtp_total = 0;
  for (size_t j = 0; j < mtp.size(); ++j) {
    r.mtp.push_back(cross_entropy(r.output.mtp_logits_TV[j], targets.mtp[j], false, 0, embed.shard()).loss);
    mtp_total += r.mtp.back();
  }
  r.balance = balance_total(*this, r.output, weights.balance_alpha);
  r.total = r.lm + weights.mtp * mtp_total + r.balance;
  return r;
}

void Model::visit(const ParamVisitor& f) {
  embed.visit(f);
  for (auto& l : layers) l->visit(f);
  hc_head.visit(f);
  norm.visit(f);
  head.visit(f);
  for (auto& m : mtp) m->visit(f);
}

void Model::to(Device device) {
  // Frozen (quantised) weights move in their own format (dequantised per GEMM there, quant.h).
  std::vector<Linear*> linears = {&head};
  std::vector<ExpertWeights*> experts;
  std::vector<Block*> blocks;
  for (auto& l : layers) blocks.push_back(l.get());
  for (auto& m : mtp) {
    linears.push_back(&m->e_proj);
    linears.push_back(&m->h_proj);
    blocks.push_back(&m->block);
  }
  for (Block* b : blocks) {
    Attention& a = b->attn;
    for (Linear* l : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_b, &a.compressor.wkv, &a.compressor.wgate, &a.indexer.wq_b,
                      &a.indexer.weights_proj, &a.indexer.compressor.wkv, &a.indexer.compressor.wgate})
      linears.push_back(l);
    a.wo_a_frozen = to_device(a.wo_a_frozen, device, a.wo_a.name);
    for (auto& ew : b->ffn.experts) experts.push_back(&ew);
    if (b->ffn.has_shared()) experts.push_back(&b->ffn.shared);
  }
  for (Linear* l : linears) l->frozen = to_device(l->frozen, device, l->weight.name);
  for (ExpertWeights* ew : experts)
    for (int k = 1; k <= 3; ++k) ew->frozen(k) = to_device(ew->frozen(k), device, ew->param(k).name);
  visit([&](Param& p) {
    if (p.value.defined()) p.value = p.value.to(device);
    if (p.grad.defined()) p.grad = p.grad.to(device);
  });
  grad_buffers_.clear();  // the moved gradients are separate tensors now
}

void Model::allocate_grads(const std::vector<Param*>& params) {
  for (Tensor& b : allocate_grad_buffers(params)) grad_buffers_.push_back(std::move(b));
}

void Model::zero_grad() {
  for (Tensor& b : grad_buffers_) ops::fill(b, 0.0);
  visit([&](Param& p) {
    const bool in_buffer = std::any_of(grad_buffers_.begin(), grad_buffers_.end(),
                                       [&](const Tensor& b) { return shares_storage(p.grad, b); });
    if (!in_buffer) p.zero_grad();
  });
}

int64_t Model::num_params() const {
  int64_t n = 0;
  const_cast<Model*>(this)->visit([&](Param& p) {
    if (p.value.dtype() == DType::F32) n += p.value.numel();
  });
  return n;
}

bool Model::foreign_expert(const std::string& name) const {
  static const std::regex re(R"(^(layers|mtp)\.(\d+)\.ffn\.experts\.(\d+)\..*)");
  std::smatch m;
  if (!std::regex_match(name, m, re)) return false;
  const size_t i = static_cast<size_t>(std::stoll(m[2].str()));
  const MoE* moe = nullptr;
  if (m[1] == "layers" && i < layers.size()) moe = &layers[i]->ffn;
  if (m[1] == "mtp" && i < mtp.size()) moe = &mtp[i]->block.ffn;
  if (!moe) return false;
  const int64_t e = std::stoll(m[3].str());
  return e >= 0 && e < moe->n_experts() && !moe->holds_expert(e);
}

void Model::init_random(uint64_t seed, double stddev) {
  // Each parameter draws its GLOBAL tensor from its own stream (seeded by the run seed and its name) and keeps the
  // part this rank holds, so every parallel layout starts from the same weights as one rank.
  auto init = [&](Param& p) {
    const std::string& name = p.name;
    std::mt19937_64 rng(param_seed(seed, name));
    if (name.find("tid2eid") != std::string::npos) {
      // k distinct experts per token id, drawn from the seed (an all-zero table would route every token to expert 0).
      const int64_t V = p.value.size(0), k = p.value.size(1);
      std::vector<int64_t> perm(static_cast<size_t>(cfg_.n_routed_experts));
      int64_t* t = p.value.data<int64_t>();
      for (int64_t v = 0; v < V; ++v) {
        for (size_t e = 0; e < perm.size(); ++e) perm[e] = static_cast<int64_t>(e);
        for (int64_t j = 0; j < k; ++j) {
          std::uniform_int_distribution<int64_t> pick(j, static_cast<int64_t>(perm.size()) - 1);
          std::swap(perm[static_cast<size_t>(j)], perm[static_cast<size_t>(pick(rng))]);
          t[v * k + j] = perm[static_cast<size_t>(j)];
        }
      }
      return;
    }
    if (ends_with(name, "norm.weight") || ends_with(name, "_scale")) {
      ops::fill(p.value, 1.0);
    } else if (ends_with(name, "_base") || ends_with(name, "attn_sink") || ends_with(name, ".ape") ||
               ends_with(name, "gate.bias")) {
      ops::fill(p.value, 0.0);
    } else {
      std::normal_distribution<float> normal(0.0f, static_cast<float>(stddev));
      Tensor full = p.placement == Placement::TpSplit ? Tensor::empty(p.global_shape(), DType::F32) : p.value;
      float* v = full.data<float>();
      for (int64_t i = 0; i < full.numel(); ++i) v[i] = normal(rng);
      if (p.placement == Placement::TpSplit) ops::copy(p.local_part(full), p.value);
    }
  };
  // Parameters draw independently, so they are drawn in parallel (a 2B-parameter model takes minutes on one core).
  // A model already on a device (Model::to) draws on the host and copies over afterwards: the values a CPU model gets.
  std::vector<Param*> params;
  visit([&](Param& p) {
    if (p.value.defined()) params.push_back(&p);
  });
  std::stable_sort(params.begin(), params.end(),  // largest first: the threads finish together
                   [](const Param* a, const Param* b) { return a->value.numel() > b->value.numel(); });
  std::vector<Param> host(params.size());
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next++; i < params.size(); i = next++) {
      Param& p = *params[i];
      if (p.value.device().is_cpu()) {
        init(p);
      } else {
        host[i] = p;
        host[i].value = Tensor::empty(p.value.shape(), p.value.dtype());
        init(host[i]);
      }
    }
  };
  const size_t n_threads = std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()), params.size());
  std::vector<std::thread> threads;
  for (size_t t = 1; t < n_threads; ++t) threads.emplace_back(worker);
  worker();
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < params.size(); ++i)
    if (!params[i]->value.device().is_cpu()) ops::copy(host[i].value, params[i]->value);
}

void Model::load_state(const std::map<std::string, Tensor>& state, const std::string& source) {
  std::vector<std::string> missing, mismatched;
  std::set<std::string> used;
  visit([&](Param& p) {
    auto it = state.find(p.name);
    if (it == state.end()) {
      missing.push_back(p.name);
      return;
    }
    used.insert(p.name);
    const Tensor& t = it->second;
    const bool int_param = p.value.dtype() == DType::I64;
    const bool dtype_ok = int_param ? (t.dtype() == DType::I64 || t.dtype() == DType::I32) : dtype_is_float(t.dtype());
    if (!(t.shape() == p.global_shape()) || !dtype_ok) {
      mismatched.push_back(fmt::format("{} (expected {}{}, got {})", p.name, dtype_name(p.value.dtype()),
                                       p.global_shape().str(), t.str()));
      return;
    }
    ops::copy(p.local_part(t), p.value);
  });
  std::vector<std::string> unexpected;
  for (const auto& [name, t] : state)
    if (!used.count(name) && !foreign_expert(name)) unexpected.push_back(name);
  auto list = [](const std::vector<std::string>& v) {
    std::string s;
    for (size_t i = 0; i < v.size() && i < 8; ++i) s += (i ? ", " : "") + v[i];
    if (v.size() > 8) s += fmt::format(", ... ({} in all)", v.size());
    return s;
  };
  DSV4_CHECK(missing.empty() && unexpected.empty() && mismatched.empty(),
             "{}: state does not match the {} model: missing [{}]; unexpected [{}]; wrong shape/dtype [{}]", source,
             cfg_.name, list(missing), list(unexpected), list(mismatched));
}

void Model::set_matmul_precision(MatmulPrecision p) {
  precision_ = p;
  auto block = [&](Block& b) {
    b.attn.set_matmul_precision(p);
    for (ExpertWeights& e : b.ffn.experts) e.precision = p;
    b.ffn.shared.precision = p;
  };
  for (auto& b : layers) block(*b);
  for (auto& m : mtp) {
    m->e_proj.set_precision(p);
    m->h_proj.set_precision(p);
    block(m->block);
  }
  head.set_precision(p == MatmulPrecision::FP8 ? MatmulPrecision::BF16 : p);
}

}  // namespace dsv4
