// Raw-pointer cores of the model's memory-bound layers, shared by the model (src/model) and the runtime-level ops
// over Tensors (runtime/model_ops.h, whose CPU twins run exactly these loops). They are templates so tests can run
// them in double precision. Moved here from model/layers.h (RMSNorm), model/moe.h (router, clamped SwiGLU) and
// model/rope.h (rotation with an explicit frequency table), which include this header: the model code is unchanged.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "runtime/dtype.h"  // DSV4_HD

namespace dsv4 {

// ---- hashed dropout (LoRA's drop(), model/lora.h): a keep decision that is a pure function of (key, draw, index) ----
DSV4_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
// The stream of one forward's masks: draw d of the adapter with dropout key `key`.
DSV4_HD uint64_t dropout_stream(uint64_t key, uint64_t draw) {
  return splitmix64(key + 0x9E3779B97F4A7C15ull * (draw + 1));
}
// Keep element `index` of the stream: a 24-bit uniform u, kept when u * 2^-24 >= p.
DSV4_HD bool dropout_keep(uint64_t stream, uint64_t index, double p) {
  const uint64_t u = splitmix64(stream ^ (index * 0xD1B54A32D192ED03ull)) >> 40;
  return static_cast<double>(u) * 0x1p-24 >= p;
}

// ---- RMSNorm core: y = w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps), over rows of length dim ----------
// w may be null (unweighted). rstd_out[rows] receives the per-row rstd.
template <typename T>
void rmsnorm_forward_rows(const T* x, const T* w, T* y, T* rstd_out, int64_t rows, int64_t dim, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
    const T rstd = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    rstd_out[r] = rstd;
    T* yr = y + r * dim;
    for (int64_t i = 0; i < dim; ++i) yr[i] = w ? w[i] * (xr[i] * rstd) : xr[i] * rstd;
  }
}

// dx = rstd * (g - x * rstd^2 * mean(g * x)) with g = dy * w; dw += sum_rows dy * x * rstd (if dw).
template <typename T>
void rmsnorm_backward_rows(const T* dy, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows,
                           int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* dyr = dy + r * dim;
    const T* xr = x + r * dim;
    const T s = rstd[r];
    double dot = 0;
    for (int64_t i = 0; i < dim; ++i) dot += static_cast<double>(w ? dyr[i] * w[i] : dyr[i]) * static_cast<double>(xr[i]);
    const T c = static_cast<T>(dot / static_cast<double>(dim)) * s * s;
    T* dxr = dx + r * dim;
    for (int64_t i = 0; i < dim; ++i) {
      const T g = w ? dyr[i] * w[i] : dyr[i];
      dxr[i] = s * (g - xr[i] * c);
      if (dw) dw[i] += dyr[i] * xr[i] * s;
    }
  }
}

// ---- interleaved partial RoPE core: model/rope.h's rope_rows with the frequency table as a raw pointer ----------
// Rotates (or, with inverse, de-rotates) the last rot_dim channels of `rows` rows of length `dim` in place; row r
// sits at x + r * row_stride, has position pos[r] and pair i turns by float(pos[r]) * inv_freq[i] (rot_dim / 2
// entries). The inverse is also the backward of the rotation (and vice versa).
template <typename T>
void rope_rows_freq(T* x, int64_t rows, int64_t dim, int64_t row_stride, const int64_t* pos, const float* inv_freq,
                    int64_t rot_dim, bool inverse) {
  const int64_t half = rot_dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    T* v = x + r * row_stride + (dim - rot_dim);
    const float p = static_cast<float>(pos[r]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = p * inv_freq[i];
      const T c = static_cast<T>(std::cos(angle));
      const T s = inverse ? -static_cast<T>(std::sin(angle)) : static_cast<T>(std::sin(angle));
      const T a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = a * c - b * s;
      v[2 * i + 1] = b * c + a * s;
    }
  }
}

inline constexpr double kSoftplusThreshold = 20.0;  // torch.nn.functional.softplus default (beta = 1)
inline constexpr double kRouteNormEps = 1e-20;      // HF router denominator (see moe.cpp notes)

// ---- router cores ------------------------------------------------------------------------------------------

// aff = sqrt(softplus(s)) elementwise.
template <typename T>
void sqrt_softplus_rows(const T* s, T* aff, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T sp = s[i] > T(kSoftplusThreshold) ? s[i] : static_cast<T>(std::log1p(std::exp(s[i])));
    aff[i] = std::sqrt(sp);
  }
}

// ds = daff * d aff / ds (written, not accumulated), in torch's order: (daff / (2 aff)) * z / (z + 1), z = exp(s).
// Where softplus underflowed to 0 (s < about -104 in FP32) the derivative is taken as its limit 0 (torch: NaN).
template <typename T>
void sqrt_softplus_backward_rows(const T* s, const T* aff, const T* daff, T* ds, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (aff[i] == T(0)) {
      ds[i] = T(0);
      continue;
    }
    const T g = daff[i] / (T(2) * aff[i]);
    if (s[i] > T(kSoftplusThreshold)) {
      ds[i] = g;
    } else {
      const T z = std::exp(s[i]);
      ds[i] = g * z / (z + T(1));
    }
  }
}

// Routing weights of one token (CPU and CUDA): w_j = route_scale * a[it_j] / (sum_l a[it_l] + kRouteNormEps), the sum
// taken in j order.
template <typename T>
DSV4_HD void moe_route_weights_row(const T* a, const int64_t* it, int64_t K, double route_scale, T* w) {
  T sum = T(0);
  for (int64_t j = 0; j < K; ++j) sum += a[it[j]];
  const T denom = sum + static_cast<T>(kRouteNormEps);
  for (int64_t j = 0; j < K; ++j) {
    T q = a[it[j]] / denom;
    q *= static_cast<T>(route_scale);
    w[j] = q;
  }
}

// Routing for `rows` tokens from their affinities aff [rows, E]. fixed_idx [rows, K] (hash routing) or, when null,
// top-K of aff + bias (bias may be null). Writes idx [rows, K] and w [rows, K].
template <typename T>
void moe_route_rows(const T* aff, const T* bias, const int64_t* fixed_idx, int64_t rows, int64_t E, int64_t K,
                    double route_scale, int64_t* idx, T* w) {
  std::vector<int64_t> order(static_cast<size_t>(E));
  std::vector<T> sel(static_cast<size_t>(E));
  for (int64_t t = 0; t < rows; ++t) {
    const T* a = aff + t * E;
    int64_t* it = idx + t * K;
    if (fixed_idx) {
      std::copy(fixed_idx + t * K, fixed_idx + (t + 1) * K, it);
    } else {
      for (int64_t e = 0; e < E; ++e) sel[static_cast<size_t>(e)] = bias ? a[e] + bias[e] : a[e];
      // Same strict weak order as ops::topk: NaN first, then larger value, then lower index.
      auto before = [&](int64_t i, int64_t j) {
        const T vi = sel[static_cast<size_t>(i)], vj = sel[static_cast<size_t>(j)];
        const bool ni = std::isnan(vi), nj = std::isnan(vj);
        if (ni != nj) return ni;
        if (!ni && vi != vj) return vi > vj;
        return i < j;
      };
      std::iota(order.begin(), order.end(), int64_t{0});
      std::partial_sort(order.begin(), order.begin() + K, order.end(), before);
      std::copy(order.begin(), order.begin() + K, it);
    }
    moe_route_weights_row(a, it, K, route_scale, w + t * K);
  }
}

// Gradient of w w.r.t. aff (accumulated into daff [rows, E]) given dw [rows, K]:
//   q_j = a_j / (S + eps), w_j = rs q_j  =>  da_{idx_j} += (rs dw_j - sum_l rs dw_l q_l) / (S + eps).
// One token's row of moe_route_backward_rows (shared with the CUDA kernel).
template <typename T>
DSV4_HD void moe_route_backward_row(const T* a, const int64_t* it, const T* dw, int64_t K, double route_scale, T* daff) {
  T sum = T(0);
  for (int64_t j = 0; j < K; ++j) sum += a[it[j]];
  const T denom = sum + static_cast<T>(kRouteNormEps);
  double dot = 0;
  for (int64_t j = 0; j < K; ++j) dot += static_cast<double>(dw[j]) * route_scale * static_cast<double>(a[it[j]] / denom);
  for (int64_t j = 0; j < K; ++j) {
    const double gq = static_cast<double>(dw[j]) * route_scale;
    daff[it[j]] += static_cast<T>((gq - dot) / static_cast<double>(denom));
  }
}

template <typename T>
void moe_route_backward_rows(const T* aff, const int64_t* idx, const T* dw, int64_t rows, int64_t E, int64_t K,
                             double route_scale, T* daff) {
  for (int64_t t = 0; t < rows; ++t) moe_route_backward_row(aff + t * E, idx + t * K, dw + t * K, K, route_scale, daff + t * E);
}

// ---- clamped SwiGLU core ---------------------------------------------------------------------------------------
// h[r, i] = w[r] * (silu(min(g, L)) * clamp(u, -L, L)) over rows of width I; w may be null (shared expert),
// limit <= 0 disables the clamp. silu(x) = x / (1 + exp(-x)) as torch computes it. ld_gu: the row stride of g and u
// (0: I; the fused [rows, 2I] GEMM output of w1 | w3 gives 2I), h is contiguous.
template <typename T>
void swiglu_clamp_rows(const T* g, const T* u, const T* w, T* h, int64_t rows, int64_t I, double limit,
                       int64_t ld_gu = 0) {
  const bool clamp = limit > 0;
  const T L = static_cast<T>(limit);
  const int64_t ld = ld_gu > 0 ? ld_gu : I;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < I; ++i) {
      T gv = g[r * ld + i], uv = u[r * ld + i];
      if (clamp) {
        uv = std::min(std::max(uv, -L), L);
        gv = std::min(gv, L);
      }
      T v = gv / (T(1) + std::exp(-gv)) * uv;
      if (w) v = w[r] * v;
      h[r * I + i] = v;
    }
  }
}

// Backward of swiglu_clamp_rows given dh (the gradient of h = w * silu(gc) * uc; contiguous): writes dg, du and, when
// w is non-null, dw[r] = sum_i dh * silu(gc) * uc (written, not accumulated). ld_gu: row stride of g and u, ld_dgu of
// dg and du (0: I).
template <typename T>
void swiglu_clamp_backward_rows(const T* g, const T* u, const T* w, const T* dh, T* dg, T* du, T* dw, int64_t rows,
                                int64_t I, double limit, int64_t ld_gu = 0, int64_t ld_dgu = 0) {
  const bool clamp = limit > 0;
  const T L = static_cast<T>(limit);
  const int64_t ld = ld_gu > 0 ? ld_gu : I, ldd = ld_dgu > 0 ? ld_dgu : I;
  for (int64_t r = 0; r < rows; ++r) {
    double dwr = 0;
    const T wr = w ? w[r] : T(1);
    for (int64_t i = 0; i < I; ++i) {
      const T g0 = g[r * ld + i], u0 = u[r * ld + i];
      T gv = g0, uv = u0;
      bool g_pass = true, u_pass = true;
      if (clamp) {
        g_pass = g0 <= L;
        u_pass = u0 >= -L && u0 <= L;
        uv = std::min(std::max(u0, -L), L);
        gv = std::min(g0, L);
      }
      const T sig = T(1) / (T(1) + std::exp(-gv));
      const T silu = gv * sig;
      const T d = dh[r * I + i];
      if (w) dwr += static_cast<double>(d) * static_cast<double>(silu * uv);
      const T dv = wr * d;  // gradient of silu(gc) * uc
      dg[r * ldd + i] = g_pass ? dv * uv * (sig * (T(1) + gv * (T(1) - sig))) : T(0);
      du[r * ldd + i] = u_pass ? dv * silu : T(0);
    }
    if (w) dw[r] = static_cast<T>(dwr);
  }
}

}  // namespace dsv4
