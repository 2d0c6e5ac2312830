// CUDA twin of the sparse attention core with a sink (CPU reference: src/model/sparse_attention.h; host API and
// candidate layout: kernels/attention_kernels.h). FP32 throughout.
//
// Forward: one 256-thread block per (query, head group); a head group is all H heads unless 2 HB C floats exceed
// the shared-memory budget (then HB < H heads per block). The block stages q_t [HB, C] in shared memory and walks
// the query's candidate list in tiles of kTile rows: a tile of K = V rows is loaded once for all HB heads, the
// HB x kTile scores are warp dot products (lanes over C, xor-shuffle tree), each head's online softmax (running
// max starts at the sink logit, running sum at exp(0) = 1 for the sink) rescales the [HB, C] FP32 accumulator in
// shared memory, and the accumulator adds p_j k_j. o = acc / l, lse = m + log(l). Empty list: o = 0, lse = sink.
//
// Backward (no atomics; every output element is summed by one thread in a fixed order):
//  1. query-major, per (query, head group): D = do . o (saved to the workspace), then per candidate tile
//     p = exp(scale q.k - lse), dz = p (do.k - D), dq += scale dz k; dq overwritten.
//  2. key-major, one block per candidate row r (raw and compressed): walks the key-major list of r (queries
//     ascending, built on the host) and recomputes p and dz for every (query, head) to accumulate
//     dk_r += scale dz q + p do in the reference's order (query ascending, then head), starting from the existing
//     dkv / dckv value. This recomputes the scores once more instead of storing per-(query, candidate) partials
//     ([nnz, C] floats, gigabytes at V4 sizes).
//  3. dsink[h] -= sum_t exp(sink_h - lse_th) D_th, one thread per head, t ascending (the reference's order).
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <algorithm>

#include "kernels/attention_kernels.h"
#include "kernels/attn_sparse_common.cuh"
#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 16;  // candidate rows per shared-memory tile

using detail::warp_dot;
using detail::warp_sum;



__device__ __forceinline__ const float* cand_row(const float* kv, const float* ckv, int64_t id, int64_t n_raw,
                                                 int64_t C) {
  return id < n_raw ? kv + id * C : ckv + (id - n_raw) * C;
}

// Loads candidate rows [c0, c0 + nk) of the list into ks [kTile, C].
__device__ __forceinline__ void load_tile(float* ks, const float* kv, const float* ckv, const int32_t* ids, int64_t c0,
                                          int nk, int64_t n_raw, int C) {
  for (int i = static_cast<int>(threadIdx.x); i < nk * C; i += blockDim.x) {
    const int j = i / C, d = i - j * C;
    ks[i] = cand_row(kv, ckv, ids[c0 + j], n_raw, C)[d];
  }
}

__global__ void __launch_bounds__(kThreads)
    sparse_fwd_kernel(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ ckv,
                      const float* __restrict__ sink, const int32_t* __restrict__ offsets,
                      const int32_t* __restrict__ ids, int64_t n_raw, int H, int C, int HB, float scale,
                      float* __restrict__ o, float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int t = static_cast<int>(blockIdx.x);
  const int h0 = static_cast<int>(blockIdx.y) * HB;
  const int hb = min(HB, H - h0);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  float* qs = smem;                // [HB, C]
  float* acc = qs + HB * C;        // [HB, C]
  float* ks = acc + HB * C;        // [kTile, C]
  float* ps = ks + kTile * C;      // [HB, kTile] scores, then weights
  float* m_s = ps + HB * kTile;    // [HB] running max
  float* l_s = m_s + HB;           // [HB] running sum
  float* a_s = l_s + HB;           // [HB] rescale factor of the tile

  const float* qt = q + (static_cast<int64_t>(t) * H + h0) * C;
  for (int i = tid; i < hb * C; i += kThreads) {
    qs[i] = qt[i];
    acc[i] = 0.0f;
  }
  if (tid < hb) {
    m_s[tid] = sink[h0 + tid];
    l_s[tid] = 1.0f;  // exp(sink - sink)
  }
  const int64_t beg = offsets[t], end = offsets[t + 1];
  for (int64_t c0 = beg; c0 < end; c0 += kTile) {
    const int nk = static_cast<int>(end - c0 < kTile ? end - c0 : kTile);
    __syncthreads();  // previous tile fully consumed
    load_tile(ks, kv, ckv, ids, c0, nk, n_raw, C);
    __syncthreads();
    for (int pr = warp; pr < hb * nk; pr += kWarps) {
      const int h = pr / nk, j = pr - h * nk;
      const float z = warp_dot(qs + h * C, ks + j * C, C, lane) * scale;
      if (lane == 0) ps[h * kTile + j] = z;
    }
    __syncthreads();
    if (tid < hb) {
      float* p = ps + tid * kTile;
      const float m_old = m_s[tid];
      float m = m_old;
      for (int j = 0; j < nk; ++j) m = fmaxf(m, p[j]);
      float sum = 0.0f;
      for (int j = 0; j < nk; ++j) {
        p[j] = expf(p[j] - m);
        sum += p[j];
      }
      const float alpha = expf(m_old - m);
      l_s[tid] = l_s[tid] * alpha + sum;
      m_s[tid] = m;
      a_s[tid] = alpha;
    }
    __syncthreads();
    for (int i = tid; i < hb * C; i += kThreads) {
      const int h = i / C, d = i - h * C;
      const float* p = ps + h * kTile;
      float v = acc[i] * a_s[h];
      for (int j = 0; j < nk; ++j) v = fmaf(p[j], ks[j * C + d], v);
      acc[i] = v;
    }
  }
  __syncthreads();
  float* ot = o + (static_cast<int64_t>(t) * H + h0) * C;
  for (int i = tid; i < hb * C; i += kThreads) ot[i] = acc[i] / l_s[i / C];
  if (tid < hb) lse[static_cast<int64_t>(t) * H + h0 + tid] = m_s[tid] + logf(l_s[tid]);
}

// Backward 1: dq (overwritten) and D = do . o per (query, head) into Dws [T, H].
__global__ void __launch_bounds__(kThreads)
    sparse_bwd_dq_kernel(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ ckv,
                         const float* __restrict__ o, const float* __restrict__ lse, const float* __restrict__ dout,
                         const int32_t* __restrict__ offsets, const int32_t* __restrict__ ids, int64_t n_raw, int H,
                         int C, int HB, float scale, float* __restrict__ dq, float* __restrict__ Dws) {
  extern __shared__ float smem[];
  const int t = static_cast<int>(blockIdx.x);
  const int h0 = static_cast<int>(blockIdx.y) * HB;
  const int hb = min(HB, H - h0);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  float* qs = smem;               // [HB, C]
  float* dos = qs + HB * C;       // [HB, C]
  float* dqs = dos + HB * C;      // [HB, C]
  float* ks = dqs + HB * C;       // [kTile, C]
  float* as = ks + kTile * C;     // [HB, kTile] scale * dz
  float* D_s = as + HB * kTile;   // [HB]
  float* lse_s = D_s + HB;        // [HB]

  const int64_t base = (static_cast<int64_t>(t) * H + h0) * C;
  for (int i = tid; i < hb * C; i += kThreads) {
    qs[i] = q[base + i];
    dos[i] = dout[base + i];
    dqs[i] = 0.0f;
  }
  __syncthreads();
  for (int h = warp; h < hb; h += kWarps) {
    const float Dh = warp_dot(dos + h * C, o + base + static_cast<int64_t>(h) * C, C, lane);
    if (lane == 0) {
      D_s[h] = Dh;
      Dws[static_cast<int64_t>(t) * H + h0 + h] = Dh;
      lse_s[h] = lse[static_cast<int64_t>(t) * H + h0 + h];
    }
  }
  const int64_t beg = offsets[t], end = offsets[t + 1];
  for (int64_t c0 = beg; c0 < end; c0 += kTile) {
    const int nk = static_cast<int>(end - c0 < kTile ? end - c0 : kTile);
    __syncthreads();
    load_tile(ks, kv, ckv, ids, c0, nk, n_raw, C);
    __syncthreads();
    for (int pr = warp; pr < hb * nk; pr += kWarps) {
      const int h = pr / nk, j = pr - h * nk;
      const float s = warp_dot(qs + h * C, ks + j * C, C, lane);
      const float dp = warp_dot(dos + h * C, ks + j * C, C, lane);
      if (lane == 0) {
        const float p = expf(s * scale - lse_s[h]);
        as[h * kTile + j] = scale * (p * (dp - D_s[h]));
      }
    }
    __syncthreads();
    for (int i = tid; i < hb * C; i += kThreads) {
      const int h = i / C, d = i - h * C;
      const float* a = as + h * kTile;
      float v = dqs[i];
      for (int j = 0; j < nk; ++j) v = fmaf(a[j], ks[j * C + d], v);
      dqs[i] = v;
    }
  }
  __syncthreads();
  for (int i = tid; i < hb * C; i += kThreads) dq[base + i] = dqs[i];
}

// Backward 2: one block per candidate row; dk_r += sum over (query ascending, head ascending).
__global__ void __launch_bounds__(kThreads)
    sparse_bwd_dk_kernel(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ ckv,
                         const float* __restrict__ lse, const float* __restrict__ dout, const float* __restrict__ Dws,
                         const int32_t* __restrict__ key_offsets, const int32_t* __restrict__ key_queries,
                         int64_t n_raw, int H, int C, int HB, float scale, float* __restrict__ dkv,
                         float* __restrict__ dckv) {
  extern __shared__ float smem[];
  const int64_t r = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  float* kr = smem;              // [C]
  float* acc = kr + C;           // [C]  (thread tid owns d = tid + k * kThreads)
  float* qs = acc + C;           // [HB, C]
  float* dos = qs + HB * C;      // [HB, C]
  float* a_s = dos + HB * C;     // [HB] scale * dz
  float* p_s = a_s + HB;         // [HB] p
  const float* krow = cand_row(kv, ckv, r, n_raw, C);
  float* drow = r < n_raw ? dkv + r * C : dckv + (r - n_raw) * C;
  for (int d = tid; d < C; d += kThreads) {
    kr[d] = krow[d];
    acc[d] = drow[d];
  }
  const int64_t beg = key_offsets[r], end = key_offsets[r + 1];
  for (int64_t e = beg; e < end; ++e) {
    const int64_t t = key_queries[e];
    for (int h0 = 0; h0 < H; h0 += HB) {
      const int hb = min(HB, H - h0);
      const int64_t base = (t * H + h0) * C;
      __syncthreads();  // previous head group consumed (and kr / acc initialised)
      for (int i = tid; i < hb * C; i += kThreads) {
        qs[i] = q[base + i];
        dos[i] = dout[base + i];
      }
      __syncthreads();
      for (int h = warp; h < hb; h += kWarps) {
        const float s = warp_dot(qs + h * C, kr, C, lane);
        const float dp = warp_dot(dos + h * C, kr, C, lane);
        if (lane == 0) {
          const int64_t th = t * H + h0 + h;
          const float p = expf(s * scale - lse[th]);
          a_s[h] = scale * (p * (dp - Dws[th]));
          p_s[h] = p;
        }
      }
      __syncthreads();
      for (int d = tid; d < C; d += kThreads) {
        float v = acc[d];
        for (int h = 0; h < hb; ++h) v += a_s[h] * qs[h * C + d] + p_s[h] * dos[h * C + d];
        acc[d] = v;
      }
    }
  }
  __syncthreads();
  for (int d = tid; d < C; d += kThreads) drow[d] = acc[d];
}

// Largest dynamic shared memory a block may opt into on the current device.
size_t smem_budget() {
  int dev = 0, bytes = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return static_cast<size_t>(bytes);
}

// Heads per block: the largest HB <= H with fixed + per_head * HB bytes within the budget.
int heads_per_block(int64_t H, size_t fixed, size_t per_head, const char* what) {
  const size_t budget = smem_budget();
  DSV4_CHECK(fixed + per_head <= budget, "cuda::{}: head_dim too large for shared memory ({} + {} > {} bytes)", what,
             fixed, per_head, budget);
  return static_cast<int>(std::min<int64_t>(H, static_cast<int64_t>((budget - fixed) / per_head)));
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

void check_args(int64_t T, int64_t n_raw, int64_t n_comp, int64_t H, int64_t C, const float* ckv, const char* what) {
  DSV4_CHECK(T >= 0 && n_raw >= 0 && n_comp >= 0 && H >= 1 && C >= 1, "cuda::{}: bad sizes T={} n_raw={} n_comp={} H={} C={}",
             what, T, n_raw, n_comp, H, C);
  DSV4_CHECK(n_comp == 0 || ckv != nullptr, "cuda::{}: {} compressed rows but no ckv", what, n_comp);
  DSV4_CHECK(T < (int64_t{1} << 31) && H * C < (int64_t{1} << 31), "cuda::{}: sizes exceed int32 grid indexing", what);
}

}  // namespace

void sparse_attn_forward(const float* q, const float* kv, const float* ckv, const float* sink,
                         const int32_t* cand_offsets, const int32_t* cand_ids, int64_t T, int64_t n_raw,
                         int64_t n_comp, int64_t H, int64_t C, float scale, float* o, float* lse, void* stream) {
  check_args(T, n_raw, n_comp, H, C, ckv, "sparse_attn_forward");
  if (T == 0) return;
  const size_t fixed = static_cast<size_t>(kTile * C) * sizeof(float);
  const size_t per_head = static_cast<size_t>(2 * C + kTile + 3) * sizeof(float);
  const int HB = heads_per_block(H, fixed, per_head, "sparse_attn_forward");
  const size_t bytes = fixed + per_head * static_cast<size_t>(HB);
  allow_smem(sparse_fwd_kernel, bytes);
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((H + HB - 1) / HB));
  sparse_fwd_kernel<<<grid, kThreads, bytes, static_cast<cudaStream_t>(stream)>>>(
      q, kv, ckv, sink, cand_offsets, cand_ids, n_raw, static_cast<int>(H), static_cast<int>(C), HB, scale, o, lse);
  CUDA_CHECK_LAUNCH();
}

void sparse_attn_backward(const float* q, const float* kv, const float* ckv, const float* sink, const float* o,
                          const float* lse, const float* dout, const int32_t* cand_offsets, const int32_t* cand_ids,
                          const int32_t* key_offsets, const int32_t* key_queries, int64_t T, int64_t n_raw,
                          int64_t n_comp, int64_t H, int64_t C, float scale, float* dq, float* dkv, float* dckv,
                          float* dsink, float* workspace, void* stream) {
  check_args(T, n_raw, n_comp, H, C, ckv, "sparse_attn_backward");
  DSV4_CHECK(n_comp == 0 || dckv != nullptr, "cuda::sparse_attn_backward: {} compressed rows but no dckv", n_comp);
  const auto st = static_cast<cudaStream_t>(stream);
  if (T > 0) {
    const size_t fixed = static_cast<size_t>(kTile * C) * sizeof(float);
    const size_t per_head = static_cast<size_t>(3 * C + kTile + 2) * sizeof(float);
    const int HB = heads_per_block(H, fixed, per_head, "sparse_attn_backward (dq)");
    const size_t bytes = fixed + per_head * static_cast<size_t>(HB);
    allow_smem(sparse_bwd_dq_kernel, bytes);
    const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((H + HB - 1) / HB));
    sparse_bwd_dq_kernel<<<grid, kThreads, bytes, st>>>(q, kv, ckv, o, lse, dout, cand_offsets, cand_ids, n_raw,
                                                        static_cast<int>(H), static_cast<int>(C), HB, scale, dq,
                                                        workspace);
    CUDA_CHECK_LAUNCH();
  }
  const int64_t rows = n_raw + n_comp;
  if (rows > 0) {
    const size_t fixed = static_cast<size_t>(2 * C) * sizeof(float);
    const size_t per_head = static_cast<size_t>(2 * C + 2) * sizeof(float);
    const int HB = heads_per_block(H, fixed, per_head, "sparse_attn_backward (dk)");
    const size_t bytes = fixed + per_head * static_cast<size_t>(HB);
    allow_smem(sparse_bwd_dk_kernel, bytes);
    sparse_bwd_dk_kernel<<<static_cast<unsigned>(rows), kThreads, bytes, st>>>(
        q, kv, ckv, lse, dout, workspace, key_offsets, key_queries, n_raw, static_cast<int>(H), static_cast<int>(C),
        HB, scale, dkv, dckv);
    CUDA_CHECK_LAUNCH();
  }
  sparse_bwd_dsink_kernel<<<static_cast<unsigned>((H + 127) / 128), 128, 0, st>>>(sink, lse, workspace, T,
                                                                                  static_cast<int>(H), dsink);
  CUDA_CHECK_LAUNCH();
}

}  // namespace dsv4::cuda
