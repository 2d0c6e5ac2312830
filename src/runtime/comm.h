// Communication layer: collectives over a group of ranks (the dp / tp / ep groups of training).
//
//   Communicator            abstract group; one rank per process, SPMD: every rank of the group must
//                           call the same collectives in the same order with matching arguments.
//   mpi_world() / MpiRuntime   MPI backend for CPU tensors (src/runtime/comm_mpi.cpp).
//   nccl_communicator()     NCCL backend for CUDA tensors (kernels/comm_nccl.cpp, CUDA + NCCL builds only).
//
// Conventions shared by both backends
//   * Every tensor must be defined, contiguous and on the communicator's device (cpu for MPI, cuda:N for
//     NCCL); violations throw dsv4::Error naming the collective and the argument ("all_reduce: x ...").
//   * Tensors passed as separate `in` / `out` must not overlap in memory.
//   * "Rows" are the slices along dim 0: a row is numel / size(0) consecutive elements. reduce_scatter,
//     all_gather and all_to_all_v require out and in to agree on every dim but dim 0 (so the row size is
//     the same on both sides).
//   * Argument checks that only look at local arguments (contiguity, dtypes, shapes, counts) are
//     deterministic, so SPMD callers get the same error on every rank. Arguments that must agree ACROSS
//     ranks (element counts, dtypes, roots, all_to_all_v send/recv counts) are only checked when
//     cross-rank checks are on (set_cross_rank_checks(true), or environment DSV4_COMM_CHECK=1 when the
//     world communicator is created; split() inherits the setting). They cost one small host
//     all-reduce per collective (two for all_to_all_v) and turn a mismatch into an Error on every
//     rank instead of a hang or corrupted data.
//   * At size 1 every collective is the identity: all_reduce leaves x unchanged, reduce_scatter /
//     all_gather / all_to_all_v copy in to out, broadcast and barrier do nothing observable.
//   * MPI calls are synchronous (they return when this rank's part is complete). NCCL calls are enqueued
//     on dsv4::cuda::current_stream(device) and are asynchronous with respect to the host, except
//     exchange_counts (host values) and barrier (synchronises the stream, then a host barrier).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/tensor.h"

namespace dsv4 {

// Reduction of all_reduce / reduce_scatter. (Named CommReduce so it does not clash with ops::ReduceOp.)
enum class CommReduce : uint8_t { Sum, Max };
std::string_view comm_reduce_name(CommReduce op);  // "sum", "max"

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Backend and group, e.g. "mpi:world", "mpi:world/split(1)", "nccl:world".
  virtual std::string name() const = 0;
  // Where the tensors of this communicator live: cpu for MPI, cuda:N for NCCL.
  virtual Device device() const = 0;

  // x = reduction of x over all ranks, in place. Same shape and dtype on every rank.
  void all_reduce(Tensor& x, CommReduce op) const;
  // in: [size * n, ...], out: [n, ...]; out on rank r = reduction over ranks of rows [r*n, (r+1)*n) of in.
  void reduce_scatter(const Tensor& in, Tensor& out, CommReduce op) const;
  // in: [n, ...], out: [size * n, ...]; out rows [r*n, (r+1)*n) = in of rank r (rank order). Any dtype.
  void all_gather(const Tensor& in, Tensor& out) const;
  // Variable all-to-all over rows. in holds sum(send_rows) rows: the first send_rows[0] go to rank 0, the
  // next send_rows[1] to rank 1, ... out holds sum(recv_rows) rows: recv_rows[0] rows from rank 0 first,
  // then recv_rows[1] from rank 1, ... (each block in the sender's order). recv_rows[p] on rank r must
  // equal send_rows[r] on rank p (exchange_counts computes it). Any dtype; packed FP4 rows must hold an
  // even number of elements.
  void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                    const std::vector<int64_t>& recv_rows) const;
  // recv_rows for all_to_all_v: recv_rows[p] = send_rows[r] of rank p (an all-to-all of the counts).
  // Host-synchronous on every backend; send_rows.size() must equal size() and counts must be >= 0.
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_rows) const;
  // x on every rank = x of `root`, in place. Any dtype; same shape and dtype on every rank.
  void broadcast(Tensor& x, int root) const;
  // Returns when every rank of the group has entered it (NCCL: after the current stream has finished).
  void barrier() const;
  // Sub-groups, as MPI_Comm_split: ranks with the same color form a group, ordered by key then by rank in
  // this group. Returns nullptr on ranks that pass a negative color (member of no group). Collective over
  // this communicator.
  std::unique_ptr<Communicator> split(int color, int key) const;

  bool cross_rank_checks() const { return cross_rank_checks_; }
  void set_cross_rank_checks(bool on) { cross_rank_checks_ = on; }

  // A communicator over the same ranks for tensors on another device (an NCCL twin of an MPI group, set by
  // Parallel::attach_device): all_reduce, reduce_scatter, all_gather, all_to_all_v and broadcast of tensors on the
  // twin's device go to the twin, so code written against the host groups (group_sum, gather_rows, the MoE's
  // all-to-all) runs unchanged on a model moved to a GPU. Must outlive this communicator's uses; null: none.
  void set_device_twin(const Communicator* twin) const { twin_ = twin; }
  const Communicator* device_twin() const { return twin_; }

 protected:
  Communicator() = default;

  // Backend work on validated arguments (same device, contiguous, shapes consistent locally).
  virtual void do_all_reduce(Tensor& x, CommReduce op) const = 0;
  virtual void do_reduce_scatter(const Tensor& in, Tensor& out, CommReduce op) const = 0;
  virtual void do_all_gather(const Tensor& in, Tensor& out) const = 0;
  // Counts are in bytes here (row bytes * rows), validated against the tensors.
  virtual void do_all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_bytes, Tensor& out,
                               const std::vector<int64_t>& recv_bytes) const = 0;
  virtual std::vector<int64_t> do_exchange_counts(const std::vector<int64_t>& send_counts) const = 0;
  virtual void do_broadcast(Tensor& x, int root) const = 0;
  virtual void do_barrier() const = 0;
  virtual std::unique_ptr<Communicator> do_split(int color, int key) const = 0;
  // Whether the backend reduces this dtype with this op (the error message lists what is supported).
  virtual bool supports_reduce(DType dtype, CommReduce op) const = 0;
  virtual std::string supported_reduce_dtypes() const = 0;
  // Element-wise minimum of v over all ranks, on the host (used by the cross-rank checks).
  virtual void host_all_reduce_min(std::vector<int64_t>& v) const = 0;

 private:
  // Cross-rank agreement: throws on every rank when any rank had a local error (local_error non-empty)
  // or when a value of `fields` differs between ranks.
  void agree(const char* op, const std::string& local_error,
             const std::vector<std::pair<const char*, int64_t>>& fields) const;

  bool cross_rank_checks_ = false;
  mutable const Communicator* twin_ = nullptr;
  // The communicator for a tensor on `device`: this one, or the twin when the tensor lives on the twin's device.
  const Communicator& for_device(Device device) const {
    return twin_ && device != this->device() && twin_->device() == device ? *twin_ : *this;
  }
};

// ---- MPI backend (CPU tensors) ------------------------------------------------------------------------
//
// Dtypes: all_reduce / reduce_scatter take F32, I32, I64, I8, U8 natively (MPI_FLOAT, MPI_INT32_T, ...;
// integer sums wrap like the C types) and BF16 / F16 through an F32 temporary: each chunk is widened to
// F32, reduced in F32 with MPI's built-in ops and rounded back once (one rounding for the whole sum, the
// same result on every rank; max is exact). all_gather, all_to_all_v and broadcast move bytes and take
// every dtype, packed FP4 included.
//
// Threads: MPI runs at MPI_THREAD_FUNNELED, so call MPI communicators only from the thread that created
// the MpiRuntime.
//
// Large counts: every message is split into pieces of at most mpi_max_message_bytes() (default 1 GiB), so
// tensors with more than INT_MAX elements or bytes work (all_gather uses a resized derived datatype per
// piece, all_to_all_v is point-to-point Isend/Irecv per piece).

// Initialises MPI (MPI_Init_thread with MPI_THREAD_FUNNELED) unless it is already initialised, and
// finalises it at destruction when this object initialised it. Create one in main() before any
// communicator and destroy every communicator before it.
class MpiRuntime {
 public:
  MpiRuntime(int* argc = nullptr, char*** argv = nullptr);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  bool owns_mpi() const { return owns_; }

 private:
  bool owns_ = false;
};

// A communicator over a duplicate of MPI_COMM_WORLD (errors returned as dsv4::Error, not fatal).
// MPI must be initialised (MpiRuntime).
std::unique_ptr<Communicator> mpi_world();

// Largest message one MPI call carries, in bytes (process-wide; default 1 GiB, at most INT_MAX). Every
// rank must use the same value. Tests lower it to exercise the chunked paths with small tensors.
int64_t mpi_max_message_bytes();
void set_mpi_max_message_bytes(int64_t bytes);

// ---- NCCL backend (CUDA tensors; defined only in CUDA builds with NCCL) --------------------------------
//
// Bootstraps an NCCL communicator over the same ranks as `mpi_bootstrap` (collective over it: rank 0
// creates the ncclUniqueId and broadcasts it as a U8 CPU tensor). The new communicator keeps its own
// split of the bootstrap for host-side work (exchange_counts, barrier, cross-rank checks), so the
// bootstrap may be destroyed afterwards. Dtypes for reductions: F32, BF16, F16, I32, I64, I8, U8.
// Each rank must pass a distinct GPU (NCCL rejects two ranks on one device).
#if defined(DSV4_WITH_NCCL)
std::unique_ptr<Communicator> nccl_communicator(const Communicator& mpi_bootstrap, int device_index);
#endif

}  // namespace dsv4
