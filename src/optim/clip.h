// Global gradient-norm clipping over every trainable parameter that has a gradient (F32, CPU).
//
// The norm is sqrt(sum of squares) accumulated in double over all parameters in the order given. A non-finite
// gradient element (NaN/Inf) makes the result non-finite; the first parameter (in order) holding one is named and
// nothing is scaled, so the caller can skip the step. Otherwise, when max_norm > 0 and norm > max_norm, every
// gradient is multiplied by max_norm / norm (no epsilon: the clipped norm equals max_norm to FP32 rounding).
// For data/expert parallelism, sum grad_sq_norm() across ranks first and call scale_grads() with the global factor.
#pragma once

#include <string>
#include <vector>

#include "model/param.h"
#include "runtime/comm.h"

namespace dsv4 {

struct GradNorm {
  double sq_sum = 0;               // sum of squares (NaN/Inf when not finite)
  double norm = 0;                 // sqrt(sq_sum)
  bool finite = true;
  std::string bad_param;           // first parameter with a NaN/Inf gradient element
  int64_t bad_params = 0;          // how many parameters have one
};

GradNorm grad_sq_norm(const std::vector<Param*>& params);

struct ClipResult {
  double norm = 0;       // pre-clip global norm
  double scale = 1;      // factor applied to every gradient (1 when not clipped)
  bool clipped = false;
  bool finite = true;
  std::string bad_param;
  int64_t bad_params = 0;
};

// max_norm <= 0: only measure.
ClipResult clip_grad_norm(const std::vector<Param*>& params, double max_norm);
// Across ranks: the squares of `counted` (each distinct gradient element counted on exactly one rank of `group`) are
// summed over the group; every gradient of `params` is scaled by the common factor.
ClipResult clip_grad_norm(const std::vector<Param*>& params, double max_norm, const std::vector<Param*>& counted,
                          const Communicator* group);
void scale_grads(const std::vector<Param*>& params, double factor);

}  // namespace dsv4
