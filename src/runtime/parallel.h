// The rank layout of training: data (dp) x tensor (tp) parallel ranks, with expert parallelism (ep) folded onto
// the same world. ARCHITECTURE.md §2.4-2.6.
//
// World rank r of dp * tp ranks:
//   tp group   ranks with equal r / tp         tp_rank  = r % tp    (same data, split heads / vocab / MoE tokens)
//   dp group   ranks with equal r % tp         dp_rank  = r / tp    (different data, same shard of dense weights)
//   ep group   ranks with equal r / ep         ep_rank  = r % ep    (exchange tokens; expert e lives on ep_rank
//                                                                    owning e's contiguous range)
//   edp group  ranks with equal r % ep         edp_rank = r / ep    (replicas of the same experts)
// ep must divide the world; tp and ep are independent (tp2·ep4 on 8 ranks: ep groups hold two tp groups each).
//
// The collectives model code uses are the few paired operations below; each takes the group it works over and is
// the identity when the group is null or has one rank, so the single-rank path runs the same code.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/comm.h"
#include "runtime/tensor.h"

namespace dsv4 {

struct ParallelDims {
  int64_t dp = 1, tp = 1, ep = 1;
  int64_t world() const { return dp * tp; }
  std::string str() const;  // "dp2·tp2·ep2" (degree-1 axes omitted; "single" for 1·1·1)
};

// Contiguous balanced split of n items into `parts`: part i holds [begin, end) with sizes differing by at most one
// (the first n % parts parts hold one more).
struct Range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
Range split_range(int64_t n, int64_t parts, int64_t i);

class Parallel {
 public:
  // One rank: every group is null, every rank index 0, every size 1.
  Parallel() = default;
  // Collective over `world` (which must outlive this object): splits it into the tp, dp, ep and edp groups.
  // Throws when world->size() != dims.world() or ep does not divide the world size.
  Parallel(const Communicator* world, ParallelDims dims);
  ~Parallel();
  Parallel(const Parallel&) = delete;
  Parallel& operator=(const Parallel&) = delete;

  const ParallelDims& dims() const { return dims_; }
  int64_t rank() const { return rank_; }
  int64_t world_size() const { return dims_.world(); }
  int64_t tp_rank() const { return rank_ % dims_.tp; }
  int64_t tp_size() const { return dims_.tp; }
  int64_t dp_rank() const { return rank_ / dims_.tp; }
  int64_t dp_size() const { return dims_.dp; }
  int64_t ep_rank() const { return rank_ % dims_.ep; }
  int64_t ep_size() const { return dims_.ep; }
  int64_t edp_rank() const { return rank_ / dims_.ep; }
  int64_t edp_size() const { return dims_.world() / dims_.ep; }

  // Groups; null when the group has one rank (the paired operations below treat null as the identity).
  const Communicator* world() const { return world_size() > 1 ? world_ : nullptr; }
  const Communicator* tp() const { return tp_.get(); }
  const Communicator* dp() const { return dp_.get(); }
  const Communicator* ep() const { return ep_.get(); }
  const Communicator* edp() const { return edp_.get(); }

  // Device (NCCL) twins of the groups above, for tensors of a model on a CUDA device: attach_device creates them
  // (collective over world, after the constructor; CUDA + NCCL builds only, else a one-line error) and registers each
  // as its host group's Communicator::set_device_twin, so collectives of device tensors on the host groups (group_sum,
  // gather_rows, the MoE's all-to-all, the gradient buckets) run over NCCL. Host values (losses, counts, statistics)
  // stay on MPI.
  void attach_device(Device device);
  Device device() const { return device_; }

  // The experts [begin, end) this rank holds out of n_experts (contiguous ranges over the ep group).
  Range local_experts(int64_t n_experts) const { return split_range(n_experts, ep_size(), ep_rank()); }
  // The ep rank holding expert e.
  int64_t expert_owner(int64_t n_experts, int64_t e) const;

 private:
  ParallelDims dims_;
  int64_t rank_ = 0;
  const Communicator* world_ = nullptr;
  std::unique_ptr<Communicator> tp_, dp_, ep_, edp_;
  // world, tp, dp, ep, edp where they exist (the groups attach_device twins).
  std::vector<const Communicator*> host_groups() const;

  Device device_ = Device::cpu();
  std::vector<std::unique_ptr<Communicator>> twins_;
};

// The index of this process among the ranks of `world` on the same host (ranks grouped by host name, ordered by
// rank): the CUDA device a rank uses when every host runs one rank per GPU. Collective over world; 0 without one.
int local_rank(const Communicator* world);

// ---- paired operations (identity when g is null or has one rank) ------------------------------------------------

// x = sum of x over the group, in place.
void group_sum(const Communicator* g, Tensor& x);
// x = max of x over the group, in place.
void group_max(const Communicator* g, Tensor& x);
// Sums doubles over the group in full double precision (gathered, added in rank order: the same bits everywhere).
void group_sum(const Communicator* g, std::vector<double>& v);
void group_sum(const Communicator* g, std::vector<int64_t>& v);
// Rows of x_local [n_r, ...] of every rank r concatenated in rank order: [sum n_r, ...]. rows[r] = n_r must be the
// same list on every rank (e.g. split_range sizes). Pair of take_rows.
Tensor gather_rows(const Communicator* g, const Tensor& x_local, const std::vector<int64_t>& rows);
// This rank's rows [offset_r, offset_r + rows[r]) of x [sum rows, ...] (a contiguous copy). Pair of gather_rows.
Tensor take_rows(const Communicator* g, const Tensor& x, const std::vector<int64_t>& rows);
// Row counts of split_range(n, size(g), r) for every rank r of g ({n} for a null group).
std::vector<int64_t> split_rows(const Communicator* g, int64_t n);
// Variable row exchange (Communicator::all_to_all_v): send_rows[r] rows of `in` to rank r, recv_rows[r] from it
// (exchange_counts), into a new tensor on in's device. `in` itself when g is null or has one rank.
Tensor exchange_rows(const Communicator* g, const Tensor& in, const std::vector<int64_t>& send_rows,
                     const std::vector<int64_t>& recv_rows);
inline int64_t group_rank(const Communicator* g) { return g ? g->rank() : 0; }
inline int64_t group_size(const Communicator* g) { return g ? g->size() : 1; }

}  // namespace dsv4
