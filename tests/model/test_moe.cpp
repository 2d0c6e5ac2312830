// DeepSeekMoE block: routing on hand-built gates, hash routing, a naive double-loop reference for the forward,
// SwiGLU clamps firing, finite differences for every gradient (module in F32, router and balance cores in double),
// load counts and dropless dispatch.
#include <gtest/gtest.h>

#include <set>

#include "fd_check.h"
#include "model/moe.h"

namespace dsv4 {
namespace {

using testing::dot;
using testing::random_tensor;

ModelConfig small_config(int64_t D = 8, int64_t E = 6, int64_t K = 2, int64_t I = 5, double limit = 0.8) {
  ModelConfig c;
  c.dim = D;
  c.n_routed_experts = E;
  c.n_activated_experts = K;
  c.moe_inter_dim = I;
  c.n_shared_experts = 1;
  c.vocab_size = 16;
  c.route_scale = 1.5;
  c.swiglu_limit = limit;
  return c;
}

// Random F32 parameters (gate, bias, experts, shared); tid2eid rows = K distinct random experts.
void randomize(MoE& m, std::mt19937& rng, float bias_scale = 0.3f) {
  m.visit([&](Param& p) {
    if (p.value.dtype() != DType::F32) return;
    const bool is_bias = p.name.ends_with("gate.bias");
    p.value = random_tensor(p.value.shape(), rng, is_bias ? bias_scale : 1.0f);
  });
  if (m.hash_routed()) {
    const int64_t V = m.tid2eid.value.size(0), K = m.top_k(), E = m.n_experts();
    int64_t* tab = m.tid2eid.value.data<int64_t>();
    std::vector<int64_t> perm(static_cast<size_t>(E));
    for (int64_t v = 0; v < V; ++v) {
      std::iota(perm.begin(), perm.end(), int64_t{0});
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int64_t j = 0; j < K; ++j) tab[v * K + j] = perm[static_cast<size_t>(j)];
    }
  }
}

Tensor random_ids(int64_t T, int64_t V, std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> pick(0, V - 1);
  std::vector<int64_t> v(static_cast<size_t>(T));
  for (auto& x : v) x = pick(rng);
  return Tensor::from_vector<int64_t>({T}, v);
}

// ---- naive reference: plain loops in double over the F32 parameters -------------------------------------------
struct Naive {
  std::vector<double> y;                           // [T, D]
  std::vector<std::vector<int64_t>> idx;           // per token, selection (learned: descending by aff + bias)
  std::vector<std::vector<double>> w;              // per token, routing weights
  int64_t routed_clamped = 0, shared_clamped = 0;  // pre-activations beyond the limit (g > L or |u| > L)
  double clamp_margin = 1e30;                      // min distance of any used pre-activation from +-L
  double topk_gap = 1e30;                          // min gap between the K-th and (K+1)-th selection scores
};

Naive naive_forward(const MoE& m, const Tensor& x_TD, const Tensor& ids_T, double route_scale, double limit) {
  const int64_t T = x_TD.size(0), D = m.dim(), E = m.n_experts(), K = m.top_k(), I = m.inter_dim();
  const auto x = x_TD.to_floats();
  const auto wg = m.gate_weight.value.to_floats();
  std::vector<float> bias;
  if (!m.hash_routed()) bias = m.gate_bias.value.to_floats();
  Naive r;
  r.y.assign(static_cast<size_t>(T * D), 0.0);
  auto expert = [&](const ExpertWeights& ew, int64_t t, double wr, int64_t& clamped) {
    const auto w1 = ew.w1.value.to_floats(), w2 = ew.w2.value.to_floats(), w3 = ew.w3.value.to_floats();
    std::vector<double> h(static_cast<size_t>(I));
    for (int64_t i = 0; i < I; ++i) {
      double g = 0, u = 0;
      for (int64_t d = 0; d < D; ++d) {
        g += static_cast<double>(w1[i * D + d]) * x[t * D + d];
        u += static_cast<double>(w3[i * D + d]) * x[t * D + d];
      }
      if (limit > 0) {
        clamped += (g > limit) + (std::abs(u) > limit);
        r.clamp_margin = std::min({r.clamp_margin, std::abs(g - limit), std::abs(u - limit), std::abs(u + limit)});
        g = std::min(g, limit);
        u = std::clamp(u, -limit, limit);
      }
      h[static_cast<size_t>(i)] = wr * (g / (1 + std::exp(-g))) * u;
    }
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      for (int64_t i = 0; i < I; ++i) s += static_cast<double>(w2[d * I + i]) * h[static_cast<size_t>(i)];
      r.y[static_cast<size_t>(t * D + d)] += s;
    }
  };
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> a(static_cast<size_t>(E)), sel(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += static_cast<double>(wg[e * D + d]) * x[t * D + d];
      const double sp = s > 20 ? s : std::log1p(std::exp(s));
      a[static_cast<size_t>(e)] = std::sqrt(sp);
      sel[static_cast<size_t>(e)] = a[static_cast<size_t>(e)] + (bias.empty() ? 0.0 : bias[static_cast<size_t>(e)]);
    }
    std::vector<int64_t> chosen;
    if (m.hash_routed()) {
      const int64_t id = ids_T.data<int64_t>()[t];
      for (int64_t j = 0; j < K; ++j) chosen.push_back(m.tid2eid.value.data<int64_t>()[id * K + j]);
    } else {
      std::vector<int64_t> order(static_cast<size_t>(E));
      std::iota(order.begin(), order.end(), int64_t{0});
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t i, int64_t j) { return sel[static_cast<size_t>(i)] > sel[static_cast<size_t>(j)]; });
      chosen.assign(order.begin(), order.begin() + K);
      if (K < E)
        r.topk_gap = std::min(r.topk_gap, sel[static_cast<size_t>(order[static_cast<size_t>(K - 1)])] -
                                              sel[static_cast<size_t>(order[static_cast<size_t>(K)])]);
    }
    double sum = 0;
    for (int64_t e : chosen) sum += a[static_cast<size_t>(e)];
    std::vector<double> w;
    for (int64_t e : chosen) w.push_back(a[static_cast<size_t>(e)] / sum * route_scale);
    for (size_t j = 0; j < chosen.size(); ++j)
      expert(m.experts[static_cast<size_t>(chosen[j])], t, w[j], r.routed_clamped);
    if (m.has_shared()) expert(m.shared, t, 1.0, r.shared_clamped);
    r.idx.push_back(chosen);
    r.w.push_back(w);
  }
  return r;
}

// ---- routing on hand-built gates --------------------------------------------------------------------------------

TEST(MoE, RoutingHandBuiltGateTopKAndWeights) {
  ModelConfig c = small_config(4, 4, 2, 3, 0.0);
  c.route_scale = 2.5;
  MoE m("layers.3.ffn.", c, false);
  m.gate_weight.value = Tensor::from_floats({4, 4}, {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1});  // s = x
  // token 0: s = (3, 1, -1, 2) -> experts 0, 3.  token 1: s = (0, 100, 1, -2) -> 1 (linear softplus above 20:
  // aff = 10, where log1p(exp(100)) would overflow to inf in FP32), 2.
  const Tensor x = Tensor::from_floats({2, 4}, {3, 1, -1, 2, 0, 100, 1, -2});
  auto aff = [](double s) { return std::sqrt(s > 20 ? s : std::log1p(std::exp(s))); };
  MoECtx ctx;
  m.forward(x, Tensor(), SeqLayout(1, 2), &ctx);
  const int64_t* idx = ctx.idx.data<int64_t>();
  const auto w = ctx.w.to_floats();
  EXPECT_EQ(idx[0], 0);
  EXPECT_EQ(idx[1], 3);
  EXPECT_EQ(idx[2], 1);
  EXPECT_EQ(idx[3], 2);
  EXPECT_EQ(ctx.aff.to_floats()[4 + 1], 10.0f);  // sqrt(100) above the softplus threshold
  EXPECT_NEAR(w[0], 2.5 * aff(3) / (aff(3) + aff(2)), 1e-6);
  EXPECT_NEAR(w[1], 2.5 * aff(2) / (aff(3) + aff(2)), 1e-6);
  EXPECT_NEAR(w[2], 2.5 * 10 / (10 + aff(1)), 1e-6);
  EXPECT_NEAR(w[3], 2.5 * aff(1) / (10 + aff(1)), 1e-6);
  EXPECT_NEAR(w[0] + w[1], 2.5, 1e-6);
  EXPECT_NEAR(w[2] + w[3], 2.5, 1e-6);

  // The bias changes the selection but not the weights: bias[3] = +10 puts expert 3 first for both tokens.
  m.gate_bias.value = Tensor::from_floats({4}, {0, 0, 0, 10});
  MoECtx b;
  m.forward(x, Tensor(), SeqLayout(1, 2), &b);
  const int64_t* bi = b.idx.data<int64_t>();
  const auto bw = b.w.to_floats();
  EXPECT_EQ(bi[0], 3);
  EXPECT_EQ(bi[1], 0);
  EXPECT_EQ(bi[2], 3);  // aff(-2) + 10 = 10.36 > aff(100) = 10
  EXPECT_EQ(bi[3], 1);
  EXPECT_NEAR(bw[0], 2.5 * aff(2) / (aff(3) + aff(2)), 1e-6);
  EXPECT_NEAR(bw[2], 2.5 * aff(-2) / (aff(-2) + 10), 1e-6);
  EXPECT_NEAR(bw[3], 2.5 * 10 / (aff(-2) + 10), 1e-6);
  EXPECT_NEAR(bw[2] + bw[3], 2.5, 1e-6);
  EXPECT_EQ(b.stats.load, (std::vector<int64_t>{1, 1, 0, 2}));
}

TEST(MoE, WeightsSumToRouteScale) {
  std::mt19937 rng(11);
  for (bool hash : {false, true}) {
    MoE m("layers.0.ffn.", small_config(), hash);
    randomize(m, rng);
    const Tensor x = random_tensor({12, 8}, rng);
    const Tensor ids = random_ids(12, 16, rng);
    MoECtx ctx;
    m.forward(x, ids, SeqLayout(3, 4), &ctx);
    const auto w = ctx.w.to_floats();
    for (int t = 0; t < 12; ++t) {
      EXPECT_NEAR(w[2 * t] + w[2 * t + 1], 1.5, 1e-6) << t;
      EXPECT_GT(w[2 * t], 0.0f);
    }
  }
}

TEST(MoE, HashRoutingUsesTid2eidRows) {
  ModelConfig c = small_config(4, 4, 2, 3, 0.0);
  MoE m("layers.0.ffn.", c, true);
  m.gate_weight.value = Tensor::from_floats({4, 4}, {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1});
  int64_t* tab = m.tid2eid.value.data<int64_t>();
  tab[5 * 2 + 0] = 2;  // token id 5 -> experts (2, 1): not the top-2 of its scores
  tab[5 * 2 + 1] = 1;
  tab[9 * 2 + 0] = 0;
  tab[9 * 2 + 1] = 3;
  const Tensor x = Tensor::from_floats({2, 4}, {3, 1, -1, 2, 3, 1, -1, 2});
  const Tensor ids = Tensor::from_vector<int64_t>({2}, {5, 9});
  auto aff = [](double s) { return std::sqrt(std::log1p(std::exp(s))); };
  MoECtx ctx;
  m.forward(x, ids, SeqLayout(1, 2), &ctx);
  const int64_t* idx = ctx.idx.data<int64_t>();
  EXPECT_EQ(idx[0], 2);
  EXPECT_EQ(idx[1], 1);
  EXPECT_EQ(idx[2], 0);
  EXPECT_EQ(idx[3], 3);
  const auto w = ctx.w.to_floats();  // the gate still sets the combine weights
  EXPECT_NEAR(w[0], 1.5 * aff(-1) / (aff(-1) + aff(1)), 1e-6);
  EXPECT_NEAR(w[1], 1.5 * aff(1) / (aff(-1) + aff(1)), 1e-6);
  EXPECT_NEAR(w[2], 1.5 * aff(3) / (aff(3) + aff(2)), 1e-6);
  // Errors: missing ids, an id outside the vocabulary, a table entry that is not an expert.
  EXPECT_THROW(m.forward(x, Tensor(), SeqLayout(1, 2), nullptr), Error);
  EXPECT_THROW(m.forward(x, Tensor::from_vector<int64_t>({2}, {5, 16}), SeqLayout(1, 2), nullptr), Error);
  tab[9 * 2 + 1] = 4;
  EXPECT_THROW(m.forward(x, ids, SeqLayout(1, 2), nullptr), Error);
}

TEST(MoE, DuplicateHashExpertsCountTwice) {
  // HF's zero-initialised tid2eid routes every token to expert 0 twice; both slots are added (HF index_add_).
  ModelConfig c = small_config(4, 3, 2, 3, 0.0);
  MoE m("layers.0.ffn.", c, true);
  std::mt19937 rng(2);
  randomize(m, rng);
  ops::fill(m.tid2eid.value, 0.0);
  const Tensor x = random_tensor({3, 4}, rng);
  const Tensor ids = Tensor::from_vector<int64_t>({3}, {1, 2, 3});
  MoECtx ctx;
  const Tensor y = m.forward(x, ids, SeqLayout(1, 3), &ctx);
  EXPECT_EQ(ctx.stats.load, (std::vector<int64_t>{6, 0, 0}));
  const Naive ref = naive_forward(m, x, ids, c.route_scale, 0.0);
  const auto yv = y.to_floats();
  for (size_t i = 0; i < yv.size(); ++i) EXPECT_NEAR(yv[i], ref.y[i], 1e-5 * (1 + std::abs(ref.y[i]))) << i;
}

// ---- forward against the naive loops, clamps firing --------------------------------------------------------------

TEST(MoE, ForwardMatchesNaiveLoopsWithClampsFiring) {
  for (bool hash : {false, true}) {
    const ModelConfig c = small_config(8, 6, 2, 5, 0.8);
    MoE m(hash ? "layers.1.ffn." : "layers.5.ffn.", c, hash);
    std::mt19937 rng(hash ? 21 : 20);
    randomize(m, rng);
    const Tensor x = random_tensor({10, 8}, rng);
    const Tensor ids = random_ids(10, 16, rng);
    MoECtx ctx;
    MoEStats stats;
    const Tensor y = m.forward(x, ids, SeqLayout(2, 5), &ctx, &stats);
    const Naive ref = naive_forward(m, x, ids, c.route_scale, c.swiglu_limit);
    EXPECT_GT(ref.routed_clamped, 0) << "routed clamp never fired";
    EXPECT_GT(ref.shared_clamped, 0) << "shared clamp never fired";
    const auto yv = y.to_floats();
    for (size_t i = 0; i < yv.size(); ++i) EXPECT_NEAR(yv[i], ref.y[i], 2e-6 * (1 + std::abs(ref.y[i]))) << i;
    const int64_t* idx = ctx.idx.data<int64_t>();
    const auto w = ctx.w.to_floats();
    for (int t = 0; t < 10; ++t)
      for (int j = 0; j < 2; ++j) {
        EXPECT_EQ(idx[t * 2 + j], ref.idx[static_cast<size_t>(t)][static_cast<size_t>(j)]);
        EXPECT_NEAR(w[static_cast<size_t>(t * 2 + j)], ref.w[static_cast<size_t>(t)][static_cast<size_t>(j)], 1e-6);
      }
    EXPECT_EQ(stats.load, ctx.stats.load);
    EXPECT_EQ(stats.balance_term, ctx.stats.balance_term);
    // Without a context the output is the same.
    const auto y2 = m.forward(x, ids, SeqLayout(2, 5), nullptr).to_floats();
    EXPECT_EQ(yv, y2);
    // Without the clamp the output changes (so the clamp did something).
    ModelConfig c0 = c;
    c0.swiglu_limit = 0;
    MoE m0(hash ? "layers.1.ffn." : "layers.5.ffn.", c0, hash);
    std::mt19937 rng0(hash ? 21 : 20);
    randomize(m0, rng0);
    const Naive ref0 = naive_forward(m0, x, ids, c.route_scale, 0.0);
    const auto y0 = m0.forward(x, ids, SeqLayout(2, 5), nullptr).to_floats();
    double diff = 0;
    for (size_t i = 0; i < y0.size(); ++i) {
      EXPECT_NEAR(y0[i], ref0.y[i], 2e-6 * (1 + std::abs(ref0.y[i])));
      diff = std::max(diff, std::abs(static_cast<double>(y0[i]) - yv[i]));
    }
    EXPECT_GT(diff, 1e-2);
  }
}

// ---- load counts, dropless dispatch, unused experts --------------------------------------------------------------

TEST(MoE, LoadCountsDroplessAndIdleExperts) {
  const ModelConfig c = small_config(8, 6, 3, 5, 0.8);
  MoE m("layers.4.ffn.", c, false);
  std::mt19937 rng(5);
  randomize(m, rng);
  m.gate_bias.value.data<float>()[5] = -100.0f;  // expert 5 never selected
  const int64_t T = 24;
  const Tensor x = random_tensor({T, 8}, rng);
  MoECtx ctx;
  const Tensor y = m.forward(x, Tensor(), SeqLayout(4, 6), &ctx);
  int64_t total = 0;
  for (int64_t l : ctx.stats.load) total += l;
  EXPECT_EQ(total, T * 3);
  EXPECT_EQ(ctx.stats.load[5], 0);
  const int64_t* idx = ctx.idx.data<int64_t>();
  std::vector<int64_t> recount(6, 0);
  for (int64_t t = 0; t < T; ++t) {
    std::set<int64_t> distinct(idx + t * 3, idx + t * 3 + 3);
    EXPECT_EQ(distinct.size(), 3u) << "token " << t << " does not reach 3 distinct experts";
    for (int j = 0; j < 3; ++j) ++recount[static_cast<size_t>(idx[t * 3 + j])];
  }
  EXPECT_EQ(recount, ctx.stats.load);
  EXPECT_EQ(static_cast<int64_t>(ctx.sorted_slot.size()), T * 3);
  EXPECT_EQ(ctx.offsets.back(), T * 3);
  // Backward with an idle expert: finite, and that expert gets zero gradients.
  const Tensor dy = random_tensor({T, 8}, rng);
  const Tensor dx = m.backward(dy, ctx, 0.01);
  for (float v : dx.to_floats()) EXPECT_TRUE(std::isfinite(v));
  for (float v : m.experts[5].w1.grad_buffer().to_floats()) EXPECT_EQ(v, 0.0f);
  for (float v : m.experts[5].w2.grad_buffer().to_floats()) EXPECT_EQ(v, 0.0f);
  double used = 0;
  for (float v : m.experts[0].w1.grad_buffer().to_floats()) used += std::abs(v);
  EXPECT_GT(used, 0.0);
  // No gradient for the selection-only bias.
  EXPECT_FALSE(m.gate_bias.grad.defined());
  // Empty input.
  MoECtx e;
  const Tensor y0 = m.forward(Tensor::zeros({0, 8}, DType::F32), Tensor(), SeqLayout(0, 6), &e);
  EXPECT_EQ(y0.size(0), 0);
  EXPECT_EQ(m.backward(Tensor::zeros({0, 8}, DType::F32), e, 0.01).size(0), 0);
}

// ---- SwiGLU clamp core: boundary behaviour like torch.clamp -------------------------------------------------------

TEST(MoE, ClampGradientPassesAtTheBoundary) {
  const double L = 2.0;
  // g: below, at, above the limit; u: inside, at +L, at -L, beyond.
  const std::vector<float> g = {1.0f, 2.0f, 3.0f, 1.0f}, u = {0.5f, 2.0f, -2.0f, -3.0f};
  const std::vector<float> dh = {1, 1, 1, 1};
  std::vector<float> h(4), dg(4), du(4);
  swiglu_clamp_rows<float>(g.data(), u.data(), nullptr, h.data(), 1, 4, L);
  swiglu_clamp_backward_rows<float>(g.data(), u.data(), nullptr, dh.data(), dg.data(), du.data(), nullptr, 1, 4, L);
  auto silu = [](double v) { return v / (1 + std::exp(-v)); };
  EXPECT_NEAR(h[2], silu(2.0) * -2.0, 1e-6);  // g clamped to 2
  EXPECT_NEAR(h[3], silu(1.0) * -2.0, 1e-6);  // u clamped to -2
  EXPECT_NE(dg[1], 0.0f);                     // g == L passes
  EXPECT_EQ(dg[2], 0.0f);                     // g > L blocked
  EXPECT_NE(du[1], 0.0f);                     // u == +L passes
  EXPECT_NE(du[2], 0.0f);                     // u == -L passes
  EXPECT_EQ(du[3], 0.0f);                     // u < -L blocked
  EXPECT_NE(dg[3], 0.0f);                     // g fine even though u is clamped
}

// ---- double-precision cores: router and balance loss -----------------------------------------------------------

TEST(MoE, RouterCoreDoubleFiniteDifferences) {
  const int64_t T = 5, E = 7, K = 3;
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(-3, 3);
  std::vector<double> s(T * E), bias(E), c(T * K);
  for (auto& v : s) v = u(rng);
  s[3] = 23.0;  // one logit on the linear side of the softplus threshold
  for (auto& v : bias) v = 0.2 * u(rng);
  for (auto& v : c) v = u(rng);
  std::vector<int64_t> hash_idx(T * K);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < K; ++j) hash_idx[t * K + j] = (t + 2 * j) % E;
  for (bool hash : {false, true}) {
    std::vector<double> aff(T * E), w(T * K);
    std::vector<int64_t> idx(T * K);
    sqrt_softplus_rows<double>(s.data(), aff.data(), T * E);
    moe_route_rows<double>(aff.data(), bias.data(), hash ? hash_idx.data() : nullptr, T, E, K, 1.5, idx.data(),
                           w.data());
    const std::vector<int64_t> fixed = idx;  // selection held constant (it has no gradient)
    auto loss = [&] {
      std::vector<double> a(T * E), ww(T * K);
      std::vector<int64_t> ii(T * K);
      sqrt_softplus_rows<double>(s.data(), a.data(), T * E);
      moe_route_rows<double>(a.data(), nullptr, fixed.data(), T, E, K, 1.5, ii.data(), ww.data());
      double l = 0;
      for (int64_t n = 0; n < T * K; ++n) l += ww[n] * c[n];
      return l;
    };
    std::vector<double> daff(T * E, 0.0), ds(T * E);
    moe_route_backward_rows<double>(aff.data(), idx.data(), c.data(), T, E, K, 1.5, daff.data());
    sqrt_softplus_backward_rows<double>(s.data(), aff.data(), daff.data(), ds.data(), T * E);
    testing::fd_check_double(hash ? "router ds (hash)" : "router ds", s, ds, loss, 1e-6, 1e-7);
  }
}

TEST(MoE, BalanceLossDoubleCore) {
  // Uniform routing and equal affinities give exactly 1.
  {
    const std::vector<double> aff(2 * 4, 0.7);
    const std::vector<int64_t> idx = {0, 1, 2, 3};
    EXPECT_NEAR(moe_balance_term<double>(aff.data(), idx.data(), 1, 2, 4, 2), 1.0, 1e-15);
  }
  // All tokens on experts {0, 1} with all affinity there: f = (2, 2, 0, 0), P = (.5, .5, 0, 0) -> 2.
  {
    const std::vector<double> aff = {1, 1, 0, 0, 1, 1, 0, 0};
    const std::vector<int64_t> idx = {0, 1, 1, 0};
    EXPECT_NEAR(moe_balance_term<double>(aff.data(), idx.data(), 1, 2, 4, 2), 2.0, 1e-15);
  }
  // Gradient against finite differences (two rows: the term is averaged over rows), selection fixed.
  const int64_t B = 2, S = 4, E = 6, K = 2, T = B * S;
  std::mt19937 rng(9);
  std::uniform_real_distribution<double> u(-2, 2);
  std::vector<double> s(T * E), aff(T * E), w(T * K);
  for (auto& v : s) v = u(rng);
  std::vector<int64_t> idx(T * K);
  sqrt_softplus_rows<double>(s.data(), aff.data(), T * E);
  moe_route_rows<double>(aff.data(), nullptr, nullptr, T, E, K, 1.0, idx.data(), w.data());
  const double alpha = 0.37;
  auto loss = [&] {
    std::vector<double> a(T * E);
    sqrt_softplus_rows<double>(s.data(), a.data(), T * E);
    return alpha * moe_balance_term<double>(a.data(), idx.data(), B, S, E, K);
  };
  std::vector<double> daff(T * E, 0.0), ds(T * E);
  moe_balance_backward<double>(aff.data(), idx.data(), B, S, E, K, alpha, daff.data());
  sqrt_softplus_backward_rows<double>(s.data(), aff.data(), daff.data(), ds.data(), T * E);
  testing::fd_check_double("balance ds", s, ds, loss, 1e-6, 1e-8);
}

// ---- module finite differences (F32) -------------------------------------------------------------------------------

// Picks parameters and inputs (by seed) where every routed/shared pre-activation is at least `margin` from the
// clamp boundaries and no top-k selection is within `margin` of a tie, while clamps fire in both expert kinds.
struct FdCase {
  MoE m;
  Tensor x, ids;
};

FdCase make_fd_case(bool hash, const ModelConfig& c, int64_t T, double margin) {
  for (uint32_t seed = 100; seed < 400; ++seed) {
    std::mt19937 rng(seed);
    FdCase fc{MoE(hash ? "layers.0.ffn." : "layers.7.ffn.", c, hash), Tensor(), Tensor()};
    randomize(fc.m, rng);
    fc.x = random_tensor({T, c.dim}, rng);
    fc.ids = random_ids(T, c.vocab_size, rng);
    const Naive r = naive_forward(fc.m, fc.x, fc.ids, c.route_scale, c.swiglu_limit);
    if (r.clamp_margin > margin && r.topk_gap > margin && r.routed_clamped > 0 && r.shared_clamped > 0) return fc;
  }
  ADD_FAILURE() << "no seed gave a finite-difference-safe case";
  return {};
}

TEST(MoE, BackwardMatchesFiniteDifferences) {
  const double h = 1e-3;
  for (bool hash : {false, true}) {
    SCOPED_TRACE(hash ? "hash routing" : "learned routing");
    const ModelConfig c = small_config(8, 6, 2, 5, 0.8);
    const int64_t T = 10;
    FdCase fc = make_fd_case(hash, c, T, 4 * h);
    MoE& m = fc.m;
    const SeqLayout layout(2, 5);
    std::mt19937 rng(77);
    const Tensor dy = random_tensor({T, 8}, rng);
    MoECtx ctx;
    m.forward(fc.x, fc.ids, layout, &ctx);
    const Tensor dx = m.backward(dy, ctx, 0.0);
    auto loss = [&] { return dot(m.forward(fc.x, fc.ids, layout, nullptr), dy); };
    const double atol = 2e-3, rtol = 1e-2;
    testing::fd_check_tensor("dx", fc.x, dx, loss, h, atol, rtol, 40);
    testing::fd_check_tensor("gate.weight", m.gate_weight.value, m.gate_weight.grad, loss, h, atol, rtol, 40);
    int checked = 0;
    for (int64_t e = 0; e < m.n_experts() && checked < 3; ++e) {
      if (ctx.stats.load[static_cast<size_t>(e)] == 0) continue;
      ++checked;
      auto& ew = m.experts[static_cast<size_t>(e)];
      testing::fd_check_tensor(ew.w1.name, ew.w1.value, ew.w1.grad, loss, h, atol, rtol);
      testing::fd_check_tensor(ew.w2.name, ew.w2.value, ew.w2.grad, loss, h, atol, rtol);
      testing::fd_check_tensor(ew.w3.name, ew.w3.value, ew.w3.grad, loss, h, atol, rtol);
    }
    EXPECT_EQ(checked, 3);
    testing::fd_check_tensor("shared w1", m.shared.w1.value, m.shared.w1.grad, loss, h, atol, rtol);
    testing::fd_check_tensor("shared w2", m.shared.w2.value, m.shared.w2.grad, loss, h, atol, rtol);
    testing::fd_check_tensor("shared w3", m.shared.w3.value, m.shared.w3.grad, loss, h, atol, rtol);
  }
}

TEST(MoE, BalanceLossGradientMatchesFiniteDifferences) {
  const double h = 1e-3;
  const ModelConfig c = small_config(8, 6, 2, 5, 0.8);
  const int64_t T = 8;
  FdCase fc = make_fd_case(false, c, T, 4 * h);
  MoE& m = fc.m;
  const SeqLayout layout(2, 4);
  MoECtx ctx;
  m.forward(fc.x, fc.ids, layout, &ctx);
  EXPECT_GT(ctx.stats.balance_term, 0.0);
  // Balance loss alone: dy = 0, alpha = 1.
  const Tensor dx = m.backward(Tensor::zeros({T, 8}, DType::F32), ctx, 1.0);
  for (float v : m.experts[0].w1.grad_buffer().to_floats()) EXPECT_EQ(v, 0.0f);
  auto loss = [&] {
    MoEStats st;
    m.forward(fc.x, fc.ids, layout, nullptr, &st);
    return st.balance_loss(1.0);
  };
  testing::fd_check_tensor("balance dx", fc.x, dx, loss, h, 2e-5, 2e-2, 40);
  testing::fd_check_tensor("balance gate.weight", m.gate_weight.value, m.gate_weight.grad, loss, h, 2e-5, 2e-2, 48);
  // Combined: <dy, y> + alpha * term is the sum of the two gradients.
  const Tensor g_bal = m.gate_weight.grad.clone();
  std::mt19937 rng(3);
  const Tensor dy = random_tensor({T, 8}, rng);
  m.gate_weight.zero_grad();
  const Tensor dx_lm = m.backward(dy, ctx, 0.0);
  const Tensor g_lm = m.gate_weight.grad.clone();
  m.gate_weight.zero_grad();
  const Tensor dx_both = m.backward(dy, ctx, 0.5);
  const auto a = dx_both.to_floats(), b = dx_lm.to_floats(), d = dx.to_floats();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i] + 0.5 * d[i], 1e-6);
  const auto ga = m.gate_weight.grad.to_floats(), gl = g_lm.to_floats(), gb = g_bal.to_floats();
  for (size_t i = 0; i < ga.size(); ++i) EXPECT_NEAR(ga[i], gl[i] + 0.5 * gb[i], 1e-6);
}

TEST(MoE, BackwardAccumulatesAndRespectsTrainable) {
  const ModelConfig c = small_config();
  MoE m("layers.6.ffn.", c, false);
  std::mt19937 rng(8);
  randomize(m, rng);
  const Tensor x = random_tensor({6, 8}, rng), dy = random_tensor({6, 8}, rng);
  MoECtx ctx;
  m.forward(x, Tensor(), SeqLayout(1, 6), &ctx);
  m.backward(dy, ctx, 0.1);
  const Tensor g1 = m.gate_weight.grad.clone(), s1 = m.shared.w2.grad.clone();
  m.backward(dy, ctx, 0.1);
  const auto a = g1.to_floats(), a2 = m.gate_weight.grad.to_floats();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a2[i], 2 * a[i], 1e-6);
  const auto b = s1.to_floats(), b2 = m.shared.w2.grad.to_floats();
  for (size_t i = 0; i < b.size(); ++i) EXPECT_NEAR(b2[i], 2 * b[i], 1e-6);
  // Frozen gate: no gradient, but dx is unchanged.
  m.visit([](Param& p) { p.zero_grad(); });
  const Tensor dx = m.backward(dy, ctx, 0.1);
  m.gate_weight.trainable = false;
  m.shared.w1.trainable = false;
  m.gate_weight.zero_grad();
  m.shared.w1.zero_grad();
  const Tensor dx2 = m.backward(dy, ctx, 0.1);
  for (float v : m.gate_weight.grad.to_floats()) EXPECT_EQ(v, 0.0f);
  for (float v : m.shared.w1.grad.to_floats()) EXPECT_EQ(v, 0.0f);
  EXPECT_EQ(dx.to_floats(), dx2.to_floats());
}

// ---- parameters --------------------------------------------------------------------------------------------------

TEST(MoE, VisitsNativeParameterNames) {
  const ModelConfig c = small_config(8, 3, 2, 5);
  for (bool hash : {false, true}) {
    MoE m(hash ? "layers.0.ffn." : "mtp.0.ffn.", c, hash);
    std::vector<std::string> names;
    m.visit([&](Param& p) {
      names.push_back(p.name);
      if (p.name.ends_with("gate.bias")) {
        EXPECT_FALSE(p.trainable);
        EXPECT_EQ(p.value.shape(), (Shape{3}));
      } else if (p.name.ends_with("gate.tid2eid")) {
        EXPECT_FALSE(p.trainable);
        EXPECT_EQ(p.value.dtype(), DType::I64);
        EXPECT_EQ(p.value.shape(), (Shape{16, 2}));
      } else {
        EXPECT_TRUE(p.trainable) << p.name;
      }
    });
    const std::string pre = hash ? "layers.0.ffn." : "mtp.0.ffn.";
    std::vector<std::string> want = {pre + "gate.weight", pre + (hash ? "gate.tid2eid" : "gate.bias")};
    for (int e = 0; e < 3; ++e)
      for (const char* w : {"w1", "w2", "w3"})
        want.push_back(pre + "experts." + std::to_string(e) + "." + w + ".weight");
    for (const char* w : {"w1", "w2", "w3"}) want.push_back(pre + "shared_experts." + w + ".weight");
    EXPECT_EQ(names, want);
    EXPECT_EQ(m.experts[1].w2.value.shape(), (Shape{8, 5}));
    EXPECT_EQ(m.experts[1].w1.value.shape(), (Shape{5, 8}));
  }
}

}  // namespace
}  // namespace dsv4
