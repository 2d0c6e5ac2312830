// mHC (hyper-connections): Sinkhorn forward against hand-computed steps and the doubly stochastic limit; every
// backward core against double-precision finite differences; the Tensor modules against the double cores, an
// independent naive oracle (the HF formulation: normalise first, then project) and F32 finite differences.
#include <gtest/gtest.h>

#include "fd_check.h"
#include "model/mhc.h"

namespace dsv4 {
namespace {

using testing::dot;
using testing::random_tensor;

std::vector<double> random_vec(size_t n, std::mt19937& rng, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

double vdot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

std::vector<double> to_double(const Tensor& t) {
  const auto f = t.to_floats();
  return {f.begin(), f.end()};
}

Tensor to_tensor(const Shape& shape, const std::vector<double>& v) {
  return Tensor::from_floats(shape, std::vector<float>(v.begin(), v.end()));
}

ModelConfig small_cfg(int64_t n, int64_t dim, int64_t iters = 20, double hc_eps = 1e-6, double norm_eps = 1e-6) {
  ModelConfig c;
  c.hc_mult = n;
  c.dim = dim;
  c.hc_sinkhorn_iters = iters;
  c.hc_eps = hc_eps;
  c.norm_eps = norm_eps;
  return c;
}

HcDims dims(int64_t n, int64_t dim, int64_t iters = 20, double hc_eps = 1e-6, double norm_eps = 1e-6) {
  HcDims d;
  d.n = n;
  d.dim = dim;
  d.iters = iters;
  d.hc_eps = hc_eps;
  d.norm_eps = norm_eps;
  return d;
}

// Non-trivial parameters: mixes of order 1-3 so pre / post / comb are far from 0.5 / 1 / 1/n.
struct HcParamsD {
  std::vector<double> fn, base, scale;
};
HcParamsD random_params(int64_t M, int64_t N, int64_t n_scale, std::mt19937& rng) {
  HcParamsD p;
  const double a = 2.0 / std::sqrt(static_cast<double>(N));
  p.fn = random_vec(static_cast<size_t>(M * N), rng, -a, a);
  p.base = random_vec(static_cast<size_t>(M), rng, -1.5, 1.5);
  p.scale = random_vec(static_cast<size_t>(n_scale), rng, 0.6, 1.8);
  return p;
}

// ---------------------------------------------------------------------------------------------------------
// Sinkhorn
// ---------------------------------------------------------------------------------------------------------

TEST(Sinkhorn, HandComputedFirstSteps) {
  // logits [[0, ln 3], [ln 2, 0]]: row softmax = [[1/4, 3/4], [2/3, 1/3]]. eps = 0.01 so it is visible.
  const double eps = 0.01;
  const double L[4] = {0.0, std::log(3.0), std::log(2.0), 0.0};
  const double P0[4] = {0.25 + eps, 0.75 + eps, 2.0 / 3 + eps, 1.0 / 3 + eps};
  // iters = 1: softmax + eps, one column normalisation.
  const double c0 = P0[0] + P0[2] + eps, c1 = P0[1] + P0[3] + eps;
  const double P1[4] = {P0[0] / c0, P0[1] / c1, P0[2] / c0, P0[3] / c1};
  double out[4];
  sinkhorn_forward<double>(L, out, 2, 1, eps);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(out[i], P1[i], 1e-15) << i;
  // Numerically: c0 = 0.25 + 0.6667 + 0.03 = 0.946667, P1[0] = 0.26 / 0.946667 = 0.274648.
  EXPECT_NEAR(out[0], 0.26 / (0.25 + 2.0 / 3 + 0.03), 1e-15);
  EXPECT_NEAR(out[0], 0.2746478873, 1e-9);
  // iters = 2: then rows, then columns.
  const double r0 = P1[0] + P1[1] + eps, r1 = P1[2] + P1[3] + eps;
  const double P2[4] = {P1[0] / r0, P1[1] / r0, P1[2] / r1, P1[3] / r1};
  const double k0 = P2[0] + P2[2] + eps, k1 = P2[1] + P2[3] + eps;
  const double P3[4] = {P2[0] / k0, P2[1] / k1, P2[2] / k0, P2[3] / k1};
  sinkhorn_forward<double>(L, out, 2, 2, eps);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(out[i], P3[i], 1e-15) << i;
  // The float instantiation agrees.
  const float Lf[4] = {0.0f, std::log(3.0f), std::log(2.0f), 0.0f};
  float outf[4];
  sinkhorn_forward<float>(Lf, outf, 2, 2, eps);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(outf[i], P3[i], 1e-6) << i;
}

TEST(Sinkhorn, NearDoublyStochasticAfter20Iterations) {
  // Column sums are s / (s + eps) after the final column step; rows converge geometrically (slower for
  // spread-out logits), so the row tolerance depends on the logit range.
  std::mt19937 rng(11);
  struct Regime {
    double range, row_tol;
    int64_t iters;
  };
  for (const Regime reg : {Regime{1.0, 1e-5, 20}, Regime{3.0, 1e-2, 20}, Regime{3.0, 1e-5, 200}}) {
    double worst_row = 0;
    for (int64_t n : {2, 4, 6}) {
      for (int trial = 0; trial < 20; ++trial) {
        const auto L = random_vec(static_cast<size_t>(n * n), rng, -reg.range, reg.range);
        std::vector<double> P(L.size());
        sinkhorn_forward<double>(L.data(), P.data(), n, reg.iters, 1e-6);
        std::vector<float> Lf(L.begin(), L.end()), Pf(L.size());
        sinkhorn_forward<float>(Lf.data(), Pf.data(), n, reg.iters, 1e-6);
        for (int64_t a = 0; a < n; ++a) {
          double rs = 0, cs = 0;
          for (int64_t b = 0; b < n; ++b) {
            rs += P[a * n + b];
            cs += P[b * n + a];
            EXPECT_GT(P[a * n + b], 0.0);
            EXPECT_NEAR(Pf[a * n + b], P[a * n + b], 5e-6);
          }
          EXPECT_NEAR(cs, 1.0, 1e-5) << "column " << a;
          worst_row = std::max(worst_row, std::abs(rs - 1.0));
        }
      }
    }
    EXPECT_LT(worst_row, reg.row_tol) << "logits in +-" << reg.range << ", " << reg.iters << " iterations";
  }
  // Not symmetric for n = 3: a doubly stochastic result that still carries the asymmetry of its input.
  const double L[9] = {2.0, -1.0, 0.5, 0.0, 1.0, -2.0, -1.0, 0.3, 0.8};
  double P[9];
  sinkhorn_forward<double>(L, P, 3, 20, 1e-6);
  EXPECT_GT(std::abs(P[1] - P[3]) + std::abs(P[2] - P[6]) + std::abs(P[5] - P[7]), 0.1);
}

TEST(Sinkhorn, BackwardMatchesFiniteDifferences) {
  std::mt19937 rng(12);
  struct Case {
    int64_t n, iters;
    double eps;
  };
  for (const Case c : {Case{4, 20, 1e-6}, Case{4, 1, 1e-6}, Case{3, 2, 1e-2}, Case{4, 7, 1e-3}, Case{5, 20, 1e-6}}) {
    const size_t nn = static_cast<size_t>(c.n * c.n);
    auto L = random_vec(nn, rng, -2.5, 2.5);
    const auto G = random_vec(nn, rng, -1, 1);
    auto loss = [&] {
      std::vector<double> P(nn);
      sinkhorn_forward<double>(L.data(), P.data(), c.n, c.iters, c.eps);
      return vdot(P, G);
    };
    std::vector<double> dL(nn), work(static_cast<size_t>(sinkhorn_workspace_size(c.n, c.iters)));
    sinkhorn_backward<double>(L.data(), G.data(), dL.data(), c.n, c.iters, c.eps, work.data());
    testing::fd_check_double("sinkhorn n=" + std::to_string(c.n) + " iters=" + std::to_string(c.iters), L, dL, loss,
                             1e-5, 1e-8);
    // Softmax invariance: adding a constant to a row leaves the output unchanged, so row sums of dL vanish.
    for (int64_t j = 0; j < c.n; ++j) {
      double s = 0;
      for (int64_t k = 0; k < c.n; ++k) s += dL[static_cast<size_t>(j * c.n + k)];
      EXPECT_NEAR(s, 0.0, 1e-12);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Double-precision cores
// ---------------------------------------------------------------------------------------------------------

// Naive oracle in the HF formulation: f = X * rsqrt(mean X^2 + eps) first, then z = f @ fn^T, then the split.
void naive_pre(const std::vector<double>& X, const HcParamsD& p, const HcDims& d, int64_t rows,
               std::vector<double>& x, std::vector<double>& post, std::vector<double>& comb) {
  const int64_t n = d.n, D = d.dim, N = d.width(), M = d.mix();
  x.assign(static_cast<size_t>(rows * D), 0.0);
  post.assign(static_cast<size_t>(rows * n), 0.0);
  comb.assign(static_cast<size_t>(rows * n * n), 0.0);
  auto sig = [](double z) { return 1.0 / (1.0 + std::exp(-z)); };
  for (int64_t r = 0; r < rows; ++r) {
    const double* xr = X.data() + r * N;
    double ss = 0;
    for (int64_t i = 0; i < N; ++i) ss += xr[i] * xr[i];
    const double rs = 1.0 / std::sqrt(ss / N + d.norm_eps);
    std::vector<double> z(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) {
      double s = 0;
      for (int64_t i = 0; i < N; ++i) s += (xr[i] * rs) * p.fn[static_cast<size_t>(m * N + i)];
      z[static_cast<size_t>(m)] = s;
    }
    std::vector<double> pre(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      pre[j] = sig(z[j] * p.scale[0] + p.base[j]) + d.hc_eps;
      post[r * n + j] = 2 * sig(z[n + j] * p.scale[1] + p.base[n + j]);
    }
    // comb: softmax over k, + eps, column normalise, (iters - 1) x (row, column).
    std::vector<double> C(static_cast<size_t>(n * n));
    for (int64_t j = 0; j < n; ++j) {
      double mx = -1e300, s = 0;
      for (int64_t k = 0; k < n; ++k) mx = std::max(mx, z[2 * n + j * n + k] * p.scale[2] + p.base[2 * n + j * n + k]);
      for (int64_t k = 0; k < n; ++k)
        s += C[j * n + k] = std::exp(z[2 * n + j * n + k] * p.scale[2] + p.base[2 * n + j * n + k] - mx);
      for (int64_t k = 0; k < n; ++k) C[j * n + k] = C[j * n + k] / s + d.hc_eps;
    }
    auto colnorm = [&] {
      for (int64_t k = 0; k < n; ++k) {
        double s = 0;
        for (int64_t j = 0; j < n; ++j) s += C[j * n + k];
        for (int64_t j = 0; j < n; ++j) C[j * n + k] /= s + d.hc_eps;
      }
    };
    auto rownorm = [&] {
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t k = 0; k < n; ++k) s += C[j * n + k];
        for (int64_t k = 0; k < n; ++k) C[j * n + k] /= s + d.hc_eps;
      }
    };
    colnorm();
    for (int64_t it = 1; it < d.iters; ++it) {
      rownorm();
      colnorm();
    }
    for (int64_t i = 0; i < n * n; ++i) comb[r * n * n + i] = C[i];
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < D; ++i) x[r * D + i] += pre[j] * xr[j * D + i];
  }
}

TEST(MhcCore, PreForwardMatchesNaiveOracle) {
  std::mt19937 rng(21);
  const HcDims d = dims(4, 7, 20);
  const int64_t rows = 5;
  const auto X = random_vec(static_cast<size_t>(rows * d.width()), rng, -2, 2);
  const auto p = random_params(d.mix(), d.width(), 3, rng);
  std::vector<double> x(rows * d.dim), post(rows * d.n), comb(rows * d.n * d.n), mixes(rows * d.mix()), rstd(rows);
  hc_pre_forward_rows<double>(X.data(), p.fn.data(), p.scale.data(), p.base.data(), x.data(), post.data(),
                              comb.data(), mixes.data(), rstd.data(), rows, d);
  std::vector<double> x2, post2, comb2;
  naive_pre(X, p, d, rows, x2, post2, comb2);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], x2[i], 1e-12);
  for (size_t i = 0; i < post.size(); ++i) EXPECT_NEAR(post[i], post2[i], 1e-12);
  for (size_t i = 0; i < comb.size(); ++i) EXPECT_NEAR(comb[i], comb2[i], 1e-12);
  // Far from the trivial values: post spans (0, 2), comb is not near 1/n.
  double post_dev = 0, comb_dev = 0;
  for (double v : post) post_dev = std::max(post_dev, std::abs(v - 1.0));
  for (double v : comb) comb_dev = std::max(comb_dev, std::abs(v - 0.25));
  EXPECT_GT(post_dev, 0.4);
  EXPECT_GT(comb_dev, 0.2);
}

// Loss = <x, gx> + <post, gp> + <comb, gc> of the full pre; FD w.r.t. X, fn, base, scale.
void check_pre_backward(const HcDims& d, int64_t rows, uint32_t seed, bool with_post_comb) {
  std::mt19937 rng(seed);
  auto X = random_vec(static_cast<size_t>(rows * d.width()), rng, -2, 2);
  auto p = random_params(d.mix(), d.width(), 3, rng);
  const auto gx = random_vec(static_cast<size_t>(rows * d.dim), rng, -1, 1);
  const auto gp = random_vec(static_cast<size_t>(rows * d.n), rng, -1, 1);
  const auto gc = random_vec(static_cast<size_t>(rows * d.n * d.n), rng, -1, 1);
  auto forward = [&](std::vector<double>& x, std::vector<double>& post, std::vector<double>& comb,
                     std::vector<double>& mixes, std::vector<double>& rstd) {
    x.resize(rows * d.dim);
    post.resize(rows * d.n);
    comb.resize(rows * d.n * d.n);
    mixes.resize(rows * d.mix());
    rstd.resize(rows);
    hc_pre_forward_rows<double>(X.data(), p.fn.data(), p.scale.data(), p.base.data(), x.data(), post.data(),
                                comb.data(), mixes.data(), rstd.data(), rows, d);
  };
  auto loss = [&] {
    std::vector<double> x, post, comb, mixes, rstd;
    forward(x, post, comb, mixes, rstd);
    return vdot(x, gx) + (with_post_comb ? vdot(post, gp) + vdot(comb, gc) : 0.0);
  };
  std::vector<double> x, post, comb, mixes, rstd;
  forward(x, post, comb, mixes, rstd);
  std::vector<double> dX(X.size(), 0.0), dfn(p.fn.size(), 0.0), dbase(p.base.size(), 0.0), dscale(3, 0.0);
  hc_pre_backward_rows<double>(gx.data(), with_post_comb ? gp.data() : nullptr,
                               with_post_comb ? gc.data() : nullptr, X.data(), p.fn.data(), p.scale.data(),
                               p.base.data(), mixes.data(), rstd.data(), dX.data(), dfn.data(), dscale.data(),
                               dbase.data(), rows, d, false);
  const std::string tag = " n=" + std::to_string(d.n) + " D=" + std::to_string(d.dim) + " iters=" +
                          std::to_string(d.iters) + (with_post_comb ? "" : " (x only)");
  testing::fd_check_double("hc_pre dX" + tag, X, dX, loss, 1e-5, 1e-7);
  testing::fd_check_double("hc_pre dfn" + tag, p.fn, dfn, loss, 1e-5, 1e-7);
  testing::fd_check_double("hc_pre dbase" + tag, p.base, dbase, loss, 1e-5, 1e-7);
  testing::fd_check_double("hc_pre dscale" + tag, p.scale, dscale, loss, 1e-5, 1e-7);
  // Accumulation: a second call with accumulate adds the same dX and doubles the parameter gradients.
  std::vector<double> dX2 = dX, dfn2 = dfn, dbase2 = dbase, dscale2 = dscale;
  hc_pre_backward_rows<double>(gx.data(), with_post_comb ? gp.data() : nullptr,
                               with_post_comb ? gc.data() : nullptr, X.data(), p.fn.data(), p.scale.data(),
                               p.base.data(), mixes.data(), rstd.data(), dX2.data(), dfn2.data(), dscale2.data(),
                               dbase2.data(), rows, d, true);
  for (size_t i = 0; i < dX.size(); ++i) EXPECT_NEAR(dX2[i], 2 * dX[i], 1e-12);
  for (size_t i = 0; i < dfn.size(); ++i) EXPECT_NEAR(dfn2[i], 2 * dfn[i], 1e-12);
  for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(dscale2[i], 2 * dscale[i], 1e-12);
}

TEST(MhcCore, PreBackwardMatchesFiniteDifferences) {
  check_pre_backward(dims(4, 5, 20), 3, 31, true);
  check_pre_backward(dims(4, 5, 20), 2, 32, false);
  check_pre_backward(dims(4, 3, 7, 1e-3, 1e-5), 3, 33, true);  // the tiny_b-like eps / iters
  check_pre_backward(dims(2, 6, 3, 1e-2), 2, 34, true);
  check_pre_backward(dims(3, 4, 1), 2, 35, true);
}

TEST(MhcCore, PostBackwardMatchesFiniteDifferences) {
  std::mt19937 rng(41);
  const int64_t n = 4, D = 6, rows = 3;
  auto F = random_vec(rows * D, rng, -1, 1);
  auto X = random_vec(rows * n * D, rng, -1, 1);
  auto post = random_vec(rows * n, rng, 0, 2);
  auto comb = random_vec(rows * n * n, rng, 0, 1);
  const auto G = random_vec(rows * n * D, rng, -1, 1);
  auto loss = [&] {
    std::vector<double> Y(rows * n * D);
    hc_post_forward_rows<double>(F.data(), X.data(), post.data(), comb.data(), Y.data(), rows, n, D);
    return vdot(Y, G);
  };
  std::vector<double> dF(F.size()), dX(X.size()), dpost(post.size()), dcomb(comb.size());
  hc_post_backward_rows<double>(G.data(), F.data(), X.data(), post.data(), comb.data(), dF.data(), dX.data(),
                                dpost.data(), dcomb.data(), rows, n, D);
  testing::fd_check_double("hc_post dF", F, dF, loss, 1e-5, 1e-8);
  testing::fd_check_double("hc_post dX", X, dX, loss, 1e-5, 1e-8);
  testing::fd_check_double("hc_post dpost", post, dpost, loss, 1e-5, 1e-8);
  testing::fd_check_double("hc_post dcomb", comb, dcomb, loss, 1e-5, 1e-8);
}

TEST(MhcCore, PostForwardAppliesCombTransposed) {
  std::mt19937 rng(42);
  const int64_t n = 3, D = 2;
  const auto F = random_vec(D, rng, -1, 1);
  const auto X = random_vec(n * D, rng, -1, 1);
  const auto post = random_vec(n, rng, 0, 2);
  const auto comb = random_vec(n * n, rng, 0, 1);
  std::vector<double> Y(n * D);
  hc_post_forward_rows<double>(F.data(), X.data(), post.data(), comb.data(), Y.data(), 1, n, D);
  // Xnew[1] = post[1] F + comb[0,1] X[0] + comb[1,1] X[1] + comb[2,1] X[2]   (the first index is summed).
  for (int i = 0; i < D; ++i) {
    const double e = post[1] * F[i] + comb[0 * 3 + 1] * X[0 * D + i] + comb[1 * 3 + 1] * X[1 * D + i] +
                     comb[2 * 3 + 1] * X[2 * D + i];
    EXPECT_NEAR(Y[1 * D + i], e, 1e-14);
  }
}

TEST(MhcCore, HyperHeadBackwardMatchesFiniteDifferences) {
  for (uint32_t seed : {51u, 52u}) {
    std::mt19937 rng(seed);
    const HcDims d = seed == 51 ? dims(4, 5) : dims(3, 4, 20, 1e-3, 1e-5);
    const int64_t rows = 3;
    auto X = random_vec(rows * d.width(), rng, -2, 2);
    auto p = random_params(d.n, d.width(), 1, rng);
    const auto G = random_vec(rows * d.dim, rng, -1, 1);
    auto loss = [&] {
      std::vector<double> h(rows * d.dim), mixes(rows * d.n), rstd(rows);
      hc_head_forward_rows<double>(X.data(), p.fn.data(), p.scale.data(), p.base.data(), h.data(), mixes.data(),
                                   rstd.data(), rows, d);
      return vdot(h, G);
    };
    std::vector<double> h(rows * d.dim), mixes(rows * d.n), rstd(rows);
    hc_head_forward_rows<double>(X.data(), p.fn.data(), p.scale.data(), p.base.data(), h.data(), mixes.data(),
                                 rstd.data(), rows, d);
    // Forward against the formula for token 0.
    {
      double ss = 0;
      for (int64_t i = 0; i < d.width(); ++i) ss += X[i] * X[i];
      const double rs = 1.0 / std::sqrt(ss / d.width() + d.norm_eps);
      for (int64_t i = 0; i < d.dim; ++i) {
        double e = 0;
        for (int64_t j = 0; j < d.n; ++j) {
          double z = 0;
          for (int64_t c = 0; c < d.width(); ++c) z += X[c] * p.fn[j * d.width() + c];
          const double pre = 1.0 / (1.0 + std::exp(-(z * rs * p.scale[0] + p.base[j]))) + d.hc_eps;
          e += pre * X[j * d.dim + i];
        }
        EXPECT_NEAR(h[i], e, 1e-12);
      }
    }
    std::vector<double> dX(X.size()), dfn(p.fn.size(), 0.0), dbase(d.n, 0.0), dscale(1, 0.0);
    hc_head_backward_rows<double>(G.data(), X.data(), p.fn.data(), p.scale.data(), p.base.data(), mixes.data(),
                                  rstd.data(), dX.data(), dfn.data(), dscale.data(), dbase.data(), rows, d, false);
    testing::fd_check_double("hc_head dX", X, dX, loss, 1e-5, 1e-8);
    testing::fd_check_double("hc_head dfn", p.fn, dfn, loss, 1e-5, 1e-8);
    testing::fd_check_double("hc_head dbase", p.base, dbase, loss, 1e-5, 1e-8);
    testing::fd_check_double("hc_head dscale", p.scale, dscale, loss, 1e-5, 1e-8);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor modules (F32)
// ---------------------------------------------------------------------------------------------------------

void set_params(HyperConnection& hc, std::mt19937& rng) {
  const auto p = random_params(hc.dims().mix(), hc.dims().width(), 3, rng);
  hc.fn.value = to_tensor(hc.fn.value.shape(), p.fn);
  hc.base.value = to_tensor(hc.base.value.shape(), p.base);
  hc.scale.value = to_tensor(hc.scale.value.shape(), p.scale);
}

TEST(HyperConnection, ParamNamesAndShapes) {
  const ModelConfig c = small_cfg(4, 16);
  HyperConnection hc("layers.3.hc_attn_", c);
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  hc.visit([&](Param& p) {
    names.push_back(p.name);
    shapes.push_back(p.value.shape());
  });
  ASSERT_EQ(names.size(), 3u);
  EXPECT_EQ(names[0], "layers.3.hc_attn_fn");
  EXPECT_EQ(names[1], "layers.3.hc_attn_base");
  EXPECT_EQ(names[2], "layers.3.hc_attn_scale");
  EXPECT_EQ(shapes[0], (Shape{24, 64}));
  EXPECT_EQ(shapes[1], (Shape{24}));
  EXPECT_EQ(shapes[2], (Shape{3}));
  HyperConnection mtp("mtp.0.hc_ffn_", c);
  EXPECT_EQ(mtp.fn.name, "mtp.0.hc_ffn_fn");
  HyperHead head("", c), mhead("mtp.0.", c);
  names.clear();
  head.visit([&](Param& p) { names.push_back(p.name); });
  EXPECT_EQ(names, (std::vector<std::string>{"hc_head_fn", "hc_head_base", "hc_head_scale"}));
  EXPECT_EQ(head.fn.value.shape(), (Shape{4, 64}));
  EXPECT_EQ(head.base.value.shape(), (Shape{4}));
  EXPECT_EQ(head.scale.value.shape(), (Shape{1}));
  EXPECT_EQ(mhead.scale.name, "mtp.0.hc_head_scale");
  // Zero parameters: pre = 0.5 + eps, post = 1, comb = 1/n.
  std::mt19937 rng(1);
  const Tensor X = random_tensor({2, 4, 16}, rng);
  const HcPreOut o = hc.pre(X, nullptr);
  for (float v : o.post_TN.to_floats()) EXPECT_NEAR(v, 1.0f, 1e-6);
  for (float v : o.comb_TNN.to_floats()) EXPECT_NEAR(v, 0.25f, 1e-5);
  const auto xv = X.to_floats(), yv = o.x_TD.to_floats();
  for (int i = 0; i < 16; ++i)
    EXPECT_NEAR(yv[i], (0.5 + 1e-6) * (xv[i] + xv[16 + i] + xv[32 + i] + xv[48 + i]), 1e-5);
}

TEST(HyperConnection, TensorForwardMatchesDoubleCore) {
  std::mt19937 rng(61);
  const ModelConfig c = small_cfg(4, 32);
  HyperConnection hc("layers.0.hc_attn_", c);
  set_params(hc, rng);
  const int64_t T = 6;
  const Tensor X = random_tensor({T, 4, 32}, rng, 2.0f);
  const HcPreOut o = hc.pre(X, nullptr);
  const HcDims d = hc.dims();
  const auto Xd = to_double(X), fn = to_double(hc.fn.value), sc = to_double(hc.scale.value),
             bs = to_double(hc.base.value);
  std::vector<double> x(T * d.dim), post(T * d.n), comb(T * d.n * d.n), mixes(T * d.mix()), rstd(T);
  hc_pre_forward_rows<double>(Xd.data(), fn.data(), sc.data(), bs.data(), x.data(), post.data(), comb.data(),
                              mixes.data(), rstd.data(), T, d);
  const auto xf = o.x_TD.to_floats(), pf = o.post_TN.to_floats(), cf = o.comb_TNN.to_floats();
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(xf[i], x[i], 2e-5 * (1 + std::abs(x[i])));
  for (size_t i = 0; i < post.size(); ++i) EXPECT_NEAR(pf[i], post[i], 2e-6);
  for (size_t i = 0; i < comb.size(); ++i) EXPECT_NEAR(cf[i], comb[i], 2e-6);
}

TEST(HyperConnection, TensorBackwardFiniteDifferencesF32) {
  std::mt19937 rng(71);
  const ModelConfig c = small_cfg(4, 8);
  HyperConnection hc("layers.1.hc_ffn_", c);
  set_params(hc, rng);
  const int64_t T = 3;
  Tensor X = random_tensor({T, 4, 8}, rng, 1.5f);
  Tensor F = random_tensor({T, 8}, rng);
  const Tensor gx = random_tensor({T, 8}, rng);
  const Tensor gp = random_tensor({T, 4}, rng);
  const Tensor gc = random_tensor({T, 4, 4}, rng);
  const Tensor gY = random_tensor({T, 4, 8}, rng);
  // Loss over the whole sub-layer wrapper: L = <x, gx> + <post, gp> + <comb, gc> + <Xnew, gY> with
  // Xnew = hc_post(F, X, post, comb) (F independent of x here).
  auto loss = [&] {
    const HcPreOut o = hc.pre(X, nullptr);
    const Tensor Y = hc.post(F, X, o.post_TN, o.comb_TNN, nullptr);
    return dot(o.x_TD, gx) + dot(o.post_TN, gp) + dot(o.comb_TNN, gc) + dot(Y, gY);
  };
  HcPreCtx pctx;
  HcPostCtx qctx;
  const HcPreOut o = hc.pre(X, &pctx);
  hc.post(F, X, o.post_TN, o.comb_TNN, &qctx);
  HcPostGrads g = hc.post_backward(gY, qctx);
  const Tensor dpost = ops::add(g.dpost_TN, gp);
  const Tensor dcomb = ops::add(g.dcomb_TNN, gc);
  const Tensor dX_pre = hc.pre_backward(gx, dpost, dcomb, pctx);
  const Tensor dX = ops::add(dX_pre, g.dX_TND);
  // pre_backward_accumulate adds into post's dX and gives the same total; it also accumulates params again.
  const Tensor dfn1 = hc.fn.grad.clone(), dbase1 = hc.base.grad.clone(), dscale1 = hc.scale.grad.clone();
  Tensor dX_acc = g.dX_TND.clone();
  hc.pre_backward_accumulate(gx, dpost, dcomb, pctx, dX_acc);
  {
    const auto a = dX.to_floats(), b = dX_acc.to_floats();
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-6 * (1 + std::abs(a[i])));
    const auto g1 = dfn1.to_floats(), g2 = hc.fn.grad.to_floats();
    for (size_t i = 0; i < g1.size(); ++i) EXPECT_NEAR(g2[i], 2 * g1[i], 1e-5 * (1 + std::abs(g1[i])));
  }
  testing::fd_check_tensor("hc X", X, dX, loss, 1e-2, 2e-3, 2e-2, 48);
  testing::fd_check_tensor("hc F", F, g.dF_TD, loss, 1e-2, 2e-3, 2e-2);
  testing::fd_check_tensor("hc fn", hc.fn.value, dfn1, loss, 1e-2, 2e-3, 2e-2, 48);
  testing::fd_check_tensor("hc base", hc.base.value, dbase1, loss, 1e-2, 2e-3, 2e-2, 24);
  testing::fd_check_tensor("hc scale", hc.scale.value, dscale1, loss, 1e-2, 2e-3, 2e-2);
  // Frozen params get no gradient; undefined dpost/dcomb mean zero.
  hc.fn.trainable = hc.base.trainable = hc.scale.trainable = false;
  hc.fn.zero_grad();
  const Tensor dX0 = hc.pre_backward(gx, Tensor(), Tensor(), pctx);
  for (float v : hc.fn.grad.to_floats()) EXPECT_EQ(v, 0.0f);
  const Tensor dX0b = hc.pre_backward(gx, Tensor::zeros({T, 4}, DType::F32), Tensor::zeros({T, 4, 4}, DType::F32), pctx);
  const auto a = dX0.to_floats(), b = dX0b.to_floats();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]);
}

TEST(HyperConnection, IdenticalStreamsWithDoublyStochasticComb) {
  // Streams start as n identical copies (§2.1). With comb column sums ~1, sum_j comb[j,k] X = X, so
  // Xnew[k] = post[k] * F + X0 up to the Sinkhorn residual.
  std::mt19937 rng(81);
  const int64_t n = 4, D = 24, T = 5;
  const ModelConfig c = small_cfg(n, D);
  HyperConnection hc("layers.0.hc_attn_", c);
  set_params(hc, rng);
  const Tensor h = random_tensor({T, D}, rng);
  const auto hv = h.to_floats();
  std::vector<float> xs(static_cast<size_t>(T * n * D));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < D; ++i) xs[(t * n + j) * D + i] = hv[t * D + i];
  const Tensor X = Tensor::from_floats({T, n, D}, xs);
  const HcPreOut o = hc.pre(X, nullptr);
  const Tensor F = random_tensor({T, D}, rng);
  const Tensor Y = hc.post(F, X, o.post_TN, o.comb_TNN, nullptr);
  const auto yv = Y.to_floats(), fv = F.to_floats(), pv = o.post_TN.to_floats(), cv = o.comb_TNN.to_floats();
  double comb_dev = 0;
  for (float v : cv) comb_dev = std::max(comb_dev, std::abs(v - 0.25));
  EXPECT_GT(comb_dev, 0.05);  // comb itself is far from uniform
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < n; ++k) {
      double colsum = 0;
      for (int64_t j = 0; j < n; ++j) colsum += cv[(t * n + j) * n + k];
      EXPECT_NEAR(colsum, 1.0, 1e-5);
      for (int64_t i = 0; i < D; ++i) {
        // Direct loop of the formula.
        double direct = pv[t * n + k] * fv[t * D + i];
        for (int64_t j = 0; j < n; ++j) direct += cv[(t * n + j) * n + k] * xs[(t * n + j) * D + i];
        const double y = yv[(t * n + k) * D + i];
        EXPECT_NEAR(y, direct, 1e-5);
        EXPECT_NEAR(y, pv[t * n + k] * fv[t * D + i] + hv[t * D + i], 2e-5);
      }
    }
    // The collapsed input is (sum_j pre[j]) * h: one ratio per token, in (n * eps, n * (1 + eps)).
    const auto xv = o.x_TD.to_floats();
    const double ratio = xv[t * D] / hv[t * D];
    EXPECT_GT(ratio, 0.0);
    EXPECT_LT(ratio, static_cast<double>(n));
    for (int64_t i = 0; i < D; ++i) EXPECT_NEAR(xv[t * D + i], ratio * hv[t * D + i], 1e-5);
  }
}

TEST(HyperHead, TensorForwardBackwardF32) {
  std::mt19937 rng(91);
  const ModelConfig c = small_cfg(4, 8);
  HyperHead head("", c);
  const auto p = random_params(4, 32, 1, rng);
  head.fn.value = to_tensor({4, 32}, p.fn);
  head.base.value = to_tensor({4}, p.base);
  head.scale.value = to_tensor({1}, p.scale);
  const int64_t T = 4;
  Tensor X = random_tensor({T, 4, 8}, rng, 1.5f);
  const Tensor G = random_tensor({T, 8}, rng);
  HcHeadCtx ctx;
  const Tensor h = head.forward(X, &ctx);
  // Against the double core.
  {
    const auto Xd = to_double(X);
    std::vector<double> hd(T * 8), mixes(T * 4), rstd(T);
    hc_head_forward_rows<double>(Xd.data(), p.fn.data(), p.scale.data(), p.base.data(), hd.data(), mixes.data(),
                                 rstd.data(), T, head.dims());
    const auto hf = h.to_floats();
    for (size_t i = 0; i < hd.size(); ++i) EXPECT_NEAR(hf[i], hd[i], 1e-5 * (1 + std::abs(hd[i])));
  }
  const Tensor dX = head.backward(G, ctx);
  auto loss = [&] { return dot(head.forward(X, nullptr), G); };
  const Tensor dfn = head.fn.grad.clone();
  testing::fd_check_tensor("head X", X, dX, loss, 1e-2, 2e-3, 2e-2, 48);
  testing::fd_check_tensor("head fn", head.fn.value, dfn, loss, 1e-2, 2e-3, 2e-2, 48);
  testing::fd_check_tensor("head base", head.base.value, head.base.grad, loss, 1e-2, 2e-3, 2e-2);
  testing::fd_check_tensor("head scale", head.scale.value, head.scale.grad, loss, 1e-2, 2e-3, 2e-2);
  head.backward(G, ctx);  // accumulates
  const auto g1 = dfn.to_floats(), g2 = head.fn.grad.to_floats();
  for (size_t i = 0; i < g1.size(); ++i) EXPECT_NEAR(g2[i], 2 * g1[i], 1e-5 * (1 + std::abs(g1[i])));
}

TEST(HyperConnection, RejectsBadShapes) {
  const ModelConfig c = small_cfg(4, 8);
  HyperConnection hc("layers.0.hc_attn_", c);
  EXPECT_THROW(hc.pre(Tensor::zeros({3, 2, 8}, DType::F32), nullptr), Error);
  EXPECT_THROW(hc.pre(Tensor::zeros({3, 32}, DType::F32), nullptr), Error);
  const Tensor X = Tensor::zeros({3, 4, 8}, DType::F32);
  EXPECT_THROW(hc.post(Tensor::zeros({2, 8}, DType::F32), X, Tensor::zeros({3, 4}, DType::F32),
                       Tensor::zeros({3, 4, 4}, DType::F32), nullptr),
               Error);
  HcPreCtx empty;
  EXPECT_THROW(hc.pre_backward(Tensor::zeros({3, 8}, DType::F32), Tensor(), Tensor(), empty), Error);
}

}  // namespace
}  // namespace dsv4
