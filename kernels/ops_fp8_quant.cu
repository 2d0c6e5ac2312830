// CUDA twins of the block-scaled FP8 quantisers and the dequantiser (runtime/fp8.h; CPU reference
// src/runtime/cpu_fp8.cpp). Bit-exact with the CPU: amax is a max (order-free), the scale rule is the shared
// fp8_block_scale (IEEE division: this file must not be built with --use_fast_math), codes are dtype.h's
// f32_to_e4m3 of an IEEE-rounded division (__fdiv_rn).
//
//   fp8_quantize_rows     vector path: one 16-byte load per lane, 4 groups per warp (see the kernel); scalar path
//                         (strided / misaligned / K % 4 or 8 != 0): one warp per (row, 128-column group), lane reads
//                         columns lane + 32 j.
//   fp8_quantize_rows_t   vector path: 128 (m) x 64 (k) tiles, 16-byte loads along k, 16-byte code stores along m
//                         (see the kernel); scalar path: one 256-thread block per 128 (m) x 32 (k) tile of x, staged
//                         through shared memory so reads of x (along k) and writes of q = (x^T) codes (along m) coalesce.
//   fp8_quantize_blocks   vector path: the block's 16-byte vectors held in registers, x read once; scalar path: one
//                         256-thread block per 128x128 block (tree max in shared memory), x read twice.
//   fp8_dequantize        element-wise.
// Inputs F32 or BF16 with any 2-D strides; outputs contiguous.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include "kernels/ops_common.cuh"
#include "runtime/fp8.h"

namespace dsv4::cuda {
namespace {

using detail::load_f32;
using detail::warp_max;

struct ScaleOut {
  float* f32 = nullptr;   // F32 scales, or
  uint8_t* e8m0 = nullptr;  // E8M0 codes
  ScaleFormat fmt = ScaleFormat::E8M0;
};

ScaleOut scale_out(Tensor& scale) {
  ScaleOut s;
  if (scale.dtype() == DType::F32) {
    s.f32 = scale.data<float>();
    s.fmt = ScaleFormat::F32;
  } else {
    s.e8m0 = scale.data_u8();
  }
  return s;
}

__device__ __forceinline__ float make_scale(float amax, const ScaleOut& so, int64_t idx) {
  uint8_t code = 0;
  const float s = fp8_block_scale(amax, so.fmt, &code);
  if (so.fmt == ScaleFormat::F32)
    so.f32[idx] = s;
  else
    so.e8m0[idx] = code;
  return s;
}


// VE (4 or 8) consecutive codes e4m3(v / s) stored as one 4- or 8-byte word (IEEE division, as the scalar paths).
template <int VE>
__device__ __forceinline__ void store_codes(uint8_t* dst, const float (&v)[VE], float s) {
  uint32_t packed[VE / 4];
#pragma unroll
  for (int w = 0; w < VE / 4; ++w) {
    packed[w] = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e)
      packed[w] |= static_cast<uint32_t>(f32_to_e4m3(__fdiv_rn(v[4 * w + e], s))) << (8 * e);
  }
  if constexpr (VE == 4)
    *reinterpret_cast<uint32_t*>(dst) = packed[0];
  else
    *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
}

// ---- rows (1x128) ----------------------------------------------------------------------------------------
template <typename T>
__global__ void quantize_rows_kernel(const T* x, int64_t s0, int64_t s1, int64_t M, int64_t K, uint8_t* q,
                                     ScaleOut so) {
  const int64_t KB = (K + kFp8Group - 1) / kFp8Group;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (group >= M * KB) return;  // whole warps exit together
  const int64_t m = group / KB, kb = group - m * KB;
  float v[4];
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = kb * kFp8Group + lane + 32 * j;
    v[j] = k < K ? load_f32(x, m * s0 + k * s1) : 0.0f;
    amax = fmaxf(amax, fabsf(v[j]));
  }
  amax = warp_max(amax);
  const float s = make_scale(amax, so, m * KB + kb);  // every lane writes the same value
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = kb * kFp8Group + lane + 32 * j;
    if (k < K) q[m * K + k] = f32_to_e4m3(__fdiv_rn(v[j], s));
  }
}

// Vector path of the 1x128 quantiser (unit column stride, K and the row stride multiples of VE, base 16-byte
// aligned): each lane loads VE = 16 / sizeof(T) consecutive columns as one 16-byte load (4 F32 or 8 BF16), so a
// 128-column group is LG = 128 / VE lanes (32 or 16) and its amax a shuffle over those lanes; each warp handles
// kRowsGroups groups with all its loads issued before the first use, and stores its codes as one 4- or 8-byte word
// per lane. Minimal bytes: M K sizeof(T) read + M K codes + M K / 128 scales written.
constexpr int kRowsGroups = 4;  // 128-column groups per warp

template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  using Load = float4;
  __device__ static void unpack(const Load& l, float* v) {
    v[0] = l.x;
    v[1] = l.y;
    v[2] = l.z;
    v[3] = l.w;
  }
};
template <>
struct Vec16<uint16_t> {
  static constexpr int kElems = 8;
  using Load = uint4;
  __device__ static void unpack(const Load& l, float* v) {
    const uint32_t w[4] = {l.x, l.y, l.z, l.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(detail::kThreads) quantize_rows_vec_kernel(const T* __restrict__ x, int64_t s0,
                                                                             int64_t M, int64_t K,
                                                                             uint8_t* __restrict__ q, ScaleOut so) {
  using V = Vec16<T>;
  constexpr int VE = V::kElems, LG = kFp8Group / VE, GPL = 32 / LG;  // lanes per group, groups per warp load
  constexpr int U = kRowsGroups / GPL;                                  // loads per lane
  const int64_t KB = (K + kFp8Group - 1) / kFp8Group, G = M * KB;
  const int lane = static_cast<int>(threadIdx.x) & 31, sub = lane % LG;
  const int64_t g0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5)) * kRowsGroups;
  if (g0 >= G) return;  // whole warps exit together
  typename V::Load raw[U];
  int64_t off[U];  // element offset of this lane's vector in x (row-major m * s0 + k) and in q (m * K + k); -1: none
  int64_t qoff[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t g = g0 + u * GPL + lane / LG;
    const int64_t m = g / KB, kb = g - m * KB, k = kb * kFp8Group + sub * VE;
    const bool ok = g < G && k < K;
    off[u] = ok ? m * s0 + k : -1;
    qoff[u] = m * K + k;
    if (ok) raw[u] = *reinterpret_cast<const typename V::Load*>(x + off[u]);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float v[VE];
    if (off[u] >= 0) {
      V::unpack(raw[u], v);
    } else {
#pragma unroll
      for (int e = 0; e < VE; ++e) v[e] = 0.0f;
    }
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < VE; ++e) amax = fmaxf(amax, fabsf(v[e]));
#pragma unroll
    for (int o = LG / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    const int64_t g = g0 + u * GPL + lane / LG;
    if (g >= G) continue;
    uint8_t code = 0;
    const float s = fp8_block_scale(amax, so.fmt, &code);
    if (sub == 0) {
      if (so.fmt == ScaleFormat::F32)
        so.f32[g] = s;
      else
        so.e8m0[g] = code;
    }
    if (off[u] < 0) continue;
    store_codes<VE>(q + qoff[u], v, s);
  }
}

// ---- rows of x^T ---------------------------------------------------------------------------------------------
constexpr int kTileK = 32;  // columns of x (rows of x^T) per block of the transposing quantiser

template <typename T>
__global__ void quantize_rows_t_kernel(const T* x, int64_t s0, int64_t s1, int64_t M, int64_t K, uint8_t* q,
                                       ScaleOut so) {
  __shared__ float tile[kFp8Group][kTileK + 1];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kFp8Group;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileK;
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < kFp8Group * kTileK; i += blockDim.x) {
    const int r = i / kTileK, c = i % kTileK;  // c fastest: reads along k
    const int64_t m = m0 + r, k = k0 + c;
    tile[r][c] = (m < M && k < K) ? load_f32(x, m * s0 + k * s1) : 0.0f;
  }
  __syncthreads();
  const int warp = tid >> 5, lane = tid & 31, warps = static_cast<int>(blockDim.x) >> 5;
  const int64_t MB = (M + kFp8Group - 1) / kFp8Group;
  for (int c = warp; c < kTileK; c += warps) {
    const int64_t k = k0 + c;
    if (k >= K) break;
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(tile[lane * 4 + j][c]));
    amax = warp_max(amax);
    const float s = make_scale(amax, so, k * MB + blockIdx.x);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + lane * 4 + j;
      if (m < M) q[k * M + m] = f32_to_e4m3(__fdiv_rn(tile[lane * 4 + j][c], s));
    }
  }
}

// ---- blocks (128x128) ------------------------------------------------------------------------------------------
template <typename T>
__global__ void quantize_blocks_kernel(const T* x, int64_t s0, int64_t s1, int64_t N, int64_t K, uint8_t* q,
                                       ScaleOut so) {
  __shared__ float red[detail::kThreads];
  const int64_t KB = (K + kFp8Group - 1) / kFp8Group;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kFp8Group, c0 = static_cast<int64_t>(blockIdx.x) * kFp8Group;
  const int64_t rows = min(kFp8Group, N - r0), cols = min(kFp8Group, K - c0);
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int64_t r = r0 + i / cols, c = c0 + i % cols;
    amax = fmaxf(amax, fabsf(load_f32(x, r * s0 + c * s1)));
  }
  amax = detail::block_reduce(amax, red, [](float a, float b) { return fmaxf(a, b); });
  __shared__ float s_shared;
  if (threadIdx.x == 0) s_shared = make_scale(amax, so, static_cast<int64_t>(blockIdx.y) * KB + blockIdx.x);
  __syncthreads();
  const float s = s_shared;
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int64_t r = r0 + i / cols, c = c0 + i % cols;
    q[r * K + c] = f32_to_e4m3(__fdiv_rn(load_f32(x, r * s0 + c * s1), s));
  }
}

// ---- vector paths of the transposed and the 128x128 quantisers ----------------------------------------------------
// Same conditions as quantize_rows_vec_kernel (unit column stride, K and the row stride multiples of VE, base 16-byte
// aligned).
//
// rows_t: one 256-thread block per 128 (m) x 64 (k) tile. Minimal bytes: M K sizeof(T) + M K codes + M K / 128
// scales. Loads: each thread issues 128 * 64 / (256 VE) 16-byte loads along k (all in flight before use) into a
// padded FP32 tile; then one warp per column k reads rows lane + 32 j (conflict-free), takes the amax and writes
// the column's codes into a [64][128] byte tile; the byte tile leaves as 16-byte stores along m (rows of q = codes
// of x^T) when M % 16 == 0 and q is 16-byte aligned, else byte by byte.
constexpr int kTTileK = 64;

template <typename T>
__global__ void __launch_bounds__(detail::kThreads) quantize_rows_t_vec_kernel(const T* __restrict__ x, int64_t s0,
                                                                               int64_t M, int64_t K,
                                                                               uint8_t* __restrict__ q, ScaleOut so,
                                                                               bool vec_store) {
  using V = Vec16<T>;
  constexpr int VE = V::kElems, TPR = kTTileK / VE, RPP = detail::kThreads / TPR, P = kFp8Group / RPP;
  __shared__ float tile[kFp8Group][kTTileK + 1];
  __shared__ __align__(16) uint8_t codes[kTTileK][kFp8Group];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kFp8Group;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTTileK;
  const int tid = static_cast<int>(threadIdx.x);
  const int cr = tid / TPR, cc = (tid % TPR) * VE;
  typename V::Load raw[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t m = m0 + cr + p * RPP, k = k0 + cc;
    if (m < M && k < K) raw[p] = *reinterpret_cast<const typename V::Load*>(x + m * s0 + k);
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t m = m0 + cr + p * RPP, k = k0 + cc;
    float v[VE];
    if (m < M && k < K) {
      V::unpack(raw[p], v);
    } else {
#pragma unroll
      for (int e = 0; e < VE; ++e) v[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < VE; ++e) tile[cr + p * RPP][cc + e] = v[e];
  }
  __syncthreads();
  const int warp = tid >> 5, lane = tid & 31;
  const int64_t MB = (M + kFp8Group - 1) / kFp8Group;
  for (int c = warp; c < kTTileK; c += detail::kThreads / 32) {
    const int64_t k = k0 + c;
    if (k >= K) break;
    float a[4];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      a[j] = tile[lane + 32 * j][c];
      amax = fmaxf(amax, fabsf(a[j]));
    }
    amax = warp_max(amax);
    uint8_t code = 0;
    const float s = fp8_block_scale(amax, so.fmt, &code);
    if (lane == 0) {
      if (so.fmt == ScaleFormat::F32)
        so.f32[k * MB + blockIdx.x] = s;
      else
        so.e8m0[k * MB + blockIdx.x] = code;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) codes[c][lane + 32 * j] = f32_to_e4m3(__fdiv_rn(a[j], s));
  }
  __syncthreads();
  if (vec_store) {
    for (int i = tid; i < kTTileK * (kFp8Group / 16); i += detail::kThreads) {
      const int c = i / (kFp8Group / 16), seg = i % (kFp8Group / 16);
      const int64_t k = k0 + c, m = m0 + seg * 16;
      if (k < K && m < M)
        *reinterpret_cast<uint4*>(q + k * M + m) = *reinterpret_cast<const uint4*>(&codes[c][seg * 16]);
    }
  } else {
    for (int i = tid; i < kTTileK * kFp8Group; i += detail::kThreads) {
      const int c = i / kFp8Group, mm = i % kFp8Group;
      const int64_t k = k0 + c, m = m0 + mm;
      if (k < K && m < M) q[k * M + m] = codes[c][mm];
    }
  }
}

// blocks: one 256-thread block per 128x128 block; each thread issues its 128 * 128 / (256 VE) 16-byte loads (16 F32 or
// 8 BF16 vectors: a warp covers one (F32) or two (BF16) 512-byte row segments per load), keeps them in registers,
// block amax (warp shuffles, then 8 warp maxima), then quantises from registers and stores 4 or 8 code bytes per
// vector. x is read once (the scalar kernel reads it twice). Minimal bytes: N K sizeof(T) + N K codes + scales.
template <typename T>
__global__ void __launch_bounds__(detail::kThreads) quantize_blocks_vec_kernel(const T* __restrict__ x, int64_t s0,
                                                                               int64_t N, int64_t K,
                                                                               uint8_t* __restrict__ q, ScaleOut so) {
  using V = Vec16<T>;
  constexpr int VE = V::kElems, TPR = kFp8Group / VE, RPP = detail::kThreads / TPR, P = kFp8Group / RPP;
  __shared__ float red[detail::kThreads];
  __shared__ float s_shared;
  const int64_t KB = (K + kFp8Group - 1) / kFp8Group;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kFp8Group, c0 = static_cast<int64_t>(blockIdx.x) * kFp8Group;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t cr = tid / TPR, c = c0 + (tid % TPR) * VE;
  typename V::Load raw[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t r = r0 + cr + p * RPP;
    if (r < N && c < K) raw[p] = *reinterpret_cast<const typename V::Load*>(x + r * s0 + c);
  }
  float amax = 0.0f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t r = r0 + cr + p * RPP;
    if (r < N && c < K) {
      float v[VE];
      V::unpack(raw[p], v);
#pragma unroll
      for (int e = 0; e < VE; ++e) amax = fmaxf(amax, fabsf(v[e]));
    }
  }
  amax = detail::block_reduce(amax, red, [](float a, float b) { return fmaxf(a, b); });
  if (tid == 0) s_shared = make_scale(amax, so, static_cast<int64_t>(blockIdx.y) * KB + blockIdx.x);
  __syncthreads();
  const float s = s_shared;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t r = r0 + cr + p * RPP;
    if (r >= N || c >= K) continue;
    float v[VE];
    V::unpack(raw[p], v);
    store_codes<VE>(q + r * K + c, v, s);
  }
}

// ---- dequantise -----------------------------------------------------------------------------------------------
__global__ void dequantize_kernel(const uint8_t* q, const float* sf32, const uint8_t* se8, bool rows_layout,
                                  int64_t R, int64_t C, float* out) {
  const int64_t KB = (C + kFp8Group - 1) / kFp8Group;
  const int64_t n = R * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;
    const int64_t si = (rows_layout ? r : r / kFp8Group) * KB + c / kFp8Group;
    const float s = sf32 ? sf32[si] : e8m0_to_f32(se8[si]);
    out[i] = __fmul_rn(e4m3_to_f32(q[i]), s);
  }
}

// ---- FP4 -> FP8 (one 256-thread block per 128x128 block) ----------------------------------------------------
__global__ void fp4_to_fp8_kernel(const uint8_t* __restrict__ q4, const uint8_t* __restrict__ s4, int64_t R, int64_t C,
                                  int64_t groups, uint8_t* __restrict__ q8, uint8_t* __restrict__ s8,
                                  unsigned long long* bad) {
  __shared__ int kmax_s;
  const int64_t KB = (C + kFp8Group - 1) / kFp8Group;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kFp8Group, r1 = min(R, r0 + kFp8Group);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kFp8Group, c1 = min(C, c0 + kFp8Group);
  const int64_t g0 = c0 / 32, g1 = (c1 + 31) / 32, ng = g1 - g0;
  if (threadIdx.x == 0) kmax_s = 0;
  __syncthreads();
  int kmax = 0;
  for (int64_t i = threadIdx.x; i < (r1 - r0) * ng; i += blockDim.x) {
    const int64_t row = r0 + i / ng, g = g0 + i % ng;
    const int k = s4[row * groups + g];
    if (k == 0xFF) atomicMin(bad, static_cast<unsigned long long>(row * groups + g));
    kmax = max(kmax, k);
  }
  atomicMax(&kmax_s, kmax);
  __syncthreads();
  const int S = max(kmax_s - 6, 0);
  if (threadIdx.x == 0) s8[blockIdx.y * KB + blockIdx.x] = static_cast<uint8_t>(S);
  const int64_t w = c1 - c0;
  for (int64_t i = threadIdx.x; i < (r1 - r0) * w; i += blockDim.x) {
    const int64_t row = r0 + i / w, c = c0 + i % w;
    q8[row * C + c] = fp4_code_to_e4m3(fp4_get(q4 + row * (C / 2), c), s4[row * groups + c / 32], S);
  }
}

// ---- byte transpose through a 32x33 shared tile (codes; scales use the same kernel with their element size) -----
template <typename E>
__global__ void transpose_kernel(const E* __restrict__ src, E* __restrict__ dst, int64_t R, int64_t C) {
  __shared__ E tile[32][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  for (int j = threadIdx.y; j < 32; j += blockDim.y) {
    const int64_t r = static_cast<int64_t>(blockIdx.y) * 32 + j;
    if (r < R && c < C) tile[j][threadIdx.x] = src[r * C + c];
  }
  __syncthreads();
  const int64_t r = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  for (int j = threadIdx.y; j < 32; j += blockDim.y) {
    const int64_t cc = static_cast<int64_t>(blockIdx.x) * 32 + j;
    if (r < R && cc < C) dst[cc * R + r] = tile[threadIdx.x][j];
  }
}

template <typename E>
void launch_transpose(const E* src, E* dst, int64_t R, int64_t C, cudaStream_t st) {
  DSV4_CHECK((R + 31) / 32 <= 65535, "cuda::fp8_transpose_blocks: {} rows too many", R);
  const dim3 grid(static_cast<unsigned>((C + 31) / 32), static_cast<unsigned>((R + 31) / 32));
  transpose_kernel<E><<<grid, dim3(32, 8), 0, st>>>(src, dst, R, C);
  CUDA_CHECK_LAUNCH();
}

int64_t checked_grid(int64_t blocks, const char* op) {
  DSV4_CHECK(blocks <= INT32_MAX, "cuda::{}: problem too large ({} blocks)", op, blocks);
  return blocks;
}

bool aligned_to(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

// The vector kernels' input conditions (F32 / BF16, unit column stride, K and row stride multiples of the 16-byte
// vector's element count, 16-byte aligned base; q aligned to the vector's code bytes).
bool vector_input(const Tensor& x, const Tensor& q) {
  if (x.dtype() != DType::F32 && x.dtype() != DType::BF16) return false;
  const int64_t VE = x.dtype() == DType::F32 ? 4 : 8;
  return x.stride(1) == 1 && x.size(1) % VE == 0 && x.stride(0) % VE == 0 && aligned_to(x.raw_data(), 16) &&
         aligned_to(q.data_u8(), static_cast<uintptr_t>(VE));
}

}  // namespace

void fp8_quantize_rows(const Tensor& x, Tensor& q, Tensor& scale) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t M = x.size(0), K = x.size(1), KB = fp8_blocks(K);
  const ScaleOut so = scale_out(scale);
  constexpr int warps = detail::kThreads / 32;
  const bool vec = vector_input(x, q);
  const int64_t per_block = vec ? warps * kRowsGroups : warps;
  const auto grid = static_cast<unsigned>(checked_grid((M * KB + per_block - 1) / per_block, "fp8_quantize_rows"));
  detail::dispatch_float(x.dtype(), "fp8_quantize_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (vec)
      quantize_rows_vec_kernel<T><<<grid, detail::kThreads, 0, detail::stream_of(x)>>>(
          static_cast<const T*>(x.raw_data()), x.stride(0), M, K, q.data_u8(), so);
    else
      quantize_rows_kernel<T><<<grid, detail::kThreads, 0, detail::stream_of(x)>>>(
          static_cast<const T*>(x.raw_data()), x.stride(0), x.stride(1), M, K, q.data_u8(), so);
  });
  CUDA_CHECK_LAUNCH();
}

void fp8_quantize_rows_t(const Tensor& x, Tensor& q, Tensor& scale) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t M = x.size(0), K = x.size(1);
  const ScaleOut so = scale_out(scale);
  if (vector_input(x, q)) {
    DSV4_CHECK((K + kTTileK - 1) / kTTileK <= 65535, "cuda::fp8_quantize_rows_t: K = {} too large", K);
    const dim3 grid(static_cast<unsigned>(checked_grid(fp8_blocks(M), "fp8_quantize_rows_t")),
                    static_cast<unsigned>((K + kTTileK - 1) / kTTileK));
    const bool vec_store = M % 16 == 0 && aligned_to(q.data_u8(), 16);
    detail::dispatch_float(x.dtype(), "fp8_quantize_rows_t", [&](auto tag) {
      using T = typename decltype(tag)::type;
      quantize_rows_t_vec_kernel<T><<<grid, detail::kThreads, 0, detail::stream_of(x)>>>(
          static_cast<const T*>(x.raw_data()), x.stride(0), M, K, q.data_u8(), so, vec_store);
    });
    CUDA_CHECK_LAUNCH();
    return;
  }
  const dim3 grid(static_cast<unsigned>(checked_grid(fp8_blocks(M), "fp8_quantize_rows_t")),
                  static_cast<unsigned>(std::min<int64_t>((K + kTileK - 1) / kTileK, 65535)));
  DSV4_CHECK((K + kTileK - 1) / kTileK <= 65535, "cuda::fp8_quantize_rows_t: K = {} too large", K);
  detail::dispatch_float(x.dtype(), "fp8_quantize_rows_t", [&](auto tag) {
    using T = typename decltype(tag)::type;
    quantize_rows_t_kernel<T><<<grid, detail::kThreads, 0, detail::stream_of(x)>>>(
        static_cast<const T*>(x.raw_data()), x.stride(0), x.stride(1), M, K, q.data_u8(), so);
  });
  CUDA_CHECK_LAUNCH();
}

void fp8_quantize_blocks(const Tensor& x, Tensor& q, Tensor& scale) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t N = x.size(0), K = x.size(1);
  const ScaleOut so = scale_out(scale);
  DSV4_CHECK(fp8_blocks(N) <= 65535, "cuda::fp8_quantize_blocks: {} rows too many", N);
  const dim3 grid(static_cast<unsigned>(checked_grid(fp8_blocks(K), "fp8_quantize_blocks")),
                  static_cast<unsigned>(fp8_blocks(N)));
  const bool vec = vector_input(x, q);
  detail::dispatch_float(x.dtype(), "fp8_quantize_blocks", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (vec)
      quantize_blocks_vec_kernel<T><<<grid, detail::kThreads, 0, detail::stream_of(x)>>>(
          static_cast<const T*>(x.raw_data()), x.stride(0), N, K, q.data_u8(), so);
    else
      quantize_blocks_kernel<T><<<grid, detail::kThreads, 0, detail::stream_of(x)>>>(
          static_cast<const T*>(x.raw_data()), x.stride(0), x.stride(1), N, K, q.data_u8(), so);
  });
  CUDA_CHECK_LAUNCH();
}

void fp8_dequantize(const Tensor& q, const Tensor& scale, Fp8Layout layout, Tensor& out) {
  detail::DeviceGuard guard(q.device().index);
  const bool f32 = scale.dtype() == DType::F32;
  dequantize_kernel<<<detail::blocks_for(out.numel()), detail::kThreads, 0, detail::stream_of(q)>>>(
      q.data_u8(), f32 ? scale.data<float>() : nullptr, f32 ? nullptr : scale.data_u8(),
      layout == Fp8Layout::Rows1x128, q.size(0), q.size(1), out.data<float>());
  CUDA_CHECK_LAUNCH();
}

int64_t fp4_to_fp8_blocks(const Tensor& packed, const Tensor& scale, Tensor& q, Tensor& s) {
  detail::DeviceGuard guard(packed.device().index);
  const int64_t R = packed.size(0), C = packed.size(1);
  DSV4_CHECK(fp8_blocks(R) <= 65535, "cuda::fp4_to_fp8_blocks: {} rows too many", R);
  const cudaStream_t st = detail::stream_of(packed);
  Tensor bad = Tensor::empty({1}, DType::I64, packed.device());
  CUDA_CHECK(cudaMemsetAsync(bad.raw_data(), 0xFF, sizeof(unsigned long long), st));
  const dim3 grid(static_cast<unsigned>(checked_grid(fp8_blocks(C), "fp4_to_fp8_blocks")),
                  static_cast<unsigned>(fp8_blocks(R)));
  fp4_to_fp8_kernel<<<grid, detail::kThreads, 0, st>>>(packed.data_u8(), scale.data_u8(), R, C, scale.size(1),
                                                         q.data_u8(), s.data_u8(),
                                                         static_cast<unsigned long long*>(bad.raw_data()));
  CUDA_CHECK_LAUNCH();
  unsigned long long first = 0;
  CUDA_CHECK(cudaMemcpyAsync(&first, bad.raw_data(), sizeof(first), cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  return first == ~0ull ? -1 : static_cast<int64_t>(first);
}

void fp8_transpose_blocks(const Tensor& q, const Tensor& scale, Tensor& qt, Tensor& st_out) {
  detail::DeviceGuard guard(q.device().index);
  const cudaStream_t st = detail::stream_of(q);
  launch_transpose<uint8_t>(q.data_u8(), qt.data_u8(), q.size(0), q.size(1), st);
  if (scale.dtype() == DType::F32)
    launch_transpose<float>(scale.data<float>(), st_out.data<float>(), scale.size(0), scale.size(1), st);
  else
    launch_transpose<uint8_t>(scale.data_u8(), st_out.data_u8(), scale.size(0), scale.size(1), st);
}

}  // namespace dsv4::cuda
