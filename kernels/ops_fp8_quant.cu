// CUDA twins of the block-scaled FP8 quantisers and the dequantiser (runtime/fp8.h; CPU reference
// src/runtime/cpu_fp8.cpp). Bit-exact with the CPU: amax is a max (order-free), the scale rule is the shared
// fp8_block_scale (IEEE division: this file must not be built with --use_fast_math), codes are dtype.h's
// f32_to_e4m3 of an IEEE-rounded division (__fdiv_rn).
//
//   fp8_quantize_rows     one warp per (row, 128-column group): lane reads columns lane + 32 j (coalesced).
//   fp8_quantize_rows_t   one 256-thread block per 128 (m) x 32 (k) tile of x, staged through shared memory so
//                         both the reads of x (along k) and the writes of q = (x^T) codes (along m) coalesce.
//   fp8_quantize_blocks   one 256-thread block per 128x128 block (tree max in shared memory).
//   fp8_dequantize        element-wise.
// Inputs F32 or BF16 with any 2-D strides; outputs contiguous.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include "kernels/ops_common.cuh"
#include "runtime/fp8.h"

namespace dsv4::cuda {
namespace {

using detail::load_f32;

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

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
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

}  // namespace

void fp8_quantize_rows(const Tensor& x, Tensor& q, Tensor& scale) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t M = x.size(0), K = x.size(1), KB = fp8_blocks(K);
  const ScaleOut so = scale_out(scale);
  constexpr int warps = detail::kThreads / 32;
  const auto grid = static_cast<unsigned>(checked_grid((M * KB + warps - 1) / warps, "fp8_quantize_rows"));
  detail::dispatch_float(x.dtype(), "fp8_quantize_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    quantize_rows_kernel<T><<<grid, detail::kThreads, 0, detail::stream_of(x)>>>(
        static_cast<const T*>(x.raw_data()), x.stride(0), x.stride(1), M, K, q.data_u8(), so);
  });
  CUDA_CHECK_LAUNCH();
}

void fp8_quantize_rows_t(const Tensor& x, Tensor& q, Tensor& scale) {
  detail::DeviceGuard guard(x.device().index);
  const int64_t M = x.size(0), K = x.size(1);
  const ScaleOut so = scale_out(scale);
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
  detail::dispatch_float(x.dtype(), "fp8_quantize_blocks", [&](auto tag) {
    using T = typename decltype(tag)::type;
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
