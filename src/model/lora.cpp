// LoRA adapters: cores, initialisation, sites and the model-level API (see lora.h).
#include "model/lora.h"

#include <cmath>
#include <functional>
#include <map>
#include <random>
#include <regex>
#include <set>

#include "model/model.h"
#include "model/param_table.h"
#include "runtime/cpu_blas.h"
#include "runtime/model_ops.h"
#include "runtime/ops.h"

namespace dsv4 {

namespace {

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return h;
}

void check_adapter(const LoraAdapter& ad) {
  DSV4_CHECK(ad.A.value.defined() && ad.B.value.defined() && ad.A.value.dtype() == DType::F32 &&
                 ad.B.value.dtype() == DType::F32 && ad.A.value.ndim() == 2 && ad.B.value.ndim() == 2 &&
                 ad.A.value.is_contiguous() && ad.B.value.is_contiguous() && ad.A.value.device().is_cpu() &&
                 ad.B.value.device().is_cpu() && ad.B.value.size(1) == ad.A.value.size(0),
             "LoRA adapter {}: A and B must be contiguous CPU F32 [r, in] and [out, r], got A {}, B {}", ad.unit,
             ad.A.value.defined() ? ad.A.value.str() : std::string("none"),
             ad.B.value.defined() ? ad.B.value.str() : std::string("none"));
}

// drop(x) [n, in] (contiguous) for an adapter with active dropout.
std::vector<float> dropped(const LoraAdapter& ad, int64_t n, const float* x, int64_t ldx, uint64_t draw,
                           uint64_t mask_offset) {
  const int64_t in = ad.in_features();
  const float keep_scale = static_cast<float>(1.0 / (1.0 - ad.dropout));
  std::vector<float> xd(static_cast<size_t>(n * in));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < in; ++j) {
      const uint64_t idx = mask_offset + static_cast<uint64_t>(i * in + j);
      xd[static_cast<size_t>(i * in + j)] = lora_dropout_keep(ad, draw, idx) ? x[i * ldx + j] * keep_scale : 0.0f;
    }
  return xd;
}

}  // namespace

// ---- config / adapter ---------------------------------------------------------------------------------------
double LoraConfig::scale() const {
  return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

void LoraConfig::validate() const {
  DSV4_CHECK(rank >= 1, "LoRA config: rank must be >= 1, got {}", rank);
  DSV4_CHECK(std::isfinite(alpha) && alpha > 0, "LoRA config: alpha must be a positive number, got {}", alpha);
  DSV4_CHECK(dropout >= 0.0 && dropout < 1.0, "LoRA config: dropout must be in [0, 1), got {}", dropout);
  DSV4_CHECK(!targets.empty(), "LoRA config: no target patterns (e.g. \"wq_a\", \"attn.wo_{{a,b}}\", \"experts.*.w{{1,3}}\")");
  for (const std::string& t : targets) DSV4_CHECK(!t.empty(), "LoRA config: an empty target pattern");
}

LoraAdapter::LoraAdapter(std::string unit_name, int64_t rank, int64_t in, int64_t out, double scale_, double dropout_,
                         uint64_t dropout_key_)
    : unit(std::move(unit_name)),
      A(unit + ".lora_A", Shape{rank, in}),
      B(unit + ".lora_B", Shape{out, rank}),
      scale(scale_),
      dropout(dropout_),
      dropout_key(dropout_key_) {
  DSV4_CHECK(rank >= 1 && in >= 1 && out >= 1, "LoRA adapter {}: bad shape rank {}, in {}, out {}", unit, rank, in, out);
  DSV4_CHECK(dropout >= 0.0 && dropout < 1.0, "LoRA adapter {}: dropout {} outside [0, 1)", unit, dropout);
}

Tensor LoraAdapter::delta(int64_t b0, int64_t m) const {
  check_adapter(*this);
  if (m < 0) m = out_features() - b0;
  DSV4_CHECK(b0 >= 0 && b0 + m <= out_features(), "LoRA adapter {}: rows [{}, {}) outside B {}", unit, b0, b0 + m,
             B.value.str());
  const int64_t r = rank(), in = in_features();
  Tensor d = Tensor::zeros({m, in}, DType::F32);
  if (m > 0)
    cpu_gemm(false, false, m, in, r, static_cast<float>(scale), B.value.data<float>() + b0 * r, r, A.value.data<float>(),
             in, 0.0f, d.data<float>(), in);
  return d;
}

bool lora_dropout_keep(const LoraAdapter& ad, uint64_t draw, uint64_t index) {
  return dropout_keep(dropout_stream(ad.dropout_key, draw), index, ad.dropout);
}

// ---- tensor forms -------------------------------------------------------------------------------------------------
namespace {
void check_adapter_on(const LoraAdapter& ad, Device dev) {
  DSV4_CHECK(ad.A.value.defined() && ad.B.value.defined() && ad.A.value.dtype() == DType::F32 &&
                 ad.B.value.dtype() == DType::F32 && ad.A.value.ndim() == 2 && ad.B.value.ndim() == 2 &&
                 ad.A.value.is_contiguous() && ad.B.value.is_contiguous() && ad.A.value.device() == dev &&
                 ad.B.value.device() == dev && ad.B.value.size(1) == ad.A.value.size(0),
             "LoRA adapter {}: A and B must be contiguous F32 [r, in] and [out, r] on {}, got A {}, B {}", ad.unit,
             dev.str(), ad.A.value.defined() ? ad.A.value.str() : std::string("none"),
             ad.B.value.defined() ? ad.B.value.str() : std::string("none"));
}

// drop(x) when the adapter's dropout is active, else x itself.
Tensor dropped_t(const LoraAdapter& ad, const Tensor& x, uint64_t draw, uint64_t mask_offset) {
  if (!ad.dropout_active()) return x;
  return hashed_dropout(x, dropout_stream(ad.dropout_key, draw), ad.dropout,
                        static_cast<float>(1.0 / (1.0 - ad.dropout)), mask_offset);
}

Tensor b_rows(const LoraAdapter& ad, int64_t b0, int64_t m) {
  DSV4_CHECK(b0 >= 0 && b0 + m <= ad.out_features(), "LoRA adapter {}: rows [{}, {}) outside B {}", ad.unit, b0,
             b0 + m, ad.B.value.str());
  return ad.B.value.slice(0, b0, b0 + m);
}
}  // namespace

Tensor lora_down(const LoraAdapter& ad, const Tensor& x, uint64_t draw, uint64_t mask_offset) {
  check_adapter_on(ad, x.device());
  DSV4_CHECK(x.ndim() == 2 && x.size(1) == ad.in_features(), "LoRA adapter {}: input {} does not match A {}", ad.unit,
             x.str(), ad.A.value.str());
  if (x.size(0) == 0) return Tensor::zeros({0, ad.rank()}, DType::F32, x.device());
  return ops::matmul(dropped_t(ad, x, draw, mask_offset), ad.A.value, false, true);
}

void lora_up(const LoraAdapter& ad, const Tensor& z, int64_t b0, Tensor& y) {
  check_adapter_on(ad, z.device());
  const Tensor B = b_rows(ad, b0, y.size(1));
  if (z.size(0) == 0 || y.size(1) == 0) return;
  ops::gemm(z, false, B, true, static_cast<float>(ad.scale), 1.0f, y);
}

void lora_up_backward(LoraAdapter& ad, const Tensor& dy, const Tensor& z, int64_t b0, Tensor& dz) {
  check_adapter_on(ad, dy.device());
  const int64_t m = dy.size(1);
  const Tensor B = b_rows(ad, b0, m);
  const float s = static_cast<float>(ad.scale);
  if (ad.B.trainable) {
    Tensor dB = ad.B.grad_buffer().slice(0, b0, b0 + m);
    if (dy.size(0) > 0 && m > 0) ops::gemm(dy, true, z, false, s, 1.0f, dB);
  }
  if (dy.size(0) > 0 && m > 0) ops::gemm(dy, false, B, false, s, 1.0f, dz);
}

void lora_down_backward(LoraAdapter& ad, const Tensor& dz, const Tensor& x, uint64_t draw, uint64_t mask_offset,
                        Tensor* dx) {
  check_adapter_on(ad, dz.device());
  if (ad.A.trainable) {
    Tensor& dA = ad.A.grad_buffer();
    if (x.size(0) > 0) ops::gemm(dz, true, dropped_t(ad, x, draw, mask_offset), false, 1.0f, 1.0f, dA);
  }
  if (!dx || x.size(0) == 0) return;
  if (!ad.dropout_active()) {
    ops::gemm(dz, false, ad.A.value, false, 1.0f, 1.0f, *dx);
    return;
  }
  const Tensor t = dropped_t(ad, ops::matmul(dz, ad.A.value), draw, mask_offset);
  ops::copy(ops::add(*dx, t), *dx);
}

// ---- cores ----------------------------------------------------------------------------------------------------
void lora_down(const LoraAdapter& ad, int64_t n, const float* x, int64_t ldx, uint64_t draw, uint64_t mask_offset,
               float* z) {
  check_adapter(ad);
  if (n == 0) return;
  const int64_t r = ad.rank(), in = ad.in_features();
  if (!ad.dropout_active()) {
    cpu_gemm(false, true, n, r, in, 1.0f, x, ldx, ad.A.value.data<float>(), in, 0.0f, z, r);
    return;
  }
  const std::vector<float> xd = dropped(ad, n, x, ldx, draw, mask_offset);
  cpu_gemm(false, true, n, r, in, 1.0f, xd.data(), in, ad.A.value.data<float>(), in, 0.0f, z, r);
}

void lora_up(const LoraAdapter& ad, int64_t n, const float* z, int64_t b0, int64_t m, float* y, int64_t ldy) {
  check_adapter(ad);
  DSV4_CHECK(b0 >= 0 && b0 + m <= ad.out_features(), "LoRA adapter {}: rows [{}, {}) outside B {}", ad.unit, b0,
             b0 + m, ad.B.value.str());
  if (n == 0 || m == 0) return;
  const int64_t r = ad.rank();
  cpu_gemm(false, true, n, m, r, static_cast<float>(ad.scale), z, r, ad.B.value.data<float>() + b0 * r, r, 1.0f, y,
           ldy);
}

void lora_up_backward(LoraAdapter& ad, int64_t n, const float* dy, int64_t lddy, const float* z, int64_t b0, int64_t m,
                      float* dz) {
  check_adapter(ad);
  DSV4_CHECK(b0 >= 0 && b0 + m <= ad.out_features(), "LoRA adapter {}: rows [{}, {}) outside B {}", ad.unit, b0,
             b0 + m, ad.B.value.str());
  const int64_t r = ad.rank();
  const float s = static_cast<float>(ad.scale);
  if (ad.B.trainable) {
    float* dB = ad.B.grad_buffer().data<float>();
    if (n > 0 && m > 0) cpu_gemm(true, false, m, r, n, s, dy, lddy, z, r, 1.0f, dB + b0 * r, r);
  }
  if (n > 0 && m > 0) cpu_gemm(false, false, n, r, m, s, dy, lddy, ad.B.value.data<float>() + b0 * r, r, 1.0f, dz, r);
}

void lora_down_backward(LoraAdapter& ad, int64_t n, const float* dz, const float* x, int64_t ldx, uint64_t draw,
                        uint64_t mask_offset, float* dx, int64_t lddx) {
  check_adapter(ad);
  const int64_t r = ad.rank(), in = ad.in_features();
  const bool drop = ad.dropout_active();
  if (ad.A.trainable) {
    float* dA = ad.A.grad_buffer().data<float>();
    if (n > 0) {
      if (drop) {
        const std::vector<float> xd = dropped(ad, n, x, ldx, draw, mask_offset);
        cpu_gemm(true, false, r, in, n, 1.0f, dz, r, xd.data(), in, 1.0f, dA, in);
      } else {
        cpu_gemm(true, false, r, in, n, 1.0f, dz, r, x, ldx, 1.0f, dA, in);
      }
    }
  }
  if (!dx || n == 0) return;
  if (!drop) {
    cpu_gemm(false, false, n, in, r, 1.0f, dz, r, ad.A.value.data<float>(), in, 1.0f, dx, lddx);
    return;
  }
  std::vector<float> t(static_cast<size_t>(n * in));
  cpu_gemm(false, false, n, in, r, 1.0f, dz, r, ad.A.value.data<float>(), in, 0.0f, t.data(), in);
  const float keep_scale = static_cast<float>(1.0 / (1.0 - ad.dropout));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < in; ++j)
      if (lora_dropout_keep(ad, draw, mask_offset + static_cast<uint64_t>(i * in + j)))
        dx[i * lddx + j] += t[static_cast<size_t>(i * in + j)] * keep_scale;
}

// ---- initialisation --------------------------------------------------------------------------------------------
uint32_t lora_init_seed(uint64_t seed, const std::string& unit) {
  return static_cast<uint32_t>(splitmix64(seed ^ fnv1a64(unit)) & 0xFFFFFFFFull);
}

uint64_t lora_dropout_key(uint64_t seed, const std::string& unit) {
  return splitmix64(splitmix64(seed + 0x6A09E667F3BCC909ull) ^ fnv1a64(unit));
}

void kaiming_uniform_like_torch(Tensor& A, uint32_t torch_seed) {
  DSV4_CHECK(A.defined() && A.dtype() == DType::F32 && A.ndim() == 2 && A.is_contiguous() && A.device().is_cpu() &&
                 A.size(1) > 0,
             "kaiming_uniform_like_torch: expected a contiguous CPU F32 [rows, cols > 0] tensor, got {}", A.str());
  // torch.nn.init.kaiming_uniform_(a=sqrt(5), mode="fan_in", nonlinearity="leaky_relu"), in Python's doubles.
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1.0 + a * a));
  const double stdev = gain / std::sqrt(static_cast<double>(A.size(1)));
  const double bound = std::sqrt(3.0) * stdev;
  // tensor.uniform_(-bound, bound) on the CPU: from / to cast to float, then per element (mt19937 32-bit output u)
  // ((u & (2^24 - 1)) * 2^-24) * (to - from) + from in double, cast to float.
  const float from = static_cast<float>(-bound), to = static_cast<float>(bound);
  const double range = static_cast<double>(to) - static_cast<double>(from);
  std::mt19937 gen(torch_seed);
  float* p = A.data<float>();
  for (int64_t i = 0; i < A.numel(); ++i) {
    const uint32_t u = static_cast<uint32_t>(gen());
    const double x = static_cast<double>(u & 0xFFFFFFu) * 0x1p-24;
    p[i] = static_cast<float>(x * range + static_cast<double>(from));
  }
}

// ---- pattern matching ------------------------------------------------------------------------------------------
namespace {

// "{a,b}c{d,e}" -> ["acd", "ace", "bcd", "bce"] (no nesting).
std::vector<std::string> expand_braces(const std::string& p) {
  const size_t open = p.find('{');
  if (open == std::string::npos) return {p};
  const size_t close = p.find('}', open);
  DSV4_CHECK(close != std::string::npos, "LoRA target pattern '{}': unbalanced '{{'", p);
  std::vector<std::string> out;
  const std::string head = p.substr(0, open), body = p.substr(open + 1, close - open - 1);
  const std::vector<std::string> tails = expand_braces(p.substr(close + 1));
  size_t start = 0;
  while (true) {
    const size_t comma = body.find(',', start);
    const std::string alt = body.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    for (const std::string& t : tails) out.push_back(head + alt + t);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

bool glob(const char* p, const char* s) {
  if (*p == '\0') return *s == '\0';
  if (p[0] == '*' && p[1] == '*') {
    for (const char* t = s;; ++t) {
      if (glob(p + 2, t)) return true;
      if (*t == '\0') return false;
    }
  }
  if (*p == '*') {
    for (const char* t = s;; ++t) {
      if (glob(p + 1, t)) return true;
      if (*t == '\0' || *t == '.') return false;
    }
  }
  if (*p == '?') return *s != '\0' && *s != '.' && glob(p + 1, s + 1);
  return *s == *p && glob(p + 1, s + 1);
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

}  // namespace

bool lora_pattern_matches(const std::string& pattern, const std::string& unit) {
  if (unit.find(".compressor.") != std::string::npos && pattern.find("compressor") == std::string::npos) return false;
  if (unit.find(".indexer.") != std::string::npos && pattern.find("indexer") == std::string::npos) return false;
  if (starts_with(unit, "mtp.") && pattern.find("mtp") == std::string::npos) return false;
  const std::string weight = unit + ".weight";
  for (const std::string& alt : expand_braces(pattern)) {
    std::vector<std::string> forms{alt};
    if (!starts_with(alt, "layers.") && !starts_with(alt, "mtp.") && !starts_with(alt, "*")) forms.push_back("**." + alt);
    for (const std::string& f : forms)
      if (glob(f.c_str(), unit.c_str()) || glob(f.c_str(), weight.c_str())) return true;
  }
  return false;
}

// ---- sites ---------------------------------------------------------------------------------------------------------
namespace {

struct Site {
  LoraSite info;
  std::optional<LoraAdapter>* slot = nullptr;
  ExpertWeights* expert = nullptr;  // expert matrices: conflict checks (w13 vs w1 / w3)
  int k = 0;                        // 1, 2, 3, 13
  bool routed = false;
  Attention* attn = nullptr;        // wo_a units
  int64_t group = -1;               // wo_a: group index (global), -1 = the shared-A unit
  Attention* owner = nullptr;       // every site of an attention: sets the adapter placements after attaching
};

void add_linear(std::vector<Site>& out, const std::string& prefix, Linear& l, bool explicit_only) {
  Site s;
  s.info.unit = prefix;
  s.info.weight = l.weight.name;
  s.info.in = l.in_features();
  s.info.out = l.out_features();
  s.info.explicit_only = explicit_only;
  s.slot = &l.lora;
  out.push_back(std::move(s));
}

void add_attention(std::vector<Site>& out, const std::string& p, Attention& a, bool mtp) {
  const size_t first = out.size();
  add_linear(out, p + "wq_a", a.wq_a, mtp);
  add_linear(out, p + "wq_b", a.wq_b, mtp);
  add_linear(out, p + "wkv", a.wkv, mtp);
  const int64_t G = a.o_groups(), R = a.o_lora_rank(), K = a.wo_a_in();
  if (a.wo_a_lora.groups.empty()) a.wo_a_lora.groups.resize(static_cast<size_t>(G));
  {
    Site s;
    s.info = LoraSite{p + "wo_a", p + "wo_a.weight", K, G * R, true, mtp};
    s.slot = &a.wo_a_lora.shared;
    s.attn = &a;
    out.push_back(std::move(s));
  }
  for (int64_t g = 0; g < G; ++g) {  // this rank's groups (all without tensor parallelism), named by global index
    const int64_t global = a.o_group_offset() + g;
    Site s;
    s.info = LoraSite{p + "wo_a." + std::to_string(global), p + "wo_a.weight", K, R, true, mtp};
    s.slot = &a.wo_a_lora.groups[static_cast<size_t>(g)];
    s.attn = &a;
    s.group = global;
    out.push_back(std::move(s));
  }
  add_linear(out, p + "wo_b", a.wo_b, mtp);
  if (a.has_compressor()) {
    add_linear(out, p + "compressor.wkv", a.compressor.wkv, true);
    add_linear(out, p + "compressor.wgate", a.compressor.wgate, true);
  }
  if (a.has_indexer()) {
    add_linear(out, p + "indexer.wq_b", a.indexer.wq_b, true);
    add_linear(out, p + "indexer.weights_proj", a.indexer.weights_proj, true);
    add_linear(out, p + "indexer.compressor.wkv", a.indexer.compressor.wkv, true);
    add_linear(out, p + "indexer.compressor.wgate", a.indexer.compressor.wgate, true);
  }
  for (size_t i = first; i < out.size(); ++i) out[i].owner = &a;
}

void add_expert(std::vector<Site>& out, const std::string& p, ExpertWeights& ew, int64_t D, int64_t I, bool routed,
                bool mtp) {
  auto one = [&](int k, int64_t in, int64_t o, bool pattern_unit) {
    Site s;
    s.info = LoraSite{p + "w" + std::to_string(k), p + "w" + std::to_string(k == 13 ? 1 : k) + ".weight", in, o,
                      pattern_unit, mtp};
    s.slot = &ew.lora(k);
    s.expert = &ew;
    s.k = k;
    s.routed = routed;
    out.push_back(std::move(s));
  };
  one(1, D, I, true);
  if (routed) one(13, D, 2 * I, false);
  one(2, I, D, true);
  one(3, D, I, true);
}

void add_moe(std::vector<Site>& out, const std::string& p, MoE& m, bool mtp) {
  {
    Site s;
    s.info = LoraSite{p + "gate", p + "gate.weight", m.dim(), m.n_experts(), true, mtp};
    s.slot = &m.gate_lora;
    out.push_back(std::move(s));
  }
  for (int64_t i = 0; i < m.n_local_experts(); ++i)  // local experts only, named by their global index
    add_expert(out, p + "experts." + std::to_string(m.expert_begin() + i) + ".", m.experts[static_cast<size_t>(i)],
               m.dim(), m.inter_dim(), true, mtp);
  if (m.has_shared()) add_expert(out, p + "shared_experts.", m.shared, m.dim(), m.inter_dim(), false, mtp);
}

std::vector<Site> collect_sites(Model& model) {
  std::vector<Site> out;
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    add_attention(out, p + "attn.", model.layers[i]->attn, false);
    add_moe(out, p + "ffn.", model.layers[i]->ffn, false);
  }
  for (size_t j = 0; j < model.mtp.size(); ++j) {
    const std::string p = "mtp." + std::to_string(j) + ".";
    Mtp& m = *model.mtp[j];
    add_linear(out, p + "e_proj", m.e_proj, true);
    add_linear(out, p + "h_proj", m.h_proj, true);
    add_attention(out, p + "attn.", m.block.attn, true);
    add_moe(out, p + "ffn.", m.block.ffn, true);
  }
  return out;
}

LoraAdapter& attach_at(Site& s, LoraAdapter ad) {
  DSV4_CHECK(!s.slot->has_value(), "LoRA: {} already has an adapter", s.info.unit);
  if (s.expert) {
    const bool fused = s.expert->lora_w13.has_value();
    const bool split = s.expert->lora_w1.has_value() || s.expert->lora_w3.has_value();
    DSV4_CHECK(!(s.k == 13 && split) && !((s.k == 1 || s.k == 3) && fused),
               "LoRA: {} conflicts with an existing adapter of the same expert (a fused w13 adapter excludes w1 / w3 "
               "adapters)",
               s.info.unit);
  }
  if (s.attn) {
    const GroupedLora& gl = s.attn->wo_a_lora;
    bool any_group = false;
    for (const auto& g : gl.groups) any_group = any_group || g.has_value();
    DSV4_CHECK(s.group < 0 ? !any_group : !gl.shared.has_value(),
               "LoRA: {} conflicts with the existing {} wo_a adapter(s) (per-group and shared-A adapters exclude each "
               "other)",
               s.info.unit, s.group < 0 ? "per-group" : "shared-A");
  }
  DSV4_CHECK(ad.in_features() == s.info.in && ad.out_features() == s.info.out,
             "LoRA: adapter {} is A {}, B {}; the site needs A [r, {}], B [{}, r]", s.info.unit, ad.A.value.str(),
             ad.B.value.str(), s.info.in, s.info.out);
  s.slot->emplace(std::move(ad));
  if (s.owner) s.owner->place_adapters();  // tensor parallelism: which part of the global adapter this rank holds
  return **s.slot;
}

// PEFT's A init (kaiming_uniform_like_torch on the global [r, in]); a TpSplit A keeps its slice of the global draw.
void init_lora_A(LoraAdapter& ad, uint32_t torch_seed) {
  if (ad.A.placement != Placement::TpSplit) {
    kaiming_uniform_like_torch(ad.A.value, torch_seed);
    return;
  }
  Tensor full = Tensor::empty(ad.A.global_shape(), DType::F32);
  kaiming_uniform_like_torch(full, torch_seed);
  ops::copy(ad.A.local_part(full), ad.A.value);
}

void for_each_adapter(Model& model, const std::function<void(LoraAdapter&)>& f) {
  for (Site& s : collect_sites(model))
    if (s.slot->has_value()) f(**s.slot);
}

}  // namespace

std::vector<LoraSite> lora_sites(const ModelConfig& cfg) {
  ParamTableOptions topts;
  topts.format = CheckpointFormat::named("f32");
  const ParamTable table = ParamTable::build(cfg, topts);
  const std::string suffix = ".weight";
  auto has = [](const std::string& s, const char* w) { return s.find(w) != std::string::npos; };
  std::vector<LoraSite> out;
  for (const ParamEntry& e : table.entries()) {
    const std::string& n = e.name;
    if (n.size() <= suffix.size() || n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const std::string unit = n.substr(0, n.size() - suffix.size());
    const bool mtp = starts_with(unit, "mtp.");
    const int64_t rows = e.shape[0], cols = e.shape[1];
    if (e.holder == WeightHolder::Linear) {
      if (unit == "head") continue;
      out.push_back({unit, n, cols, rows, true, mtp || has(unit, ".compressor.") || has(unit, ".indexer.") ||
                                                    has(unit, "e_proj") || has(unit, "h_proj")});
    } else if (e.holder == WeightHolder::Expert) {
      const bool routed = has(unit, ".ffn.experts.");
      out.push_back({unit, n, cols, rows, true, mtp});
      if (routed && unit.back() == '1')
        out.push_back({unit.substr(0, unit.size() - 1) + "13", n, cols, 2 * rows, false, mtp});
    } else if (unit.size() > 10 && unit.compare(unit.size() - 10, 10, ".attn.wo_a") == 0) {
      const int64_t G = cfg.o_groups, R = cfg.o_lora_rank;
      out.push_back({unit, n, cols, G * R, true, mtp});
      for (int64_t g = 0; g < G; ++g) out.push_back({unit + "." + std::to_string(g), n, cols, R, true, mtp});
    } else if (unit.size() > 9 && unit.compare(unit.size() - 9, 9, ".ffn.gate") == 0) {
      out.push_back({unit, n, cols, rows, true, mtp});
    }
  }
  return out;
}

std::vector<LoraDeltaPart> lora_unit_parts(const LoraSite& site, const ModelConfig& cfg) {
  const std::string& u = site.unit;
  if (u.size() > 4 && u.compare(u.size() - 4, 4, ".w13") == 0) {
    const std::string base = u.substr(0, u.size() - 3);
    const int64_t I = cfg.moe_inter_dim;
    return {{base + "w1.weight", 0, 0, I}, {base + "w3.weight", 0, I, I}};
  }
  static const std::regex group(R"(^(.*\.attn\.wo_a)\.(\d+)$)");
  std::smatch m;
  if (std::regex_match(u, m, group)) {
    const int64_t g = std::stoll(m[2].str()), R = cfg.o_lora_rank;
    return {{m[1].str() + ".weight", g * R, 0, R}};
  }
  return {{site.weight, 0, 0, site.out}};
}

std::vector<LoraSite> lora_sites(Model& model) {
  std::vector<LoraSite> out;
  for (const Site& s : collect_sites(model)) out.push_back(s.info);
  return out;
}

LoraAdapter& attach_lora(Model& model, const std::string& unit, int64_t rank, double scale, double dropout,
                         uint64_t dropout_key) {
  std::vector<Site> sites = collect_sites(model);
  for (Site& s : sites)
    if (s.info.unit == unit) return attach_at(s, LoraAdapter(unit, rank, s.info.in, s.info.out, scale, dropout, dropout_key));
  DSV4_FAIL("LoRA: '{}' is not an adapter site of model '{}' (sites are e.g. layers.0.attn.wq_a, layers.0.attn.wo_a.1, "
            "layers.0.ffn.experts.3.w13, layers.0.ffn.shared_experts.w2, layers.0.ffn.gate)",
            unit, model.config().name);
}

int64_t apply_lora(Model& model, const LoraConfig& cfg) {
  cfg.validate();
  std::vector<Site> sites = collect_sites(model);
  std::map<std::string, size_t> by_unit;
  for (size_t i = 0; i < sites.size(); ++i) by_unit[sites[i].info.unit] = i;

  // 1. Units the patterns select (pattern units only); patterns that select nothing are errors.
  std::set<std::string> selected;
  std::vector<std::string> unmatched;
  for (const std::string& pat : cfg.targets) {
    bool any = false;
    for (const Site& s : sites)
      if (s.info.pattern_unit && lora_pattern_matches(pat, s.info.unit)) {
        selected.insert(s.info.unit);
        any = true;
      }
    if (!any) {
      // With expert parallelism this rank holds some routed experts only: a pattern naming other ranks' experts
      // is not an error when it matches a site of the whole model.
      const std::vector<LoraSite> global = lora_sites(model.config());
      for (const LoraSite& g : global)
        if (g.pattern_unit && lora_pattern_matches(pat, g.unit)) any = true;
    }
    if (!any) unmatched.push_back("'" + pat + "'");
  }
  if (!unmatched.empty()) {
    std::string list;
    for (const auto& u : unmatched) list += (list.empty() ? "" : ", ") + u;
    DSV4_FAIL("LoRA targets: pattern(s) {} match no adapter site of model '{}' (sites: layers.N.attn.{{wq_a, wq_b, wkv, "
              "wo_a, wo_a.G, wo_b}}, layers.N.ffn.{{gate, shared_experts.wK, experts.E.wK}}; compressor / indexer / "
              "mtp sites only when the pattern names them)",
              list, model.config().name);
  }

  // 2. Adapter units: wo_a -> its groups (or the shared-A unit); routed w1 + w3 of one expert -> the fused w13.
  std::vector<std::string> units;
  std::set<std::string> seen;
  auto add = [&](const std::string& u) {
    if (seen.insert(u).second) units.push_back(u);
  };
  for (const Site& s : sites) {
    const std::string& u = s.info.unit;
    if (!selected.count(u)) continue;
    if (s.attn && s.group < 0) {
      if (cfg.wo_a_per_group) {
        for (int64_t g = 0; g < s.attn->o_groups(); ++g) add(u + "." + std::to_string(s.attn->o_group_offset() + g));
      } else {
        add(u);
      }
    } else if (s.attn) {
      DSV4_CHECK(cfg.wo_a_per_group, "LoRA targets: {} is a per-group wo_a unit but the config asks for a shared-A "
                 "wo_a adapter (wo_a_per_group = false)", u);
      add(u);
    } else if (s.expert && s.routed && (s.k == 1 || s.k == 3)) {
      const std::string base = u.substr(0, u.size() - 2);  // "...experts.E."
      if (selected.count(base + "w1") && selected.count(base + "w3"))
        add(base + "w13");
      else
        add(u);
    } else {
      add(u);
    }
  }

  // 3. Attach: A Kaiming-uniform (torch-exact, seeded per unit), B zero.
  const double scale = cfg.scale();
  for (const std::string& u : units) {
    Site& s = sites.at(by_unit.at(u));
    LoraAdapter& ad =
        attach_at(s, LoraAdapter(u, cfg.rank, s.info.in, s.info.out, scale, cfg.dropout, lora_dropout_key(cfg.seed, u)));
    init_lora_A(ad, lora_init_seed(cfg.seed, u));  // after attaching: the placement says which slice to keep
  }

  // 4. Freeze everything else.
  freeze_base(model);
  return static_cast<int64_t>(units.size());
}

void freeze_base(Model& model) {
  std::set<const Param*> adapter_params;
  for (Param* p : lora_params(model)) adapter_params.insert(p);
  model.visit([&](Param& p) {
    if (!adapter_params.count(&p)) {
      p.trainable = false;
      p.grad = Tensor();
    }
  });
}

std::vector<LoraAdapter*> lora_adapters(Model& model) {
  std::vector<LoraAdapter*> out;
  for_each_adapter(model, [&](LoraAdapter& ad) { out.push_back(&ad); });
  return out;
}

std::vector<Param*> lora_params(Model& model) {
  std::vector<Param*> out;
  for_each_adapter(model, [&](LoraAdapter& ad) {
    out.push_back(&ad.A);
    out.push_back(&ad.B);
  });
  return out;
}

void set_lora_train_mode(Model& model, bool train) {
  for_each_adapter(model, [&](LoraAdapter& ad) { ad.train = train; });
}

void set_lora_dropout_step(Model& model, uint64_t step) {
  for_each_adapter(model, [&](LoraAdapter& ad) { ad.draws = step << 20; });
}

void remove_lora(Model& model) {
  for (Site& s : collect_sites(model)) s.slot->reset();
}

}  // namespace dsv4
