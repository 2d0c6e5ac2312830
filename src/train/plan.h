// dsv4-plan: per-rank memory, communication and step-time estimates for a training config and a parallel layout,
// before anyone allocates a GPU (issue 8, "dsv4-plan").
//
// plan() is a pure function of a PlanSetup (model shape, checkpoint format, layout, batch, optimizer, LoRA, recompute)
// and a HardwareSpec; plan_setup() resolves a TrainConfig into a PlanSetup (it may read a checkpoint's config.json).
//
// What a rank holds (uniform layout: every rank holds the same amounts; rank 0 is computed):
//   weights      Full training: every parameter as an F32 master (gate.tid2eid I64), as the trainer loads them
//                (LoadMode::TrainableF32). With ZeRO-1 on a GPU (the GPU design; the CPU trainer keeps F32 weights on every
//                replica): a BF16 working copy of each trainable weight plus an F32 master shard of 1/replicas.
//                LoRA on a release checkpoint: Linear and expert weights stay in the checkpoint's precision (FP8 +
//                block scales, packed FP4 + scales, BF16), the other tensors are F32 (LoadMode::FrozenQuantized);
//                LoRA without a checkpoint: the F32 model, frozen.
//                Sharding by the ParamTable's ShardSpec: tp splits dim 0 / dim 1 of the attention projections,
//                embedding and head; ep gives each rank n_experts / ep routed experts; the rest is replicated.
//   gradients    F32, one per trainable element held by the rank (LoRA: the adapters only).
//   optimizer    Muon momentum (1 x F32) for matrices, AdamW exp_avg + exp_avg_sq (2 x F32) for the rest (groups of
//                src/optim/groups.h); ZeRO-1 divides by the replicas of each tensor (dp; world / ep for experts).
//   activations  One micro-batch (T = micro_batch x seq_len tokens per dp rank), from what the forward contexts keep
//                (see activation_estimate() in plan.cpp for the per-layer formula), plus the logits, the loss
//                gradients and the largest backward working set; with and without per-layer recomputation.
// Communication per step and the step time are estimates under stated bandwidth and efficiency assumptions
// (PlanReport::assumptions lists them).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/flops.h"
#include "model/param_table.h"
#include "train/train_config.h"

namespace dsv4 {

struct HardwareSpec {
  std::string name;              // "h100", "h200", "cpu"
  std::string description;
  int64_t memory_bytes = 0;      // per device; 0: unknown (no fit verdict)
  int64_t reserved_bytes = 0;    // held back from the budget: CUDA context, NCCL buffers, cuBLAS workspace
  double peak_flops = 0;         // dense BF16 FLOP/s (cpu: an assumed FP32 rate)
  double efficiency = 0;         // assumed achieved fraction of the peak
  double intra_bw = 0;           // bytes/s per GPU, collective bus bandwidth inside a node (NVLink)
  double intra_a2a_bw = 0;       // bytes/s per GPU, all-to-all inside a node
  double inter_bw = 0;           // bytes/s per GPU across nodes (InfiniBand)
  int64_t gpus_per_node = 8;
  int64_t act_bytes = 2;         // bytes per activation element (BF16 on GPU, F32 on CPU)
  int64_t index_bytes = 4;       // bytes per saved index (I32 on GPU, I64 on CPU)
  bool gpu = true;

  // "h100" (H100 SXM 80GB), "h200" (H200 141GB), "cpu" (the FP32 reference on one host). Throws naming them.
  static HardwareSpec named(const std::string& name);
};

struct PlanSetup {
  std::string source = "config";                // what the plan is for (file name in the header line)
  ModelConfig model;
  std::optional<CheckpointFormat> checkpoint;   // the release checkpoint the run starts from (none: from scratch)
  int64_t dp = 1, tp = 1, ep = 1;
  int64_t world = 0;                            // 0: dp * tp (a given world is checked against it)
  int64_t seq_len = 256, micro_batch = 1, grad_accum = 1;
  bool recompute = false;                       // train.recompute (per-layer activation recomputation)
  std::string precision = "fp32";               // train.precision (fp8: the weight GEMMs at the FP8 rate on a GPU)
  bool mtp_backward = true;                     // the MTP blocks are back-propagated (an MTP or balance loss weight)
  std::string optimizer = "muon";               // muon (matrices) + adamw | adamw
  LoraSection lora;
  bool zero1 = false;                           // ZeRO-1 (parallel.zero1): optimizer states sharded over replicas
};

// From a training config: the model (preset, config.json, or the checkpoint's config.json; a preset given next to
// a checkpoint path that does not exist plans with the preset's release format), the checkpoint's format when
// model.checkpoint names one, layout, batch, optimizer, LoRA and recompute. `checkpoint_format` ("instruct",
// "base", "bf16", "f32") overrides the detected format.
PlanSetup plan_setup(const TrainConfig& cfg, const std::string& source, const std::string& checkpoint_format = "");

// Throws one dsv4::Error naming every factor that does not fit the model: dp * tp = world, n_heads, o_groups,
// index_n_heads divisible by tp (the vocabulary is split in balanced ranges: any size >= tp), n_routed_experts
// divisible by ep, world divisible by ep.
void validate_layout(const ModelConfig& model, int64_t dp, int64_t tp, int64_t ep, int64_t world);

// Weight storage classes (per-rank and on-disk byte counts).
enum class WeightClass : uint8_t { FP8, FP4, BF16, F32, I64, Scales };
inline constexpr int kWeightClasses = 6;
std::string_view weight_class_name(WeightClass c);  // "FP8 E4M3", "FP4 (packed)", "BF16", "F32", "I64", "block scales"
using ClassBytes = std::array<int64_t, kWeightClasses>;

struct ActivationEstimate {
  int64_t tokens = 0;          // T per micro-batch per dp rank
  int64_t moe_tokens = 0;      // tokens whose MoE a rank runs (T / tp)
  struct Layer {
    std::string kind;          // "SWA", "CSA", "HCA" (+ " MTP")
    int64_t saved = 0;         // bytes its forward context keeps
    int64_t transient = 0;     // its backward working set
  };
  std::vector<Layer> layers;   // main layers, then MTP blocks
  int64_t saved_layers = 0;    // sum of layers[].saved
  int64_t saved_other = 0;     // initial streams, head, MTP extras (embedding, e/h projections), ids and targets
  int64_t logits = 0;          // logits of the head and each MTP block (F32)
  int64_t loss_grads = 0;      // their gradients, kept through the backward (F32)
  int64_t transient = 0;       // max(cross-entropy gradient being built, largest layer backward working set)
  int64_t total = 0;           // peak of one micro-batch without recomputation
  int64_t checkpoints = 0;     // with recomputation: the stream checkpoints [T, n, D] of every block input
  int64_t recompute_total = 0; // peak with per-layer recomputation (checkpoints + one layer's context recomputed)
};

struct CommItem {
  std::string what;
  double bytes = 0;    // bytes sent per rank per optimizer step
  double seconds = 0;  // at the assumed bandwidth
  std::string link;    // "NVLink", "InfiniBand", "NVLink+InfiniBand", "-"
};

struct PlanReport {
  PlanSetup setup;
  HardwareSpec hw;
  int64_t world = 1;
  int64_t edp = 1;               // replicas of each routed expert (world / ep)
  int64_t experts_per_rank = 0;

  // Parameters (elements): the model, what one rank holds, what trains.
  int64_t params_total = 0, params_rank = 0;
  int64_t trainable_total = 0, trainable_rank = 0;  // base parameters (0 with LoRA)
  ClassBytes checkpoint_bytes{};  // the ParamTable's on-disk bytes of the checkpoint format (whole model)
  int64_t checkpoint_total = 0;
  std::string residency;          // how the weights are held, in words

  // LoRA.
  int64_t lora_adapters = 0;      // adapters attached (a grouped wo_a counts o_groups per layer, a fused w13 one)
  int64_t lora_params_total = 0, lora_params_rank = 0;

  // Memory per rank (bytes).
  ClassBytes weight_bytes{};      // resident weights by class (incl. the ZeRO-1 master shard in F32)
  int64_t weights = 0;
  int64_t master_shard = 0;       // ZeRO-1: F32 master shard (part of weights)
  int64_t grads = 0;
  int64_t opt_muon = 0, opt_adamw = 0, optimizer = 0;
  int64_t optimizer_unsharded = 0;  // without ZeRO-1 (for comparison)
  int64_t optimizer_zero1 = 0;      // with ZeRO-1 (estimate)
  int64_t lora_weights = 0, lora_grads = 0, lora_optimizer = 0;
  ActivationEstimate act;
  int64_t activations = 0;        // the one train.recompute selects
  int64_t reserved = 0;
  int64_t total = 0;
  int64_t capacity = 0;           // device memory (0: unknown)
  bool fits = true;
  std::string biggest;            // the largest consumer, in words

  // Communication and time per optimizer step.
  std::vector<CommItem> comm;
  double comm_bytes = 0, comm_seconds = 0;
  FlopsPerToken flops;
  double tokens_per_step = 0;     // global
  double model_flops_rank = 0;    // convention: 3 x forward per token, per rank per step
  double hw_flops_rank = 0;       // what the rank executes (LoRA: no weight gradients; recomputation: + forward)
  double fp8_flops_rank = 0;      // part of hw_flops_rank in FP8 weight GEMMs (train.precision = fp8 on a GPU)
  double compute_seconds = 0, step_seconds = 0, step_seconds_overlap = 0;
  double tokens_per_second_gpu = 0;
  double mfu = 0;                 // model FLOPs (3 x forward convention) / step time / peak
  double hfu = 0;                 // executed FLOPs / step time / peak

  std::vector<std::string> assumptions;
};

ActivationEstimate activation_estimate(const PlanSetup& setup, const HardwareSpec& hw);
PlanReport plan(const PlanSetup& setup, const HardwareSpec& hw);

std::string format_plan(const PlanReport& r);  // the text dsv4-plan prints
std::string plan_json(const PlanReport& r);    // the same as JSON (dsv4-plan --json)
std::string format_bytes(double bytes);        // "1.23 GiB", "512.0 MiB", "96 B"

}  // namespace dsv4
