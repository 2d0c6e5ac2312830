// Building blocks shared by every module: Linear (no bias) and RMSNorm (weighted or unweighted).
//
// Each layer has forward(x, ctx) that records in `ctx` what backward needs (ctx may be null when no
// backward follows) and backward(dy, ctx) that returns dx and accumulates parameter gradients.
// Shapes: x_TD is [T, D] with T = tokens (batch and sequence flattened); all math FP32.
//
// The raw-pointer cores (rmsnorm_forward_rows / rmsnorm_backward_rows) are templates so tests can run
// them in double precision for finite-difference checks; the Tensor layers instantiate them for float.
#pragma once

#include <cmath>

#include "model/param.h"

namespace dsv4 {

// ---- RMSNorm core: y = w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps), over rows of length dim ----------
// w may be null (unweighted). rstd_out[rows] receives the per-row rstd.
template <typename T>
void rmsnorm_forward_rows(const T* x, const T* w, T* y, T* rstd_out, int64_t rows, int64_t dim, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
    const T rstd = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    rstd_out[r] = rstd;
    T* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = w ? w[i] * (xr[i] * rstd) : xr[i] * rstd;
  }
}

// dx = rstd * (g - x * rstd^2 * mean(g * x)) with g = dy * w; dw += sum_rows dy * x * rstd (if dw).
template <typename T>
void rmsnorm_backward_rows(const T* dy, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows,
                           int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* dyr = dy + r * dim;
    const T* xr = x + r * dim;
    const T s = rstd[r];
    double dot = 0;
    for (int64_t i = 0; i < dim; ++i) dot += static_cast<double>(w ? dyr[i] * w[i] : dyr[i]) * static_cast<double>(xr[i]);
    const T c = static_cast<T>(dot / static_cast<double>(dim)) * s * s;
    T* dxr = dx + r * dim;
    for (int64_t i = 0; i < dim; ++i) {
      const T g = w ? dyr[i] * w[i] : dyr[i];
      dxr[i] = s * (g - xr[i] * c);
      if (dw) dw[i] += dyr[i] * xr[i] * s;
    }
  }
}

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

struct LinearCtx {
  Tensor x;  // [T, in]
};

// y = x W^T with W [out, in] (the checkpoint layout).
class Linear {
 public:
  Linear() = default;
  Linear(std::string name, int64_t in_features, int64_t out_features);

  Tensor forward(const Tensor& x_TI, LinearCtx* ctx) const;
  // Returns dx [T, in]; accumulates dW += dy^T x.
  Tensor backward(const Tensor& dy_TO, const LinearCtx& ctx);
  void visit(const ParamVisitor& f) { f(weight); }
  int64_t in_features() const { return weight.value.size(1); }
  int64_t out_features() const { return weight.value.size(0); }

  Param weight;  // [out, in]
};

}  // namespace dsv4
