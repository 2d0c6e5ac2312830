#include "model/compressor.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/exec_path.h"
#include "model/quant_sim.h"
#include "model/sparse_attention.h"
#include "runtime/compress_math.h"
#include "runtime/model_ops.h"
#include "runtime/ops.h"

#if defined(DSV4_WITH_CUDA)
#include "kernels/attention_kernels.h"
#endif

namespace dsv4 {

CompressPlan CompressPlan::build(const SeqLayout& layout, int64_t ratio) {
  layout.validate("CompressPlan");
  DSV4_CHECK(ratio > 0, "CompressPlan: compress ratio {} must be positive", ratio);
  CompressPlan p;
  p.ratio = ratio;
  const int64_t T = layout.tokens(), S = layout.seq;
  p.first_entry.resize(static_cast<size_t>(T));
  p.n_visible.resize(static_cast<size_t>(T));
  for (int64_t b = 0; b < layout.batch; ++b) {
    int64_t s0 = 0;
    while (s0 < S) {  // one document [s0, s1) of row b
      const int64_t t0 = b * S + s0;
      int64_t s1 = s0 + 1;
      while (s1 < S && layout.doc_begin(b * S + s1) == layout.doc_begin(t0)) ++s1;
      const int64_t first = p.entries();
      for (int64_t i = 0; i < (s1 - s0) / ratio; ++i) {
        p.entry_token.push_back(t0 + i * ratio);
        p.entry_pos.push_back(i * ratio);
        p.entry_has_prev.push_back(i > 0 ? 1 : 0);
      }
      for (int64_t s = s0; s < s1; ++s) {
        p.first_entry[static_cast<size_t>(b * S + s)] = first;
        p.n_visible[static_cast<size_t>(b * S + s)] = (s - s0 + 1) / ratio;
      }
      s0 = s1;
    }
  }
  return p;
}

// ---- pooling core (runtime/compress_math.h, shared with the CUDA kernels) --------------------------------------
template <typename T>
void compress_pool_forward(const T* kv, const T* gate, const T* ape, const int64_t* entry_token,
                           const uint8_t* entry_has_prev, int64_t n_entries, int64_t m, int64_t C, bool overlap,
                           T* out) {
  std::vector<T> mx(static_cast<size_t>(C)), sum(static_cast<size_t>(C));
  for (int64_t e = 0; e < n_entries; ++e)
    compress_pool_entry_forward<T>(kv, gate, ape, entry_token[e], entry_has_prev[e] != 0, m, C, overlap, 0, C,
                                   mx.data(), sum.data(), out + e * C);
}

template <typename T>
void compress_pool_backward(const T* kv, const T* gate, const T* ape, const int64_t* entry_token,
                            const uint8_t* entry_has_prev, int64_t n_entries, int64_t m, int64_t C, bool overlap,
                            const T* dout, T* dkv, T* dgate, T* dape) {
  std::vector<T> mx(static_cast<size_t>(C)), sum(static_cast<size_t>(C)), ssum(static_cast<size_t>(C));
  for (int64_t e = 0; e < n_entries; ++e)
    compress_pool_entry_backward<T>(kv, gate, ape, entry_token[e], entry_has_prev[e] != 0, m, C, overlap, 0, C,
                                    dout + e * C, mx.data(), sum.data(), ssum.data(), dkv, dgate, dape);
}

template void compress_pool_forward<float>(const float*, const float*, const float*, const int64_t*, const uint8_t*,
                                           int64_t, int64_t, int64_t, bool, float*);
template void compress_pool_forward<double>(const double*, const double*, const double*, const int64_t*,
                                            const uint8_t*, int64_t, int64_t, int64_t, bool, double*);
template void compress_pool_backward<float>(const float*, const float*, const float*, const int64_t*, const uint8_t*,
                                            int64_t, int64_t, int64_t, bool, const float*, float*, float*, float*);
template void compress_pool_backward<double>(const double*, const double*, const double*, const int64_t*,
                                             const uint8_t*, int64_t, int64_t, int64_t, bool, const double*, double*,
                                             double*, double*);

// ---- module ------------------------------------------------------------------------------------------------
Compressor::Compressor(const std::string& prefix, const ModelConfig& cfg, int64_t ratio, int64_t head_dim, bool rotate,
                       bool simulate_release_quant)
    : ratio_(ratio), head_dim_(head_dim), rope_dim_(cfg.rope_head_dim), rotate_(rotate),
      simulate_(simulate_release_quant), ue8m0_(cfg.scale_fmt == "ue8m0") {
  DSV4_CHECK(ratio > 0, "Compressor {}: ratio {} must be positive", prefix, ratio);
  DSV4_CHECK(head_dim >= cfg.rope_head_dim, "Compressor {}: head dim {} < rope dim {}", prefix, head_dim,
             cfg.rope_head_dim);
  const int64_t W = (ratio == 4 ? 2 : 1) * head_dim;
  wkv = Linear(prefix + "wkv.weight", cfg.dim, W);
  wgate = Linear(prefix + "wgate.weight", cfg.dim, W);
  ape = Param(prefix + "ape", Shape{ratio, W});
  norm = RMSNorm(prefix + "norm.weight", head_dim, cfg.norm_eps);
}

void Compressor::visit(const ParamVisitor& f) {
  wkv.visit(f);
  wgate.visit(f);
  f(ape);
  norm.visit(f);
}

void Compressor::set_trainable(bool trainable) {
  visit([trainable](Param& p) { p.trainable = trainable; });
}

Tensor Compressor::forward(const Tensor& x_TD, const CompressPlan& plan, const RopeTable& rope,
                           CompressorCtx* ctx) const {
  if (use_ops_path(x_TD)) return forward_ops(x_TD, plan, rope, ctx);
  if (ctx) ctx->ops_path = false;
  DSV4_CHECK(plan.ratio == ratio_, "Compressor: plan ratio {} != compressor ratio {}", plan.ratio, ratio_);
  DSV4_CHECK(x_TD.ndim() == 2 && x_TD.size(0) == static_cast<int64_t>(plan.first_entry.size()),
             "Compressor: input {} does not match the plan's {} tokens", x_TD.str(), plan.first_entry.size());
  const int64_t E = plan.entries(), C = head_dim_;
  Tensor out = Tensor::empty({E, C}, DType::F32);
  if (E == 0) {
    if (ctx) *ctx = {};
    return out;
  }
  CompressorCtx local;
  CompressorCtx& c = ctx ? *ctx : local;
  c.kv_TW = wkv.forward(x_TD, &c.wkv);
  c.gate_TW = wgate.forward(x_TD, &c.wgate);
  Tensor pooled = Tensor::empty({E, C}, DType::F32);
  compress_pool_forward<float>(c.kv_TW.data<float>(), c.gate_TW.data<float>(), ape.value.data<float>(),
                               plan.entry_token.data(), plan.entry_has_prev.data(), E, ratio_, C, overlap(),
                               pooled.data<float>());
  out = norm.forward(pooled, &c.norm);
  float* o = out.data<float>();
  rope_rows<float>(o, E, C, C, plan.entry_pos.data(), rope, false);
  if (simulate_) {
    if (rotate_) {
      hadamard_rows<float>(o, E, C, C);
      fp4_block_fake_quant_rows(o, E, C, C, 32);
    } else {
      fp8_block_fake_quant_rows(o, E, C - rope_dim_, C, 64, ue8m0_);
    }
  }
  return out;
}

Tensor Compressor::backward(const Tensor& dentries_EC, const CompressPlan& plan, const RopeTable& rope,
                            const CompressorCtx& ctx) {
  const int64_t E = plan.entries(), C = head_dim_, T = static_cast<int64_t>(plan.first_entry.size());
  DSV4_CHECK(dentries_EC.ndim() == 2 && dentries_EC.size(0) == E && dentries_EC.size(1) == C,
             "Compressor: backward gradient {} does not match [{}, {}]", dentries_EC.str(), E, C);
  if (E == 0) return Tensor::zeros({T, wkv.in_features()}, DType::F32, dentries_EC.device());
  DSV4_CHECK(ctx.kv_TW.defined(), "Compressor: backward without a forward context");
  if (ctx.ops_path) return backward_ops(dentries_EC, rope, ctx);
  Tensor d = dentries_EC.clone();  // fake quantisers: straight through
  float* dp = d.data<float>();
  if (simulate_ && rotate_) hadamard_rows<float>(dp, E, C, C);  // H/sqrt(n) is symmetric and orthogonal
  rope_rows<float>(dp, E, C, C, plan.entry_pos.data(), rope, true);
  const Tensor dpooled = norm.backward(d, ctx.norm);
  const int64_t W = ctx.kv_TW.size(1);
  Tensor dkv = Tensor::zeros({T, W}, DType::F32), dgate = Tensor::zeros({T, W}, DType::F32);
  Tensor dape = Tensor::zeros(ape.value.shape(), DType::F32);
  compress_pool_backward<float>(ctx.kv_TW.data<float>(), ctx.gate_TW.data<float>(), ape.value.data<float>(),
                                plan.entry_token.data(), plan.entry_has_prev.data(), E, ratio_, C, overlap(),
                                dpooled.data<float>(), dkv.data<float>(), dgate.data<float>(), dape.data<float>());
  if (ape.trainable) {
    float* g = ape.grad_buffer().data<float>();
    const float* a = dape.data<float>();
    for (int64_t i = 0; i < dape.numel(); ++i) g[i] += a[i];
  }
  Tensor dx = wkv.backward(dkv, ctx.wkv);
  const Tensor dx2 = wgate.backward(dgate, ctx.wgate);
  float* px = dx.data<float>();
  const float* p2 = dx2.data<float>();
  for (int64_t i = 0; i < dx.numel(); ++i) px[i] += p2[i];
  return dx;
}

// ---- tensor-op path ------------------------------------------------------------------------------------------
void check_linear_for_ops(const std::string& module, const Linear& l, Device device) {
  // A frozen weight or an adapter is the Linear's own business (its tensor-op path handles both); only where they live
  // is checked here.
  if (l.is_frozen())
    DSV4_CHECK(l.frozen.data.device() == device, "{}: frozen weight {} is on {}, the input on {} (Model::to moves it)",
               module, l.weight.name, l.frozen.data.device().str(), device.str());
  else
    check_param_for_ops(module, l.weight, device);
  if (l.lora) {
    check_param_for_ops(module, l.lora->A, device);
    check_param_for_ops(module, l.lora->B, device);
  }
}

void check_param_for_ops(const std::string& module, const Param& p, Device device) {
  DSV4_CHECK(p.value.defined() && p.value.device() == device,
             "{}: parameter {} is on {}, the input on {} (move the model with Model::to / the parameters with .to)",
             module, p.name, p.value.defined() ? p.value.device().str() : std::string("nowhere (no storage)"),
             device.str());
}

void Compressor::check_ops_path(const std::string& module, Device device) const {
  DSV4_CHECK(!simulate_, "{}: the tensor-op path (CUDA tensors) does not support simulate_release_quant yet", module);
  check_linear_for_ops(module, wkv, device);
  check_linear_for_ops(module, wgate, device);
  check_param_for_ops(module, ape, device);
  check_param_for_ops(module, norm.weight, device);
}

Tensor Compressor::forward_ops(const Tensor& x_TD, const CompressPlan& plan, const RopeTable& rope,
                               CompressorCtx* ctx) const {
  const std::string module = "Compressor " + wkv.weight.name.substr(0, wkv.weight.name.rfind("wkv.weight"));
  DSV4_CHECK(plan.ratio == ratio_, "{}: plan ratio {} != compressor ratio {}", module, plan.ratio, ratio_);
  DSV4_CHECK(x_TD.dtype() == DType::F32 && x_TD.ndim() == 2 &&
                 x_TD.size(0) == static_cast<int64_t>(plan.first_entry.size()) && x_TD.size(1) == wkv.in_features(),
             "{}: input {} does not match the plan's {} tokens x {}", module, x_TD.str(), plan.first_entry.size(),
             wkv.in_features());
  const Device dev = x_TD.device();
  check_ops_path(module, dev);
  const int64_t E = plan.entries(), C = head_dim_;
  if (E == 0) {
    if (ctx) *ctx = {};
    return Tensor::empty({0, C}, DType::F32, dev);
  }
  CompressorCtx local;
  CompressorCtx& c = ctx ? *ctx : local;
  c = {};
  c.ops_path = true;
  c.kv_TW = wkv.forward(x_TD, &c.wkv);
  c.gate_TW = wgate.forward(x_TD, &c.wgate);
  c.entry_token = index_tensor(plan.entry_token, dev);
  c.entry_has_prev = Tensor::from_vector<uint8_t>(Shape{E}, plan.entry_has_prev).to(dev);
  c.entry_pos = index_tensor(plan.entry_pos, dev);
  Tensor pooled = Tensor::empty({E, C}, DType::F32, dev);
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    cuda::compress_pool_forward(c.kv_TW.data<float>(), c.gate_TW.data<float>(), ape.value.data<float>(),
                                c.entry_token.data<int64_t>(), c.entry_has_prev.data<uint8_t>(), E, ratio_, C,
                                overlap(), pooled.data<float>(), attention_kernel_stream(x_TD));
#else
    fail_without_cuda("Compressor.forward");
#endif
  } else {
    compress_pool_forward<float>(c.kv_TW.data<float>(), c.gate_TW.data<float>(), ape.value.data<float>(),
                                 c.entry_token.data<int64_t>(), c.entry_has_prev.data<uint8_t>(), E, ratio_, C,
                                 overlap(), pooled.data<float>());
  }
  Tensor out = norm.forward(pooled, &c.norm);
  rope_apply(out, c.entry_pos, rope_inv_freq(rope, dev), false);
  return out;
}

Tensor Compressor::backward_ops(const Tensor& dentries_EC, const RopeTable& rope, const CompressorCtx& ctx) {
  const Device dev = dentries_EC.device();
  const int64_t E = dentries_EC.size(0), C = head_dim_, T = ctx.kv_TW.size(0), W = ctx.kv_TW.size(1);
  DSV4_CHECK(ctx.kv_TW.device() == dev, "Compressor {}: backward gradient on {}, the forward on {}", wkv.weight.name,
             dev.str(), ctx.kv_TW.device().str());
  Tensor d = dentries_EC.contiguous().clone();
  rope_apply(d, ctx.entry_pos, rope_inv_freq(rope, dev), true);
  const Tensor dpooled = norm.backward(d, ctx.norm);
  Tensor dkv = Tensor::zeros({T, W}, DType::F32, dev), dgate = Tensor::zeros({T, W}, DType::F32, dev);
  Tensor dape = Tensor::zeros(ape.value.shape(), DType::F32, dev);
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    Tensor ws = Tensor::empty({std::max<int64_t>(cuda::compress_pool_backward_workspace(E, ratio_, C, overlap()), 1)},
                              DType::F32, dev);
    cuda::compress_pool_backward(ctx.kv_TW.data<float>(), ctx.gate_TW.data<float>(), ape.value.data<float>(),
                                 ctx.entry_token.data<int64_t>(), ctx.entry_has_prev.data<uint8_t>(), E, ratio_, C,
                                 overlap(), dpooled.data<float>(), dkv.data<float>(), dgate.data<float>(),
                                 dape.data<float>(), ws.data<float>(), attention_kernel_stream(dpooled));
#else
    fail_without_cuda("Compressor.backward");
#endif
  } else {
    compress_pool_backward<float>(ctx.kv_TW.data<float>(), ctx.gate_TW.data<float>(), ape.value.data<float>(),
                                  ctx.entry_token.data<int64_t>(), ctx.entry_has_prev.data<uint8_t>(), E, ratio_, C,
                                  overlap(), dpooled.data<float>(), dkv.data<float>(), dgate.data<float>(),
                                  dape.data<float>());
  }
  if (ape.trainable) {
    Tensor& g = ape.grad_buffer();
    ops::copy(ops::add(g, dape), g);
  }
  const Tensor dx = wkv.backward(dkv, ctx.wkv);  // the reference's order: dx(wkv) + dx(wgate)
  return ops::add(dx, wgate.backward(dgate, ctx.wgate));
}

}  // namespace dsv4
