// Release weight formats (src/model/quant.h): dequantisation of every E4M3 / E2M1 code against the reference
// formula (decoded code times decoded scale, one FP32 rounding), partial blocks, FP4 -> FP8 over all codes and
// scale combinations, quantiser scales and error bounds, and the dequantise-on-the-fly GEMMs against F32 layers.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "fd_check.h"
#include "model/layers.h"
#include "model/moe.h"
#include "model/quant.h"
#include "runtime/dtype.h"
#include "runtime/safetensors.h"

namespace dsv4 {
namespace {

using testing::random_tensor;

// The reference formula: the exact product of the decoded code and scale, rounded once to FP32.
float ref_product(float code_value, float scale) {
  return static_cast<float>(static_cast<double>(code_value) * static_cast<double>(scale));
}

bool same_bits(float a, float b) { return std::isnan(a) ? std::isnan(b) : f32_bits(a) == f32_bits(b); }

Tensor u8_tensor(const Shape& shape, const std::vector<uint8_t>& v, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype);
  std::memcpy(t.raw_data(), v.data(), v.size());
  return t;
}

// ---- dequantisation ------------------------------------------------------------------------------------------

TEST(Quant, Fp8DequantEveryCodeWithE8M0Scales) {
  const int64_t out = 300, in = 260;  // 3 x 3 blocks, the last ones partial (44 rows, 4 cols)
  std::vector<uint8_t> q(static_cast<size_t>(out * in));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < in; ++c) q[static_cast<size_t>(r * in + c)] = static_cast<uint8_t>((r * 7 + c * 13) % 256);
  const std::vector<uint8_t> codes = {0, 1, 60, 100, 127, 128, 200, 254, 0xFF};  // 2^-127 .. 2^127, NaN
  const Tensor qt = u8_tensor({out, in}, q, DType::F8_E4M3);
  const Tensor st = u8_tensor({3, 3}, codes, DType::F8_E8M0);
  const auto got = dequant_fp8_block(qt, st).to_floats();
  std::vector<int> seen(256, 0);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < in; ++c) {
      const uint8_t code = q[static_cast<size_t>(r * in + c)];
      const uint8_t sc = codes[static_cast<size_t>((r / 128) * 3 + c / 128)];
      const float want = ref_product(e4m3_to_f32(code), e8m0_to_f32(sc));
      ASSERT_TRUE(same_bits(got[static_cast<size_t>(r * in + c)], want))
          << "[" << r << ", " << c << "] code " << int(code) << " scale " << int(sc);
      if (r < 128 && c < 128) ++seen[code];
    }
  for (int c = 0; c < 256; ++c) EXPECT_GT(seen[static_cast<size_t>(c)], 0) << "code " << c << " not covered";
  // Hand-checked values: 1.0 (0x38), 448 (0x7E), the smallest subnormal 2^-9 (0x01), -0 (0x80), NaN (0x7F).
  const Tensor small = u8_tensor({1, 5}, {0x38, 0x7E, 0x01, 0x80, 0x7F}, DType::F8_E4M3);
  const auto v = dequant_fp8_block(small, u8_tensor({1, 1}, {128}, DType::F8_E8M0)).to_floats();  // scale 2
  EXPECT_EQ(v[0], 2.0f);
  EXPECT_EQ(v[1], 896.0f);
  EXPECT_EQ(v[2], std::ldexp(1.0f, -8));
  EXPECT_TRUE(v[3] == 0.0f && std::signbit(v[3]));
  EXPECT_TRUE(std::isnan(v[4]));
}

TEST(Quant, Fp8DequantEveryCodeWithF32Scales) {
  const int64_t out = 130, in = 257;  // partial second block row (2 rows) and third block column (1 col)
  std::vector<uint8_t> q(static_cast<size_t>(out * in));
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<uint8_t>(i * 31 % 256);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-3, 3);
  std::vector<float> s(6);
  for (float& x : s) x = std::exp(u(rng)) * 1e-3f;  // not powers of two: the product rounds once
  const auto got = dequant_fp8_block(u8_tensor({out, in}, q, DType::F8_E4M3), Tensor::from_floats({2, 3}, s)).to_floats();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < in; ++c) {
      const float want = ref_product(e4m3_to_f32(q[static_cast<size_t>(r * in + c)]), s[static_cast<size_t>((r / 128) * 3 + c / 128)]);
      ASSERT_TRUE(same_bits(got[static_cast<size_t>(r * in + c)], want)) << r << ", " << c;
    }
  // Wrong scale shape: a named error.
  try {
    dequant_fp8_block(u8_tensor({out, in}, q, DType::F8_E4M3), Tensor::from_floats({1, 3}, {1, 1, 1}));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("block scales [2, 3]"), std::string::npos) << e.what();
  }
}

TEST(Quant, Fp4DequantEveryCodeLowNibbleFirst) {
  const int64_t out = 37, in = 80;  // 3 groups per row, the last one 16 wide
  std::vector<uint8_t> codes(static_cast<size_t>(out * in));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < in; ++c) codes[static_cast<size_t>(r * in + c)] = static_cast<uint8_t>((r * 3 + c) % 16);
  std::vector<uint8_t> bytes(static_cast<size_t>(out * in / 2));
  for (size_t j = 0; j < bytes.size(); ++j) bytes[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
  std::vector<uint8_t> sc(static_cast<size_t>(out * 3));
  const uint8_t pick[] = {0, 1, 120, 126, 127, 128, 131, 254, 0xFF};
  for (size_t i = 0; i < sc.size(); ++i) sc[i] = pick[i % 9];
  const Tensor scale = u8_tensor({out, 3}, sc, DType::F8_E8M0);
  for (DType container : {DType::I8, DType::U8}) {
    const Tensor packed = u8_tensor({out, in / 2}, bytes, container);
    const auto got = dequant_fp4_group(packed, scale).to_floats();
    const auto got2 = dequant_fp4_group(as_packed_fp4(packed), scale).to_floats();
    for (int64_t r = 0; r < out; ++r)
      for (int64_t c = 0; c < in; ++c) {
        const size_t i = static_cast<size_t>(r * in + c);
        const float want = ref_product(e2m1_to_f32(codes[i]), e8m0_to_f32(sc[static_cast<size_t>(r * 3 + c / 32)]));
        ASSERT_TRUE(same_bits(got[i], want)) << r << ", " << c;
        ASSERT_TRUE(same_bits(got2[i], want)) << r << ", " << c;
      }
  }
  // The E2M1 table of §2.6 with scale 1: byte 0x21 holds element 0 = code 1 (low nibble), element 1 = code 2.
  const float table[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -.5f, -1, -1.5f, -2, -3, -4, -6};
  std::vector<uint8_t> all(16);
  for (int j = 0; j < 16; ++j) all[static_cast<size_t>(j)] = static_cast<uint8_t>((2 * j % 16) | (((2 * j + 1) % 16) << 4));
  const auto v = dequant_fp4_group(u8_tensor({1, 16}, all, DType::I8), u8_tensor({1, 1}, {127}, DType::F8_E8M0)).to_floats();
  for (int i = 0; i < 32; ++i) EXPECT_TRUE(same_bits(v[static_cast<size_t>(i)], table[i % 16])) << i;
}

// ---- FP4 -> FP8 ----------------------------------------------------------------------------------------------

// For every block maximum code kmax in 0..254 (one 128x128 block each), FP4 scales kmax - d for d = 0..31 and all
// 16 codes in every 32-wide group: the converted weight dequantises to exactly the FP4 values where the
// conversion is lossless (d <= 14, or kmax < 6), and to the E4M3 round-to-nearest-even of e2m1 * 2^(k-S) otherwise.
TEST(Quant, Fp4ToFp8OverAllCodesAndScaleCombinations) {
  const int64_t nblk = 255, out = 128, in = 128 * nblk, groups = in / 32;
  std::vector<uint8_t> bytes(static_cast<size_t>(out * in / 2));
  std::vector<uint8_t> sc(static_cast<size_t>(out * groups));
  auto code_of = [](int64_t r, int64_t c) { return static_cast<uint8_t>((c + r) % 16); };
  auto d_of = [](int64_t r, int64_t g) { return static_cast<int>((r * 4 + g % 4) % 32); };
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t c = 0; c < in; c += 2)
      bytes[static_cast<size_t>((r * in + c) / 2)] = static_cast<uint8_t>(code_of(r, c) | (code_of(r, c + 1) << 4));
    for (int64_t g = 0; g < groups; ++g) {
      const int kmax = static_cast<int>(g / 4);  // block g/4 has maximum code g/4
      sc[static_cast<size_t>(r * groups + g)] = static_cast<uint8_t>(std::max(0, kmax - d_of(r, g)));
    }
  }
  const QuantizedWeight w4 = QuantizedWeight::from_tensors(u8_tensor({out, in / 2}, bytes, DType::I8),
                                                           u8_tensor({out, groups}, sc, DType::F8_E8M0), "w4");
  const QuantizedWeight w8 = fp4_to_fp8(w4, "w4");
  ASSERT_EQ(w8.scale.shape(), (Shape{1, nblk}));
  const auto v4 = w4.dequantize().to_floats(), v8 = w8.dequantize().to_floats();
  int64_t exact = 0, rounded = 0;
  for (int64_t b = 0; b < nblk; ++b) {
    const int kmax = static_cast<int>(b), S = std::max(kmax - 6, 0);
    ASSERT_EQ(w8.scale.data_u8()[b], S) << "block " << b;
    for (int64_t r = 0; r < out; ++r)
      for (int64_t c = b * 128; c < (b + 1) * 128; ++c) {
        const size_t i = static_cast<size_t>(r * in + c);
        const uint8_t q8 = w8.data.data_u8()[i];
        ASSERT_LE(std::abs(e4m3_to_f32(q8)), 384.0f);
        const int k = sc[static_cast<size_t>(r * groups + c / 32)];
        if (k - S >= -8) {
          ASSERT_TRUE(same_bits(v8[i], v4[i])) << "block " << b << " [" << r << ", " << c << "] k " << k;
          ++exact;
        } else {
          const double x = static_cast<double>(e2m1_to_f32(code_of(r, c))) * std::ldexp(1.0, k - S);
          const float want = ref_product(e4m3_to_f32(f32_to_e4m3(static_cast<float>(x))), e8m0_to_f32(static_cast<uint8_t>(S)));
          ASSERT_TRUE(same_bits(v8[i], want)) << "block " << b << " [" << r << ", " << c << "] k " << k;
          ++rounded;
        }
      }
  }
  EXPECT_GT(exact, 0);
  EXPECT_GT(rounded, 0);
  // A NaN scale is refused, naming the weight.
  sc[5] = 0xFF;
  const QuantizedWeight bad = QuantizedWeight::from_tensors(u8_tensor({out, in / 2}, bytes, DType::I8),
                                                            u8_tensor({out, groups}, sc, DType::F8_E8M0), "w.bad");
  EXPECT_THROW(fp4_to_fp8(bad, "layers.0.ffn.experts.0.w1.weight"), Error);
}

TEST(Quant, Fp4ToFp8PartialBlocksAreLossless) {
  std::mt19937 rng(11);
  const Tensor w = random_tensor({150, 96}, rng, 2.0f);  // 2 x 1 FP8 blocks, partial; 3 FP4 groups per row
  const QuantizedWeight w4 = quantize_fp4_group(w);
  const QuantizedWeight w8 = fp4_to_fp8(w4);
  EXPECT_EQ(w8.scale.shape(), (Shape{2, 1}));
  const auto a = w4.dequantize().to_floats(), b = w8.dequantize().to_floats();
  for (size_t i = 0; i < a.size(); ++i) ASSERT_TRUE(same_bits(a[i], b[i])) << i;
}

// ---- quantisers ----------------------------------------------------------------------------------------------

Tensor varied_weight(int64_t out, int64_t in, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1), e(-12, 6);
  std::vector<float> v(static_cast<size_t>(out * in));
  for (int64_t r = 0; r < out; ++r) {
    const float row_scale = std::exp2(e(rng));
    for (int64_t c = 0; c < in; ++c) v[static_cast<size_t>(r * in + c)] = u(rng) * row_scale;
  }
  for (int64_t c = 0; c < std::min<int64_t>(in, 40); ++c) v[static_cast<size_t>(5 * in + c)] = 0.0f;  // zero run
  return Tensor::from_floats({out, in}, v);
}

TEST(Quant, Fp8QuantiseScalesAndErrorBounds) {
  const int64_t out = 300, in = 200;
  const Tensor w = varied_weight(out, in, 3);
  const auto wv = w.to_floats();
  for (ScaleFormat fmt : {ScaleFormat::E8M0, ScaleFormat::F32}) {
    const QuantizedWeight q = quantize_fp8_block(w, fmt, "w");
    ASSERT_EQ(q.scale.shape(), (Shape{3, 2}));
    ASSERT_EQ(q.scale.dtype(), fmt == ScaleFormat::E8M0 ? DType::F8_E8M0 : DType::F32);
    const auto d = q.dequantize().to_floats();
    for (int64_t br = 0; br < 3; ++br)
      for (int64_t bc = 0; bc < 2; ++bc) {
        float amax = 0;
        for (int64_t r = br * 128; r < std::min(out, br * 128 + 128); ++r)
          for (int64_t c = bc * 128; c < std::min(in, bc * 128 + 128); ++c)
            amax = std::max(amax, std::abs(wv[static_cast<size_t>(r * in + c)]));
        float s;
        if (fmt == ScaleFormat::E8M0) {
          const uint8_t code = q.scale.data_u8()[br * 2 + bc];
          EXPECT_EQ(code, e8m0_ceil_from_f32(amax / 448.0f)) << br << "," << bc;  // 2^ceil(log2(amax/448))
          s = e8m0_to_f32(code);
        } else {
          s = q.scale.data<float>()[br * 2 + bc];
          EXPECT_EQ(s, amax / 448.0f);
        }
        for (int64_t r = br * 128; r < std::min(out, br * 128 + 128); ++r)
          for (int64_t c = bc * 128; c < std::min(in, bc * 128 + 128); ++c) {
            const size_t i = static_cast<size_t>(r * in + c);
            const double err = std::abs(static_cast<double>(d[i]) - wv[i]);
            // half an E4M3 step: 2^-4 relative (3 mantissa bits), s * 2^-10 in the subnormal range
            ASSERT_LE(err, std::max(std::abs(static_cast<double>(wv[i])) * 0.0625, s * std::ldexp(1.0, -10)) * (1 + 1e-6))
                << "[" << r << ", " << c << "] w " << wv[i] << " deq " << d[i];
          }
      }
    if (fmt == ScaleFormat::E8M0) {  // re-quantising the dequantised values gives them back exactly
      const auto d2 = quantize_fp8_block(q.dequantize(), fmt).dequantize().to_floats();
      for (size_t i = 0; i < d.size(); ++i) ASSERT_TRUE(same_bits(d[i], d2[i])) << i;
    }
  }
  // An all-zero block gets scale 1; non-finite values are refused naming the tensor.
  const QuantizedWeight z = quantize_fp8_block(Tensor::zeros({4, 4}, DType::F32), ScaleFormat::E8M0);
  EXPECT_EQ(z.scale.data_u8()[0], 127);
  Tensor bad = Tensor::zeros({2, 2}, DType::F32);
  bad.data<float>()[3] = std::nanf("");
  try {
    quantize_fp8_block(bad, ScaleFormat::E8M0, "layers.1.attn.wq_a.weight");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1.attn.wq_a.weight"), std::string::npos);
  }
}

TEST(Quant, Fp4QuantiseScalesAndErrorBounds) {
  const int64_t out = 37, in = 80;
  const Tensor w = varied_weight(out, in, 4);
  const auto wv = w.to_floats();
  const QuantizedWeight q = quantize_fp4_group(w, "w");
  ASSERT_EQ(q.data.dtype(), DType::F4_E2M1);
  ASSERT_EQ(q.scale.shape(), (Shape{out, 3}));
  const auto d = q.dequantize().to_floats();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < 3; ++g) {
      float amax = 0;
      for (int64_t c = g * 32; c < std::min(in, g * 32 + 32); ++c) amax = std::max(amax, std::abs(wv[static_cast<size_t>(r * in + c)]));
      const uint8_t code = q.scale.data_u8()[r * 3 + g];
      EXPECT_EQ(code, amax > 0 ? e8m0_ceil_from_f32(amax / 6.0f) : 127);
      const double s = e8m0_to_f32(code);
      for (int64_t c = g * 32; c < std::min(in, g * 32 + 32); ++c) {
        const size_t i = static_cast<size_t>(r * in + c);
        ASSERT_LE(std::abs(static_cast<double>(d[i]) - wv[i]), std::max(std::abs(static_cast<double>(wv[i])), s) * 0.25)
            << r << ", " << c;
      }
    }
  const auto d2 = quantize_fp4_group(q.dequantize()).dequantize().to_floats();
  for (size_t i = 0; i < d.size(); ++i) ASSERT_TRUE(same_bits(d[i], d2[i])) << i;
  EXPECT_THROW(quantize_fp4_group(Tensor::zeros({2, 3}, DType::F32)), Error);  // odd input dim cannot be packed
}

TEST(Quant, CloneOwnsItsBytes) {
  std::mt19937 rng(5);
  const QuantizedWeight q = quantize_fp4_group(random_tensor({8, 64}, rng));
  const QuantizedWeight c = q.clone();
  EXPECT_NE(c.data.raw_data(), q.data.raw_data());
  EXPECT_EQ(c.dequantize().to_floats(), q.dequantize().to_floats());
  EXPECT_EQ(c.data.dtype(), DType::F4_E2M1);
}

// ---- GEMMs ----------------------------------------------------------------------------------------------------

double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return scale > 0 ? m / scale : m;
}

TEST(Quant, FrozenLinearMatchesF32LinearOfTheDequantisedWeight) {
  std::mt19937 rng(9);
  const int64_t in = 200, out = 300;  // three row tiles (128, 128, 44), partial FP8 blocks
  const Tensor w = random_tensor({out, in}, rng, 0.3f);
  struct Case {
    const char* name;
    QuantizedWeight q;
  };
  std::vector<Case> cases = {{"fp8 ue8m0", quantize_fp8_block(w, ScaleFormat::E8M0)},
                             {"fp8 f32", quantize_fp8_block(w, ScaleFormat::F32)},
                             {"fp4", quantize_fp4_group(w)},
                             {"bf16", quantize_weight(w, WeightFormat::BF16)},
                             {"f32", quantize_weight(w, WeightFormat::F32)}};
  for (auto& cs : cases) {
    Linear dense("l.weight", in, out), frozen("l.weight", in, out);
    dense.weight.value = cs.q.dequantize();
    frozen.set_frozen(cs.q);
    EXPECT_TRUE(frozen.is_frozen());
    EXPECT_FALSE(frozen.weight.value.defined());
    int visited = 0;
    frozen.visit([&](Param&) { ++visited; });
    EXPECT_EQ(visited, 0) << "a frozen weight is not a parameter";
    for (int64_t T : {1, 5, 33}) {
      const Tensor x = random_tensor({T, in}, rng);
      LinearCtx c1, c2;
      const auto y1 = dense.forward(x, &c1).to_floats(), y2 = frozen.forward(x, &c2).to_floats();
      const Tensor dy = random_tensor({T, out}, rng);
      const auto dx1 = dense.backward(dy, c1).to_floats(), dx2 = frozen.backward(dy, c2).to_floats();
      const bool bit_identical = y1 == y2;
      std::printf("[frozen linear %s T=%lld] forward %s, backward %s\n", cs.name, static_cast<long long>(T),
                  bit_identical ? "bit-identical" : "FP32-rounding close", dx1 == dx2 ? "bit-identical" : "FP32-rounding close");
      if (cs.q.format == WeightFormat::F32) {
        EXPECT_TRUE(bit_identical) << cs.name;  // used in place: the very same GEMM
        EXPECT_EQ(dx1, dx2) << cs.name;
      }
      EXPECT_LE(max_rel(y2, y1), 2e-6) << cs.name << " T=" << T << " forward";
      EXPECT_LE(max_rel(dx2, dx1), 2e-6) << cs.name << " T=" << T << " backward";
    }
    EXPECT_FALSE(frozen.weight.grad.defined()) << "frozen weights get no gradient";
    // Back to a trainable F32 weight with the same values.
    frozen.unfreeze();
    EXPECT_TRUE(frozen.weight.trainable);
    EXPECT_EQ(frozen.weight.value.to_floats(), dense.weight.value.to_floats());
  }
  // Shape mismatch names the layer.
  Linear l("layers.0.attn.wq_a.weight", 8, 4);
  try {
    l.set_frozen(quantize_weight(Tensor::zeros({4, 6}, DType::F32), WeightFormat::F32));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.0.attn.wq_a.weight"), std::string::npos);
  }
}

TEST(Quant, RowRangeGemmsMatchSlices) {
  std::mt19937 rng(13);
  const int64_t in = 64, out = 300, n = 7, r0 = 100, r1 = 260;  // a range across tile and block edges
  const QuantizedWeight q = quantize_fp8_block(random_tensor({out, in}, rng), ScaleFormat::E8M0);
  const Tensor wd = q.dequantize();
  const Tensor x = random_tensor({n, in}, rng), dy = random_tensor({n, r1 - r0}, rng);
  std::vector<float> y(static_cast<size_t>(n * (r1 - r0))), dx(static_cast<size_t>(n * in));
  qgemm_xwT(q, n, x.data<float>(), in, 0.0f, y.data(), r1 - r0, r0, r1);
  qgemm_dyW(q, n, dy.data<float>(), r1 - r0, 0.0f, dx.data(), in, r0, r1);
  const Tensor ws = wd.slice(0, r0, r1).contiguous();
  EXPECT_LE(max_rel(y, ops::matmul(x, ws, false, true).to_floats()), 2e-6);
  EXPECT_LE(max_rel(dx, ops::matmul(dy, ws).to_floats()), 2e-6);
}

TEST(Quant, MoEWithFrozenExpertsMatchesF32Experts) {
  ModelConfig cfg = model_preset("tiny");
  cfg.swiglu_limit = 0.5;  // the clamps fire
  MoE dense("layers.3.ffn.", cfg, false), frozen("layers.3.ffn.", cfg, false);
  std::mt19937 rng(21);
  auto fill = [&](Param& p) {
    if (p.value.dtype() == DType::F32) p.value = random_tensor(p.value.shape(), rng, 0.3f);
  };
  dense.visit(fill);
  frozen.gate_weight.value = dense.gate_weight.value.clone();
  frozen.gate_bias.value = dense.gate_bias.value.clone();
  auto freeze = [&](ExpertWeights& src, ExpertWeights& dst, bool fp4) {
    for (int k = 1; k <= 3; ++k) {
      const QuantizedWeight q = fp4 ? quantize_fp4_group(src.param(k).value)
                                    : quantize_fp8_block(src.param(k).value, ScaleFormat::E8M0);
      src.param(k).value = q.dequantize();
      dst.set_frozen(k, q, dense.expert_weight_shape(k));
    }
  };
  for (size_t e = 0; e < dense.experts.size(); ++e) freeze(dense.experts[e], frozen.experts[e], true);
  freeze(dense.shared, frozen.shared, false);
  int params = 0;
  frozen.visit([&](Param&) { ++params; });
  EXPECT_EQ(params, 2) << "only the gate weight and bias remain parameters";

  const int64_t T = 24;
  const Tensor x = random_tensor({T, cfg.dim}, rng);
  const SeqLayout layout(2, 12);
  MoECtx c1, c2;
  const auto y1 = dense.forward(x, Tensor(), layout, &c1).to_floats();
  const auto y2 = frozen.forward(x, Tensor(), layout, &c2).to_floats();
  EXPECT_LE(max_rel(y2, y1), 2e-6);
  const Tensor dy = random_tensor({T, cfg.dim}, rng);
  const auto dx1 = dense.backward(dy, c1, 1e-3).to_floats();
  const auto dx2 = frozen.backward(dy, c2, 1e-3).to_floats();
  EXPECT_LE(max_rel(dx2, dx1), 2e-6);
  EXPECT_LE(max_rel(frozen.gate_weight.grad.to_floats(), dense.gate_weight.grad.to_floats()), 2e-6);
  for (const auto& ew : frozen.experts) EXPECT_FALSE(ew.w1.grad.defined());
}

}  // namespace
}  // namespace dsv4
