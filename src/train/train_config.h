// The dsv4-train configuration: one typed struct per YAML section, every key declared once in a schema
// (train_config.cpp) with its type, default, range and help. Unknown keys are errors naming the key and
// the closest valid one; `section.key=value` overrides from the command line go through the same checks.
#pragma once

#include <string>
#include <vector>

namespace dsv4 {

struct ModelSection {
  std::string preset;      // a named preset (tiny, small, proxy-2b, flash, pro) ...
  std::string config;      // ... or a config.json path ...
  std::string checkpoint;  // ... and/or a release- or transformers-layout checkpoint to start from (layout detected)
  bool simulate_release_quant = false;     // FP8/FP4 activation fake-quant of the release (attention)
};

struct ParallelSection {
  int64_t dp = 1, tp = 1, ep = 1;
  bool zero1 = true;  // optimizer states sharded over the data-parallel replicas (each parameter has one owner)
};

struct DataSection {
  std::vector<std::string> train;     // HDF5 files from dsv4-prep
  std::vector<double> weights;        // mixture weights (empty: proportional to size)
  std::string val;                    // held-out HDF5 file (optional)
  int64_t seq_len = 256;
  int64_t micro_batch = 1;            // sequences per rank per micro-step
  int64_t grad_accum = 1;             // micro-steps per optimizer step
  bool doc_masking = true;            // attention never crosses documents inside a packed sequence
  int64_t seed = 1234;
};

struct OptimSection {
  std::string type = "muon";          // muon (matrices) + adamw (the rest) | adamw (everything)
  double lr = 2.7e-4;
  double min_lr = 2.7e-5;
  std::string schedule = "wsd";       // wsd (warm-up, constant, cosine decay) | cosine
  int64_t warmup_steps = 2000;
  double decay_start = 0.9;           // fraction of train.steps where the WSD decay begins
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-20;
  double muon_momentum = 0.95;
  double muon_update_scale = 0.18;
  std::string muon_ns_precision = "fp32";  // Newton-Schulz GEMMs: fp32 | bf16 (BF16 operands, FP32 sums; GPUs)
  double clip_grad_norm = 1.0;        // 0 disables
};

struct LossSection {
  double mtp_weight = 0.3;
  double mtp_weight_after_decay = 0.1;
  double balance_alpha = 1e-4;
  double bias_update_speed = 1e-3;    // aux-loss-free MoE bias update (0 disables)
};

struct TrainSection {
  int64_t steps = 10000;
  int64_t log_interval = 10;
  int64_t eval_interval = 0;          // 0: no periodic evaluation
  int64_t eval_batches = 8;
  bool recompute = false;             // per-layer activation recomputation
  int64_t max_bad_steps = 5;          // consecutive NaN/Inf steps before stopping
  std::string out_dir = "runs/default";
  std::string resume = "auto";        // auto (from out_dir/checkpoints/latest) | never | a checkpoint path
  int64_t seed = 1;
  int64_t threads = 0;                // CPU threads for the BLAS backend (0: library default)
  std::string precision = "fp32";     // weight GEMMs: fp32 | bf16 | fp8 (model/matmul_precision.h)
  std::string device = "cpu";         // cpu | cuda: where parameters, gradients, optimizer state and activations live
  std::string attention_precision = "fp32";  // sparse attention core on CUDA: fp32 (exact) | bf16 (tensor cores)
};

struct CheckpointSection {
  int64_t interval = 100;             // steps between checkpoints (0: only at the end)
  int64_t keep = 3;                   // checkpoints kept (older ones pruned)
};

struct LoggingSection {
  bool metrics_jsonl = true;
  bool tensorboard = true;
};

struct LoraSection {
  bool enabled = false;
  int64_t rank = 16;
  double alpha = 32;
  bool rslora = false;
  double dropout = 0.0;
  std::vector<std::string> targets = {"attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b"};
  bool moe_bias_update = false;
};

struct TrainConfig {
  ModelSection model;
  ParallelSection parallel;
  DataSection data;
  OptimSection optim;
  LossSection loss;
  TrainSection train;
  CheckpointSection checkpoint;
  LoggingSection logging;
  LoraSection lora;

  // Every key with its resolved value, as YAML (printed at start, saved with each checkpoint).
  std::string to_yaml() const;
};

// Parses YAML text, applies `overrides` ("section.key=value", YAML scalars or [lists]) and validates.
// `source` names the file in errors. Throws dsv4::Error with a one-line message naming file and key.
TrainConfig parse_train_config(const std::string& yaml_text, const std::string& source,
                               const std::vector<std::string>& overrides = {});
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides = {});

// Closest string by edit distance (for "did you mean" hints); empty when nothing is reasonably close.
std::string closest_match(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace dsv4
