// DeepSeek-V4 hybrid attention (`layers.{i}.attn.*`, `mtp.0.attn.*`): one module for the three layer kinds
// (sliding window SWA m = 0, compressed sparse CSA m = 4, heavily compressed HCA m > 4), with explicit
// forward and backward. FP32 CPU reference; the math follows the official inference code and, where the two
// differ, the Hugging Face port (our test oracle) — see attention.cpp for the list.
//
// Legend: T tokens (batch * seq), D model dim, Q q_lora_rank, H heads, C head_dim, r rope dims, G output
// groups, R o_lora_rank, E compressed entries.
//   qr  = q_norm(wq_a x)                                   [T, Q]
//   q   = rmsnorm_unweighted_per_head(wq_b qr); RoPE(last r, pos)       [T, H, C]
//   kv  = RoPE(kv_norm(wkv x), pos)                        [T, C]   (K = V, one head shared by all heads)
//   ckv = compressor(x) (m > 0)                            [E, C]
//   candidates of query t: raw keys of the last window_size tokens of t's document up to t; plus
//     HCA: every entry of t's document whose block is complete at t; CSA: the indexer's top-k of those.
//   o   = sparse attention with sink (scale C^-0.5); o = RoPE^-1(o, pos)      [T, H, C]
//   y_g = wo_a_g o_g for each group g of H/G heads                    [T, G*R]
//   out = wo_b y                                           [T, D]
// Positions are document-relative (SeqLayout); attention never crosses a document boundary.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/compressor.h"
#include "model/indexer.h"
#include "model/sparse_attention.h"
#include "runtime/parallel.h"

namespace dsv4 {

struct AttentionOptions {
  // Official release numerics absent from the HF port: FP8 fake-quant (block 64) of the non-rope dims of the
  // raw and compressed KV; in the indexer, Hadamard rotation + FP4 fake-quant (block 32) of q and keys and
  // BF16 index scores. Gradients pass straight through the fake quantisers.
  bool simulate_release_quant = false;
  // Tensor parallelism (heads, output groups and indexer heads split over parallel->tp()); null: one rank.
  // With tp = parallel->tp_size() > 1 (n_heads, o_groups and index_n_heads divisible by tp) tp rank i holds
  //   heads [i*H/tp, (i+1)*H/tp): wq_b rows and attn_sink (TpSplit dim 0), output groups [i*G/tp, ...): wo_a rows
  //   (TpSplit dim 0) and wo_b columns (TpSplit dim 1, row-parallel: its output is summed over tp in forward),
  //   indexer heads: indexer.wq_b / weights_proj rows (TpSplit dim 0; scores summed over tp before the top-k).
  // wq_a, q_norm, wkv, kv_norm and the compressor are replicated and computed on every tp rank; each rank
  // back-propagates only its heads, so their gradients are TpPartial and backward sums dx over tp once at the end.
  // Adapters: see Attention::place_adapters.
  const Parallel* parallel = nullptr;
  // Tensor-op path on CUDA tensors only: the BF16 tensor-core forward and backward of the core attention
  // (cuda::sparse_attn_forward_tc / sparse_attn_backward_tc: q * scale, keys, dO, probabilities and score gradients
  // rounded to BF16, FP32 accumulation) where they support H and C, instead of the FP32 kernels. Off by default.
  bool tensor_cores = false;
};

struct AttentionCtx {
  std::vector<int64_t> pos;  // [T] document-relative positions
  LinearCtx wq_a, wq_b, wkv, wo_b;
  RMSNormCtx q_norm, kv_norm;
  Tensor q_raw;   // [T, H*C] wq_b output (input of the per-head norm)
  Tensor q_rstd;  // [T*H]
  Tensor q;       // [T, H, C] core input (normed, RoPE'd)
  Tensor kv;      // [T, C] core input
  Tensor ckv;     // [E, C] compressed entries (undefined for SWA)
  Tensor o;       // [T, H, C] core output (before the inverse RoPE)
  Tensor lse;     // [T, H]
  Tensor o_rot;   // [T, H*C] after the inverse RoPE (wo_a input)
  // Tensor-op path with a trainable wo_a: o_rot and wo_a as the GEMM operands of wo_a_precision (precision_operand:
  // BF16 in bf16 on a device, the tensors themselves otherwise), made once in forward for every group's GEMMs.
  Tensor o_rot_op, wo_a_op;
  std::vector<Tensor> wo_a_lora_z;        // [G] adapter activations [T, r] of each adapted group (wo_a adapters)
  std::vector<uint64_t> wo_a_lora_draws;  // [G] dropout draw used by each group
  SparseAttnIndex index;
  Tensor comp_ids_device;  // CSA on CUDA: index.comp_ids as the indexer left them on the device (I32)
  CompressPlan plan;
  CompressorCtx compressor;
  // Tensor-op path (set by a forward on it; backward follows the same path).
  bool ops_path = false;
  Tensor pos_t;                 // I64 [T] positions on x's device
  Tensor inv_freq;              // F32 [r / 2] the layer's RoPE frequencies on x's device
  SparseAttnDeviceIndex dindex;  // the candidate lists in the CUDA kernels' form (CUDA only)
};

class Attention {
 public:
  Attention() = default;
  // prefix: "layers.{i}.attn." or "mtp.0.attn."; layer indexes cfg.compress_ratios.
  Attention(std::string prefix, const ModelConfig& cfg, int64_t layer, AttentionOptions opts = {});

  // x_TD: the attn_norm output. ctx may be null when no backward follows.
  // With use_ops_path(x_TD) (x on a CUDA device, or a ForceOpsPath scope; model/exec_path.h) forward and backward run
  // the tensor-op path: every step a runtime op or kernel on x's device (Linear / RMSNorm, rmsnorm_forward per head,
  // rope_apply, the compressor's and indexer's tensor-op paths, sparse_attn_forward_tensors, grouped wo_a through
  // pmatmul_xwT on column slices), FP32 throughout; the candidate lists are built on the host (CSA's top-k comes
  // from the device). On CPU tensors it runs the same CPU functions in the same order as the reference, so it is
  // bit-identical to it. Not supported there yet (one-line errors): LoRA adapters, tensor parallelism,
  // simulate_release_quant, frozen weights; every parameter must be on x's device.
  Tensor forward(const Tensor& x_TD, const SeqLayout& layout, AttentionCtx* ctx) const;
  // Returns dx_TD; accumulates the gradients of every trainable parameter (the indexer's get none).
  Tensor backward(const Tensor& dout_TD, const AttentionCtx& ctx);
  void visit(const ParamVisitor& f);

  // The candidate lists the core attention uses (exposed for tests and the CUDA path).
  // comp_ids_device: CSA on CUDA tensors also gets the top-k ids as they are on the device (undefined otherwise);
  // host_ids = false leaves them there only (SparseAttnIndex::comp_ids_on_device: no copy to the host, no wait).
  SparseAttnIndex build_index(const Tensor& x_TD, const Tensor& qr_TQ, const SeqLayout& layout,
                              const std::vector<int64_t>& pos, const CompressPlan& plan,
                              Tensor* comp_ids_device = nullptr, bool host_ids = true) const;

  AttnKind kind() const { return kind_; }
  int64_t ratio() const { return ratio_; }
  const RopeTable& rope() const { return rope_; }
  bool has_compressor() const { return ratio_ > 0; }
  bool has_indexer() const { return ratio_ == 4; }
  // Keeps wo_a frozen as a QuantizedWeight [G*R, H*C/G] (FP8 / BF16 / F32), multiplied group by group with
  // dequantise-on-the-fly tiles like a frozen Linear: no F32 copy, no gradient, skipped by visit(). Throws naming the
  // weight on a shape mismatch.
  void set_wo_a_frozen(QuantizedWeight w);
  // Output groups / heads held by this rank (all of them without tensor parallelism) and the first one's global index.
  int64_t o_groups() const { return groups_; }
  int64_t o_group_offset() const { return group0_; }
  int64_t local_heads() const { return heads_; }
  int64_t head_offset() const { return head0_; }
  int64_t o_lora_rank() const { return o_lora_; }
  int64_t wo_a_in() const { return heads_ * head_dim_ / groups_; }
  // Sets the placement of every attached adapter from the tp layout (a no-op without tensor parallelism); the LoRA
  // API (lora.cpp) calls it after attaching at any of this attention's sites. Under tp:
  //   wq_a, wkv, compressor.*: A, B TpPartial;  wq_b (column-parallel): A TpPartial, B TpSplit dim 0;
  //   wo_b (row-parallel): A TpSplit dim 1, B Replicated (z = A x_local is summed over tp, s B z added once);
  //   wo_a shared-A: A TpPartial, B TpSplit dim 0 (this rank's group rows); wo_a per-group adapters exist only on
  //   the rank holding their group (global unit names "wo_a.{g}"), Replicated (sum over dp);
  //   indexer.wq_b / weights_proj: B TpSplit dim 0 (no gradients); indexer.compressor.*: Replicated (no gradients).
  void place_adapters();
  // Precision of the weight GEMMs (projections, grouped wo_a, compressor and indexer projections).
  void set_matmul_precision(MatmulPrecision p);

  Linear wq_a;      // [Q, D]
  RMSNorm q_norm;   // [Q]
  Linear wq_b;      // [H*C, Q]
  Linear wkv;       // [C, D]
  RMSNorm kv_norm;  // [C]
  Param wo_a;       // [G*R, H*C/G] (no storage under DeferredWeightStorage until a loader fills it)
  QuantizedWeight wo_a_frozen;  // wo_a kept frozen in storage precision (set_wo_a_frozen); then wo_a has no value
  GroupedLora wo_a_lora;  // LoRA on wo_a: one adapter per group, or one shared-A adapter (lora.h)
  Linear wo_b;      // [D, G*R]
  Param attn_sink;  // [H]
  Compressor compressor;  // ratio > 0
  Indexer indexer;        // ratio == 4

 private:
  void check_wo_a_lora() const;
  // Compressed entries (c.plan, c.ckv; the compressor's context when keep_ctx) and the candidate lists (c.index) of
  // both paths (host_ids: build_index's); returns the number of entries.
  int64_t compress_and_index(const Tensor& x_TD, const Tensor& qr_TQ, const SeqLayout& layout, AttentionCtx& c,
                             bool keep_ctx, bool host_ids = true) const;
  // The adapter of output group g (the shared-A one, the group's own, or null) and its dropout mask offset.
  LoraAdapter* wo_a_group_adapter(int64_t g);
  const LoraAdapter* wo_a_group_adapter(int64_t g) const;
  uint64_t wo_a_lora_offset(int64_t g, int64_t T) const;
  void check_ops_path(Device device) const;
  Tensor forward_ops(const Tensor& x_TD, const SeqLayout& layout, AttentionCtx* ctx) const;
  Tensor backward_ops(const Tensor& dout_TD, const AttentionCtx& ctx);

  std::string prefix_;
  AttnKind kind_ = AttnKind::SlidingWindow;
  const Communicator* tp_ = nullptr;  // null without tensor parallelism
  int64_t head0_ = 0, group0_ = 0;    // global index of this rank's first head / output group
  int64_t ratio_ = 0, dim_ = 0, heads_ = 0, head_dim_ = 0, rope_dim_ = 0, groups_ = 0, o_lora_ = 0, window_ = 0,
          index_topk_ = 0;
  double eps_ = 1e-6;
  bool ue8m0_ = true;
  AttentionOptions opts_;
  RopeTable rope_;
  MatmulPrecision wo_a_precision_ = MatmulPrecision::F32;
};

}  // namespace dsv4
