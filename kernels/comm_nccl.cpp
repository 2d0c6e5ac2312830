// NCCL backend of dsv4::Communicator for CUDA tensors (see runtime/comm.h). Compiled only when dsv4 is
// built with CUDA and NCCL was found.
//
// Every collective is enqueued on dsv4::cuda::current_stream(device) with the communicator's device made
// current for the call; they return before the GPU work completes. Host-side pieces (exchange_counts,
// barrier, the cross-rank argument checks) go through a private MPI sub-communicator over the same ranks,
// split from the bootstrap communicator.
#if defined(DSV4_WITH_NCCL)

#include <nccl.h>

#include <cstring>
#include <utility>

#include "kernels/cuda_check.cuh"  // first: CUDA_CHECK / NCCL_CHECK, fmt usable under nvcc
#include "kernels/cuda_runtime_api.h"
#include "runtime/comm.h"

namespace dsv4 {
namespace {

// Makes `device` current for a scope and restores the previous device.
class NcclDeviceGuard {
 public:
  explicit NcclDeviceGuard(int device) {
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) CUDA_CHECK(cudaSetDevice(device));
  }
  ~NcclDeviceGuard() { (void)cudaSetDevice(previous_); }
  NcclDeviceGuard(const NcclDeviceGuard&) = delete;
  NcclDeviceGuard& operator=(const NcclDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

bool nccl_reduce_type(DType t, ncclDataType_t* out) {
  switch (t) {
    case DType::F32:
      *out = ncclFloat32;
      return true;
    case DType::BF16:
      *out = ncclBfloat16;
      return true;
    case DType::F16:
      *out = ncclFloat16;
      return true;
    case DType::I32:
      *out = ncclInt32;
      return true;
    case DType::I64:
      *out = ncclInt64;
      return true;
    case DType::I8:
      *out = ncclInt8;
      return true;
    case DType::U8:
      *out = ncclUint8;
      return true;
    default:
      return false;
  }
}
ncclRedOp_t nccl_op(CommReduce op) { return op == CommReduce::Sum ? ncclSum : ncclMax; }

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int device, std::unique_ptr<Communicator> host, std::string label)
      : comm_(comm), device_(device), host_(std::move(host)), label_(std::move(label)) {
    int nccl_rank = -1, nccl_size = -1;
    NCCL_CHECK(ncclCommUserRank(comm_, &nccl_rank));
    NCCL_CHECK(ncclCommCount(comm_, &nccl_size));
    DSV4_CHECK(nccl_rank == host_->rank() && nccl_size == host_->size(),
               "nccl communicator {}: NCCL rank {}/{} does not match the host group's rank {}/{}", label_, nccl_rank,
               nccl_size, host_->rank(), host_->size());
  }
  ~NcclCommunicator() override {
    if (comm_ == nullptr) return;
    int previous = 0;
    const bool restore = cudaGetDevice(&previous) == cudaSuccess;
    (void)cudaSetDevice(device_);
    (void)ncclCommDestroy(comm_);
    if (restore) (void)cudaSetDevice(previous);
  }

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  std::string name() const override { return "nccl:" + label_; }
  Device device() const override { return Device::cuda(device_); }

 protected:
  bool supports_reduce(DType t, CommReduce) const override {
    ncclDataType_t unused;
    return nccl_reduce_type(t, &unused);
  }
  std::string supported_reduce_dtypes() const override { return "F32, BF16, F16, I32, I64, I8, U8"; }

  void do_all_reduce(Tensor& x, CommReduce op) const override {
    ncclDataType_t t;
    nccl_reduce_type(x.dtype(), &t);
    NcclDeviceGuard guard(device_);
    NCCL_CHECK(
        ncclAllReduce(x.raw_data(), x.raw_data(), static_cast<size_t>(x.numel()), t, nccl_op(op), comm_, stream()));
  }

  void do_reduce_scatter(const Tensor& in, Tensor& out, CommReduce op) const override {
    ncclDataType_t t;
    nccl_reduce_type(in.dtype(), &t);
    NcclDeviceGuard guard(device_);
    NCCL_CHECK(ncclReduceScatter(in.raw_data(), out.raw_data(), static_cast<size_t>(out.numel()), t, nccl_op(op), comm_,
                                 stream()));
  }

  void do_all_gather(const Tensor& in, Tensor& out) const override {
    NcclDeviceGuard guard(device_);
    NCCL_CHECK(
        ncclAllGather(in.raw_data(), out.raw_data(), static_cast<size_t>(in.nbytes()), ncclUint8, comm_, stream()));
  }

  void do_all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_bytes, Tensor& out,
                       const std::vector<int64_t>& recv_bytes) const override {
    const auto* src = static_cast<const char*>(in.raw_data());
    auto* dst = static_cast<char*>(out.raw_data());
    const int n = size();
    const cudaStream_t s = stream();
    NcclDeviceGuard guard(device_);
    NCCL_CHECK(ncclGroupStart());
    int64_t soff = 0, roff = 0;
    for (int p = 0; p < n; ++p) {
      const auto pi = static_cast<size_t>(p);
      if (send_bytes[pi] > 0)
        NCCL_CHECK(ncclSend(src + soff, static_cast<size_t>(send_bytes[pi]), ncclUint8, p, comm_, s));
      if (recv_bytes[pi] > 0)
        NCCL_CHECK(ncclRecv(dst + roff, static_cast<size_t>(recv_bytes[pi]), ncclUint8, p, comm_, s));
      soff += send_bytes[pi];
      roff += recv_bytes[pi];
    }
    NCCL_CHECK(ncclGroupEnd());
  }

  std::vector<int64_t> do_exchange_counts(const std::vector<int64_t>& send_counts) const override {
    return host_->exchange_counts(send_counts);
  }

  void do_broadcast(Tensor& x, int root) const override {
    NcclDeviceGuard guard(device_);
    NCCL_CHECK(
        ncclBroadcast(x.raw_data(), x.raw_data(), static_cast<size_t>(x.nbytes()), ncclUint8, root, comm_, stream()));
  }

  void do_barrier() const override {
    {
      NcclDeviceGuard guard(device_);
      CUDA_CHECK(cudaStreamSynchronize(stream()));
      ncclResult_t async = ncclSuccess;
      NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
      NCCL_CHECK(async);
    }
    host_->barrier();
  }

  std::unique_ptr<Communicator> do_split(int color, int key) const override {
    std::unique_ptr<Communicator> host = host_->split(color, key);  // same grouping and order as NCCL's
    ncclComm_t sub = nullptr;
    {
      NcclDeviceGuard guard(device_);
      NCCL_CHECK(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &sub, nullptr));
    }
    if (sub == nullptr) return nullptr;
    DSV4_CHECK(host != nullptr, "nccl split: NCCL made a group where the host split made none (color {})", color);
    return std::make_unique<NcclCommunicator>(sub, device_, std::move(host),
                                              fmt::format("{}/split({})", label_, color));
  }

  // min over ranks = -max(-v), through the host group's Max all-reduce of an I64 CPU tensor.
  void host_all_reduce_min(std::vector<int64_t>& v) const override {
    Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::I64);
    int64_t* p = t.data<int64_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = -v[i];
    host_->all_reduce(t, CommReduce::Max);
    for (size_t i = 0; i < v.size(); ++i) v[i] = -p[i];
  }

 private:
  cudaStream_t stream() const { return static_cast<cudaStream_t>(cuda::current_stream(device_)); }

  ncclComm_t comm_ = nullptr;
  int device_ = 0;
  std::unique_ptr<Communicator> host_;
  std::string label_;
};

}  // namespace

std::unique_ptr<Communicator> nccl_communicator(const Communicator& mpi_bootstrap, int device_index) {
  DSV4_CHECK(mpi_bootstrap.device().is_cpu(), "nccl_communicator: bootstrap {} must be a host (MPI) communicator",
             mpi_bootstrap.name());
  const int ndev = cuda::device_count();
  DSV4_CHECK(device_index >= 0 && device_index < ndev, "nccl_communicator: cuda:{} does not exist ({} visible)",
             device_index, ndev);
  // Private host group over the same ranks (same order), so the bootstrap may go away.
  std::unique_ptr<Communicator> host = mpi_bootstrap.split(0, mpi_bootstrap.rank());
  DSV4_CHECK(host != nullptr, "nccl_communicator: host split failed");
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (host->rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  Tensor id_bytes = Tensor::empty({static_cast<int64_t>(sizeof(id))}, DType::U8);
  std::memcpy(id_bytes.raw_data(), &id, sizeof(id));
  host->broadcast(id_bytes, 0);
  std::memcpy(&id, id_bytes.raw_data(), sizeof(id));
  ncclComm_t comm = nullptr;
  {
    NcclDeviceGuard guard(device_index);
    cuda::current_stream(device_index);  // creates the device's dsv4 stream before NCCL starts its threads
    NCCL_CHECK(ncclCommInitRank(&comm, host->size(), id, host->rank()));
  }
  std::string label = mpi_bootstrap.name();
  if (label.rfind("mpi:", 0) == 0) label = label.substr(4);
  auto result = std::make_unique<NcclCommunicator>(comm, device_index, std::move(host), std::move(label));
  result->set_cross_rank_checks(mpi_bootstrap.cross_rank_checks());
  return result;
}

}  // namespace dsv4

#endif  // DSV4_WITH_NCCL
