// Pieces shared by the FP32 (kernels/attn_sparse.cu) and BF16 tensor-core (kernels/attn_sparse_tc.cu) sparse
// attention backwards. Internal to kernels/.
#pragma once

#include <cstdint>

namespace dsv4::cuda {
namespace {

// dsink[h] -= sum_t exp(sink_h - lse_th) D_th, one thread per head, t ascending (the reference's order).
// D [T, H] = rowsum(do * o), written by the query-major kernel of either backward.
__global__ void sparse_bwd_dsink_kernel(const float* __restrict__ sink, const float* __restrict__ lse,
                                        const float* __restrict__ Dws, int64_t T, int H, float* __restrict__ dsink) {
  const int h = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (h >= H) return;
  float v = dsink[h];
  const float s = sink[h];
  for (int64_t t = 0; t < T; ++t) v -= expf(s - lse[t * H + h]) * Dws[t * H + h];
  dsink[h] = v;
}

}  // namespace
}  // namespace dsv4::cuda
