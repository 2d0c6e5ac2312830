// Global gradient-norm clipping over every trainable parameter that has a gradient (F32, CPU or a device).
//
// The norm is sqrt(sum of squares) accumulated in double over all parameters in the order given. A non-finite
// gradient element (NaN/Inf) makes the result non-finite; the first parameter (in order) holding one is named and
// nothing is scaled, so the caller can skip the step. Otherwise, when max_norm > 0 and norm > max_norm, every
// gradient is multiplied by max_norm / norm (no epsilon: the clipped norm equals max_norm to FP32 rounding).
// For data/expert parallelism, sum grad_sq_norm() across ranks first and call scale_grads() with the global factor.
//
// Gradients on the tensor-op path (model/exec_path.h: on a CUDA device, or under ForceOpsPath) are reduced on their
// device by one runtime/model_ops.h sum_squares call per device (each parameter's squares summed in double), the sums
// brought to the host in one copy, then added in double in parameter order as on the CPU. Under ForceOpsPath the sums
// are the CPU path's bit for bit; on CUDA they are summed in fixed chunks (double trees), within ~1e-12 relative.
// scale_grads multiplies in FP32 by float(factor) on either path (the same bits), one scale_in_place call per device.
// tests/optim/test_optimizer_ops_path.cpp and tests/gpu/test_gpu_optimizer.cpp check these.
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
