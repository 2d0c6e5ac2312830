#include "model/param.h"

#include <algorithm>

namespace dsv4 {

std::vector<Tensor> allocate_grad_buffers(const std::vector<Param*>& params) {
  std::vector<std::pair<Device, std::vector<Param*>>> by_device;  // each device's parameters in list order
  for (Param* p : params) {
    if (p->grad.defined()) continue;
    const Device dev = p->value.device();
    auto it = std::find_if(by_device.begin(), by_device.end(), [&](const auto& d) { return d.first == dev; });
    if (it == by_device.end()) it = by_device.insert(by_device.end(), {dev, {}});
    it->second.push_back(p);
  }
  std::vector<Tensor> buffers;
  for (const auto& [dev, ps] : by_device) {
    int64_t n = 0;
    for (const Param* p : ps) n += p->value.numel();
    Tensor flat = Tensor::zeros({n}, DType::F32, dev);
    int64_t off = 0;
    for (Param* p : ps) {
      p->grad = flat.slice(0, off, off + p->value.numel()).view(p->value.shape());
      off += p->value.numel();
    }
    buffers.push_back(std::move(flat));
  }
  return buffers;
}

bool shares_storage(const Tensor& t, const Tensor& buffer) {
  return t.defined() && buffer.defined() && t.storage() == buffer.storage();
}

}  // namespace dsv4
