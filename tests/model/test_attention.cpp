// DeepSeek-V4 attention (SWA / CSA / HCA): the sparse implementation against a naive dense-mask reference in
// double precision, causality, packed documents, the release-quant simulation, and gradients (double-precision
// finite differences of the templated cores; F32 finite differences of the whole module).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <functional>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

#include "fd_check.h"
#include "model/attention.h"
#include "model/quant_sim.h"
#include "runtime/dtype.h"

namespace dsv4 {
namespace {

using testing::dot;
using testing::random_tensor;

constexpr int64_t kSwa = 0, kCsa = 1, kHca = 2;  // layers of the tiny preset: ratios 0, 4, 8

// ---- helpers -------------------------------------------------------------------------------------------------
void randomize(Attention& a, std::mt19937& rng) {
  a.visit([&](Param& p) {
    const std::string& n = p.name;
    float lo = -1, hi = 1;
    if (n.ends_with("norm.weight")) lo = 0.8f, hi = 1.2f;
    else if (n.ends_with("ape")) lo = -0.5f, hi = 0.5f;
    else if (n.ends_with("attn_sink")) lo = -1.0f, hi = 1.0f;
    else {  // linear weights [out, in]
      const float s = 1.0f / std::sqrt(static_cast<float>(p.value.size(1)));
      lo = -s, hi = s;
    }
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(static_cast<size_t>(p.value.numel()));
    for (float& x : v) x = u(rng);
    p.value = Tensor::from_floats(p.value.shape(), v);
  });
}

std::map<std::string, Tensor> grads_of(Attention& a) {
  std::map<std::string, Tensor> g;
  a.visit([&](Param& p) {
    if (p.grad.defined()) g[p.name] = p.grad.clone();
  });
  return g;
}

void zero_grads(Attention& a) {
  a.visit([](Param& p) { p.zero_grad(); });
}

void expect_close(const std::vector<float>& a, const std::vector<float>& b, double tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double scale = 0;
  for (float v : b) scale = std::max(scale, static_cast<double>(std::abs(v)));
  int bad = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::abs(static_cast<double>(a[i]) - b[i]) > tol * std::max(1.0, scale) && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
  EXPECT_EQ(bad, 0) << what;
}

Tensor rows_of(const Tensor& x, int64_t r0, int64_t r1) { return x.slice(0, r0, r1).contiguous().clone(); }

// ---- naive dense reference in double precision ----------------------------------------------------------------
using Vec = std::vector<double>;

struct RefInfo {
  std::vector<std::vector<double>> index_scores;  // [T][visible entries of t's document, in block order]
  double min_topk_gap = std::numeric_limits<double>::infinity();  // k-th vs (k+1)-th score, relative
  int64_t pruned_queries = 0;                                      // queries with more visible entries than top-k
};

struct RefParams {
  std::map<std::string, Vec> v;
  std::string prefix;
  const Vec& operator()(const std::string& n) const { return v.at(prefix + n); }
};

RefParams collect(Attention& a, const std::string& prefix) {
  RefParams p;
  p.prefix = prefix;
  a.visit([&](Param& q) {
    const auto f = q.value.to_floats();
    p.v[q.name] = Vec(f.begin(), f.end());
  });
  return p;
}

Vec ref_linear(const Vec& x, int64_t T, int64_t in, const Vec& W) {
  const int64_t out = static_cast<int64_t>(W.size()) / in;
  Vec y(static_cast<size_t>(T * out), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) s += x[t * in + i] * W[o * in + i];
      y[t * out + o] = s;
    }
  return y;
}

void ref_rmsnorm(Vec& x, int64_t rows, int64_t dim, const Vec* w, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
    const double rstd = 1.0 / std::sqrt(ss / dim + eps);
    for (int64_t i = 0; i < dim; ++i) x[r * dim + i] *= rstd * (w ? (*w)[i] : 1.0);
  }
}

// Documents of a layout, found independently of CompressPlan: (row, start, end) in sequence indices.
struct Doc {
  int64_t row, s0, s1;
};
std::vector<Doc> ref_docs(const SeqLayout& L) {
  std::vector<Doc> docs;
  for (int64_t b = 0; b < L.batch; ++b) {
    std::vector<int64_t> starts;
    for (int64_t s = 0; s < L.seq; ++s)
      if (s == 0 || (L.packed() && L.doc_start[b * L.seq + s] == s)) starts.push_back(s);
    for (size_t i = 0; i < starts.size(); ++i)
      docs.push_back({b, starts[i], i + 1 < starts.size() ? starts[i + 1] : L.seq});
  }
  return docs;
}

struct RefEntry {
  int64_t row, s0, block;  // document (row, start) and block index within it
  Vec kv;
};

// Compressor by its definition: per document, per block, per channel softmax pooling over the slots.
std::vector<RefEntry> ref_compress(const RefParams& P, const std::string& pre, const Vec& x, const SeqLayout& L,
                                   int64_t D, int64_t m, int64_t C, double eps, const RopeTable& rope) {
  const int64_t T = L.tokens(), W = (m == 4 ? 2 : 1) * C;
  const Vec kv = ref_linear(x, T, D, P(pre + "wkv.weight")), gate = ref_linear(x, T, D, P(pre + "wgate.weight"));
  const Vec& ape = P(pre + "ape");
  std::vector<RefEntry> out;
  for (const Doc& d : ref_docs(L)) {
    for (int64_t i = 0; i < (d.s1 - d.s0) / m; ++i) {
      RefEntry e{d.row, d.s0, i, Vec(static_cast<size_t>(C))};
      for (int64_t ch = 0; ch < C; ++ch) {
        std::vector<std::pair<double, double>> slots;  // (logit, value)
        const int64_t base = d.row * L.seq + d.s0 + i * m;
        if (m == 4) {
          if (i > 0)
            for (int64_t j = 0; j < m; ++j)
              slots.push_back({gate[(base - m + j) * W + ch] + ape[j * W + ch], kv[(base - m + j) * W + ch]});
          for (int64_t j = 0; j < m; ++j)
            slots.push_back({gate[(base + j) * W + C + ch] + ape[j * W + C + ch], kv[(base + j) * W + C + ch]});
        } else {
          for (int64_t j = 0; j < m; ++j) slots.push_back({gate[(base + j) * W + ch] + ape[j * W + ch], kv[(base + j) * W + ch]});
        }
        double mx = -1e300, z = 0, acc = 0;
        for (auto& s : slots) mx = std::max(mx, s.first);
        for (auto& s : slots) z += std::exp(s.first - mx);
        for (auto& s : slots) acc += std::exp(s.first - mx) / z * s.second;
        e.kv[static_cast<size_t>(ch)] = acc;
      }
      ref_rmsnorm(e.kv, 1, C, &P(pre + "norm.weight"), eps);
      const int64_t p = i * m;
      rope_rows<double>(e.kv.data(), 1, C, C, &p, rope, false);
      out.push_back(std::move(e));
    }
  }
  return out;
}

// The whole module by its definition with a dense [T, T + E] mask and an explicit sink column.
std::vector<float> reference_attention(Attention& a, const ModelConfig& cfg, const std::string& prefix,
                                       const Tensor& x_TD, const SeqLayout& L, RefInfo* info) {
  const RefParams P = collect(a, prefix);
  const auto xf = x_TD.to_floats();
  const Vec x(xf.begin(), xf.end());
  const int64_t T = L.tokens(), S = L.seq, D = cfg.dim, H = cfg.n_heads, C = cfg.head_dim, Q = cfg.q_lora_rank;
  const int64_t m = a.ratio(), G = cfg.o_groups, R = cfg.o_lora_rank, HC = H * C;
  const double eps = cfg.norm_eps;
  const RopeTable& rope = a.rope();
  // doc start (sequence index) and position of every token
  std::vector<int64_t> dstart(static_cast<size_t>(T)), pos(static_cast<size_t>(T));
  for (const Doc& d : ref_docs(L))
    for (int64_t s = d.s0; s < d.s1; ++s) dstart[d.row * S + s] = d.s0, pos[d.row * S + s] = s - d.s0;

  Vec qr = ref_linear(x, T, D, P("wq_a.weight"));
  ref_rmsnorm(qr, T, Q, &P("q_norm.weight"), eps);
  Vec q = ref_linear(qr, T, Q, P("wq_b.weight"));
  ref_rmsnorm(q, T * H, C, nullptr, eps);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) rope_rows<double>(q.data() + (t * H + h) * C, 1, C, C, &pos[t], rope, false);
  Vec kv = ref_linear(x, T, D, P("wkv.weight"));
  ref_rmsnorm(kv, T, C, &P("kv_norm.weight"), eps);
  for (int64_t t = 0; t < T; ++t) rope_rows<double>(kv.data() + t * C, 1, C, C, &pos[t], rope, false);

  std::vector<RefEntry> ent;
  if (m > 0) ent = ref_compress(P, "compressor.", x, L, D, m, C, eps, rope);
  const int64_t E = static_cast<int64_t>(ent.size());
  auto entry_visible = [&](int64_t t, int64_t e) {  // same document and whole block <= t
    const RefEntry& en = ent[e];
    const int64_t b = t / S, s = t % S;
    return en.row == b && en.s0 == dstart[t] && en.s0 + (en.block + 1) * m - 1 <= s;
  };
  std::vector<std::vector<uint8_t>> selected(static_cast<size_t>(T), std::vector<uint8_t>(static_cast<size_t>(E), 0));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) selected[t][e] = entry_visible(t, e);

  if (m == 4) {  // lightning indexer, dense
    const int64_t nI = cfg.index_n_heads, cI = cfg.index_head_dim;
    const std::vector<RefEntry> ki = ref_compress(P, "indexer.compressor.", x, L, D, 4, cI, eps, rope);
    Vec qi = ref_linear(qr, T, Q, P("indexer.wq_b.weight"));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < nI; ++h) rope_rows<double>(qi.data() + (t * nI + h) * cI, 1, cI, cI, &pos[t], rope, false);
    const Vec w = ref_linear(x, T, D, P("indexer.weights_proj.weight"));
    if (info) info->index_scores.assign(static_cast<size_t>(T), {});
    for (int64_t t = 0; t < T; ++t) {
      std::vector<std::pair<double, int64_t>> sc;  // (score, entry)
      for (int64_t e = 0; e < E; ++e) {
        if (!entry_visible(t, e)) continue;
        double s = 0;
        for (int64_t h = 0; h < nI; ++h) {
          double d = 0;
          for (int64_t c = 0; c < cI; ++c) d += qi[(t * nI + h) * cI + c] * ki[e].kv[c];
          s += w[t * nI + h] / std::sqrt(static_cast<double>(nI)) * std::max(d, 0.0) / std::sqrt(static_cast<double>(cI));
        }
        sc.push_back({s, e});
        if (info) info->index_scores[t].push_back(s);
      }
      std::stable_sort(sc.begin(), sc.end(), [](auto& a1, auto& b1) { return a1.first > b1.first; });
      const size_t k = std::min(static_cast<size_t>(cfg.index_topk), sc.size());
      if (info && k < sc.size()) {
        ++info->pruned_queries;
        double scale = 1e-30;
        for (auto& s : sc) scale = std::max(scale, std::abs(s.first));
        // Exact ties at 0 (every head's ReLU clipped) are resolved by the lower entry id in both; other ties
        // would make FP32 vs FP64 selection a coin toss.
        if (!(sc[k - 1].first == 0.0 && sc[k].first == 0.0))
          info->min_topk_gap = std::min(info->min_topk_gap, (sc[k - 1].first - sc[k].first) / scale);
      }
      for (size_t j = k; j < sc.size(); ++j) selected[t][sc[j].second] = 0;
    }
  }

  // Dense masked softmax with the sink column.
  Vec o(static_cast<size_t>(T * HC), 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(C));
  const auto& sink = P("attn_sink");
  for (int64_t t = 0; t < T; ++t) {
    const int64_t b = t / S, s = t % S;
    for (int64_t h = 0; h < H; ++h) {
      std::vector<std::pair<double, const double*>> cand;  // (logit, value row)
      for (int64_t j = 0; j < T; ++j) {
        const int64_t bj = j / S, sj = j % S;
        const bool vis = bj == b && sj <= s && sj > s - cfg.window_size && sj >= dstart[t];
        if (!vis) continue;
        double z = 0;
        for (int64_t c = 0; c < C; ++c) z += q[(t * H + h) * C + c] * kv[j * C + c];
        cand.push_back({z * scale, kv.data() + j * C});
      }
      for (int64_t e = 0; e < E; ++e) {
        if (!selected[t][e]) continue;
        double z = 0;
        for (int64_t c = 0; c < C; ++c) z += q[(t * H + h) * C + c] * ent[e].kv[c];
        cand.push_back({z * scale, ent[e].kv.data()});
      }
      double mx = sink[h];
      for (auto& c : cand) mx = std::max(mx, c.first);
      double z = std::exp(sink[h] - mx);
      for (auto& c : cand) z += std::exp(c.first - mx);
      for (auto& c : cand)
        for (int64_t d = 0; d < C; ++d) o[(t * H + h) * C + d] += std::exp(c.first - mx) / z * c.second[d];
    }
    for (int64_t h = 0; h < H; ++h) rope_rows<double>(o.data() + (t * H + h) * C, 1, C, C, &pos[t], rope, true);
  }
  // Grouped wo_a, then wo_b.
  const Vec& wa = P("wo_a.weight");
  const int64_t K = HC / G;
  Vec y(static_cast<size_t>(T * G * R), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < R; ++r) {
        double sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += o[t * HC + g * K + k] * wa[(g * R + r) * K + k];
        y[t * G * R + g * R + r] = sum;
      }
  const Vec out = ref_linear(y, T, G * R, P("wo_b.weight"));
  return std::vector<float>(out.begin(), out.end());
}

std::string layer_prefix(int64_t layer) { return "layers." + std::to_string(layer) + ".attn."; }

struct Fixture {
  ModelConfig cfg = model_preset("tiny");
  int64_t layer;
  Attention attn;
  explicit Fixture(int64_t l, uint32_t seed = 11, AttentionOptions opts = {})
      : layer(l), attn(layer_prefix(l), cfg, l, opts) {
    std::mt19937 rng(seed);
    randomize(attn, rng);
  }
};

// ---- core attention with sink ---------------------------------------------------------------------------------
TEST(SparseAttention, DoublePrecisionFiniteDifferences) {
  const int64_t Tq = 5, Tk = 7, E = 4, H = 3, C = 6;
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(-1, 1);
  auto rnd = [&](int64_t n) {
    std::vector<double> v(static_cast<size_t>(n));
    for (auto& x : v) x = u(rng);
    return v;
  };
  std::vector<double> q = rnd(Tq * H * C), kv = rnd(Tk * C), ckv = rnd(E * C), sink = rnd(H), w = rnd(Tq * H * C);
  for (auto& v : q) v *= 2;  // sharper softmax
  SparseAttnIndex idx;
  idx.win_begin = {0, 0, 1, 3, 6};
  idx.win_end = {1, 3, 4, 7, 7};
  idx.comp_offsets = {0, 0, 1, 3, 3, 6};
  idx.comp_ids = {2, 0, 3, 0, 1, 3};  // query 3 has none; entry 2 used once, 0/3 twice
  idx.validate(Tk, E);
  const double scale = 1.0 / std::sqrt(static_cast<double>(C));
  auto forward = [&](std::vector<double>& o, std::vector<double>& lse) {
    o.assign(static_cast<size_t>(Tq * H * C), 0);
    lse.assign(static_cast<size_t>(Tq * H), 0);
    sparse_attn_forward<double>(idx, q.data(), kv.data(), ckv.data(), sink.data(), H, C, scale, o.data(), lse.data());
  };
  auto loss = [&] {
    std::vector<double> o, lse;
    forward(o, lse);
    double s = 0;
    for (size_t i = 0; i < o.size(); ++i) s += o[i] * w[i];
    return s;
  };
  std::vector<double> o, lse;
  forward(o, lse);
  // lse against its definition for query 1, head 2 (window keys 0..2, entry 2)
  {
    double z = std::exp(sink[2]);
    auto zz = [&](const double* k) {
      double d = 0;
      for (int64_t c = 0; c < C; ++c) d += q[(1 * H + 2) * C + c] * k[c];
      return d * scale;
    };
    for (int j = 0; j < 3; ++j) z += std::exp(zz(kv.data() + j * C));
    z += std::exp(zz(ckv.data() + 2 * C));
    EXPECT_NEAR(lse[1 * H + 2], std::log(z), 1e-12);
  }
  std::vector<double> dq(q.size()), dkv(kv.size(), 0.0), dckv(ckv.size(), 0.0), dsink(sink.size(), 0.0);
  sparse_attn_backward<double>(idx, q.data(), kv.data(), ckv.data(), sink.data(), o.data(), lse.data(), w.data(), H, C,
                               scale, dq.data(), dkv.data(), dckv.data(), dsink.data());
  testing::fd_check_double("attn dq", q, dq, loss);
  testing::fd_check_double("attn dkv", kv, dkv, loss);
  testing::fd_check_double("attn dckv", ckv, dckv, loss);
  testing::fd_check_double("attn dsink", sink, dsink, loss);
}

// ---- compressor pooling ---------------------------------------------------------------------------------------
void pool_fd(int64_t m, bool overlap) {
  const int64_t C = 3, W = (overlap ? 2 : 1) * C, T = 4 * m + 1;
  std::mt19937 rng(static_cast<uint32_t>(5 + m));
  std::uniform_real_distribution<double> u(-2, 2);
  auto rnd = [&](int64_t n) {
    std::vector<double> v(static_cast<size_t>(n));
    for (auto& x : v) x = u(rng);
    return v;
  };
  std::vector<double> kv = rnd(T * W), gate = rnd(T * W), ape = rnd(m * W);
  // Two documents: [0, 2m) and [2m + 1, 4m + 1) -> entries at tokens 0, m (has prev) and 2m+1, 3m+1 (has prev).
  const std::vector<int64_t> tok = {0, m, 2 * m + 1, 3 * m + 1};
  const std::vector<uint8_t> has_prev = {0, 1, 0, 1};
  const int64_t E = 4;
  const std::vector<double> w = rnd(E * C);
  auto loss = [&] {
    std::vector<double> out(static_cast<size_t>(E * C));
    compress_pool_forward<double>(kv.data(), gate.data(), ape.data(), tok.data(), has_prev.data(), E, m, C, overlap,
                                  out.data());
    double s = 0;
    for (size_t i = 0; i < out.size(); ++i) s += out[i] * w[i];
    return s;
  };
  std::vector<double> dkv(kv.size(), 0.0), dgate(gate.size(), 0.0), dape(ape.size(), 0.0);
  compress_pool_backward<double>(kv.data(), gate.data(), ape.data(), tok.data(), has_prev.data(), E, m, C, overlap,
                                 w.data(), dkv.data(), dgate.data(), dape.data());
  const std::string tag = "m=" + std::to_string(m) + " ";
  testing::fd_check_double(tag + "pool dkv", kv, dkv, loss);
  testing::fd_check_double(tag + "pool dgate", gate, dgate, loss);
  testing::fd_check_double(tag + "pool dape", ape, dape, loss);
  // Token 2m (between the documents) feeds nothing.
  for (int64_t c = 0; c < W; ++c) {
    EXPECT_EQ(dkv[2 * m * W + c], 0.0);
    EXPECT_EQ(dgate[2 * m * W + c], 0.0);
  }
}

TEST(Compressor, PoolDoublePrecisionFiniteDifferencesOverlapping) { pool_fd(4, true); }
TEST(Compressor, PoolDoublePrecisionFiniteDifferencesHeavy) { pool_fd(8, false); }

TEST(Compressor, PlanAlignsBlocksToDocuments) {
  SeqLayout L(2, 11);
  L.doc_start.assign(22, 0);
  for (int64_t s = 3; s < 11; ++s) L.doc_start[s] = 3;  // row 0: docs [0,3) [3,11); row 1: one doc
  const CompressPlan p = CompressPlan::build(L, 4);
  // row 0 doc A (3 tokens): none; doc B (8 tokens): blocks at 3, 7; row 1 (11 tokens): blocks at 11, 15.
  EXPECT_EQ(p.entry_token, (std::vector<int64_t>{3, 7, 11, 15}));
  EXPECT_EQ(p.entry_pos, (std::vector<int64_t>{0, 4, 0, 4}));
  EXPECT_EQ(p.entry_has_prev, (std::vector<uint8_t>{0, 1, 0, 1}));
  EXPECT_EQ(p.n_visible[2], 0);
  EXPECT_EQ(p.n_visible[5], 0);   // doc position 2
  EXPECT_EQ(p.n_visible[6], 1);   // doc position 3: block [3, 7) complete
  EXPECT_EQ(p.n_visible[10], 2);  // doc position 7
  EXPECT_EQ(p.first_entry[10], 0);
  EXPECT_EQ(p.first_entry[11], 2);
  EXPECT_EQ(p.n_visible[21], 2);  // row 1 position 10: blocks 0, 1 (block 2 incomplete)
}

// ---- indexer top-k ---------------------------------------------------------------------------------------------------
TEST(Indexer, TopKKeepsTheBestVisibleEntriesWithTiesToTheLowerId) {
  // Two documents of one row: tokens 0..5 see entries 10.. (first_entry 10), tokens 6..7 see entries 20...
  CompressPlan plan;
  plan.ratio = 4;
  plan.first_entry = {10, 10, 10, 10, 10, 10, 20, 20};
  plan.n_visible = {0, 1, 2, 3, 4, 5, 0, 3};
  IndexScores s;
  s.offsets = {0};
  const std::vector<std::vector<float>> v = {{}, {0.5f}, {1.0f, 2.0f}, {0.0f, 0.0f, 0.0f}, {3.0f, 1.0f, 3.0f, 2.0f},
                                             {-1.0f, 4.0f, 4.0f, 4.0f, 0.0f}, {}, {0.0f, 7.0f, 0.0f}};
  for (const auto& row : v) {
    s.values.insert(s.values.end(), row.begin(), row.end());
    s.offsets.push_back(static_cast<int64_t>(s.values.size()));
  }
  std::vector<int64_t> off, ids;
  Indexer::select_topk(s, plan, 2, off, ids);
  EXPECT_EQ(off, (std::vector<int64_t>{0, 0, 1, 3, 5, 7, 9, 9, 11}));
  EXPECT_EQ(ids, (std::vector<int64_t>{10,           // all of 1
                                       10, 11,       // all of 2
                                       10, 11,       // ties at 0 -> lowest ids
                                       10, 12,       // 3, 3 beat 2
                                       11, 12,       // three 4s -> the two lowest ids, ascending
                                       20, 21}));    // 7, then the lower of two 0s
}

// ---- Hadamard and fake quantisation -----------------------------------------------------------------------------
TEST(Hadamard, MatchesSylvesterMatrixAndIsAnInvolution) {
  const int64_t n = 8;
  std::vector<double> x = {1, -2, 3, 0.5, -1, 4, 2, -3}, y = x;
  hadamard_rows<double>(y.data(), 1, n, n);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t j = 0; j < n; ++j) s += ((std::popcount(static_cast<uint64_t>(i & j)) % 2) ? -1.0 : 1.0) * x[j];
    EXPECT_NEAR(y[i], s / std::sqrt(8.0), 1e-12);
  }
  hadamard_rows<double>(y.data(), 1, n, n);
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(y[i], x[i], 1e-12);
  EXPECT_THROW(hadamard_rows<double>(y.data(), 1, 6, 6), Error);
}

TEST(QuantSim, Fp8BlockFakeQuant) {
  // ue8m0: amax 448 -> scale 1; amax 100 -> 2^ceil(log2(100/448)) = 0.25; tiny amax floors at 1e-4.
  EXPECT_EQ(fp8_block_scale(448.0f, true), 1.0f);
  EXPECT_EQ(fp8_block_scale(100.0f, true), 0.25f);
  EXPECT_EQ(fp8_block_scale(0.0f, true), e8m0_to_f32(e8m0_ceil_from_f32(1e-4f * static_cast<float>(1.0 / 448.0))));
  EXPECT_FLOAT_EQ(fp8_block_scale(224.0f, false), 0.5f);
  // Row of 6 with blocks of 4 (+ a partial block of 2): values land on E4M3 * scale.
  std::vector<float> v = {448.0f, 1.1f, -3.3f, 0.01f, 100.0f, 7.0f};
  fp8_block_fake_quant_rows(v.data(), 1, 6, 6, 4, true);
  EXPECT_EQ(v[0], 448.0f);
  EXPECT_EQ(v[1], e4m3_to_f32(f32_to_e4m3(1.1f)));
  EXPECT_EQ(v[2], e4m3_to_f32(f32_to_e4m3(-3.3f)));
  EXPECT_EQ(v[3], e4m3_to_f32(f32_to_e4m3(0.01f)));
  EXPECT_EQ(v[4], 96.0f);                                    // 400 is a tie between 384 and 416 -> 384
  EXPECT_EQ(v[5], e4m3_to_f32(f32_to_e4m3(28.0f)) * 0.25f);  // 7 / 0.25 = 28
}

TEST(QuantSim, Fp4BlockFakeQuant) {
  EXPECT_EQ(fp4_block_scale(6.0f), 1.0f);
  EXPECT_EQ(fp4_block_scale(5.0f), 1.0f);
  EXPECT_EQ(fp4_block_scale(7.0f), 2.0f);
  std::vector<float> v = {6.0f, 2.4f, 2.5f, -0.3f, 0.7f, -5.1f};
  fp4_block_fake_quant_rows(v.data(), 1, 6, 6, 32);
  EXPECT_EQ(v, (std::vector<float>{6.0f, 2.0f, 2.0f, -0.5f, 0.5f, -6.0f}));  // RNE on the E2M1 grid
}

// ---- module against the dense reference --------------------------------------------------------------------------
void check_against_reference(int64_t layer, const SeqLayout& L, uint32_t seed) {
  Fixture f(layer, seed);
  std::mt19937 rng(seed + 100);
  const Tensor x = random_tensor({L.tokens(), f.cfg.dim}, rng);
  AttentionCtx ctx;
  const Tensor out = f.attn.forward(x, L, &ctx);
  RefInfo info;
  const auto ref = reference_attention(f.attn, f.cfg, layer_prefix(layer), x, L, &info);
  expect_close(out.to_floats(), ref, 2e-5, "attention layer " + std::to_string(layer));
  if (f.attn.has_indexer()) {
    // CSA must actually prune, far enough from ties that FP32 and FP64 select the same entries.
    EXPECT_GT(info.pruned_queries, 0);
    EXPECT_GT(info.min_topk_gap, 1e-4);
    int64_t pruned = 0;
    for (int64_t t = 0; t < L.tokens(); ++t) {
      const int64_t n = ctx.index.comp_offsets[t + 1] - ctx.index.comp_offsets[t];
      EXPECT_EQ(n, std::min<int64_t>(f.cfg.index_topk, ctx.plan.n_visible[t]));
      pruned += ctx.plan.n_visible[t] > f.cfg.index_topk;
    }
    EXPECT_EQ(pruned, info.pruned_queries);
    // Index scores themselves.
    const Tensor qr = f.attn.q_norm.forward(f.attn.wq_a.forward(x, nullptr), nullptr);
    const IndexScores s = f.attn.indexer.scores(x, qr, ctx.pos, ctx.plan, f.attn.rope());
    for (int64_t t = 0; t < L.tokens(); ++t) {
      ASSERT_EQ(static_cast<size_t>(s.offsets[t + 1] - s.offsets[t]), info.index_scores[t].size()) << t;
      for (size_t e = 0; e < info.index_scores[t].size(); ++e)
        EXPECT_NEAR(s.values[s.offsets[t] + e], info.index_scores[t][e], 1e-5) << t << " " << e;
    }
  }
  if (f.attn.has_compressor()) {
    EXPECT_GT(ctx.plan.entries(), 0);
  }
}

// 27 tokens: not a multiple of 4 or 8; > window 8; CSA sees up to 6 entries (> index_topk 2), HCA up to 3.
TEST(Attention, SlidingWindowMatchesDenseReference) { check_against_reference(kSwa, SeqLayout(2, 27), 1); }
TEST(Attention, CompressedSparseMatchesDenseReference) { check_against_reference(kCsa, SeqLayout(2, 27), 2); }
TEST(Attention, HeavilyCompressedMatchesDenseReference) { check_against_reference(kHca, SeqLayout(2, 27), 3); }

SeqLayout three_docs() {  // one row of 32: documents [0, 5), [5, 18), [18, 32)
  SeqLayout L(1, 32);
  L.doc_start.resize(32);
  for (int64_t s = 0; s < 32; ++s) L.doc_start[s] = s < 5 ? 0 : s < 18 ? 5 : 18;
  return L;
}

TEST(Attention, PackedDocumentsMatchDenseReference) {
  check_against_reference(kSwa, three_docs(), 4);
  check_against_reference(kCsa, three_docs(), 5);
  check_against_reference(kHca, three_docs(), 6);
}

TEST(Attention, SequencesShorterThanABlockHaveNoCompressedEntries) {
  for (int64_t layer : {kCsa, kHca}) {
    for (int64_t seq : {1, 3}) {
      Fixture f(layer, 7);
      const SeqLayout L(2, seq);
      std::mt19937 rng(5);
      const Tensor x = random_tensor({L.tokens(), f.cfg.dim}, rng), dy = random_tensor({L.tokens(), f.cfg.dim}, rng);
      AttentionCtx ctx;
      const Tensor out = f.attn.forward(x, L, &ctx);
      EXPECT_EQ(ctx.plan.entries(), 0);
      EXPECT_TRUE(ctx.index.comp_ids.empty());
      expect_close(out.to_floats(), reference_attention(f.attn, f.cfg, layer_prefix(layer), x, L, nullptr), 2e-5,
                   "short sequence");
      const Tensor dx = f.attn.backward(dy, ctx);
      for (float v : dx.to_floats()) EXPECT_TRUE(std::isfinite(v));
      f.attn.visit([](Param& p) {  // every trainable parameter has a (here zero for the compressor) gradient
        EXPECT_EQ(p.grad.defined(), p.trainable) << p.name;
      });
    }
  }
}

// ---- causality ------------------------------------------------------------------------------------------------------
TEST(Attention, CausalForEveryKind) {
  for (int64_t layer : {kSwa, kCsa, kHca}) {
    Fixture f(layer, 21);
    const SeqLayout L(2, 27);
    std::mt19937 rng(7);
    const Tensor x = random_tensor({L.tokens(), f.cfg.dim}, rng);
    const auto base = f.attn.forward(x, L, nullptr).to_floats();
    // Cut points inside and at the ends of compressor blocks (ratio 4 and 8).
    for (int64_t t0 : {1, 3, 4, 7, 8, 12, 15, 16, 23, 24, 26}) {
      Tensor x2 = x.clone();
      const Tensor noise = random_tensor({27 - t0, f.cfg.dim}, rng, 3.0f);
      x2.slice(0, t0, 27).copy_from(noise);  // row 0, positions >= t0
      const auto out = f.attn.forward(x2, L, nullptr).to_floats();
      const int64_t D = f.cfg.dim;
      bool earlier_same = true, later_changed = false, other_row_same = true;
      for (int64_t t = 0; t < 27; ++t)
        for (int64_t d = 0; d < D; ++d) {
          const bool same = out[t * D + d] == base[t * D + d];
          if (t < t0) earlier_same &= same;
          else later_changed |= !same;
        }
      for (int64_t i = 27 * D; i < 54 * D; ++i) other_row_same &= out[i] == base[i];
      EXPECT_TRUE(earlier_same) << "layer " << layer << ": changing tokens >= " << t0 << " changed an earlier output";
      EXPECT_TRUE(later_changed) << "layer " << layer << " t0 " << t0;
      EXPECT_TRUE(other_row_same) << "layer " << layer << " t0 " << t0;
    }
  }
}

// ---- packed documents == separate runs ----------------------------------------------------------------------------
TEST(Attention, PackedDocumentsEqualSeparateRuns) {
  for (int64_t layer : {kSwa, kCsa, kHca}) {
    Fixture f(layer, 31);
    const SeqLayout packed = three_docs();
    const int64_t D = f.cfg.dim;
    std::mt19937 rng(9);
    const Tensor x = random_tensor({32, D}, rng), dy = random_tensor({32, D}, rng);
    zero_grads(f.attn);
    AttentionCtx ctx;
    const Tensor out = f.attn.forward(x, packed, &ctx);
    const Tensor dx = f.attn.backward(dy, ctx);
    const auto g_packed = grads_of(f.attn);
    zero_grads(f.attn);
    const std::vector<std::pair<int64_t, int64_t>> docs = {{0, 5}, {5, 18}, {18, 32}};
    for (auto [s0, s1] : docs) {
      const SeqLayout one(1, s1 - s0);
      AttentionCtx c1;
      const Tensor o1 = f.attn.forward(rows_of(x, s0, s1), one, &c1);
      const Tensor dx1 = f.attn.backward(rows_of(dy, s0, s1), c1);
      const std::string tag = "layer " + std::to_string(layer) + " doc " + std::to_string(s0);
      expect_close(rows_of(out, s0, s1).to_floats(), o1.to_floats(), 1e-6, tag + " out");
      expect_close(rows_of(dx, s0, s1).to_floats(), dx1.to_floats(), 1e-6, tag + " dx");
    }
    const auto g_sep = grads_of(f.attn);
    EXPECT_EQ(g_packed.size(), g_sep.size());
    for (const auto& [name, g] : g_packed) {
      ASSERT_TRUE(g_sep.count(name)) << name;
      expect_close(g.to_floats(), g_sep.at(name).to_floats(), 1e-5, name);
    }
  }
}

TEST(Attention, OneDocumentPerRowPackedEqualsUnpacked) {
  for (int64_t layer : {kSwa, kCsa, kHca}) {
    Fixture f(layer, 41);
    SeqLayout plain(2, 19), packed(2, 19);
    packed.doc_start.assign(38, 0);
    std::mt19937 rng(13);
    const Tensor x = random_tensor({38, f.cfg.dim}, rng), dy = random_tensor({38, f.cfg.dim}, rng);
    AttentionCtx c1, c2;
    const auto o1 = f.attn.forward(x, plain, &c1).to_floats();
    const auto o2 = f.attn.forward(x, packed, &c2).to_floats();
    EXPECT_EQ(o1, o2) << "layer " << layer;
    zero_grads(f.attn);
    const auto d1 = f.attn.backward(dy, c1).to_floats();
    const auto g1 = grads_of(f.attn);
    zero_grads(f.attn);
    const auto d2 = f.attn.backward(dy, c2).to_floats();
    const auto g2 = grads_of(f.attn);
    EXPECT_EQ(d1, d2) << "layer " << layer;
    for (const auto& [name, g] : g1) EXPECT_EQ(g.to_floats(), g2.at(name).to_floats()) << name;
  }
}

// ---- gradients of the whole module ------------------------------------------------------------------------------------
// Like testing::fd_check_tensor, but a probe whose +-h perturbation changes the CSA top-k selection is skipped:
// the loss is only piecewise smooth (the selection is integer-valued) and the analytic gradient is that of the
// piece at hand. Most probes must stay usable.
struct Eval {
  double loss;
  std::vector<int64_t> selection;
};
void fd_check_fixed_selection(const std::string& what, Tensor& x, const Tensor& analytic,
                              const std::function<Eval()>& eval, double h, double atol, double rtol, int max_probes) {
  ASSERT_EQ(x.shape(), analytic.shape()) << what;
  const auto an = analytic.to_floats();
  const std::vector<int64_t> base = eval().selection;
  float* p = x.data<float>();
  std::mt19937 rng(1);
  std::vector<int64_t> probes;
  if (x.numel() <= max_probes) {
    probes.resize(static_cast<size_t>(x.numel()));
    std::iota(probes.begin(), probes.end(), int64_t{0});
  } else {
    std::uniform_int_distribution<int64_t> pick(0, x.numel() - 1);
    for (int i = 0; i < max_probes; ++i) probes.push_back(pick(rng));
  }
  int failures = 0, skipped = 0;
  for (int64_t i : probes) {
    const float saved = p[i];
    p[i] = saved + static_cast<float>(h);
    const Eval up = eval();
    p[i] = saved - static_cast<float>(h);
    const Eval down = eval();
    p[i] = saved;
    if (up.selection != base || down.selection != base) {
      ++skipped;
      continue;
    }
    const double fd = (up.loss - down.loss) / (2 * h), a = an[static_cast<size_t>(i)];
    if (std::abs(fd - a) > atol + rtol * std::max(std::abs(fd), std::abs(a)) && failures++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: finite difference " << fd << " vs analytic " << a;
  }
  EXPECT_EQ(failures, 0) << what << ": " << failures << " of " << probes.size() << " probes disagree";
  EXPECT_LE(4 * skipped, static_cast<int>(probes.size())) << what << ": " << skipped << " probes changed the top-k";
}

void module_fd(int64_t layer) {
  Fixture f(layer, 51);
  const SeqLayout L(1, 19);  // CSA: up to 4 entries (> top-k 2); HCA: 2 entries
  std::mt19937 rng(17);
  Tensor x = random_tensor({L.tokens(), f.cfg.dim}, rng);
  const Tensor dy = random_tensor({L.tokens(), f.cfg.dim}, rng);
  zero_grads(f.attn);
  AttentionCtx ctx;
  f.attn.forward(x, L, &ctx);
  const Tensor dx = f.attn.backward(dy, ctx);
  auto eval = [&] {
    AttentionCtx c;
    const double l = dot(f.attn.forward(x, L, &c), dy);
    return Eval{l, c.index.comp_ids};
  };
  const std::string tag = "layer " + std::to_string(layer) + " ";
  fd_check_fixed_selection(tag + "x", x, dx, eval, 1e-2, 2e-3, 2e-2, 16);
  int checked = 0, frozen = 0;
  f.attn.visit([&](Param& p) {
    if (!p.trainable) {  // indexer: no gradient, and the loss does not move while the selection holds
      ++frozen;
      EXPECT_TRUE(p.name.find(".indexer.") != std::string::npos) << p.name;
      EXPECT_FALSE(p.grad.defined()) << p.name;
      const Eval e0 = eval();
      float* v = p.value.data<float>();
      v[0] += 1e-3f;
      const Eval e1 = eval();
      v[0] -= 1e-3f;
      if (e1.selection == e0.selection) {
        EXPECT_EQ(e1.loss, e0.loss) << p.name;
      }
      return;
    }
    ++checked;
    ASSERT_TRUE(p.grad.defined()) << p.name;
    const Tensor g = p.grad.clone();
    fd_check_fixed_selection(tag + p.name, p.value, g, eval, 1e-2, 2e-3, 2e-2, 12);
  });
  EXPECT_EQ(checked, layer == kSwa ? 8 : 12);
  EXPECT_EQ(frozen, layer == kCsa ? 6 : 0);
}

TEST(Attention, SlidingWindowGradientsMatchFiniteDifferences) { module_fd(kSwa); }
TEST(Attention, CompressedSparseGradientsMatchFiniteDifferences) { module_fd(kCsa); }
TEST(Attention, HeavilyCompressedGradientsMatchFiniteDifferences) { module_fd(kHca); }

TEST(Attention, ParameterNamesAndShapes) {
  const ModelConfig cfg = model_preset("tiny");
  Attention csa(layer_prefix(1), cfg, 1), mtp("mtp.0.attn.", cfg, 4);
  std::map<std::string, Shape> shapes;
  csa.visit([&](Param& p) { shapes[p.name] = p.value.shape(); });
  const std::string p = "layers.1.attn.";
  EXPECT_EQ(shapes.at(p + "wq_a.weight"), (Shape{32, 64}));
  EXPECT_EQ(shapes.at(p + "q_norm.weight"), (Shape{32}));
  EXPECT_EQ(shapes.at(p + "wq_b.weight"), (Shape{128, 32}));
  EXPECT_EQ(shapes.at(p + "wkv.weight"), (Shape{32, 64}));
  EXPECT_EQ(shapes.at(p + "kv_norm.weight"), (Shape{32}));
  EXPECT_EQ(shapes.at(p + "wo_a.weight"), (Shape{32, 64}));
  EXPECT_EQ(shapes.at(p + "wo_b.weight"), (Shape{64, 32}));
  EXPECT_EQ(shapes.at(p + "attn_sink"), (Shape{4}));
  EXPECT_EQ(shapes.at(p + "compressor.wkv.weight"), (Shape{64, 64}));
  EXPECT_EQ(shapes.at(p + "compressor.wgate.weight"), (Shape{64, 64}));
  EXPECT_EQ(shapes.at(p + "compressor.ape"), (Shape{4, 64}));
  EXPECT_EQ(shapes.at(p + "compressor.norm.weight"), (Shape{32}));
  EXPECT_EQ(shapes.at(p + "indexer.wq_b.weight"), (Shape{32, 32}));
  EXPECT_EQ(shapes.at(p + "indexer.weights_proj.weight"), (Shape{2, 64}));
  EXPECT_EQ(shapes.at(p + "indexer.compressor.wkv.weight"), (Shape{32, 64}));
  EXPECT_EQ(shapes.at(p + "indexer.compressor.wgate.weight"), (Shape{32, 64}));
  EXPECT_EQ(shapes.at(p + "indexer.compressor.ape"), (Shape{4, 32}));
  EXPECT_EQ(shapes.at(p + "indexer.compressor.norm.weight"), (Shape{16}));
  EXPECT_EQ(shapes.size(), 18u);
  int n = 0;
  mtp.visit([&](Param& q) {
    ++n;
    EXPECT_EQ(q.name.rfind("mtp.0.attn.", 0), 0u) << q.name;
  });
  EXPECT_EQ(n, 8);
  Attention hca(layer_prefix(2), cfg, 2);
  std::map<std::string, Shape> h;
  hca.visit([&](Param& q) { h[q.name] = q.value.shape(); });
  EXPECT_EQ(h.at("layers.2.attn.compressor.ape"), (Shape{8, 32}));
  EXPECT_EQ(h.at("layers.2.attn.compressor.wkv.weight"), (Shape{32, 64}));
  EXPECT_EQ(h.size(), 12u);
}

// ---- release-quant simulation --------------------------------------------------------------------------------------
TEST(Attention, SimulatedReleaseQuantIsOffByDefaultAndCloseWhenOn) {
  for (int64_t layer : {kCsa, kHca}) {
    Fixture plain(layer, 61), sim(layer, 61, AttentionOptions{true});
    const SeqLayout L(1, 27);
    std::mt19937 rng(19);
    const Tensor x = random_tensor({27, plain.cfg.dim}, rng), dy = random_tensor({27, plain.cfg.dim}, rng);
    AttentionCtx cp, cs;
    const auto op = plain.attn.forward(x, L, &cp).to_floats();
    const auto os = sim.attn.forward(x, L, &cs).to_floats();
    EXPECT_NE(op, os);
    expect_close(os, op, 0.2, "simulated vs plain");
    // Non-rope KV dims sit on the FP8 grid (3 mantissa bits), rope dims are untouched.
    const int64_t C = plain.cfg.head_dim, r = plain.cfg.rope_head_dim;
    const auto kv = cs.kv.to_floats(), kvp = cp.kv.to_floats(), ckv = cs.ckv.to_floats();
    for (int64_t t = 0; t < 27; ++t)
      for (int64_t c = 0; c < C; ++c) {
        const float v = kv[t * C + c];
        if (c < C - r) EXPECT_EQ(f32_bits(v) & 0xFFFFFu, 0u) << t << " " << c;
        else EXPECT_EQ(v, kvp[t * C + c]);
      }
    for (int64_t e = 0; e < cs.plan.entries(); ++e)
      for (int64_t c = 0; c < C - r; ++c) EXPECT_EQ(f32_bits(ckv[e * C + c]) & 0xFFFFFu, 0u);
    // Backward runs (straight-through) and gives finite gradients close to the plain ones.
    const auto dxs = sim.attn.backward(dy, cs).to_floats();
    const auto dxp = plain.attn.backward(dy, cp).to_floats();
    for (float v : dxs) EXPECT_TRUE(std::isfinite(v));
    expect_close(dxs, dxp, 0.3, "simulated dx");
  }
}

}  // namespace
}  // namespace dsv4
