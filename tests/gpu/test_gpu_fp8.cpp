// Block-scaled FP8 on the GPU (runtime/fp8.h, kernels/ops_fp8_*.cu) against the CPU reference:
//  * every quantiser bit for bit (codes and scales), F32 and BF16 inputs, strided inputs, odd shapes;
//  * dequantisation, FP4 -> FP8 block conversion and the 128x128 block transpose bit for bit;
//  * the fallback GEMM kernel bit for bit (it evaluates the reference's exact definition);
//  * the default path (cuBLASLt's block-scaled kernels where they accept the problem) within a tolerance.
//    Tolerance: |gpu - ref| <= 2^-10 * sum_k |a_k b_k| (dequantised operands). A strict FP32 bound for an arbitrary
//    accumulation order inside the 128-wide blocks would be about (K + 3 KB) * 2^-24 * sum |a_k b_k|; Hopper's
//    FP8 tensor cores accumulate with ~14 bits inside a WGMMA chain (DeepSeek-V3 §3.3.2) before cuBLASLt promotes
//    to FP32, so the test allows 2^-10 and prints the largest observed error ratio for the record.
// Every test skips without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "runtime/fp8.h"

namespace dsv4::gputest {
namespace {

class GpuFp8 : public GpuTest {};

Tensor wide_cpu(int64_t r, int64_t c) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> e(-20, 10);
  std::vector<float> v(static_cast<size_t>(r * c));
  for (auto& x : v) x = std::ldexp(u(rng()), e(rng()));
  return Tensor::from_floats({r, c}, v);
}

void expect_same_fp8(const Fp8Tensor& got, const Fp8Tensor& want, const std::string& what) {
  EXPECT_EQ(got.layout, want.layout) << what;
  expect_same_bits(got.q, want.q, what + " codes");
  expect_same_bits(got.scale, want.scale, what + " scales");
}

Fp8Tensor to_gpu(const Fp8Tensor& t) { return {t.q.to(kGpu), t.scale.to(kGpu), t.layout}; }

const std::vector<std::pair<int64_t, int64_t>> kShapes = {{1, 1}, {1, 100}, {3, 300}, {130, 7}, {129, 257}, {256, 512}};

TEST_F(GpuFp8, QuantisersMatchCpuBitwise) {
  for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32})
    for (auto [M, K] : kShapes)
      for (DType dt : {DType::F32, DType::BF16}) {
        Tensor x = wide_cpu(M, K);
        if (K > 128)
          for (int64_t k = 128; k < std::min<int64_t>(K, 256); ++k) x.data<float>()[k] = 0.0f;  // a zero group
        x = x.to(dt);
        const Tensor xg = x.to(kGpu);
        const std::string what = fmt::format("{}x{} {} {}", M, K, dtype_name(dt), sf == ScaleFormat::F32 ? "f32" : "e8m0");
        expect_same_fp8(fp8_quantize_rows(xg, sf), fp8_quantize_rows(x, sf), "rows " + what);
        expect_same_fp8(fp8_quantize_rows_t(xg, sf), fp8_quantize_rows_t(x, sf), "rows_t " + what);
        expect_same_fp8(fp8_quantize_blocks(xg, sf), fp8_quantize_blocks(x, sf), "blocks " + what);
        // Strided input: the transposed view.
        expect_same_fp8(fp8_quantize_rows(xg.transpose(0, 1), sf), fp8_quantize_rows(x.transpose(0, 1), sf),
                        "rows of a transposed view " + what);
        expect_same_fp8(fp8_quantize_blocks(xg.transpose(0, 1), sf), fp8_quantize_blocks(x.transpose(0, 1), sf),
                        "blocks of a transposed view " + what);
      }
}

// The quantisers' vector paths (unit column stride, 16-byte aligned base, K and the row stride multiples of 4 (F32)
// or 8 (BF16); M a multiple of 16 for the transposed one's 16-byte stores) and their scalar fallbacks: a base 1
// element past alignment, a row stride of K + 4, partial last groups.
TEST_F(GpuFp8, QuantisersVectorAndScalarPaths) {
  for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32})
    for (auto [M, K] : std::vector<std::pair<int64_t, int64_t>>{{64, 2048}, {5, 136}, {130, 264}, {272, 1024}, {17, 36}})
      for (DType dt : {DType::F32, DType::BF16}) {
        const Tensor x = wide_cpu(M, K).to(dt);
        const std::string what = fmt::format("{}x{} {} {}", M, K, dtype_name(dt), sf == ScaleFormat::F32 ? "f32" : "e8m0");
        Tensor buf = Tensor::zeros({M * K + 8}, dt, kGpu);
        Tensor mis = buf.slice(0, 1, M * K + 1).view({M, K});
        mis.copy_from(x);
        Tensor wide = Tensor::zeros({M, K + 4}, dt, kGpu);
        Tensor strided = wide.slice(1, 0, K);
        strided.copy_from(x);
        const auto rc = fp8_quantize_rows(x, sf), tc = fp8_quantize_rows_t(x, sf), bc = fp8_quantize_blocks(x, sf);
        for (auto [name, xg] : std::vector<std::pair<std::string, Tensor>>{
                 {"aligned", x.to(kGpu)}, {"misaligned", mis}, {"row stride K+4", strided}}) {
          expect_same_fp8(fp8_quantize_rows(xg, sf), rc, "rows " + name + " " + what);
          expect_same_fp8(fp8_quantize_rows_t(xg, sf), tc, "rows_t " + name + " " + what);
          expect_same_fp8(fp8_quantize_blocks(xg, sf), bc, "blocks " + name + " " + what);
        }
      }
}

TEST_F(GpuFp8, SaturationMatchesCpu) {
  std::vector<float> v = {3.0e38f, -3.3e38f, 1.0f, 0.0f, 1e-30f, -448.0f};
  v.resize(200, 0.5f);
  const Tensor x = Tensor::from_floats({1, 200}, v);
  for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32}) {
    expect_same_fp8(fp8_quantize_rows(x.to(kGpu), sf), fp8_quantize_rows(x, sf), "rows");
    expect_same_fp8(fp8_quantize_blocks(x.to(kGpu), sf), fp8_quantize_blocks(x, sf), "blocks");
  }
}

TEST_F(GpuFp8, DequantiseMatchesCpuBitwise) {
  for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32})
    for (auto [M, K] : kShapes) {
      const Tensor x = wide_cpu(M, K);
      for (const Fp8Tensor& t : {fp8_quantize_rows(x, sf), fp8_quantize_blocks(x, sf)})
        expect_same_bits(fp8_dequantize(to_gpu(t)), fp8_dequantize(t), fmt::format("dequantise {}x{}", M, K));
    }
}

struct Case {
  int64_t M, N, K;
};
// Non-multiples of 128, M = 1, K < 128, and cuBLASLt-friendly shapes.
const std::vector<Case> kGemmCases = {{1, 1, 1},       {1, 64, 100},    {5, 9, 300},     {130, 129, 257},
                                      {64, 256, 512},  {1, 256, 1024},  {128, 384, 640}, {256, 512, 1024},
                                      {100, 200, 384}, {4, 128, 128}};

struct Operands {
  Fp8Tensor a, b;
  std::string what;
};
Operands make_operands(const Case& cs, ScaleFormat sf, Fp8Layout bl) {
  Tensor x = rand_cpu({cs.M, cs.K}, -3.0f, 3.0f);
  const Tensor w = wide_cpu(cs.N, cs.K);
  if (cs.M > 1)
    for (int64_t k = 0; k < cs.K; ++k) x.data<float>()[k] = 0.0f;
  Operands o;
  o.a = fp8_quantize_rows(x, sf);
  o.b = bl == Fp8Layout::Rows1x128 ? fp8_quantize_rows(w, sf) : fp8_quantize_blocks(w, sf);
  o.what = fmt::format("M={} N={} K={} {} b={}", cs.M, cs.N, cs.K, sf == ScaleFormat::E8M0 ? "e8m0" : "f32",
                       bl == Fp8Layout::Rows1x128 ? "1x128" : "128x128");
  return o;
}

// Packed FP4 codes (every nibble value) with 1x32 E8M0 scale codes spread over [base, base + spread]: spreads above
// 14 within a 128x128 block exercise the rounding of small values (the lossy side of the conversion).
std::pair<Tensor, Tensor> random_fp4(int64_t R, int64_t C, int base, int spread) {
  std::uniform_int_distribution<int> byte(0, 255), code(base, base + spread);
  Tensor bytes = Tensor::empty({R, C / 2}, DType::U8);
  for (int64_t i = 0; i < bytes.numel(); ++i) bytes.data_u8()[i] = static_cast<uint8_t>(byte(rng()));
  Tensor packed = Tensor::empty({R, C}, DType::F4_E2M1);
  std::copy_n(bytes.data_u8(), bytes.numel(), packed.data_u8());
  Tensor scale = Tensor::empty({R, (C + 31) / 32}, DType::F8_E8M0);
  for (int64_t i = 0; i < scale.numel(); ++i) scale.data_u8()[i] = static_cast<uint8_t>(code(rng()));
  return {packed, scale};
}

TEST_F(GpuFp8, Fp4ToFp8MatchesCpuBitwise) {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 2}, {3, 64}, {130, 258}, {129, 32}, {256, 512}};
  for (auto [R, C] : shapes)
    for (int spread : {0, 6, 30}) {
      const auto [packed, scale] = random_fp4(R, C, 110, spread);
      const Fp8Tensor want = fp4_to_fp8_blocks(packed, scale, "w");
      const Fp8Tensor got = fp4_to_fp8_blocks(packed.to(kGpu), scale.to(kGpu), "w");
      expect_same_fp8(got, want, fmt::format("fp4->fp8 {}x{} spread {}", R, C, spread));
    }
  auto [packed, scale] = random_fp4(130, 258, 110, 6);
  scale.data_u8()[5 * scale.size(1) + 3] = 0xFF;
  EXPECT_THROW(fp4_to_fp8_blocks(packed.to(kGpu), scale.to(kGpu), "w"), Error);
  try {
    fp4_to_fp8_blocks(packed.to(kGpu), scale.to(kGpu), "layers.1.ffn.experts.3.w2.weight");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp4_to_fp8(layers.1.ffn.experts.3.w2.weight): scale [5, 3]"), std::string::npos)
        << e.what();
  }
}

TEST_F(GpuFp8, TransposeBlocksMatchesCpuBitwise) {
  for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32})
    for (auto [R, C] : kShapes) {
      const Fp8Tensor w = fp8_quantize_blocks(wide_cpu(R, C), sf);
      expect_same_fp8(fp8_transpose_blocks(to_gpu(w)), fp8_transpose_blocks(w), fmt::format("transpose {}x{}", R, C));
    }
}

TEST_F(GpuFp8, FallbackGemmMatchesCpuBitwise) {
  for (const Case& cs : kGemmCases)
    for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32})
      for (Fp8Layout bl : {Fp8Layout::Rows1x128, Fp8Layout::Blocks128x128}) {
        const Operands o = make_operands(cs, sf, bl);
        const Tensor want = fp8_matmul(o.a, o.b);
        const Tensor got = fp8_matmul(to_gpu(o.a), to_gpu(o.b), Fp8GemmImpl::Fallback);
        expect_same_bits(got, want, "fallback " + o.what);
      }
}

TEST_F(GpuFp8, DefaultGemmMatchesCpuWithinAccumulationTolerance) {
  double worst = 0.0;
  int lt_cases = 0;
  for (const Case& cs : kGemmCases)
    for (ScaleFormat sf : {ScaleFormat::E8M0, ScaleFormat::F32})
      for (Fp8Layout bl : {Fp8Layout::Rows1x128, Fp8Layout::Blocks128x128}) {
        const Operands o = make_operands(cs, sf, bl);
        const Fp8Tensor ag = to_gpu(o.a), bg = to_gpu(o.b);
        Tensor got = Tensor::empty({cs.M, cs.N}, DType::F32, kGpu);
        const bool lt = cuda::fp8_gemm_cublaslt_accepts(ag.q, bg.q, bl, got);
        lt_cases += lt ? 1 : 0;
        fp8_gemm(ag, bg, got);
        const Tensor want = fp8_matmul(o.a, o.b);
        // sum_k |a_k b_k| of the dequantised operands.
        const Tensor da = fp8_dequantize(o.a), db = fp8_dequantize(o.b);
        const auto g = got.to_floats(), w = want.to_floats(), av = da.to_floats(), bv = db.to_floats();
        std::vector<float> tol(g.size());
        for (int64_t m = 0; m < cs.M; ++m)
          for (int64_t n = 0; n < cs.N; ++n) {
            double s = 0;
            for (int64_t k = 0; k < cs.K; ++k)
              s += std::fabs(double(av[size_t(m * cs.K + k)]) * double(bv[size_t(n * cs.K + k)]));
            const size_t i = size_t(m * cs.N + n);
            tol[i] = static_cast<float>(std::ldexp(s, -10));
            if (s > 0) worst = std::max(worst, std::fabs(double(g[i]) - double(w[i])) / s);
          }
        expect_within(got, want, tol, (lt ? "cuBLASLt " : "fallback ") + o.what);
      }
  std::printf("[ fp8 ] cuBLASLt took %d of %zu cases; max |gpu - ref| / sum|a b| = %.3g (2^%.1f)\n", lt_cases,
              kGemmCases.size() * 4, worst, worst > 0 ? std::log2(worst) : -INFINITY);
}

TEST_F(GpuFp8, CublasLtImplPadsOddShapes) {
  // M, N, K none of them multiples of 4 / 128: cuBLASLt runs on zero-padded copies and returns the M x N block.
  for (Fp8Layout bl : {Fp8Layout::Rows1x128, Fp8Layout::Blocks128x128}) {
    const Operands o = make_operands({5, 9, 300}, ScaleFormat::F32, bl);
    const Tensor got = fp8_matmul(to_gpu(o.a), to_gpu(o.b), Fp8GemmImpl::CublasLt);
    const Tensor want = fp8_matmul(o.a, o.b);
    ASSERT_EQ(got.shape(), want.shape());
    const auto g = got.to_floats(), w = want.to_floats();
    double max_ref = 0;
    for (float v : w) max_ref = std::max(max_ref, double(std::fabs(v)));
    for (size_t i = 0; i < g.size(); ++i) EXPECT_NEAR(g[i], w[i], 1e-3 * max_ref) << o.what << " element " << i;
  }
}

TEST_F(GpuFp8, EmptyKGivesZeros) {
  const Fp8Tensor a = fp8_quantize_rows(Tensor::zeros({3, 0}, DType::F32, kGpu), ScaleFormat::E8M0);
  const Fp8Tensor b = fp8_quantize_blocks(Tensor::zeros({4, 0}, DType::F32, kGpu), ScaleFormat::E8M0);
  for (float v : fp8_matmul(a, b).to_floats()) EXPECT_EQ(v, 0.0f);
}

}  // namespace
}  // namespace dsv4::gputest
