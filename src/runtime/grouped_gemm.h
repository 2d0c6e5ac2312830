// Grouped GEMMs of the routed experts: rows sorted by expert (model_ops.h's moe_sort_slots / moe_permute order),
// one weight matrix per expert, a variable number of rows per expert (zero allowed). CPU reference twin:
// src/runtime/cpu_grouped_gemm.cpp (the CPU BLAS GEMM per group, FP32); CUDA twin: kernels/ops_grouped_gemm.cu
// (cuBLAS). Frontends (src/runtime/grouped_gemm.cpp) validate, allocate and dispatch on the tensors' device, like
// runtime/fp8.h and runtime/model_ops.h.
//
// Legend: T rows (routed token slots), E experts, N output features, K input features (W_e maps K -> N, the
// checkpoint layout y = x W^T: expert w1 / w3 [I, D] give N = I, K = D; w2 [D, I] gives N = D, K = I).
// offsets: host int64, E + 1 entries, offsets[0] = 0, non-decreasing, offsets[E] = T; expert e owns rows
// [offsets[e], offsets[e + 1]) (model_ops.h's MoeSlots::offsets, copied to the host).
//
//   forward  y [T, N]     y_e  = x_e · W_eᵀ            (every row written)
//   dgrad    dx [T, K]    dx_e = dy_e · W_e            (every row written)
//   wgrad    dW [E, N, K] dW_e = dy_eᵀ · x_e  (accumulate = false: overwritten, an expert without rows gets zeros)
//                         dW_e += dy_eᵀ · x_e (accumulate = true: an expert without rows is left untouched)
//
// Dtypes: x / dy / W are all F32 or all BF16, the outputs F32; contiguous; one device. The products accumulate in
// FP32: the CPU widens BF16 exactly to F32 and runs FP32 GEMMs; CUDA runs cuBLAS with CUBLAS_COMPUTE_32F (BF16
// tensor cores, FP32 accumulation, reduced-precision split-K reductions disallowed; F32 inputs without TF32). The
// backends agree to FP32 accumulation-order rounding (tests/gpu/test_gpu_grouped_gemm.cpp states the bound).
//
// Block-scaled FP8 forward (runtime/fp8.h): x quantised 1x128 over [T, K] (a row's scales depend on that row
// only, so the row ranges of the experts are valid Rows1x128 operands), each expert's weight quantised in
// 128x128 blocks. The GEMM runs runtime/fp8.h's fp8_gemm on each non-empty expert (CPU reference on the CPU,
// cuBLASLt or the fallback kernel on CUDA). cuBLASLt needs M % 4 == 0; with Fp8GemmImpl::Auto on CUDA an expert of
// m rows (m % 4 != 0) runs as a window of pad4(m) consecutive rows of x that contains its own (borrowing up to 3
// rows of a neighbouring expert, all valid quantised rows), written to a scratch from which its m rows are copied.
// Rows are independent in the reference, so the result is the same per-row definition. (Measured on an H100:
// sending the 1..3 tail rows to the CUDA-core fallback kernel instead made the proxy-2b expert GEMM 25x slower.)
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/fp8.h"
#include "runtime/tensor.h"

namespace dsv4 {

// CUDA implementation of the BF16 / F32 grouped GEMMs (the CPU always runs its reference):
//   Grouped  one cublasGemmGroupedBatchedEx call over the non-empty experts (device pointer arrays); F32 inputs
//            only (cuBLAS has no BF16 x BF16 -> F32 grouped GEMM: CUBLAS_STATUS_NOT_SUPPORTED on an H100);
//   Loop     one cublasGemmEx per non-empty expert;
//   Auto     Loop (the only implementation for BF16 inputs).
enum class GroupedGemmImpl : uint8_t { Auto, Grouped, Loop };
const char* grouped_gemm_impl_name(GroupedGemmImpl impl);

// Checks offsets against E and T (throws dsv4::Error naming `op`).
void check_group_offsets(const std::vector<int64_t>& offsets, int64_t E, int64_t T, const char* op);

// ---- frontends ---------------------------------------------------------------------------------------------------
void grouped_gemm_forward(const Tensor& x_TK, const Tensor& W_ENK, const std::vector<int64_t>& offsets, Tensor& y_TN,
                          GroupedGemmImpl impl = GroupedGemmImpl::Auto);
void grouped_gemm_dgrad(const Tensor& dy_TN, const Tensor& W_ENK, const std::vector<int64_t>& offsets, Tensor& dx_TK,
                        GroupedGemmImpl impl = GroupedGemmImpl::Auto);
void grouped_gemm_wgrad(const Tensor& dy_TN, const Tensor& x_TK, const std::vector<int64_t>& offsets, Tensor& dW_ENK,
                        bool accumulate, GroupedGemmImpl impl = GroupedGemmImpl::Auto);
// Allocating forms (F32 outputs on the inputs' device; wgrad's is overwritten).
Tensor grouped_matmul(const Tensor& x_TK, const Tensor& W_ENK, const std::vector<int64_t>& offsets,
                      GroupedGemmImpl impl = GroupedGemmImpl::Auto);
Tensor grouped_matmul_dgrad(const Tensor& dy_TN, const Tensor& W_ENK, const std::vector<int64_t>& offsets,
                            GroupedGemmImpl impl = GroupedGemmImpl::Auto);
Tensor grouped_matmul_wgrad(const Tensor& dy_TN, const Tensor& x_TK, const std::vector<int64_t>& offsets,
                            GroupedGemmImpl impl = GroupedGemmImpl::Auto);

// ---- block-scaled FP8 forward ----------------------------------------------------------------------------------------
// Per-expert 128x128-block quantised weights: q F8_E4M3 [E, N, K], scale F32 / F8_E8M0 [E, ceil(N/128), ceil(K/128)].
struct Fp8ExpertWeights {
  Tensor q;
  Tensor scale;
  int64_t experts() const { return q.size(0); }
  Fp8Tensor expert(int64_t e) const { return {q.select(0, e), scale.select(0, e), Fp8Layout::Blocks128x128}; }
};
// W_ENK: F32 or BF16 [E, N, K] (BF16 on CUDA only, as fp8_quantize_blocks); expert e gets exactly
// fp8_quantize_blocks(W_ENK[e]).
Fp8ExpertWeights fp8_quantize_expert_blocks(const Tensor& W_ENK, ScaleFormat fmt);
// x_TK: fp8_quantize_rows of the expert-sorted rows; y_TN F32 [T, N] contiguous (every row written).
void grouped_fp8_gemm_forward(const Fp8Tensor& x_TK, const Fp8ExpertWeights& W_ENK, const std::vector<int64_t>& offsets,
                              Tensor& y_TN, Fp8GemmImpl impl = Fp8GemmImpl::Auto);
Tensor grouped_fp8_matmul(const Fp8Tensor& x_TK, const Fp8ExpertWeights& W_ENK, const std::vector<int64_t>& offsets,
                          Fp8GemmImpl impl = Fp8GemmImpl::Auto);

// ---- backends: validated arguments (contiguous, shapes as above, out F32; CPU inputs F32) --------------------------
#define DSV4_GROUPED_BACKEND_OPS                                                                                     \
  void grouped_gemm_forward(const Tensor& x_TK, const Tensor& W_ENK, const std::vector<int64_t>& offsets,             \
                            GroupedGemmImpl impl, Tensor& y_TN);                                                      \
  void grouped_gemm_dgrad(const Tensor& dy_TN, const Tensor& W_ENK, const std::vector<int64_t>& offsets,              \
                          GroupedGemmImpl impl, Tensor& dx_TK);                                                       \
  void grouped_gemm_wgrad(const Tensor& dy_TN, const Tensor& x_TK, const std::vector<int64_t>& offsets,               \
                          bool accumulate, GroupedGemmImpl impl, Tensor& dW_ENK);
namespace cpu {
DSV4_GROUPED_BACKEND_OPS
}
namespace cuda {
DSV4_GROUPED_BACKEND_OPS
}
#undef DSV4_GROUPED_BACKEND_OPS

}  // namespace dsv4
