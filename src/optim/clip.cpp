#include "optim/clip.h"
#include "runtime/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/exec_path.h"
#include "runtime/error.h"
#include "runtime/host_phases.h"
#include "runtime/model_ops.h"
#include "runtime/ops.h"

namespace dsv4 {

namespace {
bool has_grad(const Param* p) { return p->trainable && p->grad.defined(); }

const float* grad_data(const Param* p) {
  DSV4_CHECK(p->grad.dtype() == DType::F32 && p->grad.device().is_cpu() && p->grad.is_contiguous(),
             "gradient clipping: {} has a {} gradient (needs contiguous CPU F32)", p->name, p->grad.str());
  return p->grad.data<float>();
}

// Tensor-op path: the gradient as contiguous F32 on its device.
const Tensor& ops_grad(const Param* p) {
  DSV4_CHECK(p->grad.dtype() == DType::F32 && p->grad.is_contiguous(),
             "gradient clipping: {} has a {} gradient (needs contiguous F32)", p->name, p->grad.str());
  return p->grad;
}

// The tensor-op path's gradients of one device and their positions in the caller's order.
struct DeviceGrads {
  Device device;
  std::vector<size_t> index;
  std::vector<Tensor> grads;
};
void add_device_grad(std::vector<DeviceGrads>& on_device, const Tensor& g, size_t index) {
  auto it = std::find_if(on_device.begin(), on_device.end(), [&](const DeviceGrads& d) { return d.device == g.device(); });
  if (it == on_device.end()) it = on_device.insert(on_device.end(), DeviceGrads{g.device(), {}, {}});
  it->index.push_back(index);
  it->grads.push_back(g);
}
}  // namespace

GradNorm grad_sq_norm(const std::vector<Param*>& params) {
  const HostPhase phase("optimizer: gradient norm", HostPhase::Sync::Device);
  GradNorm r;
  // Per-parameter sums in double, in parameter order; those of the tensor-op path come from one sum_squares call per
  // device (runtime/model_ops.h).
  std::vector<double> sums;
  std::vector<const Param*> counted;
  std::vector<DeviceGrads> on_device;
  for (const Param* p : params) {
    if (!has_grad(p)) continue;
    counted.push_back(p);
    if (use_ops_path(p->grad)) {
      add_device_grad(on_device, ops_grad(p), sums.size());
      sums.push_back(0);
      continue;
    }
    const float* g = grad_data(p);
    const int64_t n = p->grad.numel();
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
    sums.push_back(s);
  }
  for (const DeviceGrads& d : on_device) {
    const std::vector<double> device_sums = sum_squares(d.grads);
    for (size_t i = 0; i < device_sums.size(); ++i) sums[d.index[i]] = device_sums[i];
  }
  for (size_t i = 0; i < counted.size(); ++i) {
    // A sum of squares (in double) is not finite exactly when an element is not.
    if (!std::isfinite(sums[i])) {
      if (r.bad_params++ == 0) r.bad_param = counted[i]->name;
      r.finite = false;
    }
    r.sq_sum += sums[i];
  }
  if (!r.finite && std::isfinite(r.sq_sum)) r.sq_sum = std::numeric_limits<double>::quiet_NaN();
  r.norm = std::sqrt(r.sq_sum);
  return r;
}

void scale_grads(const std::vector<Param*>& params, double factor) {
  const HostPhase phase("optimizer: gradient scaling", HostPhase::Sync::Device);
  const float f = static_cast<float>(factor);
  std::vector<DeviceGrads> on_device;
  for (Param* p : params) {
    if (!has_grad(p)) continue;
    if (use_ops_path(p->grad)) {
      add_device_grad(on_device, ops_grad(p), 0);
      continue;
    }
    float* g = const_cast<float*>(grad_data(p));
    const int64_t n = p->grad.numel();
    for (int64_t i = 0; i < n; ++i) g[i] *= f;
  }
  for (const DeviceGrads& d : on_device) scale_in_place(d.grads, f);  // g * f in FP32, as the loop above
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
