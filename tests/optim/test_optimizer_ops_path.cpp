// The optimizer's and gradient clipping's tensor-op path (the one CUDA parameters take: runtime/model_ops.h adamw_step,
// muon_momentum_step, newton_schulz_batched over same-shape Muon matrices, muon_apply_step; the norm by runtime ops),
// run on CPU tensors under ForceOpsPath, against the CPU reference path.
//   Optimizer: bit-identical (the CPU twins of the ops are the reference loops; batching only regroups independent
//     matrices), for several steps of the tiny model (every group: wo_a row blocks, the experts' same-shape batches,
//     hc_*_fn, AdamW vectors and matrices), with a parameter skipped on odd steps, in both optimizer modes and with
//     Muon's Newton-Schulz in FP32 and in BF16.
//   Gradient norm: bit-identical (the CPU twin of sum_squares is the reference's double loop), the non-finite report
//     identical, scaling by a given factor bit-identical.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>

#include "model/exec_path.h"
#include "optim/clip.h"
#include "optim/optimizer.h"
#include "optim_test_util.h"

namespace dsv4 {
namespace {

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.contiguous().raw_data(), b.contiguous().raw_data(), static_cast<size_t>(a.nbytes())) == 0;
}

std::vector<Param*> params_of(Model& m) { return model_params(m); }

OptimizerConfig optimizer_config(const ModelConfig& cfg, OptimizerMode mode, NsPrecision ns) {
  OptimizerConfig oc = OptimizerConfig::for_model(cfg, mode);
  oc.muon.precision = ns;
  return oc;
}

TEST(OptimizerOpsPath, StepsAreBitIdenticalToTheReference) {
  const ModelConfig cfg = testing::tiny_optim_cfg();
  const std::pair<OptimizerMode, NsPrecision> cases[] = {{OptimizerMode::MuonAdamW, NsPrecision::F32},
                                                         {OptimizerMode::MuonAdamW, NsPrecision::BF16},
                                                         {OptimizerMode::AdamW, NsPrecision::F32}};
  for (const auto& [mode, ns] : cases) {
    SCOPED_TRACE(std::string(optimizer_mode_name(mode)) + (ns == NsPrecision::BF16 ? " ns bf16" : " ns fp32"));
    Model ref(cfg), ops(cfg);
    ref.init_random(3);
    ops.init_random(3);
    Optimizer oref(ref, optimizer_config(cfg, mode, ns));
    Optimizer oops(ops, optimizer_config(cfg, mode, ns));
    for (int k = 0; k < 5; ++k) {
      testing::set_pseudo_grads(ref, k);
      testing::set_pseudo_grads(ops, k);
      const double lr = 0.02 / (1 + k);
      const OptimizerStepStats a = oref.step(lr);
      OptimizerStepStats b;
      {
        ForceOpsPath force;
        b = oops.step(lr);
      }
      EXPECT_EQ(a.muon, b.muon);
      EXPECT_EQ(a.adamw, b.adamw);
      EXPECT_EQ(a.skipped, b.skipped);
      EXPECT_EQ(a.ns_calls, 0);
      if (mode == OptimizerMode::MuonAdamW) {
        // Same-shape matrices share a Newton-Schulz call: far fewer calls than Muon matrices (8 experts x 3 per layer).
        EXPECT_GT(b.ns_calls, 0);
        EXPECT_LT(b.ns_calls * 4, b.muon) << b.ns_calls << " calls for " << b.muon << " matrices";
      } else {
        EXPECT_EQ(b.ns_calls, 0);
      }
    }
    std::map<std::string, Param*> ops_params;
    ops.visit([&](Param& p) { ops_params[p.name] = &p; });
    int64_t compared = 0;
    ref.visit([&](Param& p) {
      EXPECT_TRUE(bit_equal(p.value, ops_params.at(p.name)->value)) << p.name;
      ++compared;
    });
    EXPECT_GT(compared, 50);
    const auto sa = oref.state_dict(), sb = oops.state_dict();
    ASSERT_EQ(sa.size(), sb.size());
    for (const auto& [key, t] : sa) {
      ASSERT_TRUE(sb.count(key)) << key;
      EXPECT_TRUE(bit_equal(t, sb.at(key))) << key;
    }
    // A saved ops-path state loads into a fresh optimizer and continues identically.
    Optimizer resumed(ops, optimizer_config(cfg, mode, ns));
    resumed.load_state_dict(sb);
    for (const auto& [key, t] : resumed.state_dict()) EXPECT_TRUE(bit_equal(t, sb.at(key))) << key;
  }
}

TEST(OptimizerOpsPath, BatchesOnlyMatricesOfOneShape) {
  // Hand-made parameters: four expert-like [6, 10] matrices, two tall [12, 5] ones, a [8, 10] matrix in 2 row blocks
  // (so [4, 10] blocks), vectors for AdamW.
  std::vector<Param> ps;
  std::vector<std::pair<std::string, Shape>> specs = {
      {"layers.0.ffn.experts.0.w1.weight", {6, 10}}, {"layers.0.ffn.experts.1.w1.weight", {6, 10}},
      {"layers.0.ffn.experts.0.w2.weight", {12, 5}}, {"layers.0.ffn.experts.2.w1.weight", {6, 10}},
      {"layers.0.ffn.experts.1.w2.weight", {12, 5}}, {"layers.0.attn.wo_a.weight", {8, 10}},
      {"layers.0.ffn.experts.3.w1.weight", {6, 10}}, {"layers.0.attn_norm.weight", {10}},
      {"layers.0.attn.attn_sink", {3}}};
  ps.reserve(specs.size() * 2);
  for (int copy = 0; copy < 2; ++copy)
    for (size_t i = 0; i < specs.size(); ++i) {
      const auto& [name, shape] = specs[i];
      Param p(name, shape);
      p.value.copy_from(Tensor::from_floats(shape, testing::randn(static_cast<size_t>(shape.numel()),
                                                                  static_cast<uint32_t>(7 + i))));
      ps.push_back(std::move(p));
    }
  std::vector<Param*> ref, ops;
  for (size_t i = 0; i < specs.size(); ++i) {
    ref.push_back(&ps[i]);
    ops.push_back(&ps[specs.size() + i]);
  }
  OptimizerConfig oc;
  oc.groups = GroupTable::deepseek_v4(/*wo_a_groups=*/2);
  Optimizer oref(ref, oc), oops(ops, oc);
  for (int k = 0; k < 3; ++k) {
    for (size_t i = 0; i < specs.size(); ++i) {
      const Tensor g = Tensor::from_floats(specs[i].second,
                                           testing::randn(static_cast<size_t>(specs[i].second.numel()),
                                                          static_cast<uint32_t>(50 + k * 20 + static_cast<int>(i))));
      ref[i]->grad_buffer().copy_from(g);
      ops[i]->grad_buffer().copy_from(g);
    }
    oref.step(0.01);
    ForceOpsPath force;
    const OptimizerStepStats st = oops.step(0.01);
    EXPECT_EQ(st.muon, 7);
    EXPECT_EQ(st.adamw, 2);
    EXPECT_EQ(st.ns_calls, 3);  // [6, 10] x 4, [12, 5] x 2, [4, 10] x 2
  }
  for (size_t i = 0; i < specs.size(); ++i) EXPECT_TRUE(bit_equal(ref[i]->value, ops[i]->value)) << specs[i].first;
}

TEST(OptimizerOpsPath, Bf16NewtonSchulzChangesTheUpdate) {
  // The ops path takes muon.ns_precision: a BF16 step differs from an FP32 one (and equals the CPU BF16 reference,
  // StepsAreBitIdenticalToTheReference).
  const ModelConfig cfg = testing::tiny_optim_cfg();
  Model f32(cfg), bf16(cfg);
  f32.init_random(1);
  bf16.init_random(1);
  Optimizer of32(f32, optimizer_config(cfg, OptimizerMode::MuonAdamW, NsPrecision::F32));
  Optimizer obf16(bf16, optimizer_config(cfg, OptimizerMode::MuonAdamW, NsPrecision::BF16));
  testing::set_pseudo_grads(f32, 0);
  testing::set_pseudo_grads(bf16, 0);
  {
    ForceOpsPath force;
    of32.step(0.01);
    obf16.step(0.01);
  }
  Param* a = nullptr;
  Param* b = nullptr;
  f32.visit([&](Param& p) { if (p.name == "layers.0.attn.wo_a.weight") a = &p; });
  bf16.visit([&](Param& p) { if (p.name == "layers.0.attn.wo_a.weight") b = &p; });
  ASSERT_TRUE(a && b);
  EXPECT_FALSE(bit_equal(a->value, b->value));
}

TEST(OptimizerOpsPath, GradNormAndClipping) {
  const ModelConfig cfg = testing::tiny_optim_cfg();
  Model a(cfg), b(cfg);
  testing::set_pseudo_grads(a, 0);
  testing::set_pseudo_grads(b, 0);
  const std::vector<Param*> pa = params_of(a), pb = params_of(b);
  const GradNorm ra = grad_sq_norm(pa);
  GradNorm rb;
  {
    ForceOpsPath force;
    rb = grad_sq_norm(pb);
  }
  ASSERT_TRUE(ra.finite && rb.finite);
  EXPECT_GT(ra.sq_sum, 0);
  EXPECT_EQ(rb.sq_sum, ra.sq_sum);
  EXPECT_EQ(rb.norm, ra.norm);

  // Clipping: the same decision and factor; scaling by a given factor is bit-identical.
  const double max_norm = 0.5 * ra.norm;
  const ClipResult ca = clip_grad_norm(pa, max_norm);
  ClipResult cb;
  {
    ForceOpsPath force;
    cb = clip_grad_norm(pb, max_norm);
  }
  EXPECT_TRUE(ca.clipped && cb.clipped);
  EXPECT_EQ(cb.scale, ca.scale);
  testing::set_pseudo_grads(a, 1);
  testing::set_pseudo_grads(b, 1);
  scale_grads(pa, 0.37);
  {
    ForceOpsPath force;
    scale_grads(pb, 0.37);
  }
  for (size_t i = 0; i < pa.size(); ++i)
    if (pa[i]->grad.defined()) EXPECT_TRUE(bit_equal(pa[i]->grad, pb[i]->grad)) << pa[i]->name;

  // Non-finite gradients: the same first parameter and count, nothing scaled.
  int poisoned = 0;
  for (Model* m : {&a, &b}) {
    int seen = 0;
    m->visit([&](Param& p) {
      if (!p.grad.defined() || p.grad.numel() < 4) return;
      ++seen;
      if (seen == 5) p.grad.data<float>()[3] = std::numeric_limits<float>::quiet_NaN();
      if (seen == 9) p.grad.data<float>()[1] = -std::numeric_limits<float>::infinity();
    });
    poisoned += seen >= 9;
  }
  ASSERT_EQ(poisoned, 2);
  const ClipResult na = clip_grad_norm(pa, 1.0);
  ClipResult nb;
  {
    ForceOpsPath force;
    nb = clip_grad_norm(pb, 1.0);
  }
  EXPECT_FALSE(na.finite);
  EXPECT_FALSE(nb.finite);
  EXPECT_EQ(na.bad_param, nb.bad_param);
  EXPECT_EQ(na.bad_params, 2);
  EXPECT_EQ(nb.bad_params, 2);
  EXPECT_FALSE(nb.clipped);

  // Squares in double on both paths: an element beyond FP32's square range (~1.8e19) stays finite.
  Model c(cfg), d(cfg);
  testing::set_pseudo_grads(c, 0);
  testing::set_pseudo_grads(d, 0);
  for (Model* m : {&c, &d}) m->embed.weight.grad.data<float>()[0] = 1e20f;
  const GradNorm big_ref = grad_sq_norm(params_of(c));
  GradNorm big_ops;
  {
    ForceOpsPath force;
    big_ops = grad_sq_norm(params_of(d));
  }
  EXPECT_TRUE(big_ref.finite);
  EXPECT_NEAR(big_ref.norm, 1e20, 1e14);
  EXPECT_TRUE(big_ops.finite);
  EXPECT_EQ(big_ops.sq_sum, big_ref.sq_sum);
}

}  // namespace
}  // namespace dsv4
