// BF16 tensor-core forward and backward of the sparse attention with a sink (host API: kernels/attention_kernels.h,
// sparse_attn_forward_tc / sparse_attn_backward_tc; exact FP32 twin: kernels/attn_sparse.cu; CPU reference:
// src/model/sparse_attention.h).
//
// One 128-thread block (4 warps) per (query, group of 16 heads): the 16 heads are the M dimension of
// mma.sync.m16n8k16 (BF16 in, FP32 accumulate), so every K = V row gathered for the query is read once for all 16
// heads. Warp w owns the head dims [128 w, 128 w + 128) of C = 512:
//   * q (scaled by `scale`, rounded to BF16) stays in A fragments for the whole query (8 k-steps x 4 registers);
//   * per tile of 16 candidates, each warp converts its 128-dim slice of the 16 rows to BF16 in shared memory,
//     computes the partial scores S_w [16 heads x 16 keys] (8 k-steps x 2 n-tiles), the block adds the four
//     partials in warp order (fixed: deterministic), and every warp runs the same online softmax on the total
//     (running max starts at the sink logit, running sum at 1 for the sink, as the FP32 kernel);
//   * the probabilities, rounded to BF16, are the A fragment of P [16 x 16 keys] . V [16 keys x 128 dims]
//     (the two C tiles of the scores map onto one A fragment), accumulated in FP32 registers (16 n-tiles).
// o = acc / l, lse = m + log(l); an empty list gives o = 0, lse = sink. Differences from the FP32 twin: q, K = V and
// the probabilities are rounded to BF16 (tests/gpu/test_gpu_attention.cpp bounds the error against a reference on
// the same rounded operands). Requires C == 512 and H % 16 == 0 (sparse_attn_tc_supported); 16-byte aligned rows.
//
// Backward (sparse_attn_backward_tc; deterministic, no atomics), over chunks of candidate positions:
//  1. query-major, one 128-thread block per (query, 16-head group), the forward's layout: D = rowsum(BF16(dO) * O)
//     in FP32; q * scale and dO as A fragments; per tile of 16 candidates, the partial S and dP = dO . K per warp
//     (128 dims each) summed in warp order (S is the forward's bit for bit), P = exp(S - lse), dS = P (dP - D);
//     dQ += dS . K (BF16 dS, FP32 registers; times scale at the end); and the tile's dK rows
//     dK [16 keys, C] = dS^T . (q * scale) + P^T . dO (M = keys, K = heads, two mma per 8 dims; P and dS transposed
//     through shared memory, q and dO kept transposed [dim][head] in shared memory as the B operands) written to
//     partial[group, position - p0, :]. Tiles are aligned to the list's start, so a query split by a chunk boundary
//     gets the same tiles in both chunks; the chunk holding its first position writes dq and D.
//  2. key-major, one block per row of [kv; ckv]: dk_r += the partial rows of the chunk's positions that list r
//     (build_key_major_positions: ascending), head groups ascending. Chunks run in order, so every row is summed in
//     the same order whatever the chunk size.
//  3. dsink from D and lse, t ascending (the FP32 backward's kernel).
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/attention_kernels.h"
#include "kernels/attn_sparse_common.cuh"

namespace dsv4::cuda {
namespace {

constexpr int kC = 512;            // head dim
constexpr int kHeads = 16;         // heads per block (the MMA's M)
constexpr int kWarpsTc = 4;        // 4 x 128 dims
constexpr int kDimsPerWarp = kC / kWarpsTc;
constexpr int kKeys = 16;          // candidates per tile (two n-tiles of 8 for the scores, one k-step for P.V)
constexpr int kPad = 8;            // BF16 padding per shared row (bank spread)

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// mma.sync A fragments (m16 x k16 per k-step, BF16) of a warp's 128 dims of 16 head rows times `scale`:
// rows g / g + 8 = heads (row0 is head g's first dim of the slice, head g + 8 is 8 rows of kC further), k = dims
// 16 ks + 2 tq (+1) (+8).
__device__ __forceinline__ void load_a_fragments(uint32_t (*a)[4], const float* row0, float scale, int tq) {
  const float* r1 = row0 + 8 * kC;
#pragma unroll
  for (int ks = 0; ks < kDimsPerWarp / 16; ++ks) {
    const int c = ks * 16 + 2 * tq;
    a[ks][0] = pack_bf16(row0[c] * scale, row0[c + 1] * scale);
    a[ks][1] = pack_bf16(r1[c] * scale, r1[c + 1] * scale);
    a[ks][2] = pack_bf16(row0[c + 8] * scale, row0[c + 9] * scale);
    a[ks][3] = pack_bf16(r1[c + 8] * scale, r1[c + 9] * scale);
  }
}

// A warp's slice of a tile's K = V rows as BF16: rows[r][4 lane .. 4 lane + 3] = dims d0 + 4 lane .. of candidate
// ids[r] (raw row id < n_raw, else compressed row id - n_raw; zeros for the padding id -1).
__device__ __forceinline__ void load_rows_bf16(__nv_bfloat16 (*rows)[kDimsPerWarp + kPad], const int* ids,
                                               const float* __restrict__ kv, const float* __restrict__ ckv,
                                               int64_t n_raw, int d0, int lane) {
#pragma unroll 4
  for (int r = 0; r < kKeys; ++r) {
    const int id = ids[r];
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (id >= 0) {
      const float* row = id < n_raw ? kv + static_cast<int64_t>(id) * kC : ckv + (static_cast<int64_t>(id) - n_raw) * kC;
      v = *reinterpret_cast<const float4*>(row + d0 + 4 * lane);
    }
    uint2 packed;
    packed.x = pack_bf16(v.x, v.y);
    packed.y = pack_bf16(v.z, v.w);
    *reinterpret_cast<uint2*>(&rows[r][4 * lane]) = packed;
  }
}

__device__ __forceinline__ uint32_t pack_raw(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&lo)) |
         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
}

// d += a (16x16, row) . b (16x8, col), BF16 in, FP32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__global__ void __launch_bounds__(kWarpsTc * 32)
    sparse_fwd_tc_kernel(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ ckv,
                         const float* __restrict__ sink, const int32_t* __restrict__ cand_offsets,
                         const int32_t* __restrict__ cand_ids, int64_t n_raw, int H, float scale,
                         float* __restrict__ o, float* __restrict__ lse) {
  __shared__ __align__(16) __nv_bfloat16 rows_s[kWarpsTc][kKeys][kDimsPerWarp + kPad];
  __shared__ float part_s[kWarpsTc][kHeads][kKeys + 1];
  __shared__ int ids_s[kKeys];
  const int64_t t = blockIdx.x;
  const int h0 = static_cast<int>(blockIdx.y) * kHeads;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int g = lane >> 2, tq = lane & 3;  // MMA group (row / column) and thread-in-group
  const int d0 = warp * kDimsPerWarp;

  // q fragments: rows g / g + 8 = heads h0 + g / h0 + g + 8, k = dims d0 + 16 ks + 2 tq (+1) (+8).
  uint32_t qa[kDimsPerWarp / 16][4];
  load_a_fragments(qa, q + (t * H + h0 + g) * kC + d0, scale, tq);
  float m[2] = {sink[h0 + g], sink[h0 + g + 8]};  // running max per row (starts at the sink logit)
  float l[2] = {1.0f, 1.0f};                      // running sum (the sink's exp(0))
  float acc[kDimsPerWarp / 8][4];
#pragma unroll
  for (int n = 0; n < kDimsPerWarp / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  const int beg = cand_offsets[t], end = cand_offsets[t + 1];
  for (int j0 = beg; j0 < end; j0 += kKeys) {
    const int cnt = min(kKeys, end - j0);
    __syncthreads();  // the previous tile's shared memory is no longer read
    if (threadIdx.x < kKeys) ids_s[threadIdx.x] = static_cast<int>(threadIdx.x) < cnt ? cand_ids[j0 + threadIdx.x] : -1;
    __syncthreads();
    // This warp's 128-dim slice of the tile's rows, as BF16 (zeros for padding rows).
    load_rows_bf16(rows_s[warp], ids_s, kv, ckv, n_raw, d0, lane);
    __syncwarp();
    // Partial scores over this warp's dims: n-tile nt = keys 8 nt .. 8 nt + 7.
    float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int ks = 0; ks < kDimsPerWarp / 16; ++ks)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const __nv_bfloat16* kr = &rows_s[warp][nt * 8 + g][ks * 16 + 2 * tq];
        mma_bf16(sc[nt], qa[ks], *reinterpret_cast<const uint32_t*>(kr), *reinterpret_cast<const uint32_t*>(kr + 8));
      }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      part_s[warp][g][nt * 8 + 2 * tq] = sc[nt][0];
      part_s[warp][g][nt * 8 + 2 * tq + 1] = sc[nt][1];
      part_s[warp][g + 8][nt * 8 + 2 * tq] = sc[nt][2];
      part_s[warp][g + 8][nt * 8 + 2 * tq + 1] = sc[nt][3];
    }
    __syncthreads();
    // Total scores (warp order), masked beyond cnt; online softmax per row (rows g: i = 0, g + 8: i = 1).
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >> 1) * 8, key = nt * 8 + 2 * tq + (e & 1);
        float v = part_s[0][row][key];
        v += part_s[1][row][key];
        v += part_s[2][row][key];
        v += part_s[3][row][key];
        s[nt][e] = key < cnt ? v : -INFINITY;
      }
    float corr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = fmaxf(fmaxf(s[0][2 * i], s[0][2 * i + 1]), fmaxf(s[1][2 * i], s[1][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(m[i], mx);
      corr[i] = expf(m[i] - mnew);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = expf(s[nt][2 * i + e] - mnew);
          s[nt][2 * i + e] = p;
          sum += p;
        }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      l[i] = l[i] * corr[i] + sum;
      m[i] = mnew;
    }
    // P as the A fragment (rows = heads, k = keys): the two score n-tiles side by side.
    const uint32_t pa[4] = {pack_bf16(s[0][0], s[0][1]), pack_bf16(s[0][2], s[0][3]), pack_bf16(s[1][0], s[1][1]),
                            pack_bf16(s[1][2], s[1][3])};
    // acc = acc * corr + P . V (B: k = key 2 tq (+1) (+8, +9), n = dim 8 n + g).
#pragma unroll
    for (int n = 0; n < kDimsPerWarp / 8; ++n) {
      acc[n][0] *= corr[0];
      acc[n][1] *= corr[0];
      acc[n][2] *= corr[1];
      acc[n][3] *= corr[1];
      const int d = n * 8 + g;
      const uint32_t b0 = pack_raw(rows_s[warp][2 * tq][d], rows_s[warp][2 * tq + 1][d]);
      const uint32_t b1 = pack_raw(rows_s[warp][2 * tq + 8][d], rows_s[warp][2 * tq + 9][d]);
      mma_bf16(acc[n], pa, b0, b1);
    }
  }
  // o = acc / l (C layout: rows g / g + 8, dims 8 n + 2 tq (+1)); lse = m + log(l).
  float* o0 = o + (t * H + h0 + g) * kC + d0;
  float* o1 = o0 + 8 * kC;
  const float r0 = 1.0f / l[0], r1 = 1.0f / l[1];
#pragma unroll
  for (int n = 0; n < kDimsPerWarp / 8; ++n) {
    const int d = n * 8 + 2 * tq;
    *reinterpret_cast<float2*>(o0 + d) = make_float2(acc[n][0] * r0, acc[n][1] * r0);
    *reinterpret_cast<float2*>(o1 + d) = make_float2(acc[n][2] * r1, acc[n][3] * r1);
  }
  if (warp == 0 && tq == 0) {
    lse[t * H + h0 + g] = m[0] + logf(l[0]);
    lse[t * H + h0 + g + 8] = m[1] + logf(l[1]);
  }
}


// ---- backward ------------------------------------------------------------------------------------------------------

constexpr int kTPad = 8;  // BF16 padding of the [.][16 heads] rows: conflict-free 32-bit fragment loads

// Shared memory of the query-major backward kernel (dynamic: about 77 KB).
struct BwdSmem {
  __nv_bfloat16 qT[kC][kHeads + kTPad];   // BF16(q * scale) [dim][head]: B operand of dK (k = heads, n = dims)
  __nv_bfloat16 doT[kC][kHeads + kTPad];  // BF16(dO) [dim][head]
  __nv_bfloat16 rows[kWarpsTc][kKeys][kDimsPerWarp + kPad];  // the tile's K = V rows, warp w: dims of warp w
  float part_s[kWarpsTc][kHeads][kKeys + 1];                  // per-warp partial scores S
  float part_dp[kWarpsTc][kHeads][kKeys + 1];                 // per-warp partial dP = dO . K
  __nv_bfloat16 pT[kKeys][kHeads + kTPad];   // BF16(P) [key][head]: A operand of dK (m = keys, k = heads)
  __nv_bfloat16 dsT[kKeys][kHeads + kTPad];  // BF16(dS) [key][head]
  float D[kHeads], lse[kHeads];
  int ids[kKeys];
};

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ uint32_t load_u32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Query-major backward of one chunk [p0, p1) of candidate positions, one block per (query, 16-head group).
// The chunk that holds a query's first position (the last chunk also: queries whose list starts at nnz, i.e. empty
// trailing lists) owns the query: it walks the whole list and writes dq [16, C] and D [16] (Dws [T, H]). Every block
// whose list meets [p0, p1) writes, for each of those positions pos, the candidate's dK row over its 16 heads to
// partial[group, pos - p0, :] (partial [H / 16, chunk, C]).
__global__ void __launch_bounds__(kWarpsTc * 32)
    sparse_bwd_tc_query_kernel(const float* __restrict__ q, const float* __restrict__ kv, const float* __restrict__ ckv,
                               const float* __restrict__ o, const float* __restrict__ lse,
                               const float* __restrict__ dout, const int32_t* __restrict__ cand_offsets,
                               const int32_t* __restrict__ cand_ids, int64_t n_raw, int H, float scale, int p0, int p1,
                               bool last_chunk, int64_t chunk, float* __restrict__ dq, float* __restrict__ Dws,
                               float* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BwdSmem& sm = *reinterpret_cast<BwdSmem*>(smem_raw);
  const int64_t t = blockIdx.x;
  const int group = static_cast<int>(blockIdx.y);
  const int h0 = group * kHeads;
  const int beg = cand_offsets[t], end = cand_offsets[t + 1];
  const bool owner = beg >= p0 && (beg < p1 || last_chunk);
  if (!owner && (end <= p0 || beg >= p1)) return;
  // Tiles start at beg + 16 k; a non-owner starts at the tile holding p0 and stops at p1.
  const int first = owner ? beg : beg + (p0 - beg) / kKeys * kKeys;
  const int stop = owner ? end : min(end, p1);

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;  // MMA group (row / column) and thread-in-group
  const int d0 = warp * kDimsPerWarp;
  const int64_t base = (t * H + h0) * kC;  // q / dout / o / dq of head h0 of query t

  for (int i = tid; i < kHeads * kC; i += kWarpsTc * 32) {
    const int h = i / kC, d = i % kC;
    sm.qT[d][h] = __float2bfloat16_rn(q[base + i] * scale);
    sm.doT[d][h] = __float2bfloat16_rn(dout[base + i]);
  }
  // D = rowsum(BF16(dO) * O): the dO the kernel differentiates with (warp w: heads 4 w .. 4 w + 3).
  for (int h = warp * (kHeads / kWarpsTc); h < (warp + 1) * (kHeads / kWarpsTc); ++h) {
    const float* orow = o + base + static_cast<int64_t>(h) * kC;
    const float* drow = dout + base + static_cast<int64_t>(h) * kC;
    float v = 0.0f;
    for (int d = lane; d < kC; d += 32) v = fmaf(round_bf16(drow[d]), orow[d], v);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) {
      sm.D[h] = v;
      sm.lse[h] = lse[t * H + h0 + h];
      if (owner) Dws[t * H + h0 + h] = v;
    }
  }
  // q * scale and dO as A fragments (rows g / g + 8 = heads, k = dims d0 + 16 ks + 2 tq (+1) (+8)), as the forward.
  uint32_t qa[kDimsPerWarp / 16][4], da[kDimsPerWarp / 16][4];
  load_a_fragments(qa, q + base + static_cast<int64_t>(g) * kC + d0, scale, tq);
  load_a_fragments(da, dout + base + static_cast<int64_t>(g) * kC + d0, 1.0f, tq);
  float acc[kDimsPerWarp / 8][4];  // dQ / scale: rows g / g + 8 = heads, dims d0 + 8 n + 2 tq (+1)
#pragma unroll
  for (int n = 0; n < kDimsPerWarp / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int j0 = first; j0 < stop; j0 += kKeys) {
    const int cnt = min(kKeys, end - j0);
    __syncthreads();  // the previous tile's shared memory is no longer read (and qT / doT / D / lse are written)
    if (tid < kKeys) sm.ids[tid] = tid < cnt ? cand_ids[j0 + tid] : -1;
    __syncthreads();
    load_rows_bf16(sm.rows[warp], sm.ids, kv, ckv, n_raw, d0, lane);
    __syncwarp();
    // Partial S and dP over this warp's dims (n-tile nt = keys 8 nt .. 8 nt + 7): the forward's S bit for bit.
    float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    float dp[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int ks = 0; ks < kDimsPerWarp / 16; ++ks)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const __nv_bfloat16* kr = &sm.rows[warp][nt * 8 + g][ks * 16 + 2 * tq];
        const uint32_t b0 = load_u32(kr), b1 = load_u32(kr + 8);
        mma_bf16(sc[nt], qa[ks], b0, b1);
        mma_bf16(dp[nt], da[ks], b0, b1);
      }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >> 1) * 8, key = nt * 8 + 2 * tq + (e & 1);
        sm.part_s[warp][row][key] = sc[nt][e];
        sm.part_dp[warp][row][key] = dp[nt][e];
      }
    __syncthreads();
    // Totals (warp order, as the forward); P = exp(S - lse), dS = P (dP - D); zero beyond cnt.
    float p[2][4], ds[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >> 1) * 8, key = nt * 8 + 2 * tq + (e & 1);
        float s = sm.part_s[0][row][key];
        s += sm.part_s[1][row][key];
        s += sm.part_s[2][row][key];
        s += sm.part_s[3][row][key];
        float dpv = sm.part_dp[0][row][key];
        dpv += sm.part_dp[1][row][key];
        dpv += sm.part_dp[2][row][key];
        dpv += sm.part_dp[3][row][key];
        const float pv = key < cnt ? expf(s - sm.lse[row]) : 0.0f;
        p[nt][e] = pv;
        ds[nt][e] = pv * (dpv - sm.D[row]);
      }
    // dQ += dS . K (A: rows = heads, k = keys, the two n-tiles side by side; B: k = keys, n = dims).
    const uint32_t dsa[4] = {pack_bf16(ds[0][0], ds[0][1]), pack_bf16(ds[0][2], ds[0][3]),
                             pack_bf16(ds[1][0], ds[1][1]), pack_bf16(ds[1][2], ds[1][3])};
#pragma unroll
    for (int n = 0; n < kDimsPerWarp / 8; ++n) {
      const int d = n * 8 + g;
      const uint32_t b0 = pack_raw(sm.rows[warp][2 * tq][d], sm.rows[warp][2 * tq + 1][d]);
      const uint32_t b1 = pack_raw(sm.rows[warp][2 * tq + 8][d], sm.rows[warp][2 * tq + 9][d]);
      mma_bf16(acc[n], dsa, b0, b1);
    }
    if (j0 + cnt <= p0 || j0 >= p1) continue;  // (block-uniform) no position of this tile is in the chunk
    // dK rows of the tile: dK [16 keys, C] = dS^T . (q * scale) + P^T . dO (M = keys, K = heads, N = dims).
    if (warp == 0) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = g + (e >> 1) * 8, key = nt * 8 + 2 * tq + (e & 1);
          sm.pT[key][row] = __float2bfloat16_rn(p[nt][e]);
          sm.dsT[key][row] = __float2bfloat16_rn(ds[nt][e]);
        }
    }
    __syncthreads();
    // A fragments: rows g / g + 8 = keys, k = heads 2 tq (+1) (+8).
    const uint32_t dsk[4] = {load_u32(&sm.dsT[g][2 * tq]), load_u32(&sm.dsT[g + 8][2 * tq]),
                             load_u32(&sm.dsT[g][2 * tq + 8]), load_u32(&sm.dsT[g + 8][2 * tq + 8])};
    const uint32_t pk[4] = {load_u32(&sm.pT[g][2 * tq]), load_u32(&sm.pT[g + 8][2 * tq]),
                            load_u32(&sm.pT[g][2 * tq + 8]), load_u32(&sm.pT[g + 8][2 * tq + 8])};
    // Partial rows of keys g and g + 8 (positions j0 + key), when they are candidates inside the chunk.
    const int pos0 = j0 + g, pos1 = j0 + g + 8;
    const bool w0 = g < cnt && pos0 >= p0 && pos0 < p1, w1 = g + 8 < cnt && pos1 >= p0 && pos1 < p1;
    float* out0 = partial + (static_cast<int64_t>(group) * chunk + (w0 ? pos0 - p0 : 0)) * kC + d0 + 2 * tq;
    float* out1 = partial + (static_cast<int64_t>(group) * chunk + (w1 ? pos1 - p0 : 0)) * kC + d0 + 2 * tq;
#pragma unroll 4
    for (int n = 0; n < kDimsPerWarp / 8; ++n) {
      const int d = d0 + n * 8 + g;
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      mma_bf16(c, dsk, load_u32(&sm.qT[d][2 * tq]), load_u32(&sm.qT[d][2 * tq + 8]));
      mma_bf16(c, pk, load_u32(&sm.doT[d][2 * tq]), load_u32(&sm.doT[d][2 * tq + 8]));
      if (w0) *reinterpret_cast<float2*>(out0 + n * 8) = make_float2(c[0], c[1]);
      if (w1) *reinterpret_cast<float2*>(out1 + n * 8) = make_float2(c[2], c[3]);
    }
  }
  if (!owner) return;
  float* dq0 = dq + base + static_cast<int64_t>(g) * kC + d0;
  float* dq1 = dq0 + 8 * kC;
#pragma unroll
  for (int n = 0; n < kDimsPerWarp / 8; ++n) {
    const int d = n * 8 + 2 * tq;
    *reinterpret_cast<float2*>(dq0 + d) = make_float2(acc[n][0] * scale, acc[n][1] * scale);
    *reinterpret_cast<float2*>(dq1 + d) = make_float2(acc[n][2] * scale, acc[n][3] * scale);
  }
}

constexpr int kReduceThreads = kC / 4;  // one float4 of the row per thread

// First index in [lo, hi) of the ascending key_positions with a value >= v.
__device__ __forceinline__ int lower_bound_pos(const int32_t* __restrict__ key_positions, int lo, int hi, int v) {
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (key_positions[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Key-major reduction of one chunk, one block per row r of [kv; ckv]: dk_r += the partial rows of the positions
// in [p0, p1) that list r, positions ascending, head groups ascending within a position. Rows without such a position
// are untouched.
__global__ void __launch_bounds__(kReduceThreads)
    sparse_bwd_tc_reduce_kernel(const float* __restrict__ partial, const int32_t* __restrict__ key_offsets,
                                const int32_t* __restrict__ key_positions, int64_t n_raw, int groups, int64_t chunk,
                                int p0, int p1, float* __restrict__ dkv, float* __restrict__ dckv) {
  const int64_t r = blockIdx.x;
  const int lo = lower_bound_pos(key_positions, key_offsets[r], key_offsets[r + 1], p0);
  const int hi = lower_bound_pos(key_positions, lo, key_offsets[r + 1], p1);
  if (lo == hi) return;
  float* drow = (r < n_raw ? dkv + r * kC : dckv + (r - n_raw) * kC) + 4 * threadIdx.x;
  float4 a = *reinterpret_cast<const float4*>(drow);
  for (int e = lo; e < hi; ++e) {
    const float* src = partial + static_cast<int64_t>(key_positions[e] - p0) * kC + 4 * threadIdx.x;
    for (int gi = 0; gi < groups; ++gi) {
      const float4 v = *reinterpret_cast<const float4*>(src + gi * chunk * kC);
      a.x += v.x;
      a.y += v.y;
      a.z += v.z;
      a.w += v.w;
    }
  }
  *reinterpret_cast<float4*>(drow) = a;
}
}  // namespace

bool sparse_attn_tc_supported(int64_t H, int64_t C) { return C == kC && H >= kHeads && H % kHeads == 0; }

void sparse_attn_forward_tc(const float* q, const float* kv, const float* ckv, const float* sink,
                            const int32_t* cand_offsets, const int32_t* cand_ids, int64_t T, int64_t n_raw,
                            int64_t n_comp, int64_t H, int64_t C, float scale, float* o, float* lse, void* stream) {
  DSV4_CHECK(sparse_attn_tc_supported(H, C),
             "cuda::sparse_attn_forward_tc: needs head_dim 512 and a multiple of 16 heads, got H={} C={}", H, C);
  DSV4_CHECK(T >= 0 && n_raw >= 0 && n_comp >= 0 && (n_comp == 0 || ckv != nullptr),
             "cuda::sparse_attn_forward_tc: bad sizes T={} n_raw={} n_comp={}", T, n_raw, n_comp);
  DSV4_CHECK(T < (int64_t{1} << 31) && H / kHeads <= 65535, "cuda::sparse_attn_forward_tc: T={} H={} exceed the grid",
             T, H);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  DSV4_CHECK(aligned(kv) && (n_comp == 0 || aligned(ckv)) && aligned(o),
             "cuda::sparse_attn_forward_tc: kv, ckv and o must be 16-byte aligned");
  if (T == 0) return;
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(H / kHeads));
  sparse_fwd_tc_kernel<<<grid, kWarpsTc * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      q, kv, ckv, sink, cand_offsets, cand_ids, n_raw, static_cast<int>(H), scale, o, lse);
  CUDA_CHECK_LAUNCH();
}


void sparse_attn_backward_tc(const float* q, const float* kv, const float* ckv, const float* sink, const float* o,
                             const float* lse, const float* dout, const int32_t* cand_offsets, const int32_t* cand_ids,
                             const int32_t* key_offsets, const int32_t* key_positions, int64_t T, int64_t n_raw,
                             int64_t n_comp, int64_t n_candidates, int64_t H, int64_t C, float scale, float* dq,
                             float* dkv, float* dckv, float* dsink, float* workspace, void* stream,
                             int64_t chunk) {
  DSV4_CHECK(sparse_attn_tc_supported(H, C),
             "cuda::sparse_attn_backward_tc: needs head_dim 512 and a multiple of 16 heads, got H={} C={}", H, C);
  DSV4_CHECK(T >= 0 && n_raw >= 0 && n_comp >= 0 && n_candidates >= 0 && (n_comp == 0 || (ckv && dckv)),
             "cuda::sparse_attn_backward_tc: bad sizes T={} n_raw={} n_comp={} n_candidates={}", T, n_raw, n_comp,
             n_candidates);
  DSV4_CHECK(T < (int64_t{1} << 31) && n_candidates < (int64_t{1} << 31) && n_raw + n_comp < (int64_t{1} << 31) &&
                 H / kHeads <= 65535,
             "cuda::sparse_attn_backward_tc: T={} H={} n_candidates={} exceed the grid / int32 positions", T, H,
             n_candidates);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  DSV4_CHECK(aligned(kv) && aligned(dkv) && (n_comp == 0 || (aligned(ckv) && aligned(dckv))) && aligned(dq) &&
                 aligned(workspace),
             "cuda::sparse_attn_backward_tc: kv, ckv, dq, dkv, dckv and the workspace must be 16-byte aligned");
  const auto st = static_cast<cudaStream_t>(stream);
  const int groups = static_cast<int>(H / kHeads);
  if (chunk <= 0) chunk = sparse_attn_backward_tc_chunk(H, C, n_candidates);
  float* Dws = workspace;
  float* partial = workspace + (T * H + 3) / 4 * 4;
  const int64_t rows = n_raw + n_comp;
  if (T > 0) {
    const size_t bytes = sizeof(BwdSmem);
    CUDA_CHECK(cudaFuncSetAttribute(sparse_bwd_tc_query_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)));
    const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(groups));
    for (int64_t p0 = 0;; p0 += chunk) {  // at least one chunk: it writes dq and D of every query when nnz = 0
      const int64_t p1 = std::min(p0 + chunk, n_candidates);
      const bool last = p1 >= n_candidates;
      sparse_bwd_tc_query_kernel<<<grid, kWarpsTc * 32, bytes, st>>>(
          q, kv, ckv, o, lse, dout, cand_offsets, cand_ids, n_raw, static_cast<int>(H), scale, static_cast<int>(p0),
          static_cast<int>(p1), last, chunk, dq, Dws, partial);
      CUDA_CHECK_LAUNCH();
      if (p1 > p0 && rows > 0) {
        sparse_bwd_tc_reduce_kernel<<<static_cast<unsigned>(rows), kReduceThreads, 0, st>>>(
            partial, key_offsets, key_positions, n_raw, groups, chunk, static_cast<int>(p0), static_cast<int>(p1),
            dkv, dckv);
        CUDA_CHECK_LAUNCH();
      }
      if (last) break;
    }
  }
  sparse_bwd_dsink_kernel<<<static_cast<unsigned>((H + 127) / 128), 128, 0, st>>>(sink, lse, Dws, T,
                                                                                  static_cast<int>(H), dsink);
  CUDA_CHECK_LAUNCH();
}

}  // namespace dsv4::cuda
