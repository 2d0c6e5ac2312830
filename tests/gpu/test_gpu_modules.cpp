// Model modules on CUDA tensors (the first modules wired to the kernels: RMSNorm through runtime/model_ops.h,
// HyperConnection and HyperHead through kernels/attention_kernels.h; Linear and Embedding through the dispatching
// ops) against the same modules on the CPU: outputs, input gradients and accumulated parameter gradients. Tolerance per tensor, |gpu - cpu| <= rtol * max|cpu|:
// 2e-5 for forward outputs and RMSNorm's gradients, 1e-4 for the mHC backward (as tests/gpu/test_gpu_mhc.cpp, which
// bounds the kernels against a double reference). Skips without a GPU.
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "model/config.h"
#include "model/embedding.h"
#include "model/layers.h"
#include "model/mhc.h"

namespace dsv4::gputest {
namespace {

class GpuModules : public GpuTest {};

std::vector<double> host_d(const Tensor& t) {
  const auto f = t.to(kCpu).to_floats();
  return {f.begin(), f.end()};
}

void close(const Tensor& gpu, const Tensor& cpu, double rtol, const std::string& what) {
  ASSERT_EQ(gpu.shape(), cpu.shape()) << what;
  EXPECT_TRUE(gpu.device().is_cuda()) << what;
  expect_close_scaled(host_d(gpu), host_d(cpu), rtol, what);
}

void randomise(Param& p, float lo, float hi) { p.value = rand_cpu(p.value.shape(), lo, hi); }
void to_gpu(Param& p) {
  p.value = p.value.to(kGpu);
  p.grad = Tensor();
}

TEST_F(GpuModules, RmsNormMatchesCpu) {
  for (bool weighted : {true, false}) {
    RMSNorm cpu("norm.weight", 300, 1e-6, weighted), gpu = cpu;
    if (weighted) {
      randomise(cpu.weight, 0.5f, 1.5f);
      gpu.weight = cpu.weight;
      to_gpu(gpu.weight);
    }
    const Tensor x = rand_cpu({37, 300}, -2, 2), dy = rand_cpu({37, 300});
    RMSNormCtx cc, gc;
    close(gpu.forward(x.to(kGpu), &gc), cpu.forward(x, &cc), 2e-5, "rmsnorm y");
    close(gpu.backward(dy.to(kGpu), gc), cpu.backward(dy, cc), 2e-5, "rmsnorm dx");
    if (weighted) close(gpu.weight.grad, cpu.weight.grad, 2e-5, "rmsnorm dweight");
  }
}

TEST_F(GpuModules, HyperConnectionAndHeadMatchCpu) {
  ModelConfig cfg = model_preset("tiny");
  cfg.dim = 200;  // not a multiple of the kernels' thread counts
  const int64_t T = 45, n = cfg.hc_mult, D = cfg.dim;
  HyperConnection hc("layers.0.hc_attn_", cfg);
  randomise(hc.fn, -0.05f, 0.05f);
  randomise(hc.base, -1, 1);
  randomise(hc.scale, 0.5f, 1.5f);
  HyperConnection hg = hc;
  for (Param* p : {&hg.fn, &hg.base, &hg.scale}) to_gpu(*p);
  const Tensor X = rand_cpu({T, n, D}), F = rand_cpu({T, D}), dXnew = rand_cpu({T, n, D}), dx = rand_cpu({T, D});
  const Tensor Xg = X.to(kGpu);

  HcPreCtx pc, pg;
  const HcPreOut oc = hc.pre(X, &pc), og = hg.pre(Xg, &pg);
  close(og.x_TD, oc.x_TD, 2e-5, "pre x");
  close(og.post_TN, oc.post_TN, 2e-5, "pre post");
  close(og.comb_TNN, oc.comb_TNN, 2e-5, "pre comb");
  HcPostCtx qc, qg;
  close(hg.post(F.to(kGpu), Xg, og.post_TN, og.comb_TNN, &qg), hc.post(F, X, oc.post_TN, oc.comb_TNN, &qc), 2e-5,
        "post Xnew");
  const HcPostGrads gc = hc.post_backward(dXnew, qc), gg = hg.post_backward(dXnew.to(kGpu), qg);
  close(gg.dF_TD, gc.dF_TD, 2e-5, "post dF");
  close(gg.dX_TND, gc.dX_TND, 2e-5, "post dX");
  close(gg.dpost_TN, gc.dpost_TN, 2e-5, "post dpost");
  close(gg.dcomb_TNN, gc.dcomb_TNN, 2e-5, "post dcomb");
  // The pre path's gradient added into the post path's dX, as a decoder block does.
  Tensor dXc = gc.dX_TND.clone(), dXg = gg.dX_TND.clone();
  hc.pre_backward_accumulate(dx, gc.dpost_TN, gc.dcomb_TNN, pc, dXc);
  hg.pre_backward_accumulate(dx.to(kGpu), gg.dpost_TN, gg.dcomb_TNN, pg, dXg);
  close(dXg, dXc, 1e-4, "pre dX (accumulated)");
  close(hg.fn.grad, hc.fn.grad, 1e-4, "dfn");
  close(hg.base.grad, hc.base.grad, 1e-4, "dbase");
  close(hg.scale.grad, hc.scale.grad, 1e-4, "dscale");

  HyperHead hh("", cfg);
  randomise(hh.fn, -0.05f, 0.05f);
  randomise(hh.base, -1, 1);
  randomise(hh.scale, 0.5f, 1.5f);
  HyperHead hhg = hh;
  for (Param* p : {&hhg.fn, &hhg.base, &hhg.scale}) to_gpu(*p);
  HcHeadCtx hcc, hcg;
  close(hhg.forward(Xg, &hcg), hh.forward(X, &hcc), 2e-5, "head h");
  close(hhg.backward(dx.to(kGpu), hcg), hh.backward(dx, hcc), 1e-4, "head dX");
  close(hhg.fn.grad, hh.fn.grad, 1e-4, "head dfn");
  close(hhg.base.grad, hh.base.grad, 1e-4, "head dbase");
  close(hhg.scale.grad, hh.scale.grad, 1e-4, "head dscale");

  // Mixed devices are one clear error.
  HyperConnection mixed = hc;
  EXPECT_THROW(mixed.pre(Xg, nullptr), Error);
}

// Linear in each weight-GEMM precision (cuBLAS F32 / BF16, block-scaled FP8 through cuBLASLt) and the one-rank
// Embedding (index_select / index_add). Bounds as tests/gpu/test_gpu_matmul_precision.cpp: 2^-14 (F32, BF16) and
// 2^-10 (FP8) of sum|a b|, which for these random shapes is below 1e-4 / 1e-2 of max|cpu|.
// Written after the session's GPU time was spent: not yet run on a GPU (RESULTS.md lists what has).
TEST_F(GpuModules, LinearAndEmbeddingMatchCpu) {
  for (MatmulPrecision p : {MatmulPrecision::F32, MatmulPrecision::BF16, MatmulPrecision::FP8}) {
    const std::string what(matmul_precision_name(p));
    Linear cpu("lin.weight", 384, 256), gpu = cpu;
    randomise(cpu.weight, -0.05f, 0.05f);
    cpu.set_precision(p);
    gpu.weight = cpu.weight;
    to_gpu(gpu.weight);
    gpu.set_precision(p);
    const Tensor x = rand_cpu({64, 384}), dy = rand_cpu({64, 256});
    LinearCtx cc, gc;
    const double rtol = p == MatmulPrecision::FP8 ? 1e-2 : 1e-4;
    close(gpu.forward(x.to(kGpu), &gc), cpu.forward(x, &cc), rtol, what + " linear y");
    close(gpu.backward(dy.to(kGpu), gc), cpu.backward(dy, cc), rtol, what + " linear dx");
    close(gpu.weight.grad, cpu.weight.grad, rtol, what + " linear dW");
  }
  Embedding cpu("embed.weight", 100, 48), gpu = cpu;
  randomise(cpu.weight, -1, 1);
  gpu.weight = cpu.weight;
  to_gpu(gpu.weight);
  const Tensor ids = rand_index({75}, 100), dh = rand_cpu({75, 48});
  close(gpu.forward(ids.to(kGpu)), cpu.forward(ids), 0.0, "embedding rows");
  cpu.backward(dh, ids);
  gpu.backward(dh.to(kGpu), ids.to(kGpu));
  close(gpu.weight.grad, cpu.weight.grad, 1e-6, "embedding grad");
}

}  // namespace
}  // namespace dsv4::gputest
