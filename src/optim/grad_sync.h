// Completing gradients over a parallel layout (runtime/parallel.h) after backward, by Param::placement:
//   Replicated, TpSplit, TpLocal   summed over the dp group (tp ranks computed identical / their own parts)
//   TpPartial                      summed over the world (each tp rank holds a partial sum; dp ranks other data)
//   Expert                         summed over the edp group (replicas of the same experts)
// Gradients travel in flat buckets (one all-reduce per bucket of at most 64 Mi floats), over the group's device twin
// for device gradients (Parallel::attach_device). Neighbouring gradients that are already one contiguous range (the
// flat buffers of allocate_grad_buffers, laid out in gradient_sync_order) are reduced in place; others are copied
// into a bucket and back.
#pragma once

#include <vector>

#include "model/param.h"
#include "runtime/parallel.h"

namespace dsv4 {

void complete_gradients(const Parallel& par, const std::vector<Param*>& params);

// params stably reordered by the group their gradient is summed over (dp, world, edp): the order for
// Model::allocate_grads, so that each group's gradients form contiguous runs.
std::vector<Param*> gradient_sync_order(const std::vector<Param*>& params);

// Whether this rank is the one that counts (norms) or writes (checkpoints) the param's distinct values once the
// gradients are complete: replicated values on world rank 0, tp-split / tp-local ones on dp rank 0, experts on edp
// rank 0.
bool canonical_copy(const Parallel& par, const Param& p);

}  // namespace dsv4
