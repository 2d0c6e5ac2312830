// The training loop of dsv4-train (one rank; the parallel issue extends it): micro-batches with gradient
// accumulation, Muon + AdamW with the LR/loss schedules, clipping, NaN/Inf step skipping, the aux-loss-free
// MoE bias update, evaluation, progress lines, metrics, and checkpoints that resume bit-exactly.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>

#include "model/lora.h"
#include "model/model.h"
#include "runtime/comm.h"
#include "runtime/parallel.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "train/checkpoint_dir.h"
#include "train/metrics.h"
#include "train/sharded_state.h"
#include "train/train_config.h"

namespace dsv4 {

// One micro-batch: ids and labels [T] (labels not shifted: the model shifts by one inside each row; -100 =
// no loss) with their layout (rows, sequence length, document starts when packed).
struct TrainBatch {
  Tensor ids_T;
  Tensor labels_T;
  SeqLayout layout;
};

// Where batches come from. Deterministic given its state: state() is saved in checkpoints and restore()
// continues exactly where the saved run was.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual TrainBatch next() = 0;
  virtual std::string state() const = 0;
  virtual void restore(const std::string& state) = 0;
  virtual std::string describe() const = 0;
};

struct StepRecord {
  int64_t step = 0;  // optimizer steps completed after this one
  double loss = 0, lm = 0, mtp = 0, balance = 0;
  double grad_norm = 0;
  double lr = 0;
  int64_t tokens = 0;
  bool skipped = false;  // NaN/Inf: no update
};

class Trainer {
 public:
  // Builds the model (preset / config.json), optimizer and schedules from the config; `train` and `val`
  // provide batches (val may be null). Resumes from out_dir/checkpoints when train.resume says so.
  // `world` is every rank of the job (null: one rank), laid out as cfg.parallel says (dp x tp ranks, ep folded onto
  // them; runtime/parallel.h). Each dp rank reads its own shard of the batches (the tp ranks of one dp rank read the
  // same); gradients and statistics are completed across ranks so the run equals one rank with the global batch.
  Trainer(const TrainConfig& cfg, std::unique_ptr<BatchSource> train, std::unique_ptr<BatchSource> val,
          const Communicator* world = nullptr);

  // Runs until train.steps (or a stop request); returns the number of steps run in this call.
  int64_t run();
  // Asks the loop to checkpoint after the current step and return (SIGTERM) or to checkpoint and go on (SIGUSR1).
  static void request_stop();
  static void request_checkpoint();
  // Installs SIGTERM/SIGUSR1 handlers that call the two functions above.
  static void install_signal_handlers();

  // One optimizer step (public for tests).
  StepRecord train_step();
  double evaluate();
  void save_checkpoint();

  Model& model() { return *model_; }
  const Parallel& parallel() const { return *par_; }
  int64_t step() const { return step_; }
  const std::string& log_text() const { return log_; }  // progress lines printed so far (rank 0)
  // Called with each finished step (tests use it to compare runs).
  std::function<void(const StepRecord&)> on_step;

 private:
  void resume_from(const std::string& checkpoint);
  void print(const std::string& line);
  bool is_root() const { return par_->rank() == 0; }
  // Fails when replicas of the same parameters are not bit-identical (they drifted apart).
  void check_replicas_in_sync() const;
  // The slices of the model / optimizer state this rank writes into a checkpoint.
  std::vector<StateSlice> model_slices() const;
  std::vector<StateSlice> optimizer_slices() const;
  void load_model_state(const ShardedState& st);
  void load_optimizer_state(const ShardedState& st);

  TrainConfig cfg_;
  const Communicator* world_ = nullptr;
  std::unique_ptr<Parallel> par_;
  ModelConfig model_cfg_;
  std::unique_ptr<Model> model_;
  std::optional<LoraConfig> lora_config_;
  std::unique_ptr<Optimizer> optimizer_;
  std::vector<Param*> params_;
  LrSchedule lr_;
  LossSchedule loss_schedule_;
  std::unique_ptr<BatchSource> train_, val_;
  std::unique_ptr<CheckpointDir> checkpoints_;
  std::unique_ptr<MetricsLogger> metrics_;
  std::mt19937_64 rng_;
  int64_t step_ = 0;
  int64_t bad_steps_in_row_ = 0;
  int64_t skipped_steps_ = 0;
  int64_t tokens_seen_ = 0;
  double flops_per_token_ = 0;
  std::string log_;
};

// The rank layout of a config on `world` ranks, validated against the model (dp defaults to world / tp). Errors name
// the parallel.* key and what was expected.
ParallelDims resolve_layout(const TrainConfig& cfg, const ModelConfig& model, int64_t world);

// The model config a training config names (preset, config.json, or the checkpoint's config.json).
ModelConfig resolve_model_config(const TrainConfig& cfg);

}  // namespace dsv4
