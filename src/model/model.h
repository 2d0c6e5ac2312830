// The DeepSeek-V4 model: embedding, four-stream residual expansion, decoder blocks (mHC around hybrid
// attention and DeepSeekMoE), the stream-collapsing head, final norm and output head, and the depth-1
// multi-token-prediction block. Explicit forward (recording contexts) and backward (accumulating parameter
// gradients). CPU FP32 reference.
//
// Devices: the model runs where its parameters are (Model::to). The glue here (stream expansion, MTP combination,
// the sums over streams) is device-agnostic runtime ops; each module runs its CPU reference on CPU tensors and its
// tensor-op path on CUDA tensors (model/exec_path.h). Token ids and labels may be on the CPU (the data loader's) or on
// the model's device:
//   - Model::forward passes the ids as given to the blocks (MoE hash routing) and keeps them as given in
//     ModelCtx::ids_T; the Embedding copies them to its weight's device when they are elsewhere (once per forward
//     and once per backward: T int64s);
//   - the MTP block's shifted ids are built on the host and copied once to the model's device (MtpCtx::next_ids_T);
//   - targets (shift_targets, count_targets) are built on the host; cross_entropy copies them to the logits' device.
// Logits and gradients stay on the model's device; the losses come back to the host as doubles (LossResult).
// Vocab-parallel embedding / cross-entropy (tensor parallelism > 1) run on the CPU only so far (a clear error).
//
// Shapes: T = batch * seq tokens (SeqLayout), n = hc_mult streams, D = dim, V = vocab.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "model/attention.h"
#include "model/config.h"
#include "model/embedding.h"
#include "model/layers.h"
#include "model/mhc.h"
#include "model/moe.h"

namespace dsv4 {

struct ModelOptions {
  AttentionOptions attention;
  // Per-layer activation recomputation: forward keeps only each decoder block's input; backward re-runs the
  // block's forward to rebuild its context just before its backward (same results, less memory).
  bool recompute = false;
  // The rank layout (tensor / expert parallel model parts); null or a single-rank Parallel: the whole model here.
  // Must outlive the model. Model's constructor copies it into attention.parallel.
  const Parallel* parallel = nullptr;
};

struct BlockCtx {
  HcPreCtx attn_pre;
  RMSNormCtx attn_norm;
  AttentionCtx attn;
  HcPostCtx attn_post;
  HcPreCtx ffn_pre;
  RMSNormCtx ffn_norm;
  MoECtx ffn;
  HcPostCtx ffn_post;
};

// One decoder layer: X -> hc_attn(attn(attn_norm(.))) -> hc_ffn(ffn(ffn_norm(.))).
class Block {
 public:
  // prefix: "layers.{i}." or "mtp.{j}."; layer: index into cfg.compress_ratios.
  Block(const std::string& prefix, const ModelConfig& cfg, int64_t layer, bool hash_routed, const ModelOptions& opts);

  Tensor forward(const Tensor& X_TND, const Tensor& ids_T, const SeqLayout& layout, BlockCtx* ctx,
                 MoEStats* stats) const;
  Tensor backward(const Tensor& dX_TND, const BlockCtx& ctx, double balance_alpha);
  void visit(const ParamVisitor& f);

  HyperConnection hc_attn, hc_ffn;
  RMSNorm attn_norm, ffn_norm;
  Attention attn;
  MoE ffn;
};

struct MtpCtx {
  Tensor next_ids_T;  // I64 [T] on the model's device
  RMSNormCtx enorm;
  RMSNormCtx hnorm;
  LinearCtx e_proj, h_proj;
  BlockCtx block;
  HcHeadCtx head;
  RMSNormCtx norm;
  LinearCtx out;
};

// Depth-1 MTP (DeepSeek-V3 form): position t combines the main model's final streams at t with the
// embedding of token t+1 and predicts token t+2. Shares the embedding and output head with the main model.
class Mtp {
 public:
  Mtp(const std::string& prefix, const ModelConfig& cfg, int64_t layer, const ModelOptions& opts);

  // X_main: final main streams [T, n, D]. Returns logits [T, V].
  Tensor forward(const Tensor& X_main_TND, const Tensor& ids_T, const SeqLayout& layout, const Embedding& embed,
                 const Linear& head, MtpCtx* ctx, MoEStats* stats) const;
  // Returns d(X_main); accumulates into embed/head gradients too.
  Tensor backward(const Tensor& dlogits_TV, const MtpCtx& ctx, Embedding& embed, Linear& head, double balance_alpha);
  void visit(const ParamVisitor& f);

  RMSNorm enorm, hnorm;
  Linear e_proj, h_proj;
  Block block;
  HyperHead hc_head;
  RMSNorm norm;
};

struct ModelCtx {
  Tensor ids_T;  // as the caller passed them (any device)
  SeqLayout layout;
  std::vector<BlockCtx> blocks;      // per block (empty contexts under recomputation)
  std::vector<Tensor> block_inputs;  // recomputation: each block's input streams [T, n, D]
  Tensor X_final_TND;
  HcHeadCtx head;
  RMSNormCtx norm;
  LinearCtx out;
  std::vector<MtpCtx> mtp;
};

struct ModelOutput {
  Tensor logits_TV;
  std::vector<Tensor> mtp_logits_TV;  // one per MTP block
  std::vector<MoEStats> moe_stats;    // main layers, then MTP blocks
};

// Loss weights of one training step.
struct LossWeights {
  double mtp = 0.3;              // weight of each MTP block's cross-entropy
  double balance_alpha = 1e-4;   // sequence-wise balance loss weight per MoE layer (0 disables)
  // Divisors of the summed cross-entropies (0: this call's own counted tokens, i.e. the mean). Data parallelism
  // and gradient accumulation pass the global token counts so that summing every rank's and micro-batch's
  // gradients gives exactly the gradient of the global mean.
  double lm_normalizer = 0;
  double mtp_normalizer = 0;
};

struct LossResult {
  double total = 0;    // lm + mtp * sum(mtp_losses) + balance
  double lm = 0;
  std::vector<double> mtp;
  double balance = 0;  // alpha * sum of per-layer balance terms
  int64_t tokens = 0;  // tokens counted by the LM loss
  ModelOutput output;
};

// Next-token (and per-MTP-block) targets that a batch's labels give, without running the model.
struct TargetCounts {
  int64_t lm = 0;
  std::vector<int64_t> mtp;
};
TargetCounts count_targets(const Tensor& labels_T, const SeqLayout& layout, int64_t n_mtp);

class Model {
 public:
  explicit Model(const ModelConfig& cfg, const ModelOptions& opts = {});

  const ModelConfig& config() const { return cfg_; }
  // The rank layout the model was built for (null: one rank).
  const Parallel* parallel() const { return parallel_; }
  // ids I64 [T] on the CPU or the model's device (see the header comment).
  ModelOutput forward(const Tensor& ids_T, const SeqLayout& layout, ModelCtx* ctx) const;
  // dmtp_logits may be empty or hold undefined tensors for blocks without a loss.
  void backward(const Tensor& dlogits_TV, const std::vector<Tensor>& dmtp_logits_TV, const ModelCtx& ctx,
                double balance_alpha);
  // Forward + backward of the training loss on labels [T] (next-token targets are labels shifted by one
  // within each row, as HF does; MTP block j targets labels shifted by j + 2; in packed rows a target from another
  // document than its position's is ignored). Gradients accumulate.
  LossResult forward_backward(const Tensor& ids_T, const Tensor& labels_T, const SeqLayout& layout,
                              const LossWeights& weights);
  // Loss only (no gradients).
  LossResult evaluate(const Tensor& ids_T, const Tensor& labels_T, const SeqLayout& layout,
                      const LossWeights& weights) const;

  void visit(const ParamVisitor& f);
  // Gradients of `params` (parameters of this model, in the order their flat buffers should have) as views of one
  // buffer per device (allocate_grad_buffers, model/param.h): zero_grad() then clears them in one call per device.
  void allocate_grads(const std::vector<Param*>& params);
  // Zeroes every allocated gradient (the flat buffers in one call each, other gradients one by one).
  void zero_grad();
  // Moves every parameter (values, and gradients where allocated, adapters included) and every frozen weight (Linears,
  // experts, wo_a; each in its own format, FP4 included) to `device`; CUDA tensors then run each module's
  // tensor-op path (model/exec_path.h).
  void to(Device device);
  // Precision of the weight GEMMs (model/matmul_precision.h; train.precision): every Linear, expert and grouped wo_a
  // of the layers and MTP blocks; the output head runs BF16 when p is FP8 (the recipe keeps it out of FP8).
  // Frozen (quantised) weights keep their own path. Default F32.
  void set_matmul_precision(MatmulPrecision p);
  MatmulPrecision matmul_precision() const { return precision_; }
  int64_t num_params() const;
  // Random initialisation in the style of the HF port (linear/embedding N(0, initializer std), norms 1,
  // mHC scale 1 and base 0, sinks/ape/bias 0, hash tables a seeded choice of distinct experts per token). Each
  // parameter has its own stream seeded by (seed, name) and draws its global tensor: every layout gets the same model.
  // Parameters on a device are drawn on the host and copied (the same values as on the CPU).
  void init_random(uint64_t seed, double stddev = 0.02);
  // Copies every tensor of a native-name state dict (global shapes) into the parameters (this rank's parts). Missing,
  // unexpected, or mis-shaped tensors are reported together in one error naming them (`source` names the file).
  // Tensors of routed experts held by other ranks (foreign_expert) are ignored, so a full state dict loads anywhere.
  void load_state(const std::map<std::string, Tensor>& state, const std::string& source);
  // Whether `name` is a tensor of a routed expert ("layers.{i}.ffn.experts.{e}." / "mtp.{j}.ffn.experts.{e}.", any
  // suffix) of one of this model's MoE blocks that this rank does not hold (expert parallelism).
  bool foreign_expert(const std::string& name) const;

  Embedding embed;
  std::vector<std::unique_ptr<Block>> layers;
  HyperHead hc_head;
  RMSNorm norm;
  Linear head;
  std::vector<std::unique_ptr<Mtp>> mtp;

 private:
  ModelConfig cfg_;
  bool recompute_ = false;
  MatmulPrecision precision_ = MatmulPrecision::F32;
  const Parallel* parallel_ = nullptr;
  std::vector<Tensor> grad_buffers_;  // from allocate_grads; dropped by to()
};

}  // namespace dsv4
