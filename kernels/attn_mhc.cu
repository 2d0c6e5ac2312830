// CUDA twins of the mHC hyper-connection cores (CPU reference: src/model/mhc.h, hc_pre_* / hc_post_* rows;
// host API: kernels/attention_kernels.h). FP32 (the sum of squares in FP64, as on the CPU).
//
// pre forward: the M = (2+n)n mixing dot products of every token's flattened row with fn are one FP32 cuBLAS GEMM
//   dots [T, M] = X [T, N] fn^T (no TF32); then one warp per token: sum of squares of the n*D stream values (FP64,
//   lane partials then a fixed shuffle tree), rstd = (float)(1 / sqrt(ss / N + eps)), mixes = dots * rstd; lane 0
//   does the per-token split in the CPU's exact operation order: sigmoid gates (pre + hc_eps, 2 * sigmoid post)
//   and Sinkhorn (row softmax + eps, column step, iters-1 row/column pairs); finally the warp forms
//   x = sum_j pre[j] X[j] (j ascending, as the CPU's lincomb). (The first version ran one 256-thread block per
//   token with thread 0 doing Sinkhorn and every block re-reading fn from L2: 195 GB/s on an H100 at proxy-2b.)
// pre backward: one warp per token: dpre[j] = dx . X[j], lane 0 recomputes the gates and the full Sinkhorn
//   trajectory from the saved mixes (shared-memory scratch of sinkhorn_workspace_size floats per warp) and runs its
//   backward, producing dz (pre-activation grads), dm = dz * scale[group] * rstd and the rstd term c; the warp
//   writes dX = (acc ? dX : 0) + pre[j] dx - c X[j]; then two FP32 cuBLAS GEMMs: dX += dm [T, M] fn [M, N] and
//   dfn += dm^T X (deterministic: cuBLAS without atomics). dbase / dscale in FP64 (one block per mix, fixed split
//   and tree; dscale sums its mixes in order).
// Sinkhorn runs warp-cooperatively (one element of the n x n matrix per lane and slot, group sums read through
//   shuffles in the CPU's ascending order); the backward keeps the iterates in shared memory and recomputes each
//   step's denominators from them. (Serial per-token Sinkhorn on one thread cost 0.6 ms of the 1.6 ms pre backward
//   at proxy-2b on an H100; the serial dbase/dscale loop another 0.9 ms.)
// The GEMMs run on the device's current stream, which the host functions set to `stream` for the call.
// post forward: one block per (token, stream) row, Xnew[k, d] = post[k] F[d] + sum_j comb[j, k] X[j, d] in the
//   CPU's term order.
// post backward: per token, dF / dX element-wise (k ascending), dpost / dcomb as warp dot products.
// Deviations from the CPU: dot products / the mixing GEMMs sum in a different order (warp trees, cuBLAS tiles vs
// blocked sequential sums), CUDA's expf (<= 2 ulp) vs glibc's, FMA contraction. Hence tolerances, not bits
// (tests/gpu/test_gpu_mhc.cpp).
// head forward / backward (HyperHead): the pre kernels with M = n mixes, one scale, no post gates or Sinkhorn.
// post forward: one block per (token, stream) row, Xnew[k, d] = post[k] F[d] + sum_j comb[j, k] X[j, d] in the
//   CPU's term order.
// post backward: per token, dF / dX element-wise (k ascending), dpost / dcomb as warp dot products.
// Deviations from the CPU: dot products / the mixing GEMM sum in a different order (warp trees vs blocked
// sequential sums), CUDA's expf (<= 2 ulp) vs glibc's, FMA contraction. Hence tolerances, not bits
// (tests/gpu/test_gpu_mhc.cpp).
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <algorithm>
#include <memory>

#include "kernels/attention_kernels.h"
#include "kernels/cuda_runtime_api.h"
#include "kernels/ops_common.cuh"
#include "runtime/ops.h"

namespace dsv4::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxM = (2 + kMhcMaxN) * kMhcMaxN;

using detail::warp_dot;
using detail::warp_sum;

__device__ __forceinline__ float sigmoidf(float z) { return 1.0f / (1.0f + expf(-z)); }

// ---- Sinkhorn on one n x n matrix, warp-cooperative, the CPU's operation order -----------------------------------
// (mhc_detail::normalise / normalise_backward / softmax_rows.) Element e = lane + 32 s of the row-major matrix lives
// in slot s of lane `lane` (n <= 8: nn <= 64 elements, two slots); slots with e >= nn carry ignored values but take
// part in every shuffle. A group (row or column) sum is read element by element through shuffles in ascending
// order, starting from 0: the CPU's sequential sum, so every lane gets the CPU's value for its group.
__host__ __device__ __forceinline__ int sk_steps(int iters) { return 2 * iters - 1; }
__device__ __forceinline__ bool sk_step_is_col(int k) { return (k % 2) == 0; }

struct SkLane {
  int n, nn, e[2];  // e clamped into [0, nn) for indexing
  __device__ SkLane(int n_, int lane) : n(n_), nn(n_ * n_) {
    e[0] = min(lane, nn - 1);
    e[1] = min(lane + 32, nn - 1);
  }
  __device__ int member(int s, int b, bool col) const { return col ? b * n + e[s] % n : (e[s] / n) * n + b; }
};

__device__ __forceinline__ float sk_get(const float (&v)[2], int idx) {
  const float a = __shfl_sync(0xffffffffu, v[0], idx & 31);
  const float b = __shfl_sync(0xffffffffu, v[1], idx & 31);
  return idx < 32 ? a : b;
}

// Sum over the slot's group (row, or column when col) of v, in ascending order.
__device__ __forceinline__ void sk_group_sums(const float (&v)[2], const SkLane& L, bool col, float (&sum)[2]) {
#pragma unroll
  for (int s = 0; s < 2; ++s) sum[s] = 0.0f;
  for (int b = 0; b < L.n; ++b)
#pragma unroll
    for (int s = 0; s < 2; ++s) sum[s] += sk_get(v, L.member(s, b, col));
}

// v: logits in, row softmax out.
__device__ __forceinline__ void sk_softmax_rows(float (&v)[2], const SkLane& L) {
  float m[2], ex[2], sum[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) m[s] = sk_get(v, L.member(s, 0, false));
  for (int b = 1; b < L.n; ++b)
#pragma unroll
    for (int s = 0; s < 2; ++s) m[s] = fmaxf(m[s], sk_get(v, L.member(s, b, false)));
#pragma unroll
  for (int s = 0; s < 2; ++s) ex[s] = expf(v[s] - m[s]);
  sk_group_sums(ex, L, false, sum);
#pragma unroll
  for (int s = 0; s < 2; ++s) v[s] = ex[s] / sum[s];
}

// One normalisation step: v <- v / (group sum + eps).
__device__ __forceinline__ void sk_normalise(float (&v)[2], const SkLane& L, bool col, float eps) {
  float sum[2];
  sk_group_sums(v, L, col, sum);
#pragma unroll
  for (int s = 0; s < 2; ++s) v[s] = v[s] / (sum[s] + eps);
}

// v: logits in, Sinkhorn result out.
__device__ void sk_forward(float (&v)[2], const SkLane& L, int iters, float eps) {
  sk_softmax_rows(v, L);
#pragma unroll
  for (int s = 0; s < 2; ++s) v[s] = v[s] + eps;
  for (int k = 0; k < sk_steps(iters); ++k) sk_normalise(v, L, sk_step_is_col(k), eps);
}

// Shared-memory floats per warp of sk_backward: the iterates (steps + 1) x nn.
__host__ __device__ __forceinline__ int sk_backward_floats(int n, int iters) { return (sk_steps(iters) + 1) * n * n; }

// Backward through the unrolled iterations: g in (d out), dlogits out; logits v. ys: sk_backward_floats scratch.
__device__ void sk_backward(const float (&logits)[2], float (&g)[2], const SkLane& L, int iters, float eps,
                            float* ys, int lane) {
  const int steps = sk_steps(iters), nn = L.nn;
  const bool own0 = lane < nn, own1 = lane + 32 < nn;
  float sm[2] = {logits[0], logits[1]};
  sk_softmax_rows(sm, L);
  float v[2] = {sm[0] + eps, sm[1] + eps};
  for (int k = 0; k <= steps; ++k) {
    if (k > 0) sk_normalise(v, L, sk_step_is_col(k - 1), eps);
    if (own0) ys[k * nn + lane] = v[0];
    if (own1) ys[k * nn + lane + 32] = v[1];
  }
  __syncwarp();
  for (int k = steps - 1; k >= 0; --k) {
    const bool col = sk_step_is_col(k);
    float prev[2], y[2], den[2], gy[2], dot[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      prev[s] = ys[k * nn + L.e[s]];
      y[s] = ys[(k + 1) * nn + L.e[s]];
    }
    sk_group_sums(prev, L, col, den);  // the forward's denominators, recomputed with the same arithmetic
#pragma unroll
    for (int s = 0; s < 2; ++s) gy[s] = g[s] * y[s];
    sk_group_sums(gy, L, col, dot);
#pragma unroll
    for (int s = 0; s < 2; ++s) g[s] = (g[s] - dot[s]) / (den[s] + eps);
  }
  float gs[2], dot[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) gs[s] = g[s] * sm[s];
  sk_group_sums(gs, L, false, dot);
#pragma unroll
  for (int s = 0; s < 2; ++s) g[s] = sm[s] * (g[s] - dot[s]);
  __syncwarp();
}

// head: the HyperHead collapse (M = n mixes, all scaled by scale[0]; no post gates, no Sinkhorn).
struct Dims {
  int n, D, M, iters;
  int64_t N;
  float hc_eps;
  double norm_eps;
  bool head;
};

// ---- pre forward: one warp per token, after the dots GEMM ------------------------------------------------------
__global__ void __launch_bounds__(kThreads)
    mhc_pre_fwd_kernel(const float* __restrict__ X, const float* dots, const float* __restrict__ scale,
                       const float* __restrict__ base, float* __restrict__ x, float* __restrict__ post,
                       float* __restrict__ comb, float* mixes, float* __restrict__ rstd, int64_t T, Dims dm) {
  // dots and mixes may alias (scaled in place: each element read, then written, by the same lane)
  __shared__ float pre_s[kWarps][kMhcMaxN];
  __shared__ float mix_s[kWarps][kMaxM];
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= T) return;  // whole warps only
  const int n = dm.n, M = dm.M;
  const int64_t N = dm.N, D = dm.D;
  const float* Xt = X + t * N;

  double ss = 0.0;
  for (int64_t k = lane; k < N; k += 32) ss += static_cast<double>(Xt[k]) * static_cast<double>(Xt[k]);
  ss = warp_sum(ss);
  const float rs = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(N) + dm.norm_eps));
  if (lane == 0) rstd[t] = rs;
  for (int m = lane; m < M; m += 32) {
    const float v = dots[t * M + m] * rs;
    mix_s[warp][m] = v;
    mixes[t * M + m] = v;
  }
  __syncwarp();
  if (lane < n) {
    pre_s[warp][lane] = sigmoidf(mix_s[warp][lane] * scale[0] + base[lane]) + dm.hc_eps;
    if (!dm.head) post[t * n + lane] = 2.0f * sigmoidf(mix_s[warp][n + lane] * scale[1] + base[n + lane]);
  }
  if (!dm.head) {
    const SkLane L(n, lane);
    const int nn = n * n;
    float v[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) v[q] = mix_s[warp][2 * n + L.e[q]] * scale[2] + base[2 * n + L.e[q]];
    sk_forward(v, L, dm.iters, dm.hc_eps);
    if (lane < nn) comb[t * nn + lane] = v[0];
    if (lane + 32 < nn) comb[t * nn + lane + 32] = v[1];
  }
  __syncwarp();
  for (int64_t d = lane; d < D; d += 32) {
    float acc = 0.0f;
    for (int j = 0; j < n; ++j) acc += pre_s[warp][j] * Xt[j * D + d];
    x[t * D + d] = acc;
  }
}

// ---- pre backward ----------------------------------------------------------------------------------------------
// Per token (one warp): dz / dm [T, M] and c [T] into the workspace, dX = (acc ? dX : 0) + pre[j] dx - c X[j].
// Dynamic shared memory: kWarps x work_floats (the Sinkhorn trajectory of each warp's token).
__global__ void __launch_bounds__(kThreads)
    mhc_pre_bwd_token_kernel(const float* __restrict__ dx, const float* __restrict__ dpost,
                             const float* __restrict__ dcomb, const float* __restrict__ X,
                             const float* __restrict__ scale, const float* __restrict__ base,
                             const float* __restrict__ mixes, const float* __restrict__ rstd, float* __restrict__ dX,
                             bool accumulate, float* __restrict__ ws_dz, float* __restrict__ ws_dm,
                             float* __restrict__ ws_c, int64_t T, int work_floats, Dims dm) {
  extern __shared__ float work_all[];
  __shared__ float pre_s[kWarps][kMhcMaxN];
  __shared__ float mix_s[kWarps][kMaxM], dz_s[kWarps][kMaxM];
  __shared__ float c_s[kWarps];
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= T) return;  // whole warps only
  const int n = dm.n, M = dm.M, nn = dm.n * dm.n;
  const int64_t N = dm.N, D = dm.D;
  const float* Xt = X + t * N;
  const float* dxt = dx + t * D;

  float dpre[kMhcMaxN];
#pragma unroll
  for (int j = 0; j < kMhcMaxN; ++j) dpre[j] = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float g = dxt[d];
#pragma unroll
    for (int j = 0; j < kMhcMaxN; ++j)
      if (j < n) dpre[j] = fmaf(g, Xt[j * D + d], dpre[j]);
  }
#pragma unroll
  for (int j = 0; j < kMhcMaxN; ++j) dpre[j] = warp_sum(dpre[j]);
  float* mx = mix_s[warp];
  float* dz = dz_s[warp];
  for (int m = lane; m < M; m += 32) mx[m] = mixes[t * M + m];
  __syncwarp();
  if (lane < n) {
    const int j = lane;
    float dp = dpre[0];
#pragma unroll
    for (int q = 1; q < kMhcMaxN; ++q)
      if (q == j) dp = dpre[q];
    const float sp = sigmoidf(mx[j] * scale[0] + base[j]);
    pre_s[warp][j] = sp + dm.hc_eps;
    dz[j] = dp * sp * (1.0f - sp);
    if (!dm.head) {
      const float so = sigmoidf(mx[n + j] * scale[1] + base[n + j]);
      dz[n + j] = dpost ? 2.0f * dpost[t * n + j] * so * (1.0f - so) : 0.0f;
    }
  }
  if (!dm.head) {
    if (dcomb) {
      const SkLane L(n, lane);
      float lg[2], g[2];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        lg[q] = mx[2 * n + L.e[q]] * scale[2] + base[2 * n + L.e[q]];
        g[q] = dcomb[t * nn + L.e[q]];
      }
      sk_backward(lg, g, L, dm.iters, dm.hc_eps, work_all + static_cast<int64_t>(warp) * work_floats, lane);
      if (lane < nn) dz[2 * n + lane] = g[0];
      if (lane + 32 < nn) dz[2 * n + lane + 32] = g[1];
    } else {
      for (int i = lane; i < nn; i += 32) dz[2 * n + i] = 0.0f;
    }
  }
  __syncwarp();
  if (lane == 0) {
    float dot = 0.0f;
    const float r = rstd[t];
    for (int m = 0; m < M; ++m) {
      const int grp = dm.head || m < n ? 0 : (m < 2 * n ? 1 : 2);
      const float g = dz[m] * scale[grp];
      dot += g * mx[m];
      ws_dz[t * M + m] = dz[m];
      ws_dm[t * M + m] = g * r;
    }
    c_s[warp] = dot * r * r / static_cast<float>(N);
    ws_c[t] = c_s[warp];
  }
  __syncwarp();
  const float c = c_s[warp];
  for (int64_t k = lane; k < N; k += 32) {
    const int j = static_cast<int>(k / D);
    const int64_t d = k - j * D;
    float v = accumulate ? dX[t * N + k] : 0.0f;
    v += pre_s[warp][j] * dxt[d];
    v += -c * Xt[k];
    dX[t * N + k] = v;
  }
}

// dbase[m] += sum_t dz[t, m]; zs[m] = sum_t dz[t, m] mixes[t, m] (FP64; block m, a fixed strided split over
// threads and a fixed tree: deterministic). Then dscale[g] += sum_{m in g} zs[m], m ascending.
__global__ void __launch_bounds__(kThreads)
    mhc_pre_bwd_params_kernel(const float* __restrict__ ws_dz, const float* __restrict__ mixes,
                              float* __restrict__ dbase, double* __restrict__ zs, int64_t T, Dims dm) {
  __shared__ double rb[kThreads], rm[kThreads];
  const int m = static_cast<int>(blockIdx.x), tid = static_cast<int>(threadIdx.x);
  double zb = 0.0, zm = 0.0;
  for (int64_t t = tid; t < T; t += kThreads) {
    const double z = ws_dz[t * dm.M + m];
    zb += z;
    zm += z * static_cast<double>(mixes[t * dm.M + m]);
  }
  rb[tid] = zb;
  rm[tid] = zm;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (tid < h) {
      rb[tid] += rb[tid + h];
      rm[tid] += rm[tid + h];
    }
    __syncthreads();
  }
  if (tid == 0) {
    if (dbase) dbase[m] += static_cast<float>(rb[0]);
    zs[m] = rm[0];
  }
}

__global__ void mhc_pre_bwd_scale_kernel(const double* __restrict__ zs, float* __restrict__ dscale, Dims dm) {
  double g[3] = {0.0, 0.0, 0.0};
  for (int i = 0; i < dm.M; ++i) g[dm.head || i < dm.n ? 0 : (i < 2 * dm.n ? 1 : 2)] += zs[i];
  for (int i = 0; i < (dm.head ? 1 : 3); ++i) dscale[i] += static_cast<float>(g[i]);
}

// ---- post ------------------------------------------------------------------------------------------------------
// One block per (token, output stream k) row: no per-element index divisions.
__global__ void mhc_post_fwd_kernel(const float* __restrict__ F, const float* __restrict__ X,
                                    const float* __restrict__ post, const float* __restrict__ comb,
                                    float* __restrict__ Xnew, int n, int64_t D) {
  const int64_t row = blockIdx.x;  // t * n + k
  const int64_t t = row / n;
  const int k = static_cast<int>(row - t * n);
  const float pk = post[t * n + k];
  const float* ct = comb + t * n * n;
  const float* Xt = X + t * n * D;
  const float* Ft = F + t * D;
  float* out = Xnew + row * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    acc += pk * Ft[d];
    for (int j = 0; j < n; ++j) acc += ct[j * n + k] * Xt[j * D + d];
    out[d] = acc;
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
// Runs ops::gemm (cuBLAS, on the device's current stream) on `stream` for the scope.
struct StreamScope {
  int device = 0;
  void* prev = nullptr;
  explicit StreamScope(void* stream) {
    CUDA_CHECK(cudaGetDevice(&device));
    prev = current_stream(device);
    set_current_stream(device, stream);
  }
  ~StreamScope() { set_current_stream(device, prev); }
};

Tensor dev_view(const float* p, Shape shape) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  // Borrowed: the caller's buffers outlive the call (a no-op deleter, so the view frees nothing).
  std::shared_ptr<const void> borrowed(p, [](const void*) {});
  return Tensor::from_blob(const_cast<float*>(p), std::move(shape), DType::F32, Device::cuda(device),
                           std::move(borrowed));
}

unsigned token_blocks(int64_t T) { return static_cast<unsigned>((T + kWarps - 1) / kWarps); }

void pre_forward(const float* X, const float* fn, const float* scale, const float* base, float* x, float* post,
                 float* comb, float* mixes, float* rstd, const MhcShape& s, const Dims& dm, void* stream) {
  if (s.T == 0) return;
  // dots [T, M] = X fn^T, into the mixes buffer (scaled by rstd in place by the token kernel).
  {
    StreamScope scope(stream);
    Tensor dots = dev_view(mixes, {s.T, dm.M});
    ops::gemm(dev_view(X, {s.T, s.N()}), false, dev_view(fn, {dm.M, s.N()}), true, 1.0f, 0.0f, dots);
  }
  mhc_pre_fwd_kernel<<<token_blocks(s.T), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      X, mixes, scale, base, x, post, comb, mixes, rstd, s.T, dm);
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
  float* ws_c = workspace + 2 * s.T * dm.M;
  const int work_floats = dm.head ? 0 : sk_backward_floats(dm.n, dm.iters);
  const size_t work_bytes = static_cast<size_t>(kWarps) * static_cast<size_t>(work_floats) * sizeof(float);
  DSV4_CHECK(work_bytes <= 200 * 1024, "cuda::mhc_pre_backward: Sinkhorn scratch of {} bytes (iters {}) too large",
             work_bytes, dm.iters);
  if (work_bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(mhc_pre_bwd_token_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(work_bytes)));
  mhc_pre_bwd_token_kernel<<<token_blocks(s.T), kThreads, work_bytes, st>>>(
      dx, dpost, dcomb, X, scale, base, mixes, rstd, dX, accumulate, ws_dz, ws_dm, ws_c, s.T, work_floats, dm);
  CUDA_CHECK_LAUNCH();
  {
    StreamScope scope(stream);
    const Tensor dmv = dev_view(ws_dm, {s.T, dm.M}), fnv = dev_view(fn, {dm.M, s.N()}), Xv = dev_view(X, {s.T, s.N()});
    Tensor dXv = dev_view(dX, {s.T, s.N()});
    ops::gemm(dmv, false, fnv, false, 1.0f, 1.0f, dXv);  // dX += dm fn
    if (dfn) {
      Tensor dfnv = dev_view(dfn, {dm.M, s.N()});
      ops::gemm(dmv, true, Xv, false, 1.0f, 1.0f, dfnv);  // dfn += dm^T X
    }
  }
  if (dscale || dbase) {
    // zs: M doubles after dz, dm, c (offset rounded up to 8 bytes; the workspace size includes it).
    double* zs = reinterpret_cast<double*>(workspace + ((2 * s.T * dm.M + s.T + 1) & ~int64_t{1}));
    mhc_pre_bwd_params_kernel<<<static_cast<unsigned>(dm.M), kThreads, 0, st>>>(ws_dz, mixes, dbase, zs, s.T, dm);
    CUDA_CHECK_LAUNCH();
    if (dscale) {
      mhc_pre_bwd_scale_kernel<<<1, 1, 0, st>>>(zs, dscale, dm);
      CUDA_CHECK_LAUNCH();
    }
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
  if (s.T == 0) return;
  DSV4_CHECK(s.T * s.n < (int64_t{1} << 31), "cuda::mhc_post_forward: T * n = {} rows exceed the grid", s.T * s.n);
  mhc_post_fwd_kernel<<<static_cast<unsigned>(s.T * s.n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      F, X, post, comb, Xnew, dm.n, s.D);
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
