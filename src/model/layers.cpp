#include "model/layers.h"

#include "model/exec_path.h"

#include "runtime/model_ops.h"
#include "runtime/ops.h"

namespace dsv4 {

namespace {
void check_rows(const char* what, const Tensor& x, int64_t dim) {
  DSV4_CHECK(x.dtype() == DType::F32 && x.ndim() == 2 && x.size(1) == dim && x.is_contiguous() && x.device().is_cpu(),
             "{}: expected a contiguous CPU F32 [T, {}] tensor, got {}", what, dim, x.str());
}
}  // namespace

RMSNorm::RMSNorm(std::string name, int64_t dim, double eps, bool weighted) : dim_(dim), eps_(eps), weighted_(weighted) {
  if (weighted_) {
    weight = Param(std::move(name), Shape{dim});
    ops::fill(weight.value, 1.0);
  }
}

Tensor RMSNorm::forward(const Tensor& x_TD, RMSNormCtx* ctx) const {
  if (use_ops_path(x_TD)) {  // runtime/model_ops.h (the CUDA twin on CUDA tensors; the CPU twin under ForceOpsPath)
    RmsNormOut r = rmsnorm_forward(x_TD, weighted_ ? weight.value : Tensor(), eps_);
    if (ctx) *ctx = {x_TD, r.rstd};
    return r.y;
  }
  check_rows("RMSNorm.forward", x_TD, dim_);
  const int64_t rows = x_TD.size(0);
  Tensor y = Tensor::empty(x_TD.shape(), DType::F32);
  Tensor rstd = Tensor::empty({rows}, DType::F32);
  rmsnorm_forward_rows<float>(x_TD.data<float>(), weighted_ ? weight.value.data<float>() : nullptr, y.data<float>(),
                              rstd.data<float>(), rows, dim_, eps_);
  if (ctx) *ctx = {x_TD, rstd};
  return y;
}

Tensor RMSNorm::backward(const Tensor& dy_TD, const RMSNormCtx& ctx) {
  if (use_ops_path(dy_TD)) {  // dw written by the op, then added to the gradient
    RmsNormGrad g = rmsnorm_backward(dy_TD, ctx.x, weighted_ ? weight.value : Tensor(), ctx.rstd);
    if (weighted_ && weight.trainable) {
      Tensor& acc = weight.grad_buffer();
      ops::copy(ops::binary(BinaryOp::Add, acc, g.dw), acc);
    }
    return g.dx;
  }
  check_rows("RMSNorm.backward", dy_TD, dim_);
  DSV4_CHECK(ctx.x.defined() && ctx.x.shape() == dy_TD.shape(), "RMSNorm.backward: forward context {} does not match dy {}",
             ctx.x.str(), dy_TD.str());
  Tensor dx = Tensor::empty(dy_TD.shape(), DType::F32);
  rmsnorm_backward_rows<float>(dy_TD.data<float>(), ctx.x.data<float>(),
                               weighted_ ? weight.value.data<float>() : nullptr, ctx.rstd.data<float>(),
                               dx.data<float>(), weighted_ && weight.trainable ? weight.grad_buffer().data<float>() : nullptr,
                               dy_TD.size(0), dim_);
  return dx;
}

namespace {
thread_local bool g_defer_weights = false;
}

DeferredWeightStorage::DeferredWeightStorage() : previous_(g_defer_weights) { g_defer_weights = true; }
DeferredWeightStorage::~DeferredWeightStorage() { g_defer_weights = previous_; }
bool DeferredWeightStorage::active() { return g_defer_weights; }

namespace {
thread_local bool g_force_ops_path = false;
}

ForceOpsPath::ForceOpsPath() : previous_(g_force_ops_path) { g_force_ops_path = true; }
ForceOpsPath::~ForceOpsPath() { g_force_ops_path = previous_; }
bool ForceOpsPath::active() { return g_force_ops_path; }

Linear::Linear(std::string name, int64_t in_features, int64_t out_features) : in_(in_features), out_(out_features) {
  if (DeferredWeightStorage::active())
    weight.name = std::move(name);
  else
    weight = Param(std::move(name), Shape{out_features, in_features});
}

void Linear::set_frozen(QuantizedWeight w) {
  w.validate(weight.name);
  DSV4_CHECK(w.rows() == out_ && w.cols() == in_, "Linear {}: frozen weight {} does not match [{}, {}]", weight.name,
             w.str(), out_, in_);
  frozen = std::move(w);
  weight.value = Tensor();
  weight.grad = Tensor();
  weight.trainable = false;
}

void Linear::unfreeze() {
  if (!frozen.defined()) return;
  weight.value = frozen.dequantize();
  weight.grad = Tensor();
  weight.trainable = true;
  frozen = QuantizedWeight();
}

Tensor Linear::forward(const Tensor& x_TI, LinearCtx* ctx) const {
  DSV4_CHECK(x_TI.ndim() == 2 && x_TI.size(1) == in_features(), "Linear {}: input {} does not match weight [{}, {}]",
             weight.name, x_TI.str(), out_features(), in_features());
  DSV4_CHECK(frozen.defined() || weight.value.defined(),
             "Linear {}: the weight has no storage (built under DeferredWeightStorage and never loaded)", weight.name);
  Tensor y;
  if (frozen.defined()) {
    y = qpmatmul_xwT(precision_, x_TI, frozen);
    if (ctx) ctx->x = x_TI;
  } else {
    // bf16: x and W are rounded once here, fp8: W quantised once; the backward reuses them (its Wgrad and Dgrad read
    // the same operands).
    const Tensor x_op = precision_operand(precision_, x_TI);
    WeightOperand w_op = weight_operand(precision_, weight.value);
    y = pmatmul_xwT(precision_, x_op, w_op);
    if (ctx) {
      ctx->w_op = precision_ == MatmulPrecision::F32 ? WeightOperand{} : std::move(w_op);
      // fp8: the Wgrad operand is all the backward needs of x (1 byte per element instead of 4).
      if (!lora && precision_ == MatmulPrecision::FP8 && weight.trainable) {
        ctx->x = Tensor();
        ctx->x_fp8_t = fp8_wgrad_operand(x_TI);
      } else {
        ctx->x = lora ? x_TI : x_op;  // the adapter's backward needs x itself
      }
    }
  }
  if (ctx) ctx->rows = x_TI.size(0);
  if (lora) {
    DSV4_CHECK(lora->in_features() == in_ && lora->out_features() == out_,
               "Linear {}: adapter {} is [{}, {}] x [{}, {}], the weight [{}, {}]", weight.name, lora->unit,
               lora->out_features(), lora->rank(), lora->rank(), lora->in_features(), out_, in_);
    const uint64_t draw = lora->next_draw();
    if (use_ops_path(x_TI)) {  // tensor forms (lora.h), any device
      Tensor z = lora_down(*lora, x_TI, draw, 0);
      if (row_group_) group_sum(row_group_, z);  // row-parallel: the partial sums of z over the input slices
      if (row_adds_) lora_up(*lora, z, 0, y);
      if (ctx) {
        ctx->x = x_TI;
        ctx->lora_z = z;
        ctx->lora_draw = draw;
      }
      return y;
    }
    const Tensor x = x_TI.contiguous();
    const int64_t T = x.size(0);
    Tensor z = Tensor::empty({T, lora->rank()}, DType::F32);
    lora_down(*lora, T, x.data<float>(), in_, draw, 0, z.data<float>());
    if (row_group_) group_sum(row_group_, z);  // row-parallel: the partial sums of z over the input slices
    if (row_adds_) lora_up(*lora, T, z.data<float>(), 0, out_, y.data<float>(), out_);
    if (ctx) {
      ctx->x = x;
      ctx->lora_z = z;
      ctx->lora_draw = draw;
    }
  }
  return y;
}

Tensor Linear::backward(const Tensor& dy_TO, const LinearCtx& ctx) {
  DSV4_CHECK(dy_TO.ndim() == 2 && dy_TO.size(1) == out_features() && (ctx.x.defined() || ctx.x_fp8_t.q.defined()) &&
                 ctx.rows == dy_TO.size(0),
             "Linear {}: backward dy {} does not match weight [{}, {}] / the forward's {} rows", weight.name,
             dy_TO.str(), out_features(), in_features(), ctx.rows);
  Tensor dx;
  if (frozen.defined()) {
    dx = qpmatmul_dyW(precision_, dy_TO, frozen);
  } else {
    // BF16: dy rounded once for both GEMMs (the rounding is idempotent, so the values are those of two roundings).
    const Tensor dy_op = precision_operand(precision_, dy_TO);
    if (weight.trainable) {
      if (ctx.x_fp8_t.q.defined())
        pgemm_dW_fp8(dy_TO, ctx.x_fp8_t, weight.grad_buffer());
      else
        pgemm_dW(precision_, dy_op, ctx.x, weight.grad_buffer());
    }
    dx = ctx.w_op.defined() ? pmatmul_dyW(precision_, dy_op, ctx.w_op) : pmatmul_dyW(precision_, dy_op, weight.value);
  }
  if (lora) {
    DSV4_CHECK(ctx.lora_z.defined() && ctx.lora_z.size(0) == dy_TO.size(0) && ctx.lora_z.size(1) == lora->rank(),
               "Linear {}: backward through adapter {} without its forward context", weight.name, lora->unit);
    if (use_ops_path(dy_TO)) {
      Tensor dz = Tensor::zeros({dy_TO.size(0), lora->rank()}, DType::F32, dy_TO.device());
      lora_up_backward(*lora, dy_TO, ctx.lora_z, 0, dz);
      lora_down_backward(*lora, dz, ctx.x, ctx.lora_draw, 0, &dx);
      return dx;
    }
    const Tensor dy = dy_TO.contiguous();
    const Tensor x = ctx.x.contiguous();
    dx = dx.contiguous();
    const int64_t T = dy.size(0);
    Tensor dz = Tensor::zeros({T, lora->rank()}, DType::F32);
    lora_up_backward(*lora, T, dy.data<float>(), out_, ctx.lora_z.data<float>(), 0, out_, dz.data<float>());
    lora_down_backward(*lora, T, dz.data<float>(), x.data<float>(), in_, ctx.lora_draw, 0, dx.data<float>(), in_);
  }
  return dx;
}

}  // namespace dsv4
