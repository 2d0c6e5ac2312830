// DeepSeekMoE feed-forward block (`layers.{i}.ffn.` / `mtp.0.ffn.`): a router, K of E routed SwiGLU experts per
// token (dropless) and one shared expert, all FP32 (reference: dsv4-architecture.md §2.4, §2.5, §2.9 item 1).
//
//   s      = x W_gate^T                                   [T, E]   (FP32 GEMM)
//   aff    = sqrt(softplus(s))                            softplus linear above 20, like torch (threshold 20)
//   idx    = topk(aff + bias, K)   (learned layers)       bias [E] only selects; sorted descending, ties -> lower id
//          = tid2eid[input_id]     (hash layers)          no bias there
//   w      = aff[idx] / (sum_j aff[idx_j] + 1e-20) * route_scale
//   Expert_e(x, w) = W2_e ( w * silu(min(W1_e x, L)) * clamp(W3_e x, -L, L) )    L = swiglu_limit (0: no clamp)
//   y      = sum_{e in idx, ascending e} Expert_e(x, w_e)  +  Shared(x)          Shared = Expert without w
//
// Backward: the selection (idx) is constant; gradients reach gate.weight and x through w (normalisation and
// sqrt-softplus) and, when balance_alpha > 0, through the sequence-wise balance loss. Clamp gradients follow
// torch.clamp: the gradient passes where min <= v <= max (equality passes), zero where the value was clamped.
//
// Sequence-wise balance loss (DeepSeek-V3 form, one "sequence" = one row b of the SeqLayout, S = layout.seq; packed
// documents inside a row are not split):
//   p_{t,i} = aff_{t,i} / sum_j aff_{t,j}               (all E experts, raw aff without bias)
//   f_{b,i} = E / (K S) * #{(t, j) : t in row b, idx_{t,j} = i}      (actual selection: top-k incl. bias, or hash)
//   P_{b,i} = (1/S) sum_{t in row b} p_{t,i}
//   term    = (1/B) sum_b sum_i f_{b,i} P_{b,i}          (MoEStats::balance_term; = 1 for perfectly uniform routing)
//   loss    = alpha * term                               (f is a constant; the gradient flows through P only)
//
// Legend: T tokens (= B*S), D dim, E routed experts, K activated experts per token, I expert inter dim,
// N = T*K routed slots. Raw-pointer cores are templates so tests can run them in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/lora.h"
#include "model/matmul_precision.h"
#include "model/param.h"
#include "model/quant.h"
#include "model/seq_layout.h"
#include "runtime/model_math.h"  // router and clamped SwiGLU cores (moved there, shared with runtime ops)
#include "runtime/parallel.h"

namespace dsv4 {

// Expert load of each sequence row: counts[b * E + e] = slots of row b routed to e.
inline void moe_row_counts(const int64_t* idx, int64_t batch, int64_t seq, int64_t E, int64_t K,
                           std::vector<double>& counts) {
  counts.assign(static_cast<size_t>(batch * E), 0.0);
  for (int64_t t = 0; t < batch * seq; ++t)
    for (int64_t j = 0; j < K; ++j) counts[static_cast<size_t>((t / seq) * E + idx[t * K + j])] += 1.0;
}

// Unscaled sequence-wise balance term (see the header comment), accumulated in double.
template <typename T>
double moe_balance_term(const T* aff, const int64_t* idx, int64_t batch, int64_t seq, int64_t E, int64_t K) {
  if (batch <= 0 || seq <= 0) return 0.0;
  std::vector<double> counts;
  moe_row_counts(idx, batch, seq, E, K, counts);
  std::vector<double> P(static_cast<size_t>(E));
  double total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    std::fill(P.begin(), P.end(), 0.0);
    for (int64_t s = 0; s < seq; ++s) {
      const T* a = aff + (b * seq + s) * E;
      double Z = 0;
      for (int64_t e = 0; e < E; ++e) Z += static_cast<double>(a[e]);
      if (Z == 0) continue;
      for (int64_t e = 0; e < E; ++e) P[static_cast<size_t>(e)] += static_cast<double>(a[e]) / Z;
    }
    double term = 0;
    for (int64_t e = 0; e < E; ++e)
      term += static_cast<double>(E) / static_cast<double>(K * seq) * counts[static_cast<size_t>(b * E + e)] *
              (P[static_cast<size_t>(e)] / static_cast<double>(seq));
    total += term;
  }
  return total / static_cast<double>(batch);
}

// d(alpha * term)/d aff accumulated into daff [T, E]:
//   c_{b,i} = alpha / B * f_{b,i} / S;  daff_{t,i} += (c_{b,i} - sum_j c_{b,j} p_{t,j}) / Z_t.
template <typename T>
void moe_balance_backward(const T* aff, const int64_t* idx, int64_t batch, int64_t seq, int64_t E, int64_t K,
                          double alpha, T* daff) {
  if (batch <= 0 || seq <= 0 || alpha == 0) return;
  std::vector<double> counts;
  moe_row_counts(idx, batch, seq, E, K, counts);
  std::vector<double> c(static_cast<size_t>(E));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t e = 0; e < E; ++e)
      c[static_cast<size_t>(e)] = alpha / static_cast<double>(batch) * static_cast<double>(E) /
                                  static_cast<double>(K * seq) * counts[static_cast<size_t>(b * E + e)] /
                                  static_cast<double>(seq);
    for (int64_t s = 0; s < seq; ++s) {
      const int64_t t = b * seq + s;
      const T* a = aff + t * E;
      double Z = 0, cp = 0;
      for (int64_t e = 0; e < E; ++e) Z += static_cast<double>(a[e]);
      if (Z == 0) continue;
      for (int64_t e = 0; e < E; ++e) cp += c[static_cast<size_t>(e)] * static_cast<double>(a[e]) / Z;
      for (int64_t e = 0; e < E; ++e) daff[t * E + e] += static_cast<T>((c[static_cast<size_t>(e)] - cp) / Z);
    }
  }
}

// Row statistics of the balance loss over `rows` tokens starting at global token t0 (tokens of a sequence row may be
// split over ranks; sum the statistics over those ranks before forming the term). Accumulates into
// counts [B*E] (slots of row b routed to e) and psum [B*E] (sum over the row's tokens of p_{t,e}).
template <typename T>
void moe_balance_partials(const T* aff, const int64_t* idx, int64_t t0, int64_t rows, int64_t batch, int64_t seq,
                          int64_t E, int64_t K, double* counts, double* psum) {
  if (batch <= 0 || seq <= 0) return;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = (t0 + r) / seq;
    for (int64_t j = 0; j < K; ++j) counts[b * E + idx[r * K + j]] += 1.0;
    const T* a = aff + r * E;
    double Z = 0;
    for (int64_t e = 0; e < E; ++e) Z += static_cast<double>(a[e]);
    if (Z == 0) continue;
    for (int64_t e = 0; e < E; ++e) psum[b * E + e] += static_cast<double>(a[e]) / Z;
  }
}

// The unscaled balance term from complete row statistics (same arithmetic as moe_balance_term).
inline double moe_balance_term_from(const double* counts, const double* psum, int64_t batch, int64_t seq, int64_t E,
                                    int64_t K) {
  if (batch <= 0 || seq <= 0) return 0.0;
  double total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    double term = 0;
    for (int64_t e = 0; e < E; ++e)
      term += static_cast<double>(E) / static_cast<double>(K * seq) * counts[b * E + e] *
              (psum[b * E + e] / static_cast<double>(seq));
    total += term;
  }
  return total / static_cast<double>(batch);
}

// moe_balance_backward for `rows` tokens starting at global token t0, given the complete counts [B*E].
template <typename T>
void moe_balance_backward_rows(const T* aff, const double* counts, int64_t t0, int64_t rows, int64_t batch,
                               int64_t seq, int64_t E, int64_t K, double alpha, T* daff) {
  if (batch <= 0 || seq <= 0 || alpha == 0) return;
  std::vector<double> c(static_cast<size_t>(E));
  int64_t cb = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = (t0 + r) / seq;
    if (b != cb) {
      cb = b;
      for (int64_t e = 0; e < E; ++e)
        c[static_cast<size_t>(e)] = alpha / static_cast<double>(batch) * static_cast<double>(E) /
                                    static_cast<double>(K * seq) * counts[b * E + e] / static_cast<double>(seq);
    }
    const T* a = aff + r * E;
    double Z = 0, cp = 0;
    for (int64_t e = 0; e < E; ++e) Z += static_cast<double>(a[e]);
    if (Z == 0) continue;
    for (int64_t e = 0; e < E; ++e) cp += c[static_cast<size_t>(e)] * static_cast<double>(a[e]) / Z;
    for (int64_t e = 0; e < E; ++e) daff[r * E + e] += static_cast<T>((c[static_cast<size_t>(e)] - cp) / Z);
  }
}

// ---- module ---------------------------------------------------------------------------------------------------

// One SwiGLU expert's weights: w1, w3 [I, D]; w2 [D, I] (checkpoint layout, y = x W^T).
// Each matrix is either its F32 Param (trainable unless cleared) or, after set_frozen(k, ...), a frozen
// QuantizedWeight in storage precision (FP4 / FP8 / BF16 / F32) used with dequantise-on-the-fly GEMMs (no weight
// gradient, skipped by visit(), the Param keeps only its name). See Linear in layers.h.
// Optional LoRA adapters (lora.h): lora_w1 / lora_w2 / lora_w3 on one matrix each, or lora_w13, one adapter fused
// over w1 and w3 (A [r, D] shared, B [2I, r]: rows [0, I) adapt w1, rows [I, 2I) adapt w3; transformers' gate_up_proj).
struct ExpertWeights {
  Param w1, w2, w3;
  QuantizedWeight w1_frozen, w2_frozen, w3_frozen;
  MatmulPrecision precision = MatmulPrecision::F32;  // of the GEMMs with the F32 weights (model/matmul_precision.h)
  std::optional<LoraAdapter> lora_w1, lora_w2, lora_w3, lora_w13;

  // k = 1, 2, 3.
  Param& param(int k) { return k == 1 ? w1 : k == 2 ? w2 : w3; }
  const Param& param(int k) const { return k == 1 ? w1 : k == 2 ? w2 : w3; }
  QuantizedWeight& frozen(int k) { return k == 1 ? w1_frozen : k == 2 ? w2_frozen : w3_frozen; }
  const QuantizedWeight& frozen(int k) const { return k == 1 ? w1_frozen : k == 2 ? w2_frozen : w3_frozen; }
  // Replaces parameter k by a frozen weight of shape `expected` (MoE::expert_weight_shape(k)); releases the Param's
  // value and gradient, trainable = false. Throws naming the weight on a shape or format mismatch.
  void set_frozen(int k, QuantizedWeight w, const Shape& expected);
  // Back to an F32 parameter holding the dequantised values (trainable = true).
  void unfreeze(int k);
  // Adapter slot: 1, 2, 3 (one matrix) or 13 (fused w1 + w3).
  std::optional<LoraAdapter>& lora(int k) { return k == 1 ? lora_w1 : k == 2 ? lora_w2 : k == 3 ? lora_w3 : lora_w13; }
  const std::optional<LoraAdapter>& lora(int k) const {
    return k == 1 ? lora_w1 : k == 2 ? lora_w2 : k == 3 ? lora_w3 : lora_w13;
  }
  bool has_lora() const { return lora_w1 || lora_w2 || lora_w3 || lora_w13; }
  void visit(const ParamVisitor& f) {
    if (!w1_frozen.defined()) f(w1);
    if (lora_w1) lora_w1->visit(f);
    if (lora_w13) lora_w13->visit(f);
    if (!w2_frozen.defined()) f(w2);
    if (lora_w2) lora_w2->visit(f);
    if (!w3_frozen.defined()) f(w3);
    if (lora_w3) lora_w3->visit(f);
  }
};

struct MoEStats {
  // [E] routed slots per expert of THIS rank's tokens in this call (sums to T_local*K; with tensor parallelism the
  // tokens are split over tp, so the trainer sums loads over the world): the aux-loss-free signal
  std::vector<int64_t> load;
  double balance_term = 0;    // unscaled sequence-wise balance term (complete: identical on every tp rank)
  double balance_loss(double alpha) const { return alpha * balance_term; }
};

// Forward context. With a parallel layout every tensor is about this rank's token rows [t0, t0 + T_local) of the
// T input rows (tp split) and, for the expert side, about the slots this rank received (ep dispatch).
struct MoECtx {
  Tensor x;                          // [T_local, D] this rank's input rows
  Tensor s, aff;                     // [T_local, E] gate logits and sqrt-softplus affinities
  Tensor idx;                        // I64 [T_local, K] selected experts (learned: descending by aff+bias)
  Tensor w;                          // [T_local, K] routing weights (normalised, times route_scale)
  std::vector<int64_t> offsets;      // [E+1] expert segments of the expert-sorted slot order (= the send order)
  std::vector<int64_t> sorted_slot;  // [N_local] slot t*K+j at each sorted position (token-ascending within an expert)
  std::vector<int64_t> tp_rows;      // [tp] token rows of each tp rank (split_rows); sum = T
  int64_t t0 = 0;                    // first global token row of this rank
  std::vector<int64_t> send_rows;    // [ep] slots sent to each ep rank (sorted positions, grouped by owner)
  std::vector<int64_t> recv_rows;    // [ep] slots received from each ep rank
  Tensor recv_x;                     // [N_recv, D+1] received slot payload: token row x, routing weight w (last col)
  std::vector<int64_t> recv_offsets; // [E_local+1] local-expert segments of the received slots
  std::vector<int64_t> recv_sorted;  // [N_recv] received row at each local-expert-sorted position
  Tensor g, u;                       // [N_recv, I] routed w1/w3 pre-activations (before the clamp), recv_sorted order
  Tensor shared_g, shared_u;         // [T_local, I] shared expert pre-activations
  int64_t batch = 0, seq = 0;        // the layout's rows, for the balance loss
  std::vector<double> balance_counts;  // [B*E] complete (tp-summed) slot counts per sequence row
  MoEStats stats;
  // Tensor-op path (model/exec_path.h; one rank): every tensor above on x's device, g / u in the
  // expert-sorted slot order (recv_* and send/recv rows unused), plus the sort itself on the device.
  bool ops_path = false;
  Tensor sorted_slot_N;  // I64 [N] on the device: sorted_slot
  // recv_x then holds the received x rows [N_recv, D] in local-expert-sorted order (not the [x | w] payload),
  // recv_w their routing weights [N_recv, 1], recv_sorted_N (ep only) recv_sorted on the device.
  Tensor recv_w, recv_sorted_N;
  Tensor aff_host;  // aff copied to the host in forward for the balance statistics (the balance backward reads it)
  // The experts' GEMM operands (matmul_precision.h), made once in forward: recv_x_op the received rows and shared_x_op
  // x for the shared expert (precision_operand: BF16 in bf16 on a device; recv_x itself is this operand when the MoE
  // has no adapters), expert_w_ops 3 per local routed expert and shared_w_ops 3 (w1, w2, w3: weight_operand, BF16 or
  // FP8 blocks; undefined when frozen).
  // expert_w13_ops / shared_w13_ops (bf16 with F32 w1 and w3, none frozen; else empty): one [2I, D] operand per expert
  // whose row halves are its w1 and w3 operands, so that the forward's G | U and the Dgrad of dG | dU each take one
  // GEMM per expert; g and u are then the column halves of one [rows, 2I] tensor.
  Tensor recv_x_op, shared_x_op;
  std::vector<WeightOperand> expert_w_ops, shared_w_ops, expert_w13_ops, shared_w13_ops;
  // LoRA dropout draws of this forward: [0] the gate adapter, then 4 per LOCAL routed expert (w1, w2, w3, w13), then 4
  // for the shared expert (empty without adapters).
  std::vector<uint64_t> lora_draws;
};

class MoE {
 public:
  MoE() = default;
  // prefix: "layers.{i}.ffn." or "mtp.0.ffn.". All parameters start at zero (the loader or an init fills them).
  // Hash layers own gate.tid2eid (an I64 [vocab, K] value in a Param with trainable = false, so loaders find it by
  // name; it never gets a gradient); learned layers own gate.bias (F32 [E], trainable = false: it is moved by the
  // aux-loss-free rule, not by gradients).
  // parallel (may be null; must outlive the module): routed experts split over parallel->ep() (this rank holds the
  // contiguous global experts [expert_begin(), expert_begin() + experts.size())), tokens split over parallel->tp()
  // (sequence-parallel: each tp rank routes and computes split_rows(tp, T)[tp_rank] rows; the output and dx are
  // gathered back to all T rows on every tp rank). Routed expert parameters are Placement::Expert; with tp > 1 the
  // router and shared-expert parameters (and their adapters) are Placement::TpPartial.
  MoE(std::string prefix, const ModelConfig& cfg, bool hash_routed, const Parallel* parallel = nullptr);

  // x_TD: F32 [T, D], CPU or (after Model::to) the parameters' CUDA device, where the tensor-op path runs
  // (model/exec_path.h: router -> moe_sort_slots -> moe_permute -> per-expert GEMMs in the MoE's precision ->
  // swiglu -> moe_unpermute, the same order of operations as the CPU loops, adapters, frozen weights, tp and ep
  // included).
  // input_ids_T: I64 [T] on any device (needed by hash layers, may be undefined for learned ones);
  // layout.tokens() == T. ctx may be null when no backward follows. Stats are written to ctx->stats and *stats.
  Tensor forward(const Tensor& x_TD, const Tensor& input_ids_T, const SeqLayout& layout, MoECtx* ctx,
                 MoEStats* stats = nullptr) const;
  // Returns dx [T, D] for the loss  <dy, y> + balance_alpha * balance_term; accumulates the gradients of
  // gate.weight and every expert/shared weight (those with trainable = true).
  Tensor backward(const Tensor& dy_TD, const MoECtx& ctx, double balance_alpha = 0.0);
  // Visits the router, the LOCAL routed experts and the shared expert. Sets the placement of attached adapters first
  // (routed: Expert; router / shared: TpPartial when tp > 1).
  void visit(const ParamVisitor& f);

  bool hash_routed() const { return hash_; }
  int64_t n_experts() const { return n_experts_; }  // global E
  // Global index of experts[0]; experts[i] is global expert expert_begin() + i.
  int64_t expert_begin() const { return expert_begin_; }
  int64_t n_local_experts() const { return static_cast<int64_t>(experts.size()); }
  // Whether global expert e is held by this rank.
  bool holds_expert(int64_t e) const { return e >= expert_begin_ && e < expert_begin_ + n_local_experts(); }
  const Parallel* parallel() const { return parallel_; }
  int64_t top_k() const { return top_k_; }
  int64_t dim() const { return dim_; }
  int64_t inter_dim() const { return inter_; }
  bool has_shared() const { return has_shared_; }
  // Shape of expert matrix k (1, 3: [I, D]; 2: [D, I]).
  Shape expert_weight_shape(int k) const { return k == 2 ? Shape{dim_, inter_} : Shape{inter_, dim_}; }

  Param gate_weight;                   // prefix + "gate.weight"  [E, D]
  std::optional<LoraAdapter> gate_lora;  // prefix + "gate.lora_{A,B}": A [r, D], B [E, r] (LoRA on the router)
  Param gate_bias;                     // prefix + "gate.bias"    [E] F32 (learned layers only)
  Param tid2eid;                       // prefix + "gate.tid2eid" I64 [vocab, K] (hash layers only)
  std::vector<ExpertWeights> experts;  // LOCAL experts: prefix + "experts.{expert_begin() + i}.w{1,2,3}.weight"
  ExpertWeights shared;                // prefix + "shared_experts.w{1,2,3}.weight" (when n_shared_experts == 1)

 private:
  void sync_placements();
  Tensor forward_ops(const Tensor& x_TD, const Tensor& input_ids_T, const SeqLayout& layout, MoECtx* ctx,
                     MoEStats* stats) const;
  Tensor backward_ops(const Tensor& dy_TD, const MoECtx& ctx, double balance_alpha);
  // Whether any adapter is attached (router, routed or shared experts).
  bool has_lora() const;
  // The dropout draws of one forward (MoECtx::lora_draws; empty without adapters), after checking the adapters' shapes.
  std::vector<uint64_t> lora_draws() const;
  // The hash layer's fixed expert ids of tokens [t0, t0 + rows) (checked), row-major [rows, K], on the host.
  std::vector<int64_t> hash_expert_ids(const Tensor& input_ids_T, int64_t T, int64_t t0, int64_t rows) const;

  std::string prefix_;
  const Parallel* parallel_ = nullptr;
  int64_t expert_begin_ = 0;
  int64_t dim_ = 0, n_experts_ = 0, top_k_ = 0, inter_ = 0, vocab_ = 0;
  double route_scale_ = 1.0, limit_ = 0.0;
  bool hash_ = false, has_shared_ = true;
};

}  // namespace dsv4
