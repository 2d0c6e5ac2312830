// LoRA adapters in the Hugging Face PEFT on-disk format (PEFT 0.21.2; hf-transformers-deepseek-v4-and-peft.md §7),
// keyed by the transformers DeepseekV4 module names, and merging adapters into a base checkpoint (dsv4-export).
//
// Files: DIR/adapter_config.json (asdict(LoraConfig) as PEFT writes it: json, indent 2, sorted keys) and
// DIR/adapter_model.safetensors (metadata {"format": "pt"} plus dsv4's own entries, see below). Tensor keys are
// "base_model.model.<module>.lora_A.weight" [r, in] and ".lora_B.weight" [out, r]. What each dsv4 adapter unit
// (lora.h) becomes:
//
//   unit                                  PEFT module (<module>)                          targeted by
//   layers.L.attn.{wq_a,wq_b,wkv,wo_b}    model.layers.L.self_attn.{q_a_proj,q_b_proj,   target_modules
//                                         kv_proj,o_b_proj}
//   layers.L.ffn.shared_experts.w{1,3,2}  model.layers.L.mlp.shared_experts.{gate_proj,   target_modules
//                                         up_proj,down_proj}
//   compressor / indexer Linears          their transformers names (self_attn.compressor.kv_proj, ...)
//   layers.L.ffn.gate                     model.layers.L.mlp.gate                         target_parameters
//                                         (2-D ParamWrapper, A [r, D], B [E, r])          "…mlp.gate.weight"
//   layers.L.attn.wo_a (shared A)         model.layers.L.self_attn.o_a_proj               target_parameters
//                                         (2-D ParamWrapper on the [G*R, K] weight)       "…o_a_proj.weight"
//   layers.L.attn.wo_a.{g} (per group)    the same o_a_proj adapter with rank G*r, block-diagonal: lora_A [G*r, K]
//                                         = A_0..A_{G-1} stacked, lora_B [G*R, G*r] with B_g at rows g*R, columns
//                                         g*r (zeros elsewhere); rank_pattern / alpha_pattern give that module rank
//                                         G*r and an alpha with alpha'/(G*r) = s (rsLoRA: alpha'/sqrt(G*r) = s), so
//                                         PEFT computes exactly dW_g = s B_g A_g. (PEFT cannot adapt the
//                                         DeepseekV4GroupedLinear module itself: its LoRA path ignores the groups.)
//   layers.L.ffn.experts.E.{w13,w1,w3}    model.layers.L.mlp.experts: PEFT's 3-D ParamWrapper on gate_up_proj
//                                         [E, 2I, D]: lora_A [r*E, D], A_e = rows [e*r, (e+1)*r) (expert-major);
//                                         lora_B [2I, r*E], B_e[:, rho] = column rho*E + e (rank-major);
//                                         dW[e] = s B_e A_e (rows [0, I) = w1, [I, 2I) = w3). A w1-only (w3-only)
//                                         adapter is written with zero w3 (w1) rows; experts without one as zeros.
//   layers.L.ffn.experts.E.w2             the same on down_proj [E, D, I]: lora_A [r*E, I], lora_B [D, r*E].
//   Both experts parameters targeted: PEFT nests the wrappers in named_parameters order, so gate_up_proj's keys are
//   "…mlp.experts.base_layer.lora_{A,B}.weight" and down_proj's "…mlp.experts.lora_{A,B}.weight"; with one of them
//   targeted its keys are "…mlp.experts.lora_{A,B}.weight" (target_parameters in adapter_config.json says which).
//   mtp.* units (transformers has no MTP block) are written under their native names ("base_model.model.mtp.0.…");
//   PEFT reports them as unexpected keys and ignores them.
//
// adapter_config.json: r / lora_alpha / use_rslora of the run (PeftSaveOptions::config, else the most common rank
// and alpha = s*r), target_modules = the sorted full module names, target_parameters = the sorted full parameter
// names, rank_pattern / alpha_pattern (regex-escaped full names) for modules whose rank or scale differs,
// lora_dropout (0 when target_parameters is not empty: PEFT's ParamWrapper refuses any dropout; dsv4's value is then
// kept in the metadata), bias "none", task_type "CAUSAL_LM", peft_type "LORA", and PEFT's other keys at defaults.
//
// dsv4 metadata in adapter_model.safetensors ("dsv4.units": JSON list of the adapter units, "dsv4.lora_dropout"):
// reading a file that has it reproduces the exact units (per-group wo_a, w1-only experts, a subset of experts) and
// checks that every part of the PEFT tensors outside them is zero. A file without it (written by PEFT) is read in
// PEFT's own structure: shared-A wo_a, fused w13 for every expert of a targeted gate_up_proj, w2 for every expert
// of a targeted down_proj.
//
// Errors name the file and the key (and what was expected).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "model/checkpoint_io.h"
#include "model/lora.h"

namespace dsv4 {

// One adapter in dsv4 terms, independent of a Model.
struct AdapterTensors {
  std::string unit;  // lora.h unit name
  Tensor A, B;       // F32 [r, in], [out, r]
  double scale = 1.0;
};

struct AdapterSet {
  std::vector<AdapterTensors> adapters;  // sorted by unit (as read_peft_adapter / adapter_set_of return it)
  double dropout = 0.0;
  // adapter_config.json values (read: as found; write: what to put there).
  int64_t r = 0;             // 0: derive
  double lora_alpha = 0.0;   // 0: derive
  bool use_rslora = false;
  std::string base_model_name_or_path;
  bool from_dsv4 = false;    // read: the file carried dsv4.units

  const AdapterTensors* find(const std::string& unit) const;
};

// Reads DIR (adapter_config.json + adapter_model.safetensors) for a model of config `cfg`.
AdapterSet read_peft_adapter(const std::string& dir, const ModelConfig& cfg);
// Writes DIR/adapter_config.json and DIR/adapter_model.safetensors (atomically; DIR created when missing).
void write_peft_adapter(const std::string& dir, const AdapterSet& set, const ModelConfig& cfg);

// The adapters attached to a model (tensors shared with the model's Params, not copied).
AdapterSet adapter_set_of(Model& model);
// Puts `set` into a model. Without adapters the model gets them (zero-initialised, then filled; dropout from the
// set, dropout streams seeded by `seed`) and every other parameter is frozen (trainable = false), as apply_lora
// does. With adapters already attached (e.g. apply_lora of the same config, to resume) the units, shapes and
// scales must be the same (one error listing every difference, naming `source`) and only values are copied.
void install_adapter_set(Model& model, const AdapterSet& set, const std::string& source, uint64_t seed = 0);

struct PeftSaveOptions {
  std::optional<LoraConfig> config;     // r, alpha, rslora, dropout for adapter_config.json
  std::string base_model_name_or_path;  // adapter_config.json "base_model_name_or_path"
};
void save_peft_adapter(Model& model, const std::string& dir, const PeftSaveOptions& opts = {});
// read_peft_adapter + install_adapter_set; returns the number of adapters.
int64_t load_peft_adapter(Model& model, const std::string& dir, uint64_t seed = 0);

// ---- merging ------------------------------------------------------------------------------------------------
// weight (native name) += sum of its adapters' deltas s B A (FP32). `w` is F32 [out, in], modified in place.
// Returns the number of deltas applied.
int64_t merge_adapter_deltas(const AdapterSet& set, const ModelConfig& cfg, const std::string& weight, Tensor& w);

struct ExportOptions {
  std::string format = "release";  // release (FP8 + FP4 requantised, the base's release format when it has one,
                                   // else instruct), bf16, f32
  CheckpointLayout layout = CheckpointLayout::Release;
  bool adapter_only = false;       // write the (normalised) PEFT adapter instead of a merged checkpoint
};
struct ExportReport {
  int shards = 0;
  int64_t tensors = 0;
  int64_t total_size = 0;
  int64_t merged_weights = 0;    // weights that received adapter deltas
  int64_t deltas = 0;            // deltas applied
  int64_t max_shard_bytes = 0;   // largest shard written (what the export holds in memory at once, plus mapped input)
  std::string format;            // the output format's name
};
// Merges the PEFT adapter ADAPTER into the checkpoint BASE (release or transformers layout) and writes OUT shard by
// shard: each shard's weights are read (memory-mapped), merged in FP32 (W' = W + s B A), requantised to the output
// format and written before the next shard is touched; files of BASE other than weights, index and config.json
// (tokenizer, generation config, ...) are copied.
ExportReport export_merged(const std::string& base, const std::string& adapter, const std::string& out,
                           const ExportOptions& opts);

}  // namespace dsv4
