// CPU reference ops (cpu_ops.cpp) through the ops:: frontend: closed-form or independently computed
// expectations, strided / broadcast operands, exact dtype conversions and frontend argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "runtime/ops.h"
#include "runtime/tensor.h"

namespace dsv4 {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<float> iota(int64_t n, float start = 0.0f, float step = 1.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = start + step * static_cast<float>(i);
  return v;
}

// Deterministic values in [-1, 1) (LCG), so failures reproduce.
std::vector<float> pseudo_random(int64_t n, uint32_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  uint32_t s = seed * 2654435761u + 1u;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>(s >> 8) / static_cast<float>(1u << 23) - 1.0f;
  }
  return v;
}

void expect_all_near(const std::vector<float>& got, const std::vector<float>& want, float tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << "at " << i << ": got " << got[i];
    } else {
      EXPECT_NEAR(got[i], want[i], tol * std::max(1.0f, std::fabs(want[i]))) << "at " << i;
    }
  }
}

// Row-major element (i0, i1, ...) of a contiguous host vector with the given shape.
float at(const std::vector<float>& v, const Shape& s, std::initializer_list<int64_t> idx) {
  int64_t off = 0, k = 0;
  for (int64_t i : idx) off = off * s[static_cast<int>(k++)] + i;
  return v[static_cast<size_t>(off)];
}

// ---- fill -----------------------------------------------------------------------------------------

TEST(OpsFill, EveryDtypeUsesItsExactEncoding) {
  Tensor f = Tensor::empty({3, 2}, DType::F32);
  ops::fill(f, 1.25);
  EXPECT_EQ(f.to_floats(), std::vector<float>(6, 1.25f));

  Tensor bf = Tensor::empty({5}, DType::BF16);
  ops::fill(bf, 0.1);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(bf.data_u16()[i], f32_to_bf16(0.1f));

  Tensor h = Tensor::empty({4}, DType::F16);
  ops::fill(h, -3.3);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(h.data_u16()[i], f32_to_f16(-3.3f));

  Tensor e4 = Tensor::empty({2, 3}, DType::F8_E4M3);
  ops::fill(e4, 1000.0);  // saturates to 448
  for (int i = 0; i < 6; ++i) EXPECT_EQ(e4.data_u8()[i], f32_to_e4m3(1000.0f));
  EXPECT_EQ(e4.to_floats()[0], 448.0f);

  Tensor e8 = Tensor::empty({3}, DType::F8_E8M0);
  ops::fill(e8, 0.125);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(e8.data_u8()[i], 124);  // 2^-3 -> 127 - 3
  ops::fill(e8, 3.0);  // not a power of two: the ceiling, 4
  EXPECT_EQ(e8.data_u8()[0], 129);
  ops::fill(e8, 0.0);  // no positive scale: NaN
  EXPECT_EQ(e8.data_u8()[2], 0xFF);

  Tensor fp4 = Tensor::empty({2, 4}, DType::F4_E2M1);
  ops::fill(fp4, -1.5);
  const uint8_t code = f32_to_e2m1(-1.5f);
  EXPECT_EQ(code, 0xB);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(fp4.data_u8()[i], code | (code << 4));
  EXPECT_EQ(fp4.to_floats(), std::vector<float>(8, -1.5f));

  Tensor i8 = Tensor::empty({2}, DType::I8), i32 = Tensor::empty({2}, DType::I32), i64 = Tensor::empty({2}, DType::I64),
         u8 = Tensor::empty({2}, DType::U8);
  ops::fill(i8, -2.9);
  ops::fill(i32, 7.9);
  ops::fill(i64, 1099511627776.0);  // 2^40: exact, not through float
  ops::fill(u8, 255.0);
  EXPECT_EQ(i8.data<int8_t>()[1], -2);
  EXPECT_EQ(i32.data<int32_t>()[1], 7);
  EXPECT_EQ(i64.data<int64_t>()[1], int64_t{1} << 40);
  EXPECT_EQ(u8.data<uint8_t>()[1], 255);
}

TEST(OpsFill, StridedViewsOnlyTouchTheirElements) {
  Tensor t = Tensor::zeros({3, 4}, DType::F32);
  Tensor col = t.slice(1, 1, 3);  // columns 1..2
  ops::fill(col, 5.0);
  EXPECT_EQ(t.to_floats(), (std::vector<float>{0, 5, 5, 0, 0, 5, 5, 0, 0, 5, 5, 0}));

  Tensor b = Tensor::zeros({4, 3}, DType::BF16);
  Tensor bt = b.transpose(0, 1).select(0, 2);  // column 2 of b
  ops::fill(bt, 2.0);
  EXPECT_EQ(b.to_floats(), (std::vector<float>{0, 0, 2, 0, 0, 2, 0, 0, 2, 0, 0, 2}));

  // Packed FP4: rows 1 and 3 of a [4, 6] tensor (a strided, whole-row view) and one column pair.
  Tensor q = Tensor::zeros({4, 6}, DType::F4_E2M1);
  Tensor rows = q.view({2, 2, 6}).select(1, 1);
  ops::fill(rows, 6.0);
  Tensor pair = q.slice(1, 2, 4).select(0, 0);
  ops::fill(pair, 0.5);
  const std::vector<float> want = {0, 0, 0.5f, 0.5f, 0, 0, 6, 6, 6, 6, 6, 6, 0, 0, 0, 0, 0, 0, 6, 6, 6, 6, 6, 6};
  EXPECT_EQ(q.to_floats(), want);
}

// ---- copy / convert -------------------------------------------------------------------------------

TEST(OpsCopy, ArbitraryStridesOnBothSides) {
  Tensor src = Tensor::from_floats({3, 4}, iota(12));
  Tensor dst = Tensor::zeros({5, 3}, DType::F32);
  // dst[1:5, :] (a contiguous-row slice) <- src^T
  Tensor dv = dst.slice(0, 1, 5);
  ops::copy(src.transpose(0, 1), dv);
  const auto d = dst.to_floats();
  for (int j = 0; j < 3; ++j) EXPECT_EQ(d[static_cast<size_t>(j)], 0.0f);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(d[static_cast<size_t>((i + 1) * 3 + j)], static_cast<float>(j * 4 + i));

  // Whole-byte dtypes: I64 transposed into a column-major view, BF16 strided.
  Tensor li = Tensor::from_vector<int64_t>({2, 3}, {1, 2, 3, int64_t{1} << 50, 5, 6});
  Tensor lo = Tensor::zeros({3, 2}, DType::I64).transpose(0, 1);
  ops::copy(li, lo);
  const Tensor lc = lo.contiguous();
  EXPECT_EQ(lc.data<int64_t>()[3], int64_t{1} << 50);
  EXPECT_EQ(lo.transpose(0, 1).contiguous().data<int64_t>()[1], int64_t{1} << 50);  // [0][1] of the base = li[1][0]

  Tensor bsrc = Tensor::from_floats({2, 3}, {1, 2, 3, 4, 5, 6}, DType::BF16);
  Tensor bdst = Tensor::zeros({3, 2}, DType::BF16);
  Tensor bview = bdst.transpose(0, 1);
  ops::copy(bsrc, bview);
  EXPECT_EQ(bdst.to_floats(), (std::vector<float>{1, 4, 2, 5, 3, 6}));

}

TEST(OpsCopy, PackedFp4Rows) {
  std::vector<float> vals = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.5f, -1, -2, -6};
  Tensor src = Tensor::from_floats({3, 4}, vals, DType::F4_E2M1);
  Tensor dst = Tensor::zeros({4, 6}, DType::F4_E2M1);
  // src rows 0..2 into dst[1:4, 2:6]; rows are strided (6 elements) in dst.
  Tensor dv = dst.slice(0, 1, 4).slice(1, 2, 6);
  ops::copy(src, dv);
  const auto d = dst.to_floats();
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) {
      const float want = (i >= 1 && j >= 2) ? vals[static_cast<size_t>((i - 1) * 4 + (j - 2))] : 0.0f;
      EXPECT_EQ(d[static_cast<size_t>(i * 6 + j)], want) << i << "," << j;
    }
  // Transposed outer dims of a 3-D FP4 tensor (last dim stays contiguous).
  Tensor t3 = Tensor::from_floats({2, 3, 2}, iota(12, 0.0f, 0.5f), DType::F4_E2M1);
  Tensor c3 = t3.transpose(0, 1).contiguous();
  EXPECT_EQ(c3.shape(), (Shape{3, 2, 2}));
  const auto a = t3.to_floats(), b = c3.to_floats();
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 2; ++k)
        EXPECT_EQ(at(b, {3, 2, 2}, {j, i, k}), at(a, {2, 3, 2}, {i, j, k}));
}

TEST(OpsConvert, FloatDtypesMatchScalarConversionsBitForBit) {
  const std::vector<float> vals = {0.0f,  -0.0f, 1.0f,      -1.5f,   0.1f,    3.14159f, 1e-3f, 5e-8f,
                                   1e-40f, 300.0f, 448.0f,  500.0f,  -1e6f,   65504.0f, 7e4f,  kInf,
                                   -kInf,  kNaN,   2.75f,   -5.5f,   0.25f,   6.0f,     -0.75f, 1e-30f};
  const int64_t n = static_cast<int64_t>(vals.size());
  const Tensor x = Tensor::from_floats({n}, vals);

  const Tensor bf = ops::convert(x, DType::BF16), hf = ops::convert(x, DType::F16), e4 = ops::convert(x, DType::F8_E4M3),
               e2 = ops::convert(x, DType::F4_E2M1);
  const auto bfb = bf.to_floats(), hfb = hf.to_floats(), e4b = e4.to_floats(), e2b = e2.to_floats();
  for (int64_t i = 0; i < n; ++i) {
    const float v = vals[static_cast<size_t>(i)];
    EXPECT_EQ(bf.data_u16()[i], f32_to_bf16(v)) << v;
    EXPECT_EQ(hf.data_u16()[i], f32_to_f16(v)) << v;
    EXPECT_EQ(e4.data_u8()[i], f32_to_e4m3(v)) << v;
    EXPECT_EQ(fp4_get(e2.data_u8(), i), f32_to_e2m1(v)) << v;
    // Back to F32: bitwise equal to the scalar decoders (NaN payloads included).
    EXPECT_EQ(f32_bits(bfb[static_cast<size_t>(i)]), f32_bits(bf16_to_f32(f32_to_bf16(v)))) << v;
    EXPECT_EQ(f32_bits(hfb[static_cast<size_t>(i)]), f32_bits(f16_to_f32(f32_to_f16(v)))) << v;
    EXPECT_EQ(f32_bits(e4b[static_cast<size_t>(i)]), f32_bits(e4m3_to_f32(f32_to_e4m3(v)))) << v;
    EXPECT_EQ(f32_bits(e2b[static_cast<size_t>(i)]), f32_bits(e2m1_to_f32(f32_to_e2m1(v)))) << v;
  }
  // Float -> float directly (BF16 -> F16 goes through the exact F32 value).
  const Tensor bh = ops::convert(bf, DType::F16);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(bh.data_u16()[i], f32_to_f16(bfb[static_cast<size_t>(i)]));
  // Values already representable survive the round trip exactly.
  const std::vector<float> exact = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.5f, -1, -2, -6};
  EXPECT_EQ(Tensor::from_floats({12}, exact, DType::F4_E2M1).to_floats(), exact);
  EXPECT_EQ(Tensor::from_floats({12}, exact, DType::F8_E4M3).to_floats(), exact);
}

TEST(OpsConvert, E8M0TakesTheCeilingPowerOfTwo) {
  const std::vector<float> pow2 = {1.0f, 2.0f, 0.5f, 1024.0f, std::ldexp(1.0f, -127), std::ldexp(1.0f, 127), kNaN};
  const Tensor e = ops::convert(Tensor::from_floats({7}, pow2), DType::F8_E8M0);
  const std::vector<uint8_t> codes = {127, 128, 126, 137, 0, 254, 0xFF};
  for (int i = 0; i < 7; ++i) EXPECT_EQ(e.data_u8()[i], codes[static_cast<size_t>(i)]);
  const auto back = e.to_floats();
  for (int i = 0; i < 6; ++i) EXPECT_EQ(back[static_cast<size_t>(i)], pow2[static_cast<size_t>(i)]);
  EXPECT_TRUE(std::isnan(back[6]));
  // Non-powers round up; values without a positive finite scale become NaN (0xFF); tiny ones the smallest code.
  const std::vector<float> other = {3.0f, 1.5f, 0.0f, -2.0f, kInf, std::ldexp(1.0f, -130)};
  const Tensor o = ops::convert(Tensor::from_floats({6}, other), DType::F8_E8M0);
  const std::vector<uint8_t> other_codes = {129, 128, 0xFF, 0xFF, 0xFF, 0};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(o.data_u8()[i], other_codes[static_cast<size_t>(i)]) << other[static_cast<size_t>(i)];
}

TEST(OpsConvert, IntegersTruncateSaturateAndRound) {
  const Tensor f = Tensor::from_floats({6}, {2.7f, -2.7f, kNaN, 1e10f, -1e10f, 0.999f});
  const Tensor i = ops::convert(f, DType::I32);
  EXPECT_EQ((std::vector<int32_t>(i.data<int32_t>(), i.data<int32_t>() + 6)),
            (std::vector<int32_t>{2, -2, 0, std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min(), 0}));
  const Tensor u = ops::convert(Tensor::from_floats({3}, {-5.0f, 300.0f, 17.5f}), DType::U8);
  EXPECT_EQ(u.data<uint8_t>()[0], 0);
  EXPECT_EQ(u.data<uint8_t>()[1], 255);
  EXPECT_EQ(u.data<uint8_t>()[2], 17);

  // int -> int stays exact (no float pivot), int -> float rounds to nearest.
  const int64_t big = (int64_t{1} << 40) + 3;
  const Tensor l = Tensor::from_vector<int64_t>({3}, {big, -7, 16777217});
  const Tensor l2 = ops::convert(ops::convert(l, DType::I64), DType::I64);
  EXPECT_EQ(l2.data<int64_t>()[0], big);
  const Tensor li32 = ops::convert(Tensor::from_vector<int32_t>({2}, {-7, 123456}), DType::I64);
  EXPECT_EQ(li32.data<int64_t>()[0], -7);
  EXPECT_EQ(li32.data<int64_t>()[1], 123456);
  const auto lf = ops::convert(l, DType::F32).to_floats();
  EXPECT_EQ(lf[0], static_cast<float>(big));
  EXPECT_EQ(lf[1], -7.0f);
  EXPECT_EQ(lf[2], 16777216.0f);  // 2^24 + 1 rounds to even
  const Tensor lb = ops::convert(Tensor::from_vector<int32_t>({2}, {257, -3}), DType::BF16);
  EXPECT_EQ(lb.data_u16()[0], f32_to_bf16(257.0f));
  EXPECT_EQ(lb.to_floats()[1], -3.0f);
  // Float dtype -> int through its F32 value.
  const Tensor hi = ops::convert(Tensor::from_floats({2}, {-3.75f, 9.5f}, DType::F16), DType::I8);
  EXPECT_EQ(hi.data<int8_t>()[0], -3);
  EXPECT_EQ(hi.data<int8_t>()[1], 9);
}

TEST(OpsConvert, StridedSourceAndDestination) {
  const Tensor x = Tensor::from_floats({3, 4}, pseudo_random(12, 1));
  const Tensor xt = x.transpose(0, 1);  // [4, 3]
  Tensor b = Tensor::empty({4, 3}, DType::BF16);
  b.copy_from(xt);  // convert with a transposed source
  const auto src = x.to_floats();
  const auto got = b.to_floats();
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j)
      EXPECT_EQ(got[static_cast<size_t>(i * 3 + j)], round_bf16(src[static_cast<size_t>(j * 4 + i)]));
  Tensor dst = Tensor::zeros({3, 4}, DType::F16);
  Tensor dview = dst.transpose(0, 1);
  dview.copy_from(b);  // BF16 -> F16 into a transposed destination
  const auto d = dst.to_floats();
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(d[i], f16_to_f32(f32_to_f16(round_bf16(src[i]))));
}

// ---- unary / binary / affine ----------------------------------------------------------------------

TEST(OpsUnary, EveryOpMatchesStdMath) {
  const std::vector<float> any = {-20.0f, -3.5f, -1.0f, -0.25f, 0.0f, 0.5f, 1.0f, 2.0f, 7.5f, 30.0f};
  const std::vector<float> pos = {1e-6f, 0.01f, 0.25f, 1.0f, 2.0f, 9.0f, 100.0f, 1e6f};
  struct Case {
    UnaryOp op;
    const std::vector<float>* in;
    std::function<double(double)> f;
  };
  const std::vector<Case> cases = {
      {UnaryOp::Neg, &any, [](double x) { return -x; }},
      {UnaryOp::Abs, &any, [](double x) { return std::fabs(x); }},
      {UnaryOp::Exp, &any, [](double x) { return std::exp(x); }},
      {UnaryOp::Log, &pos, [](double x) { return std::log(x); }},
      {UnaryOp::Sqrt, &pos, [](double x) { return std::sqrt(x); }},
      {UnaryOp::Rsqrt, &pos, [](double x) { return 1.0 / std::sqrt(x); }},
      {UnaryOp::Square, &any, [](double x) { return x * x; }},
      {UnaryOp::Sigmoid, &any, [](double x) { return 1.0 / (1.0 + std::exp(-x)); }},
      {UnaryOp::Silu, &any, [](double x) { return x / (1.0 + std::exp(-x)); }},
      {UnaryOp::Relu, &any, [](double x) { return x > 0 ? x : 0.0; }},
      {UnaryOp::Tanh, &any, [](double x) { return std::tanh(x); }},
      {UnaryOp::Softplus, &any, [](double x) { return std::log1p(std::exp(x)); }},
  };
  for (const Case& c : cases) {
    const int64_t n = static_cast<int64_t>(c.in->size());
    const auto got = ops::unary(c.op, Tensor::from_floats({n}, *c.in)).to_floats();
    for (int64_t i = 0; i < n; ++i) {
      const double x = (*c.in)[static_cast<size_t>(i)], want = c.f(x);
      EXPECT_NEAR(got[static_cast<size_t>(i)], want, 2e-6 * std::max(1.0, std::fabs(want)))
          << "op " << static_cast<int>(c.op) << " x=" << x;
    }
  }
}

TEST(OpsUnary, SoftplusAndSigmoidAreStableAtExtremes) {
  const auto sp = ops::unary(UnaryOp::Softplus, Tensor::from_floats({4}, {100.0f, 1000.0f, -100.0f, -200.0f})).to_floats();
  EXPECT_EQ(sp[0], 100.0f);
  EXPECT_EQ(sp[1], 1000.0f);  // naive log1p(exp(x)) would give inf
  EXPECT_NEAR(sp[2], std::exp(-100.0), 3e-45);  // an FP32 subnormal
  EXPECT_GE(sp[2], 0.0f);
  EXPECT_EQ(sp[3], 0.0f);
  const auto sg = ops::unary(UnaryOp::Sigmoid, Tensor::from_floats({2}, {-200.0f, 200.0f})).to_floats();
  EXPECT_EQ(sg[0], 0.0f);
  EXPECT_EQ(sg[1], 1.0f);
  const auto si = ops::unary(UnaryOp::Silu, Tensor::from_floats({2}, {-200.0f, 200.0f})).to_floats();
  EXPECT_EQ(si[1], 200.0f);
  EXPECT_LE(std::fabs(si[0]), 1e-30f);
  EXPECT_FALSE(std::isnan(si[0]));
}

TEST(OpsUnary, NonContiguousInput) {
  const Tensor x = Tensor::from_floats({3, 4}, iota(12, -6.0f));
  const Tensor xt = x.transpose(0, 1);  // [4, 3], xt[i][j] = x[j][i]
  const Tensor y = ops::unary(UnaryOp::Square, xt);
  EXPECT_EQ(y.shape(), (Shape{4, 3}));
  const auto got = y.to_floats();
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) {
      const float v = -6.0f + static_cast<float>(j * 4 + i);
      EXPECT_EQ(got[static_cast<size_t>(i * 3 + j)], v * v);
    }
}

TEST(OpsBinary, BroadcastsLikeNumpy) {
  // [2, 1, 3] (op) [4, 1] -> [2, 4, 3]
  const std::vector<float> av = {1, 2, 3, 4, 5, 6}, bv = {10, 20, 30, 40};
  const Tensor a = Tensor::from_floats({2, 1, 3}, av), b = Tensor::from_floats({4, 1}, bv);
  const std::vector<std::pair<BinaryOp, std::function<float(float, float)>>> cases = {
      {BinaryOp::Add, [](float x, float y) { return x + y; }}, {BinaryOp::Sub, [](float x, float y) { return x - y; }},
      {BinaryOp::Mul, [](float x, float y) { return x * y; }}, {BinaryOp::Div, [](float x, float y) { return x / y; }},
      {BinaryOp::Max, [](float x, float y) { return std::max(x, y); }},
      {BinaryOp::Min, [](float x, float y) { return std::min(x, y); }}};
  for (const auto& [op, f] : cases) {
    const Tensor out = ops::binary(op, a, b);
    ASSERT_EQ(out.shape(), (Shape{2, 4, 3}));
    const auto got = out.to_floats();
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 3; ++k)
          EXPECT_FLOAT_EQ(at(got, out.shape(), {i, j, k}), f(av[static_cast<size_t>(i * 3 + k)], bv[static_cast<size_t>(j)]));
  }
  // Max/min mixes: the larger of 3 and 25 etc. with a lower-rank, reversed broadcast (b first).
  const auto mx = ops::binary(BinaryOp::Max, Tensor::from_floats({3}, {0, 25, 50}), a).to_floats();
  EXPECT_EQ(mx, (std::vector<float>{1, 25, 50, 4, 25, 50}));
  // Scalar (0-d) operand.
  const Tensor s = Tensor::from_floats({}, {2.0f});
  EXPECT_EQ(ops::mul(a, s).to_floats(), (std::vector<float>{2, 4, 6, 8, 10, 12}));
}

TEST(OpsBinary, NonContiguousOperandsAndNaN) {
  const Tensor base = Tensor::from_floats({4, 6}, iota(24));
  const Tensor a = base.transpose(0, 1).slice(0, 1, 4);  // [3, 4], a[i][j] = base[j][i + 1]
  const Tensor b = base.slice(1, 2, 6).select(0, 3);     // [4], b[j] = base[3][j + 2]
  const auto got = ops::sub(a, b).to_floats();
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) {
      const float av = static_cast<float>(j * 6 + i + 1), bv = static_cast<float>(18 + j + 2);
      EXPECT_EQ(got[static_cast<size_t>(i * 4 + j)], av - bv);
    }
  const Tensor x = Tensor::from_floats({3}, {kNaN, 1.0f, 2.0f}), y = Tensor::from_floats({3}, {0.0f, kNaN, 1.0f});
  const auto mx = ops::binary(BinaryOp::Max, x, y).to_floats(), mn = ops::binary(BinaryOp::Min, x, y).to_floats();
  EXPECT_TRUE(std::isnan(mx[0]) && std::isnan(mx[1]) && std::isnan(mn[0]) && std::isnan(mn[1]));
  EXPECT_EQ(mx[2], 2.0f);
  EXPECT_EQ(mn[2], 1.0f);
}

TEST(OpsAffine, AlphaXPlusBetaOnAView) {
  const Tensor x = Tensor::from_floats({2, 3}, iota(6));
  const auto got = ops::affine(x.transpose(0, 1), 2.0, -1.0).to_floats();
  EXPECT_EQ(got, (std::vector<float>{-1, 5, 1, 7, 3, 9}));
}

// ---- reductions -----------------------------------------------------------------------------------

TEST(OpsReduce, EveryDimAndOpWithKeepdim) {
  const Shape s{2, 3, 4};
  const std::vector<float> v = pseudo_random(24, 7);
  const Tensor x = Tensor::from_floats(s, v);
  for (int dim = 0; dim < 3; ++dim) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min}) {
      const Tensor kept = ops::reduce(op, x, dim, true);
      const Tensor squeezed = ops::reduce(op, x, dim - 3, false);  // negative dim
      Shape ks = s;
      ks[dim] = 1;
      EXPECT_EQ(kept.shape(), ks);
      EXPECT_EQ(squeezed.ndim(), 2);
      const auto got = kept.to_floats();
      EXPECT_EQ(got, squeezed.to_floats());
      int64_t idx[3];
      for (idx[0] = 0; idx[0] < ks[0]; ++idx[0])
        for (idx[1] = 0; idx[1] < ks[1]; ++idx[1])
          for (idx[2] = 0; idx[2] < ks[2]; ++idx[2]) {
            double sum = 0.0, mx = -1e30, mn = 1e30;
            for (int64_t r = 0; r < s[dim]; ++r) {
              int64_t j[3] = {idx[0], idx[1], idx[2]};
              j[dim] = r;
              const double e = at(v, s, {j[0], j[1], j[2]});
              sum += e;
              mx = std::max(mx, e);
              mn = std::min(mn, e);
            }
            const double want = op == ReduceOp::Sum    ? sum
                                : op == ReduceOp::Mean ? sum / static_cast<double>(s[dim])
                                : op == ReduceOp::Max  ? mx
                                                       : mn;
            EXPECT_NEAR(at(got, ks, {idx[0], idx[1], idx[2]}), want, 1e-6) << "dim " << dim << " op " << static_cast<int>(op);
          }
    }
  }
}

TEST(OpsReduce, NonContiguousInputAndClosedForm) {
  const Tensor x = Tensor::from_floats({3, 4}, iota(12));  // x[i][j] = 4 i + j
  const Tensor xt = x.transpose(0, 1);                    // [4, 3]
  EXPECT_EQ(ops::sum(xt, 1).to_floats(), (std::vector<float>{12, 15, 18, 21}));   // sum_i 4i + j
  EXPECT_EQ(ops::sum(xt, 0).to_floats(), (std::vector<float>{6, 22, 38}));       // sum_j 4i + j
  EXPECT_EQ(ops::mean(xt, 1).to_floats(), (std::vector<float>{4, 5, 6, 7}));
  EXPECT_EQ(ops::max(xt.slice(0, 1, 3), 0).to_floats(), (std::vector<float>{2, 6, 10}));
  EXPECT_EQ(ops::reduce(ReduceOp::Min, xt, -1, true).shape(), (Shape{4, 1}));
  // Sum accumulates in double: 1 + 1e8 - 1e8 pattern keeps the small term.
  const Tensor c = Tensor::from_floats({3}, {1e8f, 1.0f, -1e8f});
  EXPECT_EQ(ops::sum(c, 0).item(), 1.0);
  // Max propagates NaN; an empty sum is 0; empty max throws in the frontend.
  EXPECT_TRUE(std::isnan(ops::max(Tensor::from_floats({3}, {1.0f, kNaN, 2.0f}), 0).item()));
  EXPECT_EQ(ops::sum(Tensor::empty({2, 0}, DType::F32), 1).to_floats(), (std::vector<float>{0, 0}));
  EXPECT_THROW(ops::max(Tensor::empty({2, 0}, DType::F32), 1), Error);
}

// ---- softmax --------------------------------------------------------------------------------------

TEST(OpsSoftmax, HandExampleRowsSumToOneAndStable) {
  const Tensor x = Tensor::from_floats({2, 3}, {1.0f, 2.0f, 3.0f, 1000.0f, 1001.0f, 1002.0f});
  const auto p = ops::softmax(x).to_floats();
  const double z = 1.0 + std::exp(1.0) + std::exp(2.0);
  const std::vector<float> want = {static_cast<float>(1.0 / z), static_cast<float>(std::exp(1.0) / z),
                                   static_cast<float>(std::exp(2.0) / z)};
  for (int r = 0; r < 2; ++r)  // shift invariance: row 1 equals row 0 (no overflow at 1000)
    for (int j = 0; j < 3; ++j) EXPECT_NEAR(p[static_cast<size_t>(r * 3 + j)], want[static_cast<size_t>(j)], 1e-6);

  const Tensor big = Tensor::from_floats({5, 7}, pseudo_random(35, 3));
  const Tensor bt = big.transpose(0, 1);  // [7, 5], non-contiguous rows
  const auto q = ops::softmax(bt).to_floats();
  const auto bv = big.to_floats();
  for (int i = 0; i < 7; ++i) {
    double sum = 0.0, z2 = 0.0;
    for (int j = 0; j < 5; ++j) z2 += std::exp(static_cast<double>(bv[static_cast<size_t>(j * 7 + i)]));
    for (int j = 0; j < 5; ++j) {
      const float got = q[static_cast<size_t>(i * 5 + j)];
      sum += got;
      EXPECT_NEAR(got, std::exp(static_cast<double>(bv[static_cast<size_t>(j * 7 + i)])) / z2, 1e-6);
    }
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }
  // -inf entries get probability 0.
  const auto m = ops::softmax(Tensor::from_floats({3}, {0.0f, -kInf, 0.0f})).to_floats();
  EXPECT_EQ(m, (std::vector<float>{0.5f, 0.0f, 0.5f}));
}

TEST(OpsSoftmax, LogSoftmaxMatchesClosedForm) {
  const Tensor x = Tensor::from_floats({2, 3}, {1.0f, 2.0f, 3.0f, -500.0f, 0.0f, 500.0f});
  const auto l = ops::log_softmax(x).to_floats();
  const double lse0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  for (int j = 0; j < 3; ++j) EXPECT_NEAR(l[static_cast<size_t>(j)], (j + 1.0) - lse0, 1e-6);
  // Row 1: lse = 500 + log(1 + e^-500 + e^-1000) = 500 (to FP32), finite far below exp's range.
  EXPECT_NEAR(l[3], -1000.0f, 1e-3);
  EXPECT_NEAR(l[4], -500.0f, 1e-3);
  EXPECT_NEAR(l[5], 0.0f, 1e-6);
  // log(softmax) agrees where softmax does not underflow.
  const Tensor r = Tensor::from_floats({4, 6}, pseudo_random(24, 11));
  const auto a = ops::log_softmax(r).to_floats(), b = ops::softmax(r).to_floats();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], std::log(b[i]), 2e-6);
}

// ---- gemm -----------------------------------------------------------------------------------------

// Naive reference: op(a) @ op(b) for contiguous row-major host matrices, in double.
std::vector<float> naive_matmul(const std::vector<float>& a, const std::vector<float>& b, int64_t m, int64_t n, int64_t k,
                                bool ta, bool tb) {
  std::vector<float> c(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < k; ++p) {
        const float av = ta ? a[static_cast<size_t>(p * m + i)] : a[static_cast<size_t>(i * k + p)];
        const float bv = tb ? b[static_cast<size_t>(j * k + p)] : b[static_cast<size_t>(p * n + j)];
        s += static_cast<double>(av) * bv;
      }
      c[static_cast<size_t>(i * n + j)] = static_cast<float>(s);
    }
  return c;
}

TEST(OpsGemm, AllTransposeCombinationsOddSizes) {
  const int64_t m = 7, n = 5, k = 3;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const auto av = pseudo_random(m * k, 21), bv = pseudo_random(k * n, 22);
      const Tensor a = Tensor::from_floats(ta ? Shape{k, m} : Shape{m, k}, av);
      const Tensor b = Tensor::from_floats(tb ? Shape{n, k} : Shape{k, n}, bv);
      const Tensor c = ops::matmul(a, b, ta, tb);
      EXPECT_EQ(c.shape(), (Shape{m, n}));
      expect_all_near(c.to_floats(), naive_matmul(av, bv, m, n, k, ta, tb), 1e-5f);
    }
}

TEST(OpsGemm, BatchedWithBroadcastBatch) {
  const int64_t B = 3, m = 4, n = 5, k = 6;
  const auto av = pseudo_random(B * m * k, 31), bv = pseudo_random(k * n, 32);
  const Tensor a = Tensor::from_floats({B, m, k}, av), b1 = Tensor::from_floats({1, n, k}, bv);
  const Tensor c = ops::matmul(a, b1, false, true);  // b broadcasts over the batch
  ASSERT_EQ(c.shape(), (Shape{B, m, n}));
  const auto got = c.to_floats();
  for (int64_t bi = 0; bi < B; ++bi) {
    const std::vector<float> ab(av.begin() + bi * m * k, av.begin() + (bi + 1) * m * k);
    const auto want = naive_matmul(ab, bv, m, n, k, false, true);
    expect_all_near(std::vector<float>(got.begin() + bi * m * n, got.begin() + (bi + 1) * m * n), want, 1e-5f);
  }
  // a broadcasts (batch 1), b batched and transposed through trans_a.
  const auto a1v = pseudo_random(k * m, 33), bbv = pseudo_random(B * k * n, 34);
  const Tensor a1 = Tensor::from_floats({1, k, m}, a1v), bb = Tensor::from_floats({B, k, n}, bbv);
  const auto got2 = ops::matmul(a1, bb, true, false).to_floats();
  for (int64_t bi = 0; bi < B; ++bi) {
    const std::vector<float> bbi(bbv.begin() + bi * k * n, bbv.begin() + (bi + 1) * k * n);
    expect_all_near(std::vector<float>(got2.begin() + bi * m * n, got2.begin() + (bi + 1) * m * n),
                    naive_matmul(a1v, bbi, m, n, k, true, false), 1e-5f);
  }
  EXPECT_THROW(ops::matmul(Tensor::zeros({2, m, k}, DType::F32), Tensor::zeros({3, k, n}, DType::F32)), Error);
}

TEST(OpsGemm, StridedOperandsAndOutput) {
  // Operands are column slices of wider matrices: leading dim > row length.
  const int64_t m = 5, n = 3, k = 4;
  const Tensor abig = Tensor::from_floats({m, 9}, pseudo_random(m * 9, 41));
  const Tensor bbig = Tensor::from_floats({k + 2, 7}, pseudo_random((k + 2) * 7, 42));
  const Tensor a = abig.slice(1, 2, 2 + k);            // [5, 4], lda 9
  const Tensor b = bbig.slice(0, 1, 1 + k).slice(1, 3, 3 + n);  // [4, 3], ldb 7, offset
  const auto want = naive_matmul(a.contiguous().to_floats(), b.contiguous().to_floats(), m, n, k, false, false);
  expect_all_near(ops::matmul(a, b).to_floats(), want, 1e-5f);

  // Output into a column slice of a wider c: untouched columns keep their values.
  Tensor cbig = Tensor::from_floats({m, 6}, std::vector<float>(static_cast<size_t>(m * 6), -9.0f));
  Tensor c = cbig.slice(1, 1, 1 + n);
  ops::gemm(a, false, b, false, 1.0f, 0.0f, c);
  const auto cb = cbig.to_floats();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < 6; ++j) {
      const float v = cb[static_cast<size_t>(i * 6 + j)];
      if (j >= 1 && j < 1 + n)
        EXPECT_NEAR(v, want[static_cast<size_t>(i * n + j - 1)], 1e-5);
      else
        EXPECT_EQ(v, -9.0f);
    }

  // Batched operands built by transposing the outer dims of a 3-D tensor: matrix rows strided by 20.
  const Tensor t = Tensor::from_floats({3, 4, 5}, pseudo_random(60, 43));
  const Tensor tb = t.transpose(0, 1);  // [4, 3, 5], strides (5, 20, 1)
  const Tensor w = Tensor::from_floats({1, 2, 5}, pseudo_random(10, 44));
  const auto got = ops::matmul(tb, w, false, true).to_floats();  // [4, 3, 2]
  const auto tc = tb.contiguous().to_floats(), wv = w.to_floats();
  for (int64_t bi = 0; bi < 4; ++bi) {
    const std::vector<float> ai(tc.begin() + bi * 15, tc.begin() + (bi + 1) * 15);
    expect_all_near(std::vector<float>(got.begin() + bi * 6, got.begin() + (bi + 1) * 6),
                    naive_matmul(ai, wv, 3, 2, 5, false, true), 1e-5f);
  }
}

TEST(OpsGemm, BetaZeroIgnoresNaNAndAlphaBetaAccumulate) {
  const int64_t m = 3, n = 4, k = 2;
  const auto av = pseudo_random(m * k, 51), bv = pseudo_random(k * n, 52);
  const Tensor a = Tensor::from_floats({m, k}, av), b = Tensor::from_floats({k, n}, bv);
  const auto ab = naive_matmul(av, bv, m, n, k, false, false);

  Tensor c = Tensor::from_floats({m, n}, std::vector<float>(static_cast<size_t>(m * n), kNaN));
  ops::gemm(a, false, b, false, 1.0f, 0.0f, c);
  expect_all_near(c.to_floats(), ab, 1e-5f);

  const auto c0 = pseudo_random(m * n, 53);
  Tensor c2 = Tensor::from_floats({m, n}, c0);
  ops::gemm(a, false, b, false, 2.0f, 0.5f, c2);
  std::vector<float> want(c0.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = 2.0f * ab[i] + 0.5f * c0[i];
  expect_all_near(c2.to_floats(), want, 1e-5f);
  // Accumulating twice with beta = 1 doubles the product.
  Tensor c3 = Tensor::zeros({m, n}, DType::F32);
  ops::gemm(a, false, b, false, 1.0f, 1.0f, c3);
  ops::gemm(a, false, b, false, 1.0f, 1.0f, c3);
  for (size_t i = 0; i < want.size(); ++i) want[i] = 2.0f * ab[i];
  expect_all_near(c3.to_floats(), want, 1e-5f);

  // k = 0: the product is empty, c = beta * c (beta = 0 clears NaN).
  Tensor ck = Tensor::from_floats({2, 2}, {1, 2, kNaN, 4});
  ops::gemm(Tensor::empty({2, 0}, DType::F32), false, Tensor::empty({0, 2}, DType::F32), false, 1.0f, 0.0f, ck);
  EXPECT_EQ(ck.to_floats(), (std::vector<float>{0, 0, 0, 0}));
  Tensor ck2 = Tensor::from_floats({2, 2}, {1, 2, 3, 4});
  ops::gemm(Tensor::empty({2, 0}, DType::F32), false, Tensor::empty({0, 2}, DType::F32), false, 1.0f, 0.5f, ck2);
  EXPECT_EQ(ck2.to_floats(), (std::vector<float>{0.5f, 1, 1.5f, 2}));

  // Batched beta = 0 with NaN in a strided c (batch 2 of a [2, 3, 8] buffer's first 4 columns).
  Tensor cb = Tensor::from_floats({2, m, 8}, std::vector<float>(static_cast<size_t>(2 * m * 8), kNaN));
  Tensor cv = cb.slice(2, 0, n);
  const Tensor a2 = Tensor::from_floats({2, m, k}, pseudo_random(2 * m * k, 54));
  ops::gemm(a2, false, b.unsqueeze(0), false, 1.0f, 0.0f, cv);
  const auto a2v = a2.to_floats();
  const auto got = cv.contiguous().to_floats();
  for (int64_t bi = 0; bi < 2; ++bi) {
    const std::vector<float> ai(a2v.begin() + bi * m * k, a2v.begin() + (bi + 1) * m * k);
    expect_all_near(std::vector<float>(got.begin() + bi * m * n, got.begin() + (bi + 1) * m * n),
                    naive_matmul(ai, bv, m, n, k, false, false), 1e-5f);
  }
  EXPECT_TRUE(std::isnan(cb.to_floats()[static_cast<size_t>(n)]));  // outside the view: untouched
}

TEST(OpsGemm, FrontendRejectsBadShapes) {
  const Tensor a = Tensor::zeros({3, 4}, DType::F32), b = Tensor::zeros({5, 2}, DType::F32);
  EXPECT_THROW(ops::matmul(a, b), Error);                                  // inner dims 4 vs 5
  EXPECT_THROW(ops::matmul(a, Tensor::zeros({1, 4, 2}, DType::F32)), Error);  // rank mismatch
  Tensor c = Tensor::zeros({3, 3}, DType::F32);
  EXPECT_THROW(ops::gemm(a, false, Tensor::zeros({4, 2}, DType::F32), false, 1.0f, 0.0f, c), Error);  // c is [3, 2]
  EXPECT_THROW(ops::matmul(a.transpose(0, 1), Tensor::zeros({3, 2}, DType::F32)), Error);  // last-dim stride != 1
}

// ---- indexing -------------------------------------------------------------------------------------

TEST(OpsIndex, IndexSelectRowsWithDuplicatesAnyDtype) {
  const Tensor x = Tensor::from_floats({4, 3}, iota(12));
  const Tensor i64 = Tensor::from_vector<int64_t>({5}, {3, 0, 3, 1, 0});
  EXPECT_EQ(ops::index_select(x, i64).to_floats(),
            (std::vector<float>{9, 10, 11, 0, 1, 2, 9, 10, 11, 3, 4, 5, 0, 1, 2}));
  // I32 index, non-contiguous x (transpose): rows of x^T are columns of x.
  const Tensor i32 = Tensor::from_vector<int32_t>({2}, {2, 2});
  EXPECT_EQ(ops::index_select(x.transpose(0, 1), i32).to_floats(), (std::vector<float>{2, 5, 8, 11, 2, 5, 8, 11}));
  // 1-D x, BF16 and I64 data, packed FP4 whole rows.
  EXPECT_EQ(ops::index_select(Tensor::from_floats({4}, {5, 6, 7, 8}), i32).to_floats(), (std::vector<float>{7, 7}));
  const Tensor xb = Tensor::from_floats({4, 3}, iota(12, 0.5f), DType::BF16);
  const Tensor sb = ops::index_select(xb, i64);
  EXPECT_EQ(sb.dtype(), DType::BF16);
  EXPECT_EQ(sb.to_floats()[0], 9.5f);
  const Tensor xl = Tensor::from_vector<int64_t>({3, 1}, {int64_t{1} << 60, 2, 3});
  EXPECT_EQ(ops::index_select(xl, Tensor::from_vector<int32_t>({2}, {0, 2})).data<int64_t>()[0], int64_t{1} << 60);
  const Tensor xq = Tensor::from_floats({3, 4}, {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -1, -2, -3, -4}, DType::F4_E2M1);
  EXPECT_EQ(ops::index_select(xq, Tensor::from_vector<int64_t>({3}, {2, 0, 2})).to_floats(),
            (std::vector<float>{-1, -2, -3, -4, 0, 0.5f, 1, 1.5f, -1, -2, -3, -4}));
  // Errors: out-of-range / negative index, wrong index dtype or rank.
  EXPECT_THROW(ops::index_select(x, Tensor::from_vector<int64_t>({2}, {0, 4})), Error);
  EXPECT_THROW(ops::index_select(x, Tensor::from_vector<int32_t>({1}, {-1})), Error);
  EXPECT_THROW(ops::index_select(x, Tensor::from_floats({1}, {0.0f})), Error);
  EXPECT_THROW(ops::index_select(x, Tensor::from_vector<int64_t>({1, 1}, {0})), Error);
}

TEST(OpsIndex, IndexAddAccumulatesDuplicates) {
  Tensor out = Tensor::from_floats({3, 2}, {1, 1, 1, 1, 1, 1});
  const Tensor src = Tensor::from_floats({4, 2}, {1, 2, 10, 20, 100, 200, 1000, 2000});
  ops::index_add(out, Tensor::from_vector<int32_t>({4}, {2, 0, 2, 2}), src);
  EXPECT_EQ(out.to_floats(), (std::vector<float>{11, 21, 1, 1, 1102, 2203}));
  // Strided out (column view) and transposed src.
  Tensor base = Tensor::zeros({3, 4}, DType::F32);
  Tensor ov = base.slice(1, 1, 3);                                          // [3, 2]
  const Tensor st = Tensor::from_floats({2, 2}, {1, 2, 3, 4}).transpose(0, 1);  // [[1, 3], [2, 4]]
  ops::index_add(ov, Tensor::from_vector<int64_t>({2}, {1, 1}), st);
  EXPECT_EQ(base.to_floats(), (std::vector<float>{0, 0, 0, 0, 0, 3, 7, 0, 0, 0, 0, 0}));
  EXPECT_THROW(ops::index_add(out, Tensor::from_vector<int64_t>({4}, {0, 1, 2, 3}), src), Error);  // 3 out of range
  EXPECT_THROW(ops::index_add(out, Tensor::from_vector<int64_t>({3}, {0, 1, 2}), src), Error);     // length mismatch
}

TEST(OpsIndex, GatherAndScatterAddLast) {
  const Tensor x = Tensor::from_floats({2, 4}, {10, 11, 12, 13, 20, 21, 22, 23});
  const Tensor idx = Tensor::from_vector<int64_t>({2, 3}, {3, 0, 3, 1, 1, 2});
  EXPECT_EQ(ops::gather_last(x, idx).to_floats(), (std::vector<float>{13, 10, 13, 21, 21, 22}));
  // Non-contiguous x: columns of a transposed [4, 2] -> [2, 4].
  const Tensor xt = Tensor::from_floats({4, 2}, {10, 20, 11, 21, 12, 22, 13, 23}).transpose(0, 1);
  EXPECT_EQ(ops::gather_last(xt, Tensor::from_vector<int32_t>({2, 2}, {1, 1, 3, 0})).to_floats(),
            (std::vector<float>{11, 11, 23, 20}));

  Tensor out = Tensor::zeros({2, 4}, DType::F32);
  ops::scatter_add_last(out, idx, Tensor::from_floats({2, 3}, {1, 2, 4, 8, 16, 32}));
  EXPECT_EQ(out.to_floats(), (std::vector<float>{2, 0, 0, 5, 0, 24, 32, 0}));
  // 3-D, I32 index.
  Tensor o3 = Tensor::zeros({2, 1, 3}, DType::F32);
  ops::scatter_add_last(o3, Tensor::from_vector<int32_t>({2, 1, 2}, {2, 2, 0, 1}),
                        Tensor::from_floats({2, 1, 2}, {1, 1, 5, 7}));
  EXPECT_EQ(o3.to_floats(), (std::vector<float>{0, 0, 2, 5, 7, 0}));

  EXPECT_THROW(ops::gather_last(x, Tensor::from_vector<int64_t>({2, 1}, {0, 4})), Error);   // out of range
  EXPECT_THROW(ops::gather_last(x, Tensor::from_vector<int64_t>({3, 1}, {0, 0, 0})), Error);  // leading dim
  EXPECT_THROW(ops::scatter_add_last(out, idx, Tensor::zeros({2, 2}, DType::F32)), Error);   // src shape
}

TEST(OpsTopk, DescendingTiesLowerIndexNaNFirst) {
  const Tensor x = Tensor::from_floats({2, 6}, {1, 5, 3, 5, kNaN, -1,  //
                                                2, 2, 2, 7, 2, -kInf});
  const ops::TopK r = ops::topk(x, 4);
  ASSERT_EQ(r.values.shape(), (Shape{2, 4}));
  EXPECT_EQ(r.indices.dtype(), DType::I64);
  const auto v = r.values.to_floats();
  const int64_t* ip = r.indices.data<int64_t>();
  EXPECT_TRUE(std::isnan(v[0]));
  EXPECT_EQ((std::vector<float>(v.begin() + 1, v.end())), (std::vector<float>{5, 5, 3, 7, 2, 2, 2}));
  EXPECT_EQ((std::vector<int64_t>(ip, ip + 8)), (std::vector<int64_t>{4, 1, 3, 2, 3, 0, 1, 2}));

  // Full sort of a transposed (strided-row) input, compared with an independent stable sort.
  const Tensor base = Tensor::from_floats({9, 3}, {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8});
  const Tensor xt = base.transpose(0, 1);  // [3, 9]
  const ops::TopK s = ops::topk(xt, 9);
  const auto xv = xt.contiguous().to_floats(), sv = s.values.to_floats();
  const int64_t* si = s.indices.data<int64_t>();
  for (int r0 = 0; r0 < 3; ++r0) {
    std::vector<int64_t> order(9);
    for (int j = 0; j < 9; ++j) order[static_cast<size_t>(j)] = j;
    std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) {
      return xv[static_cast<size_t>(r0 * 9 + p)] > xv[static_cast<size_t>(r0 * 9 + q)];
    });
    for (int j = 0; j < 9; ++j) {
      EXPECT_EQ(si[r0 * 9 + j], order[static_cast<size_t>(j)]) << "row " << r0 << " rank " << j;
      EXPECT_EQ(sv[static_cast<size_t>(r0 * 9 + j)], xv[static_cast<size_t>(r0 * 9 + order[static_cast<size_t>(j)])]);
    }
  }
  EXPECT_EQ(ops::topk(x, 0).values.shape(), (Shape{2, 0}));
  EXPECT_THROW(ops::topk(x, 7), Error);
}

// ---- frontend errors ------------------------------------------------------------------------------

TEST(OpsFrontend, RejectsBadArguments) {
  const Tensor a = Tensor::zeros({2, 3}, DType::F32);
  EXPECT_THROW(ops::add(a, Tensor::zeros({4}, DType::F32)), Error);         // shapes do not broadcast
  EXPECT_THROW(ops::add(a, Tensor::zeros({2, 3}, DType::BF16)), Error);     // dtype mismatch
  EXPECT_THROW(ops::unary(UnaryOp::Exp, Tensor::zeros({2}, DType::BF16)), Error);  // CPU math is F32 only
  EXPECT_THROW(ops::sum(a, 2), Error);                                       // dim out of range
  EXPECT_THROW(ops::softmax(Tensor::from_floats({}, {1.0f})), Error);        // 0-d
  Tensor dst = Tensor::zeros({3, 2}, DType::F32);
  EXPECT_THROW(ops::copy(a, dst), Error);                                    // shape mismatch
  Tensor undefined;
  EXPECT_THROW(ops::fill(undefined, 1.0), Error);
}

}  // namespace
}  // namespace dsv4
