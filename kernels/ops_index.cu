// Index ops (backend_ops.def): index_select, index_add, gather_last, scatter_add_last.
// Indices are I32 or I64 and were range-checked by the frontend. Selects and gathers move bit patterns
// (exact for every dtype; packed FP4 rows move as bytes).
//
// index_add and scatter_add_last accumulate with FP32 atomicAdd: duplicate indices are summed in an
// unspecified order, so results are NOT bitwise deterministic run to run (they agree to FP32 rounding).
// BF16 outputs accumulate into an FP32 copy that is rounded back to BF16 once at the end.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

using detail::Indexer;
using detail::blocks_for;
using detail::kThreads;
using detail::load_f32;
using detail::load_index;
using detail::make_indexer;

// out[i, rest] = x[index[i], rest]; `ix` runs over the rest dims with (x, out) strides.
template <typename T>
__global__ void index_select_kernel(const T* x, int64_t xs0, int64_t bound, const void* index, bool index64,
                                    int64_t is0, T* out, int64_t os0, Indexer<2> ix, int64_t rest, int64_t n) {
  for (int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; l < n;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = l / rest;
    int64_t off[2];
    ix.offsets(l - i * rest, off);
    const int64_t row = load_index(index, index64, i * is0);
    DSV4_DEVICE_ASSERT(row >= 0 && row < bound);  // the frontend validated; guards against races on index
    out[i * os0 + off[1]] = x[row * xs0 + off[0]];
  }
}

// acc[index[i], rest] += src[i, rest] in FP32.
template <typename T>
__global__ void index_add_kernel(const T* src, int64_t ss0, const void* index, bool index64, int64_t is0, float* acc,
                                 int64_t as0, int64_t bound, Indexer<2> ix, int64_t rest, int64_t n) {
  for (int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; l < n;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = l / rest;
    int64_t off[2];
    ix.offsets(l - i * rest, off);
    const int64_t row = load_index(index, index64, i * is0);
    DSV4_DEVICE_ASSERT(row >= 0 && row < bound);
    atomicAdd(acc + row * as0 + off[1], load_f32(src, i * ss0 + off[0]));
  }
}

// out[..., j] = x[..., index[..., j]]; `ix` runs over index's shape with (index, out, x) strides, x's last
// stride being 0 (its row base), `xl` the real one.
template <typename T>
__global__ void gather_last_kernel(const T* x, int64_t xl, int64_t bound, const void* index, bool index64, T* out,
                                   Indexer<3> ix, int64_t n) {
  for (int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; l < n;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[3];
    ix.offsets(l, off);
    const int64_t j = load_index(index, index64, off[0]);
    DSV4_DEVICE_ASSERT(j >= 0 && j < bound);
    out[off[1]] = x[off[2] + j * xl];
  }
}

// acc[..., index[..., j]] += src[..., j]; `ix` over index's shape with (index, src, acc) strides, acc's last
// stride 0 and `al` the real one.
template <typename T>
__global__ void scatter_add_last_kernel(const T* src, const void* index, bool index64, float* acc, int64_t al,
                                        int64_t bound, Indexer<3> ix, int64_t n) {
  for (int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; l < n;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[3];
    ix.offsets(l, off);
    const int64_t j = load_index(index, index64, off[0]);
    DSV4_DEVICE_ASSERT(j >= 0 && j < bound);
    atomicAdd(acc + off[2] + j * al, load_f32(src, off[1]));
  }
}

Shape tail_shape(const Shape& s) { return detail::drop_dim(s, 0); }

// Runs `accumulate(float* acc, const Shape& acc_strides)` on an FP32 view of `out`: out itself when F32,
// otherwise an FP32 copy that is converted back afterwards.
template <typename F>
void with_f32_accumulator(Tensor& out, F&& accumulate) {
  if (out.dtype() == DType::F32) {
    accumulate(static_cast<float*>(out.raw_data()), out.strides());
    return;
  }
  Tensor acc = Tensor::empty(out.shape(), DType::F32, out.device());
  convert(out, acc);
  accumulate(static_cast<float*>(acc.raw_data()), acc.strides());
  convert(acc, out);
}

}  // namespace

void index_select(const Tensor& x, const Tensor& index, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const int64_t n = out.numel();
  if (n == 0) return;
  const detail::RawView xv = detail::raw_view(x), ov = detail::raw_view(out);
  const Shape rest_shape = tail_shape(ov.shape);
  const int64_t rest = rest_shape.numel();
  const int64_t total = ov.shape.numel();
  const Indexer<2> ix = make_indexer<2>(rest_shape, {tail_shape(xv.strides), tail_shape(ov.strides)});
  const cudaStream_t stream = detail::stream_of(out);
  detail::dispatch_bytes(ov.elem_bytes, "index_select", [&](auto tag) {
    using T = typename decltype(tag)::type;
    index_select_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(xv.data), xv.strides[0], x.size(0), index.raw_data(), index.dtype() == DType::I64,
        index.stride(0), static_cast<T*>(ov.data), ov.strides[0], ix, rest, total);
  });
  CUDA_CHECK_LAUNCH();
}

void index_add(const Tensor& src, const Tensor& index, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const int64_t n = src.numel();
  if (n == 0) return;
  const Shape rest_shape = tail_shape(src.shape());
  const int64_t rest = rest_shape.numel();
  const cudaStream_t stream = detail::stream_of(out);
  with_f32_accumulator(out, [&](float* acc, const Shape& acc_strides) {
    const Indexer<2> ix = make_indexer<2>(rest_shape, {tail_shape(src.strides()), tail_shape(acc_strides)});
    detail::dispatch_float(src.dtype(), "index_add", [&](auto tag) {
      using T = typename decltype(tag)::type;
      index_add_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const T*>(src.raw_data()), src.stride(0), index.raw_data(), index.dtype() == DType::I64,
          index.stride(0), acc, acc_strides[0], out.size(0), ix, rest, n);
    });
    CUDA_CHECK_LAUNCH();
  });
}

void gather_last(const Tensor& x, const Tensor& index, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const int64_t n = out.numel();
  if (n == 0) return;
  const int last = x.ndim() - 1;
  Shape x_rows = index.shape();  // x's strides on index's shape, last stride 0
  for (int d = 0; d < last; ++d) x_rows[d] = x.stride(d);
  x_rows[last] = 0;
  const Indexer<3> ix = make_indexer<3>(index.shape(), {index.strides(), out.strides(), x_rows});
  const cudaStream_t stream = detail::stream_of(out);
  detail::dispatch_bytes(dtype_bits(out.dtype()) / 8, "gather_last", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gather_last_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const T*>(x.raw_data()),
                                                                   x.stride(last), x.size(last), index.raw_data(),
                                                                   index.dtype() == DType::I64,
                                                                   static_cast<T*>(out.raw_data()), ix, n);
  });
  CUDA_CHECK_LAUNCH();
}

void scatter_add_last(const Tensor& src, const Tensor& index, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const int64_t n = index.numel();
  if (n == 0) return;
  const int last = out.ndim() - 1;
  const cudaStream_t stream = detail::stream_of(out);
  with_f32_accumulator(out, [&](float* acc, const Shape& acc_strides) {
    Shape acc_rows = index.shape();
    for (int d = 0; d < last; ++d) acc_rows[d] = acc_strides[d];
    acc_rows[last] = 0;
    const Indexer<3> ix = make_indexer<3>(index.shape(), {index.strides(), src.strides(), acc_rows});
    detail::dispatch_float(src.dtype(), "scatter_add_last", [&](auto tag) {
      using T = typename decltype(tag)::type;
      scatter_add_last_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const T*>(src.raw_data()), index.raw_data(), index.dtype() == DType::I64, acc,
          acc_strides[last], out.size(last), ix, n);
    });
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace dsv4::cuda
