// Precision modes of the weight GEMMs (model/matmul_precision.h): each mode is its definition (fp32 = the plain
// GEMMs, bf16 = the F32 GEMM of BF16-rounded operands, fp8 = the block-scaled FP8 GEMMs of runtime/fp8.h with F32
// scales) bit for bit, the row-pointer forms equal the tensor forms, and the whole tiny model trains in bf16 / fp8
// close to fp32 (loss and every weight gradient).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "model/layers.h"
#include "model/matmul_precision.h"
#include "test_lora_util.h"  // random_ids
#include "model/model.h"
#include "runtime/cpu_blas.h"
#include "runtime/fp8.h"
#include "runtime/ops.h"

namespace dsv4 {
namespace {

Tensor randn(int64_t r, int64_t c, uint32_t seed, float sd = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> n(0.0f, sd);
  std::vector<float> v(static_cast<size_t>(r * c));
  for (auto& x : v) x = n(g);
  return Tensor::from_floats({r, c}, v);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  const Tensor x = a.contiguous(), y = b.contiguous();
  return x.shape() == y.shape() && std::memcmp(x.raw_data(), y.raw_data(), static_cast<size_t>(x.nbytes())) == 0;
}

double rel_err(const Tensor& got, const Tensor& want) {
  const auto g = got.to_floats(), w = want.to_floats();
  double num = 0, den = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    num += (double(g[i]) - w[i]) * (double(g[i]) - w[i]);
    den += double(w[i]) * w[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

Tensor bf16_round(const Tensor& t) { return t.to(DType::BF16).to(DType::F32); }

TEST(MatmulPrecision, NamesParseAndRejects) {
  for (MatmulPrecision p : {MatmulPrecision::F32, MatmulPrecision::BF16, MatmulPrecision::FP8})
    EXPECT_EQ(parse_matmul_precision(matmul_precision_name(p), "x"), p);
  try {
    parse_matmul_precision("fp16", "train.precision");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.precision: unknown precision 'fp16' (expected fp32, bf16 or fp8)"),
              std::string::npos)
        << e.what();
  }
}

TEST(MatmulPrecision, EachModeIsItsDefinition) {
  const int64_t T = 37, I = 200, O = 130;  // K not a multiple of 128, partial blocks both ways
  const Tensor x = randn(T, I, 1), w = randn(O, I, 2, 0.05f), dy = randn(T, O, 3);
  const Tensor dW0 = randn(O, I, 4, 0.1f);
  // fp32: the plain GEMMs.
  EXPECT_TRUE(same_bits(pmatmul_xwT(MatmulPrecision::F32, x, w), ops::matmul(x, w, false, true)));
  EXPECT_TRUE(same_bits(pmatmul_dyW(MatmulPrecision::F32, dy, w), ops::matmul(dy, w)));
  // bf16: F32 GEMMs of the rounded operands.
  EXPECT_TRUE(same_bits(pmatmul_xwT(MatmulPrecision::BF16, x, w), ops::matmul(bf16_round(x), bf16_round(w), false, true)));
  EXPECT_TRUE(same_bits(pmatmul_dyW(MatmulPrecision::BF16, dy, w), ops::matmul(bf16_round(dy), bf16_round(w))));
  {
    Tensor got = dW0.clone(), want = dW0.clone();
    pgemm_dW(MatmulPrecision::BF16, dy, x, got);
    ops::gemm(bf16_round(dy), true, bf16_round(x), false, 1.0f, 1.0f, want);
    EXPECT_TRUE(same_bits(got, want));
  }
  // fp8: Fprop / Dgrad / Wgrad of the recipe with F32 scales.
  const Fp8Tensor wq = fp8_quantize_blocks(w, ScaleFormat::F32);
  EXPECT_TRUE(same_bits(pmatmul_xwT(MatmulPrecision::FP8, x, w),
                        fp8_matmul(fp8_quantize_rows(x, ScaleFormat::F32), wq)));
  EXPECT_TRUE(same_bits(pmatmul_dyW(MatmulPrecision::FP8, dy, w),
                        fp8_matmul(fp8_quantize_rows(dy, ScaleFormat::F32), fp8_transpose_blocks(wq))));
  {
    Tensor got = dW0.clone();
    pgemm_dW(MatmulPrecision::FP8, dy, x, got);
    const Tensor prod = fp8_matmul(fp8_quantize_rows_t(dy, ScaleFormat::F32), fp8_quantize_rows_t(x, ScaleFormat::F32));
    EXPECT_TRUE(same_bits(got, ops::binary(BinaryOp::Add, dW0, prod)));
  }
  // Close to fp32 (E4M3 carries 3 mantissa bits: about 2-4% relative error on random data; BF16 about 0.3%).
  const Tensor y32 = pmatmul_xwT(MatmulPrecision::F32, x, w);
  const double e16 = rel_err(pmatmul_xwT(MatmulPrecision::BF16, x, w), y32);
  const double e8 = rel_err(pmatmul_xwT(MatmulPrecision::FP8, x, w), y32);
  EXPECT_LT(e16, 5e-3);
  EXPECT_LT(e8, 6e-2);
  EXPECT_GT(e8, e16);
  std::printf("[ precision ] relative error vs fp32 of y = x W^T: bf16 %.2e, fp8 %.2e\n", e16, e8);
}

TEST(MatmulPrecision, RowFormsEqualTensorForms) {
  const int64_t n = 19, in = 150, out = 70, ld = 170;  // leading dimensions wider than the blocks
  const Tensor Xb = randn(n, ld, 5), W = randn(out, in, 6, 0.05f), dYb = randn(n, ld, 7);
  const Tensor X = Xb.slice(1, 10, 10 + in), dY = dYb.slice(1, 3, 3 + out);
  for (MatmulPrecision p : {MatmulPrecision::F32, MatmulPrecision::BF16, MatmulPrecision::FP8}) {
    const std::string what(matmul_precision_name(p));
    Tensor Y = randn(n, ld, 8);
    const Tensor Y0 = Y.clone();
    pgemm_xwT_rows(p, n, in, out, Xb.data<float>() + 10, ld, W.data<float>(), 0.5f, Y.data<float>() + 1, ld);
    const Tensor want_y = ops::binary(BinaryOp::Add, pmatmul_xwT(p, X, W), ops::affine(Y0.slice(1, 1, 1 + out), 0.5, 0));
    EXPECT_LT(rel_err(Y.slice(1, 1, 1 + out), want_y), 1e-6) << what;
    EXPECT_TRUE(same_bits(Y.slice(1, 0, 1), Y0.slice(1, 0, 1))) << what << ": columns outside the block changed";
    Tensor dX = randn(n, ld, 9);
    pgemm_dyW_rows(p, n, in, out, dYb.data<float>() + 3, ld, W.data<float>(), 0.0f, dX.data<float>() + 2, ld);
    EXPECT_LT(rel_err(dX.slice(1, 2, 2 + in), pmatmul_dyW(p, dY, W)), 1e-6) << what;
    Tensor dW = randn(out, in, 10), want_dW = dW.clone();
    pgemm_dW_rows(p, n, in, out, dYb.data<float>() + 3, ld, Xb.data<float>() + 10, ld, dW.data<float>());
    pgemm_dW(p, dY, X, want_dW);
    EXPECT_TRUE(same_bits(dW, want_dW)) << what;
  }
  // fp32 row forms are cpu_gemm itself.
  Tensor Y = Tensor::zeros({n, out}, DType::F32), want = Tensor::zeros({n, out}, DType::F32);
  pgemm_xwT_rows(MatmulPrecision::F32, n, in, out, Xb.data<float>() + 10, ld, W.data<float>(), 0.0f, Y.data<float>(),
                 out);
  cpu_gemm(false, true, n, out, in, 1.0f, Xb.data<float>() + 10, ld, W.data<float>(), in, 0.0f, want.data<float>(), out);
  EXPECT_TRUE(same_bits(Y, want));
}

// Frozen weights in each precision: fp32 is quant.h's qmatmul; bf16 is the BF16 GEMM of the dequantised weight
// (bit for bit); fp8 uses the weight's own codes and scales (an FP8 E8M0 weight: exactly fp8_matmul on its blocks;
// FP4 through fp4_to_fp8_blocks) and lands near the FP32 product; the row forms equal the tensor forms.
TEST(MatmulPrecision, FrozenWeightsInEachPrecision) {
  const Tensor w = randn(200, 260, 3, 0.05f), x = randn(37, 260, 4), dy = randn(37, 200, 5);
  for (WeightFormat f : {WeightFormat::FP8, WeightFormat::FP4, WeightFormat::BF16}) {
    SCOPED_TRACE(std::string(weight_format_name(f)));
    const QuantizedWeight q = quantize_weight(w, f, ScaleFormat::E8M0, "w");
    const Tensor wd = q.dequantize();
    EXPECT_TRUE(same_bits(qpmatmul_xwT(MatmulPrecision::F32, x, q), qmatmul_xwT(x, q)));
    EXPECT_TRUE(same_bits(qpmatmul_xwT(MatmulPrecision::BF16, x, q), pmatmul_xwT(MatmulPrecision::BF16, x, wd)));
    EXPECT_TRUE(same_bits(qpmatmul_dyW(MatmulPrecision::BF16, dy, q), pmatmul_dyW(MatmulPrecision::BF16, dy, wd)));
    const Tensor y8 = qpmatmul_xwT(MatmulPrecision::FP8, x, q), dx8 = qpmatmul_dyW(MatmulPrecision::FP8, dy, q);
    if (f == WeightFormat::FP8) {
      const Fp8Tensor blocks{q.data, q.scale, Fp8Layout::Blocks128x128};
      EXPECT_TRUE(same_bits(y8, fp8_matmul(fp8_quantize_rows(x, ScaleFormat::F32), blocks)));
    }
    EXPECT_LT(rel_err(y8, qmatmul_xwT(x, q)), 0.05);
    EXPECT_LT(rel_err(dx8, qmatmul_dyW(dy, q)), 0.05);
    for (MatmulPrecision p : {MatmulPrecision::F32, MatmulPrecision::BF16, MatmulPrecision::FP8}) {
      Tensor y = Tensor::zeros({37, 200}, DType::F32), dx = Tensor::zeros({37, 260}, DType::F32);
      qpgemm_xwT_rows(p, q, 37, x.data<float>(), 260, 0.0f, y.data<float>(), 200);
      qpgemm_dyW_rows(p, q, 37, dy.data<float>(), 200, 0.0f, dx.data<float>(), 260);
      EXPECT_TRUE(same_bits(y, qpmatmul_xwT(p, x, q))) << matmul_precision_name(p);
      EXPECT_TRUE(same_bits(dx, qpmatmul_dyW(p, dy, q))) << matmul_precision_name(p);
    }
  }
}

TEST(MatmulPrecision, Fp8LinearKeepsOnlyTheWgradOperand) {
  Linear lin("lin.weight", 200, 90);
  lin.weight.value = randn(90, 200, 21, 0.05f);
  lin.set_precision(MatmulPrecision::FP8);
  const Tensor x = randn(33, 200, 22), dy = randn(33, 90, 23);
  LinearCtx ctx;
  const Tensor y = lin.forward(x, &ctx);
  EXPECT_FALSE(ctx.x.defined());  // the F32 input is not kept ...
  ASSERT_TRUE(ctx.x_fp8_t.q.defined());
  EXPECT_EQ(ctx.x_fp8_t.q.shape(), Shape({200, 33}));  // ... only its FP8 Wgrad operand (1 byte per element)
  EXPECT_EQ(ctx.x_fp8_t.q.dtype(), DType::F8_E4M3);
  const Tensor dx = lin.backward(dy, ctx);
  Tensor dW = Tensor::zeros({90, 200}, DType::F32);
  pgemm_dW(MatmulPrecision::FP8, dy, x, dW);
  EXPECT_TRUE(same_bits(lin.weight.grad, dW));
  EXPECT_TRUE(same_bits(dx, pmatmul_dyW(MatmulPrecision::FP8, dy, lin.weight.value)));
  EXPECT_TRUE(same_bits(y, pmatmul_xwT(MatmulPrecision::FP8, x, lin.weight.value)));
  // fp32 keeps x itself.
  lin.set_precision(MatmulPrecision::F32);
  LinearCtx c32;
  lin.forward(x, &c32);
  EXPECT_TRUE(c32.x.defined());
  EXPECT_FALSE(c32.x_fp8_t.q.defined());
}

TEST(MatmulPrecision, TinyModelTrainsCloseToFp32) {
  // Hash routing in every main layer, no CSA layer and no MTP / balance loss: a rounding cannot flip a learned top-k
  // choice (a flipped choice sends a token to other experts or keys, a discrete change no precision bound covers),
  // so the gradients differ only by the GEMMs' rounding.
  ModelConfig cfg = model_preset("tiny");
  cfg.vocab_size = 256;
  cfg.n_hash_layers = cfg.n_layers;
  cfg.compress_ratios = {0, 8, 0, 8, 0};  // SWA and HCA only: no indexer top-k to flip either
  const SeqLayout layout(2, 32);
  const Tensor ids = lora_test::random_ids(layout.tokens(), cfg.vocab_size, 11);
  const LossWeights w{0.0, 0.0};
  auto run = [&](MatmulPrecision p, std::map<std::string, Tensor>* grads) {
    Model m(cfg);
    m.init_random(3);
    m.set_matmul_precision(p);
    EXPECT_EQ(m.matmul_precision(), p);
    EXPECT_EQ(m.head.precision(), p == MatmulPrecision::FP8 ? MatmulPrecision::BF16 : p);
    const LossResult r = m.forward_backward(ids, ids, layout, w);
    m.visit([&](Param& q) {
      if (q.grad.defined()) (*grads)[q.name] = q.grad.clone();
    });
    return r.total;
  };
  std::map<std::string, Tensor> g32, g16, g8;
  const double l32 = run(MatmulPrecision::F32, &g32), l16 = run(MatmulPrecision::BF16, &g16),
               l8 = run(MatmulPrecision::FP8, &g8);
  EXPECT_NEAR(l16, l32, 2e-3 * l32);
  EXPECT_NEAR(l8, l32, 2e-2 * l32);
  EXPECT_NE(l8, l32);  // the mode is really applied
  double worst16 = 0, worst8 = 0, n32 = 0, d16 = 0, d8 = 0;
  std::string worst8_name;
  for (const auto& [name, g] : g32) {
    if (name.find("weight") == std::string::npos || name.find("norm") != std::string::npos ||
        name.rfind("mtp.", 0) == 0)
      continue;  // MTP carries no loss here
    const auto a = g.to_floats(), b = g16.at(name).to_floats(), c = g8.at(name).to_floats();
    for (size_t i = 0; i < a.size(); ++i) {
      n32 += double(a[i]) * a[i];
      d16 += (double(b[i]) - a[i]) * (double(b[i]) - a[i]);
      d8 += (double(c[i]) - a[i]) * (double(c[i]) - a[i]);
    }
    worst16 = std::max(worst16, rel_err(g16.at(name), g));
    const double e8 = rel_err(g8.at(name), g);
    if (e8 > worst8) worst8 = e8, worst8_name = name;
  }
  const double all16 = std::sqrt(d16 / n32), all8 = std::sqrt(d8 / n32);
  std::printf("[ precision ] tiny model loss fp32 %.6f bf16 %.6f fp8 %.6f; weight gradients vs fp32: all together "
              "bf16 %.2e fp8 %.2e; worst tensor bf16 %.2e, fp8 %.2e (%s)\n", l32, l16, l8, all16, all8,
              worst16, worst8, worst8_name.c_str());
  // Measured: bf16 0.8% together, 1.2% worst; fp8 11% together, 15% worst (3.7% per GEMM, compounded through the
  // Dgrad chain). A wrong operand or transposition gives errors of order 100%.
  EXPECT_LT(all16, 0.02);
  EXPECT_LT(all8, 0.2);
  EXPECT_LT(worst16, 0.04);
  EXPECT_LT(worst8, 0.3);
}

}  // namespace
}  // namespace dsv4
