// DeepSeekMoE block: the tensor-op path (model/exec_path.h) that CUDA tensors take, built from runtime ops with CPU
// twins (runtime/model_ops.h: sqrt_softplus, moe_route, moe_sort_slots, moe_permute, swiglu, moe_unpermute and their
// backwards; model/matmul_precision.h: the expert GEMMs in the MoE's precision). It performs the operations of the
// CPU reference (moe.cpp) in the same order on the same operands:
//   * the slots are sorted by expert, token-ascending inside an expert (moe_sort_slots = the reference's counting
//     sort), each expert multiplies its row range of the sorted rows, and the combine sums a token's slots in
//     ascending sorted position from +0, then adds the shared expert (moe_unpermute, then one add);
//   * the routing weight multiplies the activations before w2 (swiglu with w), as in the reference;
//   * dX = dG W1, then += dU W3 with beta = 1 inside the second GEMM, as the reference's expert_dyW calls.
// So on the CPU (ForceOpsPath) the path is bit-identical to the reference in fp32 (tests/model/test_moe_ops_path.cpp
// checks it); in bf16 / fp8 the GEMMs with beta = 1 may round differently. The balance-loss statistics and its
// gradient (T x E values) are computed on the host with the reference's functions. Not on this path yet (one-line
// errors): expert / tensor parallelism. Adapters run through lora.h's tensor forms with the reference's draws and mask
// offsets; frozen (quantised) expert weights through qmatmul (FP32, like the reference's tile GEMMs; Model::to converts
// FP4 experts to FP8 losslessly off the CPU).
#include "model/exec_path.h"
#include "model/moe.h"
#include "model/quant.h"
#include "runtime/model_ops.h"
#include "runtime/ops.h"

namespace dsv4 {

namespace {

void check_on(const std::string& what, const Tensor& t, const Shape& shape, Device dev) {
  DSV4_CHECK(t.defined() && t.dtype() == DType::F32 && t.shape() == shape && t.is_contiguous() && t.device() == dev,
             "{}: expected a contiguous F32 {} tensor on {}, got {}", what, shape.str(), dev.str(),
             t.defined() ? t.str() : std::string("undefined"));
}

// The expert's weights (frozen or F32) and adapters on `dev`.
void check_expert_on(const ExpertWeights& ew, int64_t D, int64_t I, Device dev, const std::string& prefix) {
  for (int k = 1; k <= 3; ++k) {
    const QuantizedWeight& q = ew.frozen(k);
    if (q.defined())
      DSV4_CHECK(q.data.device() == dev, "MoE {}: frozen weight {} is on {}, the input on {}", prefix,
                 ew.param(k).name, q.data.device().str(), dev.str());
    else
      check_on("MoE " + prefix + ": parameter " + ew.param(k).name, ew.param(k).value,
               k == 2 ? Shape{D, I} : Shape{I, D}, dev);
  }
  for (int k : {1, 2, 3, 13})
    if (ew.lora(k))
      for (const Param* p : {&ew.lora(k)->A, &ew.lora(k)->B})
        DSV4_CHECK(p->value.defined() && p->value.device() == dev, "MoE {}: adapter parameter {} is on {}, the input on {}",
                   prefix, p->name, p->value.defined() ? p->value.device().str() : std::string("nowhere"), dev.str());
}

// y = beta y + r (y a row range of a wider tensor).
void store(const Tensor& r, float beta, Tensor& y) { ops::copy(beta == 0.0f ? r : ops::add(y, r), y); }

// Y [n, out] = X [n, in] W_k^T + beta Y with the frozen weight (qgemm: FP32, the CPU's tile GEMMs on the CPU) or the
// F32 weight in the expert's precision.
void expert_xwT(const ExpertWeights& ew, int k, const Tensor& X, float beta, Tensor& Y) {
  const QuantizedWeight& q = ew.frozen(k);
  if (!q.defined()) {
    pgemm_xwT(ew.precision, X, ew.param(k).value, beta, Y);
  } else if (X.device().is_cpu()) {  // the reference's call, beta inside the tile GEMMs
    if (X.size(0) > 0)
      qgemm_xwT(q, X.size(0), X.data<float>(), X.stride(0), beta, Y.data<float>(), Y.stride(0));
  } else {
    store(qmatmul_xwT(X, q), beta, Y);
  }
}

// dX [n, in] = dY [n, out] W_k + beta dX.
void expert_dyW(const ExpertWeights& ew, int k, const Tensor& dY, float beta, Tensor& dX) {
  const QuantizedWeight& q = ew.frozen(k);
  if (!q.defined()) {
    pgemm_dyW(ew.precision, dY, ew.param(k).value, beta, dX);
  } else if (dY.device().is_cpu()) {
    if (dY.size(0) > 0)
      qgemm_dyW(q, dY.size(0), dY.data<float>(), dY.stride(0), beta, dX.data<float>(), dX.stride(0));
  } else {
    store(qmatmul_dyW(dY, q), beta, dX);
  }
}

bool trainable(const ExpertWeights& ew, int k) { return !ew.frozen(k).defined() && ew.param(k).trainable; }

// One expert on rows X [n, D] with routing weights w [n] (undefined: the shared expert). Writes the pre-clamp
// G, U [n, I] and Y [n, D] (row ranges of larger tensors are fine). draws: the expert's 4 adapter draws (null: no
// adapters); row0: the global row of X[0] for the dropout masks (moe.cpp's expert_forward).
void expert_forward_ops(const ExpertWeights& ew, const Tensor& X, const Tensor& w, double limit, Tensor& G, Tensor& U,
                        Tensor& Y, const uint64_t* draws, int64_t row0) {
  const int64_t D = X.size(1), I = G.size(1);
  expert_xwT(ew, 1, X, 0.0f, G);
  expert_xwT(ew, 3, X, 0.0f, U);
  const uint64_t mo = static_cast<uint64_t>(row0 * D);
  if (draws && ew.lora_w1) lora_up(*ew.lora_w1, lora_down(*ew.lora_w1, X, draws[0], mo), 0, G);
  if (draws && ew.lora_w3) lora_up(*ew.lora_w3, lora_down(*ew.lora_w3, X, draws[2], mo), 0, U);
  if (draws && ew.lora_w13) {
    const Tensor z = lora_down(*ew.lora_w13, X, draws[3], mo);
    lora_up(*ew.lora_w13, z, 0, G);
    lora_up(*ew.lora_w13, z, I, U);
  }
  const Tensor H = swiglu(G, U, w, limit);
  expert_xwT(ew, 2, H, 0.0f, Y);
  if (draws && ew.lora_w2)
    lora_up(*ew.lora_w2, lora_down(*ew.lora_w2, H, draws[1], static_cast<uint64_t>(row0 * I)), 0, Y);
}

// Backward of expert_forward_ops given dY [n, D]: dX [n, D] written, d(loss)/dw [n] returned (with w), weight and
// adapter gradients accumulated (trainable weights only), in moe.cpp's expert_backward order.
Tensor expert_backward_ops(ExpertWeights& ew, const Tensor& X, const Tensor& G, const Tensor& U, const Tensor& w,
                           const Tensor& dY, double limit, Tensor& dX, const uint64_t* draws, int64_t row0) {
  const int64_t n = X.size(0), D = X.size(1), I = G.size(1);
  const bool lora2 = draws && ew.lora_w2;
  Tensor dH = Tensor::empty({n, I}, DType::F32, X.device());
  expert_dyW(ew, 2, dY, 0.0f, dH);
  if (trainable(ew, 2) || lora2) {
    const Tensor H = swiglu(G, U, w, limit);
    if (trainable(ew, 2)) pgemm_dW(ew.precision, dY, H, ew.w2.grad_buffer());
    if (lora2) {
      LoraAdapter& ad = *ew.lora_w2;
      const uint64_t mo = static_cast<uint64_t>(row0 * I);
      const Tensor z = lora_down(ad, H, draws[1], mo);
      Tensor dz = Tensor::zeros({n, ad.rank()}, DType::F32, X.device());
      lora_up_backward(ad, dY, z, 0, dz);
      lora_down_backward(ad, dz, H, draws[1], mo, &dH);
    }
  }
  SwigluGrad g = swiglu_backward(G, U, w, dH, limit);
  if (trainable(ew, 1)) pgemm_dW(ew.precision, g.dg, X, ew.w1.grad_buffer());
  if (trainable(ew, 3)) pgemm_dW(ew.precision, g.du, X, ew.w3.grad_buffer());
  expert_dyW(ew, 1, g.dg, 0.0f, dX);
  expert_dyW(ew, 3, g.du, 1.0f, dX);
  if (draws) {
    const uint64_t mo = static_cast<uint64_t>(row0 * D);
    auto input_side = [&](LoraAdapter& ad, uint64_t draw, bool to_g, bool to_u) {
      const Tensor z = lora_down(ad, X, draw, mo);
      Tensor dz = Tensor::zeros({n, ad.rank()}, DType::F32, X.device());
      if (to_g) lora_up_backward(ad, g.dg, z, 0, dz);
      if (to_u) lora_up_backward(ad, g.du, z, to_g ? I : 0, dz);
      lora_down_backward(ad, dz, X, draw, mo, &dX);
    };
    if (ew.lora_w1) input_side(*ew.lora_w1, draws[0], true, false);
    if (ew.lora_w3) input_side(*ew.lora_w3, draws[2], false, true);
    if (ew.lora_w13) input_side(*ew.lora_w13, draws[3], true, true);
  }
  return g.dw;
}

std::vector<int64_t> host_i64(const Tensor& t) {
  const Tensor h = t.contiguous().to(Device::cpu());
  return std::vector<int64_t>(h.data<int64_t>(), h.data<int64_t>() + h.numel());
}

}  // namespace

Tensor MoE::forward_ops(const Tensor& x_TD, const Tensor& input_ids_T, const SeqLayout& layout, MoECtx* ctx,
                        MoEStats* stats) const {
  const Device dev = x_TD.device();
  const int64_t D = dim_, E = n_experts_, K = top_k_, I = inter_, EL = n_local_experts();
  DSV4_CHECK(x_TD.defined() && x_TD.dtype() == DType::F32 && x_TD.ndim() == 2 && x_TD.size(1) == D &&
                 x_TD.is_contiguous(),
             "MoE {}: expected a contiguous F32 [T, {}] input, got {}", prefix_, D, x_TD.str());
  const int64_t T = x_TD.size(0), N = T * K;
  DSV4_CHECK(layout.tokens() == T, "MoE {}: layout {} x {} does not cover the {} input rows", prefix_, layout.batch,
             layout.seq, T);
  DSV4_CHECK(!parallel_ || (group_size(parallel_->tp()) == 1 && group_size(parallel_->ep()) == 1),
             "MoE {}: tensor / expert parallelism on {} tensors is not implemented yet (tp = {}, ep = {})", prefix_,
             dev.str(), group_size(parallel_ ? parallel_->tp() : nullptr),
             group_size(parallel_ ? parallel_->ep() : nullptr));
  check_on("MoE " + prefix_ + ": parameter " + gate_weight.name, gate_weight.value, Shape{E, D}, dev);
  if (!hash_) check_on("MoE " + prefix_ + ": parameter " + gate_bias.name, gate_bias.value, Shape{E}, dev);
  for (const auto& ew : experts) check_expert_on(ew, D, I, dev, prefix_);
  if (has_shared_) check_expert_on(shared, D, I, dev, prefix_);

  // LoRA dropout draws (MoECtx::lora_draws), in the reference's order.
  std::vector<uint64_t> draws = lora_draws();
  auto expert_draws = [&](int64_t e) -> const uint64_t* {  // local index; e = EL: the shared expert
    return draws.empty() ? nullptr : draws.data() + 1 + 4 * e;
  };

  // ---- router ----
  Tensor s = ops::matmul(x_TD, gate_weight.value, false, true);  // [T, E], FP32
  if (gate_lora && T > 0) lora_up(*gate_lora, lora_down(*gate_lora, x_TD, draws[0], 0), 0, s);
  const Tensor aff = sqrt_softplus(s);
  Tensor fixed;
  if (hash_)
    fixed = Tensor::from_vector<int64_t>({T, K}, hash_expert_ids(input_ids_T, T, 0, T)).to(dev);
  const MoeRoute route = moe_route(aff, hash_ ? Tensor() : gate_bias.value, fixed, K, route_scale_);

  // ---- stats on the host (T x E values): loads and the balance term's row statistics ----
  const MoeSlots slots = moe_sort_slots(route.idx, E);
  std::vector<int64_t> offsets = host_i64(slots.offsets);
  MoEStats st;
  st.load.resize(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    st.load[static_cast<size_t>(e)] = offsets[static_cast<size_t>(e + 1)] - offsets[static_cast<size_t>(e)];
  std::vector<double> bstat;  // [counts B*E | psum B*E]
  const int64_t BE = std::max<int64_t>(layout.batch, 0) * E;
  if (layout.batch > 0 && layout.seq > 0) {
    const Tensor aff_h = aff.to(Device::cpu());
    const std::vector<int64_t> idx_h = host_i64(route.idx);
    bstat.assign(static_cast<size_t>(2 * BE), 0.0);
    moe_balance_partials<float>(aff_h.data<float>(), idx_h.data(), 0, T, layout.batch, layout.seq, E, K, bstat.data(),
                                bstat.data() + BE);
    st.balance_term = moe_balance_term_from(bstat.data(), bstat.data() + BE, layout.batch, layout.seq, E, K);
  }

  // ---- routed experts on the expert-sorted slots ----
  Tensor g_all = Tensor::empty({N, I}, DType::F32, dev), u_all = Tensor::empty({N, I}, DType::F32, dev);
  Tensor y = Tensor::zeros({T, D}, DType::F32, dev);
  if (N > 0) {
    const Tensor x_sorted = moe_permute(x_TD, slots.sorted_slot, K);                       // [N, D]
    const Tensor w_sorted = moe_permute(route.w.view({N, 1}), slots.sorted_slot, 1).view({N});  // [N]
    Tensor y_sorted = Tensor::empty({N, D}, DType::F32, dev);
    for (int64_t e = 0; e < EL; ++e) {
      const int64_t o = offsets[static_cast<size_t>(e)], n = offsets[static_cast<size_t>(e + 1)] - o;
      if (n == 0) continue;
      Tensor G = g_all.slice(0, o, o + n), U = u_all.slice(0, o, o + n), Y = y_sorted.slice(0, o, o + n);
      expert_forward_ops(experts[static_cast<size_t>(e)], x_sorted.slice(0, o, o + n), w_sorted.slice(0, o, o + n),
                         limit_, G, U, Y, expert_draws(e), 0);
    }
    y = moe_unpermute(y_sorted, slots.sorted_slot, Tensor(), T, K);
  }

  // ---- shared expert ----
  Tensor sg, su;
  if (has_shared_) {
    sg = Tensor::empty({T, I}, DType::F32, dev);
    su = Tensor::empty({T, I}, DType::F32, dev);
    if (T > 0) {
      Tensor sy = Tensor::empty({T, D}, DType::F32, dev);
      expert_forward_ops(shared, x_TD, Tensor(), limit_, sg, su, sy, expert_draws(EL), 0);
      y = ops::add(y, sy);
    }
  }

  if (stats) *stats = st;
  if (ctx) {
    *ctx = MoECtx{};
    ctx->ops_path = true;
    ctx->x = x_TD;
    ctx->s = s;
    ctx->aff = aff;
    ctx->idx = route.idx;
    ctx->w = route.w;
    ctx->offsets = std::move(offsets);
    ctx->sorted_slot_N = slots.sorted_slot;
    ctx->tp_rows = {T};
    ctx->t0 = 0;
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

Tensor MoE::backward_ops(const Tensor& dy_TD, const MoECtx& ctx, double balance_alpha) {
  const int64_t D = dim_, E = n_experts_, K = top_k_, EL = n_local_experts();
  DSV4_CHECK(ctx.x.defined() && static_cast<int64_t>(ctx.offsets.size()) == E + 1,
             "MoE {}: backward without a forward context", prefix_);
  const Device dev = ctx.x.device();
  const int64_t T = ctx.x.size(0), N = T * K;
  check_on("MoE " + prefix_ + ": backward dy", dy_TD, Shape{T, D}, dev);
  DSV4_CHECK(!has_lora() || ctx.lora_draws.size() == static_cast<size_t>(1 + 4 * (EL + 1)),
             "MoE {}: backward through adapters without their forward context", prefix_);
  auto expert_draws = [&](int64_t e) -> const uint64_t* {
    return ctx.lora_draws.empty() ? nullptr : ctx.lora_draws.data() + 1 + 4 * e;
  };

  // ---- routed experts: dx and d(loss)/dw per sorted slot ----
  Tensor dx = Tensor::zeros({T, D}, DType::F32, dev);
  Tensor dw = Tensor::zeros({T, K}, DType::F32, dev);
  if (N > 0) {
    const Tensor& sorted_slot = ctx.sorted_slot_N;
    const Tensor x_sorted = moe_permute(ctx.x, sorted_slot, K);
    const Tensor w_sorted = moe_permute(ctx.w.view({N, 1}), sorted_slot, 1).view({N});
    const Tensor dy_sorted = moe_permute(dy_TD, sorted_slot, K);
    Tensor dx_sorted = Tensor::empty({N, D}, DType::F32, dev);
    Tensor dw_sorted = Tensor::zeros({N}, DType::F32, dev);
    for (int64_t e = 0; e < EL; ++e) {
      const int64_t o = ctx.offsets[static_cast<size_t>(e)], n = ctx.offsets[static_cast<size_t>(e + 1)] - o;
      if (n == 0) continue;
      Tensor dX = dx_sorted.slice(0, o, o + n);
      const Tensor dwe = expert_backward_ops(experts[static_cast<size_t>(e)], x_sorted.slice(0, o, o + n),
                                             ctx.g.slice(0, o, o + n), ctx.u.slice(0, o, o + n),
                                             w_sorted.slice(0, o, o + n), dy_sorted.slice(0, o, o + n), limit_, dX,
                                             expert_draws(e), 0);
      Tensor dst = dw_sorted.slice(0, o, o + n);
      ops::copy(dwe, dst);
    }
    dx = moe_unpermute(dx_sorted, sorted_slot, Tensor(), T, K);
    dw = moe_unpermute(dw_sorted.view({N, 1}), sorted_slot, Tensor(), N, 1).view({T, K});  // slot order t*K+j
  }

  // ---- shared expert ----
  if (has_shared_ && T > 0) {
    Tensor dxs = Tensor::empty({T, D}, DType::F32, dev);
    expert_backward_ops(shared, ctx.x, ctx.shared_g, ctx.shared_u, Tensor(), dy_TD, limit_, dxs, expert_draws(EL), 0);
    dx = ops::add(dx, dxs);
  }

  // ---- router: w -> aff (+ balance loss) -> s -> (gate.weight, x) ----
  if (T > 0) {
    Tensor daff = moe_route_backward(ctx.aff, ctx.idx, dw, route_scale_);
    if (balance_alpha != 0.0 && !ctx.balance_counts.empty()) {
      const Tensor aff_h = ctx.aff.to(Device::cpu());
      Tensor bal = Tensor::zeros({T, E}, DType::F32);
      moe_balance_backward_rows<float>(aff_h.data<float>(), ctx.balance_counts.data(), 0, T, ctx.batch, ctx.seq, E, K,
                                       balance_alpha, bal.data<float>());
      daff = ops::add(daff, bal.to(dev));
    }
    const Tensor ds = sqrt_softplus_backward(ctx.s, ctx.aff, daff);
    if (gate_weight.trainable) ops::gemm(ds, true, ctx.x, false, 1.0f, 1.0f, gate_weight.grad_buffer());
    ops::gemm(ds, false, gate_weight.value, false, 1.0f, 1.0f, dx);
    if (gate_lora) {
      const Tensor z = lora_down(*gate_lora, ctx.x, ctx.lora_draws[0], 0);
      Tensor dz = Tensor::zeros({T, gate_lora->rank()}, DType::F32, dev);
      lora_up_backward(*gate_lora, ds, z, 0, dz);
      lora_down_backward(*gate_lora, dz, ctx.x, ctx.lora_draws[0], 0, &dx);
    }
  }
  return dx;
}

}  // namespace dsv4
