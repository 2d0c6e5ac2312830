#include "model/mhc.h"

#if defined(DSV4_WITH_CUDA)
#include "kernels/attention_kernels.h"
#include "kernels/cuda_runtime_api.h"
#endif

namespace dsv4 {

namespace {

HcDims dims_of(const ModelConfig& cfg) {
  DSV4_CHECK(cfg.hc_mult > 0 && cfg.dim > 0 && cfg.hc_sinkhorn_iters >= 1,
             "mHC: needs hc_mult > 0, dim > 0, hc_sinkhorn_iters >= 1 (got {}, {}, {})", cfg.hc_mult, cfg.dim,
             cfg.hc_sinkhorn_iters);
  HcDims d;
  d.n = cfg.hc_mult;
  d.dim = cfg.dim;
  d.iters = cfg.hc_sinkhorn_iters;
  d.hc_eps = cfg.hc_eps;
  d.norm_eps = cfg.norm_eps;
  return d;
}

// Contiguous F32 on `device` (the device of the streams X: CPU, or CUDA where the mHC kernels of
// kernels/attention_kernels.h run; parameters and every other input must be there too).
void check_on(const char* what, const Tensor& t, const Shape& expected, Device device) {
  DSV4_CHECK(t.defined() && t.dtype() == DType::F32 && t.is_contiguous() && t.device() == device &&
                 t.shape() == expected,
             "{}: expected a contiguous F32 {} tensor on {}, got {}", what, expected.str(), device.str(),
             t.defined() ? t.str() : std::string("undefined"));
}


// T of an X [T, n, D] tensor, after checking its shape (on the CPU or a CUDA device).
int64_t check_streams(const char* what, const Tensor& X, const HcDims& d) {
  DSV4_CHECK(X.defined() && X.ndim() == 3, "{}: expected X [T, {}, {}], got {}", what, d.n, d.dim,
             X.defined() ? X.str() : std::string("undefined"));
  check_on(what, X, Shape{X.size(0), d.n, d.dim}, X.device());
  return X.size(0);
}

const float* opt_data(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }

// The parameters of a hyper-connection / head on the streams' device.
void check_params(const char* what, const Param& fn, const Param& base, const Param& scale, Device device) {
  for (const Param* p : {&fn, &base, &scale})
    DSV4_CHECK(p->value.defined() && p->value.device() == device && p->value.is_contiguous(),
               "{}: parameter {} is on {}, the streams on {}", what, p->name,
               p->value.defined() ? p->value.device().str() : std::string("nowhere"), device.str());
}

#if defined(DSV4_WITH_CUDA)
cuda::MhcShape mhc_shape(const HcDims& d, int64_t T) {
  cuda::MhcShape s;
  s.T = T;
  s.n = d.n;
  s.D = d.dim;
  s.iters = d.iters;
  s.hc_eps = d.hc_eps;
  s.norm_eps = d.norm_eps;
  return s;
}
void* stream_of(const Tensor& t) { return cuda::current_stream(t.device().index); }
#endif

#if !defined(DSV4_WITH_CUDA)
[[noreturn]] void no_cuda(const char* what) { DSV4_FAIL("{}: CUDA tensors, but dsv4 was built without CUDA", what); }
#endif

}  // namespace

// ------------------------------------------------------------------------------------------------------
// HyperConnection
// ------------------------------------------------------------------------------------------------------

HyperConnection::HyperConnection(std::string prefix, const ModelConfig& cfg)
    : fn(prefix + "fn", Shape{(2 + cfg.hc_mult) * cfg.hc_mult, cfg.hc_mult * cfg.dim}),
      base(prefix + "base", Shape{(2 + cfg.hc_mult) * cfg.hc_mult}),
      scale(prefix + "scale", Shape{3}),
      dims_(dims_of(cfg)) {}

HcPreOut HyperConnection::pre(const Tensor& X_TND, HcPreCtx* ctx) const {
  const int64_t T = check_streams("HyperConnection.pre", X_TND, dims_);
  const int64_t n = dims_.n;
  const Device dev = X_TND.device();
  check_params("HyperConnection.pre", fn, base, scale, dev);
  HcPreOut out;
  out.x_TD = Tensor::empty({T, dims_.dim}, DType::F32, dev);
  out.post_TN = Tensor::empty({T, n}, DType::F32, dev);
  out.comb_TNN = Tensor::empty({T, n, n}, DType::F32, dev);
  Tensor mixes = Tensor::empty({T, dims_.mix()}, DType::F32, dev);
  Tensor rstd = Tensor::empty({T}, DType::F32, dev);
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    cuda::mhc_pre_forward(X_TND.data<float>(), fn.value.data<float>(), scale.value.data<float>(),
                          base.value.data<float>(), out.x_TD.data<float>(), out.post_TN.data<float>(),
                          out.comb_TNN.data<float>(), mixes.data<float>(), rstd.data<float>(), mhc_shape(dims_, T),
                          stream_of(X_TND));
#else
    no_cuda("HyperConnection.pre");
#endif
  } else
    hc_pre_forward_rows<float>(X_TND.data<float>(), fn.value.data<float>(), scale.value.data<float>(),
                             base.value.data<float>(), out.x_TD.data<float>(), out.post_TN.data<float>(),
                             out.comb_TNN.data<float>(), mixes.data<float>(), rstd.data<float>(), T, dims_);
  if (ctx) *ctx = {X_TND, mixes, rstd};
  return out;
}

Tensor HyperConnection::post(const Tensor& F_TD, const Tensor& X_TND, const Tensor& post_TN, const Tensor& comb_TNN,
                             HcPostCtx* ctx) const {
  const int64_t T = check_streams("HyperConnection.post X", X_TND, dims_);
  const int64_t n = dims_.n;
  const Device dev = X_TND.device();
  check_on("HyperConnection.post F", F_TD, Shape{T, dims_.dim}, dev);
  check_on("HyperConnection.post post", post_TN, Shape{T, n}, dev);
  check_on("HyperConnection.post comb", comb_TNN, Shape{T, n, n}, dev);
  Tensor Xnew = Tensor::empty(X_TND.shape(), DType::F32, dev);
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    cuda::mhc_post_forward(F_TD.data<float>(), X_TND.data<float>(), post_TN.data<float>(), comb_TNN.data<float>(),
                           Xnew.data<float>(), mhc_shape(dims_, T), stream_of(X_TND));
#else
    no_cuda("HyperConnection.post");
#endif
  } else
    hc_post_forward_rows<float>(F_TD.data<float>(), X_TND.data<float>(), post_TN.data<float>(), comb_TNN.data<float>(),
                              Xnew.data<float>(), T, n, dims_.dim);
  if (ctx) *ctx = {F_TD, X_TND, post_TN, comb_TNN};
  return Xnew;
}

HcPostGrads HyperConnection::post_backward(const Tensor& dXnew_TND, const HcPostCtx& ctx) const {
  const int64_t T = check_streams("HyperConnection.post_backward dXnew", dXnew_TND, dims_);
  DSV4_CHECK(ctx.X.defined() && ctx.X.shape() == dXnew_TND.shape(),
             "HyperConnection.post_backward: forward context X {} does not match dXnew {}", ctx.X.str(),
             dXnew_TND.str());
  const int64_t n = dims_.n, D = dims_.dim;
  const Device dev = dXnew_TND.device();
  check_on("HyperConnection.post_backward F", ctx.F, Shape{T, D}, dev);
  check_on("HyperConnection.post_backward X", ctx.X, Shape{T, n, D}, dev);
  HcPostGrads g;
  g.dF_TD = Tensor::empty({T, D}, DType::F32, dev);
  g.dX_TND = Tensor::empty({T, n, D}, DType::F32, dev);
  g.dpost_TN = Tensor::empty({T, n}, DType::F32, dev);
  g.dcomb_TNN = Tensor::empty({T, n, n}, DType::F32, dev);
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    cuda::mhc_post_backward(dXnew_TND.data<float>(), ctx.F.data<float>(), ctx.X.data<float>(), ctx.post.data<float>(),
                            ctx.comb.data<float>(), g.dF_TD.data<float>(), g.dX_TND.data<float>(),
                            g.dpost_TN.data<float>(), g.dcomb_TNN.data<float>(), mhc_shape(dims_, T),
                            stream_of(dXnew_TND));
#else
    no_cuda("HyperConnection.post_backward");
#endif
    return g;
  }
  hc_post_backward_rows<float>(dXnew_TND.data<float>(), ctx.F.data<float>(), ctx.X.data<float>(),
                               ctx.post.data<float>(), ctx.comb.data<float>(), g.dF_TD.data<float>(),
                               g.dX_TND.data<float>(), g.dpost_TN.data<float>(), g.dcomb_TNN.data<float>(), T, n, D);
  return g;
}

void HyperConnection::pre_backward_impl(const Tensor& dx_TD, const Tensor& dpost_TN, const Tensor& dcomb_TNN,
                                        const HcPreCtx& ctx, Tensor& dX_TND, bool accumulate) {
  DSV4_CHECK(ctx.X.defined() && ctx.mixes.defined() && ctx.rstd.defined(),
             "HyperConnection.pre_backward ({}): empty forward context", fn.name);
  const int64_t T = check_streams("HyperConnection.pre_backward ctx.X", ctx.X, dims_);
  const int64_t n = dims_.n;
  const Device dev = ctx.X.device();
  check_params("HyperConnection.pre_backward", fn, base, scale, dev);
  check_on("HyperConnection.pre_backward dx", dx_TD, Shape{T, dims_.dim}, dev);
  if (dpost_TN.defined()) check_on("HyperConnection.pre_backward dpost", dpost_TN, Shape{T, n}, dev);
  if (dcomb_TNN.defined()) check_on("HyperConnection.pre_backward dcomb", dcomb_TNN, Shape{T, n, n}, dev);
  check_on("HyperConnection.pre_backward dX", dX_TND, Shape{T, n, dims_.dim}, dev);
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    const cuda::MhcShape s = mhc_shape(dims_, T);
    Tensor ws = Tensor::empty({std::max<int64_t>(cuda::mhc_pre_backward_workspace(s), 1)}, DType::F32, dev);
    cuda::mhc_pre_backward(dx_TD.data<float>(), opt_data(dpost_TN), opt_data(dcomb_TNN), ctx.X.data<float>(),
                           fn.value.data<float>(), scale.value.data<float>(), base.value.data<float>(),
                           ctx.mixes.data<float>(), ctx.rstd.data<float>(), dX_TND.data<float>(),
                           fn.trainable ? fn.grad_buffer().data<float>() : nullptr,
                           scale.trainable ? scale.grad_buffer().data<float>() : nullptr,
                           base.trainable ? base.grad_buffer().data<float>() : nullptr, accumulate, ws.data<float>(), s,
                           stream_of(dX_TND));
#else
    no_cuda("HyperConnection.pre_backward");
#endif
    return;
  }
  hc_pre_backward_rows<float>(dx_TD.data<float>(), opt_data(dpost_TN), opt_data(dcomb_TNN), ctx.X.data<float>(),
                              fn.value.data<float>(), scale.value.data<float>(), base.value.data<float>(),
                              ctx.mixes.data<float>(), ctx.rstd.data<float>(), dX_TND.data<float>(),
                              fn.trainable ? fn.grad_buffer().data<float>() : nullptr,
                              scale.trainable ? scale.grad_buffer().data<float>() : nullptr,
                              base.trainable ? base.grad_buffer().data<float>() : nullptr, T, dims_, accumulate);
}

Tensor HyperConnection::pre_backward(const Tensor& dx_TD, const Tensor& dpost_TN, const Tensor& dcomb_TNN,
                                     const HcPreCtx& ctx) {
  DSV4_CHECK(ctx.X.defined(), "HyperConnection.pre_backward ({}): empty forward context", fn.name);
  Tensor dX = Tensor::empty(ctx.X.shape(), DType::F32, ctx.X.device());
  pre_backward_impl(dx_TD, dpost_TN, dcomb_TNN, ctx, dX, false);
  return dX;
}

void HyperConnection::pre_backward_accumulate(const Tensor& dx_TD, const Tensor& dpost_TN, const Tensor& dcomb_TNN,
                                              const HcPreCtx& ctx, Tensor& dX_TND) {
  pre_backward_impl(dx_TD, dpost_TN, dcomb_TNN, ctx, dX_TND, true);
}

// ------------------------------------------------------------------------------------------------------
// HyperHead
// ------------------------------------------------------------------------------------------------------

HyperHead::HyperHead(const std::string& prefix, const ModelConfig& cfg)
    : fn(prefix + "hc_head_fn", Shape{cfg.hc_mult, cfg.hc_mult * cfg.dim}),
      base(prefix + "hc_head_base", Shape{cfg.hc_mult}),
      scale(prefix + "hc_head_scale", Shape{1}),
      dims_(dims_of(cfg)) {}

Tensor HyperHead::forward(const Tensor& X_TND, HcHeadCtx* ctx) const {
  const int64_t T = check_streams("HyperHead.forward", X_TND, dims_);
  const Device dev = X_TND.device();
  check_params("HyperHead.forward", fn, base, scale, dev);
  Tensor h = Tensor::empty({T, dims_.dim}, DType::F32, dev);
  Tensor mixes = Tensor::empty({T, dims_.n}, DType::F32, dev);
  Tensor rstd = Tensor::empty({T}, DType::F32, dev);
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    cuda::mhc_head_forward(X_TND.data<float>(), fn.value.data<float>(), scale.value.data<float>(),
                           base.value.data<float>(), h.data<float>(), mixes.data<float>(), rstd.data<float>(),
                           mhc_shape(dims_, T), stream_of(X_TND));
#else
    no_cuda("HyperHead.forward");
#endif
  } else
    hc_head_forward_rows<float>(X_TND.data<float>(), fn.value.data<float>(), scale.value.data<float>(),
                              base.value.data<float>(), h.data<float>(), mixes.data<float>(), rstd.data<float>(), T,
                              dims_);
  if (ctx) *ctx = {X_TND, mixes, rstd};
  return h;
}

Tensor HyperHead::backward(const Tensor& dh_TD, const HcHeadCtx& ctx) {
  DSV4_CHECK(ctx.X.defined() && ctx.mixes.defined() && ctx.rstd.defined(),
             "HyperHead.backward ({}): empty forward context", fn.name);
  const int64_t T = check_streams("HyperHead.backward ctx.X", ctx.X, dims_);
  const Device dev = ctx.X.device();
  check_params("HyperHead.backward", fn, base, scale, dev);
  check_on("HyperHead.backward dh", dh_TD, Shape{T, dims_.dim}, dev);
  Tensor dX = Tensor::empty(ctx.X.shape(), DType::F32, dev);
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    const cuda::MhcShape s = mhc_shape(dims_, T);
    Tensor ws = Tensor::empty({std::max<int64_t>(cuda::mhc_head_backward_workspace(s), 1)}, DType::F32, dev);
    cuda::mhc_head_backward(dh_TD.data<float>(), ctx.X.data<float>(), fn.value.data<float>(), scale.value.data<float>(),
                            base.value.data<float>(), ctx.mixes.data<float>(), ctx.rstd.data<float>(), dX.data<float>(),
                            fn.trainable ? fn.grad_buffer().data<float>() : nullptr,
                            scale.trainable ? scale.grad_buffer().data<float>() : nullptr,
                            base.trainable ? base.grad_buffer().data<float>() : nullptr, false, ws.data<float>(), s,
                            stream_of(dh_TD));
#else
    no_cuda("HyperHead.backward");
#endif
    return dX;
  }
  hc_head_backward_rows<float>(dh_TD.data<float>(), ctx.X.data<float>(), fn.value.data<float>(),
                               scale.value.data<float>(), base.value.data<float>(), ctx.mixes.data<float>(),
                               ctx.rstd.data<float>(), dX.data<float>(),
                               fn.trainable ? fn.grad_buffer().data<float>() : nullptr,
                               scale.trainable ? scale.grad_buffer().data<float>() : nullptr,
                               base.trainable ? base.grad_buffer().data<float>() : nullptr, T, dims_, false);
  return dX;
}

}  // namespace dsv4
