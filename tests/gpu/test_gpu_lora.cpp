// LoRA and frozen weights on CUDA tensors: the hashed_dropout op (bit-identical to the CPU twin, strided input), a
// Linear with an adapter over an F32, frozen BF16, frozen FP8 and frozen FP4 base (FP4 dequantised through FP8 on the
// device, lossless here) in fp32, bf16 and fp8 on the GPU against the same Linear on the CPU (y, dx, dA, dB within
// 2e-5 · max|cpu| in fp32, 1e-4 otherwise: the same rounded or quantised operands on both sides, only FP32 accumulation
// orders differ). Skips without a GPU.
#include <optional>
#include <string>

#include "gpu_test_util.h"
#include "model/layers.h"
#include "model/matmul_precision.h"
#include "model/lora.h"
#include "model/quant.h"
#include "runtime/model_math.h"
#include "runtime/model_ops.h"

namespace dsv4::gputest {
namespace {

class GpuLora : public GpuTest {};

void close(const Tensor& gpu, const Tensor& cpu, double rtol, const std::string& what) {
  ASSERT_EQ(gpu.shape(), cpu.shape()) << what;
  EXPECT_TRUE(gpu.device().is_cuda()) << what;
  const auto g = gpu.to(kCpu).to_floats(), c = cpu.to_floats();
  expect_close_scaled({g.begin(), g.end()}, {c.begin(), c.end()}, rtol, what);
}

TEST_F(GpuLora, HashedDropoutMatchesCpuBitForBit) {
  const Tensor wide = rand_cpu({37, 300});
  const Tensor x = wide.slice(1, 7, 290);
  const uint64_t stream = dropout_stream(77, 3);
  expect_same_bits(hashed_dropout(x.to(kGpu).contiguous(), stream, 0.3, 1.0f / 0.7f, 12345),
                   hashed_dropout(x.contiguous(), stream, 0.3, 1.0f / 0.7f, 12345), "contiguous");
  const Tensor wide_gpu = wide.to(kGpu);
  expect_same_bits(hashed_dropout(wide_gpu.slice(1, 7, 290), stream, 0.3, 1.0f / 0.7f, 12345),
                   hashed_dropout(x, stream, 0.3, 1.0f / 0.7f, 12345), "strided");
}

TEST_F(GpuLora, LinearAdapterOnFrozenBasesMatchesCpu) {
  for (MatmulPrecision p : {MatmulPrecision::F32, MatmulPrecision::BF16, MatmulPrecision::FP8})
  for (int variant = 0; variant < 4; ++variant) {  // F32 trainable-off base, BF16, FP8, FP4 frozen
    SCOPED_TRACE(std::string(matmul_precision_name(p)) + " variant " + std::to_string(variant));
    // The same rounded / quantised operands on both sides: only FP32 accumulation orders differ (FP8: cuBLASLt's
    // block-scaled sums against the exact reference, measured 1.01e-4 of max|ref|).
    const double tol = p == MatmulPrecision::F32 ? 2e-5 : p == MatmulPrecision::BF16 ? 1e-4 : 5e-4;
    const int64_t in = 300, out = 260, T = 45;
    Linear cpu("x.weight", in, out);
    cpu.weight.value = rand_cpu({out, in}, -0.5f, 0.5f);
    cpu.weight.trainable = false;
    const WeightFormat fmt[] = {WeightFormat::F32, WeightFormat::BF16, WeightFormat::FP8, WeightFormat::FP4};
    if (variant > 0) cpu.set_frozen(quantize_weight(cpu.weight.value, fmt[variant], ScaleFormat::E8M0, "x"));
    cpu.lora.emplace("x", 8, in, out, 2.0, 0.2, 41);
    cpu.lora->train = true;
    cpu.lora->A.value = rand_cpu({8, in}, -0.3f, 0.3f);
    cpu.lora->B.value = rand_cpu({out, 8}, -0.3f, 0.3f);
    cpu.set_precision(p);
    Linear gpu = cpu;
    if (variant > 0) gpu.frozen = to_device(cpu.frozen, kGpu, "x.weight");
    else gpu.weight.value = cpu.weight.value.to(kGpu);
    gpu.lora->A.value = cpu.lora->A.value.to(kGpu);
    gpu.lora->B.value = cpu.lora->B.value.to(kGpu);
    const Tensor x = rand_cpu({T, in}), dy = rand_cpu({T, out});
    LinearCtx cc, gc;
    close(gpu.forward(x.to(kGpu), &gc), cpu.forward(x, &cc), tol, "y");
    close(gpu.backward(dy.to(kGpu), gc), cpu.backward(dy, cc), tol, "dx");
    close(gpu.lora->A.grad, cpu.lora->A.grad, tol, "dA");
    close(gpu.lora->B.grad, cpu.lora->B.grad, tol, "dB");
  }
}

}  // namespace
}  // namespace dsv4::gputest

#include "../model/test_lora_util.h"

namespace dsv4::gputest {
namespace {

// A whole LoRA setup on the GPU (release tiny checkpoint: FP8 dense, FP4 experts dequantised through FP8, FP8 wo_a;
// adapters on attention incl. wo_a, experts and router; dropout on) against the same model on the CPU: losses within
// 1e-5 relative, every adapter gradient within 2e-3 · max|cpu| (as tests/gpu/test_gpu_model.cpp's whole-model bound).
TEST_F(GpuLora, FrozenReleaseModelWithAdaptersMatchesCpu) {
  const lora_test::TmpDir dir("gpu");
  auto cpu = lora_test::adapted_release_model(dir.str(), true);
  auto gpu = lora_test::adapted_release_model(dir.str(), false);
  lora_test::fill_B(*cpu, 8, 0.05f);
  lora_test::fill_B(*gpu, 8, 0.05f);
  gpu->to(kGpu);
  const SeqLayout layout(2, 17);
  const Tensor ids = rand_index({layout.tokens()}, cpu->config().vocab_size);
  const LossWeights w{0.3, 1e-3};
  const LossResult rc = cpu->forward_backward(ids, ids, layout, w);
  const LossResult rg = gpu->forward_backward(ids, ids, layout, w);
  EXPECT_NEAR(rg.total, rc.total, 1e-5 * std::abs(rc.total));
  const std::vector<Param*> a = lora_params(*cpu), b = lora_params(*gpu);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(b[i]->grad.defined()) << b[i]->name;
    const auto g = b[i]->grad.to(kCpu).to_floats(), c = a[i]->grad.to_floats();
    expect_close_scaled({g.begin(), g.end()}, {c.begin(), c.end()}, 2e-3, a[i]->name);
  }
}

}  // namespace
}  // namespace dsv4::gputest
