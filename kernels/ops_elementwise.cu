// Element-wise CUDA ops: fill, copy, convert, unary, binary, affine (backend_ops.def).
// Every op takes arbitrary strides; float ops compute in FP32 and round BF16 stores to nearest even with
// the dtype.h conversions, so results match the CPU reference to FP32 rounding. Products and sums are
// written with __fmul_rn/__fadd_rn where the CPU does two roundings, so nvcc does not contract them to FMA.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

using detail::Indexer;
using detail::blocks_for;
using detail::kThreads;
using detail::load_f32;
using detail::make_indexer;
using detail::store_f32;

// ---- fill ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void fill_kernel(T* out, Indexer<1> ix, int64_t n, T bits) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[1];
    ix.offsets(i, off);
    out[off[0]] = bits;
  }
}

// Float -> integer as on the CPU: truncation toward zero, saturating at the dtype's range, NaN -> 0.
template <typename I>
__host__ __device__ __forceinline__ int64_t trunc_saturate(double v) {
  if (v != v) return 0;
  constexpr double lo = static_cast<double>(std::numeric_limits<I>::min());
  constexpr double hi = static_cast<double>(std::numeric_limits<I>::max());
  if (v <= lo) return static_cast<int64_t>(std::numeric_limits<I>::min());
  if (v >= hi) return static_cast<int64_t>(std::numeric_limits<I>::max());
  return static_cast<int64_t>(static_cast<I>(trunc(v)));
}
__host__ __device__ __forceinline__ int64_t float_to_int(DType t, double v) {
  switch (t) {
    case DType::I8: return trunc_saturate<int8_t>(v);
    case DType::U8: return trunc_saturate<uint8_t>(v);
    case DType::I32: return trunc_saturate<int32_t>(v);
    default: return trunc_saturate<int64_t>(v);
  }
}

// Bit pattern of `value` in `dtype` (packed FP4: the code in both nibbles of a byte).
uint64_t fill_bits(DType dtype, double value) {
  const float f = static_cast<float>(value);
  switch (dtype) {
    case DType::F32: return f32_bits(f);
    case DType::BF16: return f32_to_bf16(f);
    case DType::F16: return f32_to_f16(f);
    case DType::F8_E4M3: return f32_to_e4m3(f);
    case DType::F8_E8M0: return e8m0_ceil_from_f32(f);
    case DType::F4_E2M1: {
      const uint32_t c = f32_to_e2m1(f);
      return c | (c << 4);
    }
    case DType::I8: return static_cast<uint8_t>(static_cast<int8_t>(float_to_int(dtype, value)));
    case DType::U8: return static_cast<uint8_t>(float_to_int(dtype, value));
    case DType::I32: return static_cast<uint32_t>(static_cast<int32_t>(float_to_int(dtype, value)));
    case DType::I64: return static_cast<uint64_t>(float_to_int(dtype, value));
  }
  return 0;
}

void launch_fill(const detail::RawView& v, uint64_t bits, cudaStream_t stream) {
  const int64_t n = v.shape.numel();
  if (n == 0) return;
  const Indexer<1> ix = make_indexer<1>(v.shape, {v.strides});
  if (bits == 0 && (ix.ndim == 0 || (ix.ndim == 1 && ix.strides[0][0] == 1))) {
    // Zeroing contiguous memory (every gradient, every step): cudaMemsetAsync; the kernel below moved 8 MB gradients
    // at about 0.8 TB/s (ncu, H100).
    CUDA_CHECK(cudaMemsetAsync(v.data, 0, static_cast<size_t>(n) * static_cast<size_t>(v.elem_bytes), stream));
    return;
  }
  detail::dispatch_bytes(v.elem_bytes, "fill", [&](auto tag) {
    using T = typename decltype(tag)::type;
    fill_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<T*>(v.data), ix, n, static_cast<T>(bits));
  });
  CUDA_CHECK_LAUNCH();
}

// ---- copy ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void copy_kernel(const T* src, T* out, Indexer<2> ix, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[2];
    ix.offsets(i, off);
    out[off[1]] = src[off[0]];
  }
}

void launch_copy(const detail::RawView& s, const detail::RawView& o, cudaStream_t stream) {
  const int64_t n = o.shape.numel();
  if (n == 0) return;
  const Indexer<2> ix = make_indexer<2>(o.shape, {s.strides, o.strides});
  if (ix.ndim == 0 || (ix.ndim == 1 && ix.strides[0][0] == 1 && ix.strides[1][0] == 1)) {
    CUDA_CHECK(cudaMemcpyAsync(o.data, s.data, static_cast<size_t>(n) * static_cast<size_t>(o.elem_bytes),
                               cudaMemcpyDeviceToDevice, stream));
    return;
  }
  detail::dispatch_bytes(o.elem_bytes, "copy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    copy_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const T*>(s.data), static_cast<T*>(o.data),
                                                            ix, n);
  });
  CUDA_CHECK_LAUNCH();
}

// ---- convert ---------------------------------------------------------------------------------------------
// One kernel for all 100 dtype pairs: loads and stores switch on the (block-uniform) dtypes. Integers
// travel as int64, floats as FP32 (every float dtype converts to FP32 exactly).
struct Scalar {
  bool is_int;
  int64_t i;
  float f;
};

__device__ __forceinline__ Scalar load_scalar(const void* base, DType t, int64_t off) {
  switch (t) {
    case DType::F32: return {false, 0, static_cast<const float*>(base)[off]};
    case DType::BF16: return {false, 0, bf16_to_f32(static_cast<const uint16_t*>(base)[off])};
    case DType::F16: return {false, 0, f16_to_f32(static_cast<const uint16_t*>(base)[off])};
    case DType::F8_E4M3: return {false, 0, e4m3_to_f32(static_cast<const uint8_t*>(base)[off])};
    case DType::F8_E8M0: return {false, 0, e8m0_to_f32(static_cast<const uint8_t*>(base)[off])};
    case DType::F4_E2M1: return {false, 0, e2m1_to_f32(fp4_get(static_cast<const uint8_t*>(base), off))};
    case DType::I8: return {true, static_cast<const int8_t*>(base)[off], 0.0f};
    case DType::U8: return {true, static_cast<const uint8_t*>(base)[off], 0.0f};
    case DType::I32: return {true, static_cast<const int32_t*>(base)[off], 0.0f};
    case DType::I64: return {true, static_cast<const int64_t*>(base)[off], 0.0f};
  }
  return {false, 0, 0.0f};
}

// As on the CPU: int -> int wraps when narrowing, float -> int truncates toward zero saturating at the
// target's range (NaN -> 0), int -> float rounds to nearest FP32 and then to the target format.
// F8_E8M0 targets take the ceiling power of two, as on the CPU.
__device__ __forceinline__ float as_float(const Scalar& s) { return s.is_int ? static_cast<float>(s.i) : s.f; }
__device__ __forceinline__ int64_t as_int(const Scalar& s, DType t) { return s.is_int ? s.i : float_to_int(t, s.f); }

__device__ __forceinline__ void store_scalar(void* base, DType t, int64_t off, const Scalar& s) {
  switch (t) {
    case DType::F32: static_cast<float*>(base)[off] = as_float(s); return;
    case DType::BF16: static_cast<uint16_t*>(base)[off] = f32_to_bf16(as_float(s)); return;
    case DType::F16: static_cast<uint16_t*>(base)[off] = f32_to_f16(as_float(s)); return;
    case DType::F8_E4M3: static_cast<uint8_t*>(base)[off] = f32_to_e4m3(as_float(s)); return;
    case DType::F8_E8M0: static_cast<uint8_t*>(base)[off] = e8m0_ceil_from_f32(as_float(s)); return;
    case DType::F4_E2M1: return;  // written in pairs by convert_kernel
    case DType::I8: static_cast<int8_t*>(base)[off] = static_cast<int8_t>(as_int(s, t)); return;
    case DType::U8: static_cast<uint8_t*>(base)[off] = static_cast<uint8_t>(as_int(s, t)); return;
    case DType::I32: static_cast<int32_t*>(base)[off] = static_cast<int32_t>(as_int(s, t)); return;
    case DType::I64: static_cast<int64_t*>(base)[off] = as_int(s, t); return;
  }
}

// For a packed FP4 destination the iteration runs over element pairs (dst offset even); the second
// source element is `src_pair_stride` elements after the first (0 for a 0-d output: both nibbles get
// the one element, as fill does).
__global__ void convert_kernel(const void* src, DType sdt, void* out, DType odt, Indexer<2> ix, int64_t n,
                               int64_t src_pair_stride) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[2];
    ix.offsets(i, off);
    if (odt == DType::F4_E2M1) {
      const uint32_t lo = f32_to_e2m1(as_float(load_scalar(src, sdt, off[0])));
      const uint32_t hi = f32_to_e2m1(as_float(load_scalar(src, sdt, off[0] + src_pair_stride)));
      static_cast<uint8_t*>(out)[off[1] >> 1] = static_cast<uint8_t>(lo | (hi << 4));
    } else {
      store_scalar(out, odt, off[1], load_scalar(src, sdt, off[0]));
    }
  }
}

// The contiguous element loop of the fast kernels: f(i, true) for the 4-element group i (i < n / 4) when vec, then
// f(i, false) for each remaining element i (all of them when !vec), grid-stride.
template <typename F>
__device__ __forceinline__ void map_contig(int64_t n, bool vec, F&& f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n4 = vec ? n / 4 : 0;
  for (int64_t i = first; i < n4; i += stride) f(i, true);
  for (int64_t i = 4 * n4 + first; i < n; i += stride) f(i, false);
}

// Contiguous F32 <-> BF16, the conversions of the training step (GEMM operands: weights, activations, gradients; the
// BF16 Newton-Schulz result): 4 elements per thread with 16-byte / 8-byte accesses when both pointers allow it, else 1.
// The generic kernel below moved these at about 0.6 TB/s (ncu on an H100: 2059 F32 -> BF16 conversions of a bf16
// training step averaged 21 us for about 12 MB each). Same rounding function, so the same bits.
__global__ void f32_to_bf16_kernel(const float* src, uint16_t* out, int64_t n, bool vec) {
  map_contig(n, vec, [&](int64_t i, bool v4) {
    if (!v4) {
      out[i] = f32_to_bf16(src[i]);
      return;
    }
    const float4 v = reinterpret_cast<const float4*>(src)[i];
    uint2 r;
    r.x = static_cast<uint32_t>(f32_to_bf16(v.x)) | (static_cast<uint32_t>(f32_to_bf16(v.y)) << 16);
    r.y = static_cast<uint32_t>(f32_to_bf16(v.z)) | (static_cast<uint32_t>(f32_to_bf16(v.w)) << 16);
    reinterpret_cast<uint2*>(out)[i] = r;
  });
}

__global__ void bf16_to_f32_kernel(const uint16_t* src, float* out, int64_t n, bool vec) {
  map_contig(n, vec, [&](int64_t i, bool v4) {
    if (!v4) {
      out[i] = bf16_to_f32(src[i]);
      return;
    }
    const uint2 v = reinterpret_cast<const uint2*>(src)[i];
    reinterpret_cast<float4*>(out)[i] = make_float4(bf16_to_f32(static_cast<uint16_t>(v.x & 0xFFFFu)),
                                                    bf16_to_f32(static_cast<uint16_t>(v.x >> 16)),
                                                    bf16_to_f32(static_cast<uint16_t>(v.y & 0xFFFFu)),
                                                    bf16_to_f32(static_cast<uint16_t>(v.y >> 16)));
  });
}

// The F32 <-> BF16 kernels above for contiguous tensors; false for anything else.
bool launch_convert_bf16_contiguous(const Tensor& src, Tensor& out, cudaStream_t stream) {
  const bool down = src.dtype() == DType::F32 && out.dtype() == DType::BF16;
  const bool up = src.dtype() == DType::BF16 && out.dtype() == DType::F32;
  if (!(down || up) || !src.is_contiguous() || !out.is_contiguous()) return false;
  const int64_t n = out.numel();
  const auto aligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
  const unsigned blocks = blocks_for((n + 3) / 4);
  if (down) {
    const bool vec = aligned(src.raw_data(), 16) && aligned(out.raw_data(), 8);
    f32_to_bf16_kernel<<<blocks, kThreads, 0, stream>>>(src.data<float>(), out.data_u16(), n, vec);
  } else {
    const bool vec = aligned(src.raw_data(), 8) && aligned(out.raw_data(), 16);
    bf16_to_f32_kernel<<<blocks, kThreads, 0, stream>>>(src.data_u16(), out.data<float>(), n, vec);
  }
  CUDA_CHECK_LAUNCH();
  return true;
}

void launch_convert(const Tensor& src, Tensor& out, cudaStream_t stream) {
  if (out.numel() == 0) return;
  if (launch_convert_bf16_contiguous(src, out, stream)) return;
  Shape shape = out.shape();
  Shape sst = src.strides(), ost = out.strides();
  int64_t pair_stride = 0;
  if (out.dtype() == DType::F4_E2M1 && out.ndim() > 0) {
    const int last = out.ndim() - 1;
    DSV4_CHECK(shape[last] % 2 == 0 && (ost[last] == 1 || shape[last] <= 1),
               "cuda::convert: packed FP4 output {} needs an even, contiguous last dim", out.str());
    pair_stride = sst[last];
    shape[last] /= 2;
    sst[last] *= 2;
    ost[last] = 2;
  }
  const int64_t n = shape.numel();
  const Indexer<2> ix = make_indexer<2>(shape, {sst, ost});
  convert_kernel<<<blocks_for(n), kThreads, 0, stream>>>(src.raw_data(), src.dtype(), out.raw_data(), out.dtype(),
                                                         ix, n, pair_stride);
  CUDA_CHECK_LAUNCH();
}

// ---- unary / affine --------------------------------------------------------------------------------------
// Same formulas as the CPU reference (overflow-free forms).
__device__ __forceinline__ float sigmoid(float x) {
  const float z = expf(-fabsf(x));
  return x >= 0.0f ? __fdiv_rn(1.0f, __fadd_rn(1.0f, z)) : __fdiv_rn(z, __fadd_rn(1.0f, z));
}
__device__ __forceinline__ float softplus(float x) {
  if (x != x) return x;
  return __fadd_rn(fmaxf(x, 0.0f), log1pf(expf(-fabsf(x))));
}

__device__ __forceinline__ float apply_unary(UnaryOp op, float x) {
  switch (op) {
    case UnaryOp::Neg: return -x;
    case UnaryOp::Abs: return fabsf(x);
    case UnaryOp::Exp: return expf(x);
    case UnaryOp::Log: return logf(x);
    case UnaryOp::Sqrt: return sqrtf(x);
    case UnaryOp::Rsqrt: return 1.0f / sqrtf(x);  // not rsqrtf(): that one is approximate
    case UnaryOp::Square: return __fmul_rn(x, x);
    case UnaryOp::Sigmoid: return sigmoid(x);
    case UnaryOp::Silu: return __fmul_rn(x, sigmoid(x));
    case UnaryOp::Relu: return x > 0.0f ? x : (x != x ? x : 0.0f);  // NaN passes through
    case UnaryOp::Tanh: return tanhf(x);
    case UnaryOp::Softplus: return softplus(x);
  }
  return x;
}

template <typename T>
__global__ void unary_kernel(UnaryOp op, const T* x, T* out, Indexer<2> ix, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[2];
    ix.offsets(i, off);
    store_f32(out, off[1], apply_unary(op, load_f32(x, off[0])));
  }
}

template <typename T>
__global__ void affine_kernel(const T* x, T* out, Indexer<2> ix, int64_t n, float alpha, float beta) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[2];
    ix.offsets(i, off);
    store_f32(out, off[1], __fadd_rn(__fmul_rn(alpha, load_f32(x, off[0])), beta));
  }
}

// ---- binary ----------------------------------------------------------------------------------------------
__device__ __forceinline__ float apply_binary(BinaryOp op, float a, float b) {
  switch (op) {
    case BinaryOp::Add: return __fadd_rn(a, b);
    case BinaryOp::Sub: return __fsub_rn(a, b);
    case BinaryOp::Mul: return __fmul_rn(a, b);
    case BinaryOp::Div: return __fdiv_rn(a, b);
    case BinaryOp::Max: return b != b ? b : ((a != a || a > b) ? a : b);  // NaN propagates (b's first)
    case BinaryOp::Min: return b != b ? b : ((a != a || a < b) ? a : b);
  }
  return a;
}

template <typename T>
__global__ void binary_kernel(BinaryOp op, const T* a, const T* b, T* out, Indexer<3> ix, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[3];
    ix.offsets(i, off);
    store_f32(out, off[2], apply_binary(op, load_f32(a, off[0]), load_f32(b, off[1])));
  }
}

// ---- contiguous F32 forms ----------------------------------------------------------------------------------
// Every operand one unit-stride run (the common case: residual adds, scalings, the optimizer's and the model's
// element-wise glue): no index arithmetic (the Indexer's 64-bit divisions per element), 4 elements per thread with
// 16-byte accesses when every pointer is 16-byte aligned, one otherwise. The same per-element functions, so the same
// bits as the strided kernels.
template <int N>
bool unit_stride(const Indexer<N>& ix) {
  if (ix.ndim != 1) return false;
  for (int t = 0; t < N; ++t)
    if (ix.strides[t][0] != 1) return false;
  return true;
}

bool aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

__device__ __forceinline__ float4 map4(const float4 v, UnaryOp op) {
  return make_float4(apply_unary(op, v.x), apply_unary(op, v.y), apply_unary(op, v.z), apply_unary(op, v.w));
}

__global__ void unary_contig_kernel(UnaryOp op, const float* x, float* out, int64_t n, bool vec) {
  map_contig(n, vec, [&](int64_t i, bool v4) {
    if (v4)
      reinterpret_cast<float4*>(out)[i] = map4(reinterpret_cast<const float4*>(x)[i], op);
    else
      out[i] = apply_unary(op, x[i]);
  });
}

__global__ void affine_contig_kernel(const float* x, float* out, int64_t n, bool vec, float alpha, float beta) {
  const auto f = [&](float v) { return __fadd_rn(__fmul_rn(alpha, v), beta); };
  map_contig(n, vec, [&](int64_t i, bool v4) {
    if (v4) {
      const float4 a = reinterpret_cast<const float4*>(x)[i];
      reinterpret_cast<float4*>(out)[i] = make_float4(f(a.x), f(a.y), f(a.z), f(a.w));
    } else {
      out[i] = f(x[i]);
    }
  });
}

__global__ void binary_contig_kernel(BinaryOp op, const float* a, const float* b, float* out, int64_t n, bool vec) {
  map_contig(n, vec, [&](int64_t i, bool v4) {
    if (v4) {
      const float4 x = reinterpret_cast<const float4*>(a)[i], y = reinterpret_cast<const float4*>(b)[i];
      reinterpret_cast<float4*>(out)[i] = make_float4(apply_binary(op, x.x, y.x), apply_binary(op, x.y, y.y),
                                                      apply_binary(op, x.z, y.z), apply_binary(op, x.w, y.w));
    } else {
      out[i] = apply_binary(op, a[i], b[i]);
    }
  });
}

// Strides of `t` broadcast to `shape` (right-aligned; broadcast dims get stride 0).
Shape broadcast_strides(const Tensor& t, const Shape& shape) {
  Shape st;
  const int lead = shape.ndim() - t.ndim();
  for (int d = 0; d < shape.ndim(); ++d) {
    const int td = d - lead;
    st.push_back(td < 0 || t.size(td) == 1 ? 0 : t.stride(td));
  }
  return st;
}

}  // namespace

// ---- entries ---------------------------------------------------------------------------------------------
void fill(Tensor& out, double value) {
  detail::DeviceGuard guard(out.device().index);
  launch_fill(detail::raw_view(out), fill_bits(out.dtype(), value), detail::stream_of(out));
}

void copy(const Tensor& src, Tensor& out) {
  DSV4_CHECK(src.dtype() == out.dtype() && src.shape() == out.shape(), "cuda::copy: {} into {}", src.str(),
             out.str());
  detail::DeviceGuard guard(out.device().index);
  launch_copy(detail::raw_view(src), detail::raw_view(out), detail::stream_of(out));
}

void convert(const Tensor& src, Tensor& out) {
  DSV4_CHECK(src.shape() == out.shape(), "cuda::convert: {} into {}", src.str(), out.str());
  detail::DeviceGuard guard(out.device().index);
  if (src.dtype() == out.dtype()) {
    launch_copy(detail::raw_view(src), detail::raw_view(out), detail::stream_of(out));
    return;
  }
  launch_convert(src, out, detail::stream_of(out));
}

void unary(UnaryOp op, const Tensor& x, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const int64_t n = out.numel();
  if (n == 0) return;
  const Indexer<2> ix = make_indexer<2>(out.shape(), {x.strides(), out.strides()});
  const cudaStream_t stream = detail::stream_of(out);
  if (out.dtype() == DType::F32 && unit_stride(ix)) {
    unary_contig_kernel<<<blocks_for((n + 3) / 4), kThreads, 0, stream>>>(
        op, x.data<float>(), out.data<float>(), n, aligned16({x.raw_data(), out.raw_data()}));
    CUDA_CHECK_LAUNCH();
    return;
  }
  detail::dispatch_float(out.dtype(), "unary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    unary_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(op, static_cast<const T*>(x.raw_data()),
                                                             static_cast<T*>(out.raw_data()), ix, n);
  });
  CUDA_CHECK_LAUNCH();
}

void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const int64_t n = out.numel();
  if (n == 0) return;
  const Indexer<3> ix = make_indexer<3>(
      out.shape(), {broadcast_strides(a, out.shape()), broadcast_strides(b, out.shape()), out.strides()});
  const cudaStream_t stream = detail::stream_of(out);
  if (out.dtype() == DType::F32 && unit_stride(ix)) {
    binary_contig_kernel<<<blocks_for((n + 3) / 4), kThreads, 0, stream>>>(
        op, a.data<float>(), b.data<float>(), out.data<float>(), n,
        aligned16({a.raw_data(), b.raw_data(), out.raw_data()}));
    CUDA_CHECK_LAUNCH();
    return;
  }
  detail::dispatch_float(out.dtype(), "binary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    binary_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(op, static_cast<const T*>(a.raw_data()),
                                                              static_cast<const T*>(b.raw_data()),
                                                              static_cast<T*>(out.raw_data()), ix, n);
  });
  CUDA_CHECK_LAUNCH();
}

void affine(const Tensor& x, double alpha, double beta, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const int64_t n = out.numel();
  if (n == 0) return;
  const Indexer<2> ix = make_indexer<2>(out.shape(), {x.strides(), out.strides()});
  const cudaStream_t stream = detail::stream_of(out);
  if (out.dtype() == DType::F32 && unit_stride(ix)) {
    affine_contig_kernel<<<blocks_for((n + 3) / 4), kThreads, 0, stream>>>(
        x.data<float>(), out.data<float>(), n, aligned16({x.raw_data(), out.raw_data()}), static_cast<float>(alpha),
        static_cast<float>(beta));
    CUDA_CHECK_LAUNCH();
    return;
  }
  detail::dispatch_float(out.dtype(), "affine", [&](auto tag) {
    using T = typename decltype(tag)::type;
    affine_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const T*>(x.raw_data()),
                                                              static_cast<T*>(out.raw_data()), ix, n,
                                                              static_cast<float>(alpha), static_cast<float>(beta));
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace dsv4::cuda
