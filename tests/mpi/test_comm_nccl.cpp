// NCCL communicator (CUDA builds with NCCL only): the same closed-form checks as test_comm.cpp on GPU
// tensors. Rank r uses cuda:r; the tests skip when there are fewer visible GPUs than ranks (NCCL does not
// allow two ranks on one device) or when dsv4 was built without NCCL.
#include <gtest/gtest.h>

#if defined(DSV4_WITH_NCCL)

#include <string>
#include <vector>

#include "kernels/cuda_runtime_api.h"
#include "runtime/comm.h"

namespace dsv4 {
namespace {

template <typename T>
Tensor host(const Shape& shape, auto&& value_of_index) {
  Tensor t = Tensor::empty(shape, dtype_of<T>::value);
  T* p = t.data<T>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<T>(value_of_index(i));
  return t;
}
Tensor host_bf16(const Shape& shape, auto&& value_of_index) {
  Tensor t = Tensor::empty(shape, DType::BF16);
  for (int64_t i = 0; i < t.numel(); ++i) t.data_u16()[i] = f32_to_bf16(static_cast<float>(value_of_index(i)));
  return t;
}
Tensor to_gpu(const Tensor& t, int device) {
  Tensor g = Tensor::empty(t.shape(), t.dtype(), Device::cuda(device));
  cuda::memcpy_h2d(g.raw_data(), t.raw_data(), static_cast<size_t>(t.nbytes()), device);
  return g;
}
Tensor to_host(const Tensor& g) {
  Tensor t = Tensor::empty(g.shape(), g.dtype());
  cuda::memcpy_d2h(t.raw_data(), g.raw_data(), static_cast<size_t>(g.nbytes()), g.device().index);
  return t;
}
template <typename T>
std::vector<T> values(const Tensor& g) {
  Tensor t = to_host(g);
  const T* p = t.data<T>();
  return {p, p + t.numel()};
}
std::vector<float> bf16_values(const Tensor& g) {
  Tensor t = to_host(g);
  std::vector<float> v;
  for (int64_t i = 0; i < t.numel(); ++i) v.push_back(bf16_to_f32(t.data_u16()[i]));
  return v;
}
int64_t tri(int64_t s) { return s * (s + 1) / 2; }

class Nccl : public testing::Test {
 protected:
  void SetUp() override {
    world_ = mpi_world();
    const int ndev = cuda_device_count();
    if (ndev < world_->size()) GTEST_SKIP() << world_->size() << " ranks but " << ndev << " visible GPU(s)";
    dev_ = world_->rank();
    comm_ = nccl_communicator(*world_, dev_);
  }
  void TearDown() override {
    comm_.reset();
    world_.reset();
  }
  std::unique_ptr<Communicator> world_, comm_;
  int dev_ = 0;
};

TEST_F(Nccl, Identity) {
  EXPECT_EQ(comm_->rank(), world_->rank());
  EXPECT_EQ(comm_->size(), world_->size());
  EXPECT_EQ(comm_->device(), Device::cuda(dev_));
  EXPECT_EQ(comm_->name(), "nccl:world");
  comm_->barrier();
}

TEST_F(Nccl, AllReduce) {
  const int64_t r = comm_->rank(), s = comm_->size();
  Tensor x = to_gpu(host<float>({37}, [&](int64_t i) { return (r + 1) * i; }), dev_);
  comm_->all_reduce(x, CommReduce::Sum);
  auto v = values<float>(x);
  for (int64_t i = 0; i < 37; ++i) EXPECT_EQ(v[static_cast<size_t>(i)], static_cast<float>(i * tri(s)));
  Tensor m = to_gpu(host<int64_t>({5}, [&](int64_t i) { return (int64_t{1} << 41) + (r + 1) * i; }), dev_);
  comm_->all_reduce(m, CommReduce::Max);
  auto mv = values<int64_t>(m);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(mv[static_cast<size_t>(i)], (int64_t{1} << 41) + s * i);
  Tensor b = to_gpu(host_bf16({16}, [&](int64_t i) { return (r + 1) * i; }), dev_);
  comm_->all_reduce(b, CommReduce::Sum);
  auto bv = bf16_values(b);
  for (int64_t i = 0; i < 16; ++i) EXPECT_EQ(bv[static_cast<size_t>(i)], static_cast<float>(i * tri(s)));
}

TEST_F(Nccl, ReduceScatterAllGatherBroadcast) {
  const int64_t r = comm_->rank(), s = comm_->size();
  Tensor in = to_gpu(host<float>({s * 2, 3}, [&](int64_t i) { return (r + 1) * i; }), dev_);
  Tensor out = Tensor::empty({2, 3}, DType::F32, Device::cuda(dev_));
  comm_->reduce_scatter(in, out, CommReduce::Sum);
  auto v = values<float>(out);
  for (int64_t j = 0; j < 6; ++j) EXPECT_EQ(v[static_cast<size_t>(j)], static_cast<float>((r * 6 + j) * tri(s)));

  Tensor g_in = to_gpu(host<int32_t>({2, 3}, [&](int64_t i) { return r * 1000 + i; }), dev_);
  Tensor g_out = Tensor::empty({s * 2, 3}, DType::I32, Device::cuda(dev_));
  comm_->all_gather(g_in, g_out);
  auto g = values<int32_t>(g_out);
  for (int64_t p = 0; p < s; ++p)
    for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(g[static_cast<size_t>(p * 6 + i)], p * 1000 + i);

  const int root = static_cast<int>(s - 1);
  Tensor x = to_gpu(host<float>({4, 3}, [&](int64_t i) { return r * 100 + i; }), dev_);
  comm_->broadcast(x, root);
  auto xv = values<float>(x);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(xv[static_cast<size_t>(i)], static_cast<float>(root * 100 + i));
}

TEST_F(Nccl, AllToAllVUneven) {
  const int64_t r = comm_->rank(), s = comm_->size();
  std::vector<int64_t> send(static_cast<size_t>(s));
  int64_t ts = 0, tr = 0;
  for (int64_t p = 0; p < s; ++p) ts += send[static_cast<size_t>(p)] = (r + p) % 3;
  const std::vector<int64_t> recv = comm_->exchange_counts(send);
  for (int64_t c : recv) tr += c;
  Tensor in = Tensor::empty({ts, 3}, DType::I64);
  int64_t* q = in.data<int64_t>();
  for (int64_t p = 0; p < s; ++p)
    for (int64_t j = 0; j < send[static_cast<size_t>(p)]; ++j) {
      *q++ = r;
      *q++ = j;
      *q++ = p;
    }
  Tensor out = Tensor::empty({tr, 3}, DType::I64, Device::cuda(dev_));
  comm_->all_to_all_v(to_gpu(in, dev_), send, out, recv);
  auto v = values<int64_t>(out);
  size_t k = 0;
  for (int64_t p = 0; p < s; ++p)
    for (int64_t j = 0; j < recv[static_cast<size_t>(p)]; ++j, k += 3) {
      EXPECT_EQ(v[k], p);
      EXPECT_EQ(v[k + 1], j);
      EXPECT_EQ(v[k + 2], r);
    }
}

TEST_F(Nccl, SplitAndErrors) {
  const int r = comm_->rank();
  auto sub = comm_->split(r % 2, r);
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->device(), Device::cuda(dev_));
  Tensor x = to_gpu(host<int32_t>({1}, [&](int64_t) { return r; }), dev_);
  sub->all_reduce(x, CommReduce::Sum);
  int expected = 0;
  for (int p = 0; p < comm_->size(); ++p)
    if (p % 2 == r % 2) expected += p;
  EXPECT_EQ(values<int32_t>(x)[0], expected);
  sub->barrier();

  Tensor cpu = host<float>({3}, [](int64_t i) { return i; });
  try {
    comm_->all_reduce(cpu, CommReduce::Sum);
    ADD_FAILURE() << "a CPU tensor was accepted by the NCCL communicator";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("all_reduce: x is on cpu"), std::string::npos) << e.what();
  }
  comm_->barrier();
}

}  // namespace
}  // namespace dsv4

#else

TEST(Nccl, NotBuilt) { GTEST_SKIP() << "dsv4 was built without NCCL"; }

#endif
