// Lightning indexer of DeepSeek-V4's CSA layers (`attn.indexer.*`): picks, per query, the top-k compressed
// entries the core attention may use.
//
// Legend: T tokens, D model dim, Q q_lora_rank, nI index heads, cI index head dim, E compressed entries.
//   qI  = wq_b(qr) viewed [T, nI, cI]; RoPE on the last rope dims at the query position
//   KI  = indexer.compressor(x) [E, cI] (ratio 4, overlapping windows)
//   w   = weights_proj(x) * nI^-0.5                                   [T, nI]
//   I[t, e] = sum_h w[t, h] * (ReLU(qI[t, h] . KI[e]) * cI^-0.5)       for the entries e visible to t
//   selection: the min(index_topk, visible) highest scores; ties go to the lower entry id.
// (HF computes it in this order; the official code folds cI^-0.5 into w: same value up to rounding.)
// With simulate_release_quant (official release numerics, not in HF): qI and KI are Hadamard-rotated and
// FP4 fake-quantised (block 32), and I is rounded to BF16 before the top-k.
// The selection is integer-valued, so no gradient reaches any indexer parameter (nor qr / x through the
// indexer) from the LM loss; the parameters are marked trainable = false.
#pragma once

#include <vector>

#include "model/compressor.h"
#include "runtime/parallel.h"

namespace dsv4 {

// Scores of each query for the entries it may see: query t's scores are values[offsets[t] .. offsets[t+1])
// and belong to the entries plan.first_entry[t] + 0, 1, ..., plan.n_visible[t] - 1.
struct IndexScores {
  std::vector<int64_t> offsets;  // [T + 1]
  std::vector<float> values;
};

// Scores from the indexer's projected inputs (the part after the GEMMs that the CUDA kernel mirrors):
// q [T, nI, cI] (after RoPE / rotation / fake quant), k [E, cI] (compressor output), w [T, nI] (weights_proj
// output, unscaled). values[s.offsets[t] + e] (s.offsets: prefix sums of plan.n_visible) are overwritten with
// sum_h indexer_score_term(q[t, h] . k[first_entry[t] + e], w[t, h] * weight_scale, score_scale), h ascending.
// No BF16 rounding here (Indexer::scores rounds after the tp sum). float: dots by GEMM; double: plain loops.
// CSR offsets of a plan's scores: prefix sums of plan.n_visible ([T + 1]).
std::vector<int64_t> indexer_score_offsets(const CompressPlan& plan);

template <typename T>
void indexer_scores_rows(const T* q, const T* k, const T* w, const CompressPlan& plan, int64_t nI, int64_t cI,
                         T score_scale, T weight_scale, const std::vector<int64_t>& offsets, T* values);

class Indexer {
 public:
  Indexer() = default;
  // prefix: "layers.{i}.attn.indexer.". With parallel->tp_size() = tp > 1 (index_n_heads divisible by tp) tp rank i
  // holds heads [i*nI/tp, (i+1)*nI/tp): wq_b and weights_proj rows (TpSplit dim 0); scores() sums the per-head terms
  // locally and then over tp before any rounding, so every tp rank selects the same entries.
  Indexer(const std::string& prefix, const ModelConfig& cfg, bool simulate_release_quant,
          const Parallel* parallel = nullptr);

  // x_TD: the attention input; qr_TQ: q_norm(wq_a(x)); pos: the tokens' (document-relative) positions.
  IndexScores scores(const Tensor& x_TD, const Tensor& qr_TQ, const std::vector<int64_t>& pos,
                     const CompressPlan& plan, const RopeTable& rope) const;
  // The tensor-op path (model/exec_path.h) of scores + select_topk: projections, RoPE (rope_apply) and the compressor
  // on x's device, then cuda::indexer_scores + cuda::indexer_topk on CUDA tensors (the ids copied back to the host)
  // or indexer_scores_rows<float> + select_topk on CPU tensors. Same CSR as select_topk(scores(...)). ids_device
  // (CUDA only): also the ids as they are on the device (I32, at least offsets.back() elements; undefined otherwise).
  // host_ids = false with ids_device on CUDA: the ids are not copied to the host (ids left empty; no wait for the GPU).
  void select_topk_ops(const Tensor& x_TD, const Tensor& qr_TQ, const std::vector<int64_t>& pos,
                       const CompressPlan& plan, const RopeTable& rope, int64_t topk, std::vector<int64_t>& offsets,
                       std::vector<int64_t>& ids, Tensor* ids_device = nullptr, bool host_ids = true) const;
  // What the tensor-op path does not support (tensor parallelism, adapters, frozen weights, simulate_release_quant)
  // and parameters off `device`: one-line errors naming `module`.
  void check_ops_path(const std::string& module, Device device) const;
  // Top-k per query as CSR lists of global entry ids (ascending within a query).
  static void select_topk(const IndexScores& s, const CompressPlan& plan, int64_t topk, std::vector<int64_t>& offsets,
                          std::vector<int64_t>& ids);
  void visit(const ParamVisitor& f);

  int64_t local_heads() const { return n_heads_; }
  int64_t head_dim() const { return head_dim_; }

  Linear wq_b;          // [nI*cI, Q]
  Linear weights_proj;  // [nI, D]
  Compressor compressor;

 private:
  int64_t n_heads_ = 0, head_dim_ = 0, topk_ = 0;  // n_heads_: this rank's heads
  int64_t global_heads_ = 0;
  const Communicator* tp_ = nullptr;
  bool simulate_ = false;
};

}  // namespace dsv4
