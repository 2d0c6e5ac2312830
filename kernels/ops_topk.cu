// topk over the last dim (backend_ops.def): the k largest entries per row in descending order, ties to
// the lower index, NaN larger than every number (+0 and -0 tie).
//
// One block per row sorts 64-bit keys with a bitonic network: the high 32 bits order the value (sign-
// flipped float bits, every NaN mapped to the maximum, -0 folded onto +0), the low 32 bits hold
// ~index so that equal values come out lowest index first. Keys are unique, so the order is total and
// the result is deterministic. Rows padded to a power of two of up to 4096 entries sort in shared
// memory; longer rows sort in a global scratch buffer (one slice per resident block; correct but slow,
// a radix select is the upgrade path when big rows matter). Values are copied bit for bit from x.
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <climits>

#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

using detail::Indexer;
using detail::load_f32;
using detail::make_indexer;

constexpr int64_t kSharedSortMax = 4096;                   // padded row length sorted in shared memory
constexpr int64_t kScratchBytesMax = int64_t{256} << 20;   // global scratch bound for longer rows

__device__ __forceinline__ uint64_t topk_key(float v, int64_t i) {
  uint32_t ordered;
  if (v != v) {
    ordered = 0xFFFFFFFFu;
  } else {
    const uint32_t u = f32_bits(v == 0.0f ? 0.0f : v);
    ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(i));
}

// Sorts keys[0, p) in descending order (p a power of two); all threads of the block take part.
__device__ void bitonic_sort_desc(uint64_t* keys, int64_t p) {
  for (int64_t size = 2; size <= p; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t i = threadIdx.x; i < p; i += blockDim.x) {
        const int64_t j = i ^ stride;
        if (j > i) {
          const uint64_t a = keys[i], b = keys[j];
          const bool descending = (i & size) == 0;
          if (descending ? a < b : a > b) {
            keys[i] = b;
            keys[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// `ix` runs over the row (outer) dims with (x, values, indices) strides. `scratch` is null for the
// shared-memory path, else holds gridDim.x slices of p keys.
template <typename T>
__global__ void topk_kernel(const T* x, int64_t xl, T* values, int64_t vl, int64_t* indices, int64_t il,
                            Indexer<3> ix, int64_t rows, int64_t len, int64_t k, int64_t p, uint64_t* scratch) {
  extern __shared__ uint64_t smem_keys[];
  uint64_t* keys = scratch ? scratch + static_cast<int64_t>(blockIdx.x) * p : smem_keys;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t off[3];
    ix.offsets(row, off);
    for (int64_t i = threadIdx.x; i < p; i += blockDim.x)
      keys[i] = i < len ? topk_key(load_f32(x, off[0] + i * xl), i) : 0;  // padding sorts last
    __syncthreads();
    bitonic_sort_desc(keys, p);
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const int64_t i = static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(keys[j]));
      values[off[1] + j * vl] = x[off[0] + i * xl];
      indices[off[2] + j * il] = i;
    }
    __syncthreads();  // keys are rewritten for the next row
  }
}

}  // namespace

void topk(const Tensor& x, int64_t k, Tensor& values, Tensor& indices) {
  detail::DeviceGuard guard(values.device().index);
  const int last = x.ndim() - 1;
  const int64_t len = x.size(last);
  const Shape outer = detail::drop_dim(x.shape(), last);
  const int64_t rows = outer.numel();
  if (rows == 0 || k == 0) return;
  DSV4_CHECK(len < INT64_C(0xFFFFFFFF), "cuda::topk: rows of {} entries are too long", len);
  int64_t p = 1;
  while (p < len) p <<= 1;
  const Indexer<3> ix = make_indexer<3>(outer, {detail::drop_dim(x.strides(), last),
                                                detail::drop_dim(values.strides(), last),
                                                detail::drop_dim(indices.strides(), last)});
  const int threads = detail::pow2_threads(p / 2, 32, 1024);
  const cudaStream_t stream = detail::stream_of(values);

  Tensor scratch;
  size_t smem = 0;
  int64_t blocks = std::min<int64_t>(rows, 1 << 20);
  if (p <= kSharedSortMax) {
    smem = static_cast<size_t>(p) * sizeof(uint64_t);
  } else {
    blocks = std::clamp<int64_t>(kScratchBytesMax / (p * 8), 1, std::min<int64_t>(rows, 1024));
    scratch = Tensor::empty({blocks, p}, DType::I64, values.device());
  }
  auto* scratch_keys = scratch.defined() ? static_cast<uint64_t*>(scratch.raw_data()) : nullptr;
  detail::dispatch_float(x.dtype(), "topk", [&](auto tag) {
    using T = typename decltype(tag)::type;
    topk_kernel<T><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
        static_cast<const T*>(x.raw_data()), x.stride(last), static_cast<T*>(values.raw_data()),
        values.stride(last), static_cast<int64_t*>(indices.raw_data()), indices.stride(last), ix, rows, len, k, p,
        scratch_keys);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace dsv4::cuda
