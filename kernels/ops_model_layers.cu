// CUDA twins of the model's memory-bound layers (runtime/model_ops.h; CPU reference src/runtime/cpu_model_ops.cpp over
// runtime/model_math.h). Built with --fmad=false (kernels/CMakeLists.txt) so products and sums round as on the CPU;
// exp / log / sqrt are CUDA's (IEEE sqrt and division; expf / log1pf within 2 ulp), sin / cos are evaluated in double
// and rounded. Sums are deterministic: fixed tree reductions, per-block partials then a second pass, no float atomics.
//
//   rmsnorm_forward / backward(dx)  one block per row, double tree sum (like the CPU's double accumulation)
//   rmsnorm_backward(dw)            per (column tile, 128-row chunk) FP32 partials, then a pass over the chunks
//   rope_apply                      one thread per rotated pair
//   swiglu / backward               element-wise; dw: one block per row (double tree sum)
//   sqrt_softplus(+backward)        element-wise
//   moe_route                       one block per token: K rounds of a (value, id) arg-best tree (exact comparisons)
//   moe_route_backward              one thread per token (the CPU's sequential sums)
//   moe_sort_slots                  cub stable radix sort of (expert, slot), offsets by binary search
//   moe_permute / moe_unpermute     gathers; unpermute sums each token's slots in ascending sorted position
//   ce_row_max / ce_sums            one block per row (max: order-free; sums: double tree)
//   ce_backward                     element-wise
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cub/cub.cuh>

#include <cstring>

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

// ---- clamped SwiGLU -------------------------------------------------------------------------------------------
__global__ void swiglu_kernel(const float* g, const float* u, const float* w, float* h, int64_t n, int64_t I,
                              bool clamp, float L) {
  GRID_STRIDE(k, n) {
    float gv = g[k], uv = u[k];
    if (clamp) {
      uv = fminf(fmaxf(uv, -L), L);
      gv = fminf(gv, L);
    }
    float v = gv / (1.0f + expf(-gv)) * uv;
    if (w) v = w[k / I] * v;
    h[k] = v;
  }
}

__global__ void swiglu_bwd_kernel(const float* g, const float* u, const float* w, const float* dh, float* dg,
                                  float* du, float* dw, int64_t I, bool clamp, float L) {
  __shared__ double smem[kRowThreads];
  const int64_t r = blockIdx.x;
  const float wr = w ? w[r] : 1.0f;
  double dwr = 0;
  for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
    const int64_t k = r * I + i;
    const float g0 = g[k], u0 = u[k];
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
    dg[k] = g_pass ? dv * uv * (sig * (1.0f + gv * (1.0f - sig))) : 0.0f;
    du[k] = u_pass ? dv * silu : 0.0f;
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
    float sum = 0.0f;
    for (int64_t j = 0; j < K; ++j) sum += a[it[j]];
    const float denom = sum + static_cast<float>(kRouteNormEps);
    for (int64_t j = 0; j < K; ++j) {
      float q = a[it[j]] / denom;
      q *= route_scale;
      w[t * K + j] = q;
    }
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

__global__ void permute_kernel(const float* x, const int64_t* sorted_slot, int64_t K, int64_t D, float* out,
                               int64_t n) {
  GRID_STRIDE(k, n) {
    const int64_t p = k / D, i = k - p * D;
    out[k] = x[(sorted_slot[p] / K) * D + i];
  }
}

__global__ void invert_kernel(const int64_t* sorted_slot, int64_t* pos_of_slot, int64_t n) {
  GRID_STRIDE(p, n) pos_of_slot[sorted_slot[p]] = p;
}

constexpr int64_t kMaxCombineK = 64;

__global__ void unpermute_kernel(const float* ys, const int64_t* pos_of_slot, const float* w, int64_t K, int64_t D,
                                 float* y, int64_t n) {
  GRID_STRIDE(k, n) {
    const int64_t t = k / D, i = k - t * D;
    int64_t ps[kMaxCombineK];
    int64_t js[kMaxCombineK];
    for (int64_t j = 0; j < K; ++j) {  // insertion sort by sorted position
      const int64_t p = pos_of_slot[t * K + j];
      int64_t m = j;
      while (m > 0 && ps[m - 1] > p) {
        ps[m] = ps[m - 1];
        js[m] = js[m - 1];
        --m;
      }
      ps[m] = p;
      js[m] = j;
    }
    float acc = 0.0f;
    for (int64_t m = 0; m < K; ++m) {
      const float v = ys[ps[m] * D + i];
      acc += w ? w[t * K + js[m]] * v : v;
    }
    y[k] = acc;
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

// Bytes of a host vector as a device tensor (U8).
Tensor upload_doubles(const std::vector<double>& v, int64_t n, const Device& device) {
  Tensor h = Tensor::empty({n * 8}, DType::U8);
  if (n > 0) std::memcpy(h.raw_data(), v.data(), static_cast<size_t>(n) * 8);
  return h.to(device);
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  detail::DeviceGuard guard(x.device().index);
  rmsnorm_fwd_kernel<<<static_cast<unsigned>(x.size(0)), kRowThreads, 0, stream_of(x)>>>(
      x.data<float>(), fptr(w), y.data<float>(), rstd.data<float>(), x.size(1), eps);
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t T = x.size(0), D = x.size(1);
  cudaStream_t st = stream_of(x);
  rmsnorm_bwd_dx_kernel<<<static_cast<unsigned>(T), kRowThreads, 0, st>>>(dy.data<float>(), x.data<float>(), fptr(w),
                                                                          rstd.data<float>(), dx.data<float>(), D);
  CUDA_CHECK_LAUNCH();
  if (!dw.defined() || D == 0) return;
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
  const int64_t R = x.size(0), half = inv_freq.numel();
  rope_kernel<<<blocks_for(R * half), kRowThreads, 0, stream_of(x)>>>(x.data<float>(), R, x.size(1), x.stride(0),
                                                                    pos.data<int64_t>(), R / pos.numel(),
                                                                    inv_freq.data<float>(), half, inverse);
  CUDA_CHECK_LAUNCH();
}

void swiglu(const Tensor& g, const Tensor& u, const Tensor& w, double limit, Tensor& h) {
  detail::DeviceGuard guard(g.device().index);
  swiglu_kernel<<<blocks_for(g.numel()), kRowThreads, 0, stream_of(g)>>>(
      g.data<float>(), u.data<float>(), fptr(w), h.data<float>(), g.numel(), g.size(1), limit > 0,
      static_cast<float>(limit));
  CUDA_CHECK_LAUNCH();
}

void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& w, const Tensor& dh, double limit, Tensor& dg,
                     Tensor& du, Tensor& dw) {
  detail::DeviceGuard guard(g.device().index);
  swiglu_bwd_kernel<<<static_cast<unsigned>(g.size(0)), kRowThreads, 0, stream_of(g)>>>(
      g.data<float>(), u.data<float>(), fptr(w), dh.data<float>(), dg.data<float>(), du.data<float>(),
      dw.defined() ? dw.data<float>() : nullptr, g.size(1), limit > 0, static_cast<float>(limit));
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
  permute_kernel<<<blocks_for(out.numel()), kRowThreads, 0, stream_of(x)>>>(
      x.data<float>(), sorted_slot.data<int64_t>(), K, x.size(1), out.data<float>(), out.numel());
  CUDA_CHECK_LAUNCH();
}

void moe_unpermute(const Tensor& y_sorted, const Tensor& sorted_slot, const Tensor& w, int64_t K, Tensor& y) {
  detail::DeviceGuard guard(y.device().index);
  DSV4_CHECK(K <= kMaxCombineK, "cuda::moe_unpermute: K = {} exceeds {}", K, kMaxCombineK);
  const int64_t N = sorted_slot.numel();
  cudaStream_t st = stream_of(y);
  Tensor pos = Tensor::empty({N}, DType::I64, y.device());
  invert_kernel<<<blocks_for(N), kRowThreads, 0, st>>>(sorted_slot.data<int64_t>(), pos.data<int64_t>(), N);
  CUDA_CHECK_LAUNCH();
  unpermute_kernel<<<blocks_for(y.numel()), kRowThreads, 0, st>>>(y_sorted.data<float>(), pos.data<int64_t>(), fptr(w),
                                                                  K, y.size(1), y.data<float>(), y.numel());
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
  ce_bwd_kernel<<<blocks_for(dlogits.numel()), kRowThreads, 0, stream_of(logits)>>>(
      logits.data<float>(), targets.data<int64_t>(), static_cast<const double*>(l.raw_data()), logits.size(1), norm,
      begin, dlogits.data<float>(), dlogits.numel());
  CUDA_CHECK_LAUNCH();
}

}  // namespace dsv4::cuda
