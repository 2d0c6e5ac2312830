// Grouped expert GEMMs on the GPU (runtime/grouped_gemm.h, kernels/ops_grouped_gemm.cu) against the CPU twin
// (src/runtime/cpu_grouped_gemm.cpp), for both cuBLAS implementations (cublasGemmGroupedBatchedEx and the
// cublasGemmEx loop) and Auto:
//  * forward, dgrad, wgrad (overwrite and accumulate), BF16 and F32 inputs, F32 outputs;
//  * K and N not multiples of 128, empty experts, one token, all tokens in one expert, E = 1, E = 32, all empty;
//  * outputs poisoned with NaN before each run (an unwritten element fails), empty experts of an accumulated wgrad
//    left bit for bit untouched, of an overwritten wgrad exactly zero;
//  * the FP8 forward (1x128 activations x 128x128 expert weights): the fallback kernel bit for bit with the CPU
//    reference, the default path (cuBLASLt where it takes the rows, 128-multiple N and K) within test_gpu_fp8.cpp's
//    bound, and odd shapes (fallback only) bit for bit.
// Tolerances, per element, S = sum_l |a_l b_l| over the summed dimension (exact, from the inputs):
//   BF16 inputs  |gpu - cpu| <= 2^-14 S. Products of two BF16 values are exact in FP32; both sides sum them in FP32
//                in different orders (CPU BLAS vs tensor-core MMA chains and split-K), each within about
//                L 2^-24 S of the exact sum (L <= 384 here: 2^-15.4). 2^-14 leaves room for Hopper's MMA
//                accumulators, which align addends before adding (a few extra bits lost per chain).
//   F32 inputs   same bound (no TF32: CUBLAS_COMPUTE_32F with the default math mode).
//   accumulate   the bound plus 2^-23 |dW_old| (one more rounding of the sum with the old value).
//   FP8          |gpu - cpu| <= 2^-10 S of the dequantised operands, test_gpu_fp8.cpp's bound and reasoning.
// Each test prints the largest observed |gpu - cpu| / S. Every test skips without a GPU.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "runtime/fp8.h"
#include "runtime/grouped_gemm.h"

namespace dsv4::gputest {
namespace {

class GpuGroupedGemm : public GpuTest {};

constexpr double kBf16Bound = 1.0 / 16384.0;  // 2^-14
constexpr double kFp8Bound = 1.0 / 1024.0;    // 2^-10

// Random non-zero values (|v| in [1/16, 1), random sign) stored in `dtype`.
Tensor rand_nonzero(const Shape& shape, DType dtype) {
  std::vector<float> v = uniform(shape.numel(), 0.0625f, 1.0f);
  std::bernoulli_distribution neg(0.5);
  for (auto& x : v)
    if (neg(rng())) x = -x;
  return Tensor::from_floats(shape, v, DType::BF16).to(dtype);  // BF16-exact values in either dtype
}

Tensor poisoned(const Shape& shape, const Device& dev) {
  Tensor t = Tensor::empty(shape, DType::F32, dev);
  ops::fill(t, std::nan(""));
  return t;
}

Tensor abs_f32(const Tensor& t) {
  std::vector<float> v = t.to_floats();
  for (auto& x : v) x = std::fabs(x);
  return Tensor::from_floats(t.shape(), v);
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> o{0};
  for (int64_t c : counts) o.push_back(o.back() + c);
  return o;
}

struct Case {
  std::string name;
  int64_t N, K;
  std::vector<int64_t> counts;
};

std::vector<Case> bf16_cases() {
  std::mt19937 gen(5);
  std::vector<int64_t> c32(32);
  std::uniform_int_distribution<int64_t> d(0, 23);
  for (auto& c : c32) c = d(gen) < 8 ? 0 : d(gen);  // about a third empty
  std::vector<int64_t> all_in_one(16, 0), one_token(8, 0);
  all_in_one[9] = 301;
  one_token[3] = 1;
  return {{"E=32 random, N=200 K=333", 200, 333, c32},
          {"E=32 random, N=384 K=256", 384, 256, c32},
          {"one token, N=100 K=257", 100, 257, one_token},
          {"all rows in one expert, N=129 K=72", 129, 72, all_in_one},
          {"E=1, N=8 K=384", 8, 384, {77}},
          {"E=4 mixed, N=1 K=1", 1, 1, {2, 0, 3, 1}},
          {"E=5 all empty", 64, 64, {0, 0, 0, 0, 0}}};
}

// |got - want| <= bound * S + extra[i]; returns max |got - want| / S.
double check(const Tensor& got, const Tensor& want, const Tensor& S, double bound, const std::vector<float>* extra,
             const std::string& what) {
  const auto s = S.to_floats(), w = want.to_floats(), g = got.to_floats();
  std::vector<float> tol(s.size());
  double worst = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    tol[i] = static_cast<float>(bound * s[i] + (extra ? (*extra)[i] : 0.0f));
    if (s[i] > 0 && std::isfinite(g[i])) worst = std::max(worst, std::fabs(double(g[i]) - double(w[i])) / s[i]);
  }
  expect_within(got, want, tol, what);
  return worst;
}

TEST_F(GpuGroupedGemm, Bf16AndF32MatchCpuForBothCublasImpls) {
  double worst = 0;
  for (const Case& cs : bf16_cases())
    for (DType dt : {DType::BF16, DType::F32})
      for (GroupedGemmImpl impl : {GroupedGemmImpl::Grouped, GroupedGemmImpl::Loop, GroupedGemmImpl::Auto}) {
        if (dt == DType::BF16 && impl == GroupedGemmImpl::Grouped) continue;  // unsupported: see BF16GroupedThrows
        const std::vector<int64_t> off = offsets_of(cs.counts);
        const int64_t E = int64_t(cs.counts.size()), T = off.back(), N = cs.N, K = cs.K;
        const std::string what = fmt::format("{} {} {}", cs.name, dtype_name(dt), grouped_gemm_impl_name(impl));
        const Tensor x = rand_nonzero({T, K}, dt), W = rand_nonzero({E, N, K}, dt), dy = rand_nonzero({T, N}, dt);
        const Tensor xg = x.to(kGpu), Wg = W.to(kGpu), dyg = dy.to(kGpu);
        const Tensor ax = abs_f32(x), aW = abs_f32(W), ady = abs_f32(dy);

        Tensor y = poisoned({T, N}, kGpu);
        grouped_gemm_forward(xg, Wg, off, y, impl);
        worst = std::max(worst, check(y, grouped_matmul(x, W, off), grouped_matmul(ax, aW, off), kBf16Bound, nullptr,
                                      what + " forward"));

        Tensor dx = poisoned({T, K}, kGpu);
        grouped_gemm_dgrad(dyg, Wg, off, dx, impl);
        worst = std::max(worst, check(dx, grouped_matmul_dgrad(dy, W, off), grouped_matmul_dgrad(ady, aW, off),
                                      kBf16Bound, nullptr, what + " dgrad"));

        const Tensor S = grouped_matmul_wgrad(ady, ax, off);
        const Tensor want = grouped_matmul_wgrad(dy, x, off);
        Tensor dW = poisoned({E, N, K}, kGpu);
        grouped_gemm_wgrad(dyg, xg, off, dW, /*accumulate=*/false, impl);
        worst = std::max(worst, check(dW, want, S, kBf16Bound, nullptr, what + " wgrad"));
        for (int64_t e = 0; e < E; ++e)
          if (cs.counts[size_t(e)] == 0)
            for (float v : dW.select(0, e).to_floats()) ASSERT_EQ(v, 0.0f) << what << " wgrad: empty expert " << e;

        const Tensor init = rand_cpu({E, N, K}, -2.0f, 2.0f);
        Tensor acc = init.to(kGpu), acc_cpu = init.clone();
        grouped_gemm_wgrad(dyg, xg, off, acc, /*accumulate=*/true, impl);
        grouped_gemm_wgrad(dy, x, off, acc_cpu, /*accumulate=*/true);
        std::vector<float> extra = init.to_floats();
        for (auto& v : extra) v = static_cast<float>(std::ldexp(std::fabs(v), -23));
        worst = std::max(worst, check(acc, acc_cpu, S, kBf16Bound, &extra, what + " wgrad accumulate"));
        for (int64_t e = 0; e < E; ++e)
          if (cs.counts[size_t(e)] == 0)
            expect_same_bits(acc.select(0, e), init.select(0, e), fmt::format("{}: empty expert {} untouched", what, e));
      }
  std::printf("[ grouped ] max |gpu - cpu| / sum|a b| = %.3g (2^%.1f), bound 2^-14\n", worst,
              worst > 0 ? std::log2(worst) : -INFINITY);
}

TEST_F(GpuGroupedGemm, ImplsAgreeOnALargeImbalancedProblem) {
  // 32 experts, an imbalanced split of 2048 rows, expert-like shapes (N = 512, K = 1024), BF16.
  std::vector<int64_t> counts(32);
  std::mt19937 gen(9);
  std::discrete_distribution<int> pick({8, 1, 1, 4, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 3, 1, 1, 1, 1, 1, 1,
                                        1, 1, 1, 1, 1, 6});
  for (int i = 0; i < 2048; ++i) ++counts[size_t(pick(gen))];
  const std::vector<int64_t> off = offsets_of(counts);
  const int64_t E = 32, T = 2048, N = 512, K = 1024;
  const Tensor x = rand_nonzero({T, K}, DType::BF16), W = rand_nonzero({E, N, K}, DType::BF16);
  const Tensor want = grouped_matmul(x, W, off), S = grouped_matmul(abs_f32(x), abs_f32(W), off);
  double worst = 0;
  // BF16 through Loop; the same (exactly widened) values as F32 through both implementations.
  for (auto [dt, impl] : {std::pair{DType::BF16, GroupedGemmImpl::Loop}, std::pair{DType::F32, GroupedGemmImpl::Grouped},
                          std::pair{DType::F32, GroupedGemmImpl::Loop}}) {
    Tensor y = poisoned({T, N}, kGpu);
    grouped_gemm_forward(x.to(dt).to(kGpu), W.to(dt).to(kGpu), off, y, impl);
    worst = std::max(worst, check(y, want, S, kBf16Bound, nullptr,
                                  fmt::format("{} {}", dtype_name(dt), grouped_gemm_impl_name(impl))));
  }
  std::printf("[ grouped ] E=32 T=2048 N=512 K=1024: max |gpu - cpu| / sum|a b| = %.3g (2^%.1f)\n", worst,
              worst > 0 ? std::log2(worst) : -INFINITY);
}

TEST_F(GpuGroupedGemm, Bf16GroupedThrows) {
  const std::vector<int64_t> off = {0, 3, 5};
  const Tensor x = rand_nonzero({5, 8}, DType::BF16).to(kGpu), W = rand_nonzero({2, 4, 8}, DType::BF16).to(kGpu);
  Tensor y = poisoned({5, 4}, kGpu);
  EXPECT_THROW(grouped_gemm_forward(x, W, off, y, GroupedGemmImpl::Grouped), Error);
}

struct Fp8Case {
  int64_t N, K;
  std::vector<int64_t> counts;
};

TEST_F(GpuGroupedGemm, Fp8ForwardMatchesCpu) {
  std::mt19937 gen(3);
  std::vector<int64_t> c32(32);
  std::uniform_int_distribution<int64_t> d(0, 40);
  for (auto& c : c32) c = d(gen) < 10 ? 0 : d(gen);
  std::vector<int64_t> all_in_one(8, 0);
  all_in_one[7] = 203;
  const std::vector<Fp8Case> cases = {
      {256, 512, c32},           {384, 256, all_in_one},   {128, 128, {1}},  // cuBLASLt-friendly N, K
      {256, 384, {0, 1, 0, 0}},  {200, 300, {5, 0, 17, 2}}, {130, 129, {3}},  // odd shapes: fallback kernel
      {128, 256, {0, 0, 0}}};
  double worst = 0;
  for (const Fp8Case& cs : cases)
    for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32}) {
      const std::vector<int64_t> off = offsets_of(cs.counts);
      const int64_t E = int64_t(cs.counts.size()), T = off.back();
      const std::string what = fmt::format("fp8 E={} T={} N={} K={} {}", E, T, cs.N, cs.K,
                                           sf == ScaleFormat::F32 ? "f32" : "e8m0");
      const Tensor x = rand_nonzero({T, cs.K}, DType::F32), W = rand_nonzero({E, cs.N, cs.K}, DType::F32);
      const Fp8Tensor xq = fp8_quantize_rows(x, sf);
      const Fp8ExpertWeights wq = fp8_quantize_expert_blocks(W, sf);
      // The GPU quantises the same bits (test_gpu_fp8.cpp checks the quantisers); here: the GEMM.
      const Fp8Tensor xg{xq.q.to(kGpu), xq.scale.to(kGpu), xq.layout};
      const Fp8ExpertWeights wg{wq.q.to(kGpu), wq.scale.to(kGpu)};
      const Tensor want = grouped_fp8_matmul(xq, wq, off);

      Tensor fb = poisoned({T, cs.N}, kGpu);
      grouped_fp8_gemm_forward(xg, wg, off, fb, Fp8GemmImpl::Fallback);
      expect_same_bits(fb, want, what + " fallback");

      Tensor got = poisoned({T, cs.N}, kGpu);
      grouped_fp8_gemm_forward(xg, wg, off, got, Fp8GemmImpl::Auto);
      // S from the dequantised operands (exact values of the codes times scales).
      const Tensor dx = fp8_dequantize(xq);
      Tensor dW = Tensor::empty({E, cs.N, cs.K}, DType::F32);
      for (int64_t e = 0; e < E; ++e) {
        Tensor slot = dW.select(0, e);
        ops::copy(fp8_dequantize(wq.expert(e)), slot);
      }
      const Tensor S = grouped_matmul(abs_f32(dx), abs_f32(dW), off);
      worst = std::max(worst, check(got, want, S, kFp8Bound, nullptr, what + " auto"));
    }
  std::printf("[ grouped fp8 ] max |gpu - cpu| / sum|a b| = %.3g (2^%.1f), bound 2^-10\n", worst,
              worst > 0 ? std::log2(worst) : -INFINITY);
}

TEST_F(GpuGroupedGemm, Fp8ExpertQuantiserMatchesCpu) {
  const Tensor W = rand_nonzero({3, 200, 300}, DType::F32);
  for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32}) {
    const Fp8ExpertWeights c = fp8_quantize_expert_blocks(W, sf), g = fp8_quantize_expert_blocks(W.to(kGpu), sf);
    expect_same_bits(g.q, c.q, "codes");
    expect_same_bits(g.scale, c.scale, "scales");
  }
}

}  // namespace
}  // namespace dsv4::gputest
