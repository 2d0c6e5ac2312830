// BF16 tensor-core forward of the sparse attention with a sink (host API: kernels/attention_kernels.h,
// sparse_attn_forward_tc; exact FP32 twin: kernels/attn_sparse.cu; CPU reference: src/model/sparse_attention.h).
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
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention_kernels.h"

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
  {
    const float* q0 = q + (t * H + h0 + g) * kC + d0;
    const float* q1 = q0 + 8 * kC;
#pragma unroll
    for (int ks = 0; ks < kDimsPerWarp / 16; ++ks) {
      const int c = ks * 16 + 2 * tq;
      qa[ks][0] = pack_bf16(q0[c] * scale, q0[c + 1] * scale);
      qa[ks][1] = pack_bf16(q1[c] * scale, q1[c + 1] * scale);
      qa[ks][2] = pack_bf16(q0[c + 8] * scale, q0[c + 9] * scale);
      qa[ks][3] = pack_bf16(q1[c + 8] * scale, q1[c + 9] * scale);
    }
  }
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
#pragma unroll 4
    for (int r = 0; r < kKeys; ++r) {
      const int id = ids_s[r];
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (id >= 0) {
        const float* row = id < n_raw ? kv + static_cast<int64_t>(id) * kC : ckv + (static_cast<int64_t>(id) - n_raw) * kC;
        v = *reinterpret_cast<const float4*>(row + d0 + 4 * lane);
      }
      uint2 packed;
      packed.x = pack_bf16(v.x, v.y);
      packed.y = pack_bf16(v.z, v.w);
      *reinterpret_cast<uint2*>(&rows_s[warp][r][4 * lane]) = packed;
    }
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

}  // namespace dsv4::cuda
