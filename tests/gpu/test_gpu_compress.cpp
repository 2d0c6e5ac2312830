// KV compressor pooling and lightning indexer on the GPU (kernels/attn_compress.cu) against the model's CPU
// references (compress_pool_forward / compress_pool_backward of model/compressor.h, indexer_scores_rows and
// Indexer::select_topk of model/indexer.h) evaluated in double precision on the same FP32 inputs.
//
// Compressor cases: ratio 4 (overlapping windows) with C = 64 / 512 / 16 (the tiny indexer's), ratio 8 (the tiny
// config's HCA), ratio 128 with C = 64 / 512, packed documents of odd lengths, documents shorter than a block (no
// entries; a whole layout with none), trailing partial blocks. dkv / dgate / dape start from random values (the
// API accumulates): covered elements are compared, uncovered ones must be bitwise untouched; out is poisoned.
// Tolerances, |gpu - ref| <= rtol * max|ref| per tensor: out 2e-6, dkv / dgate 4e-6 (a softmax over <= 256 slots
// per channel, FP32 in the reference's operation order; exp and FMA contraction differ), dape 2e-5 (a sum over all
// entries, in chunks instead of the reference's single running sum).
//
// Indexer cases: the tiny config (2 heads x 16, top-2), 8 / 16 / 64 heads with cI 32 / 64 / 128 (V4's 64 x 128),
// top-k larger than every visible set, documents shorter than a block (empty visible sets, a layout with no entries),
// odd lengths, with and without the release numerics' BF16 rounding of the scores.
// Scores: |gpu - ref| <= 2e-6 * sum_h |w_h| (|q_h| . |k|) scales (the magnitude an FP32 sum of nI ReLU'd dots over
// cI is accurate to, here summed in another order than the reference's GEMM); with BF16 rounding additionally
// 2^-7 |ref| (the two sides may round to neighbouring BF16 values, one BF16 ulp apart).
// Top-k: (1) the GPU's selection on the GPU's scores equals Indexer::select_topk on the same scores exactly (ids,
// order, ties to the lower id): this cannot pass by tolerance; (2) end to end against the double reference: per
// query the selected ids are ascending, distinct, visible; the sorted reference scores of the GPU's selection equal
// those of the reference selection within twice the largest tolerance involved (a swapped pair differs by at most
// two tolerances); and where min over the reference's top k of (v - tol) exceeds max over the rest of (v + tol) (no
// admissible GPU scores can change the set) the id lists are identical (each case with a cut must have such
// queries). A synthetic tie test (few distinct values, +0 / -0) checks the tie rule directly.
// The CPU float references must meet the same bounds on every case (checked without a GPU: *Cpu.*; measured: pooling
// <= 6e-7 relative; scores <= 0.03 of the tolerance without rounding, a sequential FP32 FMA chain over cI = 128 as
// the kernel runs typically a few 1e-7 of the magnitude; within one BF16 ulp with rounding), so the bounds
// are not looser than FP32 itself needs. GPU tests skip without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "kernels/attention_kernels.h"
#include "kernels/cuda_runtime_api.h"
#include "model/compressor.h"
#include "model/indexer.h"
#include "runtime/dtype.h"

namespace dsv4::gputest {
namespace {

// Packed layout of `rows` (each row: its document lengths, all rows the same total).
SeqLayout make_layout(const std::vector<std::vector<int64_t>>& rows) {
  int64_t seq = 0;
  for (int64_t L : rows.at(0)) seq += L;
  SeqLayout lay(static_cast<int64_t>(rows.size()), seq);
  for (const auto& r : rows) {
    int64_t s = 0, total = 0;
    for (int64_t L : r) {
      for (int64_t i = 0; i < L; ++i) lay.doc_start.push_back(s);
      s += L;
      total += L;
    }
    EXPECT_EQ(total, seq) << "rows of different lengths";
  }
  lay.validate("test");
  return lay;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

template <typename T>
Tensor gpu_vec(const std::vector<T>& v, size_t pad = 0, T fill = T(0)) {
  std::vector<T> w = v;
  w.resize(v.size() + pad, fill);
  if (w.empty()) w.push_back(fill);  // keep a valid allocation
  return Tensor::from_vector<T>({static_cast<int64_t>(w.size())}, w).to(kGpu);
}
Tensor gpu_f(const std::vector<float>& v, size_t pad = 0, float fill = 0.0f) {
  std::vector<float> w = v;
  w.resize(v.size() + pad, fill);
  if (w.empty()) w.push_back(fill);
  return Tensor::from_floats({static_cast<int64_t>(w.size())}, w).to(kGpu);
}
std::vector<float> host_f(const Tensor& t) { return t.to_floats(); }
template <typename T>
std::vector<T> host_v(const Tensor& t) {
  const auto b = host_bytes(t);
  std::vector<T> v(b.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), b.data(), b.size());
  return v;
}

// ==== compressor ===================================================================================================

struct PoolCase {
  std::string name;
  int64_t C, m;
  std::vector<std::vector<int64_t>> rows;
};

const std::vector<PoolCase>& pool_cases() {
  static const std::vector<PoolCase> c = {
      {"csa_m4_docs_c64", 64, 4, {{13, 2, 22}, {1, 36}}},
      {"indexer_m4_c16_tiny", 16, 4, {{3, 18}, {21}}},
      {"tiny_hca_m8_c32", 32, 8, {{5, 37}, {42}}},
      {"hca_m128_c64", 64, 128, {{301}, {129, 172}}},
      {"csa_m4_c512", 512, 4, {{37}}},
      {"hca_m128_c512", 512, 128, {{259}}},
      {"no_entries_m8", 32, 8, {{3, 4, 7}}},
  };
  return c;
}

struct PoolProblem {
  int64_t T = 0, E = 0, C = 0, m = 0, W = 0;
  bool overlap = false;
  CompressPlan plan;
  std::vector<float> kv, gate, ape, dout, dkv0, dgate0, dape0;
  std::vector<uint8_t> covered;  // [T, W]: element receives a gradient
};

PoolProblem make_pool(const PoolCase& c) {
  PoolProblem p;
  const SeqLayout lay = make_layout(c.rows);
  p.plan = CompressPlan::build(lay, c.m);
  p.T = lay.tokens();
  p.E = p.plan.entries();
  p.C = c.C;
  p.m = c.m;
  p.overlap = c.m == 4;
  p.W = p.overlap ? 2 * c.C : c.C;
  p.kv = uniform(p.T * p.W, -1.0f, 1.0f);
  p.gate = uniform(p.T * p.W, -3.0f, 3.0f);
  p.ape = uniform(p.m * p.W, -1.0f, 1.0f);
  p.dout = uniform(std::max<int64_t>(p.E, 1) * p.C, -1.0f, 1.0f);
  p.dkv0 = uniform(p.T * p.W, -0.5f, 0.5f);
  p.dgate0 = uniform(p.T * p.W, -0.5f, 0.5f);
  p.dape0 = uniform(p.m * p.W, -0.5f, 0.5f);
  p.covered.assign(static_cast<size_t>(p.T * p.W), 0);
  for (int64_t e = 0; e < p.E; ++e) {
    const int64_t s0 = p.plan.entry_token[static_cast<size_t>(e)];
    const bool hp = p.plan.entry_has_prev[static_cast<size_t>(e)] != 0;
    // Written out from the layout of model/compressor.h (not from the shared slot code under test): this block's
    // rows, all channels (ratio > 4) or the last C (ratio 4); ratio 4 also the previous block's first C channels.
    auto own = [&](int64_t row0, int64_t col0) {
      for (int64_t r = row0; r < row0 + p.m; ++r)
        for (int64_t ch = 0; ch < p.C; ++ch) {
          auto& cov = p.covered[static_cast<size_t>(r * p.W + col0 + ch)];
          EXPECT_EQ(cov, 0) << "element owned by two slots";
          cov = 1;
        }
    };
    own(s0, p.overlap ? p.C : 0);
    if (p.overlap && hp) own(s0 - p.m, 0);
  }
  return p;
}

struct PoolResult {
  std::vector<double> out, dkv, dgate, dape;
};

template <typename R>
PoolResult pool_reference(const PoolProblem& p) {
  auto cv = [](const std::vector<float>& v) { return std::vector<R>(v.begin(), v.end()); };
  const auto kv = cv(p.kv), gate = cv(p.gate), ape = cv(p.ape), dout = cv(p.dout);
  auto dkv = cv(p.dkv0), dgate = cv(p.dgate0), dape = cv(p.dape0);
  std::vector<R> out(static_cast<size_t>(p.E * p.C));
  compress_pool_forward<R>(kv.data(), gate.data(), ape.data(), p.plan.entry_token.data(), p.plan.entry_has_prev.data(),
                           p.E, p.m, p.C, p.overlap, out.data());
  compress_pool_backward<R>(kv.data(), gate.data(), ape.data(), p.plan.entry_token.data(),
                            p.plan.entry_has_prev.data(), p.E, p.m, p.C, p.overlap, dout.data(), dkv.data(),
                            dgate.data(), dape.data());
  auto cd = [](const std::vector<R>& v) { return std::vector<double>(v.begin(), v.end()); };
  return {cd(out), cd(dkv), cd(dgate), cd(dape)};
}

constexpr double kPoolOutRtol = 2e-6;
constexpr double kPoolGradRtol = 4e-6;
constexpr double kPoolApeRtol = 2e-5;

// Covered elements within tolerance; uncovered ones exactly their initial value.
double check_grad(const std::vector<double>& got, const std::vector<double>& ref, const std::vector<float>& init,
                  const std::vector<uint8_t>& covered, double rtol, const std::string& what) {
  std::vector<double> g, r;
  size_t touched = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (covered[i]) {
      g.push_back(got[i]);
      r.push_back(ref[i]);
    } else if (got[i] != static_cast<double>(init[i]) && touched++ < 5) {
      ADD_FAILURE() << what << ": uncovered element " << i << " changed from " << init[i] << " to " << got[i];
    }
  }
  EXPECT_EQ(touched, 0u) << what << ": uncovered elements changed";
  return expect_close_scaled(g, r, rtol, what);
}

void check_pool(const PoolResult& got, const PoolResult& ref, const PoolProblem& p, const std::string& what) {
  const double eo = expect_close_scaled(got.out, ref.out, kPoolOutRtol, what + " out");
  const double ek = check_grad(got.dkv, ref.dkv, p.dkv0, p.covered, kPoolGradRtol, what + " dkv");
  const double eg = check_grad(got.dgate, ref.dgate, p.dgate0, p.covered, kPoolGradRtol, what + " dgate");
  const double ea = expect_close_scaled(got.dape, ref.dape, kPoolApeRtol, what + " dape");
  std::printf("[ %s ] E=%ld max |err| / max|ref|: out %.2e dkv %.2e dgate %.2e dape %.2e\n", what.c_str(),
              static_cast<long>(p.E), eo, ek, eg, ea);
}

TEST(CompressPoolCpu, FloatReferenceMeetsTheStatedTolerance) {
  for (const PoolCase& c : pool_cases()) {
    const PoolProblem p = make_pool(c);
    check_pool(pool_reference<float>(p), pool_reference<double>(p), p, "cpu-f32 " + c.name);
  }
}

TEST(CompressPoolCpu, EveryGradientElementHasOneOwnerAndPlansHaveEntries) {
  for (const PoolCase& c : pool_cases()) {
    const PoolProblem p = make_pool(c);  // make_pool fails on an element owned twice
    if (c.name != "no_entries_m8") EXPECT_GT(p.E, 0) << c.name;
  }
}

class GpuCompressPool : public GpuTest {};

PoolResult run_pool_gpu(const PoolProblem& p) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const Tensor kv = gpu_f(p.kv), gate = gpu_f(p.gate), ape = gpu_f(p.ape), dout = gpu_f(p.dout);
  const Tensor et = gpu_vec<int64_t>(p.plan.entry_token), hp = gpu_vec<uint8_t>(p.plan.entry_has_prev);
  const Tensor out = gpu_f(std::vector<float>(static_cast<size_t>(p.E * p.C), nan), 8, nan);
  const Tensor dkv = gpu_f(p.dkv0, 8, nan), dgate = gpu_f(p.dgate0, 8, nan), dape = gpu_f(p.dape0, 8, nan);
  const int64_t wsn = cuda::compress_pool_backward_workspace(p.E, p.m, p.C, p.overlap);
  const Tensor ws = gpu_f(std::vector<float>(static_cast<size_t>(std::max<int64_t>(wsn, 1)), nan));
  void* stream = cuda::current_stream(0);
  cuda::compress_pool_forward(kv.data<float>(), gate.data<float>(), ape.data<float>(), et.data<int64_t>(),
                              hp.data<uint8_t>(), p.E, p.m, p.C, p.overlap, out.data<float>(), stream);
  cuda::compress_pool_backward(kv.data<float>(), gate.data<float>(), ape.data<float>(), et.data<int64_t>(),
                               hp.data<uint8_t>(), p.E, p.m, p.C, p.overlap, dout.data<float>(), dkv.data<float>(),
                               dgate.data<float>(), dape.data<float>(), ws.data<float>(), stream);
  cuda::synchronize(0);
  auto take = [](const Tensor& t, size_t n) {
    const auto f = t.to_floats();
    for (size_t i = n; i < f.size(); ++i) EXPECT_TRUE(std::isnan(f[i])) << "write past the end at " << i;
    return std::vector<double>(f.begin(), f.begin() + static_cast<std::ptrdiff_t>(n));
  };
  return {take(out, static_cast<size_t>(p.E * p.C)), take(dkv, p.dkv0.size()), take(dgate, p.dgate0.size()),
          take(dape, p.dape0.size())};
}

TEST_F(GpuCompressPool, MatchesCpuReference) {
  for (const PoolCase& c : pool_cases()) {
    const PoolProblem p = make_pool(c);
    check_pool(run_pool_gpu(p), pool_reference<double>(p), p, "gpu " + c.name);
  }
}

TEST_F(GpuCompressPool, BackwardIsBitwiseDeterministic) {
  for (const PoolCase& c : {pool_cases()[0], pool_cases()[3]}) {
    const PoolProblem p = make_pool(c);
    const PoolResult a = run_pool_gpu(p), b = run_pool_gpu(p);
    EXPECT_EQ(a.out, b.out) << c.name;
    EXPECT_EQ(a.dkv, b.dkv) << c.name;
    EXPECT_EQ(a.dgate, b.dgate) << c.name;
    EXPECT_EQ(a.dape, b.dape) << c.name;
  }
}

// ==== indexer ======================================================================================================

struct IndexCase {
  std::string name;
  int64_t nI, cI, topk;
  std::vector<std::vector<int64_t>> rows;
  bool round = false;
};

const std::vector<IndexCase>& index_cases() {
  static const std::vector<IndexCase> c = {
      {"tiny_2x16_top2", 2, 16, 2, {{3, 18}, {21}}},
      {"h8_c32_topk_gt_visible", 8, 32, 1000, {{61}}},
      {"h16_c64_short_docs", 16, 64, 3, {{2, 5, 40}, {1, 1, 45}}},
      {"h16_c64_bf16_scores", 16, 64, 5, {{131}}, true},
      {"h64_c128_v4_heads", 64, 128, 7, {{97}}},
      {"h64_c128_long_bf16", 64, 128, 64, {{1501}}, true},
      {"no_entries", 8, 32, 4, {{3}, {3}}},
  };
  return c;
}

struct IndexProblem {
  int64_t T = 0, E = 0, nI = 0, cI = 0, topk = 0, max_visible = 0;
  bool round = false;
  CompressPlan plan;
  std::vector<int64_t> offsets;  // score CSR
  std::vector<float> q, k, w;
  float score_scale = 1.0f, weight_scale = 1.0f;
};

IndexProblem make_index(const IndexCase& c) {
  IndexProblem p;
  const SeqLayout lay = make_layout(c.rows);
  p.plan = CompressPlan::build(lay, 4);
  p.T = lay.tokens();
  p.E = p.plan.entries();
  p.nI = c.nI;
  p.cI = c.cI;
  p.topk = c.topk;
  p.round = c.round;
  p.offsets.assign(static_cast<size_t>(p.T + 1), 0);
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t n = p.plan.n_visible[static_cast<size_t>(t)];
    p.offsets[static_cast<size_t>(t + 1)] = p.offsets[static_cast<size_t>(t)] + n;
    p.max_visible = std::max(p.max_visible, n);
  }
  p.q = uniform(p.T * p.nI * p.cI, -1.0f, 1.0f);
  p.k = uniform(std::max<int64_t>(p.E, 1) * p.cI, -1.0f, 1.0f);
  p.w = uniform(p.T * p.nI, -1.0f, 1.0f);
  // As Indexer::scores computes them.
  p.score_scale = static_cast<float>(std::pow(static_cast<double>(p.cI), -0.5));
  p.weight_scale = static_cast<float>(std::pow(static_cast<double>(p.nI), -0.5));
  return p;
}

// Reference scores in precision R (rounded to BF16 after the conversion to float when the case rounds).
template <typename R>
std::vector<double> index_reference(const IndexProblem& p) {
  auto cv = [](const std::vector<float>& v) { return std::vector<R>(v.begin(), v.end()); };
  const auto q = cv(p.q), k = cv(p.k), w = cv(p.w);
  std::vector<R> v(static_cast<size_t>(p.offsets.back()));
  indexer_scores_rows<R>(q.data(), k.data(), w.data(), p.plan, p.nI, p.cI, static_cast<R>(p.score_scale),
                         static_cast<R>(p.weight_scale), p.offsets, v.data());
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const float f = static_cast<float>(v[i]);
    out[i] = p.round ? static_cast<double>(round_bf16(f)) : static_cast<double>(v[i]);
  }
  return out;
}

constexpr double kScoreRtol = 2e-6;          // of the score's magnitude (score_tolerance)
constexpr double kBf16RoundRel = kBf16Rtol;  // two neighbouring BF16 values: at most 2^-7 relative apart

// Per-element score tolerance: kScoreRtol times the score's magnitude sum_h |w_h| (|q_h| . |k|) scales (the
// reference run on absolute values: the standard bound of an FP32 sum of products is proportional to it, and a
// score that cancels to nearly 0 keeps an absolute tolerance of its terms' size), plus one BF16 ulp when rounding.
std::vector<double> score_tolerance(const IndexProblem& p, const std::vector<double>& ref) {
  auto absv = [](const std::vector<float>& v) {
    std::vector<double> a(v.size());
    for (size_t i = 0; i < v.size(); ++i) a[i] = std::fabs(static_cast<double>(v[i]));
    return a;
  };
  const auto q = absv(p.q), k = absv(p.k), w = absv(p.w);
  std::vector<double> mag(ref.size());
  indexer_scores_rows<double>(q.data(), k.data(), w.data(), p.plan, p.nI, p.cI, p.score_scale, p.weight_scale,
                              p.offsets, mag.data());
  std::vector<double> tol(ref.size());
  for (size_t i = 0; i < ref.size(); ++i)
    tol[i] = kScoreRtol * mag[i] + (p.round ? kBf16RoundRel * std::fabs(ref[i]) : 0.0);
  return tol;
}

double check_scores(const std::vector<double>& got, const std::vector<double>& ref, const std::vector<double>& tol,
                    const std::string& what) {
  EXPECT_EQ(got.size(), ref.size()) << what;
  size_t bad = 0;
  double worst = 0.0;
  for (size_t i = 0; i < std::min(got.size(), ref.size()); ++i) {
    const double e = std::fabs(got[i] - ref[i]);
    if (tol[i] > 0) worst = std::max(worst, e / tol[i]);
    if (!(e <= tol[i]) && bad++ < 5)
      ADD_FAILURE() << what << ": score " << i << " got " << got[i] << " want " << ref[i] << " (tolerance " << tol[i]
                    << ")";
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " scores out of tolerance";
  return worst;
}

IndexScores as_scores(const IndexProblem& p, const std::vector<double>& v) {
  IndexScores s;
  s.offsets = p.offsets;
  s.values.assign(v.begin(), v.end());
  return s;
}

// End-to-end check of a selection `got` (CSR over p's queries) against the reference scores; returns the number
// of queries whose ids had to be identical (a clear gap at the k-th score).
int64_t check_selection(const IndexProblem& p, const std::vector<int64_t>& got_off, const std::vector<int64_t>& got_ids,
                        const std::vector<double>& ref, const std::vector<double>& tol, const std::string& what) {
  std::vector<int64_t> ref_off, ref_ids;
  Indexer::select_topk(as_scores(p, ref), p.plan, p.topk, ref_off, ref_ids);
  EXPECT_EQ(got_off, ref_off) << what << ": list sizes";
  if (got_off != ref_off) return 0;
  int64_t strict = 0, bad = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    const auto ti = static_cast<size_t>(t);
    const int64_t fe = p.plan.first_entry[ti], n = p.plan.n_visible[ti];
    const int64_t b = got_off[ti], e = got_off[ti + 1], k = e - b;
    const double* v = ref.data() + p.offsets[ti];
    const double* tl = tol.data() + p.offsets[ti];
    std::vector<double> gs, rs;
    double tmax = 0.0;
    for (int64_t j = b; j < e; ++j) {
      const int64_t id = got_ids[static_cast<size_t>(j)];
      if (id < fe || id >= fe + n || (j > b && id <= got_ids[static_cast<size_t>(j - 1)])) {
        if (bad++ < 5) ADD_FAILURE() << what << ": query " << t << " id " << id << " not ascending / visible";
        continue;
      }
      gs.push_back(v[id - fe]);
      rs.push_back(v[ref_ids[static_cast<size_t>(j)] - fe]);
      tmax = std::max({tmax, tl[id - fe], tl[ref_ids[static_cast<size_t>(j)] - fe]});
    }
    std::sort(gs.begin(), gs.end());
    std::sort(rs.begin(), rs.end());
    for (size_t i = 0; i < gs.size() && i < rs.size(); ++i)
      if (!(std::fabs(gs[i] - rs[i]) <= 2 * tmax) && bad++ < 5)
        ADD_FAILURE() << what << ": query " << t << " selected scores differ: " << gs[i] << " vs " << rs[i];
    if (k < n) {  // a clear gap between the k-th and (k+1)-th reference scores: the ids must be identical
      std::vector<int64_t> order(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
      std::sort(order.begin(), order.end(), [v](int64_t a, int64_t c) { return v[a] > v[c]; });
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;  // selected minus / unselected plus tolerance
      for (int64_t i = 0; i < n; ++i) {
        const int64_t x = order[static_cast<size_t>(i)];
        if (i < k) lo = std::min(lo, v[x] - tl[x]);
        else hi = std::max(hi, v[x] + tl[x]);
      }
      if (lo > hi) {
        ++strict;
        const std::vector<int64_t> g(got_ids.begin() + b, got_ids.begin() + e), r(ref_ids.begin() + b,
                                                                                  ref_ids.begin() + e);
        if (g != r && bad++ < 5) ADD_FAILURE() << what << ": query " << t << " ids differ despite a clear gap";
      }
    }
  }
  EXPECT_EQ(bad, 0) << what;
  return strict;
}

TEST(IndexerCpu, FloatReferenceMeetsTheStatedTolerance) {
  for (const IndexCase& c : index_cases()) {
    const IndexProblem p = make_index(c);
    const auto ref = index_reference<double>(p), f32 = index_reference<float>(p);
    const auto tol = score_tolerance(p, ref);
    std::printf("[ cpu-f32 %s ] max |err| / tolerance %.2e\n", c.name.c_str(), check_scores(f32, ref, tol, c.name));
    std::vector<int64_t> off, ids;
    Indexer::select_topk(as_scores(p, f32), p.plan, p.topk, off, ids);
    check_selection(p, off, ids, ref, tol, "cpu-f32 " + c.name);
  }
}

TEST(IndexerCpu, TopKOffsetsAreMinOfTopkAndVisible) {
  std::vector<int64_t> off;
  cuda::indexer_topk_offsets({0, 1, 5, 2, 9}, 2, off);
  EXPECT_EQ(off, (std::vector<int64_t>{0, 0, 1, 3, 5, 7}));
  cuda::indexer_topk_offsets({}, 3, off);
  EXPECT_EQ(off, (std::vector<int64_t>{0}));
}

class GpuIndexer : public GpuTest {};

struct IndexGpuResult {
  std::vector<double> scores;
  std::vector<int64_t> off, ids;
};

// Scores then top-k on the GPU. Buffers carry a poisoned tail to catch writes past the end.
IndexGpuResult run_index_gpu(const IndexProblem& p) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  constexpr int32_t kPoison = -7;
  std::vector<int64_t> toff;
  cuda::indexer_topk_offsets(p.plan.n_visible, p.topk, toff);
  const auto ns = static_cast<size_t>(p.offsets.back()), nk = static_cast<size_t>(toff.back());
  const Tensor q = gpu_f(p.q), k = gpu_f(p.k), w = gpu_f(p.w);
  const Tensor fe = gpu_vec<int64_t>(p.plan.first_entry), so = gpu_vec<int64_t>(p.offsets), to = gpu_vec<int64_t>(toff);
  const Tensor scores = gpu_f(std::vector<float>(ns, nan), 8, nan);
  const Tensor ids = gpu_vec<int32_t>(std::vector<int32_t>(nk, kPoison), 8, kPoison);
  void* stream = cuda::current_stream(0);
  cuda::indexer_scores(q.data<float>(), k.data<float>(), w.data<float>(), fe.data<int64_t>(), so.data<int64_t>(), p.T,
                       p.E, p.nI, p.cI, p.max_visible, p.score_scale, p.weight_scale, p.round, scores.data<float>(),
                       stream);
  cuda::indexer_topk(scores.data<float>(), so.data<int64_t>(), fe.data<int64_t>(), to.data<int64_t>(), p.T, p.E,
                     ids.data<int32_t>(), stream);
  cuda::synchronize(0);
  IndexGpuResult r;
  const auto sf = host_f(scores);
  for (size_t i = ns; i < sf.size(); ++i) EXPECT_TRUE(std::isnan(sf[i])) << "score written past the end at " << i;
  r.scores.assign(sf.begin(), sf.begin() + static_cast<std::ptrdiff_t>(ns));
  const auto iv = host_v<int32_t>(ids);
  for (size_t i = nk; i < iv.size(); ++i) EXPECT_EQ(iv[i], kPoison) << "id written past the end at " << i;
  r.ids.assign(iv.begin(), iv.begin() + static_cast<std::ptrdiff_t>(nk));
  r.off = toff;
  return r;
}

TEST_F(GpuIndexer, ScoresAndTopKMatchCpuReference) {
  for (const IndexCase& c : index_cases()) {
    const IndexProblem p = make_index(c);
    const IndexGpuResult g = run_index_gpu(p);
    const auto ref = index_reference<double>(p);
    const auto tol = score_tolerance(p, ref);
    const double worst = check_scores(g.scores, ref, tol, "gpu " + c.name + " scores");
    // (1) exact: the model's selection on the GPU's own scores.
    std::vector<int64_t> off, ids;
    Indexer::select_topk(as_scores(p, g.scores), p.plan, p.topk, off, ids);
    EXPECT_EQ(g.off, off) << c.name;
    EXPECT_EQ(g.ids, ids) << c.name << ": top-k of the GPU scores differs from Indexer::select_topk";
    // (2) end to end against the double reference.
    const int64_t strict = check_selection(p, g.off, g.ids, ref, tol, "gpu " + c.name);
    bool any_cut = false;
    for (int64_t n : p.plan.n_visible) any_cut |= n > p.topk;
    if (any_cut) EXPECT_GT(strict, 0) << c.name << ": no query had a clear gap: the id check would be vacuous";
    std::printf("[ gpu %s ] T=%ld E=%ld max |err| / tolerance %.2e, %ld queries with identical ids required\n",
                c.name.c_str(), static_cast<long>(p.T), static_cast<long>(p.E), worst, static_cast<long>(strict));
  }
}

// Scores drawn from a few values (with +0 / -0) so that most selections cut through ties: the GPU top-k must pick
// exactly what Indexer::select_topk picks (the lower ids among equal scores).
TEST_F(GpuIndexer, TopKTieOrderMatchesCpu) {
  IndexProblem p = make_index({"ties", 1, 16, 0, {{803}, {2, 801}}});
  const std::vector<float> vals = {-1.5f, -0.0f, 0.0f, 0.25f, 0.25f, 1.0f, 3.0f, -1e-30f, 1e30f};
  std::uniform_int_distribution<size_t> pick(0, vals.size() - 1);
  std::vector<float> s(static_cast<size_t>(p.offsets.back()));
  for (auto& x : s) x = vals[pick(rng())];
  const Tensor fe = gpu_vec<int64_t>(p.plan.first_entry), so = gpu_vec<int64_t>(p.offsets), sc = gpu_f(s);
  for (int64_t topk : {1, 3, 17, 100, 199, 200, 250}) {
    std::vector<int64_t> toff, off, ids;
    cuda::indexer_topk_offsets(p.plan.n_visible, topk, toff);
    const Tensor to = gpu_vec<int64_t>(toff);
    const Tensor gids = gpu_vec<int32_t>(std::vector<int32_t>(static_cast<size_t>(toff.back()), -7));
    cuda::indexer_topk(sc.data<float>(), so.data<int64_t>(), fe.data<int64_t>(), to.data<int64_t>(), p.T, p.E,
                       gids.data<int32_t>(), cuda::current_stream(0));
    cuda::synchronize(0);
    IndexScores cs;
    cs.offsets = p.offsets;
    cs.values = s;
    Indexer::select_topk(cs, p.plan, topk, off, ids);
    EXPECT_EQ(toff, off) << topk;
    const auto gv = host_v<int32_t>(gids);
    const std::vector<int64_t> got(gv.begin(), gv.begin() + static_cast<std::ptrdiff_t>(ids.size()));
    EXPECT_EQ(got, ids) << "topk " << topk;
  }
}

}  // namespace
}  // namespace dsv4::gputest
