// The optimizer and gradient clipping on CUDA parameters (state on the device, updates through runtime/model_ops.h)
// against the same on the CPU, for several steps of the tiny model (every group, wo_a row blocks, batched expert
// matrices), in both optimizer modes and with Muon's Newton-Schulz in FP32 and BF16. Bounds:
//   bit-identical  AdamW parameters and state, Muon momentum (the element-wise CUDA twins are bit-identical and the
//                  gradients are the same), the step counts, gradients scaled by a given factor;
//   Muon values    |gpu - cpu| <= sum over steps of lr * gamma * sqrt(max(block rows, cols)) * 2e-3, i.e. the
//                  Newton-Schulz bound of test_gpu_model_ops.cpp (atol 2e-3 on O) times the step scale (the values
//                  do not feed back into Newton-Schulz, so the per-step differences only add up);
//                  with ns_precision bf16 2^-5 instead of 2e-3 (test_gpu_model_ops.cpp's BF16 bound, 2^-5 max|O|,
//                  with max|O| <= ~1 for an orthogonalised O);
//   gradient norm  1e-12 relative (double chunk sums on the device vs double sums in order on the CPU; optim/clip.h).
// state_dict() of the device optimizer holds host tensors; the aux-loss-free bias update on a device bias is
// bit-identical (host round trip). Skips without a GPU.
#include <cmath>
#include <map>
#include <string>
#include <utility>

#include "gpu_test_util.h"
#include "optim/clip.h"
#include "optim/moe_bias.h"
#include "optim/optimizer.h"

namespace dsv4::gputest {
namespace {

class GpuOptimizer : public GpuTest {};

ModelConfig tiny_cfg() {
  ModelConfig cfg = model_preset("tiny");
  cfg.vocab_size = 64;
  return cfg;
}

// Step k's gradients on the CPU model, copied to the GPU model (one parameter skipped on odd steps).
void set_grads(Model& cpu, Model& gpu, int k) {
  std::map<std::string, Param*> g;
  gpu.visit([&](Param& p) { g[p.name] = &p; });
  std::mt19937 gen(100 + k);
  std::normal_distribution<float> d(0.0f, 0.1f);
  cpu.visit([&](Param& p) {
    if (!p.trainable || p.value.dtype() != DType::F32) return;
    Param& q = *g.at(p.name);
    if (k % 2 == 1 && p.name == "layers.1.attn.attn_sink") {
      p.grad = Tensor();
      q.grad = Tensor();
      return;
    }
    std::vector<float> v(static_cast<size_t>(p.value.numel()));
    for (auto& x : v) x = d(gen);
    p.grad = Tensor::from_floats(p.value.shape(), v);
    q.grad = p.grad.to(kGpu);
  });
}

TEST_F(GpuOptimizer, StepsMatchCpu) {
  const ModelConfig cfg = tiny_cfg();
  const std::pair<OptimizerMode, NsPrecision> cases[] = {{OptimizerMode::MuonAdamW, NsPrecision::F32},
                                                         {OptimizerMode::MuonAdamW, NsPrecision::BF16},
                                                         {OptimizerMode::AdamW, NsPrecision::F32}};
  for (const auto& [mode, ns] : cases) {
    SCOPED_TRACE(std::string(optimizer_mode_name(mode)) + (ns == NsPrecision::BF16 ? " ns bf16" : " ns fp32"));
    Model cpu(cfg), gpu(cfg);
    cpu.init_random(3);
    gpu.init_random(3);
    gpu.to(kGpu);
    OptimizerConfig oc = OptimizerConfig::for_model(cfg, mode);
    oc.muon.precision = ns;
    const double ns_atol = ns == NsPrecision::BF16 ? 1.0 / 32 : 2e-3;
    Optimizer ocpu(cpu, oc), ogpu(gpu, oc);
    double lr_sum = 0;
    for (int k = 0; k < 4; ++k) {
      set_grads(cpu, gpu, k);
      const double lr = 0.02 / (1 + k);
      lr_sum += lr;
      const OptimizerStepStats a = ocpu.step(lr), b = ogpu.step(lr);
      EXPECT_EQ(a.muon, b.muon);
      EXPECT_EQ(a.adamw, b.adamw);
      EXPECT_EQ(a.skipped, b.skipped);
      if (mode == OptimizerMode::MuonAdamW) EXPECT_LT(b.ns_calls * 4, b.muon);
    }
    std::map<std::string, Param*> g;
    gpu.visit([&](Param& p) { g[p.name] = &p; });
    cpu.visit([&](Param& p) {
      const Param& q = *g.at(p.name);
      ASSERT_TRUE(q.value.device().is_cuda()) << p.name;
      const OptGroup grp = ocpu.group(p.name);
      if (grp == OptGroup::Muon) {
        const int64_t rb = ocpu.row_blocks(p.name);
        const double step_scale = oc.muon.update_scale *
                                  std::sqrt(static_cast<double>(std::max(p.value.size(0) / rb, p.value.size(1))));
        expect_close(q.value, p.value, 0, lr_sum * step_scale * ns_atol, p.name);
      } else {
        expect_same_bits(q.value, p.value, p.name);
      }
    });
    const auto sc = ocpu.state_dict(), sg = ogpu.state_dict();
    ASSERT_EQ(sc.size(), sg.size());
    for (const auto& [key, t] : sc) {
      ASSERT_TRUE(sg.count(key)) << key;
      EXPECT_TRUE(sg.at(key).device().is_cpu()) << key;
      expect_same_bits(sg.at(key), t, key);
    }
    // The host state loads back into a device optimizer (copied to the device).
    Optimizer reloaded(gpu, oc);
    reloaded.load_state_dict(sg);
    for (const auto& [key, t] : reloaded.state_dict()) expect_same_bits(t, sg.at(key), key + " (reloaded)");
  }
}

TEST_F(GpuOptimizer, GradNormAndClippingMatchCpu) {
  const ModelConfig cfg = tiny_cfg();
  Model cpu(cfg), gpu(cfg);
  gpu.to(kGpu);
  set_grads(cpu, gpu, 0);
  const std::vector<Param*> pc = model_params(cpu), pg = model_params(gpu);
  const GradNorm a = grad_sq_norm(pc), b = grad_sq_norm(pg);
  ASSERT_TRUE(a.finite && b.finite);
  EXPECT_NEAR(b.sq_sum, a.sq_sum, 1e-12 * a.sq_sum);
  scale_grads(pc, 0.37);
  scale_grads(pg, 0.37);
  for (size_t i = 0; i < pc.size(); ++i)
    if (pc[i]->grad.defined()) expect_same_bits(pg[i]->grad, pc[i]->grad, pc[i]->name);
  const double max_norm = 0.5 * 0.37 * std::sqrt(a.sq_sum);  // half the scaled norm: both must clip
  const ClipResult ca = clip_grad_norm(pc, max_norm), cg = clip_grad_norm(pg, max_norm);
  EXPECT_TRUE(ca.clipped && cg.clipped);
  EXPECT_NEAR(cg.scale, ca.scale, 1e-12 * ca.scale);

  // A NaN on the device is reported like on the CPU.
  Param* victim = nullptr;
  for (Param* p : pg)
    if (p->grad.defined() && p->grad.numel() > 3 && !victim) victim = p;
  ASSERT_NE(victim, nullptr);
  Tensor h = victim->grad.to(kCpu);
  h.data<float>()[2] = std::nanf("");
  victim->grad = h.to(kGpu);
  const GradNorm bad = grad_sq_norm(pg);
  EXPECT_FALSE(bad.finite);
  EXPECT_EQ(bad.bad_param, victim->name);
  EXPECT_EQ(bad.bad_params, 1);
}

TEST_F(GpuOptimizer, ExpertBiasUpdateMatchesCpu) {
  Param cpu("layers.3.ffn.gate.bias", {6}), gpu("layers.3.ffn.gate.bias", {6});
  cpu.value = rand_cpu({6});
  gpu.value = cpu.value.to(kGpu);
  for (const std::vector<int64_t>& load : {std::vector<int64_t>{10, 2, 5, 5, 0, 8}, std::vector<int64_t>{1, 1, 1, 1, 1, 7}}) {
    update_expert_bias(cpu, load, 0.001);
    update_expert_bias(gpu, load, 0.001);
  }
  EXPECT_TRUE(gpu.value.device().is_cuda());
  expect_same_bits(gpu.value, cpu.value, "gate.bias");
}

}  // namespace
}  // namespace dsv4::gputest
