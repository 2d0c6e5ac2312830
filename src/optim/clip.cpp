#include "optim/clip.h"
#include "runtime/parallel.h"

#include <cmath>
#include <limits>

#include "runtime/error.h"

namespace dsv4 {

namespace {
bool has_grad(const Param* p) { return p->trainable && p->grad.defined(); }

const float* grad_data(const Param* p) {
  DSV4_CHECK(p->grad.dtype() == DType::F32 && p->grad.device().is_cpu() && p->grad.is_contiguous(),
             "gradient clipping: {} has a {} gradient (needs contiguous CPU F32)", p->name, p->grad.str());
  return p->grad.data<float>();
}
}  // namespace

GradNorm grad_sq_norm(const std::vector<Param*>& params) {
  GradNorm r;
  for (const Param* p : params) {
    if (!has_grad(p)) continue;
    const float* g = grad_data(p);
    const int64_t n = p->grad.numel();
    double s = 0;
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(g[i])) bad = true;
      s += static_cast<double>(g[i]) * g[i];
    }
    if (bad) {
      if (r.bad_params++ == 0) r.bad_param = p->name;
      r.finite = false;
    }
    r.sq_sum += s;
  }
  if (!r.finite && std::isfinite(r.sq_sum)) r.sq_sum = std::numeric_limits<double>::quiet_NaN();
  r.norm = std::sqrt(r.sq_sum);
  return r;
}

void scale_grads(const std::vector<Param*>& params, double factor) {
  const float f = static_cast<float>(factor);
  for (Param* p : params) {
    if (!has_grad(p)) continue;
    float* g = const_cast<float*>(grad_data(p));
    const int64_t n = p->grad.numel();
    for (int64_t i = 0; i < n; ++i) g[i] *= f;
  }
}

ClipResult clip_grad_norm(const std::vector<Param*>& params, double max_norm) {
  return clip_grad_norm(params, max_norm, params, nullptr);
}

ClipResult clip_grad_norm(const std::vector<Param*>& params, double max_norm, const std::vector<Param*>& counted,
                          const Communicator* group) {
  GradNorm gn = grad_sq_norm(counted);
  if (group && group->size() > 1) {
    std::vector<double> v = {gn.sq_sum, static_cast<double>(gn.bad_params)};
    group_sum(group, v);
    gn.sq_sum = v[0];
    gn.bad_params = static_cast<int64_t>(v[1]);
    gn.norm = std::sqrt(gn.sq_sum);
    gn.finite = std::isfinite(gn.sq_sum) && gn.bad_params == 0;
    if (!gn.finite && gn.bad_param.empty()) gn.bad_param = "(a parameter held by another rank)";
  }
  ClipResult r;
  r.norm = gn.norm;
  r.finite = gn.finite;
  r.bad_param = gn.bad_param;
  r.bad_params = gn.bad_params;
  if (!gn.finite) return r;
  if (max_norm > 0 && gn.norm > max_norm) {
    r.scale = max_norm / gn.norm;
    r.clipped = true;
    scale_grads(params, r.scale);
  }
  return r;
}

}  // namespace dsv4
