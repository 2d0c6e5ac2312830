// Helpers of the GPU suite: a fixture that skips without a GPU, random tensors and comparisons of a
// CUDA result with the CPU reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace dsv4::gputest {

inline const Device kGpu = Device::cuda(0);
inline const Device kCpu = Device::cpu();

// Every test that needs a GPU derives from this: it skips (not fails) when none is visible.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible";
  }
};

inline std::mt19937& rng() {
  static std::mt19937 gen(1234);
  return gen;
}

inline std::vector<float> uniform(int64_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng());
  return v;
}

// CPU tensor of uniform values in [lo, hi), stored in `dtype` (rounded by the exact conversion).
inline Tensor rand_cpu(const Shape& shape, float lo = -1.0f, float hi = 1.0f, DType dtype = DType::F32) {
  return Tensor::from_floats(shape, uniform(shape.numel(), lo, hi), dtype);
}

inline Tensor rand_index(const Shape& shape, int64_t bound, DType dtype = DType::I64) {
  std::uniform_int_distribution<int64_t> d(0, bound - 1);
  std::vector<int64_t> v(static_cast<size_t>(shape.numel()));
  for (auto& x : v) x = d(rng());
  Tensor t = Tensor::from_vector<int64_t>(shape, v);
  return dtype == DType::I64 ? t : t.to(dtype);
}

// Contiguous host bytes of a tensor (any device, any layout).
inline std::vector<uint8_t> host_bytes(const Tensor& t) {
  const Tensor h = t.to(kCpu).contiguous();
  std::vector<uint8_t> b(static_cast<size_t>(h.nbytes()));
  if (!b.empty()) std::memcpy(b.data(), h.raw_data(), b.size());
  return b;
}

// Bitwise equality of shape, dtype and contents.
inline void expect_same_bits(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  ASSERT_EQ(got.dtype(), want.dtype()) << what;
  const auto g = host_bytes(got), w = host_bytes(want);
  ASSERT_EQ(g.size(), w.size()) << what;
  size_t mismatches = 0, first = 0;
  for (size_t i = 0; i < g.size(); ++i)
    if (g[i] != w[i] && mismatches++ == 0) first = i;
  EXPECT_EQ(mismatches, 0u) << what << ": " << mismatches << " differing bytes, first at byte " << first << " (got "
                            << int(g[first]) << ", want " << int(w[first]) << ")";
}

// |got - want| <= atol + rtol * |want| element by element (NaN matches NaN, infinities must be equal).
inline void expect_close(const Tensor& got, const Tensor& want, double rtol, double atol, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const auto g = got.to_floats(), w = want.to_floats();
  size_t bad = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double gi = g[i], wi = w[i];
    bool ok;
    if (std::isnan(wi) || std::isnan(gi))
      ok = std::isnan(wi) && std::isnan(gi);
    else if (std::isinf(wi) || std::isinf(gi))
      ok = gi == wi;
    else
      ok = std::fabs(gi - wi) <= atol + rtol * std::fabs(wi);
    if (!ok && bad++ < 5)
      ADD_FAILURE() << what << ": element " << i << " got " << gi << " want " << wi << " (diff " << gi - wi
                    << ", rtol " << rtol << ", atol " << atol << ")";
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << g.size() << " elements out of tolerance";
}

// Per-element tolerance: |got - want| <= tol[i].
inline void expect_within(const Tensor& got, const Tensor& want, const std::vector<float>& tol,
                          const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const auto g = got.to_floats(), w = want.to_floats();
  ASSERT_EQ(tol.size(), g.size()) << what;
  size_t bad = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const bool ok = std::isnan(w[i]) ? std::isnan(g[i]) : std::fabs(double(g[i]) - double(w[i])) <= tol[i];
    if (!ok && bad++ < 5)
      ADD_FAILURE() << what << ": element " << i << " got " << g[i] << " want " << w[i] << " (tolerance " << tol[i]
                    << ")";
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << g.size() << " elements out of tolerance";
}

// One BF16 unit in the last place relative to the value: results computed in FP32 and rounded once may
// differ by this much between backends whose FP32 intermediates differ in the last bits.
inline constexpr double kBf16Rtol = 1.0 / 128.0;

// |got - ref| <= rtol * max|ref| element-wise (host vectors, e.g. a kernel against a CPU reference run in double);
// returns the largest |got - ref| / max|ref| seen.
inline double expect_close_scaled(const std::vector<double>& got, const std::vector<double>& ref, double rtol,
                                  const std::string& what) {
  EXPECT_EQ(got.size(), ref.size()) << what;
  if (got.size() != ref.size()) return 0.0;
  double mx = 0.0;
  for (double r : ref) mx = std::max(mx, std::fabs(r));
  const double atol = rtol * std::max(mx, 1e-30);
  size_t bad = 0;
  double worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(got[i] - ref[i]);
    worst = std::max(worst, e / std::max(mx, 1e-30));
    if (!(e <= atol) && bad++ < 5)
      ADD_FAILURE() << what << ": element " << i << " got " << got[i] << " want " << ref[i] << " (|diff| " << e
                    << " > " << atol << " = " << rtol << " * max|ref|)";
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements out of tolerance";
  return worst;
}

}  // namespace dsv4::gputest
