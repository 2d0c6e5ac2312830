#include "optim/grad_sync.h"

#include <algorithm>
#include <functional>

#include "runtime/error.h"

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
    auto flush = [&] {
      if (bucket.empty()) return;
      Tensor flat = Tensor::empty({n}, DType::F32);
      float* f = flat.data<float>();
      for (Param* p : bucket) f = std::copy_n(p->grad.data<float>(), p->grad.numel(), f);
      k.group->all_reduce(flat, CommReduce::Sum);
      f = flat.data<float>();
      for (Param* p : bucket) {
        std::copy_n(f, p->grad.numel(), p->grad.data<float>());
        f += p->grad.numel();
      }
      bucket.clear();
      n = 0;
    };
    for (Param* p : params) {
      if (!p->grad.defined() || !k.member(*p)) continue;
      DSV4_CHECK(p->grad.device().is_cpu(),
                 "complete_gradients: {} has its gradient on {}; gradient sync over several ranks runs on CPU tensors "
                 "only so far (no device buckets / NCCL here yet)",
                 p->name, p->grad.device().str());
      if (n > 0 && n + p->grad.numel() > kBucket) flush();
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
