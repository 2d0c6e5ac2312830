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
// errors): expert / tensor parallelism, LoRA adapters, frozen (quantised) expert weights.
#include "model/exec_path.h"
#include "model/moe.h"
#include "runtime/model_ops.h"
#include "runtime/ops.h"

namespace dsv4 {

namespace {

void check_on(const std::string& what, const Tensor& t, const Shape& shape, Device dev) {
  DSV4_CHECK(t.defined() && t.dtype() == DType::F32 && t.shape() == shape && t.is_contiguous() && t.device() == dev,
             "{}: expected a contiguous F32 {} tensor on {}, got {}", what, shape.str(), dev.str(),
             t.defined() ? t.str() : std::string("undefined"));
}

// The expert's three F32 weights on `dev` (frozen weights run on the CPU path only).
void check_expert_on(const ExpertWeights& ew, int64_t D, int64_t I, Device dev, const std::string& prefix) {
  for (int k = 1; k <= 3; ++k) {
    DSV4_CHECK(!ew.frozen(k).defined(), "MoE {}: {} is a frozen {} weight; the tensor-op path needs F32 weights",
               prefix, ew.param(k).name, ew.frozen(k).str());
    check_on("MoE " + prefix + ": parameter " + ew.param(k).name, ew.param(k).value,
             k == 2 ? Shape{D, I} : Shape{I, D}, dev);
  }
}

// One expert on rows X [n, D] with routing weights w [n] (undefined: the shared expert). Writes the pre-clamp
// G, U [n, I] and Y [n, D] (row ranges of larger tensors are fine).
void expert_forward_ops(const ExpertWeights& ew, const Tensor& X, const Tensor& w, double limit, Tensor& G, Tensor& U,
                        Tensor& Y) {
  pgemm_xwT(ew.precision, X, ew.w1.value, 0.0f, G);
  pgemm_xwT(ew.precision, X, ew.w3.value, 0.0f, U);
  const Tensor H = swiglu(G, U, w, limit);
  pgemm_xwT(ew.precision, H, ew.w2.value, 0.0f, Y);
}

// Backward of expert_forward_ops given dY [n, D]: dX [n, D] written, d(loss)/dw [n] returned (with w), weight
// gradients accumulated (trainable weights only).
Tensor expert_backward_ops(ExpertWeights& ew, const Tensor& X, const Tensor& G, const Tensor& U, const Tensor& w,
                           const Tensor& dY, double limit, Tensor& dX) {
  const int64_t n = X.size(0), I = G.size(1);
  Tensor dH = Tensor::empty({n, I}, DType::F32, X.device());
  pgemm_dyW(ew.precision, dY, ew.w2.value, 0.0f, dH);
  if (ew.w2.trainable) pgemm_dW(ew.precision, dY, swiglu(G, U, w, limit), ew.w2.grad_buffer());
  SwigluGrad g = swiglu_backward(G, U, w, dH, limit);
  if (ew.w1.trainable) pgemm_dW(ew.precision, g.dg, X, ew.w1.grad_buffer());
  if (ew.w3.trainable) pgemm_dW(ew.precision, g.du, X, ew.w3.grad_buffer());
  pgemm_dyW(ew.precision, g.dg, ew.w1.value, 0.0f, dX);
  pgemm_dyW(ew.precision, g.du, ew.w3.value, 1.0f, dX);
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
  bool any_lora = gate_lora.has_value() || (has_shared_ && shared.has_lora());
  for (const auto& ew : experts) any_lora = any_lora || ew.has_lora();
  DSV4_CHECK(!any_lora, "MoE {}: LoRA adapters on {} tensors are not implemented yet", prefix_, dev.str());
  check_on("MoE " + prefix_ + ": parameter " + gate_weight.name, gate_weight.value, Shape{E, D}, dev);
  if (!hash_) check_on("MoE " + prefix_ + ": parameter " + gate_bias.name, gate_bias.value, Shape{E}, dev);
  for (const auto& ew : experts) check_expert_on(ew, D, I, dev, prefix_);
  if (has_shared_) check_expert_on(shared, D, I, dev, prefix_);

  // ---- router ----
  const Tensor s = ops::matmul(x_TD, gate_weight.value, false, true);  // [T, E], FP32
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
                         limit_, G, U, Y);
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
      expert_forward_ops(shared, x_TD, Tensor(), limit_, sg, su, sy);
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
                                             w_sorted.slice(0, o, o + n), dy_sorted.slice(0, o, o + n), limit_, dX);
      Tensor dst = dw_sorted.slice(0, o, o + n);
      ops::copy(dwe, dst);
    }
    dx = moe_unpermute(dx_sorted, sorted_slot, Tensor(), T, K);
    dw = moe_unpermute(dw_sorted.view({N, 1}), sorted_slot, Tensor(), N, 1).view({T, K});  // slot order t*K+j
  }

  // ---- shared expert ----
  if (has_shared_ && T > 0) {
    Tensor dxs = Tensor::empty({T, D}, DType::F32, dev);
    expert_backward_ops(shared, ctx.x, ctx.shared_g, ctx.shared_u, Tensor(), dy_TD, limit_, dxs);
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
  }
  return dx;
}

}  // namespace dsv4
