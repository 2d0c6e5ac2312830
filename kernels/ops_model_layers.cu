// CUDA twins of the model's memory-bound layers (runtime/model_ops.h; CPU reference src/runtime/cpu_model_ops.cpp over
// runtime/model_math.h). Built with --fmad=false (kernels/CMakeLists.txt) so products and sums round as on the CPU;
// exp / log / sqrt are CUDA's (IEEE sqrt and division; expf / log1pf within 2 ulp), sin / cos are evaluated in double
// and rounded. Sums are deterministic: fixed tree reductions, per-block partials then a second pass, no float atomics.
//
//   rmsnorm_forward / backward      vector path (dim % 4 == 0, aligned, dim <= 8192): row in registers, float4 I/O,
//                                   backward fuses dx with 16-row FP32 dweight partials + a fixed-order reduction;
//                                   scalar path: one block per row, double tree sum; dw per (column tile, 128-row
//                                   chunk) FP32 partials, then a pass over the chunks
//   rope_apply                      vector path: cos / sin once per (position, i) in shared memory, float4 in place;
//                                   scalar path: one thread per rotated pair
//   swiglu / backward               element-wise; dw: one block per row (double tree sum)
//   sqrt_softplus(+backward)        element-wise
//   moe_route                       one block per token: K rounds of a (value, id) arg-best tree (exact comparisons);
//                                   E <= 256 without fixed ids: one warp per token, shuffle butterflies
//   moe_route_backward              one thread per token (the CPU's sequential sums)
//   moe_sort_slots                  cub stable radix sort of (expert, slot), offsets by binary search
//   moe_permute / moe_unpermute     warp per (row, 512-col chunk), float4 row copies; unpermute sums each token's slots
//                                   in ascending sorted position
//   ce_row_max / ce_sums            one block per row (max: order-free; sums: double, float4 loads when V % 4 == 0)
//   ce_backward                     element-wise; vector path: block per (row, 4096 columns), float4 I/O
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cub/cub.cuh>

#include <cstring>
#include <initializer_list>

#include "kernels/ops_common.cuh"
#include "runtime/model_math.h"
#include "runtime/model_ops.h"

namespace dsv4::cuda {
namespace {

using detail::blocks_for;
using detail::stream_of;

constexpr int kRowThreads = 256;

__device__ __forceinline__ double block_sum_double(double v, double* smem) {
  const int tid = static_cast<int>(threadIdx.x);
  smem[tid] = v;
  __syncthreads();
  for (int s = static_cast<int>(blockDim.x) / 2; s > 0; s >>= 1) {
    if (tid < s) smem[tid] += smem[tid + s];
    __syncthreads();
  }
  const double r = smem[0];
  __syncthreads();
  return r;
}


const float* fptr(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }

// ---- RMSNorm ---------------------------------------------------------------------------------------------------
__global__ void rmsnorm_fwd_kernel(const float* x, const float* w, float* y, float* rstd, int64_t dim, double eps) {
  __shared__ double smem[kRowThreads];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * dim;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += static_cast<double>(xr[i]) * static_cast<double>(xr[i]);
  ss = block_sum_double(ss, smem);
  const float s = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(dim) + eps));
  if (threadIdx.x == 0) rstd[r] = s;
  float* yr = y + r * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = w ? w[i] * (xr[i] * s) : xr[i] * s;
}

__global__ void rmsnorm_bwd_dx_kernel(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                                      int64_t dim) {
  __shared__ double smem[kRowThreads];
  const int64_t r = blockIdx.x;
  const float* dyr = dy + r * dim;
  const float* xr = x + r * dim;
  const float s = rstd[r];
  double dot = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
    dot += static_cast<double>(w ? dyr[i] * w[i] : dyr[i]) * static_cast<double>(xr[i]);
  dot = block_sum_double(dot, smem);
  const float c = static_cast<float>(dot / static_cast<double>(dim)) * s * s;
  float* dxr = dx + r * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float g = w ? dyr[i] * w[i] : dyr[i];
    dxr[i] = s * (g - xr[i] * c);
  }
}

constexpr int64_t kDwChunk = 128;  // rows per dweight partial

__global__ void rmsnorm_bwd_dw_partial_kernel(const float* dy, const float* x, const float* rstd, float* partial,
                                              int64_t rows, int64_t dim) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (d >= dim) return;
  const int64_t r0 = chunk * kDwChunk, r1 = min(rows, r0 + kDwChunk);
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) acc += dy[r * dim + d] * x[r * dim + d] * rstd[r];
  partial[chunk * dim + d] = acc;
}

__global__ void sum_chunks_kernel(const float* partial, float* out, int64_t chunks, int64_t dim) {
  GRID_STRIDE(d, dim) {
    float acc = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) acc += partial[c * dim + d];
    out[d] = acc;
  }
}

// ---- RMSNorm, vector paths ------------------------------------------------------------------------------------
// Taken when dim % 4 == 0, dim <= 8 * 4 * kRowThreads and x / y / dy / dx / w start 16-byte aligned (else the scalar
// kernels above). Each thread holds V float4 of its row in registers (columns 4 * (tid + 256 u)), so x / dy are read
// from device memory once. Row sums in double: per-thread partials, warp shuffles, then the 8 warp sums in fixed
// order (another order than the scalar kernels' tree: rstd / dx stay within the documented 2e-6 of the CPU).
//   forward   minimal bytes 8 T D (+ w, rstd); one block per row, loads issued before any arithmetic.
//   backward  minimal bytes 12 T D (+ w, rstd, dw); dx AND the dweight partials in one pass: one block per
//             kDwRows-row chunk, next row's dy / x loaded while this row's dot product is reduced; each thread sums
//             dy * x * rstd over the chunk's rows in row order (FP32), then rmsnorm_dw_reduce_kernel sums the chunk
//             partials in a fixed order (deterministic, no atomics).
constexpr int kRowWarps = kRowThreads / 32;
constexpr int64_t kDwRows = 16;

__device__ __forceinline__ double block_sum_double_warps(double v, double* red) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  v = detail::warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double r = red[0];
#pragma unroll
  for (int i = 1; i < kRowWarps; ++i) r += red[i];
  return r;  // callers alternate `red` buffers between consecutive calls (one barrier per call)
}

__device__ __forceinline__ double sq4(const float4& a) {
  return static_cast<double>(a.x) * static_cast<double>(a.x) + static_cast<double>(a.y) * static_cast<double>(a.y) +
         static_cast<double>(a.z) * static_cast<double>(a.z) + static_cast<double>(a.w) * static_cast<double>(a.w);
}

template <int V, bool kW>
__global__ void __launch_bounds__(kRowThreads) rmsnorm_fwd_vec_kernel(const float* __restrict__ x,
                                                                     const float* __restrict__ w,
                                                                     float* __restrict__ y, float* __restrict__ rstd,
                                                                     int64_t dim, double eps) {
  __shared__ double red[kRowWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t r = blockIdx.x, D4 = dim / 4;
  const float4* xr = reinterpret_cast<const float4*>(x + r * dim);
  float4 v[V];
  double ss = 0;
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t i = tid + u * kRowThreads;
    v[u] = i < D4 ? xr[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
#pragma unroll
  for (int u = 0; u < V; ++u) ss += sq4(v[u]);
  ss = block_sum_double_warps(ss, red);
  const float s = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(dim) + eps));
  if (tid == 0) rstd[r] = s;
  float4* yr = reinterpret_cast<float4*>(y + r * dim);
  const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t i = tid + u * kRowThreads;
    if (i >= D4) continue;
    float4 o = make_float4(v[u].x * s, v[u].y * s, v[u].z * s, v[u].w * s);
    if (kW) {
      const float4 wv = w4[i];
      o = make_float4(wv.x * o.x, wv.y * o.y, wv.z * o.z, wv.w * o.w);
    }
    yr[i] = o;
  }
}

template <int V, bool kW>
__global__ void __launch_bounds__(kRowThreads) rmsnorm_bwd_vec_kernel(
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ w,
    const float* __restrict__ rstd, float* __restrict__ dx, float* __restrict__ partial, int64_t rows, int64_t dim) {
  __shared__ double red[2][kRowWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t D4 = dim / 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kDwRows, r1 = min(rows, r0 + kDwRows);
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float4 wv[V], acc[V], ndy[V], nx[V];
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t i = tid + u * kRowThreads;
    wv[u] = kW && i < D4 ? reinterpret_cast<const float4*>(w)[i] : zero;
    acc[u] = zero;
    ndy[u] = i < D4 ? reinterpret_cast<const float4*>(dy + r0 * dim)[i] : zero;
    nx[u] = i < D4 ? reinterpret_cast<const float4*>(x + r0 * dim)[i] : zero;
  }
  for (int64_t r = r0; r < r1; ++r) {
    float4 cdy[V], cx[V];
#pragma unroll
    for (int u = 0; u < V; ++u) {
      cdy[u] = ndy[u];
      cx[u] = nx[u];
    }
    if (r + 1 < r1) {
#pragma unroll
      for (int u = 0; u < V; ++u) {
        const int64_t i = tid + u * kRowThreads;
        if (i < D4) {
          ndy[u] = reinterpret_cast<const float4*>(dy + (r + 1) * dim)[i];
          nx[u] = reinterpret_cast<const float4*>(x + (r + 1) * dim)[i];
        }
      }
    }
    const float s = rstd[r];
    float4 g[V];
    double dot = 0;
#pragma unroll
    for (int u = 0; u < V; ++u) {
      g[u] = kW ? make_float4(cdy[u].x * wv[u].x, cdy[u].y * wv[u].y, cdy[u].z * wv[u].z, cdy[u].w * wv[u].w)
                : cdy[u];
      dot += static_cast<double>(g[u].x) * static_cast<double>(cx[u].x) +
             static_cast<double>(g[u].y) * static_cast<double>(cx[u].y) +
             static_cast<double>(g[u].z) * static_cast<double>(cx[u].z) +
             static_cast<double>(g[u].w) * static_cast<double>(cx[u].w);
    }
    dot = block_sum_double_warps(dot, red[r & 1]);
    const float c = static_cast<float>(dot / static_cast<double>(dim)) * s * s;
    float4* dxr = reinterpret_cast<float4*>(dx + r * dim);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const int64_t i = tid + u * kRowThreads;
      if (i >= D4) continue;
      dxr[i] = make_float4(s * (g[u].x - cx[u].x * c), s * (g[u].y - cx[u].y * c), s * (g[u].z - cx[u].z * c),
                           s * (g[u].w - cx[u].w * c));
      acc[u].x += cdy[u].x * cx[u].x * s;
      acc[u].y += cdy[u].y * cx[u].y * s;
      acc[u].z += cdy[u].z * cx[u].z * s;
      acc[u].w += cdy[u].w * cx[u].w * s;
    }
  }
  if (partial == nullptr) return;
  float4* pr = reinterpret_cast<float4*>(partial + static_cast<int64_t>(blockIdx.x) * dim);
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const int64_t i = tid + u * kRowThreads;
    if (i < D4) pr[i] = acc[u];
  }
}

// dw[d] = sum over chunks of partial[chunk][d]: block = 32 columns x 8 chunk groups; group j sums chunks j, j + 8,
// ... in order, then the 8 group sums are added in order j = 0..7 (fixed order: deterministic).
__global__ void __launch_bounds__(kRowThreads) rmsnorm_dw_reduce_kernel(const float* __restrict__ partial,
                                                                       float* __restrict__ out, int64_t chunks,
                                                                       int64_t dim) {
  __shared__ float part[kRowWarps][33];
  const int cx = static_cast<int>(threadIdx.x) & 31, j = static_cast<int>(threadIdx.x) >> 5;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * 32 + cx;
  float acc = 0.0f;
  if (d < dim)
    for (int64_t c = j; c < chunks; c += kRowWarps) acc += partial[c * dim + d];
  part[j][cx] = acc;
  __syncthreads();
  if (j == 0 && d < dim) {
    float r = part[0][cx];
#pragma unroll
    for (int i = 1; i < kRowWarps; ++i) r += part[i][cx];
    out[d] = r;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Registers per thread for a vector row of dim floats (0: scalar kernels).
int rms_vec_width(int64_t dim, std::initializer_list<const void*> ptrs) {
  if (dim % 4 != 0) return 0;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 0;
  const int64_t D4 = dim / 4;
  for (int v : {1, 2, 4, 8})
    if (D4 <= static_cast<int64_t>(v) * kRowThreads) return v;
  return 0;
}

// ---- RoPE -----------------------------------------------------------------------------------------------------
__global__ void rope_kernel(float* x, int64_t rows, int64_t dim, int64_t row_stride, const int64_t* pos,
                            int64_t group, const float* inv_freq, int64_t half, bool inverse) {
  GRID_STRIDE(k, rows * half) {
    const int64_t r = k / half, i = k - r * half;
    float* v = x + r * row_stride + (dim - 2 * half);
    const float p = static_cast<float>(pos[r / group]);
    const float angle = p * inv_freq[i];
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float c = static_cast<float>(cd);
    const float s = inverse ? -static_cast<float>(sd) : static_cast<float>(sd);
    const float a = v[2 * i], b = v[2 * i + 1];
    v[2 * i] = a * c - b * s;
    v[2 * i + 1] = b * c + a * s;
  }
}

// RoPE vector path (half even, rotated part starting at a multiple of 4 floats, row stride % 4 == 0, base 16-byte
// aligned). Minimal bytes: 2 R rot_dim 4 (in place). The scalar kernel evaluates one double sincos per element pair
// although the `group` rows of a position (the heads) share the angles; here a block takes kRopePositions-sized runs
// of positions, evaluates each (position, i) cos / sin once into shared memory (the same double sincos, same
// rounding: results bit-identical to the scalar kernel), then rotates two pairs per float4 load / store.
__global__ void __launch_bounds__(kRowThreads) rope_vec_kernel(float* __restrict__ x, int64_t P, int64_t group,
                                                              int64_t row_stride, int64_t off,
                                                              const int64_t* __restrict__ pos,
                                                              const float* __restrict__ inv_freq, int half, int PB,
                                                              bool inverse) {
  extern __shared__ float rope_cs[];  // cos [PB][half], then sin [PB][half]
  float* cs = rope_cs;
  float* sn = rope_cs + PB * half;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * PB;
  const int np = static_cast<int>(min(static_cast<int64_t>(PB), P - p0));
  for (int k = tid; k < np * half; k += blockDim.x) {
    const int pp = k / half, i = k - pp * half;
    const float pf = static_cast<float>(pos[p0 + pp]);
    const float angle = pf * inv_freq[i];
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    cs[k] = static_cast<float>(cd);
    sn[k] = inverse ? -static_cast<float>(sd) : static_cast<float>(sd);
  }
  __syncthreads();
  const int64_t H4 = half / 2, n = np * group * H4;
#pragma unroll 4
  for (int64_t k = tid; k < n; k += blockDim.x) {
    const int64_t rr = k / H4, j = k - rr * H4;
    const int pp = static_cast<int>(rr / group);
    float4* v = reinterpret_cast<float4*>(x + (p0 * group + rr) * row_stride + off) + j;
    const float4 a = *v;
    const int i0 = pp * half + 2 * static_cast<int>(j);
    const float c0 = cs[i0], s0 = sn[i0], c1 = cs[i0 + 1], s1 = sn[i0 + 1];
    *v = make_float4(a.x * c0 - a.y * s0, a.y * c0 + a.x * s0, a.z * c1 - a.w * s1, a.w * c1 + a.z * s1);
  }
}

// ---- hashed dropout ---------------------------------------------------------------------------------------------
__global__ void hashed_dropout_kernel(const float* x, int64_t ld, float* out, int64_t n, int64_t m, uint64_t stream,
                                      double p, float keep_scale, uint64_t mask_offset) {
  GRID_STRIDE(k, n * m) {
    const int64_t i = k / m, j = k - i * m;
    out[k] = dropout_keep(stream, mask_offset + static_cast<uint64_t>(k), p) ? x[i * ld + j] * keep_scale : 0.0f;
  }
}

// ---- clamped SwiGLU -------------------------------------------------------------------------------------------
// g, u: rows of width I with row stride ld (I contiguous, 2I for the fused w1 | w3 output); h contiguous.
__global__ void swiglu_kernel(const float* g, const float* u, const float* w, float* h, int64_t n, int64_t I,
                              int64_t ld, bool clamp, float L) {
  GRID_STRIDE(k, n) {
    const int64_t gk = ld == I ? k : (k / I) * ld + k % I;
    float gv = g[gk], uv = u[gk];
    if (clamp) {
      uv = fminf(fmaxf(uv, -L), L);
      gv = fminf(gv, L);
    }
    float v = gv / (1.0f + expf(-gv)) * uv;
    if (w) v = w[k / I] * v;
    h[k] = v;
  }
}

// g, u with row stride ld, dg, du with row stride ldd; dh contiguous.
__global__ void swiglu_bwd_kernel(const float* g, const float* u, const float* w, const float* dh, float* dg,
                                  float* du, float* dw, int64_t I, int64_t ld, int64_t ldd, bool clamp, float L) {
  __shared__ double smem[kRowThreads];
  const int64_t r = blockIdx.x;
  const float wr = w ? w[r] : 1.0f;
  double dwr = 0;
  for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
    const int64_t k = r * I + i, gk = r * ld + i, dk = r * ldd + i;
    const float g0 = g[gk], u0 = u[gk];
    float gv = g0, uv = u0;
    bool g_pass = true, u_pass = true;
    if (clamp) {
      g_pass = g0 <= L;
      u_pass = u0 >= -L && u0 <= L;
      uv = fminf(fmaxf(u0, -L), L);
      gv = fminf(g0, L);
    }
    const float sig = 1.0f / (1.0f + expf(-gv));
    const float silu = gv * sig;
    const float d = dh[k];
    if (w) dwr += static_cast<double>(d) * static_cast<double>(silu * uv);
    const float dv = wr * d;
    dg[dk] = g_pass ? dv * uv * (sig * (1.0f + gv * (1.0f - sig))) : 0.0f;
    du[dk] = u_pass ? dv * silu : 0.0f;
  }
  if (w) {
    dwr = block_sum_double(dwr, smem);
    if (threadIdx.x == 0) dw[r] = static_cast<float>(dwr);
  }
}

// ---- router ---------------------------------------------------------------------------------------------------
__global__ void sqrt_softplus_kernel(const float* s, float* aff, int64_t n) {
  GRID_STRIDE(i, n) {
    const float sp = s[i] > static_cast<float>(kSoftplusThreshold) ? s[i] : log1pf(expf(s[i]));
    aff[i] = sqrtf(sp);
  }
}

__global__ void sqrt_softplus_bwd_kernel(const float* s, const float* aff, const float* daff, float* ds, int64_t n) {
  GRID_STRIDE(i, n) {
    if (aff[i] == 0.0f) {
      ds[i] = 0.0f;
      continue;
    }
    const float g = daff[i] / (2.0f * aff[i]);
    if (s[i] > static_cast<float>(kSoftplusThreshold)) {
      ds[i] = g;
    } else {
      const float z = expf(s[i]);
      ds[i] = g * z / (z + 1.0f);
    }
  }
}

// (va, ia) comes before (vb, ib): NaN first, then the larger value, then the lower id; id < 0 is "none".
__device__ __forceinline__ bool route_before(float va, int ia, float vb, int ib) {
  if (ib < 0) return ia >= 0;
  if (ia < 0) return false;
  const bool na = isnan(va), nb = isnan(vb);
  if (na != nb) return na;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

constexpr int kRouteThreads = 128;

// Dynamic shared memory: sel [E] floats, then taken [E] bytes.
__global__ void moe_route_kernel(const float* aff, const float* bias, const int64_t* fixed, int64_t E, int64_t K,
                                 float route_scale, int64_t* idx, float* w) {
  extern __shared__ unsigned char route_smem[];
  float* sel = reinterpret_cast<float*>(route_smem);
  unsigned char* taken = route_smem + E * sizeof(float);
  __shared__ float rv[kRouteThreads];
  __shared__ int ri[kRouteThreads];
  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const float* a = aff + t * E;
  int64_t* it = idx + t * K;
  if (fixed) {
    for (int64_t j = tid; j < K; j += blockDim.x) it[j] = fixed[t * K + j];
  } else {
    for (int64_t e = tid; e < E; e += blockDim.x) {
      sel[e] = bias ? a[e] + bias[e] : a[e];
      taken[e] = 0;
    }
    __syncthreads();
    for (int64_t j = 0; j < K; ++j) {
      float bv = 0.0f;
      int bi = -1;
      for (int64_t e = tid; e < E; e += blockDim.x)
        if (!taken[e] && route_before(sel[e], static_cast<int>(e), bv, bi)) {
          bv = sel[e];
          bi = static_cast<int>(e);
        }
      rv[tid] = bv;
      ri[tid] = bi;
      __syncthreads();
      for (int s = kRouteThreads / 2; s > 0; s >>= 1) {
        if (tid < s && route_before(rv[tid + s], ri[tid + s], rv[tid], ri[tid])) {
          rv[tid] = rv[tid + s];
          ri[tid] = ri[tid + s];
        }
        __syncthreads();
      }
      if (tid == 0) {
        it[j] = ri[0];
        taken[ri[0]] = 1;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (tid == 0) {
    moe_route_weights_row(a, it, K, route_scale, w + t * K);
  }
}

// moe_route for E <= 256 without fixed ids (latency-bound: [T, E] is ~0.5 MB): one warp per token instead of a
// 128-thread block, the token's (a + bias) in registers (expert lane + 32 i), K rounds of a warp butterfly arg-best
// under route_before (a strict total order, so any reduction order picks the same expert: bit-identical), no
// block barriers; the weights as in moe_route_kernel (lane 0, the same sums in the same order).
constexpr int kRouteWarpExperts = 8;  // experts per lane (E <= 256)
constexpr int kRouteWarps = 8;        // tokens per block

__global__ void __launch_bounds__(kRouteWarps * 32) moe_route_warp_kernel(const float* __restrict__ aff,
                                                                         const float* __restrict__ bias, int64_t T,
                                                                         int64_t E, int64_t K, float route_scale,
                                                                         int64_t* __restrict__ idx,
                                                                         float* __restrict__ w) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= T) return;  // whole warps
  const float* a = aff + t * E;
  int64_t* it = idx + t * K;
  float sel[kRouteWarpExperts];
  unsigned avail = 0;
#pragma unroll
  for (int i = 0; i < kRouteWarpExperts; ++i) {
    const int e = lane + 32 * i;
    sel[i] = 0.0f;
    if (e < E) {
      sel[i] = bias ? a[e] + bias[e] : a[e];
      avail |= 1u << i;
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    float bv = 0.0f;
    int bi = -1;
#pragma unroll
    for (int i = 0; i < kRouteWarpExperts; ++i)
      if (((avail >> i) & 1u) && route_before(sel[i], lane + 32 * i, bv, bi)) {
        bv = sel[i];
        bi = lane + 32 * i;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xFFFFFFFFu, bv, o);
      const int oi = __shfl_xor_sync(0xFFFFFFFFu, bi, o);
      if (route_before(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (bi >= 0 && (bi & 31) == lane) avail &= ~(1u << (bi >> 5));
    if (lane == 0) it[j] = bi;
  }
  if (lane == 0) {
    moe_route_weights_row(a, it, K, route_scale, w + t * K);
  }
}

__global__ void moe_route_bwd_kernel(const float* aff, const int64_t* idx, const float* dw, int64_t rows, int64_t E,
                                     int64_t K, double route_scale, float* daff) {
  GRID_STRIDE(t, rows) moe_route_backward_row(aff + t * E, idx + t * K, dw + t * K, K, route_scale, daff + t * E);
}

// ---- permutation ----------------------------------------------------------------------------------------------
__global__ void iota_kernel(int64_t* v, int64_t n) {
  GRID_STRIDE(i, n) v[i] = i;
}

// offsets[e] = first sorted position whose expert is >= e (e in [0, E]).
__global__ void offsets_kernel(const int64_t* keys, int64_t n, int64_t E, int64_t* offsets) {
  GRID_STRIDE(e, E + 1) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (keys[mid] < e)
        lo = mid + 1;
      else
        hi = mid;
    }
    offsets[e] = lo;
  }
}

// moe_permute: out[p] = x[sorted_slot[p] / K] for N = T*K rows of D floats. Minimal bytes: read x once (each row is
// re-read K times, from L2 mostly) + write out: ~ (T + N) * D * 4. Design: one warp per (output row, 512-column
// chunk); the vector path moves 4 float4 per lane (4 independent 16-byte loads in flight) when D % 4 == 0 and both
// base pointers are 16-byte aligned (then every row start is); otherwise a scalar path with 16 loads per lane.
constexpr int kPermWarps = 8;       // warps per block
constexpr int64_t kPermChunk = 512;  // columns per warp

template <bool kVec>
__global__ void __launch_bounds__(kPermWarps * 32) permute_rows_kernel(const float* __restrict__ x,
                                                                      const int64_t* __restrict__ sorted_slot,
                                                                      int64_t K, int64_t D, int64_t chunks,
                                                                      float* __restrict__ out, int64_t n_items) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kPermWarps + (threadIdx.x >> 5);
  if (item >= n_items) return;
  const int64_t p = item / chunks, c0 = (item - p * chunks) * kPermChunk;
  const float* src = x + (sorted_slot[p] / K) * D;
  float* dst = out + p * D;
  const int64_t c1 = min(D, c0 + kPermChunk);
  if constexpr (kVec) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    const int64_t b = c0 / 4 + lane, e = c1 / 4;
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (b + 32 * u < e) v[u] = s4[b + 32 * u];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (b + 32 * u < e) d4[b + 32 * u] = v[u];
  } else {
    for (int64_t i = c0 + lane; i < c1; i += 32) dst[i] = src[i];
  }
}

__global__ void invert_kernel(const int64_t* sorted_slot, int64_t* pos_of_slot, int64_t n) {
  GRID_STRIDE(p, n) pos_of_slot[sorted_slot[p]] = p;
}

constexpr int64_t kMaxCombineK = 64;

// moe_unpermute: y[t] = sum over token t's K slots, in ascending sorted position (the CPU's order), of w * ys[pos]
// (FP32, acc starts at 0; --fmad=false keeps each product rounded before the add, as on the CPU). Minimal bytes:
// read ys once + write y: ~ (N + T) * D * 4. Design: one warp per (token, 512-column chunk). Lanes j < K (and
// j + 32) hold slot j's position; each position's rank among the token's K (positions are distinct) is counted
// with K shuffles; the (position, weight) pairs are placed by rank in shared memory. Then each lane accumulates
// 4 float4 columns (vector path: D % 4 == 0, 16-byte aligned bases) or 16 scalar columns, K rows in rank order,
// 4 independent loads per row, two rows per unrolled step (8 x 16 bytes per lane in flight).
template <bool kVec, bool kWeighted>
__global__ void __launch_bounds__(kPermWarps * 32) unpermute_rows_kernel(const float* __restrict__ ys,
                                                                        const int64_t* __restrict__ pos_of_slot,
                                                                        const float* __restrict__ w, int64_t K,
                                                                        int64_t D, int64_t chunks,
                                                                        float* __restrict__ y, int64_t n_items) {
  __shared__ int64_t sp_all[kPermWarps][kMaxCombineK];
  __shared__ float sw_all[kPermWarps][kMaxCombineK];
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kPermWarps + warp;
  if (item >= n_items) return;  // whole warps exit together
  const int64_t t = item / chunks, c0 = (item - t * chunks) * kPermChunk;
  const int64_t c1 = min(D, c0 + kPermChunk);
  int64_t* sp = sp_all[warp];
  float* sw = sw_all[warp];
  const int64_t p0 = lane < K ? pos_of_slot[t * K + lane] : INT64_MAX;
  const int64_t p1 = lane + 32 < K ? pos_of_slot[t * K + lane + 32] : INT64_MAX;
  int r0 = 0, r1 = 0;
  for (int m = 0; m < K; ++m) {
    const int64_t pm = __shfl_sync(0xFFFFFFFFu, m < 32 ? p0 : p1, m & 31);
    r0 += pm < p0;
    r1 += pm < p1;
  }
  if (lane < K) {
    sp[r0] = p0;
    sw[r0] = kWeighted ? w[t * K + lane] : 1.0f;
  }
  if (lane + 32 < K) {
    sp[r1] = p1;
    sw[r1] = kWeighted ? w[t * K + lane + 32] : 1.0f;
  }
  __syncwarp();
  if constexpr (kVec) {
    const int64_t b = c0 / 4 + lane, e = c1 / 4, D4 = D / 4;
    const float4* ys4 = reinterpret_cast<const float4*>(ys);
    float4 acc[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 2
    for (int m = 0; m < K; ++m) {
      const float4* row = ys4 + sp[m] * D4;
      const float wm = sw[m];
      float4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (b + 32 * u < e) v[u] = row[b + 32 * u];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (b + 32 * u >= e) continue;
        if (kWeighted) {
          acc[u].x = acc[u].x + wm * v[u].x;
          acc[u].y = acc[u].y + wm * v[u].y;
          acc[u].z = acc[u].z + wm * v[u].z;
          acc[u].w = acc[u].w + wm * v[u].w;
        } else {
          acc[u].x = acc[u].x + v[u].x;
          acc[u].y = acc[u].y + v[u].y;
          acc[u].z = acc[u].z + v[u].z;
          acc[u].w = acc[u].w + v[u].w;
        }
      }
    }
    float4* y4 = reinterpret_cast<float4*>(y + t * D);
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (b + 32 * u < e) y4[b + 32 * u] = acc[u];
  } else {
    constexpr int kU = static_cast<int>(kPermChunk / 32);
    float acc[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) acc[u] = 0.0f;
    for (int m = 0; m < K; ++m) {
      const float* row = ys + sp[m] * D;
      const float wm = sw[m];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t i = c0 + lane + 32 * u;
        if (i < c1) acc[u] = acc[u] + (kWeighted ? wm * row[i] : row[i]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t i = c0 + lane + 32 * u;
      if (i < c1) y[t * D + i] = acc[u];
    }
  }
}


// ---- cross-entropy --------------------------------------------------------------------------------------------
__global__ void ce_max_kernel(const float* z, int64_t V, float* m) {
  __shared__ float smem[kRowThreads];
  const int64_t t = blockIdx.x;
  float mx = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, z[t * V + v]);
  mx = detail::block_reduce(mx, smem, [](float a, float b) { return fmaxf(a, b); });
  if (threadIdx.x == 0) m[t] = mx;
}

__global__ void ce_sums_kernel(const float* z, const int64_t* y, const float* m, int64_t T, int64_t V, int64_t begin,
                               double* sums) {
  __shared__ double smem[kRowThreads];
  const int64_t t = blockIdx.x;
  if (y[t] == kCeIgnoreIndex) {
    if (threadIdx.x == 0) sums[t] = sums[T + t] = 0.0;
    return;  // the whole block
  }
  double s = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += exp(static_cast<double>(z[t * V + v] - m[t]));
  s = block_sum_double(s, smem);
  if (threadIdx.x == 0) {
    sums[t] = s;
    const int64_t local = y[t] - begin;
    sums[T + t] = local >= 0 && local < V ? static_cast<double>(z[t * V + local]) : 0.0;
  }
}

__global__ void ce_bwd_kernel(const float* z, const int64_t* y, const double* lse, int64_t V, double norm,
                              int64_t begin, float* g, int64_t n) {
  GRID_STRIDE(k, n) {
    const int64_t t = k / V, v = k - t * V;
    if (y[t] == kCeIgnoreIndex) {
      g[k] = 0.0f;
      continue;
    }
    float r = static_cast<float>(exp(static_cast<double>(z[k]) - lse[t]) / norm);
    if (v == y[t] - begin) r -= static_cast<float>(1.0 / norm);
    g[k] = r;
  }
}

// Vector paths of ce_sums / ce_backward (V % 4 == 0, 16-byte aligned logits / dlogits; ce_backward also T <= 65535).
// Per-element arithmetic is unchanged (the double exp dominates the instruction count, so the aim is to keep many
// 16-byte loads in flight and drop the 64-bit index division per element).
//   ce_sums      minimal bytes T V 4 (+ per-row scalars): one block per row, float4 loads (loop unrolled by 2);
//                the double sum: per-thread partials, warp shuffles, 8 warp sums in fixed order.
//   ce_backward  minimal bytes 8 T V: block (row t = blockIdx.y, 1024 float4 chunk = blockIdx.x), per-row target,
//                lse and 1 / norm read once per block; 4 float4 loads per thread issued before the exps.
constexpr int kCeVec = 4;  // float4 per thread per block in ce_bwd_vec_kernel

__global__ void __launch_bounds__(kRowThreads) ce_sums_vec_kernel(const float* __restrict__ z,
                                                                 const int64_t* __restrict__ y,
                                                                 const float* __restrict__ m, int64_t T, int64_t V,
                                                                 int64_t begin, double* __restrict__ sums) {
  __shared__ double red[kRowWarps];
  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t yt = y[t];
  if (yt == kCeIgnoreIndex) {
    if (tid == 0) sums[t] = sums[T + t] = 0.0;
    return;  // the whole block
  }
  const float mt = m[t];
  const float4* zr = reinterpret_cast<const float4*>(z + t * V);
  const int64_t V4 = V / 4;
  double s = 0;
#pragma unroll 2
  for (int64_t i = tid; i < V4; i += kRowThreads) {
    const float4 a = zr[i];
    s += exp(static_cast<double>(a.x - mt));
    s += exp(static_cast<double>(a.y - mt));
    s += exp(static_cast<double>(a.z - mt));
    s += exp(static_cast<double>(a.w - mt));
  }
  s = block_sum_double_warps(s, red);
  if (tid == 0) {
    sums[t] = s;
    const int64_t local = yt - begin;
    sums[T + t] = local >= 0 && local < V ? static_cast<double>(z[t * V + local]) : 0.0;
  }
}

__device__ __forceinline__ float ce_grad(float zv, double l, double norm, bool target, float onehot) {
  float r = static_cast<float>(exp(static_cast<double>(zv) - l) / norm);
  if (target) r -= onehot;
  return r;
}

__global__ void __launch_bounds__(kRowThreads) ce_bwd_vec_kernel(const float* __restrict__ z,
                                                                const int64_t* __restrict__ y,
                                                                const double* __restrict__ lse, int64_t V,
                                                                double norm, int64_t begin, float* __restrict__ g) {
  const int64_t t = blockIdx.y, V4 = V / 4;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * (kCeVec * kRowThreads) + threadIdx.x;
  const float4* zr = reinterpret_cast<const float4*>(z + t * V);
  float4* gr = reinterpret_cast<float4*>(g + t * V);
  const int64_t yt = y[t];
  if (yt == kCeIgnoreIndex) {
#pragma unroll
    for (int u = 0; u < kCeVec; ++u)
      if (i0 + u * kRowThreads < V4) gr[i0 + u * kRowThreads] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    return;
  }
  const double l = lse[t];
  const float onehot = static_cast<float>(1.0 / norm);
  const int64_t tgt = yt - begin;
  float4 v[kCeVec];
#pragma unroll
  for (int u = 0; u < kCeVec; ++u)
    if (i0 + u * kRowThreads < V4) v[u] = zr[i0 + u * kRowThreads];
#pragma unroll
  for (int u = 0; u < kCeVec; ++u) {
    const int64_t i = i0 + u * kRowThreads;
    if (i >= V4) continue;
    const int64_t c = 4 * i;
    gr[i] = make_float4(ce_grad(v[u].x, l, norm, c == tgt, onehot), ce_grad(v[u].y, l, norm, c + 1 == tgt, onehot),
                        ce_grad(v[u].z, l, norm, c + 2 == tgt, onehot), ce_grad(v[u].w, l, norm, c + 3 == tgt, onehot));
  }
}

// Bytes of a host vector as a device tensor (U8).
Tensor upload_doubles(const std::vector<double>& v, int64_t n, const Device& device) {
  Tensor h = Tensor::empty({n * 8}, DType::U8);
  if (n > 0) std::memcpy(h.raw_data(), v.data(), static_cast<size_t>(n) * 8);
  return h.to(device);
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t T = x.size(0), D = x.size(1);
  cudaStream_t st = stream_of(x);
  const unsigned grid = static_cast<unsigned>(T);
  const int V = rms_vec_width(D, {x.data<float>(), y.data<float>(), fptr(w)});
  const bool hw = w.defined();
#define DSV4_RMS_FWD(VV)                                                                                          \
  case VV:                                                                                                        \
    (hw ? rmsnorm_fwd_vec_kernel<VV, true> : rmsnorm_fwd_vec_kernel<VV, false>)<<<grid, kRowThreads, 0, st>>>( \
        x.data<float>(), fptr(w), y.data<float>(), rstd.data<float>(), D, eps);                                   \
    break;
  switch (V) {
    DSV4_RMS_FWD(1)
    DSV4_RMS_FWD(2)
    DSV4_RMS_FWD(4)
    DSV4_RMS_FWD(8)
    default:
      rmsnorm_fwd_kernel<<<grid, kRowThreads, 0, st>>>(x.data<float>(), fptr(w), y.data<float>(), rstd.data<float>(),
                                                       D, eps);
  }
#undef DSV4_RMS_FWD
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t T = x.size(0), D = x.size(1);
  cudaStream_t st = stream_of(x);
  const bool want_dw = dw.defined() && D > 0;
  const int V = rms_vec_width(D, {dy.data<float>(), x.data<float>(), dx.data<float>(), fptr(w)});
  if (V > 0) {
    const int64_t chunks = (T + kDwRows - 1) / kDwRows;
    Tensor partial = want_dw ? Tensor::empty({chunks, D}, DType::F32, x.device()) : Tensor();
    float* pp = want_dw ? partial.data<float>() : nullptr;
    const auto grid = static_cast<unsigned>(chunks);
    const bool hw = w.defined();
#define DSV4_RMS_BWD(VV)                                                                                          \
  case VV:                                                                                                        \
    (hw ? rmsnorm_bwd_vec_kernel<VV, true> : rmsnorm_bwd_vec_kernel<VV, false>)<<<grid, kRowThreads, 0, st>>>( \
        dy.data<float>(), x.data<float>(), fptr(w), rstd.data<float>(), dx.data<float>(), pp, T, D);              \
    break;
    switch (V) {
      DSV4_RMS_BWD(1)
      DSV4_RMS_BWD(2)
      DSV4_RMS_BWD(4)
      DSV4_RMS_BWD(8)
      default:
        break;
    }
#undef DSV4_RMS_BWD
    CUDA_CHECK_LAUNCH();
    if (!want_dw) return;
    rmsnorm_dw_reduce_kernel<<<static_cast<unsigned>((D + 31) / 32), kRowThreads, 0, st>>>(pp, dw.data<float>(),
                                                                                          chunks, D);
    CUDA_CHECK_LAUNCH();
    return;
  }
  rmsnorm_bwd_dx_kernel<<<static_cast<unsigned>(T), kRowThreads, 0, st>>>(dy.data<float>(), x.data<float>(), fptr(w),
                                                                          rstd.data<float>(), dx.data<float>(), D);
  CUDA_CHECK_LAUNCH();
  if (!want_dw) return;
  const int64_t chunks = (T + kDwChunk - 1) / kDwChunk;
  Tensor partial = Tensor::empty({chunks, D}, DType::F32, x.device());
  const dim3 grid(static_cast<unsigned>((D + kRowThreads - 1) / kRowThreads), static_cast<unsigned>(chunks));
  rmsnorm_bwd_dw_partial_kernel<<<grid, kRowThreads, 0, st>>>(dy.data<float>(), x.data<float>(), rstd.data<float>(),
                                                              partial.data<float>(), T, D);
  CUDA_CHECK_LAUNCH();
  sum_chunks_kernel<<<blocks_for(D), kRowThreads, 0, st>>>(partial.data<float>(), dw.data<float>(), chunks, D);
  CUDA_CHECK_LAUNCH();
}

void rope_apply(Tensor& x, const Tensor& pos, const Tensor& inv_freq, bool inverse) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t R = x.size(0), half = inv_freq.numel(), P = pos.numel(), dim = x.size(1), rs = x.stride(0);
  const int64_t off = dim - 2 * half;
  if (half % 2 == 0 && half <= 1024 && off % 4 == 0 && rs % 4 == 0 && aligned16(x.data<float>()) && P > 0) {
    const int64_t group = R / P, per_pos = group * (half / 2);
    const int64_t PB = std::clamp<int64_t>(1024 / std::max<int64_t>(per_pos, 1), 1, std::max<int64_t>(1, 2048 / half));
    const int64_t blocks = (P + PB - 1) / PB;
    DSV4_CHECK(blocks <= INT32_MAX, "cuda::rope_apply: {} positions", P);
    const size_t smem = static_cast<size_t>(2 * PB * half) * sizeof(float);
    rope_vec_kernel<<<static_cast<unsigned>(blocks), kRowThreads, smem, stream_of(x)>>>(
        x.data<float>(), P, group, rs, off, pos.data<int64_t>(), inv_freq.data<float>(), static_cast<int>(half),
        static_cast<int>(PB), inverse);
    CUDA_CHECK_LAUNCH();
    return;
  }
  rope_kernel<<<blocks_for(R * half), kRowThreads, 0, stream_of(x)>>>(x.data<float>(), R, dim, rs,
                                                                    pos.data<int64_t>(), R / P,
                                                                    inv_freq.data<float>(), half, inverse);
  CUDA_CHECK_LAUNCH();
}

void hashed_dropout(const Tensor& x, uint64_t stream, double p, float keep_scale, uint64_t mask_offset, Tensor& out) {
  detail::DeviceGuard guard(x.device().index);
  hashed_dropout_kernel<<<blocks_for(x.numel()), kRowThreads, 0, stream_of(x)>>>(
      x.data<float>(), x.stride(0), out.data<float>(), x.size(0), x.size(1), stream, p, keep_scale, mask_offset);
  CUDA_CHECK_LAUNCH();
}

void swiglu(const Tensor& g, const Tensor& u, const Tensor& w, double limit, Tensor& h) {
  detail::DeviceGuard guard(g.device().index);
  swiglu_kernel<<<blocks_for(g.numel()), kRowThreads, 0, stream_of(g)>>>(
      g.data<float>(), u.data<float>(), fptr(w), h.data<float>(), g.numel(), g.size(1), g.stride(0), limit > 0,
      static_cast<float>(limit));
  CUDA_CHECK_LAUNCH();
}

void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& w, const Tensor& dh, double limit, Tensor& dg,
                     Tensor& du, Tensor& dw) {
  detail::DeviceGuard guard(g.device().index);
  swiglu_bwd_kernel<<<static_cast<unsigned>(g.size(0)), kRowThreads, 0, stream_of(g)>>>(
      g.data<float>(), u.data<float>(), fptr(w), dh.data<float>(), dg.data<float>(), du.data<float>(),
      dw.defined() ? dw.data<float>() : nullptr, g.size(1), g.stride(0), dg.stride(0), limit > 0,
      static_cast<float>(limit));
  CUDA_CHECK_LAUNCH();
}

void sqrt_softplus(const Tensor& s, Tensor& aff) {
  detail::DeviceGuard guard(s.device().index);
  sqrt_softplus_kernel<<<blocks_for(s.numel()), kRowThreads, 0, stream_of(s)>>>(s.data<float>(), aff.data<float>(),
                                                                              s.numel());
  CUDA_CHECK_LAUNCH();
}

void sqrt_softplus_backward(const Tensor& s, const Tensor& aff, const Tensor& daff, Tensor& ds) {
  detail::DeviceGuard guard(s.device().index);
  sqrt_softplus_bwd_kernel<<<blocks_for(s.numel()), kRowThreads, 0, stream_of(s)>>>(
      s.data<float>(), aff.data<float>(), daff.data<float>(), ds.data<float>(), s.numel());
  CUDA_CHECK_LAUNCH();
}

void moe_route(const Tensor& aff, const Tensor& bias, const Tensor& fixed_idx, double route_scale, Tensor& idx,
               Tensor& w) {
  detail::DeviceGuard guard(aff.device().index);
  const int64_t T = aff.size(0), E = aff.size(1), K = idx.size(1);
  DSV4_CHECK(E <= (int64_t{1} << 30), "cuda::moe_route: {} experts", E);
  if (!fixed_idx.defined() && E <= 32 * kRouteWarpExperts) {
    moe_route_warp_kernel<<<static_cast<unsigned>((T + kRouteWarps - 1) / kRouteWarps), kRouteWarps * 32, 0,
                            stream_of(aff)>>>(aff.data<float>(), fptr(bias), T, E, K, static_cast<float>(route_scale),
                                              idx.data<int64_t>(), w.data<float>());
    CUDA_CHECK_LAUNCH();
    return;
  }
  const size_t smem = static_cast<size_t>(E) * (sizeof(float) + 1);
  DSV4_CHECK(smem <= 48 * 1024, "cuda::moe_route: {} experts exceed the shared-memory tile", E);
  moe_route_kernel<<<static_cast<unsigned>(T), kRouteThreads, smem, stream_of(aff)>>>(
      aff.data<float>(), fptr(bias), fixed_idx.defined() ? fixed_idx.data<int64_t>() : nullptr, E, K,
      static_cast<float>(route_scale), idx.data<int64_t>(), w.data<float>());
  CUDA_CHECK_LAUNCH();
}

void moe_route_backward(const Tensor& aff, const Tensor& idx, const Tensor& dw, double route_scale, Tensor& daff) {
  detail::DeviceGuard guard(aff.device().index);
  const int64_t T = aff.size(0);
  moe_route_bwd_kernel<<<blocks_for(T, 128), 128, 0, stream_of(aff)>>>(aff.data<float>(), idx.data<int64_t>(),
                                                                      dw.data<float>(), T, aff.size(1), idx.size(1),
                                                                      route_scale, daff.data<float>());
  CUDA_CHECK_LAUNCH();
}

void moe_sort_slots(const Tensor& idx, int64_t E, Tensor& offsets, Tensor& sorted_slot) {
  detail::DeviceGuard guard(idx.device().index);
  const int64_t N = idx.numel();
  DSV4_CHECK(N <= INT32_MAX, "cuda::moe_sort_slots: {} slots", N);
  cudaStream_t st = stream_of(idx);
  Tensor slots = Tensor::empty({N}, DType::I64, idx.device());
  Tensor keys = Tensor::empty({N}, DType::I64, idx.device());
  iota_kernel<<<blocks_for(N), kRowThreads, 0, st>>>(slots.data<int64_t>(), N);
  CUDA_CHECK_LAUNCH();
  int end_bit = 1;
  while (end_bit < 63 && (int64_t{1} << end_bit) < E) ++end_bit;
  size_t temp_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, idx.data<int64_t>(), keys.data<int64_t>(),
                                             slots.data<int64_t>(), sorted_slot.data<int64_t>(), static_cast<int>(N), 0,
                                             end_bit, st));
  Tensor temp = Tensor::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))}, DType::U8, idx.device());
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.raw_data(), temp_bytes, idx.data<int64_t>(), keys.data<int64_t>(),
                                             slots.data<int64_t>(), sorted_slot.data<int64_t>(), static_cast<int>(N), 0,
                                             end_bit, st));
  offsets_kernel<<<blocks_for(E + 1), kRowThreads, 0, st>>>(keys.data<int64_t>(), N, E, offsets.data<int64_t>());
  CUDA_CHECK_LAUNCH();
}

void moe_permute(const Tensor& x, const Tensor& sorted_slot, int64_t K, Tensor& out) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t N = out.size(0), D = x.size(1);
  const int64_t chunks = (D + kPermChunk - 1) / kPermChunk, items = N * chunks;
  const auto grid = static_cast<unsigned>((items + kPermWarps - 1) / kPermWarps);
  DSV4_CHECK((items + kPermWarps - 1) / kPermWarps <= INT32_MAX, "cuda::moe_permute: {} rows too many", N);
  const bool vec = D % 4 == 0 && aligned16(x.data<float>()) && aligned16(out.data<float>());
  auto* k = vec ? permute_rows_kernel<true> : permute_rows_kernel<false>;
  k<<<grid, kPermWarps * 32, 0, stream_of(x)>>>(x.data<float>(), sorted_slot.data<int64_t>(), K, D, chunks,
                                               out.data<float>(), items);
  CUDA_CHECK_LAUNCH();
}

void moe_unpermute(const Tensor& y_sorted, const Tensor& sorted_slot, const Tensor& w, int64_t K, Tensor& y) {
  detail::DeviceGuard guard(y.device().index);
  DSV4_CHECK(K <= kMaxCombineK, "cuda::moe_unpermute: K = {} exceeds {}", K, kMaxCombineK);
  const int64_t N = sorted_slot.numel(), T = y.size(0), D = y.size(1);
  cudaStream_t st = stream_of(y);
  Tensor pos = Tensor::empty({N}, DType::I64, y.device());
  invert_kernel<<<blocks_for(N), kRowThreads, 0, st>>>(sorted_slot.data<int64_t>(), pos.data<int64_t>(), N);
  CUDA_CHECK_LAUNCH();
  const int64_t chunks = (D + kPermChunk - 1) / kPermChunk, items = T * chunks;
  DSV4_CHECK((items + kPermWarps - 1) / kPermWarps <= INT32_MAX, "cuda::moe_unpermute: {} rows too many", T);
  const auto grid = static_cast<unsigned>((items + kPermWarps - 1) / kPermWarps);
  const bool vec = D % 4 == 0 && aligned16(y_sorted.data<float>()) && aligned16(y.data<float>());
  const bool weighted = w.defined();
  auto* k = vec ? (weighted ? unpermute_rows_kernel<true, true> : unpermute_rows_kernel<true, false>)
                : (weighted ? unpermute_rows_kernel<false, true> : unpermute_rows_kernel<false, false>);
  k<<<grid, kPermWarps * 32, 0, st>>>(y_sorted.data<float>(), pos.data<int64_t>(), fptr(w), K, D, chunks,
                                      y.data<float>(), items);
  CUDA_CHECK_LAUNCH();
}

void ce_row_max(const Tensor& logits, Tensor& row_max) {
  detail::DeviceGuard guard(logits.device().index);
  ce_max_kernel<<<static_cast<unsigned>(logits.size(0)), kRowThreads, 0, stream_of(logits)>>>(
      logits.data<float>(), logits.size(1), row_max.data<float>());
  CUDA_CHECK_LAUNCH();
}

void ce_sums(const Tensor& logits, const Tensor& targets, const Tensor& row_max, int64_t begin,
             std::vector<double>& sums) {
  detail::DeviceGuard guard(logits.device().index);
  const int64_t T = logits.size(0);
  Tensor d = Tensor::empty({2 * T * 8}, DType::U8, logits.device());
  if (logits.size(1) % 4 == 0 && aligned16(logits.data<float>()))
    ce_sums_vec_kernel<<<static_cast<unsigned>(T), kRowThreads, 0, stream_of(logits)>>>(
        logits.data<float>(), targets.data<int64_t>(), row_max.data<float>(), T, logits.size(1), begin,
        static_cast<double*>(d.raw_data()));
  else
    ce_sums_kernel<<<static_cast<unsigned>(T), kRowThreads, 0, stream_of(logits)>>>(
        logits.data<float>(), targets.data<int64_t>(), row_max.data<float>(), T, logits.size(1), begin,
        static_cast<double*>(d.raw_data()));
  CUDA_CHECK_LAUNCH();
  const Tensor h = d.to(Device::cpu());
  sums.resize(static_cast<size_t>(2 * T));
  std::memcpy(sums.data(), h.raw_data(), static_cast<size_t>(2 * T) * 8);
}

void ce_backward(const Tensor& logits, const Tensor& targets, const std::vector<double>& lse, double norm,
                 int64_t begin, Tensor& dlogits) {
  detail::DeviceGuard guard(logits.device().index);
  const Tensor l = upload_doubles(lse, logits.size(0), logits.device());
  const int64_t T = logits.size(0), V = logits.size(1);
  if (V % 4 == 0 && T <= 65535 && aligned16(logits.data<float>()) && aligned16(dlogits.data<float>())) {
    const dim3 grid(static_cast<unsigned>((V / 4 + kCeVec * kRowThreads - 1) / (kCeVec * kRowThreads)),
                    static_cast<unsigned>(T));
    ce_bwd_vec_kernel<<<grid, kRowThreads, 0, stream_of(logits)>>>(logits.data<float>(), targets.data<int64_t>(),
                                                                   static_cast<const double*>(l.raw_data()), V, norm,
                                                                   begin, dlogits.data<float>());
    CUDA_CHECK_LAUNCH();
    return;
  }
  ce_bwd_kernel<<<blocks_for(dlogits.numel()), kRowThreads, 0, stream_of(logits)>>>(
      logits.data<float>(), targets.data<int64_t>(), static_cast<const double*>(l.raw_data()), logits.size(1), norm,
      begin, dlogits.data<float>(), dlogits.numel());
  CUDA_CHECK_LAUNCH();
}

}  // namespace dsv4::cuda
