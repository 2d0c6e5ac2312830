// Building blocks shared by every module: Linear (no bias) and RMSNorm (weighted or unweighted).
//
// Each layer has forward(x, ctx) that records in `ctx` what backward needs (ctx may be null when no
// backward follows) and backward(dy, ctx) that returns dx and accumulates parameter gradients.
// Shapes: x_TD is [T, D] with T = tokens (batch and sequence flattened); all math FP32.
//
// The raw-pointer cores (rmsnorm_forward_rows / rmsnorm_backward_rows, in runtime/model_math.h, shared with the
// runtime-level ops) are templates so tests can run them in double precision for finite-difference checks; the
// Tensor layers instantiate them for float.
#pragma once

#include <cmath>
#include <optional>

#include "model/lora.h"
#include "model/matmul_precision.h"
#include "model/param.h"
#include "model/quant.h"
#include "runtime/model_math.h"  // rmsnorm_forward_rows / rmsnorm_backward_rows
#include "runtime/parallel.h"

namespace dsv4 {

struct RMSNormCtx {
  Tensor x;     // [T, D] input
  Tensor rstd;  // [T]
};

class RMSNorm {
 public:
  RMSNorm() = default;
  // weighted == false: the unweighted norm (no parameter).
  RMSNorm(std::string name, int64_t dim, double eps, bool weighted = true);

  Tensor forward(const Tensor& x_TD, RMSNormCtx* ctx) const;
  Tensor backward(const Tensor& dy_TD, const RMSNormCtx& ctx);
  void visit(const ParamVisitor& f) {
    if (weighted_) f(weight);
  }

  Param weight;  // [D], ones at init

 private:
  int64_t dim_ = 0;
  double eps_ = 1e-6;
  bool weighted_ = true;
};

// While an instance is alive (on this thread), Linear and MoE expert weights are constructed without storage: their
// Param::value stays undefined until a loader fills it (load_model in checkpoint_io.h does this, so that a model
// loaded with frozen quantized weights is never first allocated in F32). Everything else is allocated as usual.
// Such a model must be filled before use.
class DeferredWeightStorage {
 public:
  DeferredWeightStorage();
  ~DeferredWeightStorage();
  DeferredWeightStorage(const DeferredWeightStorage&) = delete;
  DeferredWeightStorage& operator=(const DeferredWeightStorage&) = delete;
  static bool active();

 private:
  bool previous_ = false;
};

struct LinearCtx {
  int64_t rows = 0;        // T
  Tensor x;                // [T, in]; not kept by a trainable Linear in fp8 without an adapter, which keeps
  Fp8Tensor x_fp8_t;       // x quantised for its Wgrad instead (fp8_wgrad_operand: [in, T] codes + scales);
                           // in bf16 without an adapter x is kept as its GEMM operand (precision_operand: BF16 on a
                           // device), which is all the Wgrad reads
  WeightOperand w_op;      // the F32 weight as the GEMMs' operand (matmul_precision.h's weight_operand: BF16 or FP8
                           // blocks), made once in forward for the backward's Dgrad (bf16 / fp8; undefined otherwise)
  Tensor lora_z;           // [T, r] adapter activations A drop(x) (with an adapter)
  uint64_t lora_draw = 0;  // the adapter's dropout draw of this forward
};

// y = x W^T with W [out, in] (the checkpoint layout).
//
// W is either the F32 Param `weight` (trainable unless weight.trainable is cleared) or, after set_frozen(), a
// frozen QuantizedWeight kept in its storage precision (FP8 + 128x128 scales, packed FP4 + 1x32 scales, BF16 or
// F32). A frozen Linear multiplies with dequantise-on-the-fly tiles (qgemm_*, CPU, FP32 accumulation), never
// holds an F32 copy of W, has no weight gradient (backward returns dx = dy W only), and is skipped by visit():
// it has no Param (`weight` keeps only its name). With a frozen weight that dequantises to the values of an F32
// weight the outputs agree to FP32 rounding (bit-identical for F32 storage, which is used in place).
// An optional LoRA adapter (lora.h) adds s B (A drop(x)) to the output; backward accumulates its A / B gradients and
// its contribution to dx; visit() visits A and B after the weight.
class Linear {
 public:
  Linear() = default;
  Linear(std::string name, int64_t in_features, int64_t out_features);

  Tensor forward(const Tensor& x_TI, LinearCtx* ctx) const;
  // Returns dx [T, in]; accumulates dW += dy^T x (trainable F32 weight only).
  Tensor backward(const Tensor& dy_TO, const LinearCtx& ctx);
  void visit(const ParamVisitor& f) {
    if (!frozen.defined()) f(weight);
    if (lora) lora->visit(f);
  }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

  // Replaces the F32 parameter by a frozen weight [out, in] (validated; the Param's value and gradient are
  // released, trainable = false). Throws naming the weight when the shape does not match.
  void set_frozen(QuantizedWeight w);
  // Back to an F32 parameter holding the dequantised frozen values (trainable = true).
  void unfreeze();
  bool is_frozen() const { return frozen.defined(); }
  // Row-parallel under tensor parallelism (input features split over the group g, outputs summed over g by the
  // caller): the adapter's z = A x_local is a partial sum, summed over g before s B z is added to the output, which
  // only the rank with adds_adapter_output does (so the caller's sum holds it once). B's gradient is then identical on
  // the ranks of g, A's is this rank's column slice. Null g: an ordinary Linear.
  void set_row_parallel(const Communicator* g, bool adds_adapter_output) {
    row_group_ = g;
    row_adds_ = adds_adapter_output;
  }

  // Precision of the GEMMs with the F32 weight (model/matmul_precision.h; frozen weights keep their qgemm path).
  void set_precision(MatmulPrecision p) { precision_ = p; }
  MatmulPrecision precision() const { return precision_; }

  Param weight;            // [out, in] F32 (undefined value while frozen)
  QuantizedWeight frozen;  // defined while frozen
  std::optional<LoraAdapter> lora;  // A [r, in], B [out, r]

 private:
  int64_t in_ = 0, out_ = 0;
  MatmulPrecision precision_ = MatmulPrecision::F32;
  const Communicator* row_group_ = nullptr;
  bool row_adds_ = true;
};

}  // namespace dsv4
