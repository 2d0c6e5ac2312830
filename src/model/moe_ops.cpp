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
// gradient (T x E values) are computed on the host with the reference's functions; tp and ep use the reference's
// row split and all-to-all (device tensors over the groups' NCCL twins). Adapters run through lora.h's tensor forms with
// the reference's draws and mask offsets; frozen (quantised) expert weights through the same precision-aware frozen
// GEMMs as the reference (model/matmul_precision.h).
#include "model/exec_path.h"
#include "model/moe.h"
#include "model/quant.h"
#include "runtime/host_phases.h"
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

// Rows read by the experts' GEMMs: t the tensor as their operand (precision_operand), q its FP8 row quantisation
// (fp8_input_operand; fp8 with weights that are not frozen), made once for all experts: a row's quantisation depends
// on that row only, so an expert's rows of q are the quantisation of its rows.
struct RowsOperand {
  Tensor t;
  Fp8Tensor q;
};

// op: the rows already as the GEMMs' operand (precision_operand).
RowsOperand rows_operand(MatmulPrecision p, const Tensor& op, bool quantise) {
  return {op, p == MatmulPrecision::FP8 && quantise ? fp8_input_operand(op) : Fp8Tensor{}};
}

// Y [n, out] = X [n, in] W_k^T + beta Y with the frozen weight (model/matmul_precision.h's qp GEMMs: on the CPU the
// reference's row calls, beta inside) or the F32 weight, given as its operand w_op (weight_operand), in the expert's
// precision; X the expert's rows [begin, end) of the call's operand.
void expert_xwT(const ExpertWeights& ew, int k, const WeightOperand& w_op, const RowsOperand& Xs, int64_t begin,
                int64_t end, float beta, Tensor& Y) {
  const QuantizedWeight& q = ew.frozen(k);
  const Tensor X = Xs.t.slice(0, begin, end);
  if (!q.defined() && Xs.q.q.defined())
    pgemm_xwT_fp8(fp8_rows_slice(Xs.q, begin, end), w_op, beta, Y);
  else if (!q.defined())
    pgemm_xwT(ew.precision, X, w_op, beta, Y);
  else if (X.device().is_cpu())
    qpgemm_xwT_rows(ew.precision, q, X.size(0), X.data<float>(), X.stride(0), beta, Y.data<float>(), Y.stride(0));
  else
    store(qpmatmul_xwT(ew.precision, X, q), beta, Y);
}

// dX [n, in] = dY [n, out] W_k + beta dX (dY the expert's rows [begin, end) of the call's operand).
void expert_dyW(const ExpertWeights& ew, int k, const WeightOperand& w_op, const RowsOperand& dYs, int64_t begin,
                int64_t end, float beta, Tensor& dX) {
  const QuantizedWeight& q = ew.frozen(k);
  const Tensor dY = dYs.t.slice(0, begin, end);
  if (!q.defined() && dYs.q.q.defined())
    pgemm_dyW_fp8(fp8_rows_slice(dYs.q, begin, end), w_op, beta, dX);
  else if (!q.defined())
    pgemm_dyW(ew.precision, dY, w_op, beta, dX);
  else if (dY.device().is_cpu())
    qpgemm_dyW_rows(ew.precision, q, dY.size(0), dY.data<float>(), dY.stride(0), beta, dX.data<float>(), dX.stride(0));
  else
    store(qpmatmul_dyW(ew.precision, dY, q), beta, dX);
}

bool trainable(const ExpertWeights& ew, int k) { return !ew.frozen(k).defined() && ew.param(k).trainable; }

// Whether some expert of a call multiplies with an F32 weight (those read the FP8 row quantisations of RowsOperand).
bool any_not_frozen(const std::vector<const ExpertWeights*>& ews) {
  for (const ExpertWeights* ew : ews)
    for (int k = 1; k <= 3; ++k)
      if (!ew->frozen(k).defined()) return true;
  return false;
}

// One call runs several experts on the row ranges of shared tensors (the routed experts on the expert-sorted rows, or
// the shared expert on all rows): the row-wise ops (operand rounding, SwiGLU and its backward) run once over all rows,
// the GEMMs and adapters per expert on its range. Every row gets exactly what a call per expert gives it.
struct ExpertRows {
  int64_t begin = 0, end = 0;      // rows [begin, end) of the call's tensors
  const uint64_t* draws = nullptr;  // the expert's 4 adapter draws (null: no adapters)
  int64_t row0 = 0;                 // global row of its first row for the dropout masks (moe.cpp's expert_forward)
  Tensor slice(const Tensor& t) const { return t.slice(0, begin, end); }
  int64_t rows() const { return end - begin; }
};

// The precision shared by the experts of one call (Model::set_matmul_precision sets one per MoE).
MatmulPrecision call_precision(const std::vector<const ExpertWeights*>& ews, const std::string& prefix) {
  DSV4_CHECK(!ews.empty(), "MoE {}: an expert call without experts", prefix);
  for (const ExpertWeights* ew : ews)
    DSV4_CHECK(ew->precision == ews[0]->precision, "MoE {}: experts of one call in {} and {} (one precision per MoE)",
               prefix, matmul_precision_name(ews[0]->precision), matmul_precision_name(ew->precision));
  return ews[0]->precision;
}

// The experts' F32 weights as GEMM operands (weight_operand: BF16, FP8 blocks or the F32 tensor), 3 per expert in w
// (w1, w2, w3; undefined when frozen), made once in forward and kept in the context for the backward's Dgrad GEMMs.
// In bf16 with every w1 and w3 an F32 weight (not frozen), w13 holds one [2I, D] operand per expert whose row halves are w[3i] and
// w[3i + 2] (fused G | U GEMMs, experts_forward_ops); otherwise w13 is empty.
struct ExpertOperands {
  std::vector<WeightOperand> w, w13;
};

bool fusable_w13(const std::vector<const ExpertWeights*>& ews) {
  if (ews.empty() || ews[0]->precision != MatmulPrecision::BF16) return false;
  return std::all_of(ews.begin(), ews.end(),
                     [](const ExpertWeights* ew) { return !ew->frozen(1).defined() && !ew->frozen(3).defined(); });
}

ExpertOperands expert_weight_operands(const std::vector<const ExpertWeights*>& ews) {
  ExpertOperands ops;
  if (ews.empty()) return ops;
  std::vector<Tensor> trainable;  // the non-frozen matrices, converted in one call (matmul_precision.h)
  for (const ExpertWeights* ew : ews)
    for (int k = 1; k <= 3; ++k)
      if (!ew->frozen(k).defined()) trainable.push_back(ew->param(k).value);
  std::vector<WeightOperand> made;
  if (fusable_w13(ews)) {
    std::vector<Tensor> outs;
    for (const ExpertWeights* ew : ews) {
      const Tensor& w1 = ew->w1.value;
      const int64_t I = w1.size(0);
      Tensor w13 = Tensor::empty({2 * I, w1.size(1)}, bf16_operand_dtype(w1.device()), w1.device());
      outs.push_back(w13.slice(0, 0, I));
      if (!ew->frozen(2).defined())
        outs.push_back(Tensor::empty(ew->w2.value.shape(), bf16_operand_dtype(w1.device()), w1.device()));
      outs.push_back(w13.slice(0, I, 2 * I));
      ops.w13.push_back({std::move(w13), {}});
    }
    made = bf16_weight_operands_into(trainable, outs);
  } else {
    made = weight_operands(ews[0]->precision, trainable);
  }
  size_t next = 0;
  for (const ExpertWeights* ew : ews)
    for (int k = 1; k <= 3; ++k) ops.w.push_back(ew->frozen(k).defined() ? WeightOperand{} : std::move(made[next++]));
  return ops;
}

// The pre-clamp G, U [n, I] of a call: two tensors, or (fused w1 | w3 operands) the column halves of gu [n, 2I].
struct GateUp {
  Tensor g, u, gu;
};

GateUp make_gate_up(int64_t n, int64_t I, bool fused, Device dev) {
  if (!fused) return {Tensor::empty({n, I}, DType::F32, dev), Tensor::empty({n, I}, DType::F32, dev), {}};
  Tensor gu = Tensor::empty({n, 2 * I}, DType::F32, dev);
  return {gu.slice(1, 0, I), gu.slice(1, I, 2 * I), gu};
}

// Experts ews[i] on rows[i] of X [n, D] with routing weights w [n] (undefined: the shared expert). Xop is X as the
// GEMM operand (precision_operand). Writes the pre-clamp G, U [n, I] and Y [n, D] on every expert's rows.
void experts_forward_ops(const std::vector<const ExpertWeights*>& ews, const std::vector<ExpertRows>& rows,
                         const ExpertOperands& w_ops, const Tensor& X, const Tensor& Xop, const Tensor& w,
                         double limit, const GateUp& gu, Tensor& Y) {
  const Tensor &G = gu.g, &U = gu.u;
  const int64_t D = X.size(1), I = G.size(1);
  const MatmulPrecision p = ews[0]->precision;
  const bool quantise = any_not_frozen(ews);
  const RowsOperand Xs = rows_operand(p, Xop, quantise);
  const bool fused = !w_ops.w13.empty();
  DSV4_CHECK(fused == gu.gu.defined(), "MoE experts: fused w1 | w3 operands need the fused [rows, 2I] G | U");
  const Tensor& GU = gu.gu;
  for (size_t i = 0; i < ews.size(); ++i) {
    const ExpertWeights& ew = *ews[i];
    const ExpertRows& r = rows[i];
    if (r.rows() == 0) continue;
    Tensor Ge = r.slice(G), Ue = r.slice(U);
    if (fused) {
      Tensor GUe = r.slice(GU);
      pgemm_xwT(p, r.slice(Xs.t), w_ops.w13[i], 0.0f, GUe);
    } else {
      expert_xwT(ew, 1, w_ops.w[3 * i], Xs, r.begin, r.end, 0.0f, Ge);
      expert_xwT(ew, 3, w_ops.w[3 * i + 2], Xs, r.begin, r.end, 0.0f, Ue);
    }
    if (!r.draws) continue;
    const Tensor Xe = r.slice(X);
    const uint64_t mo = static_cast<uint64_t>(r.row0 * D);
    if (ew.lora_w1) lora_up(*ew.lora_w1, lora_down(*ew.lora_w1, Xe, r.draws[0], mo), 0, Ge);
    if (ew.lora_w3) lora_up(*ew.lora_w3, lora_down(*ew.lora_w3, Xe, r.draws[2], mo), 0, Ue);
    if (ew.lora_w13) {
      const Tensor z = lora_down(*ew.lora_w13, Xe, r.draws[3], mo);
      lora_up(*ew.lora_w13, z, 0, Ge);
      lora_up(*ew.lora_w13, z, I, Ue);
    }
  }
  const Tensor H = swiglu(G, U, w, limit);
  const RowsOperand Hs = rows_operand(p, precision_operand(p, H), quantise);
  for (size_t i = 0; i < ews.size(); ++i) {
    const ExpertWeights& ew = *ews[i];
    const ExpertRows& r = rows[i];
    if (r.rows() == 0) continue;
    Tensor Ye = r.slice(Y);
    expert_xwT(ew, 2, w_ops.w[3 * i + 1], Hs, r.begin, r.end, 0.0f, Ye);
    if (r.draws && ew.lora_w2)
      lora_up(*ew.lora_w2, lora_down(*ew.lora_w2, r.slice(H), r.draws[1], static_cast<uint64_t>(r.row0 * I)), 0, Ye);
  }
}

// Backward of experts_forward_ops given dY [n, D]: dX [n, D] written on every expert's rows, d(loss)/dw [n] returned
// (with w), weight and adapter gradients accumulated (trainable weights only), per expert in moe.cpp's expert_backward
// order. Xop: X as the GEMM operand, or X itself (converted here).
Tensor experts_backward_ops(const std::vector<ExpertWeights*>& ews, const std::vector<ExpertRows>& rows,
                            const ExpertOperands& w_ops, const Tensor& X, const Tensor& Xop, const Tensor& G,
                            const Tensor& U, const Tensor& w, const Tensor& dY, double limit, Tensor& dX) {
  const int64_t n = X.size(0), D = X.size(1), I = G.size(1);
  const MatmulPrecision p = ews[0]->precision;
  bool any_w2 = false, any_w13 = false;
  for (size_t i = 0; i < ews.size(); ++i) {
    const bool draws = rows[i].draws != nullptr;
    any_w2 = any_w2 || trainable(*ews[i], 2) || (draws && ews[i]->lora_w2);
    any_w13 = any_w13 || trainable(*ews[i], 1) || trainable(*ews[i], 3);
  }
  const bool quantise = any_not_frozen({ews.begin(), ews.end()});
  Tensor dH = Tensor::empty({n, I}, DType::F32, X.device());
  const RowsOperand dYs = rows_operand(p, precision_operand(p, dY), quantise);
  const Tensor& dYop = dYs.t;
  for (size_t i = 0; i < ews.size(); ++i) {
    const ExpertRows& r = rows[i];
    if (r.rows() == 0) continue;
    Tensor dHe = r.slice(dH);
    expert_dyW(*ews[i], 2, w_ops.w[3 * i + 1], dYs, r.begin, r.end, 0.0f, dHe);
  }
  if (any_w2) {
    const Tensor H = swiglu(G, U, w, limit);
    const Tensor Hop = precision_operand(p, H);
    for (size_t i = 0; i < ews.size(); ++i) {
      ExpertWeights& ew = *ews[i];
      const ExpertRows& r = rows[i];
      if (r.rows() == 0) continue;
      if (trainable(ew, 2)) pgemm_dW(p, r.slice(dYop), r.slice(Hop), ew.w2.grad_buffer());
      if (r.draws && ew.lora_w2) {
        LoraAdapter& ad = *ew.lora_w2;
        const uint64_t mo = static_cast<uint64_t>(r.row0 * I);
        const Tensor He = r.slice(H);
        const Tensor z = lora_down(ad, He, r.draws[1], mo);
        Tensor dz = Tensor::zeros({r.rows(), ad.rank()}, DType::F32, X.device());
        lora_up_backward(ad, r.slice(dY), z, 0, dz);
        Tensor dHe = r.slice(dH);
        lora_down_backward(ad, dz, He, r.draws[1], mo, &dHe);
      }
    }
  }
  const bool fused = !w_ops.w13.empty();
  SwigluGrad g = swiglu_backward(G, U, w, dH, limit, fused);
  // Fused: dG | dU rounded once as one [n, 2I] operand (its column halves feed the Wgrads).
  const Tensor dGUop = fused ? precision_operand(p, g.dgu) : Tensor();
  const RowsOperand dGs = rows_operand(p, fused ? dGUop.slice(1, 0, I) : precision_operand(p, g.dg), quantise),
                    dUs = rows_operand(p, fused ? dGUop.slice(1, I, 2 * I) : precision_operand(p, g.du), quantise);
  const Tensor Xg = any_w13 ? precision_operand(p, Xop) : Tensor();
  for (size_t i = 0; i < ews.size(); ++i) {
    ExpertWeights& ew = *ews[i];
    const ExpertRows& r = rows[i];
    if (r.rows() == 0) continue;
    if (p == MatmulPrecision::FP8 && (trainable(ew, 1) || trainable(ew, 3))) {
      const Fp8Tensor x_t = fp8_wgrad_operand(r.slice(Xg));  // shared by both Wgrads (pgemm_dW's own operand)
      if (trainable(ew, 1)) pgemm_dW_fp8(r.slice(dGs.t), x_t, ew.w1.grad_buffer());
      if (trainable(ew, 3)) pgemm_dW_fp8(r.slice(dUs.t), x_t, ew.w3.grad_buffer());
    } else {
      if (trainable(ew, 1)) pgemm_dW(p, r.slice(dGs.t), r.slice(Xg), ew.w1.grad_buffer());
      if (trainable(ew, 3)) pgemm_dW(p, r.slice(dUs.t), r.slice(Xg), ew.w3.grad_buffer());
    }
    Tensor dXe = r.slice(dX);
    if (fused) {
      pgemm_dyW(p, r.slice(dGUop), w_ops.w13[i], 0.0f, dXe);
    } else {
      expert_dyW(ew, 1, w_ops.w[3 * i], dGs, r.begin, r.end, 0.0f, dXe);
      expert_dyW(ew, 3, w_ops.w[3 * i + 2], dUs, r.begin, r.end, 1.0f, dXe);
    }
    if (!r.draws) continue;
    const Tensor Xe = r.slice(X), dGe = r.slice(g.dg), dUe = r.slice(g.du);
    const uint64_t mo = static_cast<uint64_t>(r.row0 * D);
    auto input_side = [&](LoraAdapter& ad, uint64_t draw, bool to_g, bool to_u) {
      const Tensor z = lora_down(ad, Xe, draw, mo);
      Tensor dz = Tensor::zeros({r.rows(), ad.rank()}, DType::F32, X.device());
      if (to_g) lora_up_backward(ad, dGe, z, 0, dz);
      if (to_u) lora_up_backward(ad, dUe, z, to_g ? I : 0, dz);
      lora_down_backward(ad, dz, Xe, draw, mo, &dXe);
    };
    if (ew.lora_w1) input_side(*ew.lora_w1, r.draws[0], true, false);
    if (ew.lora_w3) input_side(*ew.lora_w3, r.draws[2], false, true);
    if (ew.lora_w13) input_side(*ew.lora_w13, r.draws[3], true, true);
  }
  return g.dw;
}

std::vector<int64_t> host_i64(const Tensor& t) {
  const HostPhase phase("moe: routing results to the host (waits for the GPU)");
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
  const int64_t T = x_TD.size(0);
  DSV4_CHECK(layout.tokens() == T, "MoE {}: layout {} x {} does not cover the {} input rows", prefix_, layout.batch,
             layout.seq, T);
  check_on("MoE " + prefix_ + ": parameter " + gate_weight.name, gate_weight.value, Shape{E, D}, dev);
  if (!hash_) check_on("MoE " + prefix_ + ": parameter " + gate_bias.name, gate_bias.value, Shape{E}, dev);
  for (const auto& ew : experts) check_expert_on(ew, D, I, dev, prefix_);
  if (has_shared_) check_expert_on(shared, D, I, dev, prefix_);
  const Communicator* tpg = parallel_ ? parallel_->tp() : nullptr;
  const Communicator* epg = parallel_ ? parallel_->ep() : nullptr;
  const bool ep = group_size(epg) > 1;

  // ---- this rank's token rows (sequence-parallel over tp; collectives of device tensors go to the groups' device
  // twins, runtime/comm.h) ----
  std::vector<int64_t> tp_rows = split_rows(tpg, T);
  int64_t t0 = 0;
  for (int64_t r = 0; r < group_rank(tpg); ++r) t0 += tp_rows[static_cast<size_t>(r)];
  const int64_t TL = tp_rows[static_cast<size_t>(group_rank(tpg))], N = TL * K;
  const Tensor xl = take_rows(tpg, x_TD, tp_rows);

  // LoRA dropout draws (MoECtx::lora_draws), in the reference's order.
  std::vector<uint64_t> draws = lora_draws();
  auto expert_draws = [&](int64_t e) -> const uint64_t* {  // local index; e = EL: the shared expert
    return draws.empty() ? nullptr : draws.data() + 1 + 4 * e;
  };

  // ---- router ----
  Tensor s = ops::matmul(xl, gate_weight.value, false, true);  // [TL, E], FP32
  if (gate_lora && TL > 0)
    lora_up(*gate_lora, lora_down(*gate_lora, xl, draws[0], static_cast<uint64_t>(t0 * D)), 0, s);
  const Tensor aff = sqrt_softplus(s);
  Tensor fixed;
  if (hash_) fixed = Tensor::from_vector<int64_t>({TL, K}, hash_expert_ids(input_ids_T, T, t0, TL)).to(dev);
  const MoeRoute route = moe_route(aff, hash_ ? Tensor() : gate_bias.value, fixed, K, route_scale_);

  // ---- stats on the host (TL x E values): loads and the balance term's tp-summed row statistics ----
  const MoeSlots slots = moe_sort_slots(route.idx, E);
  std::vector<int64_t> offsets = host_i64(slots.offsets);
  MoEStats st;
  st.load.resize(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    st.load[static_cast<size_t>(e)] = offsets[static_cast<size_t>(e + 1)] - offsets[static_cast<size_t>(e)];
  std::vector<double> bstat;  // [counts B*E | psum B*E]
  const int64_t BE = std::max<int64_t>(layout.batch, 0) * E;
  Tensor aff_h;  // aff on the host: the balance statistics here, its backward later
  if (layout.batch > 0 && layout.seq > 0) {
    aff_h = aff.to(Device::cpu());
    const std::vector<int64_t> idx_h = host_i64(route.idx);
    bstat.assign(static_cast<size_t>(2 * BE), 0.0);
    moe_balance_partials<float>(aff_h.data<float>(), idx_h.data(), t0, TL, layout.batch, layout.seq, E, K,
                                bstat.data(), bstat.data() + BE);
    group_sum(tpg, bstat);
    st.balance_term = moe_balance_term_from(bstat.data(), bstat.data() + BE, layout.batch, layout.seq, E, K);
  }

  // ---- dispatch (moe.cpp's order): the expert-sorted slots are also grouped by owner, i.e. the send order; the
  // receiver groups what it gets by local expert (stable: source rank, then the sender's order) ----
  const Tensor x_sorted = moe_permute(xl, slots.sorted_slot, K);                             // [N, D]
  const Tensor w_sorted = moe_permute(route.w.view({N, 1}), slots.sorted_slot, 1);           // [N, 1]
  const int64_t EP = group_size(epg);
  std::vector<int64_t> send_rows(static_cast<size_t>(EP), 0);
  for (int64_t e = 0; e < E; ++e)
    send_rows[static_cast<size_t>(ep ? parallel_->expert_owner(E, e) : 0)] += st.load[static_cast<size_t>(e)];
  const std::vector<int64_t> recv_rows = ep ? epg->exchange_counts(send_rows) : send_rows;
  std::vector<int64_t> recv_offsets(offsets.begin(), offsets.begin() + EL + 1);  // no ep: the local expert segments
  Tensor recv_sorted_dev;                                                        // ep: received row per sorted position
  Tensor xr = x_sorted, wr = w_sorted;  // [NR, D], [NR, 1] in local-expert-sorted order
  if (ep) {
    std::vector<int64_t> send_e(static_cast<size_t>(N));  // global expert id of each sent slot (host: from offsets)
    for (int64_t e = 0; e < E; ++e)
      std::fill(send_e.begin() + offsets[static_cast<size_t>(e)], send_e.begin() + offsets[static_cast<size_t>(e + 1)], e);
    const std::vector<int64_t> recv_e =
        host_i64(exchange_rows(epg, Tensor::from_vector<int64_t>({N}, send_e), send_rows, recv_rows));
    const int64_t NR = static_cast<int64_t>(recv_e.size());
    recv_offsets.assign(static_cast<size_t>(EL + 1), 0);
    for (int64_t e : recv_e) {
      DSV4_CHECK(holds_expert(e), "MoE {}: received a slot for expert {}, not held here", prefix_, e);
      ++recv_offsets[static_cast<size_t>(e - expert_begin_ + 1)];
    }
    for (int64_t e = 0; e < EL; ++e) recv_offsets[static_cast<size_t>(e + 1)] += recv_offsets[static_cast<size_t>(e)];
    std::vector<int64_t> fill(recv_offsets.begin(), recv_offsets.end() - 1), recv_sorted(static_cast<size_t>(NR));
    for (int64_t n = 0; n < NR; ++n)
      recv_sorted[static_cast<size_t>(fill[static_cast<size_t>(recv_e[static_cast<size_t>(n)] - expert_begin_)]++)] = n;
    recv_sorted_dev = Tensor::from_vector<int64_t>({NR}, recv_sorted).to(dev);
    xr = ops::index_select(exchange_rows(epg, x_sorted, send_rows, recv_rows), recv_sorted_dev);
    wr = ops::index_select(exchange_rows(epg, w_sorted, send_rows, recv_rows), recv_sorted_dev);
  }
  const int64_t NR = xr.size(0);

  // ---- local experts on their row ranges ----
  std::vector<const ExpertWeights*> routed;
  std::vector<ExpertRows> routed_rows;
  for (int64_t e = 0; e < EL; ++e) {
    routed.push_back(&experts[static_cast<size_t>(e)]);
    routed_rows.push_back({recv_offsets[static_cast<size_t>(e)], recv_offsets[static_cast<size_t>(e + 1)], expert_draws(e), 0});
  }
  const MatmulPrecision prec = call_precision(routed, prefix_);
  ExpertOperands routed_w_ops = expert_weight_operands(routed);
  const Tensor xr_op = precision_operand(prec, xr);
  const GateUp gu_all = make_gate_up(NR, I, !routed_w_ops.w13.empty(), dev);
  Tensor y_sorted = Tensor::empty({NR, D}, DType::F32, dev);
  if (NR > 0) experts_forward_ops(routed, routed_rows, routed_w_ops, xr, xr_op, wr.view({NR}), limit_, gu_all, y_sorted);
  // ---- combine on the source rank in the send (= ascending expert) order ----
  Tensor back = y_sorted;
  if (ep) {
    Tensor y_recv = Tensor::zeros({NR, D}, DType::F32, dev);  // back to the received order (each row once)
    ops::index_add(y_recv, recv_sorted_dev, y_sorted);
    back = exchange_rows(epg, y_recv, recv_rows, send_rows);
  }
  Tensor yl = N > 0 ? moe_unpermute(back, slots.sorted_slot, Tensor(), TL, K) : Tensor::zeros({TL, D}, DType::F32, dev);

  // ---- shared expert ----
  GateUp sgu;
  Tensor xl_op;
  ExpertOperands shared_w_ops;
  if (has_shared_) {
    const std::vector<const ExpertWeights*> sh = {&shared};
    shared_w_ops = expert_weight_operands(sh);
    sgu = make_gate_up(TL, I, !shared_w_ops.w13.empty(), dev);
    xl_op = precision_operand(call_precision(sh, prefix_), xl);
    if (TL > 0) {
      Tensor sy = Tensor::empty({TL, D}, DType::F32, dev);
      experts_forward_ops(sh, {{0, TL, expert_draws(EL), t0}}, shared_w_ops, xl, xl_op, Tensor(), limit_, sgu, sy);
      yl = ops::add(yl, sy);
    }
  }
  Tensor y = gather_rows(tpg, yl, tp_rows);

  if (stats) *stats = st;
  if (ctx) {
    *ctx = MoECtx{};
    ctx->ops_path = true;
    ctx->x = xl;
    ctx->s = s;
    ctx->aff = aff;
    ctx->aff_host = aff_h;
    ctx->idx = route.idx;
    ctx->w = route.w;
    ctx->offsets = std::move(offsets);
    ctx->sorted_slot_N = slots.sorted_slot;
    ctx->tp_rows = std::move(tp_rows);
    ctx->t0 = t0;
    ctx->send_rows = std::move(send_rows);
    ctx->recv_rows = recv_rows;
    ctx->recv_x = has_lora() ? xr : xr_op;  // without adapters the backward reads x only as its GEMM operand
    ctx->recv_x_op = xr_op;
    ctx->recv_w = wr;
    ctx->expert_w_ops = std::move(routed_w_ops.w);
    ctx->expert_w13_ops = std::move(routed_w_ops.w13);
    ctx->shared_x_op = xl_op;
    ctx->shared_w_ops = std::move(shared_w_ops.w);
    ctx->shared_w13_ops = std::move(shared_w_ops.w13);
    ctx->recv_offsets = std::move(recv_offsets);
    ctx->recv_sorted_N = recv_sorted_dev;
    ctx->g = gu_all.g;
    ctx->u = gu_all.u;
    ctx->shared_g = sgu.g;
    ctx->shared_u = sgu.u;
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
  DSV4_CHECK(ctx.x.defined() && static_cast<int64_t>(ctx.offsets.size()) == E + 1 &&
                 static_cast<int64_t>(ctx.recv_offsets.size()) == EL + 1 &&
                 static_cast<int64_t>(ctx.expert_w_ops.size()) == 3 * EL &&
                 ctx.shared_w_ops.size() == (has_shared_ ? 3u : 0u),
             "MoE {}: backward without a forward context", prefix_);
  const Device dev = ctx.x.device();
  int64_t T = 0;
  for (int64_t r : ctx.tp_rows) T += r;
  check_on("MoE " + prefix_ + ": backward dy", dy_TD, Shape{T, D}, dev);
  DSV4_CHECK(!has_lora() || ctx.lora_draws.size() == static_cast<size_t>(1 + 4 * (EL + 1)),
             "MoE {}: backward through adapters without their forward context", prefix_);
  auto expert_draws = [&](int64_t e) -> const uint64_t* {
    return ctx.lora_draws.empty() ? nullptr : ctx.lora_draws.data() + 1 + 4 * e;
  };
  const Communicator* tpg = parallel_ ? parallel_->tp() : nullptr;
  const Communicator* epg = parallel_ ? parallel_->ep() : nullptr;
  const bool ep = group_size(epg) > 1;
  const int64_t TL = ctx.x.size(0), t0 = ctx.t0, N = TL * K, NR = ctx.recv_x.size(0);
  const Tensor dyl = take_rows(tpg, dy_TD, ctx.tp_rows);
  const Tensor& sorted_slot = ctx.sorted_slot_N;

  // ---- dy of each slot to the expert's rank, in the local-expert-sorted order there ----
  Tensor dy_sorted = moe_permute(dyl, sorted_slot, K);  // [N, D], send order
  if (ep) dy_sorted = ops::index_select(exchange_rows(epg, dy_sorted, ctx.send_rows, ctx.recv_rows), ctx.recv_sorted_N);

  // ---- local experts: dx and d(loss)/dw per received slot ----
  std::vector<ExpertWeights*> routed;
  std::vector<ExpertRows> routed_rows;
  for (int64_t e = 0; e < EL; ++e) {
    routed.push_back(&experts[static_cast<size_t>(e)]);
    routed_rows.push_back({ctx.recv_offsets[static_cast<size_t>(e)], ctx.recv_offsets[static_cast<size_t>(e + 1)],
                           expert_draws(e), 0});
  }
  Tensor dx_sorted = Tensor::empty({NR, D}, DType::F32, dev);
  const Tensor dw_sorted =  // [NR, 1]
      NR > 0 ? experts_backward_ops(routed, routed_rows, {ctx.expert_w_ops, ctx.expert_w13_ops}, ctx.recv_x,
                                    ctx.recv_x_op, ctx.g, ctx.u,
                                    ctx.recv_w.view({NR}), dy_sorted, limit_, dx_sorted)
                   .view({NR, 1})
             : Tensor::empty({0, 1}, DType::F32, dev);
  Tensor back_x = dx_sorted, back_w = dw_sorted;
  if (ep) {  // back to the received order, then to the source ranks
    Tensor rx = Tensor::zeros({NR, D}, DType::F32, dev), rw = Tensor::zeros({NR, 1}, DType::F32, dev);
    ops::index_add(rx, ctx.recv_sorted_N, dx_sorted);
    ops::index_add(rw, ctx.recv_sorted_N, dw_sorted);
    back_x = exchange_rows(epg, rx, ctx.recv_rows, ctx.send_rows);
    back_w = exchange_rows(epg, rw, ctx.recv_rows, ctx.send_rows);
  }
  Tensor dxl = N > 0 ? moe_unpermute(back_x, sorted_slot, Tensor(), TL, K) : Tensor::zeros({TL, D}, DType::F32, dev);
  const Tensor dw = N > 0 ? moe_unpermute(back_w, sorted_slot, Tensor(), N, 1).view({TL, K})  // slot order t*K+j
                          : Tensor::zeros({TL, K}, DType::F32, dev);

  // ---- shared expert ----
  if (has_shared_ && TL > 0) {
    Tensor dxs = Tensor::empty({TL, D}, DType::F32, dev);
    experts_backward_ops({&shared}, {{0, TL, expert_draws(EL), t0}}, {ctx.shared_w_ops, ctx.shared_w13_ops}, ctx.x,
                         ctx.shared_x_op,
                         ctx.shared_g, ctx.shared_u, Tensor(), dyl, limit_, dxs);
    dxl = ops::add(dxl, dxs);
  }

  // ---- router: w -> aff (+ balance loss) -> s -> (gate.weight, x) ----
  if (TL > 0) {
    Tensor daff = moe_route_backward(ctx.aff, ctx.idx, dw, route_scale_);
    if (balance_alpha != 0.0 && !ctx.balance_counts.empty()) {
      const Tensor aff_h = ctx.aff_host.defined() ? ctx.aff_host : ctx.aff.to(Device::cpu());
      Tensor bal = Tensor::zeros({TL, E}, DType::F32);
      moe_balance_backward_rows<float>(aff_h.data<float>(), ctx.balance_counts.data(), t0, TL, ctx.batch, ctx.seq, E,
                                       K, balance_alpha, bal.data<float>());
      daff = ops::add(daff, bal.to(dev));
    }
    const Tensor ds = sqrt_softplus_backward(ctx.s, ctx.aff, daff);
    if (gate_weight.trainable) ops::gemm(ds, true, ctx.x, false, 1.0f, 1.0f, gate_weight.grad_buffer());
    ops::gemm(ds, false, gate_weight.value, false, 1.0f, 1.0f, dxl);
    if (gate_lora) {
      const uint64_t mo = static_cast<uint64_t>(t0 * D);
      const Tensor z = lora_down(*gate_lora, ctx.x, ctx.lora_draws[0], mo);
      Tensor dz = Tensor::zeros({TL, gate_lora->rank()}, DType::F32, dev);
      lora_up_backward(*gate_lora, ds, z, 0, dz);
      lora_down_backward(*gate_lora, dz, ctx.x, ctx.lora_draws[0], mo, &dxl);
    }
  }
  return gather_rows(tpg, dxl, ctx.tp_rows);
}

}  // namespace dsv4
