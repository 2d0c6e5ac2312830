// DeepSeekMoE block: FP32 CPU reference forward/backward (see moe.h for the math).
//
// Where the Hugging Face port (our FP32 oracle) and the official inference code differ:
//  * Normalisation: official `w / w.sum()`, HF `w / (w.sum() + 1e-20)`. We add 1e-20 (HF). In FP32 the two are
//    bit-identical whenever the sum exceeds ~2e-13 (1e-20 is below half an ulp), i.e. unless every selected
//    logit is below about -57; there HF stays finite where the official code would divide 0 by 0.
//  * Routing weight: official multiplies h = silu(g)*u by w BEFORE w2, HF multiplies the w2 output after. The
//    same math (w2 is linear); FP32 rounding differs in the last bits. We follow the official order.
//  * Top-k order: official sorted (descending aff+bias), HF sorted=False. Only the order of the K-term sum of
//    the normaliser depends on it. We use sorted order (ties to the lower expert id, as ops::topk).
//  * Accumulation: both add routed outputs per expert in ascending expert id, then the shared expert. Same here.
//    With duplicate experts in a tid2eid row (HF's zero init), HF's index_add_ adds both slots while the
//    official `y[idx] += ...` keeps one; we add both (HF), and load counts count both.
//  * Router logits: official FP32 `linear(x.float(), W.float())`, HF in the model dtype: identical in FP32.
//  * Shared expert clamp: present in the newest HF and in the later official code (§2.9 item 1); we clamp it.
#include "model/moe.h"

#include "model/exec_path.h"
#include "model/layers.h"
#include "runtime/ops.h"
#include "runtime/cpu_blas.h"

namespace dsv4 {

namespace {

void check_rows(const char* what, const Tensor& x, int64_t dim) {
  DSV4_CHECK(x.dtype() == DType::F32 && x.ndim() == 2 && x.size(1) == dim && x.is_contiguous() && x.device().is_cpu(),
             "{}: expected a contiguous CPU F32 [T, {}] tensor, got {}", what, dim, x.str());
}

void check_weight(const Param& p, const Shape& shape) {
  DSV4_CHECK(
      p.value.dtype() == DType::F32 && p.value.shape() == shape && p.value.is_contiguous() && p.value.device().is_cpu(),
      "MoE: parameter {} must be a contiguous CPU F32 {} tensor, got {}", p.name, shape.str(), p.value.str());
}

ExpertWeights make_expert(const std::string& base, int64_t D, int64_t I) {
  ExpertWeights w;
  if (DeferredWeightStorage::active()) {  // names only: a loader fills them (layers.h)
    w.w1.name = base + "w1.weight";
    w.w2.name = base + "w2.weight";
    w.w3.name = base + "w3.weight";
    return w;
  }
  w.w1 = Param(base + "w1.weight", Shape{I, D});
  w.w2 = Param(base + "w2.weight", Shape{D, I});
  w.w3 = Param(base + "w3.weight", Shape{I, D});
  return w;
}

// One expert matrix: the frozen weight when there is one, else the F32 parameter.
void check_expert_weight(const ExpertWeights& ew, int k, const Shape& shape) {
  const QuantizedWeight& q = ew.frozen(k);
  if (q.defined()) {
    DSV4_CHECK(q.shape() == shape, "MoE: frozen weight {} must be {}, got {}", ew.param(k).name, shape.str(), q.str());
    return;
  }
  check_weight(ew.param(k), shape);
}

// Y [n, out] = X [n, in] W_k^T + beta Y
void expert_xwT(const ExpertWeights& ew, int k, int64_t n, const float* X, int64_t ldx, float beta, float* Y,
                int64_t ldy) {
  const QuantizedWeight& q = ew.frozen(k);
  if (q.defined()) {
    qpgemm_xwT_rows(ew.precision, q, n, X, ldx, beta, Y, ldy);
    return;
  }
  const Tensor& w = ew.param(k).value;
  pgemm_xwT_rows(ew.precision, n, w.size(1), w.size(0), X, ldx, w.data<float>(), beta, Y, ldy);
}

// dX [n, in] = dY [n, out] W_k + beta dX
void expert_dyW(const ExpertWeights& ew, int k, int64_t n, const float* dY, int64_t lddy, float beta, float* dX,
                int64_t lddx) {
  const QuantizedWeight& q = ew.frozen(k);
  if (q.defined()) {
    qpgemm_dyW_rows(ew.precision, q, n, dY, lddy, beta, dX, lddx);
    return;
  }
  const Tensor& w = ew.param(k).value;
  pgemm_dyW_rows(ew.precision, n, w.size(1), w.size(0), dY, lddy, w.data<float>(), beta, dX, lddx);
}

// ---- LoRA on the expert matrices (lora.h). draws[0..3]: the dropout draws of lora_w1, w2, w3, w13. ----------------
constexpr int kExpertLoraSlots[4] = {1, 2, 3, 13};

void expert_lora_draws(const ExpertWeights& ew, uint64_t* draws) {
  for (int s = 0; s < 4; ++s) {
    const auto& ad = ew.lora(kExpertLoraSlots[s]);
    draws[s] = ad ? ad->next_draw() : 0;
  }
}

void check_expert_lora(const ExpertWeights& ew, int64_t D, int64_t I) {
  auto check = [&](const std::optional<LoraAdapter>& ad, int64_t in, int64_t out) {
    DSV4_CHECK(!ad || (ad->in_features() == in && ad->out_features() == out),
               "MoE: adapter {} must be A [r, {}], B [{}, r]; got A {}, B {}", ad->unit, in, out, ad->A.value.str(),
               ad->B.value.str());
  };
  check(ew.lora_w1, D, I);
  check(ew.lora_w2, I, D);
  check(ew.lora_w3, D, I);
  check(ew.lora_w13, D, 2 * I);
  DSV4_CHECK(!(ew.lora_w13 && (ew.lora_w1 || ew.lora_w3)), "MoE: {} has both a fused w13 and a w1 / w3 adapter",
             ew.w1.name);
}

// G [n, I] and U [n, I] += the input-side adapters on X [n, D].
void expert_lora_in_forward(const ExpertWeights& ew, const float* X, int64_t n, int64_t D, int64_t I,
                            const uint64_t* draws, float* G, float* U, int64_t row0) {
  std::vector<float> z;
  const uint64_t mo = static_cast<uint64_t>(row0 * D);
  auto run = [&](const LoraAdapter& ad, uint64_t draw) {
    z.resize(static_cast<size_t>(n * ad.rank()));
    lora_down(ad, n, X, D, draw, mo, z.data());
  };
  if (ew.lora_w1) {
    run(*ew.lora_w1, draws[0]);
    lora_up(*ew.lora_w1, n, z.data(), 0, I, G, I);
  }
  if (ew.lora_w3) {
    run(*ew.lora_w3, draws[2]);
    lora_up(*ew.lora_w3, n, z.data(), 0, I, U, I);
  }
  if (ew.lora_w13) {
    run(*ew.lora_w13, draws[3]);
    lora_up(*ew.lora_w13, n, z.data(), 0, I, G, I);
    lora_up(*ew.lora_w13, n, z.data(), I, I, U, I);
  }
}

// Backward of the input-side adapters: accumulates their gradients and dX [n, D] += their input gradient.
void expert_lora_in_backward(ExpertWeights& ew, const float* X, const float* dG, const float* dU, int64_t n, int64_t D,
                             int64_t I, const uint64_t* draws, float* dX, int64_t row0) {
  std::vector<float> z, dz;
  const uint64_t mo = static_cast<uint64_t>(row0 * D);
  auto start = [&](const LoraAdapter& ad, uint64_t draw) {
    z.resize(static_cast<size_t>(n * ad.rank()));
    dz.assign(static_cast<size_t>(n * ad.rank()), 0.0f);
    lora_down(ad, n, X, D, draw, mo, z.data());
  };
  if (ew.lora_w1) {
    start(*ew.lora_w1, draws[0]);
    lora_up_backward(*ew.lora_w1, n, dG, I, z.data(), 0, I, dz.data());
    lora_down_backward(*ew.lora_w1, n, dz.data(), X, D, draws[0], mo, dX, D);
  }
  if (ew.lora_w3) {
    start(*ew.lora_w3, draws[2]);
    lora_up_backward(*ew.lora_w3, n, dU, I, z.data(), 0, I, dz.data());
    lora_down_backward(*ew.lora_w3, n, dz.data(), X, D, draws[2], mo, dX, D);
  }
  if (ew.lora_w13) {
    start(*ew.lora_w13, draws[3]);
    lora_up_backward(*ew.lora_w13, n, dG, I, z.data(), 0, I, dz.data());
    lora_up_backward(*ew.lora_w13, n, dU, I, z.data(), I, I, dz.data());
    lora_down_backward(*ew.lora_w13, n, dz.data(), X, D, draws[3], mo, dX, D);
  }
}

// Forward of one clamped SwiGLU expert on n gathered rows X [n, D]. Writes G, U [n, I] (pre-clamp), H [n, I]
// (weighted activations) and Y [n, D]. draws: the adapters' dropout draws (null: no adapters). row0: the global row
// of X[0] for the dropout masks (the shared expert under tp; 0 for routed experts).
void expert_forward(const ExpertWeights& ew, const float* X, const float* w, int64_t n, int64_t D, int64_t I,
                    double limit, float* G, float* U, float* H, float* Y, const uint64_t* draws, int64_t row0 = 0) {
  expert_xwT(ew, 1, n, X, D, 0.0f, G, I);
  expert_xwT(ew, 3, n, X, D, 0.0f, U, I);
  if (draws) expert_lora_in_forward(ew, X, n, D, I, draws, G, U, row0);
  swiglu_clamp_rows<float>(G, U, w, H, n, I, limit);
  expert_xwT(ew, 2, n, H, I, 0.0f, Y, D);
  if (draws && ew.lora_w2) {
    std::vector<float> z(static_cast<size_t>(n * ew.lora_w2->rank()));
    lora_down(*ew.lora_w2, n, H, I, draws[1], static_cast<uint64_t>(row0 * I), z.data());
    lora_up(*ew.lora_w2, n, z.data(), 0, D, Y, D);
  }
}

// Backward of one expert: dY [n, D] -> dX [n, D] (written), dw [n] (written when w), weight grads accumulated
// (trainable F32 weights and adapters only). Scratch: H, dH, dG, dU [n, I].
void expert_backward(ExpertWeights& ew, const float* X, const float* G, const float* U, const float* w, const float* dY,
                     int64_t n, int64_t D, int64_t I, double limit, float* H, float* dH, float* dG, float* dU,
                     float* dw, float* dX, const uint64_t* draws, int64_t row0 = 0) {
  const bool train1 = !ew.w1_frozen.defined() && ew.w1.trainable;
  const bool train2 = !ew.w2_frozen.defined() && ew.w2.trainable;
  const bool train3 = !ew.w3_frozen.defined() && ew.w3.trainable;
  const bool lora2 = draws && ew.lora_w2;
  // dH = dY W2' (gradient of the weighted activations w * silu(gc) * uc; W2' includes the adapter)
  expert_dyW(ew, 2, n, dY, D, 0.0f, dH, I);
  if (train2 || lora2) swiglu_clamp_rows<float>(G, U, w, H, n, I, limit);
  if (train2) pgemm_dW_rows(ew.precision, n, I, D, dY, D, H, I, ew.w2.grad_buffer().data<float>());
  if (lora2) {
    LoraAdapter& ad = *ew.lora_w2;
    std::vector<float> z(static_cast<size_t>(n * ad.rank())), dz(static_cast<size_t>(n * ad.rank()), 0.0f);
    lora_down(ad, n, H, I, draws[1], static_cast<uint64_t>(row0 * I), z.data());
    lora_up_backward(ad, n, dY, D, z.data(), 0, D, dz.data());
    lora_down_backward(ad, n, dz.data(), H, I, draws[1], static_cast<uint64_t>(row0 * I), dH, I);
  }
  swiglu_clamp_backward_rows<float>(G, U, w, dH, dG, dU, dw, n, I, limit);
  if (train1) pgemm_dW_rows(ew.precision, n, D, I, dG, I, X, D, ew.w1.grad_buffer().data<float>());
  if (train3) pgemm_dW_rows(ew.precision, n, D, I, dU, I, X, D, ew.w3.grad_buffer().data<float>());
  expert_dyW(ew, 1, n, dG, I, 0.0f, dX, D);
  expert_dyW(ew, 3, n, dU, I, 1.0f, dX, D);
  if (draws) expert_lora_in_backward(ew, X, dG, dU, n, D, I, draws, dX, row0);
}

}  // namespace

void ExpertWeights::set_frozen(int k, QuantizedWeight w, const Shape& expected) {
  DSV4_CHECK(k >= 1 && k <= 3, "ExpertWeights::set_frozen: k = {} (expected 1, 2 or 3)", k);
  Param& p = param(k);
  w.validate(p.name);
  DSV4_CHECK(w.shape() == expected, "{}: frozen weight {} does not match {}", p.name, w.str(), expected.str());
  frozen(k) = std::move(w);
  p.value = Tensor();
  p.grad = Tensor();
  p.trainable = false;
}

void ExpertWeights::unfreeze(int k) {
  QuantizedWeight& q = frozen(k);
  if (!q.defined()) return;
  Param& p = param(k);
  p.value = q.dequantize();
  p.grad = Tensor();
  p.trainable = true;
  q = QuantizedWeight();
}

MoE::MoE(std::string prefix, const ModelConfig& cfg, bool hash_routed, const Parallel* parallel)
    : prefix_(std::move(prefix)),
      parallel_(parallel),
      dim_(cfg.dim),
      n_experts_(cfg.n_routed_experts),
      top_k_(cfg.n_activated_experts),
      inter_(cfg.moe_inter_dim),
      vocab_(cfg.vocab_size),
      route_scale_(cfg.route_scale),
      limit_(cfg.swiglu_limit),
      hash_(hash_routed),
      has_shared_(cfg.n_shared_experts == 1) {
  DSV4_CHECK(cfg.score_func == ScoreFunc::SqrtSoftplus, "MoE {}: only score_func sqrtsoftplus is implemented", prefix_);
  DSV4_CHECK(cfg.n_shared_experts == 0 || cfg.n_shared_experts == 1,
             "MoE {}: n_shared_experts must be 0 or 1 (DeepSeek-V4 has 1), got {}", prefix_, cfg.n_shared_experts);
  DSV4_CHECK(top_k_ >= 1 && top_k_ <= n_experts_, "MoE {}: n_activated_experts {} outside [1, n_routed_experts={}]",
             prefix_, top_k_, n_experts_);
  const Range local = parallel_ ? parallel_->local_experts(n_experts_) : Range{0, n_experts_};
  expert_begin_ = local.begin;
  gate_weight = Param(prefix_ + "gate.weight", Shape{n_experts_, dim_});
  if (hash_) {
    tid2eid.name = prefix_ + "gate.tid2eid";
    tid2eid.value = Tensor::zeros({vocab_, top_k_}, DType::I64);
    tid2eid.trainable = false;
  } else {
    gate_bias = Param(prefix_ + "gate.bias", Shape{n_experts_});
    gate_bias.trainable = false;
  }
  experts.reserve(static_cast<size_t>(local.size()));
  for (int64_t e = local.begin; e < local.end; ++e)
    experts.push_back(make_expert(prefix_ + "experts." + std::to_string(e) + ".", dim_, inter_));
  if (has_shared_) shared = make_expert(prefix_ + "shared_experts.", dim_, inter_);
  sync_placements();
}

void MoE::sync_placements() {
  const bool tp_partial = parallel_ && parallel_->tp_size() > 1;
  auto mark_expert = [](ExpertWeights& ew, Placement pl) {
    for (int k = 1; k <= 3; ++k) ew.param(k).placement = pl;
    for (int k : {1, 2, 3, 13})
      if (ew.lora(k)) {
        ew.lora(k)->A.placement = pl;
        ew.lora(k)->B.placement = pl;
      }
  };
  for (auto& ew : experts) mark_expert(ew, Placement::Expert);
  if (tp_partial) {
    gate_weight.placement = Placement::TpPartial;
    if (gate_lora) {
      gate_lora->A.placement = Placement::TpPartial;
      gate_lora->B.placement = Placement::TpPartial;
    }
    if (has_shared_) mark_expert(shared, Placement::TpPartial);
  }
}

void MoE::visit(const ParamVisitor& f) {
  sync_placements();
  f(gate_weight);
  if (gate_lora) gate_lora->visit(f);
  if (hash_)
    f(tid2eid);
  else
    f(gate_bias);
  for (auto& e : experts) e.visit(f);
  if (has_shared_) shared.visit(f);
}

bool MoE::has_lora() const {
  bool any = gate_lora.has_value() || (has_shared_ && shared.has_lora());
  for (const auto& ew : experts) any = any || ew.has_lora();
  return any;
}

std::vector<uint64_t> MoE::lora_draws() const {
  std::vector<uint64_t> draws;
  if (!has_lora()) return draws;
  const int64_t D = dim_, E = n_experts_, I = inter_, EL = n_local_experts();
  DSV4_CHECK(!gate_lora || (gate_lora->in_features() == D && gate_lora->out_features() == E),
             "MoE {}: adapter {} must be A [r, {}], B [{}, r]", prefix_, gate_lora->unit, D, E);
  draws.assign(static_cast<size_t>(1 + 4 * (EL + 1)), 0);
  draws[0] = gate_lora ? gate_lora->next_draw() : 0;
  for (int64_t e = 0; e < EL; ++e) {
    check_expert_lora(experts[static_cast<size_t>(e)], D, I);
    expert_lora_draws(experts[static_cast<size_t>(e)], draws.data() + 1 + 4 * e);
  }
  if (has_shared_) {
    check_expert_lora(shared, D, I);
    expert_lora_draws(shared, draws.data() + 1 + 4 * EL);
  }
  return draws;
}

std::vector<int64_t> MoE::hash_expert_ids(const Tensor& input_ids_T, int64_t T, int64_t t0, int64_t rows) const {
  const int64_t E = n_experts_, K = top_k_;
  DSV4_CHECK(input_ids_T.defined() && input_ids_T.dtype() == DType::I64 && input_ids_T.numel() == T,
             "MoE {}: hash routing needs I64 input_ids with {} entries, got {}", prefix_, T,
             input_ids_T.defined() ? input_ids_T.str() : std::string("none"));
  DSV4_CHECK(tid2eid.value.dtype() == DType::I64 && tid2eid.value.shape() == (Shape{vocab_, K}) &&
                 tid2eid.value.is_contiguous(),
             "MoE {}: {} must be a contiguous I64 [{}, {}] tensor, got {}", prefix_, tid2eid.name, vocab_, K,
             tid2eid.value.str());
  const Tensor ids = input_ids_T.contiguous().to(Device::cpu());
  const int64_t* id = ids.data<int64_t>() + t0;
  for (int64_t t = 0; t < rows; ++t)
    DSV4_CHECK(id[t] >= 0 && id[t] < vocab_, "MoE {}: input id {} at position {} outside [0, {})", prefix_, id[t],
               t0 + t, vocab_);
  // The table's rows of these ids (gathered where the table lives: a device table is not copied whole).
  std::vector<int64_t> fixed(static_cast<size_t>(rows * K));
  if (tid2eid.value.device().is_cpu()) {
    const int64_t* table = tid2eid.value.data<int64_t>();
    for (int64_t t = 0; t < rows; ++t) std::copy_n(table + id[t] * K, K, fixed.data() + t * K);
  } else if (rows > 0) {
    const Tensor g = ops::index_select(tid2eid.value, ids.slice(0, t0, t0 + rows).to(tid2eid.value.device()))
                         .to(Device::cpu());
    std::copy_n(g.data<int64_t>(), rows * K, fixed.data());
  }
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = fixed[static_cast<size_t>(t * K + j)];
      DSV4_CHECK(e >= 0 && e < E, "MoE {}: {}[{}, {}] = {} is not an expert id in [0, {})", prefix_, tid2eid.name,
                 id[t], j, e, E);
    }
  return fixed;
}

Tensor MoE::forward(const Tensor& x_TD, const Tensor& input_ids_T, const SeqLayout& layout, MoECtx* ctx,
                    MoEStats* stats) const {
  if (use_ops_path(x_TD)) return forward_ops(x_TD, input_ids_T, layout, ctx, stats);
  check_rows("MoE.forward", x_TD, dim_);
  const int64_t T = x_TD.size(0), D = dim_, E = n_experts_, K = top_k_, I = inter_;
  const int64_t EL = n_local_experts();
  DSV4_CHECK(layout.tokens() == T, "MoE {}: layout {} x {} does not cover the {} input rows", prefix_, layout.batch,
             layout.seq, T);
  check_weight(gate_weight, Shape{E, D});
  for (const auto& ew : experts) {
    check_expert_weight(ew, 1, Shape{I, D});
    check_expert_weight(ew, 3, Shape{I, D});
    check_expert_weight(ew, 2, Shape{D, I});
  }
  if (has_shared_) {
    check_expert_weight(shared, 1, Shape{I, D});
    check_expert_weight(shared, 3, Shape{I, D});
    check_expert_weight(shared, 2, Shape{D, I});
  }
  const Communicator* tpg = parallel_ ? parallel_->tp() : nullptr;
  const Communicator* epg = parallel_ ? parallel_->ep() : nullptr;
  // ---- this rank's token rows (sequence-parallel over tp) ----
  std::vector<int64_t> tp_rows = split_rows(tpg, T);
  const int64_t tpr = group_rank(tpg);
  int64_t t0 = 0;
  for (int64_t r = 0; r < tpr; ++r) t0 += tp_rows[static_cast<size_t>(r)];
  const int64_t TL = tp_rows[static_cast<size_t>(tpr)];
  const Tensor xl = take_rows(tpg, x_TD, tp_rows);

  // LoRA dropout draws (see MoECtx::lora_draws); empty when no adapter is attached.
  std::vector<uint64_t> draws = lora_draws();
  auto expert_draws = [&](int64_t e) -> const uint64_t* {  // local index; e = EL: the shared expert
    return draws.empty() ? nullptr : draws.data() + 1 + 4 * e;
  };

  const float* x = xl.data<float>();
  Tensor s = Tensor::empty({TL, E}, DType::F32);
  Tensor aff = Tensor::empty({TL, E}, DType::F32);
  Tensor idx = Tensor::empty({TL, K}, DType::I64);
  Tensor w = Tensor::empty({TL, K}, DType::F32);
  if (TL > 0) {
    cpu_gemm(false, true, TL, E, D, 1.0f, x, D, gate_weight.value.data<float>(), D, 0.0f, s.data<float>(), E);
    if (gate_lora) {
      std::vector<float> z(static_cast<size_t>(TL * gate_lora->rank()));
      lora_down(*gate_lora, TL, x, D, draws[0], static_cast<uint64_t>(t0 * D), z.data());
      lora_up(*gate_lora, TL, z.data(), 0, E, s.data<float>(), E);
    }
    sqrt_softplus_rows<float>(s.data<float>(), aff.data<float>(), TL * E);
  }

  // ---- routing ----
  std::vector<int64_t> fixed;
  if (hash_) {
    fixed = hash_expert_ids(input_ids_T, T, t0, TL);
  } else {
    DSV4_CHECK(gate_bias.value.dtype() == DType::F32 && gate_bias.value.shape() == (Shape{E}) &&
                   gate_bias.value.is_contiguous(),
               "MoE {}: {} must be a contiguous F32 [{}] tensor, got {}", prefix_, gate_bias.name, E,
               gate_bias.value.str());
  }
  moe_route_rows<float>(aff.data<float>(), hash_ ? nullptr : gate_bias.value.data<float>(),
                        hash_ ? fixed.data() : nullptr, TL, E, K, route_scale_, idx.data<int64_t>(), w.data<float>());

  // ---- stats: local loads; balance term from the tp-summed row statistics ----
  const int64_t* ip = idx.data<int64_t>();
  MoEStats st;
  st.load.assign(static_cast<size_t>(E), 0);
  for (int64_t n = 0; n < TL * K; ++n) ++st.load[static_cast<size_t>(ip[n])];
  std::vector<double> bstat;  // [counts B*E | psum B*E]
  const int64_t BE = std::max<int64_t>(layout.batch, 0) * E;
  if (layout.batch > 0 && layout.seq > 0) {
    bstat.assign(static_cast<size_t>(2 * BE), 0.0);
    moe_balance_partials<float>(aff.data<float>(), ip, t0, TL, layout.batch, layout.seq, E, K, bstat.data(),
                                bstat.data() + BE);
    group_sum(tpg, bstat);
    st.balance_term = moe_balance_term_from(bstat.data(), bstat.data() + BE, layout.batch, layout.seq, E, K);
  }

  // ---- dispatch: counting sort of the N = TL*K slots by expert (token-ascending inside an expert). Experts are
  // contiguous per owner, so this order is also grouped by destination ep rank: it is the send order. ----
  const int64_t N = TL * K;
  std::vector<int64_t> offsets(static_cast<size_t>(E + 1), 0);
  for (int64_t e = 0; e < E; ++e)
    offsets[static_cast<size_t>(e + 1)] = offsets[static_cast<size_t>(e)] + st.load[static_cast<size_t>(e)];
  std::vector<int64_t> sorted_slot(static_cast<size_t>(N));
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t n = 0; n < N; ++n) sorted_slot[static_cast<size_t>(fill[static_cast<size_t>(ip[n])]++)] = n;
  }
  const int64_t EP = group_size(epg);
  std::vector<int64_t> send_rows(static_cast<size_t>(EP), 0);
  for (int64_t e = 0; e < E; ++e)
    send_rows[static_cast<size_t>(epg ? parallel_->expert_owner(E, e) : 0)] += st.load[static_cast<size_t>(e)];
  const std::vector<int64_t> recv_rows = epg ? epg->exchange_counts(send_rows) : send_rows;
  // payload: [x row | w] per slot, and the slot's global expert id
  Tensor send_x = Tensor::empty({N, D + 1}, DType::F32);
  Tensor send_e = Tensor::empty({N}, DType::I64);
  {
    float* px = send_x.data<float>();
    int64_t* pe = send_e.data<int64_t>();
    const float* wp = w.data<float>();
    for (int64_t p = 0; p < N; ++p) {
      const int64_t slot = sorted_slot[static_cast<size_t>(p)];
      std::copy(x + (slot / K) * D, x + (slot / K + 1) * D, px + p * (D + 1));
      px[p * (D + 1) + D] = wp[slot];
      pe[p] = ip[slot];
    }
  }
  const Tensor recv_x = exchange_rows(epg, send_x, send_rows, recv_rows);
  const Tensor recv_e = exchange_rows(epg, send_e, send_rows, recv_rows);
  const int64_t NR = recv_x.size(0);
  // received slots grouped by local expert (stable: source rank, then the sender's order)
  std::vector<int64_t> recv_offsets(static_cast<size_t>(EL + 1), 0);
  std::vector<int64_t> recv_sorted(static_cast<size_t>(NR));
  {
    const int64_t* re = recv_e.data<int64_t>();
    for (int64_t n = 0; n < NR; ++n) {
      const int64_t le = re[n] - expert_begin_;
      DSV4_CHECK(le >= 0 && le < EL, "MoE {}: received a slot for expert {}, not held here", prefix_, re[n]);
      ++recv_offsets[static_cast<size_t>(le + 1)];
    }
    for (int64_t e = 0; e < EL; ++e) recv_offsets[static_cast<size_t>(e + 1)] += recv_offsets[static_cast<size_t>(e)];
    std::vector<int64_t> fill(recv_offsets.begin(), recv_offsets.end() - 1);
    for (int64_t n = 0; n < NR; ++n)
      recv_sorted[static_cast<size_t>(fill[static_cast<size_t>(re[n] - expert_begin_)]++)] = n;
  }
  int64_t max_rows = 0;
  for (int64_t e = 0; e < EL; ++e)
    max_rows = std::max(max_rows, recv_offsets[static_cast<size_t>(e + 1)] - recv_offsets[static_cast<size_t>(e)]);

  // ---- local experts on the received slots ----
  Tensor out_recv = Tensor::empty({NR, D}, DType::F32);
  Tensor g_all, u_all;
  if (ctx) {
    g_all = Tensor::empty({NR, I}, DType::F32);
    u_all = Tensor::empty({NR, I}, DType::F32);
  }
  {
    std::vector<float> Xe(static_cast<size_t>(max_rows * D)), Ye(static_cast<size_t>(max_rows * D));
    std::vector<float> He(static_cast<size_t>(max_rows * I)), we(static_cast<size_t>(max_rows));
    std::vector<float> Gt, Ut;
    if (!ctx) {
      Gt.resize(static_cast<size_t>(max_rows * I));
      Ut.resize(static_cast<size_t>(max_rows * I));
    }
    const float* rx = recv_x.data<float>();
    float* po = out_recv.data<float>();
    for (int64_t e = 0; e < EL; ++e) {
      const int64_t o = recv_offsets[static_cast<size_t>(e)], n = recv_offsets[static_cast<size_t>(e + 1)] - o;
      if (n == 0) continue;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = recv_sorted[static_cast<size_t>(o + r)];
        std::copy(rx + row * (D + 1), rx + row * (D + 1) + D, Xe.data() + r * D);
        we[static_cast<size_t>(r)] = rx[row * (D + 1) + D];
      }
      float* G = ctx ? g_all.data<float>() + o * I : Gt.data();
      float* U = ctx ? u_all.data<float>() + o * I : Ut.data();
      expert_forward(experts[static_cast<size_t>(e)], Xe.data(), we.data(), n, D, I, limit_, G, U, He.data(),
                     Ye.data(), expert_draws(e));
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = recv_sorted[static_cast<size_t>(o + r)];
        std::copy(Ye.data() + r * D, Ye.data() + (r + 1) * D, po + row * D);
      }
    }
  }
  // ---- combine on the source rank in the send (= ascending expert) order ----
  const Tensor back = exchange_rows(epg, out_recv, recv_rows, send_rows);
  Tensor yl = Tensor::zeros({TL, D}, DType::F32);
  float* yp = yl.data<float>();
  {
    const float* pb = back.data<float>();
    for (int64_t p = 0; p < N; ++p) {
      float* d = yp + (sorted_slot[static_cast<size_t>(p)] / K) * D;
      const float* src = pb + p * D;
      for (int64_t i = 0; i < D; ++i) d[i] += src[i];
    }
  }

  // ---- shared expert ----
  Tensor sg, su;
  if (has_shared_) {
    sg = Tensor::empty({TL, I}, DType::F32);
    su = Tensor::empty({TL, I}, DType::F32);
    if (TL > 0) {
      Tensor sh = Tensor::empty({TL, I}, DType::F32);
      Tensor sy = Tensor::empty({TL, D}, DType::F32);
      expert_forward(shared, x, nullptr, TL, D, I, limit_, sg.data<float>(), su.data<float>(), sh.data<float>(),
                     sy.data<float>(), expert_draws(EL), t0);
      const float* syp = sy.data<float>();
      for (int64_t i = 0; i < TL * D; ++i) yp[i] += syp[i];
    }
  }
  Tensor y = gather_rows(tpg, yl, tp_rows);

  if (stats) *stats = st;
  if (ctx) {
    ctx->x = xl;
    ctx->s = s;
    ctx->aff = aff;
    ctx->idx = idx;
    ctx->w = w;
    ctx->offsets = std::move(offsets);
    ctx->sorted_slot = std::move(sorted_slot);
    ctx->tp_rows = std::move(tp_rows);
    ctx->t0 = t0;
    ctx->send_rows = std::move(send_rows);
    ctx->recv_rows = recv_rows;
    ctx->recv_x = recv_x;
    ctx->recv_offsets = std::move(recv_offsets);
    ctx->recv_sorted = std::move(recv_sorted);
    ctx->g = g_all;
    ctx->u = u_all;
    ctx->shared_g = sg;
    ctx->shared_u = su;
    ctx->batch = layout.batch;
    ctx->seq = layout.seq;
    bstat.resize(static_cast<size_t>(BE));
    ctx->balance_counts = std::move(bstat);
    ctx->stats = std::move(st);
    ctx->lora_draws = std::move(draws);
  }
  return y;
}

Tensor MoE::backward(const Tensor& dy_TD, const MoECtx& ctx, double balance_alpha) {
  if (ctx.ops_path) return backward_ops(dy_TD, ctx, balance_alpha);
  check_rows("MoE.backward", dy_TD, dim_);
  const int64_t T = dy_TD.size(0), D = dim_, E = n_experts_, K = top_k_, I = inter_;
  const int64_t EL = n_local_experts();
  int64_t T_ctx = 0;
  for (int64_t r : ctx.tp_rows) T_ctx += r;
  DSV4_CHECK(ctx.x.defined() && T_ctx == T && ctx.idx.defined() &&
                 static_cast<int64_t>(ctx.offsets.size()) == E + 1 &&
                 static_cast<int64_t>(ctx.recv_offsets.size()) == EL + 1,
             "MoE {}: backward dy {} does not match the forward context (x {})", prefix_, dy_TD.str(),
             ctx.x.defined() ? ctx.x.str() : std::string("none"));
  const Communicator* tpg = parallel_ ? parallel_->tp() : nullptr;
  const Communicator* epg = parallel_ ? parallel_->ep() : nullptr;
  const int64_t TL = ctx.x.size(0), t0 = ctx.t0;
  const Tensor dyl = take_rows(tpg, dy_TD, ctx.tp_rows);
  const float* x = ctx.x.data<float>();
  const float* dy = dyl.data<float>();
  const int64_t* ip = ctx.idx.data<int64_t>();
  const int64_t N = TL * K;
  DSV4_CHECK(!has_lora() || ctx.lora_draws.size() == static_cast<size_t>(1 + 4 * (EL + 1)),
             "MoE {}: backward through adapters without their forward context", prefix_);
  auto expert_draws = [&](int64_t e) -> const uint64_t* {
    return ctx.lora_draws.empty() ? nullptr : ctx.lora_draws.data() + 1 + 4 * e;
  };

  // ---- dy of each slot to the expert's rank ----
  Tensor send_dy = Tensor::empty({N, D}, DType::F32);
  {
    float* pd = send_dy.data<float>();
    for (int64_t p = 0; p < N; ++p) {
      const int64_t t = ctx.sorted_slot[static_cast<size_t>(p)] / K;
      std::copy(dy + t * D, dy + (t + 1) * D, pd + p * D);
    }
  }
  const Tensor recv_dy = exchange_rows(epg, send_dy, ctx.send_rows, ctx.recv_rows);
  const int64_t NR = ctx.recv_x.size(0);

  // ---- local experts: [dx | dw] per received slot ----
  Tensor back_recv = Tensor::empty({NR, D + 1}, DType::F32);
  int64_t max_rows = 0;
  for (int64_t e = 0; e < EL; ++e)
    max_rows =
        std::max(max_rows, ctx.recv_offsets[static_cast<size_t>(e + 1)] - ctx.recv_offsets[static_cast<size_t>(e)]);
  {
    std::vector<float> Xe(static_cast<size_t>(max_rows * D)), dYe(static_cast<size_t>(max_rows * D)),
        dXe(static_cast<size_t>(max_rows * D));
    std::vector<float> H(static_cast<size_t>(max_rows * I)), dH(static_cast<size_t>(max_rows * I)),
        dG(static_cast<size_t>(max_rows * I)), dU(static_cast<size_t>(max_rows * I));
    std::vector<float> we(static_cast<size_t>(max_rows)), dwe(static_cast<size_t>(max_rows));
    const float* rx = ctx.recv_x.data<float>();
    const float* rdy = recv_dy.data<float>();
    float* pb = back_recv.data<float>();
    for (int64_t e = 0; e < EL; ++e) {
      const int64_t o = ctx.recv_offsets[static_cast<size_t>(e)], n = ctx.recv_offsets[static_cast<size_t>(e + 1)] - o;
      if (n == 0) continue;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = ctx.recv_sorted[static_cast<size_t>(o + r)];
        std::copy(rx + row * (D + 1), rx + row * (D + 1) + D, Xe.data() + r * D);
        we[static_cast<size_t>(r)] = rx[row * (D + 1) + D];
        std::copy(rdy + row * D, rdy + (row + 1) * D, dYe.data() + r * D);
      }
      expert_backward(experts[static_cast<size_t>(e)], Xe.data(), ctx.g.data<float>() + o * I,
                      ctx.u.data<float>() + o * I, we.data(), dYe.data(), n, D, I, limit_, H.data(), dH.data(),
                      dG.data(), dU.data(), dwe.data(), dXe.data(), expert_draws(e));
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = ctx.recv_sorted[static_cast<size_t>(o + r)];
        std::copy(dXe.data() + r * D, dXe.data() + (r + 1) * D, pb + row * (D + 1));
        pb[row * (D + 1) + D] = dwe[static_cast<size_t>(r)];
      }
    }
  }
  const Tensor back = exchange_rows(epg, back_recv, ctx.recv_rows, ctx.send_rows);
  Tensor dxl = Tensor::zeros({TL, D}, DType::F32);
  float* dxp = dxl.data<float>();
  std::vector<float> dw(static_cast<size_t>(N), 0.0f);  // d loss / d w, slot order t*K+j
  {
    const float* pb = back.data<float>();
    for (int64_t p = 0; p < N; ++p) {
      const int64_t slot = ctx.sorted_slot[static_cast<size_t>(p)];
      float* d = dxp + (slot / K) * D;
      const float* src = pb + p * (D + 1);
      for (int64_t i = 0; i < D; ++i) d[i] += src[i];
      dw[static_cast<size_t>(slot)] = src[D];
    }
  }

  // ---- shared expert ----
  if (has_shared_ && TL > 0) {
    std::vector<float> H(static_cast<size_t>(TL * I)), dH(static_cast<size_t>(TL * I)),
        dG(static_cast<size_t>(TL * I)), dU(static_cast<size_t>(TL * I)), dXs(static_cast<size_t>(TL * D));
    expert_backward(shared, x, ctx.shared_g.data<float>(), ctx.shared_u.data<float>(), nullptr, dy, TL, D, I, limit_,
                    H.data(), dH.data(), dG.data(), dU.data(), nullptr, dXs.data(), expert_draws(EL), t0);
    for (int64_t i = 0; i < TL * D; ++i) dxp[i] += dXs[static_cast<size_t>(i)];
  }

  // ---- router: w -> aff (+ balance loss) -> s -> (gate.weight, x) ----
  if (TL > 0) {
    Tensor daff = Tensor::zeros({TL, E}, DType::F32);
    moe_route_backward_rows<float>(ctx.aff.data<float>(), ip, dw.data(), TL, E, K, route_scale_, daff.data<float>());
    if (balance_alpha != 0.0 && !ctx.balance_counts.empty())
      moe_balance_backward_rows<float>(ctx.aff.data<float>(), ctx.balance_counts.data(), t0, TL, ctx.batch, ctx.seq,
                                       E, K, balance_alpha, daff.data<float>());
    Tensor ds = Tensor::empty({TL, E}, DType::F32);
    sqrt_softplus_backward_rows<float>(ctx.s.data<float>(), ctx.aff.data<float>(), daff.data<float>(),
                                       ds.data<float>(), TL * E);
    if (gate_weight.trainable)
      cpu_gemm(true, false, E, D, TL, 1.0f, ds.data<float>(), E, x, D, 1.0f, gate_weight.grad_buffer().data<float>(),
               D);
    cpu_gemm(false, false, TL, D, E, 1.0f, ds.data<float>(), E, gate_weight.value.data<float>(), D, 1.0f, dxp, D);
    if (gate_lora) {
      const int64_t r = gate_lora->rank();
      const uint64_t mo = static_cast<uint64_t>(t0 * D);
      std::vector<float> z(static_cast<size_t>(TL * r)), dz(static_cast<size_t>(TL * r), 0.0f);
      lora_down(*gate_lora, TL, x, D, ctx.lora_draws[0], mo, z.data());
      lora_up_backward(*gate_lora, TL, ds.data<float>(), E, z.data(), 0, E, dz.data());
      lora_down_backward(*gate_lora, TL, dz.data(), x, D, ctx.lora_draws[0], mo, dxp, D);
    }
  }
  return gather_rows(tpg, dxl, ctx.tp_rows);
}

}  // namespace dsv4
