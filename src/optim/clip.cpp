#include "optim/clip.h"
#include "runtime/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/exec_path.h"
#include "runtime/error.h"
#include "runtime/host_phases.h"
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

// Sum of squares of a gradient on its device, as F32 [1]: squares in FP32, summed over the last dim, then over the
// rows (ops::reduce: double accumulation on the CPU, FP32 trees on CUDA).
Tensor ops_sq_sum(const Tensor& g) {
  const int64_t last = g.ndim() > 0 ? g.size(g.ndim() - 1) : 1;
  const Tensor sq = ops::mul(g, g).view({g.numel() / std::max<int64_t>(last, 1), last});
  return ops::sum(ops::sum(sq, 1), 0, /*keepdim=*/true);
}
}  // namespace

GradNorm grad_sq_norm(const std::vector<Param*>& params) {
  const HostPhase phase("optimizer: gradient norm", HostPhase::Sync::Device);
  GradNorm r;
  // Per-parameter sums in parameter order; those of the tensor-op path are gathered on their device and brought to
  // the host in one copy per device before they are added in.
  std::vector<double> sums;
  std::vector<const Param*> counted;
  struct DeviceSums {
    Device device;
    std::vector<size_t> index;  // into sums
    std::vector<Tensor> partial;
  };
  std::vector<DeviceSums> on_device;
  for (const Param* p : params) {
    if (!has_grad(p)) continue;
    counted.push_back(p);
    if (use_ops_path(p->grad)) {
      const Tensor& g = ops_grad(p);
      auto it = std::find_if(on_device.begin(), on_device.end(), [&](const DeviceSums& d) { return d.device == g.device(); });
      if (it == on_device.end()) it = on_device.insert(on_device.end(), DeviceSums{g.device(), {}, {}});
      it->index.push_back(sums.size());
      it->partial.push_back(g.numel() > 0 ? ops_sq_sum(g) : Tensor::zeros({1}, DType::F32, g.device()));
      sums.push_back(0);
      continue;
    }
    const float* g = grad_data(p);
    const int64_t n = p->grad.numel();
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
    sums.push_back(s);
  }
  for (DeviceSums& d : on_device) {
    Tensor all = Tensor::empty({static_cast<int64_t>(d.partial.size())}, DType::F32, d.device);
    for (size_t i = 0; i < d.partial.size(); ++i) {
      Tensor slot = all.slice(0, static_cast<int64_t>(i), static_cast<int64_t>(i) + 1);
      ops::copy(d.partial[i], slot);
    }
    const std::vector<float> host = all.to(Device::cpu()).to_floats();
    for (size_t i = 0; i < host.size(); ++i) sums[d.index[i]] = host[i];
  }
  for (size_t i = 0; i < counted.size(); ++i) {
    // A sum of squares is not finite exactly when an element is not (the CPU sums in double; a device sum in FP32
    // could also overflow for gradients beyond ~1e19, which then count as not finite too).
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
  Tensor factor_on;  // f as F32 [1] on the device of the tensor-op path's gradients
  for (Param* p : params) {
    if (!has_grad(p)) continue;
    if (use_ops_path(p->grad)) {
      const Tensor& g = ops_grad(p);
      if (!factor_on.defined() || factor_on.device() != g.device())
        factor_on = Tensor::from_floats({1}, {f}).to(g.device());
      ops::copy(ops::mul(g, factor_on), p->grad);  // g * f in FP32, as the loop below
      continue;
    }
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
