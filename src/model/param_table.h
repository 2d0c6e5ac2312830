// The parameter table: every tensor of a DeepSeek-V4 checkpoint in the native release format, built from a
// ModelConfig (dsv4-architecture.md §3.1-3.3). One entry per model parameter (native name, global shape, what it is
// on disk and in memory, trainable or frozen, how a mesh shards it, its optimizer group); FP8/FP4 weights carry
// their `.scale` sibling. Loaders check every checkpoint tensor against it and writers lay checkpoints out from it.
//
// On-disk formats (CheckpointFormat):
//   instruct  FP8 E4M3 dense weights with 128x128 E8M0 scales, routed experts packed FP4 (I8 [out, in/2]) with 1x32
//             E8M0 scales, BF16 embed/head/norms/compressors/gate, F32 hc_*/attn_sink/ape/gate.bias, I64 tid2eid
//             (V4-Flash / V4-Pro).
//   base      FP8 everywhere (experts too) with F32 128x128 scales, otherwise as instruct (V4-*-Base).
//   bf16      our unquantised checkpoints: every FP8/FP4 weight and every BF16 tensor in BF16, no scales.
//   f32       our full-precision checkpoints: everything F32 (tid2eid I64), no scales.
// "FP8 dense" = attn.wq_a, wq_b, wkv, wo_a, wo_b, attn.indexer.wq_b, ffn.shared_experts.w1/w2/w3, mtp.*.e_proj /
// h_proj (TensorRole::Dense). Routed experts = ffn.experts.{e}.w1/w2/w3 (TensorRole::Expert).
//
// Release shards: model-000NN-of-000MM.safetensors with shard 1 = embed.weight, shard 2+i = layers.{i}.*, shard
// L+2 = head.weight, norm.weight, hc_head_{fn,base,scale}, shard L+3 = mtp.* (when the model has MTP blocks).
//
// Shard specs follow the release convert.py: dim 0 over "tp" for embed, head, attn.wq_b, attn.wo_a, attn.attn_sink,
// attn.indexer.weights_proj, attn.indexer.wq_b; dim 1 over "tp" for attn.wo_b; routed experts by expert index over
// "ep" (contiguous ranges); everything else replicated. A weight's scale is split like the weight.
//
// Optimizer groups are not decided here: ParamTableOptions::optimizer_group (or assign_optimizer_groups) is the
// hook through which the optimizer's rules (src/optim) fill ParamEntry::optimizer_group.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/quant.h"
#include "runtime/tensor.h"

namespace dsv4 {

enum class TensorRole : uint8_t {
  Dense,   // FP8 in release checkpoints (see the header comment)
  Expert,  // routed experts: FP4 (instruct) or FP8 (base)
  Plain,   // BF16 in release checkpoints: embed, head, norms, compressor wkv/wgate/norm, weights_proj, gate.weight
  F32,     // F32 in every format: hc_*, attn_sink, compressor ape, gate.bias
  Index,   // I64 gate.tid2eid
};
std::string_view tensor_role_name(TensorRole r);

// Where a parameter lives in the model: a plain Param, the weight of a Linear, or an expert matrix (routed or
// shared). Linear and Expert weights can be held frozen in storage precision (QuantizedWeight).
enum class WeightHolder : uint8_t { Param, Linear, Expert };

struct CheckpointFormat {
  std::string name = "instruct";      // "instruct", "base", "bf16", "f32", or "custom"
  WeightFormat dense = WeightFormat::FP8;
  WeightFormat expert = WeightFormat::FP4;
  ScaleFormat scale = ScaleFormat::E8M0;  // FP8 block scales (FP4 scales are always E8M0)
  DType plain = DType::BF16;              // BF16 or F32

  static CheckpointFormat named(const std::string& name);  // throws listing the valid names
  // From config.json's dtype / expert_dtype / scale_fmt (weight_dtype "fp8"|"bf16", expert_dtype "fp4"|"fp8"|
  // "bf16", scale_fmt "ue8m0"|"fp32"); plain tensors BF16.
  static CheckpointFormat from_config(const ModelConfig& cfg);
  bool quantized() const { return dense == WeightFormat::FP8 || expert == WeightFormat::FP8 || expert == WeightFormat::FP4; }
  std::string str() const;  // "instruct (dense fp8, experts fp4, ue8m0 scales, plain BF16)"
};

struct ShardSpec {
  enum class Kind : uint8_t { Replicated, Split, Expert };
  Kind kind = Kind::Replicated;
  std::string axis;     // mesh axis: "tp" (Split), "ep" (Expert), "" (Replicated)
  int dim = -1;         // split dim (Split)
  int64_t expert = -1;  // expert index (Expert)
  int64_t n_experts = 0;

  std::string str() const;  // "replicated", "tp:dim0", "ep:expert 3/8"
  // Does rank `rank` of `size` along the axis hold (part of) this tensor?
  bool owns(int64_t rank, int64_t size) const;
  // The rank's slice of a tensor of the full (disk) shape, as a view (no copy; on a memory-mapped tensor only the
  // slice's pages are read). Replicated and owned experts: the whole tensor. Throws when the dim does not divide.
  Tensor local_view(const Tensor& full, int64_t rank, int64_t size, const std::string& name) const;
};

struct ScaleSpec {
  std::string name;  // "<weight name without .weight>.scale"
  Shape shape;
  DType dtype = DType::F8_E8M0;
};

struct ParamEntry {
  std::string name;       // native release name
  Shape shape;            // global logical shape ([out, in] for matrices, also for packed FP4)
  TensorRole role = TensorRole::Plain;
  WeightHolder holder = WeightHolder::Param;
  WeightFormat format = WeightFormat::F32;  // storage format on disk (unused for Index)
  DType disk_dtype = DType::F32;            // dtype in the safetensors header (I8 for packed FP4)
  Shape disk_shape;                         // shape in the header ([out, in/2] for packed FP4)
  std::optional<ScaleSpec> scale;
  bool trainable = true;  // false: tid2eid, gate.bias (aux-loss-free), the indexer (no LM gradient); all with frozen_base
  ShardSpec shard;
  int shard_file = 0;     // 1-based release shard
  std::string optimizer_group;  // filled by the hook; empty until then

  int64_t disk_bytes() const;  // weight + scale
};

struct ParamTableOptions {
  std::optional<CheckpointFormat> format;  // default: CheckpointFormat::from_config(cfg)
  bool frozen_base = false;                // every entry frozen (LoRA on a frozen base)
  std::function<std::string(const ParamEntry&)> optimizer_group;  // the optimizer's grouping rules
};

class ParamTable {
 public:
  static ParamTable build(const ModelConfig& cfg, const ParamTableOptions& opts = {});

  const ModelConfig& config() const { return cfg_; }
  const CheckpointFormat& format() const { return format_; }
  const std::vector<ParamEntry>& entries() const { return entries_; }  // release shard order
  const ParamEntry* find(const std::string& name) const;
  const ParamEntry& at(const std::string& name) const;  // throws naming the tensor
  size_t size() const { return entries_.size(); }

  // Checkpoint tensors of the release layout (weights and scales): name -> (entry, is_scale).
  struct DiskTensor {
    std::string name;
    DType dtype;
    Shape shape;
    const ParamEntry* entry;
    bool is_scale;
  };
  std::vector<DiskTensor> disk_tensors() const;
  int64_t num_disk_tensors() const;
  int64_t total_disk_bytes() const;  // index metadata.total_size of a release checkpoint
  int num_shards() const { return num_shards_; }
  std::string shard_file_name(int shard) const;  // "model-000NN-of-000MM.safetensors"

  void assign_optimizer_groups(const std::function<std::string(const ParamEntry&)>& group);

 private:
  ModelConfig cfg_;
  CheckpointFormat format_;
  std::vector<ParamEntry> entries_;
  std::map<std::string, size_t> index_;
  int num_shards_ = 0;
};

}  // namespace dsv4
