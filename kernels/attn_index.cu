// Device-side builders of the sparse-attention candidate lists (host API: kernels/attention_kernels.h), the CUDA
// twins of build_sparse_candidates / build_key_major_positions (kernels/attention_host.cpp) for lists whose
// compressed ids already live on the device (CSA's top-k): the same outputs, bit for bit, without a round trip
// through the host. The candidate offsets come from the host (they follow from the window bounds and the top-k
// counts, both known there without the ids).
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cub/cub.cuh>

#include <algorithm>

#include "kernels/attention_kernels.h"
#include "kernels/ops_common.cuh"

namespace dsv4::cuda {
namespace {

constexpr int kListThreads = 128;

// One block per query t: cand_ids[cand_offsets[t] + j] = win_begin[t] + j for the window, then n_raw + the query's
// compressed ids in their given order.
__global__ void __launch_bounds__(kListThreads)
    fill_candidates_kernel(const int32_t* __restrict__ win_begin, const int32_t* __restrict__ cand_offsets,
                           const int32_t* __restrict__ comp_offsets, const int32_t* __restrict__ comp_ids,
                           int32_t n_raw, int32_t* __restrict__ cand_ids) {
  const int64_t t = blockIdx.x;
  const int32_t o = cand_offsets[t], c0 = comp_offsets[t], nc = comp_offsets[t + 1] - c0;
  const int32_t nw = cand_offsets[t + 1] - o - nc, wb = win_begin[t];
  for (int32_t j = threadIdx.x; j < nw; j += blockDim.x) cand_ids[o + j] = wb + j;
  for (int32_t j = threadIdx.x; j < nc; j += blockDim.x) cand_ids[o + nw + j] = n_raw + comp_ids[c0 + j];
}

__global__ void iota_kernel(int32_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<int32_t>(i);
}

// key_offsets[r] = number of sorted row ids below r, r in [0, n_rows].
__global__ void row_offsets_kernel(const int32_t* __restrict__ sorted_rows, int64_t nnz, int64_t n_rows,
                                   int32_t* __restrict__ key_offsets) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r <= n_rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = nnz;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (sorted_rows[mid] < r) lo = mid + 1;
      else hi = mid;
    }
    key_offsets[r] = static_cast<int32_t>(lo);
  }
}

int end_bit_for(int64_t n_rows) {
  int bits = 1;
  while (bits < 31 && (int64_t{1} << bits) < n_rows) ++bits;
  return bits;
}

size_t sort_temp_bytes(int64_t nnz, int64_t n_rows) {
  size_t bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), static_cast<int>(nnz), 0,
                                             end_bit_for(n_rows)));
  return bytes;
}

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

}  // namespace

void build_sparse_candidates_device(const int32_t* win_begin, const int32_t* cand_offsets,
                                    const int32_t* comp_offsets, const int32_t* comp_ids, int64_t T, int64_t n_raw,
                                    int32_t* cand_ids, void* stream) {
  if (T == 0) return;
  DSV4_CHECK(T <= 0x7FFFFFFF && n_raw <= 0x7FFFFFFF, "build_sparse_candidates_device: T = {} / n_raw = {} too large",
             T, n_raw);
  fill_candidates_kernel<<<static_cast<unsigned>(T), kListThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      win_begin, cand_offsets, comp_offsets, comp_ids, static_cast<int32_t>(n_raw), cand_ids);
  CUDA_CHECK_LAUNCH();
}

size_t key_major_positions_device_workspace(int64_t nnz, int64_t n_rows) {
  if (nnz == 0) return 0;
  return 2 * align256(static_cast<size_t>(nnz) * sizeof(int32_t)) + align256(sort_temp_bytes(nnz, n_rows));
}

void build_key_major_positions_device(const int32_t* cand_ids, int64_t nnz, int64_t n_rows, int32_t* key_offsets,
                                      int32_t* key_positions, void* workspace, size_t workspace_bytes,
                                      void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  DSV4_CHECK(nnz <= 0x7FFFFFFF, "build_key_major_positions_device: {} candidates (at most 2^31 - 1)", nnz);
  DSV4_CHECK(workspace_bytes >= key_major_positions_device_workspace(nnz, n_rows),
             "build_key_major_positions_device: workspace of {} bytes, needs {}", workspace_bytes,
             key_major_positions_device_workspace(nnz, n_rows));
  if (nnz == 0) {
    CUDA_CHECK(cudaMemsetAsync(key_offsets, 0, static_cast<size_t>(n_rows + 1) * sizeof(int32_t), st));
    return;
  }
  char* ws = static_cast<char*>(workspace);
  int32_t* sorted_rows = reinterpret_cast<int32_t*>(ws);
  int32_t* positions_in = reinterpret_cast<int32_t*>(ws + align256(static_cast<size_t>(nnz) * sizeof(int32_t)));
  void* temp = ws + 2 * align256(static_cast<size_t>(nnz) * sizeof(int32_t));
  size_t temp_bytes = sort_temp_bytes(nnz, n_rows);
  iota_kernel<<<detail::blocks_for(nnz), detail::kThreads, 0, st>>>(positions_in, nnz);
  CUDA_CHECK_LAUNCH();
  // LSD radix sort is stable: the positions of one row keep their ascending input order, as the counting sort does.
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, cand_ids, sorted_rows, positions_in, key_positions,
                                             static_cast<int>(nnz), 0, end_bit_for(n_rows), st));
  row_offsets_kernel<<<detail::blocks_for(n_rows + 1), detail::kThreads, 0, st>>>(sorted_rows, nnz, n_rows,
                                                                                  key_offsets);
  CUDA_CHECK_LAUNCH();
}

}  // namespace dsv4::cuda
