// Which implementation a module runs.
//
// Every module has two: the CPU reference (the raw-pointer loops of model/*.h, FP32, the definition) and the
// tensor-op path that CUDA tensors take: the same computation composed of runtime ops (runtime/ops.h, model_ops.h,
// grouped_gemm.h, fp8.h, matmul_precision.h, kernels/attention_kernels.h), each of which has a CPU twin that the GPU
// tests compare it with. Under a ForceOpsPath scope, CPU tensors take the tensor-op path too: the CPU tests then check
// the GPU path's orchestration (slot order, candidate lists, accumulation order, what is saved for the backward)
// against the reference loops without a GPU, and a GPU run only has to confirm the kernels.
#pragma once

#include "runtime/tensor.h"

namespace dsv4 {

// RAII scope (per thread, nestable): modules run their tensor-op path on CPU tensors while one is alive.
class ForceOpsPath {
 public:
  ForceOpsPath();
  ~ForceOpsPath();
  ForceOpsPath(const ForceOpsPath&) = delete;
  ForceOpsPath& operator=(const ForceOpsPath&) = delete;
  static bool active();

 private:
  bool previous_ = false;
};

// Whether a module given x runs its tensor-op path: x on a CUDA device, or a ForceOpsPath scope.
inline bool use_ops_path(const Tensor& x) { return x.device().is_cuda() || ForceOpsPath::active(); }

}  // namespace dsv4
