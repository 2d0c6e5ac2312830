// Tensor: shapes, strides, views, copies, packed FP4 layout, CPU allocator accounting.
#include <gtest/gtest.h>

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace dsv4 {
namespace {

std::vector<float> iota(int64_t n, float start = 0.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = start + static_cast<float>(i);
  return v;
}

TEST(Shape, NumelStringAndEquality) {
  Shape s{2, 3, 4};
  EXPECT_EQ(s.ndim(), 3);
  EXPECT_EQ(s.numel(), 24);
  EXPECT_EQ(s.str(), "[2, 3, 4]");
  EXPECT_EQ(s, (Shape{2, 3, 4}));
  EXPECT_FALSE(s == (Shape{2, 3}));
  EXPECT_EQ(Shape{}.numel(), 1);
  EXPECT_EQ(contiguous_strides(s), (Shape{12, 4, 1}));
  Shape too_many;
  for (int i = 0; i < kMaxDims; ++i) too_many.push_back(1);
  EXPECT_THROW(too_many.push_back(1), Error);
}

TEST(Tensor, EmptyIsAlignedAndSized) {
  Tensor t = Tensor::empty({3, 5}, DType::BF16);
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.nbytes(), 30);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % kCpuAlignment, 0u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.str(), "BF16[3, 5] cpu");
  EXPECT_THROW(Tensor::empty({-1, 2}, DType::F32), Error);
}

TEST(Tensor, PackedFp4CountsLogicalElements) {
  Tensor t = Tensor::empty({4, 6}, DType::F4_E2M1);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 12);
  EXPECT_THROW(Tensor::empty({3, 5}, DType::F4_E2M1), Error);  // odd last dim cannot be packed
  // Row 2 starts at byte 6.
  Tensor row = t.select(0, 2);
  EXPECT_EQ(static_cast<uint8_t*>(row.raw_data()) - static_cast<uint8_t*>(t.raw_data()), 6);
  EXPECT_THROW(t.slice(1, 1, 3), Error);  // starts on an odd element
  EXPECT_THROW(t.select(1, 0), Error);    // single nibble
}

TEST(Tensor, FromVectorAndDataTypeChecks) {
  Tensor t = Tensor::from_vector<int32_t>({2, 2}, {1, 2, 3, 4});
  EXPECT_EQ(t.dtype(), DType::I32);
  EXPECT_EQ(t.data<int32_t>()[3], 4);
  EXPECT_THROW(t.data<float>(), Error);
  EXPECT_THROW(Tensor::from_vector<float>({2, 2}, {1.0f}), Error);
  EXPECT_EQ(Tensor::from_vector<int64_t>({1}, {int64_t{1} << 40}).item(), static_cast<double>(int64_t{1} << 40));
}

TEST(Tensor, ViewReshapeAndInference) {
  Tensor t = Tensor::from_floats({2, 3, 4}, iota(24));
  Tensor v = t.view({6, -1});
  EXPECT_EQ(v.shape(), (Shape{6, 4}));
  EXPECT_EQ(v.raw_data(), t.raw_data());  // shares storage
  EXPECT_THROW(t.view({5, -1}), Error);
  EXPECT_THROW(t.view({-1, -1}), Error);
  Tensor tr = t.transpose(0, 2);
  EXPECT_FALSE(tr.is_contiguous());
  EXPECT_THROW(tr.view({24}), Error);
  Tensor r = tr.reshape({24});  // copies
  EXPECT_TRUE(r.is_contiguous());
  EXPECT_NE(r.raw_data(), t.raw_data());
  // tr[k, j, i] = t[i, j, k] = 12 i + 4 j + k; flattened in tr order.
  const auto vals = r.to_floats();
  EXPECT_FLOAT_EQ(vals[1], 12.0f);  // (k=0, j=0, i=1)
  EXPECT_FLOAT_EQ(vals[2], 4.0f);   // (k=0, j=1, i=0)
  EXPECT_FLOAT_EQ(vals[6], 1.0f);   // (k=1, j=0, i=0)
}

TEST(Tensor, SliceSelectUnsqueeze) {
  Tensor t = Tensor::from_floats({3, 4}, iota(12));
  Tensor s = t.slice(1, 1, 3);  // columns 1, 2
  EXPECT_EQ(s.shape(), (Shape{3, 2}));
  EXPECT_FALSE(s.is_contiguous());
  EXPECT_EQ(s.contiguous().to_floats(), (std::vector<float>{1, 2, 5, 6, 9, 10}));
  Tensor row = t.select(0, 2);
  EXPECT_EQ(row.shape(), (Shape{4}));
  EXPECT_EQ(row.to_floats(), (std::vector<float>{8, 9, 10, 11}));
  Tensor col = t.select(-1, 3);
  EXPECT_EQ(col.to_floats(), (std::vector<float>{3, 7, 11}));
  EXPECT_THROW(t.slice(0, 2, 4), Error);
  EXPECT_THROW(t.select(0, 3), Error);
  EXPECT_THROW(t.select(2, 0), Error);
  Tensor u = t.unsqueeze(1);
  EXPECT_EQ(u.shape(), (Shape{3, 1, 4}));
  EXPECT_TRUE(u.is_contiguous());
  EXPECT_EQ(t.unsqueeze(-1).shape(), (Shape{3, 4, 1}));
  // Writes through a view reach the base tensor.
  float* p = static_cast<float*>(s.raw_data());
  p[0] = 100.0f;
  EXPECT_FLOAT_EQ(t.data<float>()[1], 100.0f);
}

TEST(Tensor, CloneConvertAndCopyFrom) {
  Tensor t = Tensor::from_floats({2, 2}, {1.0f, 2.5f, -3.0f, 1e-3f});
  Tensor c = t.clone();
  c.data<float>()[0] = 7.0f;
  EXPECT_FLOAT_EQ(t.data<float>()[0], 1.0f);
  Tensor b = t.to(DType::BF16);
  EXPECT_EQ(b.dtype(), DType::BF16);
  EXPECT_EQ(b.data_u16()[1], 0x4020);  // 2.5 in bf16
  EXPECT_FLOAT_EQ(b.to_floats()[3], round_bf16(1e-3f));
  Tensor dst = Tensor::empty({2, 2}, DType::F32);
  dst.copy_from(b);  // converting copy
  EXPECT_EQ(dst.to_floats(), b.to_floats());
  EXPECT_THROW(dst.copy_from(Tensor::empty({4}, DType::F32)), Error);
  EXPECT_TRUE(t.to(DType::F32).raw_data() == t.raw_data());
}

TEST(Tensor, CudaRequestsFailClearlyWithoutCuda) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is visible";
  try {
    Tensor::empty({2}, DType::F32, Device::cuda(0));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda:0"), std::string::npos) << e.what();
  }
}

TEST(CpuAllocator, TracksBytesAndPeak) {
  Allocator& a = allocator_for(Device::cpu());
  const AllocatorStats before = a.stats();
  a.reset_peak();
  {
    Tensor t = Tensor::empty({1000}, DType::F32);
    const AllocatorStats during = a.stats();
    EXPECT_EQ(during.allocated_bytes - before.allocated_bytes, 4000);
    EXPECT_GE(during.peak_bytes, before.allocated_bytes + 4000);
    EXPECT_EQ(during.num_allocs - before.num_allocs, 1);
  }
  EXPECT_EQ(a.stats().allocated_bytes, before.allocated_bytes);
}

TEST(Error, MessageNamesExpressionFileAndLine) {
  try {
    const int heads = 6, groups = 4;
    DSV4_CHECK(heads % groups == 0, "heads ({}) must be divisible by o_groups ({})", heads, groups);
    FAIL();
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("test_tensor.cpp:"), std::string::npos) << what;
    EXPECT_NE(what.find("heads % groups == 0"), std::string::npos) << what;
    EXPECT_NE(what.find("heads (6) must be divisible by o_groups (4)"), std::string::npos) << what;
  }
}

TEST(DType, NamesRoundTrip) {
  for (int i = 0; i < kNumDTypes; ++i) {
    const auto t = static_cast<DType>(i);
    EXPECT_EQ(dtype_from_name(dtype_name(t)), t);
  }
  EXPECT_THROW(dtype_from_name("F64"), Error);
  EXPECT_EQ(dtype_nbytes(DType::F4_E2M1, 3), 2);
  EXPECT_EQ(dtype_nbytes(DType::I64, 3), 24);
}

}  // namespace
}  // namespace dsv4

namespace dsv4 {
namespace {
TEST(Error, MessageAloneForUsers) {
  try {
    DSV4_CHECK(1 == 2, "config.yaml: 'optim.lr' must be a number");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.message(), "config.yaml: 'optim.lr' must be a number");
    EXPECT_NE(std::string(e.what()).find("1 == 2"), std::string::npos);
  }
}
}  // namespace
}  // namespace dsv4
