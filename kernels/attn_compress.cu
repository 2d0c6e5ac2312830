// CUDA twins of the KV compressor's pooling (fwd/bwd) and of the lightning indexer's scores and causal top-k
// (CPU references: src/model/compressor.cpp, src/model/indexer.cpp; host API: kernels/attention_kernels.h).
// FP32 throughout.
//
// Compressor pooling: one thread per (entry, channel) runs the shared per-channel core
// (src/runtime/compress_math.h) — the reference's operations in the reference's order, so only exp and the lack of
// FMA contraction differ from the CPU. Consecutive threads take consecutive channels: every slot read is coalesced.
// Backward: each (token row, column) of dkv / dgate belongs to at most one (entry, slot) (ratio 4: a row's first C
// columns to the next entry's previous-block slots, its last C to its own entry), so the owning thread adds to it.
// The ape gradient sums over entries: each thread writes its entry's terms to a workspace [E, m, W]; a second
// kernel sums chunks of kCompressApeChunk entries in ascending order, a third the chunks in order and adds to dape.
//
// Indexer scores: one 256-thread block per (query, group of entry tiles). q_t [nI, cI] is staged in shared memory,
// then per tile of kTileE entries the keys [kTileE, cI + 1] (padded: conflict-free column reads); lane e of warp w
// computes the dots of entry e with heads w, w + 8, ... (sequential FMA over cI), writes each head's term to
// shared memory, and one thread per entry sums the terms over h ascending (the reference's order).
//
// Top-k: one block per query. Radix select over an order-preserving uint32 key of the scores (4 passes of 8 bits,
// shared-memory histograms with integer atomics: exact) finds the k-th largest key and how many of the entries
// equal to it are taken (the lowest ids: the reference's tie rule); a block scan in entry order then writes the
// selected ids ascending. No floating-point arithmetic, so the selection is exact for the given scores.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cub/cub.cuh>

#include <algorithm>
#include <limits>

#include "kernels/attention_kernels.h"
#include "runtime/compress_math.h"

namespace dsv4::cuda {
namespace {

constexpr int kPoolThreads = 256;

__global__ void __launch_bounds__(kPoolThreads)
    compress_pool_fwd_kernel(const float* __restrict__ kv, const float* __restrict__ gate,
                             const float* __restrict__ ape, const int64_t* __restrict__ entry_token,
                             const uint8_t* __restrict__ entry_has_prev, int64_t E, int64_t m, int64_t C, bool overlap,
                             float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= E * C) return;
  const int64_t e = i / C, c = i - e * C;
  float mx, sum;
  compress_pool_entry_forward<float>(kv, gate, ape, entry_token[e], entry_has_prev[e] != 0, m, C, overlap, c, c + 1,
                                     &mx, &sum, out + e * C);
}

// dape terms of entry e go to ws_e = workspace + e * m * W (zeroed here first by the same thread for its channel).
__global__ void __launch_bounds__(kPoolThreads)
    compress_pool_bwd_kernel(const float* __restrict__ kv, const float* __restrict__ gate,
                             const float* __restrict__ ape, const int64_t* __restrict__ entry_token,
                             const uint8_t* __restrict__ entry_has_prev, int64_t E, int64_t m, int64_t C, bool overlap,
                             const float* __restrict__ dout, float* __restrict__ dkv, float* __restrict__ dgate,
                             float* __restrict__ ws) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= E * C) return;
  const int64_t e = i / C, c = i - e * C;
  const int64_t W = compress_width(C, overlap);
  float* ws_e = ws + e * m * W;
  for (int64_t j = 0; j < m; ++j) {
    ws_e[j * W + c] = 0.0f;
    if (overlap) ws_e[j * W + C + c] = 0.0f;
  }
  float mx, sum, ssum;
  compress_pool_entry_backward<float>(kv, gate, ape, entry_token[e], entry_has_prev[e] != 0, m, C, overlap, c, c + 1,
                                      dout + e * C, &mx, &sum, &ssum, dkv, dgate, ws_e);
}

// partial[chunk, j] = sum of ws[e, j] over the chunk's entries, ascending. j over m * W.
__global__ void compress_ape_partial_kernel(const float* __restrict__ ws, int64_t E, int64_t mW,
                                            float* __restrict__ partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= mW) return;
  const int64_t chunk = blockIdx.y;
  const int64_t e0 = chunk * kCompressApeChunk, e1 = E < e0 + kCompressApeChunk ? E : e0 + kCompressApeChunk;
  float s = 0.0f;
  for (int64_t e = e0; e < e1; ++e) s += ws[e * mW + j];
  partial[chunk * mW + j] = s;
}

__global__ void compress_ape_final_kernel(const float* __restrict__ partial, int64_t chunks, int64_t mW,
                                          float* __restrict__ dape) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= mW) return;
  float s = 0.0f;
  for (int64_t ch = 0; ch < chunks; ++ch) s += partial[ch * mW + j];
  dape[j] += s;
}

// ---- indexer scores --------------------------------------------------------------------------------------------
constexpr int kIdxThreads = 256;
constexpr int kIdxWarps = kIdxThreads / 32;
constexpr int kTileE = 32;          // entries per tile: one per lane
constexpr int kMaxTileGroups = 256;  // grid.y cap; blocks stride over the remaining tiles

__global__ void __launch_bounds__(kIdxThreads)
    indexer_scores_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ w,
                          const int64_t* __restrict__ first_entry, const int64_t* __restrict__ offsets, int nI, int cI,
                          float score_scale, float weight_scale, bool round_bf16_out, float* __restrict__ scores) {
  extern __shared__ float smem[];
  const int64_t t = blockIdx.x;
  const int64_t n = offsets[t + 1] - offsets[t];
  if (static_cast<int64_t>(blockIdx.y) * kTileE >= n) return;  // uniform per block
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int kstride = cI + 1;
  float* qs = smem;                     // [nI, cI]
  float* ks = qs + nI * cI;             // [kTileE, cI + 1]
  float* terms = ks + kTileE * kstride;  // [nI, kTileE]
  float* wt = terms + nI * kTileE;      // [nI] w[t, h] * weight_scale
  for (int i = tid; i < nI * cI; i += kIdxThreads) qs[i] = q[t * nI * cI + i];
  for (int h = tid; h < nI; h += kIdxThreads) wt[h] = w[t * nI + h] * weight_scale;
  const int64_t fe = first_entry[t];
  float* out = scores + offsets[t];
  for (int64_t e0 = static_cast<int64_t>(blockIdx.y) * kTileE; e0 < n; e0 += static_cast<int64_t>(gridDim.y) * kTileE) {
    const int ne = static_cast<int>(n - e0 < kTileE ? n - e0 : kTileE);
    __syncthreads();  // qs / wt ready; the previous tile fully consumed
    for (int i = tid; i < ne * cI; i += kIdxThreads) {
      const int j = i / cI, d = i - j * cI;
      ks[j * kstride + d] = k[(fe + e0 + j) * cI + d];
    }
    __syncthreads();
    if (lane < ne) {
      const float* kr = ks + lane * kstride;
      for (int h = warp; h < nI; h += kIdxWarps) {
        const float* qh = qs + h * cI;
        float dot = 0.0f;
        for (int d = 0; d < cI; ++d) dot = fmaf(qh[d], kr[d], dot);
        terms[h * kTileE + lane] = indexer_score_term(dot, wt[h], score_scale);
      }
    }
    __syncthreads();
    if (tid < ne) {
      float s = 0.0f;
      for (int h = 0; h < nI; ++h) s += terms[h * kTileE + tid];
      out[e0 + tid] = round_bf16_out ? round_bf16(s) : s;
    }
  }
}

// ---- indexer top-k ---------------------------------------------------------------------------------------------
constexpr int kTopkThreads = 256;

// Order-preserving key: a > b (as floats, neither NaN) iff key(a) > key(b); -0 and +0 share a key.
__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t u = __float_as_uint(v);
  if ((u & 0x7fffffffu) == 0u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kTopkThreads)
    indexer_topk_kernel(const float* __restrict__ scores, const int64_t* __restrict__ offsets,
                        const int64_t* __restrict__ first_entry, const int64_t* __restrict__ topk_offsets,
                        int32_t* __restrict__ ids) {
  using Scan = cub::BlockScan<int, kTopkThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int hist[256];
  __shared__ uint32_t sh_digit;
  __shared__ int64_t sh_need;
  const int64_t t = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const float* v = scores + offsets[t];
  const int64_t n = offsets[t + 1] - offsets[t];
  const int64_t base = topk_offsets[t], k = topk_offsets[t + 1] - base;
  const int32_t fe = static_cast<int32_t>(first_entry[t]);
  int32_t* out = ids + base;
  if (k >= n) {  // everything visible, ascending
    for (int64_t i = tid; i < n; i += kTopkThreads) out[i] = fe + static_cast<int32_t>(i);
    return;
  }
  if (k <= 0) return;
  // Radix select of the k-th largest key: after the passes, prefix is that key and need the number of entries
  // equal to it that belong to the top k.
  uint32_t prefix = 0u, mask = 0u;
  int64_t need = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kTopkThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t i = tid; i < n; i += kTopkThreads) {
      const uint32_t key = order_key(v[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
    }
    __syncthreads();
    if (tid == 0) {
      int64_t above = 0;
      int d = 255;
      for (; d > 0; --d) {
        if (above + hist[d] >= need) break;
        above += hist[d];
      }
      sh_digit = static_cast<uint32_t>(d);
      sh_need = need - above;
    }
    __syncthreads();
    prefix |= sh_digit << shift;
    mask |= 0xffu << shift;
    need = sh_need;
    __syncthreads();  // sh_digit / sh_need / hist reused by the next pass
  }
  const uint32_t kth = prefix;
  // Compaction in entry order: greater keys always, equal keys while fewer than `need` were taken before.
  int64_t taken = 0, eq_seen = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kTopkThreads) {
    const int64_t i = c0 + tid;
    const bool valid = i < n;
    const uint32_t key = valid ? order_key(v[i]) : 0u;
    const int is_eq = valid && key == kth ? 1 : 0;
    int eq_before = 0, eq_total = 0;
    Scan(scan_tmp).ExclusiveSum(is_eq, eq_before, eq_total);
    __syncthreads();
    const int take = (valid && key > kth) || (is_eq && eq_seen + eq_before < need) ? 1 : 0;
    int pos = 0, take_total = 0;
    Scan(scan_tmp).ExclusiveSum(take, pos, take_total);
    __syncthreads();
    if (take) out[taken + pos] = fe + static_cast<int32_t>(i);
    taken += take_total;
    eq_seen += eq_total;
  }
}

size_t smem_optin() {
  int dev = 0, bytes = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return static_cast<size_t>(bytes);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

void compress_pool_forward(const float* kv, const float* gate, const float* ape, const int64_t* entry_token,
                           const uint8_t* entry_has_prev, int64_t E, int64_t m, int64_t C, bool overlap, float* out,
                           void* stream) {
  DSV4_CHECK(E >= 0 && m > 0 && C > 0, "cuda::compress_pool_forward: E {} m {} C {}", E, m, C);
  DSV4_CHECK(overlap == (m == 4), "cuda::compress_pool_forward: overlap {} with ratio {} (overlap iff ratio 4)",
             overlap, m);
  if (E == 0) return;
  compress_pool_fwd_kernel<<<blocks_for(E * C, kPoolThreads), kPoolThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      kv, gate, ape, entry_token, entry_has_prev, E, m, C, overlap, out);
  CUDA_CHECK(cudaGetLastError());
}

void compress_pool_backward(const float* kv, const float* gate, const float* ape, const int64_t* entry_token,
                            const uint8_t* entry_has_prev, int64_t E, int64_t m, int64_t C, bool overlap,
                            const float* dout, float* dkv, float* dgate, float* dape, float* workspace, void* stream) {
  DSV4_CHECK(E >= 0 && m > 0 && C > 0, "cuda::compress_pool_backward: E {} m {} C {}", E, m, C);
  DSV4_CHECK(overlap == (m == 4), "cuda::compress_pool_backward: overlap {} with ratio {} (overlap iff ratio 4)",
             overlap, m);
  if (E == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t mW = m * compress_width(C, overlap);
  const int64_t chunks = (E + kCompressApeChunk - 1) / kCompressApeChunk;
  DSV4_CHECK(chunks <= 65535, "cuda::compress_pool_backward: {} entries exceed the dape chunk grid", E);
  float* partial = workspace + E * mW;
  compress_pool_bwd_kernel<<<blocks_for(E * C, kPoolThreads), kPoolThreads, 0, st>>>(
      kv, gate, ape, entry_token, entry_has_prev, E, m, C, overlap, dout, dkv, dgate, workspace);
  CUDA_CHECK(cudaGetLastError());
  compress_ape_partial_kernel<<<dim3(blocks_for(mW, 256), static_cast<unsigned>(chunks)), 256, 0, st>>>(workspace, E,
                                                                                                       mW, partial);
  CUDA_CHECK(cudaGetLastError());
  compress_ape_final_kernel<<<blocks_for(mW, 256), 256, 0, st>>>(partial, chunks, mW, dape);
  CUDA_CHECK(cudaGetLastError());
}

void indexer_scores(const float* q, const float* k, const float* w, const int64_t* first_entry,
                    const int64_t* score_offsets, int64_t T, int64_t E, int64_t nI, int64_t cI, int64_t max_visible,
                    float score_scale, float weight_scale, bool round_bf16, float* scores, void* stream) {
  DSV4_CHECK(T >= 0 && E >= 0 && nI > 0 && cI > 0 && max_visible >= 0 && max_visible <= E,
             "cuda::indexer_scores: T {} E {} nI {} cI {} max_visible {}", T, E, nI, cI, max_visible);
  if (T == 0 || max_visible == 0) return;
  const size_t bytes = sizeof(float) * static_cast<size_t>(nI * cI + kTileE * (cI + 1) + nI * kTileE + nI);
  const size_t budget = smem_optin();
  DSV4_CHECK(bytes <= budget, "cuda::indexer_scores: {} heads x {} dims need {} bytes of shared memory (> {})", nI, cI,
             bytes, budget);
  CUDA_CHECK(cudaFuncSetAttribute(indexer_scores_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
  const int64_t tiles = (max_visible + kTileE - 1) / kTileE;
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(std::min<int64_t>(tiles, kMaxTileGroups)));
  indexer_scores_kernel<<<grid, kIdxThreads, bytes, static_cast<cudaStream_t>(stream)>>>(
      q, k, w, first_entry, score_offsets, static_cast<int>(nI), static_cast<int>(cI), score_scale, weight_scale,
      round_bf16, scores);
  CUDA_CHECK(cudaGetLastError());
}

void indexer_topk(const float* scores, const int64_t* score_offsets, const int64_t* first_entry,
                  const int64_t* topk_offsets, int64_t T, int64_t E, int32_t* ids, void* stream) {
  DSV4_CHECK(T >= 0 && E >= 0 && E <= std::numeric_limits<int32_t>::max(),
             "cuda::indexer_topk: T {} E {} (entry ids are int32)", T, E);
  if (T == 0) return;
  indexer_topk_kernel<<<static_cast<unsigned>(T), kTopkThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      scores, score_offsets, first_entry, topk_offsets, ids);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::cuda
