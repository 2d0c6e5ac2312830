// CPU twins of runtime/model_ops.h: the model's and optimizer's own loops (runtime/model_math.h,
// runtime/update_math.h, runtime/newton_schulz.h) over validated, contiguous F32 tensors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "runtime/error.h"
#include "runtime/model_math.h"
#include "runtime/model_ops.h"

namespace dsv4::cpu {
namespace {
const float* ptr_or_null(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }
}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  rmsnorm_forward_rows<float>(x.data<float>(), ptr_or_null(w), y.data<float>(), rstd.data<float>(), x.size(0),
                              x.size(1), eps);
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw) {
  if (dw.defined()) std::fill_n(dw.data<float>(), dw.numel(), 0.0f);
  rmsnorm_backward_rows<float>(dy.data<float>(), x.data<float>(), ptr_or_null(w), rstd.data<float>(), dx.data<float>(),
                               dw.defined() ? dw.data<float>() : nullptr, x.size(0), x.size(1));
}

void rope_apply(Tensor& x, const Tensor& pos, const Tensor& inv_freq, bool inverse) {
  const int64_t R = x.size(0), P = pos.numel(), group = R / P;
  const int64_t* pp = pos.data<int64_t>();
  std::vector<int64_t> row_pos(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) row_pos[static_cast<size_t>(r)] = pp[r / group];
  rope_rows_freq<float>(x.data<float>(), R, x.size(1), x.stride(0), row_pos.data(), inv_freq.data<float>(),
                        2 * inv_freq.numel(), inverse);
}

void swiglu(const Tensor& g, const Tensor& u, const Tensor& w, double limit, Tensor& h) {
  swiglu_clamp_rows<float>(g.data<float>(), u.data<float>(), ptr_or_null(w), h.data<float>(), g.size(0), g.size(1),
                           limit, g.stride(0));
}

void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& w, const Tensor& dh, double limit, Tensor& dg,
                     Tensor& du, Tensor& dw) {
  swiglu_clamp_backward_rows<float>(g.data<float>(), u.data<float>(), ptr_or_null(w), dh.data<float>(),
                                    dg.data<float>(), du.data<float>(), dw.defined() ? dw.data<float>() : nullptr,
                                    g.size(0), g.size(1), limit, g.stride(0), dg.stride(0));
}

void hashed_dropout(const Tensor& x, uint64_t stream, double p, float keep_scale, uint64_t mask_offset, Tensor& out) {
  const int64_t n = x.size(0), m = x.size(1), ld = x.stride(0);
  const float* xp = x.data<float>();
  float* o = out.data<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j)
      o[i * m + j] =
          dropout_keep(stream, mask_offset + static_cast<uint64_t>(i * m + j), p) ? xp[i * ld + j] * keep_scale : 0.0f;
}

void sqrt_softplus(const Tensor& s, Tensor& aff) { sqrt_softplus_rows<float>(s.data<float>(), aff.data<float>(), s.numel()); }

void sqrt_softplus_backward(const Tensor& s, const Tensor& aff, const Tensor& daff, Tensor& ds) {
  sqrt_softplus_backward_rows<float>(s.data<float>(), aff.data<float>(), daff.data<float>(), ds.data<float>(),
                                     s.numel());
}

void moe_route(const Tensor& aff, const Tensor& bias, const Tensor& fixed_idx, double route_scale, Tensor& idx,
               Tensor& w) {
  moe_route_rows<float>(aff.data<float>(), ptr_or_null(bias), fixed_idx.defined() ? fixed_idx.data<int64_t>() : nullptr,
                        aff.size(0), aff.size(1), idx.size(1), route_scale, idx.data<int64_t>(), w.data<float>());
}

void moe_route_backward(const Tensor& aff, const Tensor& idx, const Tensor& dw, double route_scale, Tensor& daff) {
  std::fill_n(daff.data<float>(), daff.numel(), 0.0f);
  moe_route_backward_rows<float>(aff.data<float>(), idx.data<int64_t>(), dw.data<float>(), aff.size(0), aff.size(1),
                                 idx.size(1), route_scale, daff.data<float>());
}

// model/moe.cpp's dispatch: a counting sort of the slots by expert, slot-ascending inside an expert.
void moe_sort_slots(const Tensor& idx, int64_t E, Tensor& offsets, Tensor& sorted_slot) {
  const int64_t N = idx.numel();
  const int64_t* ip = idx.data<int64_t>();
  int64_t* op = offsets.data<int64_t>();
  std::fill_n(op, E + 1, int64_t{0});
  for (int64_t n = 0; n < N; ++n) ++op[ip[n] + 1];
  for (int64_t e = 0; e < E; ++e) op[e + 1] += op[e];
  std::vector<int64_t> fill(op, op + E);
  int64_t* sp = sorted_slot.data<int64_t>();
  for (int64_t n = 0; n < N; ++n) sp[fill[static_cast<size_t>(ip[n])]++] = n;
}

void moe_permute(const Tensor& x, const Tensor& sorted_slot, int64_t K, Tensor& out) {
  const int64_t N = sorted_slot.numel(), D = x.size(1);
  const float* xp = x.data<float>();
  const int64_t* sp = sorted_slot.data<int64_t>();
  float* o = out.data<float>();
  for (int64_t p = 0; p < N; ++p) std::copy(xp + (sp[p] / K) * D, xp + (sp[p] / K + 1) * D, o + p * D);
}

// model/moe.cpp's combine: y starts at +0 and adds the slot rows in sorted-position order.
void moe_unpermute(const Tensor& y_sorted, const Tensor& sorted_slot, const Tensor& w, int64_t K, Tensor& y) {
  const int64_t N = sorted_slot.numel(), D = y.size(1);
  float* yp = y.data<float>();
  std::fill_n(yp, y.numel(), 0.0f);
  const float* pb = y_sorted.data<float>();
  const int64_t* sp = sorted_slot.data<int64_t>();
  const float* wp = ptr_or_null(w);
  for (int64_t p = 0; p < N; ++p) {
    float* d = yp + (sp[p] / K) * D;
    const float* src = pb + p * D;
    if (wp) {
      const float ws = wp[sp[p]];
      for (int64_t i = 0; i < D; ++i) d[i] += ws * src[i];
    } else {
      for (int64_t i = 0; i < D; ++i) d[i] += src[i];
    }
  }
}

// model/embedding.cpp's cross_entropy, split at its tp reductions.
void ce_row_max(const Tensor& logits, Tensor& row_max) {
  const int64_t T = logits.size(0), V = logits.size(1);
  const float* z = logits.data<float>();
  float* mp = row_max.data<float>();
  for (int64_t t = 0; t < T; ++t) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, z[t * V + v]);
    mp[t] = mx;
  }
}

void ce_sums(const Tensor& logits, const Tensor& targets, const Tensor& row_max, int64_t begin,
             std::vector<double>& sums) {
  const int64_t T = logits.size(0), V = logits.size(1);
  const float* z = logits.data<float>();
  const float* mp = row_max.data<float>();
  const int64_t* y = targets.data<int64_t>();
  sums.assign(static_cast<size_t>(2 * T), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    if (y[t] == kCeIgnoreIndex) continue;
    double s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(static_cast<double>(z[t * V + v] - mp[t]));
    sums[static_cast<size_t>(t)] = s;
    const int64_t local = y[t] - begin;
    if (local >= 0 && local < V) sums[static_cast<size_t>(T + t)] = static_cast<double>(z[t * V + local]);
  }
}

void ce_backward(const Tensor& logits, const Tensor& targets, const std::vector<double>& lse, double norm,
                 int64_t begin, Tensor& dlogits) {
  const int64_t T = logits.size(0), V = logits.size(1);
  const float* z = logits.data<float>();
  const int64_t* y = targets.data<int64_t>();
  std::fill_n(dlogits.data<float>(), dlogits.numel(), 0.0f);
  if (!(norm > 0)) return;
  for (int64_t t = 0; t < T; ++t) {
    if (y[t] == kCeIgnoreIndex) continue;
    const double l = lse[static_cast<size_t>(t)];
    float* g = dlogits.data<float>() + t * V;
    for (int64_t v = 0; v < V; ++v) g[v] = static_cast<float>(std::exp(static_cast<double>(z[t * V + v]) - l) / norm);
    const int64_t local = y[t] - begin;
    if (local >= 0 && local < V) g[local] -= static_cast<float>(1.0 / norm);
  }
}

void adamw_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& g, const std::vector<Tensor>& exp_avg,
                 const std::vector<Tensor>& exp_avg_sq, const std::vector<AdamWScalars>& s) {
  for (size_t t = 0; t < w.size(); ++t) {
    float* wp = w[t].data<float>();
    const float* gp = g[t].data<float>();
    float* m = exp_avg[t].data<float>();
    float* v = exp_avg_sq[t].data<float>();
    for (int64_t i = 0; i < w[t].numel(); ++i) adamw_element(wp[i], gp[i], m[i], v[i], s[t]);
  }
}

void muon_momentum_steps(const std::vector<Tensor>& g, const std::vector<Tensor>& momentum,
                         const std::vector<Tensor>& u, float mu, bool nesterov) {
  for (size_t t = 0; t < g.size(); ++t) {
    const float* gp = g[t].data<float>();
    float* m = momentum[t].data<float>();
    float* up = u[t].data<float>();
    for (int64_t i = 0; i < g[t].numel(); ++i) muon_momentum_element(gp[i], m[i], up[i], mu, nesterov);
  }
}

void muon_apply_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& o, const MuonApplyScalars& s) {
  for (size_t t = 0; t < w.size(); ++t) {
    float* wp = w[t].data<float>();
    const float* op = o[t].data<float>();
    for (int64_t i = 0; i < w[t].numel(); ++i) wp[i] = muon_apply_element(wp[i], op[i], s);
  }
}

void newton_schulz_batched(Tensor& x, const std::vector<NsStage>& schedule, double eps, NsPrecision precision) {
  const int64_t r = x.size(x.ndim() - 2), c = x.size(x.ndim() - 1), B = x.numel() / std::max<int64_t>(r * c, 1);
  float* p = x.data<float>();
  for (int64_t b = 0; b < B; ++b) newton_schulz(p + b * r * c, p + b * r * c, r, c, schedule, eps, precision);
}

void sum_squares(const std::vector<Tensor>& xs, std::vector<double>& sums) {
  for (size_t t = 0; t < xs.size(); ++t) {
    const float* x = xs[t].data<float>();
    double s = 0;
    for (int64_t i = 0; i < xs[t].numel(); ++i) s += static_cast<double>(x[i]) * x[i];
    sums[t] = s;
  }
}

void convert_to_bf16(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys) {
  for (size_t t = 0; t < xs.size(); ++t) {
    const float* x = xs[t].data<float>();
    uint16_t* y = ys[t].data_u16();
    for (int64_t i = 0; i < xs[t].numel(); ++i) y[i] = f32_to_bf16(x[i]);
  }
}

void scale_in_place(const std::vector<Tensor>& xs, float factor) {
  for (const Tensor& t : xs) {
    float* x = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) x[i] *= factor;
  }
}

}  // namespace dsv4::cpu
