#include "optim/grad_sync.h"

#include <algorithm>
#include <optional>

#include "runtime/error.h"
#include "runtime/ops.h"

namespace dsv4 {

namespace {

enum class SyncGroup { Dp, World, Edp };

SyncGroup sync_group(const Param& p) {
  switch (p.placement) {
    case Placement::TpPartial: return SyncGroup::World;
    case Placement::Expert: return SyncGroup::Edp;
    case Placement::Replicated:
    case Placement::TpSplit:
    case Placement::TpLocal: break;
  }
  return SyncGroup::Dp;
}

// The bucket's gradients as one flat view when they lie back to back in one storage, in bucket order.
std::optional<Tensor> contiguous_run(const std::vector<Param*>& bucket, int64_t n) {
  const Tensor& first = bucket.front()->grad;
  const char* next = static_cast<const char*>(first.raw_data());
  for (const Param* p : bucket) {
    const Tensor& g = p->grad;
    if (g.storage() != first.storage() || !g.is_contiguous() || g.raw_data() != next) return std::nullopt;
    next += g.nbytes();
  }
  return Tensor::from_blob(first.raw_data(), {n}, DType::F32, first.device(), first.storage());
}

}  // namespace

std::vector<Param*> gradient_sync_order(const std::vector<Param*>& params) {
  std::vector<Param*> out = params;
  std::stable_sort(out.begin(), out.end(), [](const Param* a, const Param* b) { return sync_group(*a) < sync_group(*b); });
  return out;
}

void complete_gradients(const Parallel& par, const std::vector<Param*>& params) {
  constexpr int64_t kBucket = int64_t{64} << 20;
  const std::pair<SyncGroup, const Communicator*> groups[] = {
      {SyncGroup::Dp, par.dp()}, {SyncGroup::World, par.world()}, {SyncGroup::Edp, par.edp()}};
  for (const auto& [kind, group] : groups) {
    if (!group) continue;
    std::vector<Param*> bucket;
    int64_t n = 0;
    Device dev = Device::cpu();  // of the bucket's gradients
    auto flush = [&] {
      if (bucket.empty()) return;
      DSV4_CHECK(dev.is_cpu() || (group->device_twin() && group->device_twin()->device() == dev),
                 "complete_gradients: gradients on {}, but the group {} has no communicator there (the trainer calls "
                 "Parallel::attach_device)",
                 dev.str(), group->name());
      if (std::optional<Tensor> run = contiguous_run(bucket, n)) {
        group->all_reduce(*run, CommReduce::Sum);
      } else {
        Tensor flat = Tensor::empty({n}, DType::F32, dev);
        int64_t off = 0;
        for (Param* p : bucket) {
          Tensor dst = flat.slice(0, off, off + p->grad.numel()).view(p->grad.shape());
          ops::copy(p->grad, dst);
          off += p->grad.numel();
        }
        group->all_reduce(flat, CommReduce::Sum);
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
      if (!p->grad.defined() || sync_group(*p) != kind) continue;
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
