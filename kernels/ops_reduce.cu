// Reductions over one dim, softmax and log_softmax over the last dim (backend_ops.def).
// FP32 accumulation. Rows longer than 32 use one block per output row with a fixed-shape shared-memory
// tree reduction, shorter rows one thread per row with a sequential loop: both are deterministic (the
// result depends only on the shape, never on scheduling). NaN propagates through max/min.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cmath>

#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

using detail::Indexer;
using detail::load_f32;
using detail::make_indexer;
using detail::store_f32;

constexpr int64_t kThreadPerRowMax = 32;      // rows up to this length: one thread per row
constexpr int64_t kMaxRowBlocks = 1 << 20;    // grid-stride over rows past this

struct Combine {
  ReduceOp op;
  __device__ __forceinline__ float operator()(float a, float b) const {
    switch (op) {
      case ReduceOp::Max: return (a != a || a > b) ? a : b;
      case ReduceOp::Min: return (a != a || a < b) ? a : b;
      default: return __fadd_rn(a, b);
    }
  }
};

__device__ __forceinline__ float reduce_init(ReduceOp op) {
  switch (op) {
    case ReduceOp::Max: return -INFINITY;
    case ReduceOp::Min: return INFINITY;
    default: return 0.0f;
  }
}

__device__ __forceinline__ float reduce_finish(ReduceOp op, float acc, int64_t r) {
  return op == ReduceOp::Mean ? __fdiv_rn(acc, static_cast<float>(r)) : acc;
}

template <typename T>
__global__ void reduce_thread_kernel(ReduceOp op, const T* x, T* out, Indexer<2> ix, int64_t nout, int64_t r,
                                     int64_t rs) {
  const Combine combine{op};
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < nout;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t off[2];
    ix.offsets(o, off);
    float acc = reduce_init(op);
    for (int64_t i = 0; i < r; ++i) acc = combine(acc, load_f32(x, off[0] + i * rs));
    store_f32(out, off[1], reduce_finish(op, acc, r));
  }
}

template <typename T>
__global__ void reduce_block_kernel(ReduceOp op, const T* x, T* out, Indexer<2> ix, int64_t nout, int64_t r,
                                    int64_t rs) {
  extern __shared__ float smem[];
  const Combine combine{op};
  for (int64_t o = blockIdx.x; o < nout; o += gridDim.x) {
    int64_t off[2];
    ix.offsets(o, off);
    float acc = reduce_init(op);
    for (int64_t i = threadIdx.x; i < r; i += blockDim.x) acc = combine(acc, load_f32(x, off[0] + i * rs));
    acc = detail::block_reduce(acc, smem, combine);
    if (threadIdx.x == 0) store_f32(out, off[1], reduce_finish(op, acc, r));
  }
}

// One block per row of the last dim: max, sum of exp(x - max), then the normalised values.
template <typename T>
__global__ void softmax_kernel(bool log_softmax, const T* x, T* out, Indexer<2> ix, int64_t rows, int64_t len,
                               int64_t xs, int64_t os) {
  extern __shared__ float smem[];
  const Combine max_op{ReduceOp::Max}, add_op{ReduceOp::Sum};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t off[2];
    ix.offsets(row, off);
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) m = max_op(m, load_f32(x, off[0] + i * xs));
    m = detail::block_reduce(m, smem, max_op);
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) s += expf(load_f32(x, off[0] + i * xs) - m);
    s = detail::block_reduce(s, smem, add_op);
    const float lse = m + logf(s);  // log_softmax = x - (max + log(sum)), as on the CPU
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const float v = load_f32(x, off[0] + i * xs);
      store_f32(out, off[1] + i * os, log_softmax ? v - lse : __fdiv_rn(expf(v - m), s));
    }
  }
}

void launch_softmax(bool log_softmax, const Tensor& x, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const int last = x.ndim() - 1;
  const int64_t len = x.size(last);
  const Shape outer = detail::drop_dim(x.shape(), last);
  const int64_t rows = outer.numel();
  if (rows == 0 || len == 0) return;
  const Indexer<2> ix =
      make_indexer<2>(outer, {detail::drop_dim(x.strides(), last), detail::drop_dim(out.strides(), last)});
  const int threads = detail::pow2_threads(len, 32, 256);
  const auto blocks = static_cast<unsigned>(std::min(rows, kMaxRowBlocks));
  const size_t smem = static_cast<size_t>(threads) * sizeof(float);
  const cudaStream_t stream = detail::stream_of(out);
  detail::dispatch_float(out.dtype(), log_softmax ? "log_softmax" : "softmax", [&](auto tag) {
    using T = typename decltype(tag)::type;
    softmax_kernel<T><<<blocks, threads, smem, stream>>>(log_softmax, static_cast<const T*>(x.raw_data()),
                                                         static_cast<T*>(out.raw_data()), ix, rows, len,
                                                         x.stride(last), out.stride(last));
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void reduce(ReduceOp op, const Tensor& x, int dim, Tensor& out) {
  detail::DeviceGuard guard(out.device().index);
  const Shape outer = detail::drop_dim(x.shape(), dim);
  const int64_t nout = outer.numel();
  if (nout == 0) return;
  const int64_t r = x.size(dim);
  if (r == 0) {  // the frontend allows this for sum only
    fill(out, 0.0);
    return;
  }
  const Indexer<2> ix =
      make_indexer<2>(outer, {detail::drop_dim(x.strides(), dim), detail::drop_dim(out.strides(), dim)});
  const int64_t rs = x.stride(dim);
  const cudaStream_t stream = detail::stream_of(out);
  detail::dispatch_float(out.dtype(), "reduce", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* xp = static_cast<const T*>(x.raw_data());
    auto* op_ = static_cast<T*>(out.raw_data());
    if (r <= kThreadPerRowMax) {
      reduce_thread_kernel<T><<<detail::blocks_for(nout), detail::kThreads, 0, stream>>>(op, xp, op_, ix, nout, r, rs);
    } else {
      const int threads = detail::pow2_threads(r, 32, 256);
      const auto blocks = static_cast<unsigned>(std::min(nout, kMaxRowBlocks));
      reduce_block_kernel<T><<<blocks, threads, static_cast<size_t>(threads) * sizeof(float), stream>>>(
          op, xp, op_, ix, nout, r, rs);
    }
  });
  CUDA_CHECK_LAUNCH();
}

void softmax(const Tensor& x, Tensor& out) { launch_softmax(false, x, out); }
void log_softmax(const Tensor& x, Tensor& out) { launch_softmax(true, x, out); }

}  // namespace dsv4::cuda
