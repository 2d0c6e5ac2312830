// Helpers shared by the optimizer tests.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/model.h"
#include "runtime/tensor.h"

namespace dsv4::testing {

inline std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// The tiny model with a 64-token vocabulary (small embedding / head) for optimizer tests.
inline ModelConfig tiny_optim_cfg() {
  ModelConfig cfg = model_preset("tiny");
  cfg.vocab_size = 64;
  return cfg;
}

// Deterministic pseudo-gradients for step k (every trainable F32 param; layers.1.attn.attn_sink skipped on odd steps).
inline void set_pseudo_grads(Model& model, int k) {
  uint32_t seed = 1000u * static_cast<uint32_t>(k);
  model.visit([&](Param& p) {
    ++seed;
    if (!p.trainable || p.value.dtype() != DType::F32) return;
    if (k % 2 == 1 && p.name == "layers.1.attn.attn_sink") {
      p.grad = Tensor();
      return;
    }
    const std::vector<float> g = randn(static_cast<size_t>(p.value.numel()), seed, 0.1f);
    p.grad_buffer().copy_from(Tensor::from_floats(p.value.shape(), g));
  });
}

// max |a - b| / max |b|.
inline double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
}

// Eigen-decomposition of a symmetric n x n matrix (row-major, double) by cyclic Jacobi rotations.
// Returns eigenvalues; V (row-major, columns are eigenvectors) when requested.
inline std::vector<double> sym_eig(std::vector<double> A, int64_t n, std::vector<double>* V = nullptr) {
  std::vector<double> v(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i * n + i)] = 1.0;
  auto at = [&](int64_t i, int64_t j) -> double& { return A[static_cast<size_t>(i * n + j)]; };
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i + 1; j < n; ++j) off += at(i, j) * at(i, j);
    if (off < 1e-30) break;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) {
        if (std::abs(at(p, q)) < 1e-300) continue;
        const double theta = (at(q, q) - at(p, p)) / (2 * at(p, q));
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int64_t k = 0; k < n; ++k) {  // A <- J^T A J
          const double akp = at(k, p), akq = at(k, q);
          at(k, p) = c * akp - s * akq;
          at(k, q) = s * akp + c * akq;
        }
        for (int64_t k = 0; k < n; ++k) {
          const double apk = at(p, k), aqk = at(q, k);
          at(p, k) = c * apk - s * aqk;
          at(q, k) = s * apk + c * aqk;
        }
        for (int64_t k = 0; k < n; ++k) {
          const double vkp = v[static_cast<size_t>(k * n + p)], vkq = v[static_cast<size_t>(k * n + q)];
          v[static_cast<size_t>(k * n + p)] = c * vkp - s * vkq;
          v[static_cast<size_t>(k * n + q)] = s * vkp + c * vkq;
        }
      }
  }
  std::vector<double> ev(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ev[static_cast<size_t>(i)] = at(i, i);
  if (V) *V = v;
  return ev;
}

inline std::vector<float> floats(const Tensor& t) { return t.to_floats(); }

}  // namespace dsv4::testing
