// Completing gradients over a parallel layout (runtime/parallel.h) after backward, by Param::placement:
//   Replicated, TpSplit, TpLocal   summed over the dp group (tp ranks computed identical / their own parts)
//   TpPartial                      summed over the world (each tp rank holds a partial sum; dp ranks other data)
//   Expert                         summed over the edp group (replicas of the same experts)
// Gradients travel in flat buckets (one all-reduce per bucket of at most 64 Mi floats). CPU gradients only so far: a
// device gradient that needs summing over a group of several ranks is a one-line error (groups of one rank are
// skipped, so a single-rank layout works on any device).
#pragma once

#include <vector>

#include "model/param.h"
#include "runtime/parallel.h"

namespace dsv4 {

void complete_gradients(const Parallel& par, const std::vector<Param*>& params);

// Whether this rank is the one that counts (norms) or writes (checkpoints) the param's distinct values once the
// gradients are complete: replicated values on world rank 0, tp-split / tp-local ones on dp rank 0, experts on edp
// rank 0.
bool canonical_copy(const Parallel& par, const Param& p);

}  // namespace dsv4
