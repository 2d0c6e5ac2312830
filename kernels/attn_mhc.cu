// CUDA twins of the mHC hyper-connection cores (CPU reference: src/model/mhc.h, hc_pre_* / hc_post_* rows;
// host API: kernels/attention_kernels.h). FP32 (the sum of squares in FP64, as on the CPU).
//
// pre forward: one 256-thread block per token. Sum of squares of the n*D stream values (FP64, fixed tree),
//   the M = (2+n)n mixing dot products of the flattened row with fn (warp per mix, lanes over n*D: the small
//   GEMM is fused, fn stays in L2), rstd = (float)(1 / sqrt(ss / N + eps)), mixes = dot * rstd; then thread 0
//   does the per-token split in registers/local memory in the CPU's exact operation order: sigmoid gates
//   (pre + hc_eps, 2 * sigmoid post) and Sinkhorn (row softmax + eps, column step, iters-1 row/column pairs);
//   finally the block forms x = sum_j pre[j] X[j] (j ascending, as the CPU's lincomb).
// pre backward: per token, dpre[j] = dx . X[j] (warp per stream), thread 0 recomputes the gates and the full
//   Sinkhorn trajectory from the saved mixes (shared-memory scratch of sinkhorn_workspace_size floats) and runs
//   its backward, producing dz (pre-activation grads) and dm = dz * scale[group] * rstd plus the rstd term c;
//   the block writes dX = (acc ? dX : 0) + dm @ fn + pre[j] dx - c X[j]. Parameter gradients are separate
//   deterministic reductions over tokens: dfn[m, k] += sum_t dm[t, m] X[t, k] (one thread per (k, 8 mixes),
//   t ascending), dbase / dscale in FP64 (one thread per mix, t ascending; dscale sums its mixes in order).
// head forward / backward (HyperHead): the pre kernels with M = n mixes, one scale, no post gates or Sinkhorn.
// post forward: element-wise, Xnew[k, d] = post[k] F[d] + sum_j comb[j, k] X[j, d] in the CPU's term order.
// post backward: per token, dF / dX element-wise (k ascending), dpost / dcomb as warp dot products.
// Deviations from the CPU: dot products / the mixing GEMM sum in a different order (warp trees vs blocked
// sequential sums), CUDA's expf (<= 2 ulp) vs glibc's, FMA contraction. Hence tolerances, not bits
// (tests/gpu/test_gpu_mhc.cpp).
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <algorithm>

#include "kernels/attention_kernels.h"

namespace dsv4::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxNN = kMhcMaxN * kMhcMaxN;
constexpr int kMaxM = (2 + kMhcMaxN) * kMhcMaxN;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_dot(const float* a, const float* b, int64_t len, int lane) {
  float s = 0.0f;
  for (int64_t i = lane; i < len; i += 32) s = fmaf(a[i], b[i], s);
  return warp_sum(s);
}

__device__ __forceinline__ float sigmoidf(float z) { return 1.0f / (1.0f + expf(-z)); }

// ---- Sinkhorn on one n x n matrix, the CPU's operation order (mhc_detail::normalise / softmax_rows) ----------
__device__ void sk_normalise(const float* x, float* y, float* den, int n, bool col, float e) {
  for (int a = 0; a < n; ++a) {
    float s = 0.0f;
    for (int b = 0; b < n; ++b) s += col ? x[b * n + a] : x[a * n + b];
    const float d = s + e;
    if (den) den[a] = d;
    for (int b = 0; b < n; ++b) {
      const int i = col ? b * n + a : a * n + b;
      y[i] = x[i] / d;
    }
  }
}

__device__ void sk_normalise_backward(float* g, const float* y, const float* den, int n, bool col) {
  for (int a = 0; a < n; ++a) {
    float dot = 0.0f;
    for (int b = 0; b < n; ++b) {
      const int i = col ? b * n + a : a * n + b;
      dot += g[i] * y[i];
    }
    for (int b = 0; b < n; ++b) {
      const int i = col ? b * n + a : a * n + b;
      g[i] = (g[i] - dot) / den[a];
    }
  }
}

__device__ void sk_softmax_rows(const float* L, float* s, int n) {
  for (int j = 0; j < n; ++j) {
    const float* l = L + j * n;
    float m = l[0];
    for (int k = 1; k < n; ++k) m = fmaxf(m, l[k]);
    float sum = 0.0f;
    for (int k = 0; k < n; ++k) {
      s[j * n + k] = expf(l[k] - m);
      sum += s[j * n + k];
    }
    for (int k = 0; k < n; ++k) s[j * n + k] = s[j * n + k] / sum;
  }
}

__host__ __device__ __forceinline__ int sk_steps(int iters) { return 2 * iters - 1; }
__device__ __forceinline__ bool sk_step_is_col(int k) { return (k % 2) == 0; }

__device__ void sk_forward(const float* logits, float* out, int n, int iters, float e) {
  sk_softmax_rows(logits, out, n);
  for (int i = 0; i < n * n; ++i) out[i] = out[i] + e;
  for (int k = 0; k < sk_steps(iters); ++k) sk_normalise(out, out, nullptr, n, sk_step_is_col(k), e);
}

// work: 2 nn + steps (nn + n) floats (the CPU's sinkhorn_workspace_size).
__device__ void sk_backward(const float* logits, const float* dout, float* dlogits, int n, int iters, float e,
                            float* work) {
  const int nn = n * n, steps = sk_steps(iters);
  float* s = work;
  float* g = s + nn;
  float* ys = g + nn;
  float* dens = ys + steps * nn;
  sk_softmax_rows(logits, s, n);
  for (int i = 0; i < nn; ++i) g[i] = s[i] + e;
  const float* prev = g;
  for (int k = 0; k < steps; ++k) {
    sk_normalise(prev, ys + k * nn, dens + k * n, n, sk_step_is_col(k), e);
    prev = ys + k * nn;
  }
  for (int i = 0; i < nn; ++i) g[i] = dout[i];
  for (int k = steps - 1; k >= 0; --k) sk_normalise_backward(g, ys + k * nn, dens + k * n, n, sk_step_is_col(k));
  for (int j = 0; j < n; ++j) {
    float dot = 0.0f;
    for (int k = 0; k < n; ++k) dot += g[j * n + k] * s[j * n + k];
    for (int k = 0; k < n; ++k) dlogits[j * n + k] = s[j * n + k] * (g[j * n + k] - dot);
  }
}

// head: the HyperHead collapse (M = n mixes, all scaled by scale[0]; no post gates, no Sinkhorn).
struct Dims {
  int n, D, M, iters;
  int64_t N;
  float hc_eps;
  double norm_eps;
  bool head;
};

// ---- pre forward -----------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads)
    mhc_pre_fwd_kernel(const float* __restrict__ X, const float* __restrict__ fn, const float* __restrict__ scale,
                       const float* __restrict__ base, float* __restrict__ x, float* __restrict__ post,
                       float* __restrict__ comb, float* __restrict__ mixes, float* __restrict__ rstd, Dims dm) {
  __shared__ double red[kThreads];
  __shared__ float mix_s[kMaxM];
  __shared__ float pre_s[kMhcMaxN];
  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int n = dm.n, M = dm.M;
  const int64_t N = dm.N, D = dm.D;
  const float* Xt = X + t * N;

  double ss = 0.0;
  for (int64_t k = tid; k < N; k += kThreads) ss += static_cast<double>(Xt[k]) * static_cast<double>(Xt[k]);
  red[tid] = ss;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  const float rs = static_cast<float>(1.0 / sqrt(red[0] / static_cast<double>(N) + dm.norm_eps));
  for (int m = warp; m < M; m += kWarps) {
    const float v = warp_dot(Xt, fn + m * N, N, lane) * rs;
    if (lane == 0) {
      mix_s[m] = v;
      mixes[t * M + m] = v;
    }
  }
  __syncthreads();
  if (tid == 0) {
    rstd[t] = rs;
    for (int j = 0; j < n; ++j) pre_s[j] = sigmoidf(mix_s[j] * scale[0] + base[j]) + dm.hc_eps;
  }
  if (tid == 0 && !dm.head) {
    for (int j = 0; j < n; ++j) post[t * n + j] = 2.0f * sigmoidf(mix_s[n + j] * scale[1] + base[n + j]);
    float logits[kMaxNN], c[kMaxNN];
    for (int i = 0; i < n * n; ++i) logits[i] = mix_s[2 * n + i] * scale[2] + base[2 * n + i];
    sk_forward(logits, c, n, dm.iters, dm.hc_eps);
    for (int i = 0; i < n * n; ++i) comb[t * n * n + i] = c[i];
  }
  __syncthreads();
  for (int64_t d = tid; d < D; d += kThreads) {
    float acc = 0.0f;
    for (int j = 0; j < n; ++j) acc += pre_s[j] * Xt[j * D + d];
    x[t * D + d] = acc;
  }
}

// ---- pre backward ----------------------------------------------------------------------------------------------
// Per token: dX and the per-token dz / dm (workspace [T, M] each).
__global__ void __launch_bounds__(kThreads)
    mhc_pre_bwd_token_kernel(const float* __restrict__ dx, const float* __restrict__ dpost,
                             const float* __restrict__ dcomb, const float* __restrict__ X,
                             const float* __restrict__ fn, const float* __restrict__ scale,
                             const float* __restrict__ base, const float* __restrict__ mixes,
                             const float* __restrict__ rstd, float* __restrict__ dX, bool accumulate,
                             float* __restrict__ ws_dz, float* __restrict__ ws_dm, Dims dm) {
  extern __shared__ float work[];  // 2 nn + steps (nn + n) + nn floats
  __shared__ float mix_s[kMaxM], dz_s[kMaxM], dm_s[kMaxM];
  __shared__ float dpre_s[kMhcMaxN], pre_s[kMhcMaxN];
  __shared__ float c_s;
  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int n = dm.n, M = dm.M, nn = dm.n * dm.n;
  const int64_t N = dm.N, D = dm.D;
  const float* Xt = X + t * N;
  const float* dxt = dx + t * D;

  for (int j = warp; j < n; j += kWarps) {
    const float v = warp_dot(dxt, Xt + j * D, D, lane);
    if (lane == 0) dpre_s[j] = v;
  }
  for (int m = tid; m < M; m += kThreads) mix_s[m] = mixes[t * M + m];
  __syncthreads();
  if (tid == 0) {
    const float* mx = mix_s;
    for (int j = 0; j < n; ++j) {
      const float sp = sigmoidf(mx[j] * scale[0] + base[j]);
      pre_s[j] = sp + dm.hc_eps;
      dz_s[j] = dpre_s[j] * sp * (1.0f - sp);
      if (dm.head) continue;
      const float so = sigmoidf(mx[n + j] * scale[1] + base[n + j]);
      dz_s[n + j] = dpost ? 2.0f * dpost[t * n + j] * so * (1.0f - so) : 0.0f;
    }
    if (dm.head) {
    } else if (dcomb) {
      float* logits = work;
      for (int i = 0; i < nn; ++i) logits[i] = mx[2 * n + i] * scale[2] + base[2 * n + i];
      sk_backward(logits, dcomb + t * nn, dz_s + 2 * n, n, dm.iters, dm.hc_eps, work + nn);
    } else {
      for (int i = 0; i < nn; ++i) dz_s[2 * n + i] = 0.0f;
    }
    float dot = 0.0f;
    for (int m = 0; m < M; ++m) {
      const int grp = dm.head || m < n ? 0 : (m < 2 * n ? 1 : 2);
      dm_s[m] = dz_s[m] * scale[grp];
      dot += dm_s[m] * mx[m];
    }
    const float r = rstd[t];
    c_s = dot * r * r / static_cast<float>(N);
    for (int m = 0; m < M; ++m) {
      dm_s[m] *= r;
      ws_dz[t * M + m] = dz_s[m];
      ws_dm[t * M + m] = dm_s[m];
    }
  }
  __syncthreads();
  const float c = c_s;
  for (int64_t k = tid; k < N; k += kThreads) {
    const int j = static_cast<int>(k / D);
    const int64_t d = k - j * D;
    float g = 0.0f;
    for (int m = 0; m < M; ++m) g = fmaf(dm_s[m], fn[m * N + k], g);
    float v = (accumulate ? dX[t * N + k] : 0.0f) + g;
    v += pre_s[j] * dxt[d];
    v += -c * Xt[k];
    dX[t * N + k] = v;
  }
}

constexpr int kFnMixes = 8;  // mixes per thread of the dfn reduction

// dfn[m, k] += sum_t dm[t, m] X[t, k], t ascending.
__global__ void __launch_bounds__(kThreads)
    mhc_pre_bwd_dfn_kernel(const float* __restrict__ X, const float* __restrict__ ws_dm, float* __restrict__ dfn,
                           int64_t T, Dims dm) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int m0 = static_cast<int>(blockIdx.y) * kFnMixes;
  if (k >= dm.N) return;
  const int mc = min(kFnMixes, dm.M - m0);
  float acc[kFnMixes];
#pragma unroll
  for (int i = 0; i < kFnMixes; ++i) acc[i] = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    const float xv = X[t * dm.N + k];
    const float* g = ws_dm + t * dm.M + m0;
#pragma unroll
    for (int i = 0; i < kFnMixes; ++i)
      if (i < mc) acc[i] = fmaf(g[i], xv, acc[i]);
  }
#pragma unroll
  for (int i = 0; i < kFnMixes; ++i)
    if (i < mc) dfn[(m0 + i) * dm.N + k] += acc[i];
}

// dbase[m] += sum_t dz[t, m]; dscale[g] += sum_{m in g} sum_t dz[t, m] mixes[t, m] (FP64, fixed order).
__global__ void mhc_pre_bwd_params_kernel(const float* __restrict__ ws_dz, const float* __restrict__ mixes,
                                          float* __restrict__ dscale, float* __restrict__ dbase, int64_t T, Dims dm) {
  __shared__ double zs[kMaxM];
  const int m = static_cast<int>(threadIdx.x);
  if (m < dm.M) {
    double zb = 0.0, zm = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      const double z = ws_dz[t * dm.M + m];
      zb += z;
      zm += z * static_cast<double>(mixes[t * dm.M + m]);
    }
    if (dbase) dbase[m] += static_cast<float>(zb);
    zs[m] = zm;
  }
  __syncthreads();
  if (m == 0 && dscale) {
    double g[3] = {0.0, 0.0, 0.0};
    for (int i = 0; i < dm.M; ++i) g[dm.head || i < dm.n ? 0 : (i < 2 * dm.n ? 1 : 2)] += zs[i];
    for (int i = 0; i < (dm.head ? 1 : 3); ++i) dscale[i] += static_cast<float>(g[i]);
  }
}

// ---- post ------------------------------------------------------------------------------------------------------
__global__ void mhc_post_fwd_kernel(const float* __restrict__ F, const float* __restrict__ X,
                                    const float* __restrict__ post, const float* __restrict__ comb,
                                    float* __restrict__ Xnew, int64_t T, int n, int64_t D) {
  const int64_t total = T * n * D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % D;
    const int64_t tk = i / D;
    const int k = static_cast<int>(tk % n);
    const int64_t t = tk / n;
    float acc = 0.0f;
    acc += post[t * n + k] * F[t * D + d];
    for (int j = 0; j < n; ++j) acc += comb[(t * n + j) * n + k] * X[(t * n + j) * D + d];
    Xnew[i] = acc;
  }
}

__global__ void __launch_bounds__(kThreads)
    mhc_post_bwd_kernel(const float* __restrict__ dXnew, const float* __restrict__ F, const float* __restrict__ X,
                        const float* __restrict__ post, const float* __restrict__ comb, float* __restrict__ dF,
                        float* __restrict__ dX, float* __restrict__ dpost, float* __restrict__ dcomb, int n,
                        int64_t D) {
  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const float* g = dXnew + t * n * D;
  const float* f = F + t * D;
  const float* Xt = X + t * n * D;
  const float* pt = post + t * n;
  const float* ct = comb + t * n * n;
  for (int64_t d = tid; d < D; d += kThreads) {
    float acc = 0.0f;
    for (int k = 0; k < n; ++k) acc += pt[k] * g[k * D + d];
    dF[t * D + d] = acc;
    for (int j = 0; j < n; ++j) {
      float a = 0.0f;
      for (int k = 0; k < n; ++k) a += ct[j * n + k] * g[k * D + d];
      dX[(t * n + j) * D + d] = a;
    }
  }
  // dot products: i < n -> dpost[i] = <g[i], F>; else i - n = j n + k -> dcomb[j, k] = <g[k], X[j]>.
  for (int i = warp; i < n + n * n; i += kWarps) {
    if (i < n) {
      const float v = warp_dot(g + i * D, f, D, lane);
      if (lane == 0) dpost[t * n + i] = v;
    } else {
      const int jk = i - n, j = jk / n, k = jk - j * n;
      const float v = warp_dot(g + k * D, Xt + j * D, D, lane);
      if (lane == 0) dcomb[t * n * n + jk] = v;
    }
  }
}

Dims dims_of(const MhcShape& s, const char* what, bool head = false) {
  DSV4_CHECK(s.n >= 1 && s.n <= kMhcMaxN && s.D >= 1 && s.T >= 0 && s.iters >= 1,
             "cuda::{}: needs 1 <= n <= {}, D >= 1, T >= 0, iters >= 1 (got n={} D={} T={} iters={})", what, kMhcMaxN,
             s.n, s.D, s.T, s.iters);
  DSV4_CHECK(s.D < (int64_t{1} << 30) && s.T < (int64_t{1} << 31), "cuda::{}: sizes exceed the grid", what);
  return Dims{static_cast<int>(s.n), static_cast<int>(s.D), static_cast<int>(head ? s.n : s.M()),
              static_cast<int>(s.iters), s.N(), static_cast<float>(s.hc_eps), s.norm_eps, head};
}

}  // namespace

namespace {
void pre_forward(const float* X, const float* fn, const float* scale, const float* base, float* x, float* post,
                 float* comb, float* mixes, float* rstd, const MhcShape& s, const Dims& dm, void* stream) {
  if (s.T == 0) return;
  mhc_pre_fwd_kernel<<<static_cast<unsigned>(s.T), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      X, fn, scale, base, x, post, comb, mixes, rstd, dm);
  CUDA_CHECK_LAUNCH();
}

void pre_backward(const float* dx, const float* dpost, const float* dcomb, const float* X, const float* fn,
                  const float* scale, const float* base, const float* mixes, const float* rstd, float* dX, float* dfn,
                  float* dscale, float* dbase, bool accumulate, float* workspace, const MhcShape& s, const Dims& dm,
                  void* stream) {
  if (s.T == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  float* ws_dz = workspace;
  float* ws_dm = workspace + s.T * dm.M;
  const int nn = dm.n * dm.n;
  const size_t work_bytes =
      dm.head ? 0 : static_cast<size_t>(3 * nn + sk_steps(dm.iters) * (nn + dm.n)) * sizeof(float);
  DSV4_CHECK(work_bytes <= 160 * 1024, "cuda::mhc_pre_backward: Sinkhorn scratch of {} bytes (iters {}) too large",
             work_bytes, dm.iters);
  if (work_bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(mhc_pre_bwd_token_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(work_bytes)));
  mhc_pre_bwd_token_kernel<<<static_cast<unsigned>(s.T), kThreads, work_bytes, st>>>(
      dx, dpost, dcomb, X, fn, scale, base, mixes, rstd, dX, accumulate, ws_dz, ws_dm, dm);
  CUDA_CHECK_LAUNCH();
  if (dfn) {
    const dim3 grid(static_cast<unsigned>((s.N() + kThreads - 1) / kThreads),
                    static_cast<unsigned>((dm.M + kFnMixes - 1) / kFnMixes));
    mhc_pre_bwd_dfn_kernel<<<grid, kThreads, 0, st>>>(X, ws_dm, dfn, s.T, dm);
    CUDA_CHECK_LAUNCH();
  }
  if (dscale || dbase) {
    mhc_pre_bwd_params_kernel<<<1, 128, 0, st>>>(ws_dz, mixes, dscale, dbase, s.T, dm);
    CUDA_CHECK_LAUNCH();
  }
}
}  // namespace

void mhc_pre_forward(const float* X, const float* fn, const float* scale, const float* base, float* x, float* post,
                     float* comb, float* mixes, float* rstd, const MhcShape& s, void* stream) {
  pre_forward(X, fn, scale, base, x, post, comb, mixes, rstd, s, dims_of(s, "mhc_pre_forward"), stream);
}

void mhc_pre_backward(const float* dx, const float* dpost, const float* dcomb, const float* X, const float* fn,
                      const float* scale, const float* base, const float* mixes, const float* rstd, float* dX,
                      float* dfn, float* dscale, float* dbase, bool accumulate, float* workspace, const MhcShape& s,
                      void* stream) {
  pre_backward(dx, dpost, dcomb, X, fn, scale, base, mixes, rstd, dX, dfn, dscale, dbase, accumulate, workspace, s,
               dims_of(s, "mhc_pre_backward"), stream);
}

void mhc_head_forward(const float* X, const float* fn, const float* scale, const float* base, float* h,
                      float* mixes, float* rstd, const MhcShape& s, void* stream) {
  pre_forward(X, fn, scale, base, h, nullptr, nullptr, mixes, rstd, s, dims_of(s, "mhc_head_forward", true), stream);
}

void mhc_head_backward(const float* dh, const float* X, const float* fn, const float* scale, const float* base,
                       const float* mixes, const float* rstd, float* dX, float* dfn, float* dscale, float* dbase,
                       bool accumulate, float* workspace, const MhcShape& s, void* stream) {
  pre_backward(dh, nullptr, nullptr, X, fn, scale, base, mixes, rstd, dX, dfn, dscale, dbase, accumulate, workspace,
               s, dims_of(s, "mhc_head_backward", true), stream);
}

void mhc_post_forward(const float* F, const float* X, const float* post, const float* comb, float* Xnew,
                      const MhcShape& s, void* stream) {
  const Dims dm = dims_of(s, "mhc_post_forward");
  const int64_t total = s.T * s.n * s.D;
  if (total == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 18));
  mhc_post_fwd_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(F, X, post, comb, Xnew, s.T, dm.n,
                                                                                  s.D);
  CUDA_CHECK_LAUNCH();
}

void mhc_post_backward(const float* dXnew, const float* F, const float* X, const float* post, const float* comb,
                       float* dF, float* dX, float* dpost, float* dcomb, const MhcShape& s, void* stream) {
  const Dims dm = dims_of(s, "mhc_post_backward");
  if (s.T == 0) return;
  mhc_post_bwd_kernel<<<static_cast<unsigned>(s.T), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      dXnew, F, X, post, comb, dF, dX, dpost, dcomb, dm.n, s.D);
  CUDA_CHECK_LAUNCH();
}

}  // namespace dsv4::cuda
