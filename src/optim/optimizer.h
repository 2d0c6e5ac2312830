// Optimizer: Muon for matrices and AdamW for the rest (or AdamW everywhere), over named parameters, with a
// serialisable state. Groups come from a GroupTable (groups.h); the update rules are in update_rules.h.
//
// Every parameter in the Muon or AdamW group gets its state at construction (zeros, step 0): Muon a momentum
// buffer, AdamW exp_avg and exp_avg_sq, both a per-parameter step count. step(lr) updates each such parameter
// that has a gradient (grad defined); one without a gradient is left alone and its step count does not move
// (torch's behaviour for p.grad is None). Parameters and gradients must be contiguous F32, a parameter's gradient on
// its device; the parameters must outlive the optimizer (it keeps pointers, e.g. into a Model).
//
// Devices: a parameter's state lives on the parameter's device (where it is at construction). A parameter that takes
// the tensor-op path (model/exec_path.h: use_ops_path(value), i.e. on a CUDA device, or any parameter under a
// ForceOpsPath scope) is updated through runtime/model_ops.h: adamw_step; muon_momentum_step into a batch buffer,
// newton_schulz_batched over every Muon matrix (row block) of one shape and device at once (at most 2^26 elements per
// call), muon_apply_step. The CPU twins of these ops are the loops of update_rules.cpp, so on CPU tensors both paths
// give the same bits; the CUDA twins are bit-identical for AdamW and Muon's element-wise steps, and Newton-Schulz's
// cuBLAS GEMMs round differently from the CPU BLAS (model_ops.h; muon.ns_precision bf16 runs BF16 GEMMs there). Not
// on devices yet (one-line errors): parallel layouts over several ranks (ZeRO-1 owners, distributed Muon over tp).
//
// State dict (a map that checkpoints write as safetensors), keys:
//   "{param}/momentum"    F32, param shape   (Muon)
//   "{param}/exp_avg"     F32, param shape   (AdamW)
//   "{param}/exp_avg_sq"  F32, param shape   (AdamW)
//   "{param}/step"        I64 [1]            (both)
//   "optimizer/steps"     I64 [1]            number of step() calls
// load_state_dict() validates everything first (missing, unexpected, mis-shaped, wrong-dtype entries, and state of
// the other group), reports all problems in one error naming the source, and only then copies: save -> load
// restores the state bit for bit.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "model/model.h"
#include "optim/groups.h"
#include "optim/update_rules.h"
#include "runtime/parallel.h"

namespace dsv4 {

struct OptimizerConfig {
  GroupTable groups = GroupTable::deepseek_v4();
  MuonConfig muon;
  AdamWConfig adamw;

  // DeepSeek-V4 defaults for a model: attention wo_a split into its o_groups independent Muon matrices.
  static OptimizerConfig for_model(const ModelConfig& cfg, OptimizerMode mode = OptimizerMode::MuonAdamW);
  void validate() const;
};

// Every parameter of a model, in visit order.
std::vector<Param*> model_params(Model& model);

struct OptimizerStepStats {
  int64_t muon = 0;     // parameters updated by Muon
  int64_t adamw = 0;    // parameters updated by AdamW
  int64_t skipped = 0;  // parameters in a group but without a gradient
  int64_t ns_calls = 0;  // tensor-op path: newton_schulz_batched calls (Muon matrices batched by shape)
};

// Distribution over a parallel layout (runtime/parallel.h). Gradients must already be complete (summed per the
// parameters' placements) when step() runs.
//   ZeRO-1 (zero1): every parameter has one owner among its replicas — the whole world for tensors every rank holds
//     (replicated / tp-partial), the dp group for tp slices and tp-local tensors, the edp group for routed experts —
//     chosen greedily to balance the elements each owner updates. Only the owner holds
//     the parameter's optimizer state and computes its update; the new values are then broadcast from the owners
//     (one flat buffer per owner). Without zero1 every replica updates every parameter (identical results).
//   Distributed Muon: a tp-split matrix (Placement::TpSplit) is orthogonalised as the whole matrix: the tp ranks
//     gather U, one tp rank (owner chosen to balance work) runs Newton-Schulz and broadcasts the result, each rank
//     keeps its slice. When a dim-0 split keeps whole Muon row blocks (wo_a split by output groups), every rank
//     orthogonalises its own blocks instead, with no communication.
struct OptimizerSharding {
  const Parallel* parallel = nullptr;  // null: one rank
  bool zero1 = true;
};

class Optimizer {
 public:
  Optimizer(std::vector<Param*> params, OptimizerConfig cfg, OptimizerSharding sharding = {});
  Optimizer(Model& model, OptimizerConfig cfg, OptimizerSharding sharding = {})
      : Optimizer(model_params(model), std::move(cfg), sharding) {}

  // One update of every grouped parameter that has a gradient, with learning rate lr (same for both groups).
  OptimizerStepStats step(double lr);

  const OptimizerConfig& config() const { return cfg_; }
  int64_t steps() const { return steps_; }
  // Group of a parameter by name (throws for an unknown name).
  OptGroup group(const std::string& name) const;
  int64_t param_step(const std::string& name) const;
  // Independent row blocks Muon uses for a parameter (1 unless a rule splits it; 0 for non-Muon parameters).
  int64_t row_blocks(const std::string& name) const;
  int64_t count(OptGroup g) const;
  // (name, group) of every parameter given, in order.
  std::vector<std::pair<std::string, OptGroup>> assignment() const;
  // The parameters in a group (those step() updates when they have a gradient), in the order given.
  std::vector<Param*> optimised_params() const;

  // Does this rank hold the state of (and update) the named parameter? (Always true without ZeRO-1.)
  bool owns(const std::string& name) const;

  // The states of the parameters this rank owns, plus "optimizer/steps" (deep copies). load_state_dict expects
  // exactly the keys this rank's state_dict would have. state_dict() copies device state to the host; load_state_dict
// copies into the state on its device.
  std::map<std::string, Tensor> state_dict() const;
  void load_state_dict(const std::map<std::string, Tensor>& state, const std::string& source = "optimizer state");

 private:
  struct Slot {
    Param* p = nullptr;
    OptGroup group = OptGroup::None;
    int64_t row_blocks = 1;
    const Communicator* replicas = nullptr;  // the group whose ranks hold identical copies (world, dp or edp)
    int64_t owner = 0;                       // rank in `replicas` that updates it (ZeRO-1)
    int64_t tp_owner = 0;                    // tp rank that orthogonalises a tp-split Muon matrix
    bool owned = true;
    Tensor momentum;             // Muon
    Tensor exp_avg, exp_avg_sq;  // AdamW
    int64_t step = 0;
  };
  const Slot& slot(const std::string& name) const;
  void muon_step(Slot& s, double lr);
  // Muon of the tensor-op path for these slots (momentum updated, step counted); returns the Newton-Schulz calls.
  int64_t muon_ops_step(const std::vector<Slot*>& slots, double lr);
  void broadcast_from_owners();

  OptimizerSharding sharding_;
  OptimizerConfig cfg_;
  std::vector<Slot> slots_;
  std::map<std::string, size_t> index_;
  int64_t steps_ = 0;
};

}  // namespace dsv4
