// CPU reference of the grouped expert GEMMs (runtime/grouped_gemm.h) against an independent FP64 evaluation of the
// definitions: forward, dgrad and wgrad (overwrite and accumulate), BF16 inputs equal to their exact F32 widening,
// empty experts, one row, all rows in one expert, E = 1 and E = 32, every output element written (NaN poison),
// offsets validation; the FP8 forward against runtime/fp8.h's fp8_gemm per expert, bit for bit.
// Tolerance of the FP32 reference against FP64: |got - exact| <= (L + 2) * 2^-24 * sum_l |a_l b_l| per element
// (L the summed length), the classical bound gamma_L for FP32 dot products in any order, FMA or not.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "runtime/error.h"
#include "runtime/fp8.h"
#include "runtime/grouped_gemm.h"
#include "runtime/ops.h"

namespace dsv4 {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Random non-zero values, |v| in [1/16, 1), random sign, exactly representable in BF16 (so F32 and BF16 copies hold
// the same numbers).
Tensor rand_nonzero(const Shape& shape, std::mt19937& gen) {
  std::uniform_real_distribution<float> mag(0.0625f, 1.0f);
  std::bernoulli_distribution neg(0.5);
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (auto& x : v) x = neg(gen) ? -mag(gen) : mag(gen);
  return Tensor::from_floats(shape, v, DType::BF16).to(DType::F32);
}

// An F32 tensor full of NaN: an output element the op fails to write stays NaN and fails the comparison.
Tensor poisoned(const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::F32);
  ops::fill(t, kNaN);
  return t;
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> o{0};
  for (int64_t c : counts) o.push_back(o.back() + c);
  return o;
}

struct Case {
  std::string name;
  int64_t N, K;
  std::vector<int64_t> counts;  // rows per expert
};

std::vector<Case> cases() {
  std::mt19937 gen(7);
  std::vector<int64_t> c32(32);
  std::uniform_int_distribution<int64_t> d(0, 9);
  for (auto& c : c32) c = d(gen) < 3 ? 0 : d(gen);  // about a third empty
  std::vector<int64_t> all_in_one(8, 0);
  all_in_one[5] = 37;
  std::vector<int64_t> one_token(6, 0);
  one_token[2] = 1;
  return {{"E=4 mixed", 33, 70, {3, 0, 5, 1}},
          {"E=32 random (empty experts)", 40, 129, c32},
          {"one token", 17, 200, one_token},
          {"all rows in one expert", 65, 31, all_in_one},
          {"E=1", 130, 257, {11}},
          {"E=3 all empty", 9, 12, {0, 0, 0}}};
}

// Exact (FP64) grouped products and sum |a b| from the F32 values.
struct Ref {
  std::vector<double> val, mag;
};
Ref ref_forward(const std::vector<float>& x, const std::vector<float>& W, const std::vector<int64_t>& off, int64_t N,
                int64_t K) {
  const int64_t T = off.back();
  Ref r{std::vector<double>(size_t(T * N)), std::vector<double>(size_t(T * N))};
  for (size_t e = 0; e + 1 < off.size(); ++e)
    for (int64_t t = off[e]; t < off[e + 1]; ++t)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0, m = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double p = double(x[size_t(t * K + k)]) * double(W[size_t((int64_t(e) * N + n) * K + k)]);
          s += p, m += std::fabs(p);
        }
        r.val[size_t(t * N + n)] = s, r.mag[size_t(t * N + n)] = m;
      }
  return r;
}
Ref ref_dgrad(const std::vector<float>& dy, const std::vector<float>& W, const std::vector<int64_t>& off, int64_t N,
              int64_t K) {
  const int64_t T = off.back();
  Ref r{std::vector<double>(size_t(T * K)), std::vector<double>(size_t(T * K))};
  for (size_t e = 0; e + 1 < off.size(); ++e)
    for (int64_t t = off[e]; t < off[e + 1]; ++t)
      for (int64_t k = 0; k < K; ++k) {
        double s = 0, m = 0;
        for (int64_t n = 0; n < N; ++n) {
          const double p = double(dy[size_t(t * N + n)]) * double(W[size_t((int64_t(e) * N + n) * K + k)]);
          s += p, m += std::fabs(p);
        }
        r.val[size_t(t * K + k)] = s, r.mag[size_t(t * K + k)] = m;
      }
  return r;
}
Ref ref_wgrad(const std::vector<float>& dy, const std::vector<float>& x, const std::vector<int64_t>& off, int64_t N,
              int64_t K) {
  const int64_t E = int64_t(off.size()) - 1;
  Ref r{std::vector<double>(size_t(E * N * K)), std::vector<double>(size_t(E * N * K))};
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        double s = 0, m = 0;
        for (int64_t t = off[size_t(e)]; t < off[size_t(e + 1)]; ++t) {
          const double p = double(dy[size_t(t * N + n)]) * double(x[size_t(t * K + k)]);
          s += p, m += std::fabs(p);
        }
        r.val[size_t((e * N + n) * K + k)] = s, r.mag[size_t((e * N + n) * K + k)] = m;
      }
  return r;
}

// got within (L + 2) 2^-24 sum|a b| (+ |base| 2^-24 for an accumulated base) of base + exact.
void expect_near(const Tensor& got_t, const Ref& r, int64_t L, const std::vector<float>* base, const std::string& what) {
  const std::vector<float> got = got_t.to_floats();
  ASSERT_EQ(got.size(), r.val.size()) << what;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double b = base ? double((*base)[i]) : 0.0;
    const double want = b + r.val[i];
    const double tol = double(L + 2) * std::ldexp(r.mag[i] + std::fabs(b), -24);
    if (!(std::fabs(double(got[i]) - want) <= tol) && bad++ < 5)
      ADD_FAILURE() << what << ": element " << i << " got " << got[i] << " want " << want << " (tol " << tol << ")";
  }
  EXPECT_EQ(bad, 0u) << what;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.raw_data(), y.raw_data(), size_t(x.nbytes())) == 0;
}

TEST(GroupedGemmCpu, ForwardDgradWgradMatchExactProducts) {
  std::mt19937 gen(11);
  for (const Case& cs : cases()) {
    const std::vector<int64_t> off = offsets_of(cs.counts);
    const int64_t E = int64_t(cs.counts.size()), T = off.back(), N = cs.N, K = cs.K;
    const Tensor x = rand_nonzero({T, K}, gen), W = rand_nonzero({E, N, K}, gen), dy = rand_nonzero({T, N}, gen);
    const auto xv = x.to_floats(), Wv = W.to_floats(), dyv = dy.to_floats();
    int64_t max_rows = 0;
    for (int64_t c : cs.counts) max_rows = std::max(max_rows, c);

    Tensor y = poisoned({T, N});
    grouped_gemm_forward(x, W, off, y);
    expect_near(y, ref_forward(xv, Wv, off, N, K), K, nullptr, cs.name + " forward");

    Tensor dx = poisoned({T, K});
    grouped_gemm_dgrad(dy, W, off, dx);
    expect_near(dx, ref_dgrad(dyv, Wv, off, N, K), N, nullptr, cs.name + " dgrad");

    const Ref rw = ref_wgrad(dyv, xv, off, N, K);
    Tensor dW = poisoned({E, N, K});
    grouped_gemm_wgrad(dy, x, off, dW, /*accumulate=*/false);
    expect_near(dW, rw, max_rows, nullptr, cs.name + " wgrad");  // empty experts: exact zeros

    const Tensor init = rand_nonzero({E, N, K}, gen);
    const auto initv = init.to_floats();
    Tensor acc = init.clone();
    grouped_gemm_wgrad(dy, x, off, acc, /*accumulate=*/true);
    expect_near(acc, rw, max_rows, &initv, cs.name + " wgrad accumulate");
    for (int64_t e = 0; e < E; ++e)
      if (cs.counts[size_t(e)] == 0)
        EXPECT_TRUE(same_bits(acc.select(0, e), init.select(0, e))) << cs.name << ": empty expert " << e << " touched";

    // BF16 inputs: widened exactly, so the same bits as the F32 inputs.
    const Tensor x16 = x.to(DType::BF16), W16 = W.to(DType::BF16), dy16 = dy.to(DType::BF16);
    EXPECT_TRUE(same_bits(grouped_matmul(x16, W16, off), y)) << cs.name;
    EXPECT_TRUE(same_bits(grouped_matmul_dgrad(dy16, W16, off), dx)) << cs.name;
    EXPECT_TRUE(same_bits(grouped_matmul_wgrad(dy16, x16, off), dW)) << cs.name;
  }
}

TEST(GroupedGemmCpu, RejectsBadArguments) {
  const Tensor x = Tensor::zeros({5, 8}, DType::F32), W = Tensor::zeros({2, 3, 8}, DType::F32);
  EXPECT_THROW(grouped_matmul(x, W, {0, 5}), Error);        // E + 1 entries
  EXPECT_THROW(grouped_matmul(x, W, {0, 3, 4}), Error);     // does not end at T
  EXPECT_THROW(grouped_matmul(x, W, {1, 3, 5}), Error);     // does not start at 0
  EXPECT_THROW(grouped_matmul(x, W, {0, 4, 3, 5}), Error);  // wrong count and decreasing
  EXPECT_THROW(grouped_matmul(x.to(DType::BF16), W, {0, 2, 5}), Error);  // mixed dtypes
  EXPECT_THROW(grouped_matmul(x, Tensor::zeros({2, 3, 7}, DType::F32), {0, 2, 5}), Error);  // K differs
  Tensor y = Tensor::zeros({5, 4}, DType::F32);
  EXPECT_THROW(grouped_gemm_forward(x, W, {0, 2, 5}, y), Error);  // wrong output shape
  Tensor dW = Tensor::zeros({2, 3, 8}, DType::BF16);
  EXPECT_THROW(grouped_gemm_wgrad(Tensor::zeros({5, 3}, DType::F32), x, {0, 2, 5}, dW, false), Error);  // F32 out only
}

TEST(GroupedGemmCpu, EmptySumsGiveZeros) {
  // K = 0 forward and N = 0 dgrad: the outputs are zeros (every element written).
  Tensor y = poisoned({4, 3});
  grouped_gemm_forward(Tensor::zeros({4, 0}, DType::F32), Tensor::zeros({2, 3, 0}, DType::F32), {0, 1, 4}, y);
  for (float v : y.to_floats()) EXPECT_EQ(v, 0.0f);
  Tensor dx = poisoned({4, 5});
  grouped_gemm_dgrad(Tensor::zeros({4, 0}, DType::F32), Tensor::zeros({2, 0, 5}, DType::F32), {0, 4, 4}, dx);
  for (float v : dx.to_floats()) EXPECT_EQ(v, 0.0f);
}

TEST(GroupedGemmCpu, Fp8ForwardIsFp8GemmPerExpert) {
  std::mt19937 gen(13);
  struct Fp8Case {
    int64_t N, K;
    std::vector<int64_t> counts;
  };
  const std::vector<Fp8Case> fcs = {{256, 384, {5, 0, 9, 4, 1}}, {130, 200, {0, 7, 0}}, {128, 128, {1}},
                                    {256, 256, {0, 0, 13, 0}}};
  for (const Fp8Case& cs : fcs)
    for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32}) {
      const std::vector<int64_t> off = offsets_of(cs.counts);
      const int64_t E = int64_t(cs.counts.size()), T = off.back();
      const Tensor x = rand_nonzero({T, cs.K}, gen), W = rand_nonzero({E, cs.N, cs.K}, gen);
      const Fp8Tensor xq = fp8_quantize_rows(x, sf);
      const Fp8ExpertWeights wq = fp8_quantize_expert_blocks(W, sf);
      for (int64_t e = 0; e < E; ++e) {
        const Fp8Tensor b = fp8_quantize_blocks(W.select(0, e), sf);
        ASSERT_TRUE(same_bits(wq.expert(e).q, b.q) && same_bits(wq.expert(e).scale, b.scale)) << "expert " << e;
      }
      Tensor y = poisoned({T, cs.N});
      grouped_fp8_gemm_forward(xq, wq, off, y);
      // Each expert's rows: fp8_gemm of the rows quantised on their own (a row's scales are its own).
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r0 = off[size_t(e)], r1 = off[size_t(e + 1)];
        if (r0 == r1) continue;
        const Tensor want = fp8_matmul(fp8_quantize_rows(x.slice(0, r0, r1), sf), wq.expert(e));
        EXPECT_TRUE(same_bits(y.slice(0, r0, r1).contiguous(), want)) << "expert " << e;
      }
      EXPECT_TRUE(same_bits(grouped_fp8_matmul(xq, wq, off, Fp8GemmImpl::Fallback), y));
    }
}

}  // namespace
}  // namespace dsv4
