// mHC hyper-connection kernels on the GPU (kernels/attn_mhc.cu) against the CPU reference row cores
// (src/model/mhc.h: hc_pre_forward_rows / hc_pre_backward_rows / hc_post_forward_rows / hc_post_backward_rows, and
// the HyperHead's hc_head_forward_rows / hc_head_backward_rows) evaluated in double precision on the same FP32 inputs.
// Tolerance (per tensor): |gpu - ref| <= rtol * max|ref|, rtol = 2e-5 for the forward outputs (x, post, comb, mixes,
// rstd, Xnew, head h) and the post backward, 1e-4 for the pre and head backward (dX, dfn, dscale, dbase: through 2 iters - 1
// Sinkhorn normalisation steps and sums over T tokens in a different order). The CPU float reference must meet the
// same bounds (MhcCpu.*, runs without a GPU). GPU tests skip without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "kernels/attention_kernels.h"
#include "kernels/cuda_runtime_api.h"
#include "model/mhc.h"

namespace dsv4::gputest {
namespace {

struct MhcCase {
  int64_t T, n, D, iters;
};

const std::vector<MhcCase>& cases() {
  static const std::vector<MhcCase> c = {{7, 4, 64, 20}, {5, 4, 1000, 20}, {3, 3, 40, 3}, {2, 1, 33, 2}, {9, 8, 96, 20}};
  return c;
}

HcDims dims_of(const MhcCase& c) {
  HcDims d;
  d.n = c.n;
  d.dim = c.D;
  d.iters = c.iters;
  d.hc_eps = 1e-6;
  d.norm_eps = 1e-6;
  return d;
}

struct MhcProblem {
  MhcCase c;
  HcDims d;
  std::vector<float> X, fn, scale, base, dx, dpost, dcomb, F, dXnew, dX0, dfn0, dscale0, dbase0;
};

MhcProblem make_problem(const MhcCase& c) {
  MhcProblem p;
  p.c = c;
  p.d = dims_of(c);
  const int64_t M = p.d.mix(), N = p.d.width();
  const float fs = 1.0f / std::sqrt(static_cast<float>(N));
  p.X = uniform(c.T * N, -1.0f, 1.0f);
  p.fn = uniform(M * N, -fs, fs);
  p.scale = uniform(3, 0.5f, 1.5f);
  p.base = uniform(M, -1.0f, 1.0f);
  p.dx = uniform(c.T * c.D, -1.0f, 1.0f);
  p.dpost = uniform(c.T * c.n, -1.0f, 1.0f);
  p.dcomb = uniform(c.T * c.n * c.n, -1.0f, 1.0f);
  p.F = uniform(c.T * c.D, -1.0f, 1.0f);
  p.dXnew = uniform(c.T * N, -1.0f, 1.0f);
  p.dX0 = uniform(c.T * N, -0.5f, 0.5f);
  p.dfn0 = uniform(M * N, -0.5f, 0.5f);
  p.dscale0 = uniform(3, -0.5f, 0.5f);
  p.dbase0 = uniform(M, -0.5f, 0.5f);
  return p;
}

// Everything the kernels produce, as doubles.
struct MhcResult {
  std::vector<double> x, post, comb, mixes, rstd;             // pre forward
  std::vector<double> dX, dfn, dscale, dbase;                  // pre backward (accumulate = false)
  std::vector<double> dX_acc, dfn_nodp, dscale_nodp, dbase_nodp;  // accumulate = true, dpost / dcomb null
  std::vector<double> Xnew, dF, dXp, dpost, dcomb;            // post
};

template <typename R>
std::vector<double> cd(const std::vector<R>& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <typename R>
MhcResult reference(const MhcProblem& p) {
  auto cv = [](const std::vector<float>& v) { return std::vector<R>(v.begin(), v.end()); };
  const int64_t T = p.c.T, n = p.c.n, D = p.c.D, M = p.d.mix(), N = p.d.width();
  const auto X = cv(p.X), fn = cv(p.fn), scale = cv(p.scale), base = cv(p.base), dx = cv(p.dx), dpost = cv(p.dpost),
             dcomb = cv(p.dcomb), F = cv(p.F), dXnew = cv(p.dXnew);
  std::vector<R> x(static_cast<size_t>(T * D)), post(static_cast<size_t>(T * n)), comb(static_cast<size_t>(T * n * n)),
      mixes(static_cast<size_t>(T * M)), rstd(static_cast<size_t>(T));
  hc_pre_forward_rows<R>(X.data(), fn.data(), scale.data(), base.data(), x.data(), post.data(), comb.data(),
                         mixes.data(), rstd.data(), T, p.d);
  MhcResult r{cd(x), cd(post), cd(comb), cd(mixes), cd(rstd)};
  {
    std::vector<R> dX(static_cast<size_t>(T * N)), dfn = cv(p.dfn0), dscale = cv(p.dscale0), dbase = cv(p.dbase0);
    hc_pre_backward_rows<R>(dx.data(), dpost.data(), dcomb.data(), X.data(), fn.data(), scale.data(), base.data(),
                            mixes.data(), rstd.data(), dX.data(), dfn.data(), dscale.data(), dbase.data(), T, p.d,
                            false);
    r.dX = cd(dX);
    r.dfn = cd(dfn);
    r.dscale = cd(dscale);
    r.dbase = cd(dbase);
  }
  {
    std::vector<R> dX = cv(p.dX0), dfn = cv(p.dfn0), dscale = cv(p.dscale0), dbase = cv(p.dbase0);
    hc_pre_backward_rows<R>(dx.data(), static_cast<const R*>(nullptr), static_cast<const R*>(nullptr), X.data(),
                            fn.data(), scale.data(), base.data(), mixes.data(), rstd.data(), dX.data(), dfn.data(),
                            dscale.data(), dbase.data(), T, p.d, true);
    r.dX_acc = cd(dX);
    r.dfn_nodp = cd(dfn);
    r.dscale_nodp = cd(dscale);
    r.dbase_nodp = cd(dbase);
  }
  // post, on the reference's own post / comb
  std::vector<R> Xnew(static_cast<size_t>(T * N)), dF(static_cast<size_t>(T * D)), dXp(static_cast<size_t>(T * N)),
      gpost(static_cast<size_t>(T * n)), gcomb(static_cast<size_t>(T * n * n));
  hc_post_forward_rows<R>(F.data(), X.data(), post.data(), comb.data(), Xnew.data(), T, n, D);
  hc_post_backward_rows<R>(dXnew.data(), F.data(), X.data(), post.data(), comb.data(), dF.data(), dXp.data(),
                           gpost.data(), gcomb.data(), T, n, D);
  r.Xnew = cd(Xnew);
  r.dF = cd(dF);
  r.dXp = cd(dXp);
  r.dpost = cd(gpost);
  r.dcomb = cd(gcomb);
  return r;
}

constexpr double kFwdRtol = 2e-5;
constexpr double kBwdRtol = 1e-4;

void check_all(const MhcResult& g, const MhcResult& r, const std::string& what) {
  double w = 0.0;
  auto f = [&](const std::vector<double>& a, const std::vector<double>& b, double tol, const char* name) {
    w = std::max(w, expect_close_scaled(a, b, tol, what + " " + name));
  };
  f(g.x, r.x, kFwdRtol, "x");
  f(g.post, r.post, kFwdRtol, "post");
  f(g.comb, r.comb, kFwdRtol, "comb");
  f(g.mixes, r.mixes, kFwdRtol, "mixes");
  f(g.rstd, r.rstd, kFwdRtol, "rstd");
  f(g.Xnew, r.Xnew, kFwdRtol, "Xnew");
  f(g.dF, r.dF, kFwdRtol, "dF");
  f(g.dXp, r.dXp, kFwdRtol, "post dX");
  f(g.dpost, r.dpost, kFwdRtol, "dpost");
  f(g.dcomb, r.dcomb, kFwdRtol, "dcomb");
  const double wf = w;
  w = 0.0;
  f(g.dX, r.dX, kBwdRtol, "pre dX");
  f(g.dfn, r.dfn, kBwdRtol, "dfn");
  f(g.dscale, r.dscale, kBwdRtol, "dscale");
  f(g.dbase, r.dbase, kBwdRtol, "dbase");
  f(g.dX_acc, r.dX_acc, kBwdRtol, "pre dX (accumulate, no dpost/dcomb)");
  f(g.dfn_nodp, r.dfn_nodp, kBwdRtol, "dfn (no dpost/dcomb)");
  f(g.dscale_nodp, r.dscale_nodp, kBwdRtol, "dscale (no dpost/dcomb)");
  f(g.dbase_nodp, r.dbase_nodp, kBwdRtol, "dbase (no dpost/dcomb)");
  std::printf("[ %s ] max |err| / max|ref|: forward + post %.2e, pre backward %.2e\n", what.c_str(), wf, w);
}

std::string name_of(const MhcCase& c) {
  return "T" + std::to_string(c.T) + " n" + std::to_string(c.n) + " D" + std::to_string(c.D) + " iters" +
         std::to_string(c.iters);
}

TEST(MhcCpu, FloatReferenceMeetsTheStatedTolerance) {
  for (const MhcCase& c : cases()) {
    const MhcProblem p = make_problem(c);
    check_all(reference<float>(p), reference<double>(p), "cpu-f32 " + name_of(c));
  }
}

// ---- HyperHead (the final collapse): M = n mixes, one scale ----------------------------------------------------
struct HeadResult {
  std::vector<double> h, mixes, rstd, dX, dfn, dscale, dbase, dX_acc;
};

struct HeadProblem {
  MhcCase c;
  HcDims d;
  std::vector<float> X, fn, scale, base, dh, dX0, dfn0, dscale0, dbase0;
};

HeadProblem make_head_problem(const MhcCase& c) {
  HeadProblem p;
  p.c = c;
  p.d = dims_of(c);
  const int64_t n = c.n, N = p.d.width();
  const float fs = 1.0f / std::sqrt(static_cast<float>(N));
  p.X = uniform(c.T * N, -1.0f, 1.0f);
  p.fn = uniform(n * N, -fs, fs);
  p.scale = uniform(1, 0.5f, 1.5f);
  p.base = uniform(n, -1.0f, 1.0f);
  p.dh = uniform(c.T * c.D, -1.0f, 1.0f);
  p.dX0 = uniform(c.T * N, -0.5f, 0.5f);
  p.dfn0 = uniform(n * N, -0.5f, 0.5f);
  p.dscale0 = uniform(1, -0.5f, 0.5f);
  p.dbase0 = uniform(n, -0.5f, 0.5f);
  return p;
}

template <typename R>
HeadResult head_reference(const HeadProblem& p) {
  auto cv = [](const std::vector<float>& v) { return std::vector<R>(v.begin(), v.end()); };
  const int64_t T = p.c.T, n = p.c.n, D = p.c.D, N = p.d.width();
  const auto X = cv(p.X), fn = cv(p.fn), scale = cv(p.scale), base = cv(p.base), dh = cv(p.dh);
  std::vector<R> h(static_cast<size_t>(T * D)), mixes(static_cast<size_t>(T * n)), rstd(static_cast<size_t>(T));
  hc_head_forward_rows<R>(X.data(), fn.data(), scale.data(), base.data(), h.data(), mixes.data(), rstd.data(), T, p.d);
  HeadResult r{cd(h), cd(mixes), cd(rstd)};
  std::vector<R> dX(static_cast<size_t>(T * N)), dfn = cv(p.dfn0), dscale = cv(p.dscale0), dbase = cv(p.dbase0);
  hc_head_backward_rows<R>(dh.data(), X.data(), fn.data(), scale.data(), base.data(), mixes.data(), rstd.data(),
                           dX.data(), dfn.data(), dscale.data(), dbase.data(), T, p.d, false);
  r.dX = cd(dX);
  r.dfn = cd(dfn);
  r.dscale = cd(dscale);
  r.dbase = cd(dbase);
  std::vector<R> dXa = cv(p.dX0);
  hc_head_backward_rows<R>(dh.data(), X.data(), fn.data(), scale.data(), base.data(), mixes.data(), rstd.data(),
                           dXa.data(), static_cast<R*>(nullptr), static_cast<R*>(nullptr), static_cast<R*>(nullptr), T,
                           p.d, true);
  r.dX_acc = cd(dXa);
  return r;
}

void check_head(const HeadResult& g, const HeadResult& r, const std::string& what) {
  double wf = 0.0, wb = 0.0;
  wf = std::max(wf, expect_close_scaled(g.h, r.h, kFwdRtol, what + " h"));
  wf = std::max(wf, expect_close_scaled(g.mixes, r.mixes, kFwdRtol, what + " mixes"));
  wf = std::max(wf, expect_close_scaled(g.rstd, r.rstd, kFwdRtol, what + " rstd"));
  wb = std::max(wb, expect_close_scaled(g.dX, r.dX, kBwdRtol, what + " dX"));
  wb = std::max(wb, expect_close_scaled(g.dfn, r.dfn, kBwdRtol, what + " dfn"));
  wb = std::max(wb, expect_close_scaled(g.dscale, r.dscale, kBwdRtol, what + " dscale"));
  wb = std::max(wb, expect_close_scaled(g.dbase, r.dbase, kBwdRtol, what + " dbase"));
  wb = std::max(wb, expect_close_scaled(g.dX_acc, r.dX_acc, kBwdRtol, what + " dX (accumulate)"));
  std::printf("[ %s ] head max |err| / max|ref|: forward %.2e, backward %.2e\n", what.c_str(), wf, wb);
}

TEST(MhcCpu, HeadFloatReferenceMeetsTheStatedTolerance) {
  for (const MhcCase& c : cases()) {
    const HeadProblem p = make_head_problem(c);
    check_head(head_reference<float>(p), head_reference<double>(p), "cpu-f32 " + name_of(c));
  }
}

// ---- GPU ---------------------------------------------------------------------------------------------------------

class GpuMhc : public GpuTest {};

cuda::MhcShape shape_of(const MhcCase& c, const HcDims& d) {
  cuda::MhcShape s;
  s.T = c.T;
  s.n = c.n;
  s.D = c.D;
  s.iters = c.iters;
  s.hc_eps = d.hc_eps;
  s.norm_eps = d.norm_eps;
  return s;
}

Tensor gpu_f(const std::vector<float>& v) { return Tensor::from_floats({static_cast<int64_t>(v.size())}, v).to(kGpu); }
Tensor gpu_zeros(int64_t n) { return Tensor::zeros({std::max<int64_t>(n, 1)}, DType::F32, kGpu); }
std::vector<double> host(const Tensor& t, int64_t n) {
  const auto f = t.to_floats();
  return std::vector<double>(f.begin(), f.begin() + n);
}

MhcResult run_gpu(const MhcProblem& p) {
  const int64_t T = p.c.T, n = p.c.n, D = p.c.D, M = p.d.mix(), N = p.d.width();
  const cuda::MhcShape s = shape_of(p.c, p.d);
  void* st = cuda::current_stream(0);
  const Tensor X = gpu_f(p.X), fn = gpu_f(p.fn), scale = gpu_f(p.scale), base = gpu_f(p.base), dx = gpu_f(p.dx),
               dpost = gpu_f(p.dpost), dcomb = gpu_f(p.dcomb), F = gpu_f(p.F), dXnew = gpu_f(p.dXnew);
  const Tensor x = gpu_zeros(T * D), post = gpu_zeros(T * n), comb = gpu_zeros(T * n * n), mixes = gpu_zeros(T * M),
               rstd = gpu_zeros(T), ws = gpu_zeros(cuda::mhc_pre_backward_workspace(s));
  cuda::mhc_pre_forward(X.data<float>(), fn.data<float>(), scale.data<float>(), base.data<float>(), x.data<float>(),
                        post.data<float>(), comb.data<float>(), mixes.data<float>(), rstd.data<float>(), s, st);
  MhcResult r{host(x, T * D), host(post, T * n), host(comb, T * n * n), host(mixes, T * M), host(rstd, T)};
  {
    const Tensor dX = gpu_zeros(T * N), dfn = gpu_f(p.dfn0), dscale = gpu_f(p.dscale0), dbase = gpu_f(p.dbase0);
    cuda::mhc_pre_backward(dx.data<float>(), dpost.data<float>(), dcomb.data<float>(), X.data<float>(),
                           fn.data<float>(), scale.data<float>(), base.data<float>(), mixes.data<float>(),
                           rstd.data<float>(), dX.data<float>(), dfn.data<float>(), dscale.data<float>(),
                           dbase.data<float>(), false, ws.data<float>(), s, st);
    r.dX = host(dX, T * N);
    r.dfn = host(dfn, M * N);
    r.dscale = host(dscale, 3);
    r.dbase = host(dbase, M);
  }
  {
    const Tensor dX = gpu_f(p.dX0), dfn = gpu_f(p.dfn0), dscale = gpu_f(p.dscale0), dbase = gpu_f(p.dbase0);
    cuda::mhc_pre_backward(dx.data<float>(), nullptr, nullptr, X.data<float>(), fn.data<float>(), scale.data<float>(),
                           base.data<float>(), mixes.data<float>(), rstd.data<float>(), dX.data<float>(),
                           dfn.data<float>(), dscale.data<float>(), dbase.data<float>(), true, ws.data<float>(), s, st);
    r.dX_acc = host(dX, T * N);
    r.dfn_nodp = host(dfn, M * N);
    r.dscale_nodp = host(dscale, 3);
    r.dbase_nodp = host(dbase, M);
  }
  const Tensor Xnew = gpu_zeros(T * N), dF = gpu_zeros(T * D), dXp = gpu_zeros(T * N), gpost = gpu_zeros(T * n),
               gcomb = gpu_zeros(T * n * n);
  cuda::mhc_post_forward(F.data<float>(), X.data<float>(), post.data<float>(), comb.data<float>(), Xnew.data<float>(),
                         s, st);
  cuda::mhc_post_backward(dXnew.data<float>(), F.data<float>(), X.data<float>(), post.data<float>(),
                          comb.data<float>(), dF.data<float>(), dXp.data<float>(), gpost.data<float>(),
                          gcomb.data<float>(), s, st);
  cuda::synchronize(0);
  r.Xnew = host(Xnew, T * N);
  r.dF = host(dF, T * D);
  r.dXp = host(dXp, T * N);
  r.dpost = host(gpost, T * n);
  r.dcomb = host(gcomb, T * n * n);
  return r;
}

TEST_F(GpuMhc, MatchesCpuReference) {
  for (const MhcCase& c : cases()) {
    const MhcProblem p = make_problem(c);
    check_all(run_gpu(p), reference<double>(p), "gpu " + name_of(c));
  }
}

HeadResult run_gpu_head(const HeadProblem& p) {
  const int64_t T = p.c.T, n = p.c.n, D = p.c.D, N = p.d.width();
  const cuda::MhcShape s = shape_of(p.c, p.d);
  void* st = cuda::current_stream(0);
  const Tensor X = gpu_f(p.X), fn = gpu_f(p.fn), scale = gpu_f(p.scale), base = gpu_f(p.base), dh = gpu_f(p.dh);
  const Tensor h = gpu_f(std::vector<float>(static_cast<size_t>(T * D), NAN)),
               mixes = gpu_f(std::vector<float>(static_cast<size_t>(T * n), NAN)),
               rstd = gpu_f(std::vector<float>(static_cast<size_t>(T), NAN)),
               ws = gpu_zeros(cuda::mhc_head_backward_workspace(s));
  cuda::mhc_head_forward(X.data<float>(), fn.data<float>(), scale.data<float>(), base.data<float>(), h.data<float>(),
                         mixes.data<float>(), rstd.data<float>(), s, st);
  HeadResult r{host(h, T * D), host(mixes, T * n), host(rstd, T)};
  const Tensor dX = gpu_f(std::vector<float>(static_cast<size_t>(T * N), NAN)), dfn = gpu_f(p.dfn0),
               dscale = gpu_f(p.dscale0), dbase = gpu_f(p.dbase0), dXa = gpu_f(p.dX0);
  cuda::mhc_head_backward(dh.data<float>(), X.data<float>(), fn.data<float>(), scale.data<float>(), base.data<float>(),
                          mixes.data<float>(), rstd.data<float>(), dX.data<float>(), dfn.data<float>(),
                          dscale.data<float>(), dbase.data<float>(), false, ws.data<float>(), s, st);
  cuda::mhc_head_backward(dh.data<float>(), X.data<float>(), fn.data<float>(), scale.data<float>(), base.data<float>(),
                          mixes.data<float>(), rstd.data<float>(), dXa.data<float>(), nullptr, nullptr, nullptr, true,
                          ws.data<float>(), s, st);
  cuda::synchronize(0);
  r.dX = host(dX, T * N);
  r.dfn = host(dfn, n * N);
  r.dscale = host(dscale, 1);
  r.dbase = host(dbase, n);
  r.dX_acc = host(dXa, T * N);
  return r;
}

TEST_F(GpuMhc, HeadMatchesCpuReference) {
  for (const MhcCase& c : cases()) {
    const HeadProblem p = make_head_problem(c);
    check_head(run_gpu_head(p), head_reference<double>(p), "gpu " + name_of(c));
  }
}

TEST_F(GpuMhc, BackwardIsBitwiseDeterministic) {
  const MhcProblem p = make_problem(cases()[0]);
  const MhcResult a = run_gpu(p), b = run_gpu(p);
  EXPECT_EQ(a.dX, b.dX);
  EXPECT_EQ(a.dfn, b.dfn);
  EXPECT_EQ(a.dscale, b.dscale);
  EXPECT_EQ(a.dbase, b.dbase);
}

}  // namespace
}  // namespace dsv4::gputest
