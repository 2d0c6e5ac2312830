#include "optim/grad_sync.h"

#include <algorithm>
#include <functional>

#include "runtime/error.h"
#include "runtime/ops.h"

namespace dsv4 {

void complete_gradients(const Parallel& par, const std::vector<Param*>& params) {
  constexpr int64_t kBucket = int64_t{64} << 20;
  struct Kind {
    const Communicator* group;
    std::function<bool(const Param&)> member;
  };
  const Kind kinds[] = {
      {par.dp(),
       [](const Param& p) {
         return p.placement == Placement::Replicated || p.placement == Placement::TpSplit ||
                p.placement == Placement::TpLocal;
       }},
      {par.world(), [](const Param& p) { return p.placement == Placement::TpPartial; }},
      {par.edp(), [](const Param& p) { return p.placement == Placement::Expert; }},
  };
  for (const Kind& k : kinds) {
    if (!k.group) continue;
    std::vector<Param*> bucket;
    int64_t n = 0;
    Device dev = Device::cpu();  // of the bucket's gradients
    auto flush = [&] {
      if (bucket.empty()) return;
      if (dev.is_cpu()) {
        Tensor flat = Tensor::empty({n}, DType::F32);
        float* f = flat.data<float>();
        for (Param* p : bucket) f = std::copy_n(p->grad.data<float>(), p->grad.numel(), f);
        k.group->all_reduce(flat, CommReduce::Sum);
        f = flat.data<float>();
        for (Param* p : bucket) {
          std::copy_n(f, p->grad.numel(), p->grad.data<float>());
          f += p->grad.numel();
        }
      } else {  // device gradients: the same buckets, reduced over the group's device twin (Parallel::attach_device)
        DSV4_CHECK(k.group->device_twin() && k.group->device_twin()->device() == dev,
                   "complete_gradients: gradients on {}, but the group {} has no communicator there (the trainer calls "
                   "Parallel::attach_device)",
                   dev.str(), k.group->name());
        Tensor flat = Tensor::empty({n}, DType::F32, dev);
        int64_t off = 0;
        for (Param* p : bucket) {
          Tensor dst = flat.slice(0, off, off + p->grad.numel()).view(p->grad.shape());
          ops::copy(p->grad, dst);
          off += p->grad.numel();
        }
        k.group->all_reduce(flat, CommReduce::Sum);
        off = 0;
        for (Param* p : bucket) {
          ops::copy(flat.slice(0, off, off + p->grad.numel()).view(p->grad.shape()), p->grad);
          off += p->grad.numel();
        }
      }
      bucket.clear();
      n = 0;
    };
    for (Param* p : params) {
      if (!p->grad.defined() || !k.member(*p)) continue;
      if (!bucket.empty() && (p->grad.device() != dev || n + p->grad.numel() > kBucket)) flush();
      dev = p->grad.device();
      bucket.push_back(p);
      n += p->grad.numel();
    }
    flush();
  }
}

bool canonical_copy(const Parallel& par, const Param& p) {
  switch (p.placement) {
    case Placement::Expert: return par.edp_rank() == 0;
    case Placement::TpSplit:
    case Placement::TpLocal: return par.dp_rank() == 0;
    default: return par.rank() == 0;
  }
}

}  // namespace dsv4
