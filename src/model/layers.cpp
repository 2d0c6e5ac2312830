#include "model/layers.h"

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

Linear::Linear(std::string name, int64_t in_features, int64_t out_features)
    : weight(std::move(name), Shape{out_features, in_features}) {}

Tensor Linear::forward(const Tensor& x_TI, LinearCtx* ctx) const {
  DSV4_CHECK(x_TI.ndim() == 2 && x_TI.size(1) == in_features(), "Linear {}: input {} does not match weight {}",
             weight.name, x_TI.str(), weight.value.str());
  Tensor y = ops::matmul(x_TI, weight.value, false, true);
  if (ctx) ctx->x = x_TI;
  return y;
}

Tensor Linear::backward(const Tensor& dy_TO, const LinearCtx& ctx) {
  DSV4_CHECK(dy_TO.ndim() == 2 && dy_TO.size(1) == out_features() && ctx.x.defined() && ctx.x.size(0) == dy_TO.size(0),
             "Linear {}: backward dy {} does not match weight {} / saved input {}", weight.name, dy_TO.str(),
             weight.value.str(), ctx.x.str());
  if (weight.trainable) ops::gemm(dy_TO, true, ctx.x, false, 1.0f, 1.0f, weight.grad_buffer());
  return ops::matmul(dy_TO, weight.value);
}

}  // namespace dsv4
