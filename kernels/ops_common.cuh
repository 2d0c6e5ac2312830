// Shared pieces of the CUDA op files (kernels/ops_*.cu): device guard, current stream, launch sizes,
// strided N-d indexing, dtype dispatch and FP32/BF16 element access. Internal to kernels/.
#pragma once

#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda_runtime_api.h"
#include "runtime/dtype.h"
#include "runtime/ops.h"
#include "runtime/tensor.h"

// Grid-stride loop over [0, n): `GRID_STRIDE(i, n) body;`
#define GRID_STRIDE(i, n) \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

namespace dsv4::cuda::detail {

// Makes `device` current for the scope, restoring the previous device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t stream_of(int device) { return static_cast<cudaStream_t>(current_stream(device)); }
inline cudaStream_t stream_of(const Tensor& t) { return stream_of(t.device().index); }

// ---- warp reductions: a fixed xor-shuffle tree, every lane gets the same value -------------------------------
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Dot product of two length-n vectors by one warp (lane-strided FMA partials, then warp_sum).
__device__ __forceinline__ float warp_dot(const float* a, const float* b, int64_t n, int lane) {
  float s = 0.0f;
  for (int64_t i = lane; i < n; i += 32) s = fmaf(a[i], b[i], s);
  return warp_sum(s);
}

// ---- launch sizes ------------------------------------------------------------------------------------
inline constexpr int kThreads = 256;
inline constexpr int64_t kMaxBlocks = 1 << 18;  // element-wise kernels use grid-stride loops past this

inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + threads - 1) / threads, 1, kMaxBlocks));
}
// Smallest power of two >= n, clamped to [lo, hi] (block sizes of the tree reductions).
inline int pow2_threads(int64_t n, int lo, int hi) {
  int t = lo;
  while (t < hi && t < n) t *= 2;
  return t;
}

// ---- strided indexing ----------------------------------------------------------------------------------
// Offsets (in elements) of N operands that share one iteration shape, from a linear index in row-major
// order of that shape. Built on the host with size-1 dims dropped and mergeable neighbours coalesced, so
// contiguous tensors cost a single division.
template <int N>
struct Indexer {
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[N][kMaxDims] = {};

#if defined(__CUDACC__)
  __device__ __forceinline__ void offsets(int64_t linear, int64_t (&off)[N]) const {
#pragma unroll
    for (int t = 0; t < N; ++t) off[t] = 0;
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      if (d < ndim) {
        const int64_t size = sizes[d];
        const int64_t q = linear / size;
        const int64_t i = linear - q * size;
        linear = q;
#pragma unroll
        for (int t = 0; t < N; ++t) off[t] += i * strides[t][d];
      }
    }
  }
#endif
};

template <int N>
Indexer<N> make_indexer(const Shape& shape, const std::array<Shape, N>& strides) {
  Indexer<N> ix;
  // Keep dims of size != 1 (outermost first), then merge inner neighbours where every operand allows it.
  int64_t sz[kMaxDims];
  int64_t st[N][kMaxDims];
  int n = 0;
  for (int d = 0; d < shape.ndim(); ++d) {
    if (shape[d] == 1) continue;
    sz[n] = shape[d];
    for (int t = 0; t < N; ++t) st[t][n] = strides[static_cast<size_t>(t)][d];
    ++n;
  }
  for (int d = 0; d < n; ++d) {
    if (ix.ndim > 0) {
      const int p = ix.ndim - 1;  // previous (outer) kept dim; d is inner to it
      bool mergeable = true;
      for (int t = 0; t < N; ++t) mergeable = mergeable && ix.strides[t][p] == st[t][d] * sz[d];
      if (mergeable) {
        ix.sizes[p] *= sz[d];
        for (int t = 0; t < N; ++t) ix.strides[t][p] = st[t][d];
        continue;
      }
    }
    ix.sizes[ix.ndim] = sz[d];
    for (int t = 0; t < N; ++t) ix.strides[t][ix.ndim] = st[t][d];
    ++ix.ndim;
  }
  return ix;
}

// Shape and strides with dim `d` removed.
inline Shape drop_dim(const Shape& s, int d) {
  Shape r;
  for (int i = 0; i < s.ndim(); ++i)
    if (i != d) r.push_back(s[i]);
  return r;
}

// ---- dtype dispatch ------------------------------------------------------------------------------------
// FP32 compute types of the float ops: F32 is float, BF16 is its raw uint16_t storage.
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename F>
void dispatch_float(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::F32: f(TypeTag<float>{}); return;
    case DType::BF16: f(TypeTag<uint16_t>{}); return;
    default: DSV4_FAIL("cuda::{}: unsupported dtype {} (F32 or BF16)", op, dtype_name(dtype));
  }
}
// Raw element types of 1, 2, 4 and 8 bytes (copies, gathers: bit patterns are moved, never converted).
template <typename F>
void dispatch_bytes(int elem_bytes, const char* op, F&& f) {
  switch (elem_bytes) {
    case 1: f(TypeTag<uint8_t>{}); return;
    case 2: f(TypeTag<uint16_t>{}); return;
    case 4: f(TypeTag<uint32_t>{}); return;
    case 8: f(TypeTag<uint64_t>{}); return;
    default: DSV4_FAIL("cuda::{}: unsupported element size {}", op, elem_bytes);
  }
}

// A tensor seen as an array of whole bytes-sized elements: packed FP4 becomes U8 with the (even) last dim
// halved and the other strides halved; everything else is unchanged.
struct RawView {
  void* data = nullptr;
  Shape shape;
  Shape strides;
  int elem_bytes = 0;
};
inline RawView raw_view(const Tensor& t) {
  RawView v{t.raw_data(), t.shape(), t.strides(), dtype_bits(t.dtype()) / 8};
  if (t.dtype() != DType::F4_E2M1) return v;
  v.elem_bytes = 1;
  const int n = t.ndim();
  if (n == 0) return v;
  DSV4_CHECK(t.size(n - 1) % 2 == 0 && (t.stride(n - 1) == 1 || t.size(n - 1) <= 1),
             "packed FP4 tensor {} needs an even, contiguous last dim", t.str());
  for (int d = 0; d + 1 < n; ++d) {
    DSV4_CHECK(t.stride(d) % 2 == 0 || t.size(d) == 1, "packed FP4 tensor {} has an odd stride in dim {}", t.str(), d);
    v.strides[d] = t.stride(d) / 2;
  }
  v.shape[n - 1] = t.size(n - 1) / 2;
  v.strides[n - 1] = 1;
  return v;
}

#if defined(__CUDACC__)
// FP32 load/store of the float compute types (BF16 stores round to nearest even, as on the CPU).
__device__ __forceinline__ float load_f32(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f32(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void store_f32(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f32(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

// Index tensors are I32 or I64.
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Deterministic tree reduction over a power-of-two block: every thread passes its value, thread 0's
// return value is the result (others get partial values). `smem` holds blockDim.x floats.
template <typename Combine>
__device__ __forceinline__ float block_reduce(float v, float* smem, Combine combine) {
  const int tid = static_cast<int>(threadIdx.x);
  smem[tid] = v;
  __syncthreads();
  for (int s = static_cast<int>(blockDim.x) / 2; s > 0; s >>= 1) {
    if (tid < s) smem[tid] = combine(smem[tid], smem[tid + s]);
    __syncthreads();
  }
  const float r = smem[0];
  __syncthreads();  // smem may be reused right after
  return r;
}
#endif

}  // namespace dsv4::cuda::detail
