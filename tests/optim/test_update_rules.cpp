// Muon's hybrid Newton-Schulz and the Muon / AdamW update rules, checked against hand-computed references
// (scalar iterations, the polar factor from an eigen-decomposition, closed-form AdamW) and the NS fixtures
// written by tests/ref/optim/gen_optim_fixtures.py (float64 torch).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "optim/update_rules.h"
#include "optim_test_util.h"
#include "runtime/dtype.h"
#include "runtime/safetensors.h"

namespace dsv4 {
namespace {

using testing::max_rel;
using testing::randn;

const std::string kFixtures = std::string(DSV4_FIXTURE_DIR) + "/optim/";

// Singular values of x [r, c] and its polar factor, via the small-side Gram matrix (double).
void svd_small(const std::vector<float>& x, int64_t r, int64_t c, std::vector<double>* sv, std::vector<double>* polar) {
  const bool tall = r > c;
  const int64_t k = tall ? c : r, l = tall ? r : c;
  auto el = [&](int64_t i, int64_t j) {  // element (i, j) of the wide view [k, l]
    return static_cast<double>(tall ? x[static_cast<size_t>(j * c + i)] : x[static_cast<size_t>(i * c + j)]);
  };
  std::vector<double> G(static_cast<size_t>(k * k), 0.0);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = 0; t < l; ++t) G[static_cast<size_t>(i * k + j)] += el(i, t) * el(j, t);
  std::vector<double> V;
  const std::vector<double> ev = testing::sym_eig(G, k, &V);
  sv->clear();
  for (double e : ev) sv->push_back(std::sqrt(std::max(e, 0.0)));
  if (!polar) return;
  // polar = (G^{-1/2}) X for the wide view = V diag(1/sqrt(ev)) V^T X.
  std::vector<double> Gm(static_cast<size_t>(k * k), 0.0);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t e = 0; e < k; ++e)
        Gm[static_cast<size_t>(i * k + j)] += V[static_cast<size_t>(i * k + e)] * V[static_cast<size_t>(j * k + e)] /
                                              std::sqrt(ev[static_cast<size_t>(e)]);
  polar->assign(static_cast<size_t>(r * c), 0.0);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t t = 0; t < l; ++t) {
      double s = 0;
      for (int64_t j = 0; j < k; ++j) s += Gm[static_cast<size_t>(i * k + j)] * el(j, t);
      (*polar)[static_cast<size_t>(tall ? t * c + i : i * c + t)] = s;
    }
}

TEST(NewtonSchulz, OrthogonalisesRandomMatrices) {
  const MuonConfig cfg;
  for (auto [r, c] : {std::pair<int64_t, int64_t>{24, 40}, {40, 24}, {16, 16}, {1, 9}, {9, 1}, {64, 8}}) {
    const std::vector<float> u = randn(static_cast<size_t>(r * c), static_cast<uint32_t>(r * 100 + c));
    std::vector<float> o(u.size());
    newton_schulz(u.data(), o.data(), r, c, cfg.ns_schedule, cfg.ns_eps);
    std::vector<double> sv_in, sv, polar;
    svd_small(u, r, c, &sv_in, &polar);
    svd_small(o, r, c, &sv, nullptr);
    double smin = 1e30;
    for (double s : sv_in) smin = std::min(smin, s);
    ASSERT_GT(smin, 0.0);
    for (double s : sv) EXPECT_NEAR(s, 1.0, 1e-2) << r << "x" << c;  // orthogonalised: singular values near 1
    double err = 0;
    for (size_t i = 0; i < o.size(); ++i) err = std::max(err, std::abs(o[i] - polar[i]));
    EXPECT_LT(err, 1e-2) << r << "x" << c << ": NS differs from the polar factor U V^T";
  }
}

TEST(NewtonSchulz, RankOneFollowsTheScalarIteration) {
  // X0 = u / |u| has the single singular value 1; NS maps it through s <- a s + b s^3 + c s^5 stage by stage.
  const MuonConfig cfg;
  double s = 1.0;
  for (const NsStage& st : cfg.ns_schedule)
    for (int64_t k = 0; k < st.steps; ++k) s = st.a * s + st.b * s * s * s + st.c * s * s * s * s * s;
  const std::vector<float> u = {0.3f, -1.2f, 0.5f, 2.0f};
  const double norm = std::sqrt(0.09 + 1.44 + 0.25 + 4.0);
  for (bool tall : {false, true}) {
    std::vector<float> o(4);
    newton_schulz(u.data(), o.data(), tall ? 4 : 1, tall ? 1 : 4, cfg.ns_schedule, cfg.ns_eps);
    for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(o[i], s * u[i] / norm, 2e-6) << i;
  }
}

TEST(NewtonSchulz, ScaleInvariantAndZeroSafe) {
  const MuonConfig cfg;
  const std::vector<float> u = randn(35, 3);
  std::vector<float> small(u.size()), o1(u.size()), o2(u.size());
  for (size_t i = 0; i < u.size(); ++i) small[i] = 0.05f * u[i];
  newton_schulz(u.data(), o1.data(), 5, 7, cfg.ns_schedule, cfg.ns_eps);
  newton_schulz(small.data(), o2.data(), 5, 7, cfg.ns_schedule, cfg.ns_eps);
  EXPECT_LT(max_rel(o2, o1), 1e-5);
  std::vector<float> z(35, 0.0f), oz(35, 1.0f);
  newton_schulz(z.data(), oz.data(), 5, 7, cfg.ns_schedule, cfg.ns_eps);
  for (float v : oz) EXPECT_EQ(v, 0.0f);
  // In place (out == x) gives the same result.
  std::vector<float> inplace = u;
  newton_schulz(inplace.data(), inplace.data(), 5, 7, cfg.ns_schedule, cfg.ns_eps);
  EXPECT_EQ(inplace, o1);
}

TEST(NewtonSchulz, MatchesTorchFloat64Fixture) {
  const SafetensorsFile f = SafetensorsFile::open(kFixtures + "ns.safetensors");
  const MuonConfig cfg;
  int cases = 0;
  for (const std::string& name : f.names()) {
    if (name.rfind("ns/", 0) != 0 || name.size() < 3 || name.substr(name.size() - 3) != "/in") continue;
    const std::string base = name.substr(0, name.size() - 3);
    const Tensor in = f.load(name);
    const std::vector<float> want = f.load(base + "/out").to_floats();
    std::vector<float> got(want.size());
    newton_schulz(in.data<float>(), got.data(), in.size(0), in.size(1), cfg.ns_schedule, cfg.ns_eps);
    EXPECT_LT(max_rel(got, want), 2e-6) << base;  // measured up to 5.2e-7
    ++cases;
  }
  EXPECT_EQ(cases, 6);
}

TEST(NewtonSchulz, Bf16EmulationIsCloseToTorchBf16) {
  // torch.optim.Muon's own NS (Keller's 5 steps, run in BF16) as written by the generator.
  const SafetensorsFile f = SafetensorsFile::open(kFixtures + "ns.safetensors");
  const Tensor in = f.load("ns_bf16_keller5/5x7/in");
  const std::vector<float> want = f.load("ns_bf16_keller5/5x7/out").to_floats();
  const std::vector<NsStage> keller5 = {{5, 3.4445, -4.7750, 2.0315}};
  std::vector<float> bf(want.size()), f32(want.size());
  newton_schulz(in.data<float>(), bf.data(), 5, 7, keller5, 1e-7, NsPrecision::BF16);
  newton_schulz(in.data<float>(), f32.data(), 5, 7, keller5, 1e-7, NsPrecision::F32);
  for (float v : bf) EXPECT_EQ(v, round_bf16(v));  // every output is a BF16 value
  EXPECT_NE(bf, f32);
  // The emulation rounds where torch does, so it lands on torch's BF16 values (up to rare one-ulp flips from a
  // different FP32 summation order inside the GEMMs); FP32 NS is a few percent away (BF16 NS amplifies rounding).
  int64_t differ = 0;
  for (size_t i = 0; i < bf.size(); ++i) differ += bf[i] != want[i];
  std::printf("BF16 emulation vs torch BF16: max rel %.2e, %lld of %zu values differ; FP32 vs torch BF16: %.4f\n",
              max_rel(bf, want), static_cast<long long>(differ), bf.size(), max_rel(f32, want));
  EXPECT_LT(max_rel(bf, want), 1e-2);
  EXPECT_LE(differ, 3);
  EXPECT_LT(max_rel(f32, want), 6e-2);
  EXPECT_GT(max_rel(f32, want), 1e-3);
  // Hybrid schedule in BF16 still orthogonalises to BF16-level accuracy.
  const MuonConfig cfg;
  const std::vector<float> u = randn(24 * 40, 11);
  std::vector<float> o(u.size());
  newton_schulz(u.data(), o.data(), 24, 40, cfg.ns_schedule, cfg.ns_eps, NsPrecision::BF16);
  std::vector<double> sv;
  svd_small(o, 24, 40, &sv, nullptr);
  for (double s : sv) EXPECT_NEAR(s, 1.0, 0.05);
}

// The benchmark's FLOP count: X X^T (2 r^2 c), b A + c A A (2 r^3), a X + B X (2 r^2 c) per iteration, r = min.
TEST(NewtonSchulz, FlopCountOfTheGemms) {
  const std::vector<NsStage> two = {{1, 1, 0, 0}, {1, 1, 0, 0}};
  EXPECT_EQ(newton_schulz_flops(2, 3, two), 2 * (4.0 * 2 * 2 * 3 + 2.0 * 8));
  EXPECT_EQ(newton_schulz_flops(3, 2, two), newton_schulz_flops(2, 3, two));
  EXPECT_EQ(newton_schulz_flops(1024, 2048, hybrid_ns_schedule()), 10 * (4.0 * 1024 * 1024 * 2048 + 2.0 * 1024 * 1024 * 1024));
}

TEST(MuonUpdate, HandComputedRankOneSteps) {
  // W [1, 3]: every NS input is rank one, so O = s_final * U / |U| with s_final from the scalar iteration.
  MuonConfig cfg;
  double s = 1.0;
  for (const NsStage& st : cfg.ns_schedule)
    for (int64_t k = 0; k < st.steps; ++k) s = st.a * s + st.b * std::pow(s, 3) + st.c * std::pow(s, 5);
  const std::vector<std::vector<double>> grads = {{0.5, -1.0, 2.0}, {-0.25, 0.75, 1.0}};
  const std::vector<double> lrs = {0.1, 0.05};
  for (bool tall : {false, true}) {
    std::vector<float> w = {1.0f, -2.0f, 0.5f}, m(3, 0.0f);
    std::vector<double> W = {1.0, -2.0, 0.5}, M(3, 0.0);
    for (size_t k = 0; k < grads.size(); ++k) {
      std::vector<float> g(grads[k].begin(), grads[k].end());
      muon_update(w.data(), g.data(), m.data(), tall ? 3 : 1, tall ? 1 : 3, 1, lrs[k], cfg);
      std::vector<double> U(3);
      double un = 0;
      for (int i = 0; i < 3; ++i) {
        M[i] = 0.95 * M[i] + grads[k][i];
        U[i] = 0.95 * M[i] + grads[k][i];
        un += U[i] * U[i];
      }
      un = std::sqrt(un);
      for (int i = 0; i < 3; ++i) {
        W[i] = W[i] * (1 - lrs[k] * 0.1) - lrs[k] * 0.18 * std::sqrt(3.0) * s * U[i] / un;
        EXPECT_NEAR(w[i], W[i], 1e-6) << "step " << k << " i " << i << (tall ? " tall" : " wide");
        EXPECT_NEAR(m[i], M[i], 1e-6);
      }
    }
  }
}

TEST(MuonUpdate, RowBlocksAreIndependentMatrices) {
  MuonConfig cfg;
  const std::vector<float> w0 = randn(4 * 6, 21), g = randn(4 * 6, 22);
  std::vector<float> w = w0, m(24, 0.0f);
  muon_update(w.data(), g.data(), m.data(), 4, 6, 2, 0.02, cfg);
  std::vector<float> w2 = w0, m2(24, 0.0f);
  muon_update(w2.data(), g.data(), m2.data(), 2, 6, 1, 0.02, cfg);
  muon_update(w2.data() + 12, g.data() + 12, m2.data() + 12, 2, 6, 1, 0.02, cfg);
  EXPECT_EQ(w, w2);
  EXPECT_EQ(m, m2);
  std::vector<float> w3 = w0, m3(24, 0.0f);
  muon_update(w3.data(), g.data(), m3.data(), 4, 6, 1, 0.02, cfg);
  EXPECT_NE(w, w3);
  EXPECT_THROW(muon_update(w3.data(), g.data(), m3.data(), 4, 6, 3, 0.02, cfg), Error);
}

TEST(MuonUpdate, NoNesterovUsesMomentum) {
  MuonConfig cfg;
  cfg.nesterov = false;
  cfg.weight_decay = 0;
  // Step 1 with M = G; step 2 with G2 = -0.95 G: M = 0.95 G - 0.95 G = 0 -> no update at all.
  std::vector<float> w = {1, 2, 3, 4}, m(4, 0.0f), g = {0.5f, -0.5f, 1.0f, 2.0f};
  muon_update(w.data(), g.data(), m.data(), 2, 2, 1, 0.1, cfg);
  const std::vector<float> after1 = w;
  std::vector<float> g2(4);
  for (int i = 0; i < 4; ++i) g2[i] = -0.95f * g[i];
  muon_update(w.data(), g2.data(), m.data(), 2, 2, 1, 0.1, cfg);
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(m[i], 0.0f, 1e-7);
    EXPECT_NEAR(w[i], after1[i], 1e-6);
  }
}

TEST(AdamWUpdate, HandComputedSteps) {
  const AdamWConfig cfg;
  std::vector<float> w = {0.5f, -1.0f, 0.0f}, m(3, 0.0f), v(3, 0.0f);
  std::vector<double> W = {0.5, -1.0, 0.0}, M(3, 0.0), V(3, 0.0);
  const std::vector<std::vector<double>> grads = {{0.1, -2.0, 0.0}, {0.3, 1.0, 0.0}, {-0.2, 0.5, 1e-3}};
  const std::vector<double> lrs = {1e-2, 2e-2, 5e-3};
  for (int t = 1; t <= 3; ++t) {
    const auto& gd = grads[static_cast<size_t>(t - 1)];
    std::vector<float> g(gd.begin(), gd.end());
    const double lr = lrs[static_cast<size_t>(t - 1)];
    adamw_update(w.data(), g.data(), m.data(), v.data(), 3, t, lr, cfg);
    for (int i = 0; i < 3; ++i) {
      W[i] *= 1 - lr * 0.1;
      M[i] = 0.9 * M[i] + 0.1 * gd[i];
      V[i] = 0.95 * V[i] + 0.05 * gd[i] * gd[i];
      const double mh = M[i] / (1 - std::pow(0.9, t)), vh = V[i] / (1 - std::pow(0.95, t));
      W[i] -= lr * mh / (std::sqrt(vh) + 1e-20);
      EXPECT_NEAR(w[i], W[i], 1e-6 * std::max(1.0, std::abs(W[i]))) << "t " << t << " i " << i;
      EXPECT_NEAR(m[i], M[i], 1e-7);
      EXPECT_NEAR(v[i], V[i], 1e-7);
    }
  }
  // Step 1 of a non-zero gradient moves by lr * sign(g) (plus decay): |m_hat| / sqrt(v_hat) = 1 with eps 1e-20.
  std::vector<float> w1 = {1.0f}, m1 = {0.0f}, v1 = {0.0f}, g1 = {-3e-9f};
  adamw_update(w1.data(), g1.data(), m1.data(), v1.data(), 1, 1, 0.01, cfg);
  EXPECT_NEAR(w1[0], 1.0 * (1 - 0.001) + 0.01, 1e-7);
  EXPECT_THROW(adamw_update(w1.data(), g1.data(), m1.data(), v1.data(), 1, 0, 0.01, cfg), Error);
}

TEST(UpdateConfigs, Validate) {
  MuonConfig m;
  m.validate();
  m.momentum = 1.0;
  EXPECT_THROW(m.validate(), Error);
  AdamWConfig a;
  a.validate();
  a.eps = 0;
  EXPECT_THROW(a.validate(), Error);
  const std::vector<NsStage> h = hybrid_ns_schedule();
  ASSERT_EQ(h.size(), 2u);
  EXPECT_EQ(h[0], (NsStage{8, 3.4445, -4.7750, 2.0315}));
  EXPECT_EQ(h[1], (NsStage{2, 2.0, -1.5, 0.5}));
}

}  // namespace
}  // namespace dsv4
