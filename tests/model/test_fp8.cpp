// Block-scaled FP8 CPU reference (runtime/fp8.h): the quantisers against their definition (scale rule, codes,
// zero groups, saturation, partial groups), the transposed quantiser against quantising x^T, the weight quantiser
// against quant.h's, dequantisation, and the GEMM against an independent evaluation of its definition and
// against the exact product of the dequantised operands.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "model/quant.h"
#include "runtime/dtype.h"
#include "runtime/fp8.h"

namespace dsv4 {
namespace {

Tensor rand_matrix(int64_t r, int64_t c, float lo, float hi, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(r * c));
  for (auto& x : v) x = d(gen);
  return Tensor::from_floats({r, c}, v);
}

// Values of very different magnitudes per group (exercises subnormal codes and the scale rule).
Tensor wide_matrix(int64_t r, int64_t c, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> e(-20, 10);
  std::vector<float> v(static_cast<size_t>(r * c));
  for (auto& x : v) x = std::ldexp(u(gen), e(gen));
  return Tensor::from_floats({r, c}, v);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.raw_data(), y.raw_data(), static_cast<size_t>(x.nbytes())) == 0;
}

float scale_of(const Fp8Tensor& t, int64_t idx) {
  return t.scale.dtype() == DType::F32 ? t.scale.data<float>()[idx] : e8m0_to_f32(t.scale.data_u8()[idx]);
}

// Checks one quantised group against the definition.
void check_group(const std::vector<float>& vals, const std::vector<uint8_t>& codes, const Fp8Tensor& t, int64_t sidx) {
  float amax = 0.0f;
  for (float v : vals) amax = std::max(amax, std::fabs(v));
  float s;
  if (t.scale_format() == ScaleFormat::E8M0) {
    const uint8_t want = amax > 0 ? e8m0_ceil_from_f32(amax / 448.0f) : uint8_t{127};
    ASSERT_EQ(t.scale.data_u8()[sidx], want) << "scale " << sidx << " amax " << amax;
    s = e8m0_to_f32(want);
    if (amax > 0) {
      EXPECT_LE(amax / s, 448.0f);  // never saturates
      EXPECT_GT(amax / s, 224.0f);  // the smallest such power of two
    }
  } else {
    s = t.scale.data<float>()[sidx];
    ASSERT_EQ(s, amax > 0 ? amax / 448.0f : 1.0f) << "scale " << sidx;
  }
  for (size_t i = 0; i < vals.size(); ++i) {
    ASSERT_EQ(codes[i], f32_to_e4m3(vals[i] / s)) << "group " << sidx << " element " << i;
    ASSERT_NE(codes[i] & 0x7F, 0x7F) << "NaN code";
  }
}

TEST(Fp8Quant, RowsMatchDefinitionOnOddShapes) {
  for (ScaleFormat fmt : {ScaleFormat::E8M0, ScaleFormat::F32})
    for (auto [M, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 100}, {5, 300}, {2, 128}, {7, 257}}) {
      Tensor x = wide_matrix(M, K, static_cast<uint32_t>(M * 1000 + K));
      // A zero group and a zero row tail.
      if (K > 128)
        for (int64_t k = 128; k < std::min<int64_t>(K, 256); ++k) x.data<float>()[k] = 0.0f;
      const Fp8Tensor t = fp8_quantize_rows(x, fmt);
      ASSERT_EQ(t.q.shape(), Shape({M, K}));
      ASSERT_EQ(t.scale.shape(), Shape({M, fp8_blocks(K)}));
      EXPECT_EQ(t.layout, Fp8Layout::Rows1x128);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t kb = 0; kb < fp8_blocks(K); ++kb) {
          std::vector<float> v;
          std::vector<uint8_t> c;
          for (int64_t k = kb * 128; k < std::min(K, kb * 128 + 128); ++k) {
            v.push_back(x.data<float>()[m * K + k]);
            c.push_back(t.q.data_u8()[m * K + k]);
          }
          check_group(v, c, t, m * fp8_blocks(K) + kb);
        }
      if (K > 128) EXPECT_EQ(scale_of(t, 1), 1.0f) << "zero group gets scale 1";
    }
}

TEST(Fp8Quant, SaturationAndDequantisationError) {
  // Huge values (amax / 448 stays finite), a group whose F32 scale rounds so that amax / s > 448, and tiny
  // values: codes are never NaN, saturate at +-448, and the round trip is within half an E4M3 step. (Near
  // FLT_MAX an E8M0 scale of 2^120 can make the dequantised value overflow, e.g. 3.3e38 -> 256 * 2^120 = inf: a
  // property of the format (quant.h), so the values here stay below that.)
  std::vector<float> v = {3.0e38f, -3.0e38f, 1.0f, 0.0f};
  for (int i = 0; i < 124; ++i) v.push_back(std::ldexp(1.0f + i / 128.0f, -i % 30));
  Tensor x = Tensor::from_floats({1, 128}, v);
  for (ScaleFormat fmt : {ScaleFormat::E8M0, ScaleFormat::F32}) {
    const Fp8Tensor t = fp8_quantize_rows(x, fmt);
    const float s = scale_of(t, 0);
    EXPECT_TRUE(std::isfinite(s));
    const Tensor d = fp8_dequantize(t);
    for (int64_t i = 0; i < 128; ++i) {
      const uint8_t c = t.q.data_u8()[i];
      EXPECT_NE(c & 0x7F, 0x7F);
      const float xi = v[static_cast<size_t>(i)], di = d.data<float>()[i];
      const double err = std::fabs(double(xi) - double(di));
      const double bound = std::max(std::fabs(double(xi)) * 0.0625, double(s) * std::ldexp(1.0, -10)) * 1.0001;
      EXPECT_LE(err, bound) << "element " << i << " x " << xi << " dequantised " << di;
    }
    EXPECT_EQ(t.q.data_u8()[1], f32_to_e4m3(-3.0e38f / s));
  }
  // amax / (amax / 448) rounding above 448 must saturate to the largest finite code, not NaN.
  for (float a = 1.0f; a < 2.0f; a = std::nextafter(a, 2.0f)) {
    if (a / (a / 448.0f) <= 448.0f) continue;
    const Fp8Tensor t = fp8_quantize_rows(Tensor::from_floats({1, 2}, {a, -a}), ScaleFormat::F32);
    EXPECT_EQ(t.q.data_u8()[0], 0x7E);
    EXPECT_EQ(t.q.data_u8()[1], 0xFE);
    break;
  }
}

TEST(Fp8Quant, TransposedEqualsQuantisingTheTranspose) {
  for (ScaleFormat fmt : {ScaleFormat::E8M0, ScaleFormat::F32})
    for (auto [M, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 3}, {300, 7}, {128, 5}, {129, 130}}) {
      const Tensor x = wide_matrix(M, K, static_cast<uint32_t>(M + 7 * K));
      const Fp8Tensor t = fp8_quantize_rows_t(x, fmt);
      const Fp8Tensor ref = fp8_quantize_rows(x.transpose(0, 1).contiguous(), fmt);
      ASSERT_EQ(t.q.shape(), Shape({K, M}));
      ASSERT_EQ(t.scale.shape(), Shape({K, fp8_blocks(M)}));
      EXPECT_TRUE(same_bits(t.q, ref.q)) << M << "x" << K;
      EXPECT_TRUE(same_bits(t.scale, ref.scale)) << M << "x" << K;
      // A strided (transposed view) input quantises like its contiguous copy.
      const Fp8Tensor v = fp8_quantize_rows(x.transpose(0, 1), fmt);
      EXPECT_TRUE(same_bits(v.q, ref.q));
      EXPECT_TRUE(same_bits(v.scale, ref.scale));
    }
}

TEST(Fp8Quant, TransposeBlocksDequantisesToTheTranspose) {
  for (ScaleFormat fmt : {ScaleFormat::E8M0, ScaleFormat::F32})
    for (auto [R, C] : std::vector<std::pair<int64_t, int64_t>>{{1, 3}, {300, 7}, {129, 257}}) {
      const Fp8Tensor w = fp8_quantize_blocks(wide_matrix(R, C, static_cast<uint32_t>(3 * R + C)), fmt);
      const Fp8Tensor t = fp8_transpose_blocks(w);
      ASSERT_EQ(t.q.shape(), Shape({C, R}));
      ASSERT_EQ(t.scale.shape(), Shape({fp8_blocks(C), fp8_blocks(R)}));
      EXPECT_EQ(t.scale.dtype(), w.scale.dtype());
      EXPECT_TRUE(same_bits(fp8_dequantize(t), fp8_dequantize(w).transpose(0, 1).contiguous())) << R << "x" << C;
    }
}

TEST(Fp8Quant, BlocksMatchWeightQuantiserAndDefinition) {
  for (ScaleFormat fmt : {ScaleFormat::E8M0, ScaleFormat::F32})
    for (auto [N, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {130, 200}, {256, 128}, {5, 300}}) {
      const Tensor w = wide_matrix(N, K, static_cast<uint32_t>(3 * N + K));
      const Fp8Tensor t = fp8_quantize_blocks(w, fmt);
      ASSERT_EQ(t.scale.shape(), Shape({fp8_blocks(N), fp8_blocks(K)}));
      const QuantizedWeight qw = quantize_fp8_block(w, fmt);
      EXPECT_TRUE(same_bits(t.q, qw.data));
      EXPECT_TRUE(same_bits(t.scale, qw.scale));
      for (int64_t nb = 0; nb < fp8_blocks(N); ++nb)
        for (int64_t kb = 0; kb < fp8_blocks(K); ++kb) {
          std::vector<float> v;
          std::vector<uint8_t> c;
          for (int64_t n = nb * 128; n < std::min(N, nb * 128 + 128); ++n)
            for (int64_t k = kb * 128; k < std::min(K, kb * 128 + 128); ++k) {
              v.push_back(w.data<float>()[n * K + k]);
              c.push_back(t.q.data_u8()[n * K + k]);
            }
          check_group(v, c, t, nb * fp8_blocks(K) + kb);
        }
      // Dequantisation is quant.h's.
      EXPECT_TRUE(same_bits(fp8_dequantize(t), dequant_fp8_block(qw.data, qw.scale)));
    }
}

// The GEMM definition evaluated independently (long double block sums, then the FP32 promotion steps).
Tensor gemm_by_definition(const Fp8Tensor& a, const Fp8Tensor& b) {
  const int64_t M = a.rows(), N = b.rows(), K = a.cols(), KB = fp8_blocks(K);
  Tensor c = Tensor::zeros({M, N}, DType::F32);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t kb = 0; kb < KB; ++kb) {
        long double p = 0;
        for (int64_t k = kb * 128; k < std::min(K, kb * 128 + 128); ++k)
          p += static_cast<long double>(e4m3_to_f32(a.q.data_u8()[m * K + k])) *
               static_cast<long double>(e4m3_to_f32(b.q.data_u8()[n * K + k]));
        const int64_t sbr = b.layout == Fp8Layout::Rows1x128 ? n : n / 128;
        const float s = scale_of(a, m * KB + kb) * scale_of(b, sbr * KB + kb);
        const float term = static_cast<float>(static_cast<double>(p)) * s;
        acc += term;
      }
      c.data<float>()[m * N + n] = acc;
    }
  return c;
}

struct GemmCase {
  int64_t M, N, K;
};

TEST(Fp8Gemm, MatchesDefinitionAndExactProduct) {
  const std::vector<GemmCase> cases = {{1, 1, 1}, {1, 7, 100}, {5, 9, 300}, {3, 130, 128}, {130, 129, 257}, {2, 3, 512}};
  for (const auto& cs : cases)
    for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32})
      for (Fp8Layout bl : {Fp8Layout::Rows1x128, Fp8Layout::Blocks128x128}) {
        const std::string what = fmt::format("M={} N={} K={} {} b={}", cs.M, cs.N, cs.K,
                                             sf == ScaleFormat::E8M0 ? "e8m0" : "f32",
                                             bl == Fp8Layout::Rows1x128 ? "1x128" : "128x128");
        Tensor x = rand_matrix(cs.M, cs.K, -3.0f, 3.0f, static_cast<uint32_t>(cs.M * 31 + cs.K));
        Tensor w = wide_matrix(cs.N, cs.K, static_cast<uint32_t>(cs.N * 17 + cs.K));
        if (cs.M > 1)  // a zero row of activations
          for (int64_t k = 0; k < cs.K; ++k) x.data<float>()[k] = 0.0f;
        const Fp8Tensor a = fp8_quantize_rows(x, sf);
        const Fp8Tensor b = bl == Fp8Layout::Rows1x128 ? fp8_quantize_rows(w, sf) : fp8_quantize_blocks(w, sf);
        const Tensor c = fp8_matmul(a, b);
        ASSERT_EQ(c.shape(), Shape({cs.M, cs.N}));
        EXPECT_TRUE(same_bits(c, gemm_by_definition(a, b))) << what;
        // Against the exact product of the dequantised operands: FP32 rounding of KB promotions.
        const Tensor da = fp8_dequantize(a), db = fp8_dequantize(b);
        const int64_t KB = fp8_blocks(cs.K);
        for (int64_t m = 0; m < cs.M; ++m)
          for (int64_t n = 0; n < cs.N; ++n) {
            long double exact = 0, absum = 0;
            for (int64_t k = 0; k < cs.K; ++k) {
              const long double p = static_cast<long double>(da.data<float>()[m * cs.K + k]) * db.data<float>()[n * cs.K + k];
              exact += p;
              absum += std::fabs(p);
            }
            const float got = c.data<float>()[m * cs.N + n];
            if (m == 0 && cs.M > 1) EXPECT_EQ(got, 0.0f) << what;
            // Each promotion adds at most 3 roundings of relative size 2^-24 (F32 scales: the dequantised values
            // themselves carry one more rounding each).
            const long double tol = absum * (3.0L * KB + 4.0L) * std::ldexp(1.0L, -24);
            EXPECT_LE(std::fabs(static_cast<long double>(got) - exact), tol) << what << " at " << m << "," << n;
            // E8M0 scales and a single K block: the result is the exact product rounded once.
            if (sf == ScaleFormat::E8M0 && KB == 1)
              EXPECT_EQ(got, static_cast<float>(static_cast<double>(exact))) << what << " at " << m << "," << n;
          }
      }
}

TEST(Fp8Gemm, EmptyKGivesZerosAndBadArgumentsThrow) {
  const Fp8Tensor a = fp8_quantize_rows(Tensor::zeros({3, 0}, DType::F32), ScaleFormat::E8M0);
  const Fp8Tensor b = fp8_quantize_blocks(Tensor::zeros({4, 0}, DType::F32), ScaleFormat::E8M0);
  const Tensor c = fp8_matmul(a, b);
  ASSERT_EQ(c.shape(), Shape({3, 4}));
  for (float v : c.to_floats()) EXPECT_EQ(v, 0.0f);

  const Fp8Tensor x = fp8_quantize_rows(rand_matrix(2, 130, -1, 1, 1), ScaleFormat::F32);
  const Fp8Tensor y = fp8_quantize_rows(rand_matrix(3, 129, -1, 1, 2), ScaleFormat::F32);
  EXPECT_THROW(fp8_matmul(x, y), Error);  // K differs
  const Fp8Tensor wb = fp8_quantize_blocks(rand_matrix(2, 130, -1, 1, 3), ScaleFormat::F32);
  EXPECT_THROW(fp8_matmul(wb, x), Error);  // a must be 1x128
  Fp8Tensor bad = x;
  bad.layout = Fp8Layout::Blocks128x128;  // scales of the wrong shape for the layout
  EXPECT_THROW(fp8_dequantize(bad), Error);
}

}  // namespace
}  // namespace dsv4
