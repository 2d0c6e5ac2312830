// LoRA adapters on a frozen DeepSeek-V4 base (issue 7).
//
//   y = W x + s · B (A drop(x)),   A [r, in], B [out, r],   s = alpha / r   (rsLoRA: alpha / sqrt(r))
//
// W stays frozen in whatever form its holder keeps it (a frozen QuantizedWeight in FP8 / FP4 / BF16 / F32 after
// load_model(LoadMode::FrozenQuantized) — wo_a too with LoadOptions::frozen_wo_a — or an F32 Param with
// trainable = false); only A and B are trainable Params (no gradient buffer or optimizer state for the base). drop() is inverted dropout on the adapter input (keep probability 1 - p, kept values scaled by 1/(1-p)),
// active only in train mode; its mask is a pure function of (adapter key, draw, element index), so a forward and
// its backward see the same mask and set_lora_dropout_step() makes runs reproducible.
//
// Initialisation (PEFT's default, init_lora_weights=True): B = 0 and A drawn exactly as
//   torch.manual_seed(lora_init_seed(seed, adapter_name)); torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
// on a CPU F32 tensor [r, in] (U(-b, b), b = 1/sqrt(in) computed as torch does; torch's mt19937 and uniform_
// transformation are reproduced bit for bit).
//
// Adapter sites (native unit names = the weight's native name without ".weight"):
//   attention   layers.{i}.attn.{wq_a, wq_b, wkv, wo_b}                     Linear
//               layers.{i}.attn.wo_a                                          grouped projection, see below
//   MoE         layers.{i}.ffn.shared_experts.{w1, w2, w3}                   one adapter each
//               layers.{i}.ffn.experts.{e}.{w1, w2, w3}                      per expert; see "routed w1 + w3"
//               layers.{i}.ffn.gate                                           the router weight [E, D] (optional)
//   explicit    layers.{i}.attn.compressor.{wkv, wgate}, layers.{i}.attn.indexer.{wq_b, weights_proj},
//   only        layers.{i}.attn.indexer.compressor.{wkv, wgate}, and every mtp.{j}.* site (incl. mtp.{j}.e_proj /
//               h_proj): matched only by a pattern that names "compressor" / "indexer" / "mtp" itself (the indexer's
//               adapters receive no gradient: its top-k is not differentiable; transformers has no MTP block).
//
// Grouped wo_a (W [G*R, K], K = H*C/G, y_g = o_g W_g^T with W_g = rows [g*R, (g+1)*R)):
//   per group (default)  one adapter per group, unit "…attn.wo_a.{g}": A_g [r, K], B_g [R, r], dW_g = s B_g A_g.
//   shared A             one adapter, unit "…attn.wo_a": A [r, K], B [G*R, r], dW = s B A (so dW_g = s B_g A with
//                        B_g = rows of B): exactly what PEFT does with target_parameters=["…o_a_proj.weight"].
//   (PEFT cannot wrap the DeepseekV4GroupedLinear *module* correctly — its LoRA path ignores the grouping — so the
//   PEFT format holds wo_a adapters as a target_parameters adapter on o_a_proj.weight; per-group adapters are
//   written block-diagonally there, see peft.h.)
// Routed w1 + w3: transformers stacks them into one gate_up_proj [E, 2I, D] and PEFT's adapter on it shares A
// between the two halves. When a pattern selects both w1 and w3 of a routed expert, dsv4 attaches the same fused
// adapter, unit "…experts.{e}.w13": A [r, D], B [2I, r], dW1 = s B[:I] A, dW3 = s B[I:] A. A routed w1 or w3
// selected alone gets its own adapter (B [I, r]). Shared experts are separate modules in transformers too:
// w1, w2, w3 each get their own adapter.
//
// Target patterns (LoraConfig::targets), matched against the units above (the ".weight" suffix is optional):
//   `*` any run of characters except '.', `**` any run including '.', `?` one character except '.',
//   `{a,b,c}` alternatives. A pattern that does not start with "layers.", "mtp." or "*" also matches any
//   dot-separated suffix of a unit (PEFT's suffix rule: "wq_a" = "**.wq_a", "experts.*.w2" = every routed w2).
//   Examples: "wq_a", "attn.wo_{a,b}", "layers.{0,1}.attn.*", "experts.*.w{1,3}", "shared_experts.*", "ffn.gate",
//   "wo_a.1" (one group only). "**" selects every non-explicit site (MoE routers included).
//
// Tensor parallelism (AttentionOptions::parallel with tp > 1): attention adapters hold this rank's part of the
// single-rank adapter and carry its Param::placement (set by Attention::place_adapters when attached, see attention.h);
// apply_lora draws each A over its global shape and keeps this rank's slice, so the adapters equal the single-rank ones.
// Per-group wo_a adapters exist only on the rank holding their group ("wo_a.{g}" keeps the global g; a pattern
// naming one group matches no site on the other ranks). Dropout masks of the row-parallel wo_b adapter are drawn
// over the local input columns (a valid dropout, not the single-rank mask).
//
// Parameter names: "<unit>.lora_A" / "<unit>.lora_B" (e.g. "layers.3.attn.wq_a.lora_A",
// "layers.3.attn.wo_a.1.lora_B", "layers.1.ffn.experts.5.w13.lora_A"). They are ordinary trainable F32 Params,
// visited by Model::visit right after their base weight, so optimizers and trainer checkpoints see them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/param.h"

namespace dsv4 {

class Model;

struct LoraConfig {
  int64_t rank = 8;
  double alpha = 16.0;
  bool rslora = false;               // s = alpha / sqrt(r) instead of alpha / r
  double dropout = 0.0;              // probability in [0, 1)
  std::vector<std::string> targets;  // patterns (see the header comment)
  uint64_t seed = 0;                 // A's initialisation and the dropout streams
  bool wo_a_per_group = true;        // false: one shared-A adapter on the whole wo_a matrix (PEFT's form)

  double scale() const;
  void validate() const;  // throws naming the bad field
};

// One adapter on one weight (or a fused pair / a grouped block, see the header comment).
struct LoraAdapter {
  std::string unit;   // native unit name ("layers.0.attn.wq_a", "layers.1.ffn.experts.3.w13", "layers.0.attn.wo_a.1")
  Param A;            // [r, in]   unit + ".lora_A"
  Param B;            // [out, r]  unit + ".lora_B"
  double scale = 1.0;
  double dropout = 0.0;
  uint64_t dropout_key = 0;
  bool train = false;          // dropout active (set_lora_train_mode)
  mutable uint64_t draws = 0;  // position in the dropout stream (advanced by each forward that drops)

  LoraAdapter() = default;
  // Zero A and B of the given shapes, trainable.
  LoraAdapter(std::string unit, int64_t rank, int64_t in, int64_t out, double scale, double dropout = 0.0,
              uint64_t dropout_key = 0);

  int64_t rank() const { return A.value.size(0); }
  int64_t in_features() const { return A.value.size(1); }
  int64_t out_features() const { return B.value.size(0); }
  bool dropout_active() const { return train && dropout > 0.0; }
  // The draw of one forward: the current stream position (advanced when dropout is active).
  uint64_t next_draw() const { return dropout_active() ? draws++ : 0; }
  void visit(const ParamVisitor& f) {
    f(A);
    f(B);
  }
  // dW rows [b0, b0 + m) = s B[b0:b0+m] A as a fresh F32 [m, in] tensor.
  Tensor delta(int64_t b0 = 0, int64_t m = -1) const;
};

// Grouped wo_a adapters: per group (groups[g]: A [r, K], B [R, r]; a group without one is not adapted) or one
// shared-A adapter (B [G*R, r]); never both.
struct GroupedLora {
  std::vector<std::optional<LoraAdapter>> groups;  // empty, or one slot per group
  std::optional<LoraAdapter> shared;
  bool empty() const {
    if (shared) return false;
    for (const auto& g : groups)
      if (g) return false;
    return true;
  }
  void visit(const ParamVisitor& f) {
    if (shared) shared->visit(f);
    for (auto& g : groups)
      if (g) g->visit(f);
  }
};

// ---- cores on raw row-major FP32 buffers (n rows; `mask_offset` shifts the dropout element index) ------------
// z [n, r] = drop(x) A^T, x [n, in] with row stride ldx.
void lora_down(const LoraAdapter& ad, int64_t n, const float* x, int64_t ldx, uint64_t draw, uint64_t mask_offset,
               float* z);
// y [n, m] (row stride ldy) += s z B[b0 : b0+m]^T.
void lora_up(const LoraAdapter& ad, int64_t n, const float* z, int64_t b0, int64_t m, float* y, int64_t ldy);
// Backward of lora_up: dB[b0 : b0+m] += s dy^T z (when B is trainable); dz [n, r] += s dy B[b0 : b0+m].
void lora_up_backward(LoraAdapter& ad, int64_t n, const float* dy, int64_t lddy, const float* z, int64_t b0, int64_t m,
                      float* dz);
// Backward of lora_down: dA += dz^T drop(x) (when A is trainable); dx (row stride lddx, may be null) += drop'(dz A).
void lora_down_backward(LoraAdapter& ad, int64_t n, const float* dz, const float* x, int64_t ldx, uint64_t draw,
                        uint64_t mask_offset, float* dx, int64_t lddx);
// ---- tensor forms (any device: the tensor-op path, model/exec_path.h), the same operations as the cores above; the
// masks come from runtime/model_ops.h's hashed_dropout (CPU and CUDA twins, bit-identical) ------------------------
// z [n, r] = drop(x) A^T; x [n, in] with unit inner stride.
Tensor lora_down(const LoraAdapter& ad, const Tensor& x, uint64_t draw, uint64_t mask_offset);
// y [n, m] (unit inner stride, e.g. a column range of a wider output) += s z B[b0 : b0+m]^T.
void lora_up(const LoraAdapter& ad, const Tensor& z, int64_t b0, Tensor& y);
// dB[b0 : b0+m] += s dy^T z (when B is trainable); dz [n, r] += s dy B[b0 : b0+m] (dy [n, m]).
void lora_up_backward(LoraAdapter& ad, const Tensor& dy, const Tensor& z, int64_t b0, Tensor& dz);
// dA += dz^T drop(x) (when A is trainable); dx [n, in] (may be null) += drop'(dz A).
void lora_down_backward(LoraAdapter& ad, const Tensor& dz, const Tensor& x, uint64_t draw, uint64_t mask_offset,
                        Tensor* dx);
// Dropout keep decision of element `index` in draw `draw` (exposed for tests).
bool lora_dropout_keep(const LoraAdapter& ad, uint64_t draw, uint64_t index);

// ---- initialisation ------------------------------------------------------------------------------------------
// The torch seed of an adapter's A: low 32 bits of splitmix64(seed ^ fnv1a64(adapter unit name)).
uint32_t lora_init_seed(uint64_t seed, const std::string& unit);
// torch.manual_seed(torch_seed); torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5)) on CPU F32 A [rows, cols].
void kaiming_uniform_like_torch(Tensor& A, uint32_t torch_seed);

// ---- model-level API (what the trainer uses) -----------------------------------------------------------------
// Attaches adapters to every unit the patterns select (A Kaiming-uniform, B zero, scale and dropout from cfg),
// then freezes every non-adapter parameter (trainable = false). Returns the number of adapters attached (a grouped
// wo_a counts o_groups adapters per layer, a fused routed w13 counts one). Throws, naming them, when a pattern
// matches no unit, when a unit already has an adapter, or on an invalid config.
int64_t apply_lora(Model& model, const LoraConfig& cfg);
// Dropout on (train) or off (eval) in every adapter.
void set_lora_train_mode(Model& model, bool train);
// Restarts every adapter's dropout stream at a position derived from `step` (call at the start of each optimizer
// step for masks that depend only on (seed, adapter, step, micro-batch index)).
void set_lora_dropout_step(Model& model, uint64_t step);
// A and B of every adapter, in Model::visit order.
std::vector<Param*> lora_params(Model& model);
// Every attached adapter, in Model::visit order.
std::vector<LoraAdapter*> lora_adapters(Model& model);
// Drops every adapter (base weights keep their trainable flags as they are).
void remove_lora(Model& model);
// trainable = false (and no gradient buffer) for every parameter that is not an adapter's A or B.
void freeze_base(Model& model);

// One place an adapter can attach (see the header comment). `in` / `out` are the adapter's A / B widths.
struct LoraSite {
  std::string unit;
  std::string weight;        // the native weight it modifies ("…wo_a.weight" for the grouped units)
  int64_t in = 0, out = 0;
  bool pattern_unit = true;  // matched by target patterns (false: w13 and wo_a.{g}, derived from their parts)
  bool explicit_only = false;
};
// Every site of a model, in visit order.
std::vector<LoraSite> lora_sites(Model& model);
// The same sites from a config alone (from its ParamTable; no model is built), in table order.
std::vector<LoraSite> lora_sites(const ModelConfig& cfg);
// Where an adapter's delta goes: weight rows [weight_row0, weight_row0 + rows) += s B[b_row0 : b_row0 + rows] A.
struct LoraDeltaPart {
  std::string weight;  // native weight name
  int64_t weight_row0 = 0, b_row0 = 0, rows = 0;
};
// The parts of a unit (w13: the w1 and w3 halves; wo_a.{g}: the group's rows; else the whole weight).
std::vector<LoraDeltaPart> lora_unit_parts(const LoraSite& site, const ModelConfig& cfg);
// Attaches a zero adapter (A and B zero, trainable) at `unit`, any site of lora_sites() (w13 and wo_a.{g}
// included); throws naming the unit when it is not a site, already has an adapter, or conflicts with one (w13 vs
// w1/w3 of the same expert, per-group vs shared-A wo_a).
LoraAdapter& attach_lora(Model& model, const std::string& unit, int64_t rank, double scale, double dropout = 0.0,
                         uint64_t dropout_key = 0);
// The dropout key of an adapter (from the config seed and the unit name).
uint64_t lora_dropout_key(uint64_t seed, const std::string& unit);
// Does `pattern` select `unit` (see the header comment: units under compressor / indexer / mtp need the pattern to
// name that word)?
bool lora_pattern_matches(const std::string& pattern, const std::string& unit);

}  // namespace dsv4
