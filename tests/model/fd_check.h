// Finite-difference gradient checks for tests.
//   fd_check_tensor: central differences on F32 tensors (for modules built on Tensor ops). Perturbs up to
//     `max_probes` entries of each input and compares with the analytic gradient; the loss is reduced in double.
//   fd_check_double: central differences in double precision for templated raw-pointer cores.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace dsv4::testing {

// Random F32 tensor with entries uniform in [-scale, scale].
inline Tensor random_tensor(const Shape& shape, std::mt19937& rng, float scale = 1.0f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (float& x : v) x = u(rng);
  return Tensor::from_floats(shape, v);
}

// I64 [n] token ids uniform in [0, vocab) from a seeded mt19937.
inline Tensor random_ids(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> u(0, vocab - 1);
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = u(rng);
  return Tensor::from_vector<int64_t>({n}, v);
}

// sum(a * b) in double for F32 tensors of equal shape (a projection of an output onto a fixed direction).
inline double dot(const Tensor& a, const Tensor& b) {
  const auto va = a.to_floats(), vb = b.to_floats();
  EXPECT_EQ(va.size(), vb.size());
  double s = 0;
  for (size_t i = 0; i < va.size() && i < vb.size(); ++i) s += static_cast<double>(va[i]) * vb[i];
  return s;
}

// Checks analytic[i] against (loss(x + h e_i) - loss(x - h e_i)) / 2h for probed entries of `x`
// (modified in place and restored). Passes when |fd - an| <= atol + rtol * max(|fd|, |an|) for every probe.
inline void fd_check_tensor(const std::string& what, Tensor& x, const Tensor& analytic,
                            const std::function<double()>& loss, double h, double atol, double rtol,
                            int max_probes = 24, uint32_t seed = 1) {
  ASSERT_EQ(x.shape(), analytic.shape()) << what;
  const auto an = analytic.to_floats();
  float* p = x.data<float>();
  std::mt19937 rng(seed);
  const int64_t n = x.numel();
  std::vector<int64_t> probes;
  if (n <= max_probes) {
    for (int64_t i = 0; i < n; ++i) probes.push_back(i);
  } else {
    std::uniform_int_distribution<int64_t> pick(0, n - 1);
    for (int i = 0; i < max_probes; ++i) probes.push_back(pick(rng));
  }
  int failures = 0;
  auto central = [&](int64_t i, double step) {
    const float saved = p[i];
    p[i] = saved + static_cast<float>(step);
    const double up = loss();
    p[i] = saved - static_cast<float>(step);
    const double down = loss();
    p[i] = saved;
    return (up - down) / (2 * step);
  };
  for (int64_t i : probes) {
    const double a = an[static_cast<size_t>(i)];
    auto agrees = [&](double fd) { return std::abs(fd - a) <= atol + rtol * std::max(std::abs(fd), std::abs(a)); };
    double fd = central(i, h);
    // A step that crosses a discrete switch (a top-k routing or indexer selection flips) makes the loss jump; the
    // gradient is only defined between switches, so such a probe is retried once with a step 8x smaller.
    if (!agrees(fd)) fd = central(i, h / 8);
    if (!agrees(fd) && failures++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: finite difference " << fd << " vs analytic " << a;
  }
  EXPECT_EQ(failures, 0) << what << ": " << failures << " of " << probes.size() << " probes disagree";
}

// Double-precision version over a raw vector: grad[i] vs central differences of loss().
inline void fd_check_double(const std::string& what, std::vector<double>& x, const std::vector<double>& grad,
                            const std::function<double()>& loss, double h = 1e-6, double tol = 1e-6) {
  ASSERT_EQ(x.size(), grad.size()) << what;
  int failures = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    const double fd = (up - down) / (2 * h);
    if (std::abs(fd - grad[i]) > tol * std::max(1.0, std::abs(fd)) && failures++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: finite difference " << fd << " vs analytic " << grad[i];
  }
  EXPECT_EQ(failures, 0) << what;
}

}  // namespace dsv4::testing
