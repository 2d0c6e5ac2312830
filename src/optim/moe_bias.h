// Aux-loss-free load balancing (DeepSeek-V3 §2.1.2, kept by V4 with update speed 0.001): after each training step,
// for every MoE layer with learned routing (it owns gate.bias), with load_i the number of routed slots expert i
// received during the step (summed over micro-batches and, under data/expert parallelism, over ranks):
//   bias_i <- bias_i + speed * sign(mean_j load_j - load_i)
// i.e. -speed for an overloaded expert, +speed for an underloaded one, unchanged when exactly at the mean (the
// Megatron-Core form: expert_bias + sign(mean - load) * rate). The sign is decided in integers
// (sum_j load_j - E * load_i), so no rounding can flip it; the addition is FP32 like the bias.
// Hash-routed layers (gate.tid2eid, no bias) are skipped.
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"

namespace dsv4 {

inline constexpr double kDefaultBiasUpdateSpeed = 1e-3;

// One layer: bias F32 [E] (CPU, or a CUDA device: updated on the host and copied back), load.size() == E.
void update_expert_bias(Param& bias, const std::vector<int64_t>& load, double speed = kDefaultBiasUpdateSpeed);

// Sums the loads of one forward (ModelOutput::moe_stats: main layers, then MTP blocks) into acc (sized on first use).
void accumulate_moe_loads(std::vector<std::vector<int64_t>>& acc, const std::vector<MoEStats>& stats);

// Updates every learned-routing layer of the model from loads in moe_stats order (main layers, then MTP blocks).
// Returns the number of layers updated. Throws on a count or size mismatch.
int64_t update_moe_biases(Model& model, const std::vector<std::vector<int64_t>>& loads,
                          double speed = kDefaultBiasUpdateSpeed);
int64_t update_moe_biases(Model& model, const std::vector<MoEStats>& stats, double speed = kDefaultBiasUpdateSpeed);

}  // namespace dsv4
