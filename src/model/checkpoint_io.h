// Checkpoint I/O for DeepSeek-V4 models: the native release layout (model.safetensors.index.json + per-layer shards,
// native names, `.scale` siblings of FP8/FP4 weights, mtp.0.*) and the Hugging Face transformers layout, both ways.
//
// Loading
//   * Every checkpoint tensor is checked against the ParamTable of the model's config before anything is copied:
//     missing, unexpected, wrong shape and wrong dtype tensors are reported together in ONE error naming the
//     checkpoint and, for each tensor, its shard file. Damaged files (truncated, header past EOF, unknown dtype,
//     index naming a missing shard or a tensor its shard lacks) fail with the safetensors reader's error naming the
//     file and tensor.
//   * Then shard by shard: each shard is memory-mapped, its tensors are converted straight into the model's
//     storage (dequantised into the F32 parameter, or copied into an owned frozen QuantizedWeight), and the mapping
//     is released before the next shard. Peak host memory = the model's own storage + the pages of one shard
//     (stacked transformers experts are sliced out of the mapping; BF16/F16 -> F32 converts element-wise into the
//     parameter). No full-model or full-tensor F32/BF16 staging copy is made. Measured on the "small" preset
//     (instruct, 167 MB in 9 shards, largest 66 MB): F32 load peak RSS 404 MB for 349 MB of model; frozen load
//     peak 297 MB for 235 MB of model (80 MB of it frozen FP8/FP4/BF16 weights, 132 MB the F32 embedding).
//   * LoadMode::TrainableF32: every parameter F32 (FP8/FP4 dequantised bit-exactly), trainable per the table.
//     LoadMode::FrozenQuantized (LoRA base): every Linear / expert weight (ParamEntry::holder != Param) stays in its
//     on-disk precision as a frozen QuantizedWeight (FP8 + scales, packed FP4 + scales, BF16, F32); the remaining
//     tensors (embedding, norms, hc_*, attn_sink, ape, gate, attn.wo_a) become F32 Params with trainable = false.
//     Precision policy for attn.wo_a: it is a grouped projection held as an F32 Param (dequantised exactly). The
//     reference converts it to BF16 at load time; with E8M0 scales FP8 x 2^k values are exactly representable in
//     BF16, so F32 holds the very same values (with base F32 scales the reference's BF16 rounding is not applied).
//     With LoadOptions::frozen_wo_a it stays a frozen QuantizedWeight as well (LoRA runs: no F32 copy).
//   * gate.tid2eid is I64 in the release (I32 is accepted and cast on load).
//   * Transformers layout: the names of transformers' DeepseekV4 state dict (model.layers.N.self_attn.q_a_proj...,
//     stacked mlp.experts.gate_up_proj [E, 2I, D] / down_proj [E, D, I]) and the names transformers 5.x
//     save_pretrained actually writes (its reverse conversion: "model." + native names with per-expert tensors,
//     plus model.embed_tokens.weight, model.hc_head.hc_*, and attn.norm.weight for attn.kv_norm.weight). Float
//     tensors may be F32, BF16 or F16 there (transformers keeps some modules in F32); unquantised only. The
//     transformers model has no MTP block: MTP parameters a transformers checkpoint lacks are left as they were and
//     listed in LoadReport::not_in_checkpoint.
//
// Writing (atomic files: temporary, fsync, rename)
//   * Release layout: one shard per group exactly like the release (shard 1 = embed, 2+i = layers.i, then head /
//     norm / hc_head, then mtp), model-000NN-of-000MM.safetensors, index with metadata.total_size, tensors in the
//     table's format (instruct: FP8 + FP4 with E8M0 scales; base: FP8 with F32 scales; bf16; f32). Frozen weights
//     already in the target format are written byte for byte; anything else is (re)quantised from F32 values.
//   * Transformers layout (f32 or bf16): transformers' state-dict names, stacked experts, the same per-layer
//     sharding without MTP (transformers has none), and a config.json in the transformers form.
//   * config.json: the release keys (release layout) or the transformers form, plus "dsv4_weight_format".
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/model.h"
#include "model/param_table.h"

namespace dsv4 {

enum class CheckpointLayout : uint8_t { Release, Transformers };
enum class LoadMode : uint8_t { TrainableF32, FrozenQuantized };
std::string_view checkpoint_layout_name(CheckpointLayout l);  // "release", "transformers"

// ---- where each checkpoint tensor lives in a Model ----------------------------------------------------------
// One model weight by native name: its Param (which keeps the name even while frozen) and, for Linear / expert
// weights, the holder that can keep it frozen in storage precision.
struct WeightSlot {
  Param* param = nullptr;
  Linear* linear = nullptr;
  ExpertWeights* expert = nullptr;
  Attention* attn = nullptr;  // attn.wo_a (can be kept frozen with LoadOptions::frozen_wo_a)
  int k = 0;            // expert matrix 1, 2, 3
  Shape shape;          // the weight's shape (also while frozen)

  bool frozen() const;
  const QuantizedWeight* frozen_weight() const;  // null unless frozen
  void set_frozen(QuantizedWeight q);            // Linear / expert / wo_a slots only
  // Makes the slot an F32 Param of its shape (dropping a frozen weight without dequantising it) and returns it.
  Tensor& f32_value();
  // The weight as F32 values (the Param, or a dequantised copy of the frozen weight).
  Tensor f32_copy() const;
};
// Every weight of the model by native name (the names of the ParamTable of its config).
std::map<std::string, WeightSlot> model_weight_slots(Model& model);

// ---- configuration ------------------------------------------------------------------------------------------
// DIR/config.json in any supported form (native, release, transformers). A transformers 5.x "dtype" (torch dtype
// name such as "float32") is not the native weight dtype and is ignored.
ModelConfig load_checkpoint_config(const std::string& dir);
// The on-disk format a release-layout checkpoint in DIR declares: "dsv4_weight_format" in config.json when
// present, else from its dtype / expert_dtype / quantization_config.scale_fmt.
CheckpointFormat checkpoint_format_of(const std::string& dir);
std::string release_config_json(const ModelConfig& cfg, const CheckpointFormat& format);
std::string transformers_config_json(const ModelConfig& cfg, const CheckpointFormat& format);

// ---- loading --------------------------------------------------------------------------------------------------
struct LoadOptions {
  LoadMode mode = LoadMode::TrainableF32;
  std::optional<CheckpointFormat> format;  // release layout: the expected on-disk format (default: checkpoint_format_of)
  std::function<std::string(const ParamEntry&)> optimizer_group;  // passed to the ParamTable
  // FrozenQuantized only: keep attn.wo_a frozen in storage precision too (Attention::set_wo_a_frozen; FP8 + scales in
  // release checkpoints) instead of the default F32 Param. For LoRA runs on a frozen base: no F32 copy of wo_a.
  bool frozen_wo_a = false;
};

struct LoadReport {
  std::string path;
  CheckpointLayout layout = CheckpointLayout::Release;
  CheckpointFormat format;
  int64_t tensors = 0;          // checkpoint tensors read
  int64_t bytes = 0;            // their bytes on disk
  int64_t shards = 0;           // shard files
  int64_t max_shard_bytes = 0;  // the largest shard file (what is mapped at once)
  int64_t frozen_weights = 0;   // weights kept frozen in storage precision
  int64_t frozen_bytes = 0;     // their bytes in memory (data + scales)
  std::vector<std::string> not_in_checkpoint;  // parameters left as they were (MTP of a transformers checkpoint)
};

// This rank's part of a checkpoint tensor w (with its scale s when quantized) for parameter p, whose local shape is
// `local_shape`: w itself unless p is TpSplit, else the slice along p.shard_dim — a view for plain tensors; FP8
// (128x128 scale blocks) and FP4 (1x32 column blocks, packed I8/U8 or F4_E2M1) are sliced in storage precision
// together with their scales (contiguous copies of the slice only). Throws a one-line error naming the tensor, the
// split and the block size when a slice boundary is not aligned to a scale block. The loaders (release and
// transformers layouts) apply it to every TpSplit parameter, except that a quantized weight loaded as an F32 Param is
// dequantised from the whole weight's rows (no alignment needed there).
struct TpPart {
  Tensor data, scale;
};
TpPart tp_local_part(const Param& p, const Shape& local_shape, const Tensor& w, const Tensor& s,
                     const std::string& name);

// Detects the layout from the tensor names: transformers names start with "model." or "lm_head.".
CheckpointLayout detect_layout(const std::vector<std::string>& names);
// Loads DIR (a directory with model.safetensors.index.json or model.safetensors) into `model`, whose config must
// be the checkpoint's. See the header comment.
LoadReport load_checkpoint(Model& model, const std::string& dir, const LoadOptions& opts = {});
// Config from DIR/config.json, a Model built from it under DeferredWeightStorage (Linear / expert weights get their
// storage from the checkpoint only: no F32 copy of a frozen model is ever allocated), and load_checkpoint. Weights
// the checkpoint does not hold (LoadReport::not_in_checkpoint) start at zero. Loading into an existing Model with
// load_checkpoint works too, but that Model already holds every weight in F32.
std::unique_ptr<Model> load_model(const std::string& dir, const LoadOptions& opts = {},
                                  const ModelOptions& model_opts = {}, LoadReport* report = nullptr);

// ---- writing --------------------------------------------------------------------------------------------------
struct SaveOptions {
  CheckpointLayout layout = CheckpointLayout::Release;
  CheckpointFormat format = CheckpointFormat::named("instruct");
  bool write_config = true;
};
struct SaveReport {
  int shards = 0;
  int64_t tensors = 0;
  int64_t total_size = 0;  // bytes of tensor data (index metadata.total_size)
};
// Creates DIR when missing; existing files of the same names are replaced atomically.
SaveReport save_checkpoint(Model& model, const std::string& dir, const SaveOptions& opts = {});

// ---- streaming: shard-by-shard reading and writing (dsv4-export) ----------------------------------------------
// A weight's value as a reader hands it over or a writer takes it: a plain tensor (F32 / BF16 / F16, I64 for
// tid2eid) or a QuantizedWeight (a matrix in FP8 / FP4 / BF16 / F32 with its scales).
struct WeightValue {
  Tensor plain;
  QuantizedWeight quantized;
  bool defined() const { return plain.defined() || quantized.defined(); }
  // F32 values (dequantised or converted); a fresh, writable copy when `owned` (else possibly a view).
  Tensor to_f32(bool owned = false) const;
};

// Every weight of a checkpoint (release or transformers layout) by native name, validated against the parameter
// table of its config.json exactly as load_checkpoint validates (one error listing every problem). Values are
// views into memory-mapped shards: call release() after each group to unmap them (peak memory = the pages of the
// tensors in use).
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& dir);
  ~CheckpointReader();
  CheckpointReader(CheckpointReader&&) noexcept;
  CheckpointReader& operator=(CheckpointReader&&) noexcept;

  const std::string& dir() const;
  const ModelConfig& config() const;
  CheckpointLayout layout() const;
  // Release layout: the declared format (checkpoint_format_of); transformers layout: "f32" (tensors come as stored).
  const CheckpointFormat& format() const;
  // Native names the checkpoint holds (a transformers checkpoint lacks mtp.*).
  bool contains(const std::string& native_name) const;
  // The entry's value (release: matrices of Linear / expert holders as QuantizedWeight views, everything else
  // plain; transformers: plain, stacked experts sliced). Throws naming the tensor when the checkpoint lacks it.
  WeightValue get(const ParamEntry& e) const;
  void release() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Writes a checkpoint (layout and format as save_checkpoint) one shard group at a time: shard s holds the entries
// shard_entries(s) (release layout: s = 1 embed, 2+i layers.i, then head / norm / hc_head, then mtp; the
// transformers layout has no MTP shard). Only the tensors of the shard being written are held in memory.
class CheckpointWriter {
 public:
  CheckpointWriter(const ModelConfig& cfg, std::string dir, const SaveOptions& opts);
  const ParamTable& table() const { return table_; }
  int num_shards() const { return n_shards_; }
  const std::vector<const ParamEntry*>& shard_entries(int s) const { return groups_.at(static_cast<size_t>(s)); }
  // Writes shard s from value(e) of each entry (quantised in the target format when needed; a QuantizedWeight
  // already in the target format is written byte for byte). Returns the bytes of tensor data written.
  int64_t write_shard(int s, const std::function<WeightValue(const ParamEntry&)>& value);
  // Writes the index (and config.json when asked). Every shard must have been written.
  SaveReport finish();

 private:
  ModelConfig cfg_;
  std::string dir_;
  SaveOptions opts_;
  ParamTable table_;
  int n_shards_ = 0;
  std::vector<std::vector<const ParamEntry*>> groups_;
  std::vector<bool> written_;
  std::map<std::string, std::string> weight_map_;
  SaveReport rep_;
};

// ---- tiny checkpoints for tests and demos -------------------------------------------------------------------
struct MakeTinyOptions {
  std::string preset = "tiny";
  uint64_t seed = 1;
  double stddev = 0.02;  // Model::init_random's linear / embedding std
  CheckpointLayout layout = CheckpointLayout::Release;
  std::string quant = "fp8";  // fp8 (instruct: FP8 dense + FP4 experts), fp8-base, bf16, none (f32)
  // Also draw the tensors init_random sets to constants (so a checkpoint exercises every name in a peer check):
  // norm weights 1 + N(0, 0.1), hc_*_base N(0, 0.5), hc_*_scale U(0.5, 1.5), attn_sink N(0, 0.5),
  // compressor ape N(0, 0.5), gate.bias N(0, 0.3), from a generator seeded with `seed`.
  bool full_random = false;
};
// The format a --quant value names ("fp8" -> instruct, "fp8-base" -> base, "bf16", "none"/"f32" -> f32).
CheckpointFormat format_for_quant(const std::string& quant);
// Random-init model of the preset (Model::init_random(seed, stddev)) written to DIR with its config.json.
SaveReport make_tiny_checkpoint(const std::string& dir, const MakeTinyOptions& opts);

}  // namespace dsv4
