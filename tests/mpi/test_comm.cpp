// Collectives of the MPI communicator against closed-form answers built from rank-valued inputs.
// Runs under mpirun with 1, 2 and 4 ranks; every collective runs with the default message size and with
// tiny MPI message limits (7 and 24 bytes) so the chunked large-count paths are exercised too.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/comm.h"

namespace dsv4 {
namespace {

// ---- helpers ----------------------------------------------------------------------------------------

template <typename T>
Tensor make(const Shape& shape, auto&& value_of_index) {
  Tensor t = Tensor::empty(shape, dtype_of<T>::value);
  T* p = t.data<T>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<T>(value_of_index(i));
  return t;
}
template <typename T>
std::vector<T> values(const Tensor& t) {
  const T* p = t.data<T>();
  return {p, p + t.numel()};
}
// BF16 / F16 tensors from and to floats with dtype.h's conversions (no tensor ops involved).
Tensor make_half(const Shape& shape, DType dt, auto&& value_of_index) {
  Tensor t = Tensor::empty(shape, dt);
  uint16_t* p = t.data_u16();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float v = static_cast<float>(value_of_index(i));
    p[i] = dt == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
  }
  return t;
}
std::vector<float> half_values(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  const uint16_t* p = t.data_u16();
  for (int64_t i = 0; i < t.numel(); ++i)
    v[static_cast<size_t>(i)] = t.dtype() == DType::BF16 ? bf16_to_f32(p[i]) : f16_to_f32(p[i]);
  return v;
}
Tensor zeros_f32(const Shape& shape) {
  return make<float>(shape, [](int64_t) { return 0; });
}
std::vector<uint8_t> bytes(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.raw_data());
  return {p, p + t.nbytes()};
}

// Error message of `f`, or "" when it does not throw dsv4::Error.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}
#define EXPECT_ERROR_CONTAINS(stmt, ...)                                                                            \
  do {                                                                                                              \
    const std::string msg_ = error_of([&] { stmt; });                                                               \
    EXPECT_FALSE(msg_.empty()) << #stmt " did not throw dsv4::Error";                                               \
    for (const char* part_ : {__VA_ARGS__})                                                                         \
      EXPECT_NE(msg_.find(part_), std::string::npos) << "message of " #stmt " lacks \"" << part_ << "\": " << msg_; \
  } while (0)

// The communicator is still in step on every rank (after an error, say).
void expect_in_step(const Communicator& c) {
  Tensor x = make<int32_t>({1}, [&](int64_t) { return 1; });
  c.all_reduce(x, CommReduce::Sum);
  EXPECT_EQ(values<int32_t>(x)[0], c.size());
  c.barrier();
}

int64_t tri(int64_t s) { return s * (s + 1) / 2; }  // 1 + 2 + ... + s

// Sets the MPI message limit for the duration of a test, restoring the default afterwards.
class Chunked : public testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override {
    saved_ = mpi_max_message_bytes();
    if (GetParam() > 0) set_mpi_max_message_bytes(GetParam());
    comm_ = mpi_world();
  }
  void TearDown() override {
    comm_.reset();
    set_mpi_max_message_bytes(saved_);
  }
  const Communicator& comm() const { return *comm_; }

 private:
  int64_t saved_ = 0;
  std::unique_ptr<Communicator> comm_;
};
INSTANTIATE_TEST_SUITE_P(MessageBytes, Chunked, testing::Values(int64_t{0}, int64_t{7}, int64_t{24}),
                         [](const testing::TestParamInfo<int64_t>& i) {
                           return i.param == 0 ? std::string("default") : "max" + std::to_string(i.param);
                         });

// ---- world --------------------------------------------------------------------------------------------

TEST(Comm, WorldMatchesMpi) {
  int r = -1, s = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  auto w = mpi_world();
  EXPECT_EQ(w->rank(), r);
  EXPECT_EQ(w->size(), s);
  EXPECT_EQ(w->name(), "mpi:world");
  EXPECT_EQ(w->device(), Device::cpu());
  EXPECT_EQ(comm_reduce_name(CommReduce::Sum), "sum");
  EXPECT_EQ(comm_reduce_name(CommReduce::Max), "max");
  EXPECT_EQ(mpi_max_message_bytes(), int64_t{1} << 30);
  EXPECT_THROW(set_mpi_max_message_bytes(0), Error);
  EXPECT_THROW(set_mpi_max_message_bytes(int64_t{INT_MAX} + 1), Error);
  w->barrier();
}

TEST(Comm, ExchangeCounts) {
  auto w = mpi_world();
  const int r = w->rank(), s = w->size();
  std::vector<int64_t> send(static_cast<size_t>(s));
  for (int p = 0; p < s; ++p) send[static_cast<size_t>(p)] = r * 10 + p;
  const std::vector<int64_t> recv = w->exchange_counts(send);
  ASSERT_EQ(static_cast<int>(recv.size()), s);
  for (int p = 0; p < s; ++p) EXPECT_EQ(recv[static_cast<size_t>(p)], p * 10 + r) << "from rank " << p;
}

// ---- all_reduce ---------------------------------------------------------------------------------------

TEST_P(Chunked, AllReduceF32) {
  const int64_t r = comm().rank(), s = comm().size();
  Tensor x = make<float>({5, 7}, [&](int64_t i) { return (r + 1) * i; });
  comm().all_reduce(x, CommReduce::Sum);
  auto v = values<float>(x);
  for (int64_t i = 0; i < 35; ++i) EXPECT_EQ(v[static_cast<size_t>(i)], static_cast<float>(i * tri(s))) << i;

  Tensor m = make<float>({37}, [&](int64_t i) { return (r + 1) * i; });
  comm().all_reduce(m, CommReduce::Max);
  v = values<float>(m);
  for (int64_t i = 0; i < 37; ++i) EXPECT_EQ(v[static_cast<size_t>(i)], static_cast<float>(s * i)) << i;

  Tensor neg = make<float>({9}, [&](int64_t i) { return -(r + 1) * (i + 1); });
  comm().all_reduce(neg, CommReduce::Max);
  v = values<float>(neg);
  for (int64_t i = 0; i < 9; ++i) EXPECT_EQ(v[static_cast<size_t>(i)], static_cast<float>(-(i + 1))) << i;

  Tensor scalar = make<float>({}, [&](int64_t) { return r + 0.5; });
  comm().all_reduce(scalar, CommReduce::Sum);
  EXPECT_EQ(values<float>(scalar)[0], static_cast<float>(tri(s - 1) + 0.5 * s));
}

TEST_P(Chunked, AllReduceIntegers) {
  const int64_t r = comm().rank(), s = comm().size();
  auto ia = [&](int64_t i) { return (r + 1) * i - 7 * r; };
  Tensor a = make<int32_t>({13}, ia), b = make<int32_t>({13}, ia);
  comm().all_reduce(a, CommReduce::Sum);
  comm().all_reduce(b, CommReduce::Max);
  for (int64_t i = 0; i < 13; ++i) {
    EXPECT_EQ(values<int32_t>(a)[static_cast<size_t>(i)], i * tri(s) - 7 * tri(s - 1)) << i;
    EXPECT_EQ(values<int32_t>(b)[static_cast<size_t>(i)], i + std::max<int64_t>(0, (s - 1) * (i - 7))) << i;
  }

  const int64_t big = int64_t{1} << 40;  // values beyond 2^40: exact only in 64-bit integer arithmetic
  auto ic = [&](int64_t i) { return 2 * big + r * big + i * (r + 1); };
  Tensor c = make<int64_t>({11}, ic), d = make<int64_t>({11}, ic);
  comm().all_reduce(c, CommReduce::Sum);
  comm().all_reduce(d, CommReduce::Max);
  for (int64_t i = 0; i < 11; ++i) {
    EXPECT_EQ(values<int64_t>(c)[static_cast<size_t>(i)], s * 2 * big + big * tri(s - 1) + i * tri(s)) << i;
    EXPECT_EQ(values<int64_t>(d)[static_cast<size_t>(i)], 2 * big + (s - 1) * big + i * s) << i;
  }

  auto ie = [&](int64_t i) { return r - 2 - i; };
  Tensor e = make<int8_t>({5}, ie), f = make<int8_t>({5}, ie);
  comm().all_reduce(e, CommReduce::Sum);
  comm().all_reduce(f, CommReduce::Max);
  for (int64_t i = 0; i < 5; ++i) {
    EXPECT_EQ(values<int8_t>(e)[static_cast<size_t>(i)], tri(s - 1) - s * (2 + i)) << i;
    EXPECT_EQ(values<int8_t>(f)[static_cast<size_t>(i)], s - 3 - i) << i;
  }
  auto ig = [&](int64_t i) { return r * 10 + i; };
  Tensor g = make<uint8_t>({5}, ig), h = make<uint8_t>({5}, ig);
  comm().all_reduce(g, CommReduce::Sum);
  comm().all_reduce(h, CommReduce::Max);
  for (int64_t i = 0; i < 5; ++i) {
    EXPECT_EQ(values<uint8_t>(g)[static_cast<size_t>(i)], 10 * tri(s - 1) + s * i) << i;
    EXPECT_EQ(values<uint8_t>(h)[static_cast<size_t>(i)], 10 * (s - 1) + i) << i;
  }
}

TEST_P(Chunked, AllReduceBf16AndF16) {
  const int64_t r = comm().rank(), s = comm().size();
  // Small integers are exact in BF16, so sum and max have closed forms.
  Tensor a = make_half({16}, DType::BF16, [&](int64_t i) { return (r + 1) * i; });
  Tensor b = make_half({16}, DType::BF16, [&](int64_t i) { return (r + 1) * i; });
  comm().all_reduce(a, CommReduce::Sum);
  comm().all_reduce(b, CommReduce::Max);
  for (int64_t i = 0; i < 16; ++i) {
    EXPECT_EQ(half_values(a)[static_cast<size_t>(i)], static_cast<float>(i * tri(s))) << i;
    EXPECT_EQ(half_values(b)[static_cast<size_t>(i)], static_cast<float>(i * s)) << i;
  }
  // The sum is formed in F32 and rounded to BF16 once: 256 + (s - 1) * 1 rounds to round_bf16(255 + s)
  // (260 at s = 4, whereas summing in BF16 step by step would stay at 256).
  Tensor once = make_half({3}, DType::BF16, [&](int64_t) { return r == 0 ? 256.0 : 1.0; });
  comm().all_reduce(once, CommReduce::Sum);
  for (float v : half_values(once)) EXPECT_EQ(v, round_bf16(static_cast<float>(255 + s)));

  Tensor h = make_half({2, 5}, DType::F16, [&](int64_t i) { return 0.5 * (r + 1) * i; });
  comm().all_reduce(h, CommReduce::Sum);
  for (int64_t i = 0; i < 10; ++i)
    EXPECT_EQ(half_values(h)[static_cast<size_t>(i)], 0.5f * static_cast<float>(i * tri(s)));
}

// ---- reduce_scatter -----------------------------------------------------------------------------------

TEST_P(Chunked, ReduceScatter) {
  const int64_t r = comm().rank(), s = comm().size();
  constexpr int64_t kRows = 2, kCols = 3, kBlock = kRows * kCols;
  // in[R, k] = (rank + 1) * (R * kCols + k); rank r receives rows [r * kRows, (r + 1) * kRows).
  auto expect_block = [&](auto got, auto fn) {
    for (int64_t j = 0; j < kBlock; ++j)
      EXPECT_EQ(got[static_cast<size_t>(j)], fn(r * kBlock + j)) << "element " << j << " of rank " << r << "'s block";
  };
  {
    Tensor in = make<float>({s * kRows, kCols}, [&](int64_t i) { return (r + 1) * i; });
    Tensor out = Tensor::empty({kRows, kCols}, DType::F32);
    comm().reduce_scatter(in, out, CommReduce::Sum);
    expect_block(values<float>(out), [&](int64_t g) { return static_cast<float>(g * tri(s)); });
    comm().reduce_scatter(in, out, CommReduce::Max);
    expect_block(values<float>(out), [&](int64_t g) { return static_cast<float>(g * s); });
  }
  {
    const int64_t big = int64_t{1} << 41;
    Tensor in = make<int64_t>({s * kRows, kCols}, [&](int64_t i) { return big + (r + 1) * i; });
    Tensor out = Tensor::empty({kRows, kCols}, DType::I64);
    comm().reduce_scatter(in, out, CommReduce::Sum);
    expect_block(values<int64_t>(out), [&](int64_t g) { return s * big + g * tri(s); });
  }
  {
    Tensor in = make<int32_t>({s * kRows, kCols}, [&](int64_t i) { return (r + 1) * i; });
    Tensor out = Tensor::empty({kRows, kCols}, DType::I32);
    comm().reduce_scatter(in, out, CommReduce::Max);
    expect_block(values<int32_t>(out), [&](int64_t g) { return static_cast<int32_t>(g * s); });
  }
  {
    Tensor in = make_half({s * kRows, kCols}, DType::BF16, [&](int64_t i) { return (r + 1) * i; });
    Tensor out = Tensor::empty({kRows, kCols}, DType::BF16);
    comm().reduce_scatter(in, out, CommReduce::Sum);  // at most 23 * 10: exact in BF16
    expect_block(half_values(out), [&](int64_t g) { return static_cast<float>(g * tri(s)); });
  }
  {  // 0-d out: in has one element per rank
    Tensor in = make<float>({s}, [&](int64_t i) { return (r + 1) * (i + 1); });
    Tensor out = Tensor::empty({}, DType::F32);
    comm().reduce_scatter(in, out, CommReduce::Sum);
    EXPECT_EQ(values<float>(out)[0], static_cast<float>((r + 1) * tri(s)));
  }
}

// ---- all_gather ---------------------------------------------------------------------------------------

TEST_P(Chunked, AllGather) {
  const int64_t r = comm().rank(), s = comm().size();
  {
    Tensor in = make<int32_t>({2, 3}, [&](int64_t i) { return r * 1000 + i; });
    Tensor out = Tensor::empty({s * 2, 3}, DType::I32);
    comm().all_gather(in, out);
    auto v = values<int32_t>(out);
    for (int64_t p = 0; p < s; ++p)
      for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(v[static_cast<size_t>(p * 6 + i)], p * 1000 + i) << p << "," << i;
  }
  {
    Tensor in = make_half({3}, DType::BF16, [&](int64_t i) { return r * 4 + i; });
    Tensor out = Tensor::empty({s * 3}, DType::BF16);
    comm().all_gather(in, out);
    auto v = half_values(out);
    for (int64_t p = 0; p < s; ++p)
      for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(v[static_cast<size_t>(p * 3 + i)], static_cast<float>(p * 4 + i));
  }
  {  // packed FP4 moves as bytes: [2, 4] elements = 4 bytes per rank
    Tensor in = Tensor::empty({2, 4}, DType::F4_E2M1);
    for (int64_t b = 0; b < 4; ++b) in.data_u8()[b] = static_cast<uint8_t>(r * 37 + b * 5);
    Tensor out = Tensor::empty({s * 2, 4}, DType::F4_E2M1);
    comm().all_gather(in, out);
    auto v = bytes(out);
    ASSERT_EQ(static_cast<int64_t>(v.size()), 4 * s);
    for (int64_t p = 0; p < s; ++p)
      for (int64_t b = 0; b < 4; ++b)
        EXPECT_EQ(v[static_cast<size_t>(p * 4 + b)], static_cast<uint8_t>(p * 37 + b * 5));
  }
  {  // 0-d in gathers into a 1-d out of size()
    Tensor in = make<int64_t>({}, [&](int64_t) { return r * 3 + (int64_t{1} << 42); });
    Tensor out = Tensor::empty({s}, DType::I64);
    comm().all_gather(in, out);
    for (int64_t p = 0; p < s; ++p) EXPECT_EQ(values<int64_t>(out)[static_cast<size_t>(p)], p * 3 + (int64_t{1} << 42));
  }
}

// ---- all_to_all_v -------------------------------------------------------------------------------------

// Rank r sends (r + p) % 3 rows to rank p (zero rows for some pairs); each row carries
// [source rank, row number within the block, destination rank], so the routing is checked exactly.
TEST_P(Chunked, AllToAllVUneven) {
  const int64_t r = comm().rank(), s = comm().size();
  std::vector<int64_t> send(static_cast<size_t>(s));
  for (int64_t p = 0; p < s; ++p) send[static_cast<size_t>(p)] = (r + p) % 3;
  const std::vector<int64_t> recv = comm().exchange_counts(send);
  int64_t total_send = 0, total_recv = 0;
  for (int64_t p = 0; p < s; ++p) {
    EXPECT_EQ(recv[static_cast<size_t>(p)], (p + r) % 3);
    total_send += send[static_cast<size_t>(p)];
    total_recv += recv[static_cast<size_t>(p)];
  }
  Tensor in = Tensor::empty({total_send, 3}, DType::I64);
  {
    int64_t* q = in.data<int64_t>();
    for (int64_t p = 0; p < s; ++p)
      for (int64_t j = 0; j < send[static_cast<size_t>(p)]; ++j) {
        *q++ = r;
        *q++ = j;
        *q++ = p;
      }
  }
  Tensor out = make<int64_t>({total_recv, 3}, [](int64_t) { return -1; });
  comm().all_to_all_v(in, send, out, recv);
  const int64_t* q = out.data<int64_t>();
  for (int64_t p = 0; p < s; ++p)
    for (int64_t j = 0; j < recv[static_cast<size_t>(p)]; ++j, q += 3) {
      EXPECT_EQ(q[0], p) << "source of row " << j << " from rank " << p;
      EXPECT_EQ(q[1], j) << "row number from rank " << p;
      EXPECT_EQ(q[2], r) << "destination of row " << j << " from rank " << p;
    }

  // The same routing with packed FP4 rows of 4 elements (2 bytes): byte 0 = source * 16 + destination,
  // byte 1 = row number.
  Tensor in4 = Tensor::empty({total_send, 4}, DType::F4_E2M1);
  {
    uint8_t* b = in4.data_u8();
    for (int64_t p = 0; p < s; ++p)
      for (int64_t j = 0; j < send[static_cast<size_t>(p)]; ++j) {
        *b++ = static_cast<uint8_t>(r * 16 + p);
        *b++ = static_cast<uint8_t>(j);
      }
  }
  Tensor out4 = Tensor::empty({total_recv, 4}, DType::F4_E2M1);
  comm().all_to_all_v(in4, send, out4, recv);
  const uint8_t* b = out4.data_u8();
  for (int64_t p = 0; p < s; ++p)
    for (int64_t j = 0; j < recv[static_cast<size_t>(p)]; ++j, b += 2) {
      EXPECT_EQ(b[0], static_cast<uint8_t>(p * 16 + r));
      EXPECT_EQ(b[1], static_cast<uint8_t>(j));
    }
}

TEST_P(Chunked, AllToAllVEmptyAndWideRows) {
  const int64_t r = comm().rank(), s = comm().size();
  // Nobody sends anything.
  std::vector<int64_t> zeros(static_cast<size_t>(s), 0);
  Tensor in0 = Tensor::empty({0, 5}, DType::F32), out0 = Tensor::empty({0, 5}, DType::F32);
  comm().all_to_all_v(in0, zeros, out0, comm().exchange_counts(zeros));
  // Everybody sends p + 1 rows of 13 bytes to rank p (pieces of 7 / 24 bytes cut through rows).
  std::vector<int64_t> send(static_cast<size_t>(s)), recv;
  int64_t total = 0;
  for (int64_t p = 0; p < s; ++p) total += send[static_cast<size_t>(p)] = p + 1;
  recv = comm().exchange_counts(send);
  for (int64_t p = 0; p < s; ++p) EXPECT_EQ(recv[static_cast<size_t>(p)], r + 1);
  Tensor in = Tensor::empty({total, 13}, DType::U8);
  {
    uint8_t* q = in.data_u8();
    for (int64_t p = 0; p < s; ++p)
      for (int64_t j = 0; j < p + 1; ++j)
        for (int64_t k = 0; k < 13; ++k) *q++ = static_cast<uint8_t>(r * 64 + p * 16 + j * 13 + k);
  }
  Tensor out = Tensor::empty({s * (r + 1), 13}, DType::U8);
  comm().all_to_all_v(in, send, out, recv);
  const uint8_t* q = out.data_u8();
  for (int64_t p = 0; p < s; ++p)
    for (int64_t j = 0; j < r + 1; ++j)
      for (int64_t k = 0; k < 13; ++k) EXPECT_EQ(*q++, static_cast<uint8_t>(p * 64 + r * 16 + j * 13 + k));
}

// ---- broadcast ----------------------------------------------------------------------------------------

TEST_P(Chunked, BroadcastFromLastRank) {
  const int64_t r = comm().rank(), s = comm().size();
  const int root = static_cast<int>(s - 1);  // non-zero whenever there is more than one rank
  Tensor x = make<float>({4, 3}, [&](int64_t i) { return r * 100 + i; });
  comm().broadcast(x, root);
  for (int64_t i = 0; i < 12; ++i)
    EXPECT_EQ(values<float>(x)[static_cast<size_t>(i)], static_cast<float>(root * 100 + i));

  Tensor y = make<int64_t>({5}, [&](int64_t i) { return (r << 40) + i; });
  comm().broadcast(y, root);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(values<int64_t>(y)[static_cast<size_t>(i)], (int64_t{root} << 40) + i);

  Tensor z = make_half({6}, DType::BF16, [&](int64_t i) { return r - i; });
  comm().broadcast(z, 0);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(half_values(z)[static_cast<size_t>(i)], static_cast<float>(-i));

  Tensor f4 = Tensor::empty({3, 6}, DType::F4_E2M1);  // 9 bytes
  for (int64_t b = 0; b < 9; ++b) f4.data_u8()[b] = static_cast<uint8_t>(r * 50 + b);
  comm().broadcast(f4, root);
  for (int64_t b = 0; b < 9; ++b) EXPECT_EQ(f4.data_u8()[b], static_cast<uint8_t>(root * 50 + b));
}

// ---- split --------------------------------------------------------------------------------------------

TEST_P(Chunked, SplitEvenOdd) {
  const int r = comm().rank(), s = comm().size();
  // Even and odd ranks; key -rank orders each group by descending world rank.
  auto sub = comm().split(r % 2, -r);
  ASSERT_NE(sub, nullptr);
  std::vector<int> members;  // world ranks of my group in sub-rank order
  for (int p = s - 1; p >= 0; --p)
    if (p % 2 == r % 2) members.push_back(p);
  const int expected_rank = static_cast<int>(std::find(members.begin(), members.end(), r) - members.begin());
  EXPECT_EQ(sub->size(), static_cast<int>(members.size()));
  EXPECT_EQ(sub->rank(), expected_rank);
  EXPECT_NE(sub->name().find("split"), std::string::npos) << sub->name();

  Tensor sum = make<int64_t>({2}, [&](int64_t i) { return r + i; });
  sub->all_reduce(sum, CommReduce::Sum);
  int64_t member_sum = 0;
  for (int p : members) member_sum += p;
  EXPECT_EQ(values<int64_t>(sum)[0], member_sum);
  EXPECT_EQ(values<int64_t>(sum)[1], member_sum + sub->size());

  Tensor mine = make<int32_t>({1}, [&](int64_t) { return r; });
  Tensor all = Tensor::empty({sub->size()}, DType::I32);
  sub->all_gather(mine, all);
  for (int i = 0; i < sub->size(); ++i)
    EXPECT_EQ(values<int32_t>(all)[static_cast<size_t>(i)], members[static_cast<size_t>(i)]);

  // One row [world rank] to every group member.
  std::vector<int64_t> ones(static_cast<size_t>(sub->size()), 1);
  Tensor in = make<int64_t>({sub->size(), 1}, [&](int64_t) { return r; });
  Tensor out = Tensor::empty({sub->size(), 1}, DType::I64);
  sub->all_to_all_v(in, ones, out, sub->exchange_counts(ones));
  for (int i = 0; i < sub->size(); ++i)
    EXPECT_EQ(values<int64_t>(out)[static_cast<size_t>(i)], members[static_cast<size_t>(i)]);

  Tensor b = make<int32_t>({3}, [&](int64_t i) { return r * 10 + i; });
  sub->broadcast(b, sub->size() - 1);  // the smallest world rank of the group
  for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(values<int32_t>(b)[static_cast<size_t>(i)], members.back() * 10 + i);

  // Nested split: everyone in the group again, in the same order.
  auto again = sub->split(0, sub->rank());
  ASSERT_NE(again, nullptr);
  EXPECT_EQ(again->size(), sub->size());
  EXPECT_EQ(again->rank(), sub->rank());
  expect_in_step(*again);
  sub->barrier();
}

TEST(Comm, SplitNegativeColorLeavesRankOut) {
  auto w = mpi_world();
  const int r = w->rank(), s = w->size();
  auto sub = w->split(r == 0 ? -1 : 7, r);
  if (r == 0) {
    EXPECT_EQ(sub, nullptr);
  } else {
    ASSERT_NE(sub, nullptr);
    EXPECT_EQ(sub->size(), s - 1);
    EXPECT_EQ(sub->rank(), r - 1);
    expect_in_step(*sub);
  }
  expect_in_step(*w);
}

// Groups of one rank: every collective is the identity / a copy.
TEST_P(Chunked, SizeOneIsIdentity) {
  const int r = comm().rank();
  auto self = comm().split(r, 0);
  ASSERT_NE(self, nullptr);
  ASSERT_EQ(self->size(), 1);
  ASSERT_EQ(self->rank(), 0);
  Tensor x = make<float>({2, 3}, [&](int64_t i) { return r + i * 0.25; });
  const std::vector<float> x0 = values<float>(x);
  self->all_reduce(x, CommReduce::Sum);
  EXPECT_EQ(values<float>(x), x0);
  self->all_reduce(x, CommReduce::Max);
  EXPECT_EQ(values<float>(x), x0);
  Tensor y = Tensor::empty({2, 3}, DType::F32);
  self->reduce_scatter(x, y, CommReduce::Sum);
  EXPECT_EQ(values<float>(y), x0);
  Tensor z = Tensor::empty({2, 3}, DType::F32);
  self->all_gather(x, z);
  EXPECT_EQ(values<float>(z), x0);
  Tensor w = Tensor::empty({2, 3}, DType::F32);
  self->all_to_all_v(x, {2}, w, self->exchange_counts({2}));
  EXPECT_EQ(values<float>(w), x0);
  self->broadcast(x, 0);
  EXPECT_EQ(values<float>(x), x0);
  self->barrier();
}

// ---- errors -------------------------------------------------------------------------------------------

TEST(CommErrors, NonContiguousInputs) {
  auto w = mpi_world();
  const int64_t s = w->size();
  Tensor base = make<float>({2, 3}, [](int64_t i) { return i; });
  Tensor t = base.transpose(0, 1);
  ASSERT_FALSE(t.is_contiguous());
  EXPECT_ERROR_CONTAINS(w->all_reduce(t, CommReduce::Sum), "all_reduce", "x must be contiguous", "F32[3, 2]");
  EXPECT_ERROR_CONTAINS(w->broadcast(t, 0), "broadcast", "contiguous");
  Tensor gathered = Tensor::empty({3, 2 * s}, DType::F32);
  Tensor strided_out = gathered.transpose(0, 1);  // [2s, 3], not contiguous
  Tensor in = Tensor::empty({2, 3}, DType::F32);
  EXPECT_ERROR_CONTAINS(w->all_gather(in, strided_out), "all_gather", "out must be contiguous");
  Tensor rs_in = Tensor::empty({3, 2 * s}, DType::F32).transpose(0, 1);
  EXPECT_ERROR_CONTAINS(w->reduce_scatter(rs_in, in, CommReduce::Sum), "reduce_scatter", "in must be contiguous");
  std::vector<int64_t> counts(static_cast<size_t>(s), 0);
  counts[static_cast<size_t>(w->rank())] = 3;
  Tensor out = Tensor::empty({3, 2}, DType::F32);
  EXPECT_ERROR_CONTAINS(w->all_to_all_v(t, counts, out, counts), "all_to_all_v", "in must be contiguous");
  Tensor undefined;
  EXPECT_ERROR_CONTAINS(w->all_reduce(undefined, CommReduce::Sum), "all_reduce", "undefined");
  expect_in_step(*w);
}

TEST(CommErrors, ShapeDtypeAndCountMismatches) {
  auto w = mpi_world();
  const int64_t s = w->size();
  const int r = w->rank();
  Tensor out = Tensor::empty({2, 3}, DType::F32);
  Tensor wrong_rows = Tensor::empty({s * 2 + 1, 3}, DType::F32);
  EXPECT_ERROR_CONTAINS(w->reduce_scatter(wrong_rows, out, CommReduce::Sum), "reduce_scatter", "group size");
  Tensor wrong_cols = Tensor::empty({s * 2, 4}, DType::F32);
  EXPECT_ERROR_CONTAINS(w->reduce_scatter(wrong_cols, out, CommReduce::Sum), "reduce_scatter", "group size");
  Tensor wrong_dtype = Tensor::empty({s * 2, 3}, DType::I32);
  EXPECT_ERROR_CONTAINS(w->reduce_scatter(wrong_dtype, out, CommReduce::Sum), "reduce_scatter", "dtypes must match");
  Tensor gathered = Tensor::empty({s * 2 + 2, 3}, DType::F32);
  EXPECT_ERROR_CONTAINS(w->all_gather(out, gathered), "all_gather", "group size");

  Tensor f8 = Tensor::empty({4}, DType::F8_E4M3);
  EXPECT_ERROR_CONTAINS(w->all_reduce(f8, CommReduce::Sum), "all_reduce", "not supported", "F8_E4M3");
  Tensor f4 = Tensor::empty({4}, DType::F4_E2M1);
  EXPECT_ERROR_CONTAINS(w->all_reduce(f4, CommReduce::Max), "all_reduce", "not supported");

  // Overlapping in / out.
  Tensor whole = Tensor::empty({s * 2 + 2, 3}, DType::F32);
  Tensor view_in = whole.slice(0, 0, 2), view_out = whole.slice(0, 2, 2 + 2 * s);
  Tensor overlap_out = whole.slice(0, 1, 1 + 2 * s);
  EXPECT_ERROR_CONTAINS(w->all_gather(view_in, overlap_out), "all_gather", "overlap");
  if (s == 1) w->all_gather(view_in, view_out);  // adjacent, not overlapping: fine

  // all_to_all_v counts.
  std::vector<int64_t> ones(static_cast<size_t>(s), 1);
  Tensor in = Tensor::empty({s, 3}, DType::F32), a2a_out = Tensor::empty({s, 3}, DType::F32);
  EXPECT_ERROR_CONTAINS(w->all_to_all_v(in, std::vector<int64_t>(static_cast<size_t>(s + 1), 0), a2a_out, ones),
                        "all_to_all_v", "group size");
  std::vector<int64_t> more = ones;
  more[0] = 2;
  EXPECT_ERROR_CONTAINS(w->all_to_all_v(in, more, a2a_out, ones), "all_to_all_v", "send_rows", "sum to");
  EXPECT_ERROR_CONTAINS(w->all_to_all_v(in, ones, a2a_out, more), "all_to_all_v", "recv_rows", "sum to");
  std::vector<int64_t> neg = ones;
  neg[0] = -1;
  EXPECT_ERROR_CONTAINS(w->all_to_all_v(in, neg, a2a_out, ones), "all_to_all_v", "negative");
  Tensor narrow = Tensor::empty({s, 2}, DType::F32);
  EXPECT_ERROR_CONTAINS(w->all_to_all_v(in, ones, narrow, ones), "all_to_all_v", "every dim but dim 0");
  Tensor odd_fp4 = Tensor::empty({2}, DType::F4_E2M1), odd_fp4_out = Tensor::empty({2}, DType::F4_E2M1);
  std::vector<int64_t> self_two(static_cast<size_t>(s), 0);
  self_two[static_cast<size_t>(r)] = 2;
  EXPECT_ERROR_CONTAINS(w->all_to_all_v(odd_fp4, self_two, odd_fp4_out, self_two), "all_to_all_v", "whole bytes");
  EXPECT_ERROR_CONTAINS(w->exchange_counts(std::vector<int64_t>(static_cast<size_t>(s + 1), 0)), "exchange_counts");

  Tensor x = Tensor::empty({3}, DType::F32);
  EXPECT_ERROR_CONTAINS(w->broadcast(x, static_cast<int>(s)), "broadcast", "root");
  EXPECT_ERROR_CONTAINS(w->broadcast(x, -1), "broadcast", "root");
  expect_in_step(*w);
}

// With cross-rank checks on, arguments that disagree between ranks raise an Error on every rank.
TEST(CommErrors, CrossRankChecks) {
  auto w = mpi_world();
  w->set_cross_rank_checks(true);
  const int64_t r = w->rank(), s = w->size();
  // Correct calls still work, and split() inherits the setting.
  Tensor ok = make<int32_t>({4}, [&](int64_t i) { return r + i; });
  w->all_reduce(ok, CommReduce::Sum);
  EXPECT_EQ(values<int32_t>(ok)[1], tri(s - 1) + s);
  auto sub = w->split(0, static_cast<int>(r));
  EXPECT_TRUE(sub->cross_rank_checks());
  std::vector<int64_t> ones(static_cast<size_t>(s), 1);
  Tensor in = make<int64_t>({s}, [&](int64_t p) { return r * 100 + p; }), out = Tensor::empty({s}, DType::I64);
  w->all_to_all_v(in, ones, out, ones);
  for (int64_t p = 0; p < s; ++p) EXPECT_EQ(values<int64_t>(out)[static_cast<size_t>(p)], p * 100 + r);
  if (s == 1) return;

  // Element counts differ: rank 0 has 4 elements, the others 5.
  Tensor x = zeros_f32({r == 0 ? 4 : 5});
  EXPECT_ERROR_CONTAINS(w->all_reduce(x, CommReduce::Sum), "all_reduce", "differ", "numel");
  // Roots differ.
  EXPECT_ERROR_CONTAINS(w->broadcast(x = zeros_f32({5}), static_cast<int>(r % 2)), "broadcast", "differ", "root");
  // dtypes differ in all_gather.
  Tensor g_in = Tensor::empty({1}, r == 0 ? DType::I32 : DType::F32), g_out = Tensor::empty({s}, g_in.dtype());
  EXPECT_ERROR_CONTAINS(w->all_gather(g_in, g_out), "all_gather", "differ", "dtype");
  // A local error on the last rank only: every rank throws.
  Tensor base = zeros_f32({2, 3});
  Tensor y = r == s - 1 ? base.transpose(0, 1) : base;
  if (r == s - 1)
    EXPECT_ERROR_CONTAINS(w->all_reduce(y, CommReduce::Sum), "all_reduce", "contiguous");
  else
    EXPECT_ERROR_CONTAINS(w->all_reduce(y, CommReduce::Sum), "all_reduce", "another rank");
  // recv_rows that do not match what the peers send (locally consistent on rank 0).
  if (s >= 3) {
    std::vector<int64_t> recv = ones;
    if (r == 0) {
      recv[1] = 2;
      recv[2] = 0;
    }
    if (r == 0)
      EXPECT_ERROR_CONTAINS(w->all_to_all_v(in, ones, out, recv), "all_to_all_v", "expects recv_rows");
    else
      EXPECT_ERROR_CONTAINS(w->all_to_all_v(in, ones, out, recv), "all_to_all_v", "another rank");
  }
  expect_in_step(*w);
}

// ---- the harness itself (opt-in: DSV4_TEST_FAIL_RANK=k makes rank k fail, the run must exit non-zero) -----

TEST(CommHarness, FailOnChosenRank) {
  const char* env = std::getenv("DSV4_TEST_FAIL_RANK");
  if (!env || !*env) GTEST_SKIP() << "set DSV4_TEST_FAIL_RANK=k to check that rank k's failure fails the run";
  auto w = mpi_world();
  EXPECT_NE(w->rank(), std::atoi(env)) << "deliberate failure on rank " << w->rank();
}

// ---- really large counts (opt-in: DSV4_TEST_LARGE=1, needs ~5 GiB per rank) -----------------------------

TEST(CommLarge, MoreThanIntMaxElements) {
  const char* env = std::getenv("DSV4_TEST_LARGE");
  if (!env || std::strcmp(env, "1") != 0) GTEST_SKIP() << "set DSV4_TEST_LARGE=1 to run";
  auto w = mpi_world();
  const int64_t r = w->rank(), s = w->size();
  const int64_t n = int64_t{INT_MAX} + 77;
  Tensor x = Tensor::empty({n}, DType::U8);
  std::memset(x.raw_data(), static_cast<int>(r), static_cast<size_t>(n));
  x.data_u8()[n - 1] = static_cast<uint8_t>(100 + r);
  w->all_reduce(x, CommReduce::Max);
  EXPECT_EQ(x.data_u8()[0], s - 1);
  EXPECT_EQ(x.data_u8()[n - 2], s - 1);
  EXPECT_EQ(x.data_u8()[n - 1], 100 + s - 1);
  std::memset(x.raw_data(), static_cast<int>(r + 1), static_cast<size_t>(n));
  w->broadcast(x, static_cast<int>(s - 1));
  EXPECT_EQ(x.data_u8()[0], s);
  EXPECT_EQ(x.data_u8()[n - 1], s);
  // Each rank sends n / s + rank bytes-rows... to its right neighbour: a block of more than INT_MAX / s bytes.
  std::vector<int64_t> send(static_cast<size_t>(s), 0);
  const int64_t rows = n / s + r;
  send[static_cast<size_t>((r + 1) % s)] = rows;
  auto recv = w->exchange_counts(send);
  const int64_t in_rows = (n / s) + ((r + s - 1) % s);
  EXPECT_EQ(recv[static_cast<size_t>((r + s - 1) % s)], in_rows);
  Tensor in = x.slice(0, 0, rows);
  in.data_u8()[rows - 1] = static_cast<uint8_t>(200 + r);
  Tensor out = Tensor::empty({in_rows}, DType::U8);
  w->all_to_all_v(in, send, out, recv);
  EXPECT_EQ(out.data_u8()[0], s);
  EXPECT_EQ(out.data_u8()[in_rows - 1], 200 + (r + s - 1) % s);
}

}  // namespace
}  // namespace dsv4
