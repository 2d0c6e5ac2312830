// mHC: manifold-constrained hyper-connections (reference §2.2, §2.7; HF DeepseekV4HyperConnection / HyperHead).
//
// The residual stream is X [T, n, D] (n = hc_mult streams per token). Around every sub-layer (attention, FFN):
//   pre  : xf = X[t] flattened to n*D; rstd = rsqrt(mean(xf^2) + norm_eps)       (no weight)
//          mixes = (xf @ fn^T) * rstd                                           [(2+n)n]
//          pre  = sigmoid(mixes[0:n]  * scale[0] + base[0:n])  + hc_eps          [n]
//          post = 2 * sigmoid(mixes[n:2n] * scale[1] + base[n:2n])              [n]
//          comb = Sinkhorn(mixes[2n:] * scale[2] + base[2n:])  viewed [n, n] row-major [j, k]
//          x    = sum_j pre[j] * X[t, j]                                         [D] -> the sub-layer input
//   post : Xnew[t, k] = post[k] * F[t] + sum_j comb[j, k] * X[t, j]             (comb applied transposed)
// Sinkhorn (the release order): P = softmax_rows(L) + eps; P /= colsum(P) + eps;
//   then (iters - 1) times { P /= rowsum(P) + eps; P /= colsum(P) + eps }.
// HyperHead (final collapse, §2.7): fn [n, n*D], base [n], scale [1]; pre = sigmoid(mixes * scale + base) + hc_eps,
//   h = sum_j pre[j] X[j].
//
// Backward is exact through the unrolled Sinkhorn iterations. Only the mixes [T, (2+n)n] and rstd [T] are saved
// in the forward context (plus a reference to X); backward recomputes pre/post/comb and every Sinkhorn iterate
// per token into a small scratch buffer (as the release's fused kernel does), so the saved state is
// ((2+n)n + 1) floats per token per sub-layer.
//
// The math lives in templated raw-pointer cores (float for the Tensor classes, double for finite-difference
// tests). All gradients of parameters accumulate (+=).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/config.h"
#include "model/param.h"
#include "runtime/cpu_blas.h"

namespace dsv4 {

// =====================================================================================================
// Sinkhorn on one n x n matrix (row-major, element [j, k] at j * n + k).
// =====================================================================================================

namespace mhc_detail {
// y = x / (sum along axis + eps); col == true normalises columns (sum over j), else rows (sum over k).
// Writes the denominators (n entries) to den when non-null. x and y may alias.
template <typename T>
inline void normalise(const T* x, T* y, T* den, int64_t n, bool col, double eps) {
  const T e = static_cast<T>(eps);
  for (int64_t a = 0; a < n; ++a) {
    T s = 0;
    for (int64_t b = 0; b < n; ++b) s += col ? x[b * n + a] : x[a * n + b];
    const T d = s + e;
    if (den) den[a] = d;
    for (int64_t b = 0; b < n; ++b) {
      const int64_t i = col ? b * n + a : a * n + b;
      y[i] = x[i] / d;
    }
  }
}

// Backward of normalise in place on g: g <- (g - sum_axis(g * y)) / den.
template <typename T>
inline void normalise_backward(T* g, const T* y, const T* den, int64_t n, bool col) {
  for (int64_t a = 0; a < n; ++a) {
    T dot = 0;
    for (int64_t b = 0; b < n; ++b) {
      const int64_t i = col ? b * n + a : a * n + b;
      dot += g[i] * y[i];
    }
    for (int64_t b = 0; b < n; ++b) {
      const int64_t i = col ? b * n + a : a * n + b;
      g[i] = (g[i] - dot) / den[a];
    }
  }
}

// Row softmax of L into s (max-subtracted: e = exp(l - max), s = e / sum e).
template <typename T>
inline void softmax_rows(const T* L, T* s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T* l = L + j * n;
    T m = l[0];
    for (int64_t k = 1; k < n; ++k) m = std::max(m, l[k]);
    T sum = 0;
    for (int64_t k = 0; k < n; ++k) {
      s[j * n + k] = std::exp(l[k] - m);
      sum += s[j * n + k];
    }
    for (int64_t k = 0; k < n; ++k) s[j * n + k] = s[j * n + k] / sum;
  }
}

template <typename T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

// ---- blocked vector helpers over the D (or n*D) axis. Fixed-size inner blocks with local accumulators let
// the compiler vectorise them at -O2 and keep partial results in registers.
inline constexpr int64_t kBlock = 16;

// out[i] = (accumulate ? out[i] : 0) + sum_c coef[c] * src[c][i], i < len.
template <typename T>
inline void lincomb(const T* coef, const T* const* src, int64_t nsrc, T* out, int64_t len, bool accumulate) {
  int64_t i0 = 0;
  for (; i0 + kBlock <= len; i0 += kBlock) {
    T acc[kBlock];
    for (int64_t b = 0; b < kBlock; ++b) acc[b] = accumulate ? out[i0 + b] : T(0);
    for (int64_t c = 0; c < nsrc; ++c) {
      const T w = coef[c];
      const T* x = src[c] + i0;
      for (int64_t b = 0; b < kBlock; ++b) acc[b] += w * x[b];
    }
    for (int64_t b = 0; b < kBlock; ++b) out[i0 + b] = acc[b];
  }
  for (int64_t i = i0; i < len; ++i) {
    T acc = accumulate ? out[i] : T(0);
    for (int64_t c = 0; c < nsrc; ++c) acc += coef[c] * src[c][i];
    out[i] = acc;
  }
}

// sum_i a[i] * b[i] (blocked partial sums).
template <typename T>
inline T dot(const T* a, const T* b, int64_t len) {
  T acc[kBlock] = {};
  int64_t i0 = 0;
  for (; i0 + kBlock <= len; i0 += kBlock)
    for (int64_t b2 = 0; b2 < kBlock; ++b2) acc[b2] += a[i0 + b2] * b[i0 + b2];
  T s = 0;
  for (int64_t b2 = 0; b2 < kBlock; ++b2) s += acc[b2];
  for (int64_t i = i0; i < len; ++i) s += a[i] * b[i];
  return s;
}

// sum_i x[i]^2 accumulated in double.
template <typename T>
inline double sum_squares(const T* x, int64_t len) {
  double acc[kBlock] = {};
  int64_t i0 = 0;
  for (; i0 + kBlock <= len; i0 += kBlock)
    for (int64_t b = 0; b < kBlock; ++b) acc[b] += static_cast<double>(x[i0 + b]) * static_cast<double>(x[i0 + b]);
  double s = 0;
  for (int64_t b = 0; b < kBlock; ++b) s += acc[b];
  for (int64_t i = i0; i < len; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return s;
}

// Number of normalisation steps: one column step, then (iters - 1) row/column pairs.
inline int64_t sinkhorn_steps(int64_t iters) { return 2 * iters - 1; }
// Step k normalises columns when k is even (0: first column step), rows when odd.
inline bool step_is_col(int64_t k) { return (k % 2) == 0; }
}  // namespace mhc_detail

// comb = Sinkhorn(logits). logits and out are n*n; they may alias. iters >= 1.
template <typename T>
void sinkhorn_forward(const T* logits, T* out, int64_t n, int64_t iters, double eps) {
  mhc_detail::softmax_rows(logits, out, n);
  const T e = static_cast<T>(eps);
  for (int64_t i = 0; i < n * n; ++i) out[i] = out[i] + e;
  for (int64_t k = 0; k < mhc_detail::sinkhorn_steps(iters); ++k)
    mhc_detail::normalise(out, out, static_cast<T*>(nullptr), n, mhc_detail::step_is_col(k), eps);
}

// Scratch elements of T that sinkhorn_backward needs.
inline int64_t sinkhorn_workspace_size(int64_t n, int64_t iters) {
  const int64_t steps = mhc_detail::sinkhorn_steps(iters);
  return 2 * n * n + steps * (n * n + n);
}

// dlogits = d Sinkhorn(logits)^T dout: recomputes every iterate from the logits (same arithmetic as the
// forward), then runs the steps backwards and finishes with the softmax backward. dlogits is overwritten and
// may alias dout. work holds sinkhorn_workspace_size(n, iters) elements.
template <typename T>
void sinkhorn_backward(const T* logits, const T* dout, T* dlogits, int64_t n, int64_t iters, double eps, T* work) {
  const int64_t nn = n * n, steps = mhc_detail::sinkhorn_steps(iters);
  T* s = work;                 // softmax output [nn]
  T* g = s + nn;               // running gradient [nn]
  T* ys = g + nn;              // output of each step [steps][nn]
  T* dens = ys + steps * nn;   // denominators of each step [steps][n]
  mhc_detail::softmax_rows(logits, s, n);
  const T e = static_cast<T>(eps);
  for (int64_t i = 0; i < nn; ++i) g[i] = s[i] + e;  // P0 (g is free until the backward starts)
  const T* prev = g;
  for (int64_t k = 0; k < steps; ++k) {
    mhc_detail::normalise(prev, ys + k * nn, dens + k * n, n, mhc_detail::step_is_col(k), eps);
    prev = ys + k * nn;
  }
  for (int64_t i = 0; i < nn; ++i) g[i] = dout[i];
  for (int64_t k = steps - 1; k >= 0; --k)
    mhc_detail::normalise_backward(g, ys + k * nn, dens + k * n, n, mhc_detail::step_is_col(k));
  // P0 = s + eps; s = softmax_rows(L): dL = s * (g - sum_row(g * s)).
  for (int64_t j = 0; j < n; ++j) {
    T dot = 0;
    for (int64_t k = 0; k < n; ++k) dot += g[j * n + k] * s[j * n + k];
    for (int64_t k = 0; k < n; ++k) dlogits[j * n + k] = s[j * n + k] * (g[j * n + k] - dot);
  }
}

// =====================================================================================================
// Per-token split of the mixes into pre / post / comb (hc_split_sinkhorn).
// =====================================================================================================

struct HcDims {
  int64_t n = 4;        // hc_mult
  int64_t dim = 0;      // D
  int64_t iters = 20;   // hc_sinkhorn_iters
  double hc_eps = 1e-6;
  double norm_eps = 1e-6;
  int64_t mix() const { return (2 + n) * n; }  // rows of fn
  int64_t width() const { return n * dim; }    // columns of fn
};

// Scratch elements of T for hc_split_forward / hc_split_backward.
inline int64_t hc_split_workspace_size(int64_t n, int64_t iters) {
  return n * n + sinkhorn_workspace_size(n, iters);
}

// One token: mixes [(2+n)n] -> pre [n], post [n], comb [n*n]. Any output may be null. work: n*n elements.
template <typename T>
void hc_split_forward(const T* mixes, const T* scale, const T* base, T* pre, T* post, T* comb, int64_t n,
                      int64_t iters, double eps, T* work) {
  for (int64_t j = 0; j < n; ++j) {
    if (pre) pre[j] = mhc_detail::sigmoid(mixes[j] * scale[0] + base[j]) + static_cast<T>(eps);
    if (post) post[j] = T(2) * mhc_detail::sigmoid(mixes[n + j] * scale[1] + base[n + j]);
  }
  if (comb) {
    for (int64_t i = 0; i < n * n; ++i) work[i] = mixes[2 * n + i] * scale[2] + base[2 * n + i];
    sinkhorn_forward(work, comb, n, iters, eps);
  }
}

// One token: gradients dpre [n], dpost [n], dcomb [n*n] (dpost / dcomb may be null = zero) -> dz [(2+n)n], the
// gradient w.r.t. the pre-activation z = mixes * scale[group] + base (= the base gradient of this token).
// work: hc_split_workspace_size(n, iters) elements.
template <typename T>
void hc_split_backward(const T* mixes, const T* scale, const T* base, const T* dpre, const T* dpost,
                       const T* dcomb, T* dz, int64_t n, int64_t iters, double eps, T* work) {
  for (int64_t j = 0; j < n; ++j) {
    const T sp = mhc_detail::sigmoid(mixes[j] * scale[0] + base[j]);
    dz[j] = dpre[j] * sp * (T(1) - sp);
    const T so = mhc_detail::sigmoid(mixes[n + j] * scale[1] + base[n + j]);
    dz[n + j] = dpost ? T(2) * dpost[j] * so * (T(1) - so) : T(0);
  }
  T* dc = dz + 2 * n;
  if (dcomb) {
    T* logits = work;
    for (int64_t i = 0; i < n * n; ++i) logits[i] = mixes[2 * n + i] * scale[2] + base[2 * n + i];
    sinkhorn_backward(logits, dcomb, dc, n, iters, eps, work + n * n);
  } else {
    std::fill(dc, dc + n * n, T(0));
  }
}

// =====================================================================================================
// The mixing projection: mixes = (X @ fn^T) * rstd over rows of width N = n * D.
// =====================================================================================================

// X [rows, N], fn [M, N] -> mixes [rows, M], rstd [rows].
template <typename T>
void hc_mix_forward_rows(const T* X, const T* fn, T* mixes, T* rstd, int64_t rows, int64_t M, int64_t N,
                         double norm_eps) {
  cpu_gemm(false, true, rows, M, N, T(1), X, N, fn, N, T(0), mixes, M);
  for (int64_t r = 0; r < rows; ++r) {
    const double ss = mhc_detail::sum_squares(X + r * N, N);
    const T rs = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(N) + norm_eps));
    rstd[r] = rs;
    for (int64_t m = 0; m < M; ++m) mixes[r * M + m] *= rs;
  }
}

// Backward of hc_mix_forward_rows, except the rstd term on X (which the callers fuse with their own dX terms):
// dmixes [rows, M] is consumed (overwritten with dmixes * rstd);
// dX [rows, N] = (accumulate ? dX : 0) + (dmixes * rstd) @ fn; dfn [M, N] += (dmixes * rstd)^T @ X when non-null;
// c [rows] = rstd^2 / N * <dmixes, mixes>: the caller still has to add -c_r * X_r to dX_r.
template <typename T>
void hc_mix_backward_rows(T* dmixes, const T* X, const T* fn, const T* mixes, const T* rstd, T* dX, T* dfn, T* c,
                          int64_t rows, int64_t M, int64_t N, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    T dot = 0;
    for (int64_t m = 0; m < M; ++m) dot += dmixes[r * M + m] * mixes[r * M + m];
    c[r] = dot * rstd[r] * rstd[r] / static_cast<T>(N);
    for (int64_t m = 0; m < M; ++m) dmixes[r * M + m] *= rstd[r];
  }
  if (dfn) cpu_gemm(true, false, M, N, rows, T(1), dmixes, M, X, N, T(1), dfn, N);
  cpu_gemm(false, false, rows, N, M, T(1), dmixes, M, fn, N, accumulate ? T(1) : T(0), dX, N);
}

// The collapse x = sum_j pre[j] X[j] and the end of its backward: dX[j] += pre[j] * dx - c * X[j].
template <typename T>
void hc_collapse_backward_rows(const T* dx, const T* X, const T* pre, const T* c, T* dX, int64_t rows, int64_t n,
                               int64_t D) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const T coef[2] = {pre[r * n + j], -c[r]};
      const T* src[2] = {dx + r * D, X + (r * n + j) * D};
      mhc_detail::lincomb(coef, src, 2, dX + (r * n + j) * D, D, true);
    }
}

// =====================================================================================================
// Row cores of the whole hc_pre / hc_post / hc_head.
// =====================================================================================================

// X [rows, n, D]; fn [(2+n)n, n*D]; scale [3]; base [(2+n)n] -> x_out [rows, D], post [rows, n],
// comb [rows, n, n], and the saved state mixes [rows, (2+n)n], rstd [rows].
template <typename T>
void hc_pre_forward_rows(const T* X, const T* fn, const T* scale, const T* base, T* x_out, T* post, T* comb,
                         T* mixes, T* rstd, int64_t rows, const HcDims& d) {
  const int64_t n = d.n, D = d.dim, M = d.mix();
  hc_mix_forward_rows(X, fn, mixes, rstd, rows, M, d.width(), d.norm_eps);
  std::vector<T> work(static_cast<size_t>(n * n)), pre(static_cast<size_t>(n));
  std::vector<const T*> src(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    hc_split_forward(mixes + r * M, scale, base, pre.data(), post + r * n, comb + r * n * n, n, d.iters, d.hc_eps,
                     work.data());
    for (int64_t j = 0; j < n; ++j) src[static_cast<size_t>(j)] = X + (r * n + j) * D;
    mhc_detail::lincomb(pre.data(), src.data(), n, x_out + r * D, D, false);
  }
}

// Backward of hc_pre_forward_rows given dx [rows, D], dpost [rows, n], dcomb [rows, n, n] (dpost / dcomb may be
// null = zero). dX [rows, n, D] is overwritten (or added to when accumulate). dfn, dscale, dbase accumulate (+=)
// when non-null.
template <typename T>
void hc_pre_backward_rows(const T* dx, const T* dpost, const T* dcomb, const T* X, const T* fn, const T* scale,
                          const T* base, const T* mixes, const T* rstd, T* dX, T* dfn, T* dscale, T* dbase,
                          int64_t rows, const HcDims& d, bool accumulate) {
  const int64_t n = d.n, D = d.dim, M = d.mix();
  std::vector<T> work(static_cast<size_t>(hc_split_workspace_size(n, d.iters)));
  std::vector<T> dmix(static_cast<size_t>(rows * M)), pre_all(static_cast<size_t>(rows * n)),
      c(static_cast<size_t>(rows));
  std::vector<T> dpre(static_cast<size_t>(n)), dz(static_cast<size_t>(M));
  std::vector<double> dbase_acc(static_cast<size_t>(M), 0.0), dscale_acc(3, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* mx = mixes + r * M;
    for (int64_t j = 0; j < n; ++j)
      dpre[static_cast<size_t>(j)] = mhc_detail::dot(dx + r * D, X + (r * n + j) * D, D);
    hc_split_forward(mx, scale, base, pre_all.data() + r * n, static_cast<T*>(nullptr), static_cast<T*>(nullptr), n,
                     d.iters, d.hc_eps, work.data());
    hc_split_backward(mx, scale, base, dpre.data(), dpost ? dpost + r * n : nullptr,
                      dcomb ? dcomb + r * n * n : nullptr, dz.data(), n, d.iters, d.hc_eps, work.data());
    T* dm = dmix.data() + r * M;
    for (int64_t m = 0; m < M; ++m) {
      const int grp = m < n ? 0 : (m < 2 * n ? 1 : 2);
      const T z = dz[static_cast<size_t>(m)];
      dm[m] = z * scale[grp];
      dbase_acc[static_cast<size_t>(m)] += static_cast<double>(z);
      dscale_acc[static_cast<size_t>(grp)] += static_cast<double>(z) * static_cast<double>(mx[m]);
    }
  }
  if (dbase)
    for (int64_t m = 0; m < M; ++m) dbase[m] += static_cast<T>(dbase_acc[static_cast<size_t>(m)]);
  if (dscale)
    for (int g = 0; g < 3; ++g) dscale[g] += static_cast<T>(dscale_acc[static_cast<size_t>(g)]);
  hc_mix_backward_rows(dmix.data(), X, fn, mixes, rstd, dX, dfn, c.data(), rows, M, d.width(), accumulate);
  hc_collapse_backward_rows(dx, X, pre_all.data(), c.data(), dX, rows, n, D);
}

// Xnew [rows, n, D]: Xnew[k] = post[k] * F + sum_j comb[j, k] * X[j].
template <typename T>
void hc_post_forward_rows(const T* F, const T* X, const T* post, const T* comb, T* Xnew, int64_t rows, int64_t n,
                          int64_t D) {
  std::vector<const T*> src(static_cast<size_t>(n + 1));
  std::vector<T> coef(static_cast<size_t>(n + 1));
  for (int64_t r = 0; r < rows; ++r) {
    src[0] = F + r * D;
    for (int64_t j = 0; j < n; ++j) src[static_cast<size_t>(j + 1)] = X + (r * n + j) * D;
    for (int64_t k = 0; k < n; ++k) {
      coef[0] = post[r * n + k];
      for (int64_t j = 0; j < n; ++j) coef[static_cast<size_t>(j + 1)] = comb[(r * n + j) * n + k];
      mhc_detail::lincomb(coef.data(), src.data(), n + 1, Xnew + (r * n + k) * D, D, false);
    }
  }
}

// Backward of hc_post_forward_rows: dF = sum_k post[k] dXnew[k]; dX[j] = sum_k comb[j, k] dXnew[k];
// dpost[k] = <dXnew[k], F>; dcomb[j, k] = <dXnew[k], X[j]>. All outputs overwritten.
template <typename T>
void hc_post_backward_rows(const T* dXnew, const T* F, const T* X, const T* post, const T* comb, T* dF, T* dX,
                           T* dpost, T* dcomb, int64_t rows, int64_t n, int64_t D) {
  std::vector<const T*> src(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const T* f = F + r * D;
    const T* g = dXnew + r * n * D;
    for (int64_t k = 0; k < n; ++k) src[static_cast<size_t>(k)] = g + k * D;
    mhc_detail::lincomb(post + r * n, src.data(), n, dF + r * D, D, false);
    for (int64_t j = 0; j < n; ++j)
      mhc_detail::lincomb(comb + (r * n + j) * n, src.data(), n, dX + (r * n + j) * D, D, false);
    for (int64_t k = 0; k < n; ++k) dpost[r * n + k] = mhc_detail::dot(g + k * D, f, D);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < n; ++k)
        dcomb[(r * n + j) * n + k] = mhc_detail::dot(g + k * D, X + (r * n + j) * D, D);
  }
}

// HyperHead: X [rows, n, D]; fn [n, n*D]; scale [1]; base [n] -> h [rows, D], saved mixes [rows, n], rstd [rows].
template <typename T>
void hc_head_forward_rows(const T* X, const T* fn, const T* scale, const T* base, T* h, T* mixes, T* rstd,
                          int64_t rows, const HcDims& d) {
  const int64_t n = d.n, D = d.dim;
  hc_mix_forward_rows(X, fn, mixes, rstd, rows, n, d.width(), d.norm_eps);
  std::vector<T> pre(static_cast<size_t>(n));
  std::vector<const T*> src(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      pre[static_cast<size_t>(j)] =
          mhc_detail::sigmoid(mixes[r * n + j] * scale[0] + base[j]) + static_cast<T>(d.hc_eps);
      src[static_cast<size_t>(j)] = X + (r * n + j) * D;
    }
    mhc_detail::lincomb(pre.data(), src.data(), n, h + r * D, D, false);
  }
}

// Backward of hc_head_forward_rows: dX overwritten (or added to when accumulate); dfn/dscale/dbase += when non-null.
template <typename T>
void hc_head_backward_rows(const T* dh, const T* X, const T* fn, const T* scale, const T* base, const T* mixes,
                           const T* rstd, T* dX, T* dfn, T* dscale, T* dbase, int64_t rows, const HcDims& d,
                           bool accumulate) {
  const int64_t n = d.n, D = d.dim;
  std::vector<T> dmix(static_cast<size_t>(rows * n)), pre_all(static_cast<size_t>(rows * n)),
      c(static_cast<size_t>(rows));
  std::vector<double> dbase_acc(static_cast<size_t>(n), 0.0);
  double dscale_acc = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      const T mx = mixes[r * n + j];
      const T s = mhc_detail::sigmoid(mx * scale[0] + base[j]);
      pre_all[static_cast<size_t>(r * n + j)] = s + static_cast<T>(d.hc_eps);
      const T z = mhc_detail::dot(dh + r * D, X + (r * n + j) * D, D) * s * (T(1) - s);
      dmix[static_cast<size_t>(r * n + j)] = z * scale[0];
      dbase_acc[static_cast<size_t>(j)] += static_cast<double>(z);
      dscale_acc += static_cast<double>(z) * static_cast<double>(mx);
    }
  }
  if (dbase)
    for (int64_t j = 0; j < n; ++j) dbase[j] += static_cast<T>(dbase_acc[static_cast<size_t>(j)]);
  if (dscale) dscale[0] += static_cast<T>(dscale_acc);
  hc_mix_backward_rows(dmix.data(), X, fn, mixes, rstd, dX, dfn, c.data(), rows, n, d.width(), accumulate);
  hc_collapse_backward_rows(dh, X, pre_all.data(), c.data(), dX, rows, n, D);
}

// =====================================================================================================
// Tensor modules (CPU, F32).
// =====================================================================================================

struct HcPreOut {
  Tensor x_TD;      // [T, D]    sub-layer input
  Tensor post_TN;   // [T, n]
  Tensor comb_TNN;  // [T, n, n] row-major [j, k]
};

struct HcPreCtx {
  Tensor X;      // [T, n, D] input (shared, not copied)
  Tensor mixes;  // [T, (2+n)n]  (xf @ fn^T) * rstd
  Tensor rstd;   // [T]
};

struct HcPostCtx {
  Tensor F;     // [T, D]
  Tensor X;     // [T, n, D]
  Tensor post;  // [T, n]
  Tensor comb;  // [T, n, n]
};

struct HcPostGrads {
  Tensor dF_TD;
  Tensor dX_TND;
  Tensor dpost_TN;
  Tensor dcomb_TNN;
};

// One hyper-connection (attention or FFN sub-layer). Params: prefix + "fn" [(2+n)n, n*D], prefix + "base"
// [(2+n)n], prefix + "scale" [3] (e.g. prefix "layers.3.hc_attn_"). Parameters start at zero (pre = 0.5 + eps,
// post = 1, comb = 1/n); the initialiser sets real values.
class HyperConnection {
 public:
  HyperConnection() = default;
  HyperConnection(std::string prefix, const ModelConfig& cfg);

  HcPreOut pre(const Tensor& X_TND, HcPreCtx* ctx) const;
  // Static in the math (uses no parameter); a member for symmetry with pre.
  Tensor post(const Tensor& F_TD, const Tensor& X_TND, const Tensor& post_TN, const Tensor& comb_TNN,
              HcPostCtx* ctx) const;
  HcPostGrads post_backward(const Tensor& dXnew_TND, const HcPostCtx& ctx) const;
  // dX [T, n, D] of the pre path; accumulates fn/base/scale gradients (for trainable params).
  // dpost_TN / dcomb_TNN may be undefined (zero).
  Tensor pre_backward(const Tensor& dx_TD, const Tensor& dpost_TN, const Tensor& dcomb_TNN, const HcPreCtx& ctx);
  // Same, adding the pre-path dX into dX_TND (e.g. the dX_TND of post_backward) instead of allocating.
  void pre_backward_accumulate(const Tensor& dx_TD, const Tensor& dpost_TN, const Tensor& dcomb_TNN,
                               const HcPreCtx& ctx, Tensor& dX_TND);
  void visit(const ParamVisitor& f) {
    f(fn);
    f(base);
    f(scale);
  }
  const HcDims& dims() const { return dims_; }

  Param fn;     // [(2+n)n, n*D]
  Param base;   // [(2+n)n]
  Param scale;  // [3]

 private:
  void pre_backward_impl(const Tensor& dx_TD, const Tensor& dpost_TN, const Tensor& dcomb_TNN, const HcPreCtx& ctx,
                         Tensor& dX_TND, bool accumulate);
  HcDims dims_;
};

struct HcHeadCtx {
  Tensor X;      // [T, n, D]
  Tensor mixes;  // [T, n]
  Tensor rstd;   // [T]
};

// Final collapse of the n streams: params prefix + "hc_head_fn" [n, n*D], "hc_head_base" [n], "hc_head_scale" [1]
// (prefix "" for the main model, "mtp.0." for the MTP block).
class HyperHead {
 public:
  HyperHead() = default;
  HyperHead(const std::string& prefix, const ModelConfig& cfg);

  Tensor forward(const Tensor& X_TND, HcHeadCtx* ctx) const;
  Tensor backward(const Tensor& dh_TD, const HcHeadCtx& ctx);
  void visit(const ParamVisitor& f) {
    f(fn);
    f(base);
    f(scale);
  }
  const HcDims& dims() const { return dims_; }

  Param fn;     // [n, n*D]
  Param base;   // [n]
  Param scale;  // [1]

 private:
  HcDims dims_;
};

}  // namespace dsv4
