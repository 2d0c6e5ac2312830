#include "model/compressor.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/quant_sim.h"
#include "runtime/compress_math.h"

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
  if (E == 0) return Tensor::zeros({T, wkv.in_features()}, DType::F32);
  DSV4_CHECK(ctx.kv_TW.defined(), "Compressor: backward without a forward context");
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

}  // namespace dsv4
