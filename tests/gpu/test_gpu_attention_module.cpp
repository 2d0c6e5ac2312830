// Attention (with its Compressor and Indexer) on CUDA tensors, i.e. the tensor-op path through the CUDA kernels
// (cuBLAS GEMMs, rmsnorm / rope ops, compress_pool_*, indexer_scores + indexer_topk, sparse_attn_forward / backward),
// against the same module on the CPU (the reference path): output, dx and every parameter gradient, for the tiny
// preset's SWA (layer 0), CSA (layer 1, ratio 4) and HCA (layer 2, ratio 8) layers, with T = 2 x 45 (not a multiple of
// the ratios, the window or any kernel tile) and a packed row of 77 tokens in four documents.
// The CSA top-k selection must equal the CPU's (random inputs are far from ties: the indexer scores differ by ulps).
// Tolerance per tensor, |gpu - cpu| <= rtol * max|cpu|: 1e-4 for the output (cuBLAS F32 vs CPU BLAS and the kernels'
// summation order: tests/gpu/test_gpu_attention.cpp bounds the core alone at 2e-5 forward) and 5e-4 for dx and the
// gradients (the core's backward alone is bounded at 1e-4; these chain it with up to five GEMMs, two RMSNorm
// backwards and the compressor's pooling backward). The BF16 tensor-core core (AttentionOptions::tensor_cores, off by
// default) is checked separately at C = 512, H = 16 (2e-2 of max|out|, 3e-2 of max|grad| for dx and the gradients).
// Skips without a GPU.
// Written without a GPU (compile-checked only): not yet run on one (tests/gpu/RESULTS.md lists what has).
#include <map>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "model/attention.h"
#include "model/config.h"

namespace dsv4::gputest {
namespace {

class GpuAttentionModule : public GpuTest {};

constexpr double kOutRtol = 1e-4, kGradRtol = 5e-4;

std::vector<double> host_d(const Tensor& t) {
  const auto f = t.to(kCpu).to_floats();
  return {f.begin(), f.end()};
}

void close(const Tensor& gpu, const Tensor& cpu, double rtol, const std::string& what) {
  ASSERT_TRUE(gpu.defined() && cpu.defined()) << what;
  ASSERT_EQ(gpu.shape(), cpu.shape()) << what;
  EXPECT_TRUE(gpu.device().is_cuda()) << what;
  expect_close_scaled(host_d(gpu), host_d(cpu), rtol, what);
}

std::string prefix_of(int64_t layer) { return "layers." + std::to_string(layer) + ".attn."; }

Attention random_attention(const ModelConfig& cfg, int64_t layer) {
  Attention a(prefix_of(layer), cfg, layer);
  a.visit([](Param& p) {
    float lo = -1, hi = 1;
    if (p.name.ends_with("norm.weight")) lo = 0.8f, hi = 1.2f;
    else if (p.name.ends_with("ape")) lo = -0.5f, hi = 0.5f;
    else if (!p.name.ends_with("attn_sink")) hi = 1.0f / std::sqrt(static_cast<float>(p.value.size(1))), lo = -hi;
    p.value = rand_cpu(p.value.shape(), lo, hi);
  });
  return a;
}

// A copy of `cpu` with every parameter on the GPU (the copy's values replaced, the CPU module's untouched).
Attention on_gpu(const Attention& cpu) {
  Attention g = cpu;
  g.visit([](Param& p) {
    p.value = p.value.to(kGpu);
    p.grad = Tensor();
  });
  return g;
}

SeqLayout packed_row() {  // one row of 77: documents [0, 3), [3, 20), [20, 52), [52, 77)
  SeqLayout L(1, 77);
  L.doc_start.resize(77);
  for (int64_t s = 0; s < 77; ++s) L.doc_start[static_cast<size_t>(s)] = s < 3 ? 0 : s < 20 ? 3 : s < 52 ? 20 : 52;
  return L;
}

void check_layer(int64_t layer, const SeqLayout& L) {
  const ModelConfig cfg = model_preset("tiny");
  Attention cpu = random_attention(cfg, layer);
  Attention gpu = on_gpu(cpu);
  const std::string tag = "layer " + std::to_string(layer) + " (" + std::to_string(L.batch) + "x" +
                          std::to_string(L.seq) + (L.packed() ? " packed" : "") + ") ";
  const Tensor x = rand_cpu({L.tokens(), cfg.dim}), dy = rand_cpu({L.tokens(), cfg.dim});
  AttentionCtx cc, gc;
  const Tensor out_c = cpu.forward(x, L, &cc), out_g = gpu.forward(x.to(kGpu), L, &gc);
  EXPECT_FALSE(cc.ops_path) << tag;
  EXPECT_TRUE(gc.ops_path) << tag;
  EXPECT_EQ(gc.index.comp_offsets, cc.index.comp_offsets) << tag << "top-k lists";
  EXPECT_EQ(gc.index.comp_ids, cc.index.comp_ids) << tag << "top-k entries";
  close(out_g, out_c, kOutRtol, tag + "out");
  const Tensor dx_c = cpu.backward(dy, cc), dx_g = gpu.backward(dy.to(kGpu), gc);
  close(dx_g, dx_c, kGradRtol, tag + "dx");
  std::map<std::string, Tensor> grads;
  cpu.visit([&](Param& p) {
    if (p.grad.defined()) grads[p.name] = p.grad;
  });
  int checked = 0;
  gpu.visit([&](Param& p) {
    EXPECT_EQ(p.grad.defined(), grads.count(p.name) == 1) << tag << p.name;
    if (!p.grad.defined() || !grads.count(p.name)) return;
    close(p.grad, grads.at(p.name), kGradRtol, tag + p.name);
    ++checked;
  });
  EXPECT_EQ(checked, layer == 0 ? 8 : 12) << tag;  // SWA: 8 trainable parameters; CSA / HCA: + the compressor's 4
}

TEST_F(GpuAttentionModule, SlidingWindowMatchesCpu) {
  check_layer(0, SeqLayout(2, 45));
  check_layer(0, packed_row());
}
TEST_F(GpuAttentionModule, CompressedSparseMatchesCpu) {
  check_layer(1, SeqLayout(2, 45));
  check_layer(1, packed_row());
}
TEST_F(GpuAttentionModule, HeavilyCompressedMatchesCpu) {
  check_layer(2, SeqLayout(2, 45));
  check_layer(2, packed_row());
}

// AttentionOptions::tensor_cores: the BF16 tensor-core core forward and backward (need C = 512, H % 16 == 0) are taken
// (SWA, CSA and HCA layers)
// when asked for (the output differs from the FP32 kernel's; the backward's device index carries the positions) and stay within BF16 accuracy of the CPU module:
// the kernels alone are bounded at 4e-3 max|kv| on o and 1e-2 max|grad| on dq / dkv / dckv
// (tests/gpu/test_gpu_attention.cpp); through wo_a / wo_b, 2e-2 of max|out|; dx and the parameter gradients, which
// chain the core's backward with the GEMMs, the norms and the compressor, 3e-2 of max|cpu|.
TEST_F(GpuAttentionModule, TensorCoresOnlyWhenAskedAndClose) {
  ModelConfig cfg = model_preset("tiny");
  cfg.head_dim = 512;
  cfg.n_heads = 16;
  cfg.o_groups = 4;
  constexpr double kTcOutRtol = 2e-2, kTcGradRtol = 3e-2;
  for (int64_t layer : {0, 1, 2}) {  // SWA, CSA, HCA
    Attention cpu = random_attention(cfg, layer);
    Attention fp32 = on_gpu(cpu);
    AttentionOptions tc_opts;
    tc_opts.tensor_cores = true;
    Attention tc(prefix_of(layer), cfg, layer, tc_opts);
    {
      Attention src = on_gpu(cpu);
      std::map<std::string, Tensor> values;
      src.visit([&](Param& p) { values[p.name] = p.value; });
      tc.visit([&](Param& p) {
        p.value = values.at(p.name);
        p.grad = Tensor();
      });
    }
    const SeqLayout L(2, 45);
    const Tensor x = rand_cpu({L.tokens(), cfg.dim}), dy = rand_cpu({L.tokens(), cfg.dim});
    AttentionCtx cc, fc, tcc;
    const Tensor out_c = cpu.forward(x, L, &cc);
    const Tensor out_f = fp32.forward(x.to(kGpu), L, &fc), out_t = tc.forward(x.to(kGpu), L, &tcc);
    const std::string tag = "layer " + std::to_string(layer) + " ";
    close(out_f, out_c, kOutRtol, tag + "fp32 kernel out");
    close(out_t, out_c, kTcOutRtol, tag + "tensor-core out");
    EXPECT_NE(host_bytes(out_t), host_bytes(out_f)) << tag << "the tensor-core forward was not taken";

    const Tensor dx_c = cpu.backward(dy, cc);
    const Tensor dx_f = fp32.backward(dy.to(kGpu), fc), dx_t = tc.backward(dy.to(kGpu), tcc);
    close(dx_f, dx_c, kGradRtol, tag + "fp32 kernel dx");
    close(dx_t, dx_c, kTcGradRtol, tag + "tensor-core dx");
    std::map<std::string, Tensor> grads;
    cpu.visit([&](Param& p) {
      if (p.grad.defined()) grads[p.name] = p.grad;
    });
    int checked = 0;
    tc.visit([&](Param& p) {
      EXPECT_EQ(p.grad.defined(), grads.count(p.name) == 1) << tag << p.name;
      if (!p.grad.defined() || !grads.count(p.name)) return;
      close(p.grad, grads.at(p.name), kTcGradRtol, tag + "tensor-core " + p.name);
      ++checked;
    });
    EXPECT_EQ(checked, static_cast<int>(grads.size())) << tag;
    EXPECT_GE(checked, 8) << tag;
    // The tensor-core backward was the one prepared for (key-major positions; the FP32 backward needs the queries).
    EXPECT_TRUE(tcc.dindex.key_positions.defined() && !tcc.dindex.key_queries.defined()) << tag;
    EXPECT_TRUE(fc.dindex.key_queries.defined() && !fc.dindex.key_positions.defined()) << tag;
    // CSA: the tensor-core path keeps the indexer's ids on the device; the FP32 backward's key lists need them here.
    EXPECT_EQ(tcc.index.comp_ids_on_device, layer == 1) << tag;
    EXPECT_FALSE(fc.index.comp_ids_on_device) << tag;
    if (layer == 1) EXPECT_EQ(fc.index.comp_ids.size(), static_cast<size_t>(fc.index.comp_offsets.back())) << tag;
  }
}

TEST_F(GpuAttentionModule, ParameterOnTheWrongDeviceIsOneClearError) {
  const ModelConfig cfg = model_preset("tiny");
  Attention cpu = random_attention(cfg, 1);
  Attention gpu = on_gpu(cpu);
  gpu.compressor.ape.value = gpu.compressor.ape.value.to(kCpu);
  const Tensor x = rand_cpu({9, cfg.dim}).to(kGpu);
  try {
    gpu.forward(x, SeqLayout(1, 9), nullptr);
    ADD_FAILURE() << "no error for a CPU parameter with CUDA inputs";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1.attn.compressor.ape is on cpu"), std::string::npos) << e.what();
  }
}

}  // namespace

}  // namespace dsv4::gputest
