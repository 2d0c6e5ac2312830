// Communicator frontend (argument checks shared by every backend) and the MPI backend for CPU tensors.
// See comm.h for the semantics. No tensor ops are used here: data is moved as raw bytes and the 16-bit
// float reductions convert with dtype.h.
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "runtime/comm.h"

namespace dsv4 {

std::string_view comm_reduce_name(CommReduce op) {
  switch (op) {
    case CommReduce::Sum:
      return "sum";
    case CommReduce::Max:
      return "max";
  }
  return "?";
}

// ==== frontend: argument checks =====================================================================
namespace {

std::string strides_str(const Tensor& t) { return t.strides().str(); }

// Local checks of one tensor argument; returns an error message or "".
std::string check_tensor(const Communicator& comm, const char* op, const char* arg, const Tensor& t) {
  if (!t.defined()) return fmt::format("{}: {} is an undefined tensor (communicator {})", op, arg, comm.name());
  if (!t.is_contiguous())
    return fmt::format("{}: {} must be contiguous, got {} with strides {} (communicator {}; call .contiguous())", op,
                       arg, t.str(), strides_str(t), comm.name());
  if (!(t.device() == comm.device()))
    return fmt::format("{}: {} is on {} but communicator {} works on {}", op, arg, t.device().str(), comm.name(),
                       comm.device().str());
  if (t.dtype() == DType::F4_E2M1 && t.offset() % 2 != 0)
    return fmt::format("{}: packed FP4 {} starts at odd element {}", op, arg, t.offset());
  return {};
}

// Elements per row (product of dims 1..); 1 for 0-d tensors.
int64_t row_elems(const Tensor& t) {
  int64_t n = 1;
  for (int i = 1; i < t.ndim(); ++i) n *= t.shape()[i];
  return n;
}

// `big` must be `small` with dim 0 multiplied by `factor` (a 0-d `small` pairs with a 1-d big of
// `factor` elements).
bool rows_compatible(const Tensor& big, const Tensor& small, int64_t factor) {
  if (small.ndim() == 0) return big.ndim() == 1 && big.shape()[0] == factor;
  if (big.ndim() != small.ndim() || big.shape()[0] != factor * small.shape()[0]) return false;
  for (int i = 1; i < big.ndim(); ++i)
    if (big.shape()[i] != small.shape()[i]) return false;
  return true;
}

bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return false;
  const auto pa = reinterpret_cast<uintptr_t>(a.raw_data()), pb = reinterpret_cast<uintptr_t>(b.raw_data());
  return pa < pb + static_cast<uintptr_t>(b.nbytes()) && pb < pa + static_cast<uintptr_t>(a.nbytes());
}

std::string counts_str(const std::vector<int64_t>& v) { return fmt::format("[{}]", fmt::join(v, ", ")); }

}  // namespace

void Communicator::agree(const char* op, const std::string& local_error,
                         const std::vector<std::pair<const char*, int64_t>>& fields) const {
  if (!cross_rank_checks_) {
    if (!local_error.empty()) DSV4_FAIL("{}", local_error);
    return;
  }
  // One MIN-reduction carries the error flag, the minimum of each field and (negated) its maximum.
  const size_t n = fields.size();
  std::vector<int64_t> v(1 + 2 * n);
  v[0] = local_error.empty() ? 0 : -1;
  for (size_t i = 0; i < n; ++i) {
    v[1 + i] = fields[i].second;
    v[1 + n + i] = -fields[i].second;
  }
  host_all_reduce_min(v);
  if (!local_error.empty()) DSV4_FAIL("{}", local_error);
  if (v[0] < 0) DSV4_FAIL("{}: invalid arguments on another rank of {} (see that rank's error)", op, name());
  std::string diff;
  for (size_t i = 0; i < n; ++i) {
    const int64_t lo = v[1 + i], hi = -v[1 + n + i];
    if (lo != hi)
      diff += fmt::format("{}{} ranges over [{}, {}] (here {})", diff.empty() ? "" : "; ", fields[i].first, lo, hi,
                          fields[i].second);
  }
  if (!diff.empty()) DSV4_FAIL("{}: arguments differ across the ranks of {}: {}", op, name(), diff);
}

void Communicator::all_reduce(Tensor& x, CommReduce op) const {
  if (const Communicator& c = for_device(x.device()); &c != this) return c.all_reduce(x, op);
  std::string err = check_tensor(*this, "all_reduce", "x", x);
  if (err.empty() && !supports_reduce(x.dtype(), op))
    err = fmt::format("all_reduce: {} of a {} tensor is not supported by {} (x is {}; supported: {})",
                      comm_reduce_name(op), dtype_name(x.dtype()), name(), x.str(), supported_reduce_dtypes());
  agree("all_reduce", err,
        {{"reduce op", static_cast<int64_t>(op)}, {"dtype", static_cast<int64_t>(x.dtype())}, {"numel", x.numel()}});
  if (x.numel() == 0) return;
  do_all_reduce(x, op);
}

void Communicator::reduce_scatter(const Tensor& in, Tensor& out, CommReduce op) const {
  if (const Communicator& c = for_device(in.device()); &c != this) return c.reduce_scatter(in, out, op);
  std::string err = check_tensor(*this, "reduce_scatter", "in", in);
  if (err.empty()) err = check_tensor(*this, "reduce_scatter", "out", out);
  if (err.empty() && in.dtype() != out.dtype())
    err = fmt::format("reduce_scatter: in is {} but out is {} (dtypes must match)", in.str(), out.str());
  if (err.empty() && !supports_reduce(in.dtype(), op))
    err = fmt::format("reduce_scatter: {} of a {} tensor is not supported by {} (supported: {})", comm_reduce_name(op),
                      dtype_name(in.dtype()), name(), supported_reduce_dtypes());
  if (err.empty() && !rows_compatible(in, out, size()))
    err =
        fmt::format("reduce_scatter: in {} must be out {} with dim 0 multiplied by the group size {} (communicator {})",
                    in.shape().str(), out.shape().str(), size(), name());
  if (err.empty() && overlaps(in, out)) err = "reduce_scatter: in and out overlap in memory";
  agree("reduce_scatter", err,
        {{"reduce op", static_cast<int64_t>(op)},
         {"dtype", static_cast<int64_t>(out.dtype())},
         {"out numel", out.numel()}});
  if (out.numel() == 0) return;
  do_reduce_scatter(in, out, op);
}

void Communicator::all_gather(const Tensor& in, Tensor& out) const {
  if (const Communicator& c = for_device(in.device()); &c != this) return c.all_gather(in, out);
  std::string err = check_tensor(*this, "all_gather", "in", in);
  if (err.empty()) err = check_tensor(*this, "all_gather", "out", out);
  if (err.empty() && in.dtype() != out.dtype())
    err = fmt::format("all_gather: in is {} but out is {} (dtypes must match)", in.str(), out.str());
  if (err.empty() && !rows_compatible(out, in, size()))
    err = fmt::format("all_gather: out {} must be in {} with dim 0 multiplied by the group size {} (communicator {})",
                      out.shape().str(), in.shape().str(), size(), name());
  if (err.empty() && in.dtype() == DType::F4_E2M1 && in.numel() % 2 != 0)
    err = fmt::format("all_gather: packed FP4 in {} must hold an even number of elements", in.str());
  if (err.empty() && overlaps(in, out)) err = "all_gather: in and out overlap in memory";
  agree("all_gather", err, {{"dtype", static_cast<int64_t>(in.dtype())}, {"in numel", in.numel()}});
  if (in.numel() == 0) return;
  do_all_gather(in, out);
}

void Communicator::all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                                const std::vector<int64_t>& recv_rows) const {
  if (const Communicator& c = for_device(in.device()); &c != this) return c.all_to_all_v(in, send_rows, out, recv_rows);
  const int n = size();
  std::string err = check_tensor(*this, "all_to_all_v", "in", in);
  if (err.empty()) err = check_tensor(*this, "all_to_all_v", "out", out);
  if (err.empty() && in.dtype() != out.dtype())
    err = fmt::format("all_to_all_v: in is {} but out is {} (dtypes must match)", in.str(), out.str());
  if (err.empty() && (in.ndim() == 0 || out.ndim() == 0))
    err =
        fmt::format("all_to_all_v: in {} and out {} need at least one dim (rows are along dim 0)", in.str(), out.str());
  if (err.empty()) {
    bool same = in.ndim() == out.ndim();
    for (int i = 1; same && i < in.ndim(); ++i) same = in.shape()[i] == out.shape()[i];
    if (!same)
      err = fmt::format("all_to_all_v: in {} and out {} must agree on every dim but dim 0", in.shape().str(),
                        out.shape().str());
  }
  if (err.empty() && (static_cast<int>(send_rows.size()) != n || static_cast<int>(recv_rows.size()) != n))
    err = fmt::format("all_to_all_v: send_rows has {} and recv_rows {} entries, the group size is {} (communicator {})",
                      send_rows.size(), recv_rows.size(), n, name());
  if (err.empty()) {
    int64_t s = 0, r = 0;
    bool nonneg = true;
    for (int p = 0; p < n; ++p) {
      nonneg = nonneg && send_rows[static_cast<size_t>(p)] >= 0 && recv_rows[static_cast<size_t>(p)] >= 0;
      s += send_rows[static_cast<size_t>(p)];
      r += recv_rows[static_cast<size_t>(p)];
    }
    if (!nonneg)
      err = fmt::format("all_to_all_v: negative row count in send_rows {} or recv_rows {}", counts_str(send_rows),
                        counts_str(recv_rows));
    else if (s != in.shape()[0])
      err = fmt::format("all_to_all_v: send_rows {} sum to {} but in {} has {} rows", counts_str(send_rows), s,
                        in.str(), in.shape()[0]);
    else if (r != out.shape()[0])
      err = fmt::format("all_to_all_v: recv_rows {} sum to {} but out {} has {} rows", counts_str(recv_rows), r,
                        out.str(), out.shape()[0]);
    else if (send_rows[static_cast<size_t>(rank())] != recv_rows[static_cast<size_t>(rank())])
      err = fmt::format("all_to_all_v: rank {} sends itself {} rows but expects {} (send_rows {}, recv_rows {})",
                        rank(), send_rows[static_cast<size_t>(rank())], recv_rows[static_cast<size_t>(rank())],
                        counts_str(send_rows), counts_str(recv_rows));
  }
  const int64_t relems = err.empty() ? row_elems(in) : 0;
  if (err.empty() && in.dtype() == DType::F4_E2M1 && relems % 2 != 0)
    err =
        fmt::format("all_to_all_v: packed FP4 rows of {} hold {} elements; rows must be whole bytes", in.str(), relems);
  if (err.empty() && overlaps(in, out)) err = "all_to_all_v: in and out overlap in memory";
  agree("all_to_all_v", err, {{"dtype", static_cast<int64_t>(in.dtype())}, {"row elements", relems}});
  if (cross_rank_checks()) {
    // recv_rows[p] here must be what rank p sends here.
    const std::vector<int64_t> expected = do_exchange_counts(send_rows);
    std::string count_err;
    if (expected != recv_rows)
      count_err = fmt::format("all_to_all_v: rank {} expects recv_rows {} but the other ranks send it {}", rank(),
                              counts_str(recv_rows), counts_str(expected));
    agree("all_to_all_v", count_err, {});
  }
  const int64_t row_bytes = dtype_nbytes(in.dtype(), relems);
  std::vector<int64_t> send_bytes(static_cast<size_t>(n)), recv_bytes(static_cast<size_t>(n));
  for (size_t p = 0; p < static_cast<size_t>(n); ++p) {
    send_bytes[p] = send_rows[p] * row_bytes;
    recv_bytes[p] = recv_rows[p] * row_bytes;
  }
  do_all_to_all_v(in, send_bytes, out, recv_bytes);
}

std::vector<int64_t> Communicator::exchange_counts(const std::vector<int64_t>& send_rows) const {
  std::string err;
  if (static_cast<int>(send_rows.size()) != size())
    err =
        fmt::format("exchange_counts: {} counts for a group of {} (communicator {})", send_rows.size(), size(), name());
  else if (std::any_of(send_rows.begin(), send_rows.end(), [](int64_t c) { return c < 0; }))
    err = fmt::format("exchange_counts: negative count in {}", counts_str(send_rows));
  agree("exchange_counts", err, {});
  return do_exchange_counts(send_rows);
}

void Communicator::broadcast(Tensor& x, int root) const {
  if (const Communicator& c = for_device(x.device()); &c != this) return c.broadcast(x, root);
  std::string err = check_tensor(*this, "broadcast", "x", x);
  if (err.empty() && (root < 0 || root >= size()))
    err = fmt::format("broadcast: root {} is not a rank of {} (size {})", root, name(), size());
  agree("broadcast", err, {{"root", root}, {"dtype", static_cast<int64_t>(x.dtype())}, {"numel", x.numel()}});
  if (x.nbytes() == 0) return;
  do_broadcast(x, root);
}

void Communicator::barrier() const { do_barrier(); }

std::unique_ptr<Communicator> Communicator::split(int color, int key) const {
  std::unique_ptr<Communicator> c = do_split(color, key);
  if (c) c->set_cross_rank_checks(cross_rank_checks_);
  return c;
}

// ==== MPI backend =====================================================================================
namespace {

std::atomic<int64_t> g_max_message_bytes{int64_t{1} << 30};

MPI_Op mpi_op(CommReduce op) { return op == CommReduce::Sum ? MPI_SUM : MPI_MAX; }

// Built-in MPI type for dtypes MPI reduces natively; MPI_DATATYPE_NULL otherwise.
MPI_Datatype native_reduce_type(DType t) {
  switch (t) {
    case DType::F32:
      return MPI_FLOAT;
    case DType::I32:
      return MPI_INT32_T;
    case DType::I64:
      return MPI_INT64_T;
    case DType::I8:
      return MPI_INT8_T;
    case DType::U8:
      return MPI_UINT8_T;
    default:
      return MPI_DATATYPE_NULL;
  }
}
bool is_half(DType t) { return t == DType::BF16 || t == DType::F16; }

void widen(DType t, const uint16_t* src, float* dst, int64_t n) {
  if (t == DType::BF16)
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}
void narrow(DType t, const float* src, uint16_t* dst, int64_t n) {
  if (t == DType::BF16)
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

// Elements of `elem_bytes` each per message piece (>= 1).
int64_t piece_elems(int64_t elem_bytes) { return std::max<int64_t>(1, g_max_message_bytes.load() / elem_bytes); }
// F32 temporaries of the 16-bit reductions stay below 64 MiB.
inline constexpr int64_t kMaxTempFloats = int64_t{1} << 24;

int to_int(int64_t v) {
  DSV4_CHECK(v >= 0 && v <= INT_MAX, "MPI count {} out of int range", v);
  return static_cast<int>(v);
}

// Frees a derived datatype at scope exit.
struct TypeGuard {
  MPI_Datatype t = MPI_DATATYPE_NULL;
  ~TypeGuard() {
    if (t != MPI_DATATYPE_NULL) MPI_Type_free(&t);
  }
};

inline constexpr int kAllToAllTag = 0x2A2A;

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, std::string label) : comm_(comm), label_(std::move(label)) {
    DSV4_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    DSV4_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    DSV4_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi:" + label_; }
  Device device() const override { return Device::cpu(); }

 protected:
  bool supports_reduce(DType t, CommReduce) const override {
    return native_reduce_type(t) != MPI_DATATYPE_NULL || is_half(t);
  }
  std::string supported_reduce_dtypes() const override { return "F32, BF16, F16, I32, I64, I8, U8"; }

  void do_all_reduce(Tensor& x, CommReduce op) const override {
    const int64_t n = x.numel();
    const DType dt = x.dtype();
    if (const MPI_Datatype t = native_reduce_type(dt); t != MPI_DATATYPE_NULL) {
      const int64_t es = dtype_bits(dt) / 8, step = piece_elems(es);
      auto* p = static_cast<char*>(x.raw_data());
      for (int64_t off = 0; off < n; off += step) {
        const int64_t c = std::min(step, n - off);
        DSV4_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, p + off * es, to_int(c), t, mpi_op(op), comm_));
      }
      return;
    }
    // BF16 / F16: widen a piece to F32, reduce in F32, round back once.
    uint16_t* p = x.data_u16();
    const int64_t step = std::min(piece_elems(4), kMaxTempFloats);
    std::vector<float> tmp(static_cast<size_t>(std::min(step, n)));
    for (int64_t off = 0; off < n; off += step) {
      const int64_t c = std::min(step, n - off);
      widen(dt, p + off, tmp.data(), c);
      DSV4_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, tmp.data(), to_int(c), MPI_FLOAT, mpi_op(op), comm_));
      narrow(dt, tmp.data(), p + off, c);
    }
  }

  void do_reduce_scatter(const Tensor& in, Tensor& out, CommReduce op) const override {
    const int64_t n = out.numel();  // elements per rank block
    const DType dt = in.dtype();
    const MPI_Datatype native = native_reduce_type(dt);
    const bool half = native == MPI_DATATYPE_NULL;
    const MPI_Datatype t = half ? MPI_FLOAT : native;
    const int64_t es = half ? 4 : dtype_bits(dt) / 8;  // bytes per element on the wire
    const int64_t in_es = dtype_bits(dt) / 8;          // bytes per element in the tensors
    const auto* src = static_cast<const char*>(in.raw_data());
    auto* dst = static_cast<char*>(out.raw_data());
    if (!half && n * size_ * es <= g_max_message_bytes.load()) {
      DSV4_MPI_CHECK(MPI_Reduce_scatter_block(src, dst, to_int(n), t, mpi_op(op), comm_));
      return;
    }
    // Pieces of `step` elements of every block: pack piece r of block r contiguously, reduce-scatter.
    int64_t step = std::max<int64_t>(1, g_max_message_bytes.load() / (size_ * es));
    if (half) step = std::min(step, std::max<int64_t>(1, kMaxTempFloats / size_));
    step = std::min(step, n);
    std::vector<char> send(static_cast<size_t>(step * size_ * es));
    std::vector<float> recv(half ? static_cast<size_t>(step) : 0);
    for (int64_t off = 0; off < n; off += step) {
      const int64_t c = std::min(step, n - off);
      for (int64_t r = 0; r < size_; ++r) {
        const char* block = src + (r * n + off) * in_es;
        char* piece = send.data() + r * c * es;
        if (half)
          widen(dt, reinterpret_cast<const uint16_t*>(block), reinterpret_cast<float*>(piece), c);
        else
          std::memcpy(piece, block, static_cast<size_t>(c * es));
      }
      void* recv_buf = half ? static_cast<void*>(recv.data()) : static_cast<void*>(dst + off * in_es);
      DSV4_MPI_CHECK(MPI_Reduce_scatter_block(send.data(), recv_buf, to_int(c), t, mpi_op(op), comm_));
      if (half) narrow(dt, recv.data(), reinterpret_cast<uint16_t*>(dst + off * in_es), c);
    }
  }

  void do_all_gather(const Tensor& in, Tensor& out) const override {
    const int64_t block = in.nbytes();
    const auto* src = static_cast<const char*>(in.raw_data());
    auto* dst = static_cast<char*>(out.raw_data());
    const int64_t max_bytes = g_max_message_bytes.load();
    if (block <= max_bytes) {
      DSV4_MPI_CHECK(MPI_Allgather(src, to_int(block), MPI_BYTE, dst, to_int(block), MPI_BYTE, comm_));
      return;
    }
    // Piece [off, off + c) of every block: a c-byte type resized to the block extent lands rank r's
    // piece at dst + r * block + off.
    for (int64_t off = 0; off < block; off += max_bytes) {
      const int64_t c = std::min(max_bytes, block - off);
      TypeGuard contig, resized;
      DSV4_MPI_CHECK(MPI_Type_contiguous(to_int(c), MPI_BYTE, &contig.t));
      DSV4_MPI_CHECK(MPI_Type_create_resized(contig.t, 0, static_cast<MPI_Aint>(block), &resized.t));
      DSV4_MPI_CHECK(MPI_Type_commit(&resized.t));
      DSV4_MPI_CHECK(MPI_Allgather(src + off, to_int(c), MPI_BYTE, dst + off, 1, resized.t, comm_));
    }
  }

  void do_all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_bytes, Tensor& out,
                       const std::vector<int64_t>& recv_bytes) const override {
    const auto* src = static_cast<const char*>(in.raw_data());
    auto* dst = static_cast<char*>(out.raw_data());
    const size_t n = static_cast<size_t>(size_);
    std::vector<int64_t> sdispl(n, 0), rdispl(n, 0);
    for (size_t p = 1; p < n; ++p) {
      sdispl[p] = sdispl[p - 1] + send_bytes[p - 1];
      rdispl[p] = rdispl[p - 1] + recv_bytes[p - 1];
    }
    const auto me = static_cast<size_t>(rank_);
    if (send_bytes[me] > 0) std::memcpy(dst + rdispl[me], src + sdispl[me], static_cast<size_t>(send_bytes[me]));
    if (size_ == 1) return;
    // Point-to-point, in pieces of at most max_bytes; MPI keeps the order of messages with the same
    // (source, tag, communicator), so piece k of a peer lands at offset k * max_bytes.
    const int64_t max_bytes = g_max_message_bytes.load();
    std::vector<MPI_Request> reqs;
    for (int k = 1; k < size_; ++k) {
      const int p = (rank_ - k + size_) % size_;
      const auto pi = static_cast<size_t>(p);
      for (int64_t off = 0; off < recv_bytes[pi]; off += max_bytes) {
        reqs.emplace_back();
        DSV4_MPI_CHECK(MPI_Irecv(dst + rdispl[pi] + off, to_int(std::min(max_bytes, recv_bytes[pi] - off)), MPI_BYTE, p,
                                 kAllToAllTag, comm_, &reqs.back()));
      }
    }
    for (int k = 1; k < size_; ++k) {
      const int p = (rank_ + k) % size_;
      const auto pi = static_cast<size_t>(p);
      for (int64_t off = 0; off < send_bytes[pi]; off += max_bytes) {
        reqs.emplace_back();
        DSV4_MPI_CHECK(MPI_Isend(src + sdispl[pi] + off, to_int(std::min(max_bytes, send_bytes[pi] - off)), MPI_BYTE, p,
                                 kAllToAllTag, comm_, &reqs.back()));
      }
    }
    if (!reqs.empty()) DSV4_MPI_CHECK(MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE));
  }

  std::vector<int64_t> do_exchange_counts(const std::vector<int64_t>& send_counts) const override {
    std::vector<int64_t> recv(static_cast<size_t>(size_));
    DSV4_MPI_CHECK(MPI_Alltoall(send_counts.data(), 1, MPI_INT64_T, recv.data(), 1, MPI_INT64_T, comm_));
    return recv;
  }

  void do_broadcast(Tensor& x, int root) const override {
    auto* p = static_cast<char*>(x.raw_data());
    const int64_t nbytes = x.nbytes(), max_bytes = g_max_message_bytes.load();
    for (int64_t off = 0; off < nbytes; off += max_bytes)
      DSV4_MPI_CHECK(MPI_Bcast(p + off, to_int(std::min(max_bytes, nbytes - off)), MPI_BYTE, root, comm_));
  }

  void do_barrier() const override { DSV4_MPI_CHECK(MPI_Barrier(comm_)); }

  std::unique_ptr<Communicator> do_split(int color, int key) const override {
    MPI_Comm sub = MPI_COMM_NULL;
    DSV4_MPI_CHECK(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &sub));
    if (sub == MPI_COMM_NULL) return nullptr;
    return std::make_unique<MpiCommunicator>(sub, fmt::format("{}/split({})", label_, color));
  }

  void host_all_reduce_min(std::vector<int64_t>& v) const override {
    DSV4_MPI_CHECK(
        MPI_Allreduce(MPI_IN_PLACE, v.data(), to_int(static_cast<int64_t>(v.size())), MPI_INT64_T, MPI_MIN, comm_));
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string label_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

int64_t mpi_max_message_bytes() { return g_max_message_bytes.load(); }
void set_mpi_max_message_bytes(int64_t bytes) {
  DSV4_CHECK(bytes >= 1 && bytes <= INT_MAX, "MPI message size {} must be in [1, INT_MAX]", bytes);
  g_max_message_bytes.store(bytes);
}

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0, finalized = 0;
  DSV4_MPI_CHECK(MPI_Initialized(&initialized));
  if (initialized) return;
  DSV4_MPI_CHECK(MPI_Finalized(&finalized));
  DSV4_CHECK(!finalized, "MpiRuntime: MPI was already finalised in this process");
  int provided = MPI_THREAD_SINGLE;
  DSV4_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  owns_ = true;
  if (provided < MPI_THREAD_FUNNELED) {
    MPI_Finalize();
    owns_ = false;
    DSV4_FAIL("MpiRuntime: the MPI library provides thread level {} below MPI_THREAD_FUNNELED", provided);
  }
}

MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

std::unique_ptr<Communicator> mpi_world() {
  int initialized = 0, finalized = 0;
  DSV4_MPI_CHECK(MPI_Initialized(&initialized));
  DSV4_MPI_CHECK(MPI_Finalized(&finalized));
  DSV4_CHECK(initialized && !finalized, "mpi_world(): MPI is not initialised (create a dsv4::MpiRuntime first)");
  MPI_Comm dup = MPI_COMM_NULL;
  DSV4_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  auto comm = std::make_unique<MpiCommunicator>(dup, "world");
  if (const char* env = std::getenv("DSV4_COMM_CHECK"); env && *env && std::strcmp(env, "0") != 0)
    comm->set_cross_rank_checks(true);
  return comm;
}

}  // namespace dsv4
