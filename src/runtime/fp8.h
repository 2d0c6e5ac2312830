// Block-scaled FP8 (E4M3) tensors and GEMMs: the DeepSeek-V3 training recipe (anchors-training-systems.md §9)
// with CPU reference twins (src/runtime/cpu_fp8.cpp) of the CUDA kernels (kernels/ops_fp8_*.cu). The frontends
// here validate and dispatch on the device, like runtime/ops.h.
//
// Layouts (a row-major matrix x [R, C]; KB = ceil(C / 128)):
//   Rows1x128      activations: one scale per row and 128 consecutive columns, scale [R, KB];
//                  x[r, c] = e4m3(q[r, c]) * s[r, c / 128].
//   Blocks128x128  weights: one scale per 128x128 block, scale [ceil(R / 128), KB];
//                  x[r, c] = e4m3(q[r, c]) * s[r / 128, c / 128].
// Scales are F8_E8M0 (power of two) or F32. Codes are F8_E4M3, the scale layouts above are the natural
// row-major ones on both devices (the cuBLASLt path re-lays them out into a scratch buffer per call).
//
// Quantisation (the rule of quant.h's weight quantiser, shared through fp8_block_scale below): per group,
// amax = max |x|; E8M0: s = 2^ceil(log2(amax / 448)) (e8m0_ceil_from_f32), F32: s = amax / 448; an all-zero group
// gets s = 1; q = e4m3(x / s) with dtype.h's saturating round-to-nearest-even and IEEE division. Non-finite inputs
// are not checked (a NaN/Inf amax gives a NaN/Inf scale).
//   fp8_quantize_rows     x [M, K] -> Rows1x128 q [M, K]
//   fp8_quantize_rows_t   x [M, K] -> Rows1x128 of x^T: q [K, M], scale [K, ceil(M / 128)] (groups of 128 along
//                         M: the operand layout of the weight-gradient GEMM dW = dy^T x, where K = tokens);
//                         bit-identical to fp8_quantize_rows(x^T).
//   fp8_quantize_blocks   w [N, K] -> Blocks128x128 (same codes and scales as quant.h's quantize_fp8_block,
//                         which calls it).
//
// GEMM: c [M, N] (F32) = a [M, K] · b [N, K]^T with a in Rows1x128 and b in either layout ("TN", both
// K-major, as Hopper's FP8 tensor cores want). Exact definition (the CPU reference; the CUDA fallback kernel
// computes the same bits):
//   for kb in 0 .. KB-1 (ascending):
//     p      = sum over k in block kb of e4m3(a[m, k]) * e4m3(b[n, k])   -- exact (computed in FP64: every
//              product of two E4M3 values is a multiple of 2^-18 below 2^17.7, so 128 of them need < 43
//              significant bits), in any order
//     p32    = float(p)                                                  -- one round-to-nearest-even
//     acc    = acc + p32 * (sa[m, kb] * sb[n or n / 128, kb])            -- FP32, three roundings, no FMA
//   c[m, n] = acc (starting from +0). With E8M0 scales the scale products are exact powers of two.
// This is DeepSeek's promotion scheme (FP32 accumulation per 128-wide K block, scales applied on promotion)
// with the in-block sum made exact, so the reference does not depend on an accumulation order inside a block.
// cuBLASLt's block-scaled kernels accumulate inside the tensor cores in their own order, so they match the
// reference to FP32 rounding of the accumulation (see tests/gpu/test_gpu_fp8.cpp for the bound used).
// NaN codes (0x7F / 0xFF) propagate as NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace dsv4 {

inline constexpr int64_t kFp8Group = 128;  // 1x128 activation groups and 128x128 weight blocks

enum class ScaleFormat : uint8_t { E8M0, F32 };  // of FP8 scales
enum class Fp8Layout : uint8_t { Rows1x128, Blocks128x128 };
// GEMM implementation on CUDA (the CPU always runs the reference): Auto = cuBLASLt's block-scaled kernels when
// they accept the problem, else the fallback kernel; Fallback = the CUDA-core kernel (bit-exact with the CPU);
// CublasLt = cuBLASLt or an error.
enum class Fp8GemmImpl : uint8_t { Auto, Fallback, CublasLt };

// One block-scaled FP8 matrix.
struct Fp8Tensor {
  Tensor q;      // F8_E4M3 [R, C]
  Tensor scale;  // F8_E8M0 or F32, fp8_scale_shape(R, C, layout)
  Fp8Layout layout = Fp8Layout::Rows1x128;
  int64_t rows() const { return q.size(0); }
  int64_t cols() const { return q.size(1); }
  ScaleFormat scale_format() const { return scale.dtype() == DType::F32 ? ScaleFormat::F32 : ScaleFormat::E8M0; }
};

inline int64_t fp8_blocks(int64_t n) { return (n + kFp8Group - 1) / kFp8Group; }
// Rows [begin, end) of a Rows1x128 tensor (a row's scales depend on that row only, so this is the quantisation of
// those rows): views of its codes and scales.
inline Fp8Tensor fp8_rows_slice(const Fp8Tensor& t, int64_t begin, int64_t end) {
  return {t.q.slice(0, begin, end), t.scale.slice(0, begin, end), Fp8Layout::Rows1x128};
}
inline Shape fp8_scale_shape(int64_t rows, int64_t cols, Fp8Layout layout) {
  return Shape{layout == Fp8Layout::Rows1x128 ? rows : fp8_blocks(rows), fp8_blocks(cols)};
}

// The scale of a group with the given amax (>= 0), as the float used for division and its stored code
// (E8M0 code, or the float itself for F32). Shared by both backends (host and device).
DSV4_HD float fp8_block_scale(float amax, ScaleFormat fmt, uint8_t* e8m0_code) {
  if (fmt == ScaleFormat::E8M0) {
    const uint8_t code = amax > 0.0f ? e8m0_ceil_from_f32(amax / kE4M3Max) : uint8_t{127};
    *e8m0_code = code;
    return e8m0_to_f32(code);
  }
  *e8m0_code = 0;
  return amax > 0.0f ? amax / kE4M3Max : 1.0f;
}

// One FP4 code with its 1x32 scale code k, re-expressed under the FP8 block scale code S (fp4_to_fp8_blocks):
// e4m3(e2m1 * 2^(k - S)), the power of two applied exactly (ldexpf; values below 2^-149 flush, and they round
// to E4M3 zero anyway).
DSV4_HD uint8_t fp4_code_to_e4m3(uint8_t e2m1_code, int k, int S) {
  return f32_to_e4m3(ldexpf(e2m1_to_f32(e2m1_code), k - S));
}

// ---- frontends (validate, allocate, dispatch on the input's device) ----------------------------------------
// x: F32 (CPU and CUDA) or BF16 (CUDA), 2-D, any strides.
Fp8Tensor fp8_quantize_rows(const Tensor& x, ScaleFormat fmt);
Fp8Tensor fp8_quantize_rows_t(const Tensor& x, ScaleFormat fmt);
Fp8Tensor fp8_quantize_blocks(const Tensor& w, ScaleFormat fmt);
Tensor fp8_dequantize(const Fp8Tensor& t);  // F32 [R, C]
// c [M, N] F32, contiguous, on the operands' device (overwritten).
void fp8_gemm(const Fp8Tensor& a, const Fp8Tensor& b, Tensor& c, Fp8GemmImpl impl = Fp8GemmImpl::Auto);
Tensor fp8_matmul(const Fp8Tensor& a, const Fp8Tensor& b, Fp8GemmImpl impl = Fp8GemmImpl::Auto);

// Release FP4 weights for FP8 compute. packed: F4_E2M1 [R, C] (C even, two codes per byte, low nibble = even
// column); scale: F8_E8M0 [R, ceil(C / 32)] (1x32 groups). Result: Blocks128x128 with E8M0 scales, per block
// S = max(kmax - 6, 0) (kmax the largest FP4 scale code touching the block), q8 = e4m3(e2m1 * 2^(k - S)):
// lossless whenever every scale code k of a block is >= kmax - 14 (model/quant.h has the argument). A scale code
// 0xFF (NaN) is an error naming `name` and the scale's position.
Fp8Tensor fp4_to_fp8_blocks(const Tensor& packed, const Tensor& scale, const std::string& name = "weight");
// The transpose of a Blocks128x128 tensor (codes [C, R], scales transposed: the same 128x128 blocks), e.g. the
// weight operand of the data-gradient GEMM dx = dy W as a TN problem.
Fp8Tensor fp8_transpose_blocks(const Fp8Tensor& t);

// ---- backends: one function per idea, CPU reference and CUDA twin with the same signature ------------------
// Arguments are validated by the frontends: q / scale contiguous with the shapes above, scale's dtype selects
// the format; c contiguous F32.
#define DSV4_FP8_BACKEND_OPS                                                                                   \
  void fp8_quantize_rows(const Tensor& x, Tensor& q, Tensor& scale);                                           \
  void fp8_quantize_rows_t(const Tensor& x, Tensor& q, Tensor& scale);                                         \
  void fp8_quantize_blocks(const Tensor& x, Tensor& q, Tensor& scale);                                         \
  void fp8_dequantize(const Tensor& q, const Tensor& scale, Fp8Layout layout, Tensor& out);                    \
  void fp8_gemm(const Tensor& a_q, const Tensor& a_scale, const Tensor& b_q, const Tensor& b_scale,            \
                Fp8Layout b_layout, Fp8GemmImpl impl, Tensor& c);                                              \
  /* returns -1, or the flat index of the first scale with code 0xFF (then q / s are unspecified) */           \
  int64_t fp4_to_fp8_blocks(const Tensor& packed, const Tensor& scale, Tensor& q, Tensor& s);                  \
  void fp8_transpose_blocks(const Tensor& q, const Tensor& scale, Tensor& qt, Tensor& st);
namespace cpu {
DSV4_FP8_BACKEND_OPS
}
namespace cuda {
DSV4_FP8_BACKEND_OPS
// Whether cuBLASLt's block-scaled path is used for this problem (shape / alignment gate plus cuBLASLt's own
// heuristic); false without a GPU-capable build.
bool fp8_gemm_cublaslt_accepts(const Tensor& a_q, const Tensor& b_q, Fp8Layout b_layout, const Tensor& c);
}  // namespace cuda
#undef DSV4_FP8_BACKEND_OPS

}  // namespace dsv4
