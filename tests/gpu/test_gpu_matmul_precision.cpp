// The precision modes of the weight GEMMs (model/matmul_precision.h) on CUDA tensors against the CPU:
//  * bf16: cuBLAS on BF16 operands vs the CPU's F32 GEMM of the same BF16-rounded values: the products are exact
//    in FP32, only the accumulation order differs: |gpu - cpu| <= 2^-14 sum |a b| (as the grouped GEMM test);
//  * fp8: the quantisers are bit-exact (test_gpu_fp8.cpp), so the operands are the CPU's; the GEMMs run in cuBLASLt
//    where it accepts the shape: |gpu - cpu| <= 2^-10 sum |a b| over the dequantised operands (test_gpu_fp8.cpp's
//    bound); the Dgrad operand goes through fp8_transpose_blocks and the Wgrad operands through the transposed
//    quantiser on the device.
// Skips without a GPU.
#include <cmath>
#include <cstdio>
#include <string>

#include "gpu_test_util.h"
#include "model/matmul_precision.h"
#include "runtime/fp8.h"
#include "runtime/ops.h"

namespace dsv4::gputest {
namespace {

class GpuMatmulPrecision : public GpuTest {};

// Per-element bound scale: sum_k |a[i, k]| |b[j, k]| of the dequantised / rounded operands (F32 CPU tensors).
Tensor abs_of(const Tensor& t) { return ops::unary(UnaryOp::Abs, t.contiguous()); }

double check_bound(const Tensor& got_gpu, const Tensor& want, const Tensor& S, double rel, const std::string& what) {
  const auto g = got_gpu.to(kCpu).to_floats(), w = want.to_floats(), s = S.to_floats();
  std::vector<float> tol(g.size());
  double worst = 0.0;
  for (size_t i = 0; i < g.size(); ++i) {
    tol[i] = static_cast<float>(rel * s[i] + 1e-30);
    if (s[i] > 0 && std::isfinite(g[i])) worst = std::max(worst, std::fabs(double(g[i]) - w[i]) / s[i]);
  }
  expect_within(got_gpu.to(kCpu), want, tol, what);
  return worst;
}

TEST_F(GpuMatmulPrecision, Bf16AndFp8MatchCpu) {
  double worst16 = 0, worst8 = 0;
  for (auto [T, I, O] : {std::tuple<int64_t, int64_t, int64_t>{256, 512, 384}, {100, 384, 256}, {64, 200, 130}}) {
    const Tensor x = rand_cpu({T, I}), w = rand_cpu({O, I}, -0.1f, 0.1f), dy = rand_cpu({T, O});
    const Tensor xg = x.to(kGpu), wg = w.to(kGpu), dyg = dy.to(kGpu);
    const std::string shape = fmt::format("T={} I={} O={}", T, I, O);
    // bf16
    {
      const Tensor xb = x.to(DType::BF16).to(DType::F32), wb = w.to(DType::BF16).to(DType::F32),
                   dyb = dy.to(DType::BF16).to(DType::F32);
      constexpr double kB = 1.0 / 16384;
      worst16 = std::max(worst16, check_bound(pmatmul_xwT(MatmulPrecision::BF16, xg, wg),
                                              pmatmul_xwT(MatmulPrecision::BF16, x, w),
                                              ops::matmul(abs_of(xb), abs_of(wb), false, true), kB, "bf16 fprop " + shape));
      worst16 = std::max(worst16, check_bound(pmatmul_dyW(MatmulPrecision::BF16, dyg, wg),
                                              pmatmul_dyW(MatmulPrecision::BF16, dy, w),
                                              ops::matmul(abs_of(dyb), abs_of(wb)), kB, "bf16 dgrad " + shape));
      Tensor dWg = Tensor::zeros({O, I}, DType::F32, kGpu), dW = Tensor::zeros({O, I}, DType::F32);
      pgemm_dW(MatmulPrecision::BF16, dyg, xg, dWg);
      pgemm_dW(MatmulPrecision::BF16, dy, x, dW);
      worst16 = std::max(worst16, check_bound(dWg, dW, ops::matmul(abs_of(dyb), abs_of(xb), true, false), kB,
                                              "bf16 wgrad " + shape));
    }
    // fp8
    {
      constexpr double kB = 1.0 / 1024;
      const ScaleFormat f = ScaleFormat::F32;
      const Tensor xq = fp8_dequantize(fp8_quantize_rows(x, f)), wq = fp8_dequantize(fp8_quantize_blocks(w, f));
      const Tensor dyq = fp8_dequantize(fp8_quantize_rows(dy, f));
      worst8 = std::max(worst8, check_bound(pmatmul_xwT(MatmulPrecision::FP8, xg, wg),
                                            pmatmul_xwT(MatmulPrecision::FP8, x, w),
                                            ops::matmul(abs_of(xq), abs_of(wq), false, true), kB, "fp8 fprop " + shape));
      worst8 = std::max(worst8, check_bound(pmatmul_dyW(MatmulPrecision::FP8, dyg, wg),
                                            pmatmul_dyW(MatmulPrecision::FP8, dy, w),
                                            ops::matmul(abs_of(dyq), abs_of(wq)), kB, "fp8 dgrad " + shape));
      const Tensor dyt = fp8_dequantize(fp8_quantize_rows_t(dy, f)), xt = fp8_dequantize(fp8_quantize_rows_t(x, f));
      Tensor dWg = Tensor::zeros({O, I}, DType::F32, kGpu), dW = Tensor::zeros({O, I}, DType::F32);
      pgemm_dW(MatmulPrecision::FP8, dyg, xg, dWg);
      pgemm_dW(MatmulPrecision::FP8, dy, x, dW);
      worst8 = std::max(worst8, check_bound(dWg, dW, ops::matmul(abs_of(dyt), abs_of(xt), false, true), kB,
                                            "fp8 wgrad " + shape));
    }
  }
  std::printf("[ precision ] max |gpu - cpu| / sum|a b|: bf16 %.3g (2^%.1f, bound 2^-14), fp8 %.3g (2^%.1f, bound 2^-10)\n",
              worst16, worst16 > 0 ? std::log2(worst16) : -INFINITY, worst8, worst8 > 0 ? std::log2(worst8) : -INFINITY);
}

}  // namespace
}  // namespace dsv4::gputest
