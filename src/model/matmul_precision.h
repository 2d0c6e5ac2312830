// Precision of the model's weight GEMMs in training (train.precision; shared/reference
// anchors-training-systems.md §9, the DeepSeek-V3 FP8 recipe):
//   fp32  F32 operands, F32 accumulation (the CPU reference; bit-identical to the plain GEMMs).
//   bf16  operands rounded to BF16, F32 accumulation and output (CPU: exact rounding, then the F32 GEMM;
//         CUDA: BF16 tensors into cuBLAS).
//   fp8   the three GEMMs of a Linear in block-scaled E4M3 (runtime/fp8.h) with F32 scales s = amax / 448:
//           Fprop  y  = x W^T:   x 1x128 (along I), W 128x128;
//           Dgrad  dx = dy W:    dy 1x128 (along O), W's blocks transposed (fp8_transpose_blocks);
//           Wgrad  dW = dy^T x:  dy and x 1x128 along the tokens (fp8_quantize_rows_t, the 128x1 tiles);
//         F32 accumulation and outputs, F32 master weights and gradients.
// What each mode covers is the Model's business (Model::set_matmul_precision): in fp8 the output head stays BF16,
// and the router, norms, embedding and attention core are not weight GEMMs of this kind. Frozen (quantised) weights of
// Linears and experts follow the mode through the qp* GEMMs below; a frozen grouped wo_a stays FP32.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "model/quant.h"
#include "runtime/fp8.h"
#include "runtime/tensor.h"

namespace dsv4 {

enum class MatmulPrecision : uint8_t { F32, BF16, FP8 };
std::string_view matmul_precision_name(MatmulPrecision p);  // "fp32", "bf16", "fp8"
// "fp32" | "bf16" | "fp8"; throws naming `what` otherwise.
MatmulPrecision parse_matmul_precision(std::string_view s, std::string_view what);

// 2-D F32 tensors (any strides; CPU or CUDA). y [T, O] = x [T, I] W [O, I]^T.
Tensor pmatmul_xwT(MatmulPrecision p, const Tensor& x_TI, const Tensor& w_OI);
// dx [T, I] = dy [T, O] W [O, I].
Tensor pmatmul_dyW(MatmulPrecision p, const Tensor& dy_TO, const Tensor& w_OI);
// Into an existing output (F32, unit inner stride, e.g. a row range of a larger tensor; contiguous for fp8 with
// beta = 0): y [T, O] = x W^T + beta y, and dx [T, I] = dy W + beta dx. With beta = 0 each equals the allocating
// form above, bit for bit.
void pgemm_xwT(MatmulPrecision p, const Tensor& x_TI, const Tensor& w_OI, float beta, Tensor& y_TO);
void pgemm_dyW(MatmulPrecision p, const Tensor& dy_TO, const Tensor& w_OI, float beta, Tensor& dx_TI);
// A GEMM operand rounded to BF16: BF16 tensors for cuBLAS, BF16-rounded F32 values on the CPU (the CPU GEMM is F32).
// Idempotent, so an operand used by two GEMMs can be rounded once.
Tensor bf16_operand(const Tensor& t);
// The operand the GEMMs of precision p read: bf16_operand(t) for bf16, t itself otherwise (fp32 reads F32; fp8
// quantises per GEMM along that GEMM's own axes). Any pgemm_* / pmatmul_* of precision p given precision_operand(p, t)
// in place of t computes the same bits, so an operand shared by several GEMMs (or kept from a forward for its
// backward) is converted once.
Tensor precision_operand(MatmulPrecision p, const Tensor& t);
// A weight prepared once for the GEMMs of precision p that read it (the forward's and the backward's Dgrad): fp32 the
// tensor itself, bf16 bf16_operand(w) (used as is: make it with weight_operand), fp8 its 128x128-block quantisation
// (the Dgrad transposes those blocks). The pgemm_* / pmatmul_* forms taking it compute the same bits as those taking
// the weight tensor, which call them with weight_operand(p, w).
struct WeightOperand {
  Tensor t;          // fp32 / bf16
  Fp8Tensor blocks;  // fp8
  bool defined() const { return t.defined() || blocks.q.defined(); }
};
WeightOperand weight_operand(MatmulPrecision p, const Tensor& w_OI);
// weight_operand of each weight; bf16 weights on one device convert in one call (runtime/model_ops.h's
// convert_to_bf16: one launch on CUDA for, e.g., all expert matrices of a layer).
std::vector<WeightOperand> weight_operands(MatmulPrecision p, const std::vector<Tensor>& ws);
// The dtype of bf16 operands on a device: BF16 on CUDA, F32 holding BF16 values on the CPU (bf16_operand).
DType bf16_operand_dtype(Device device);
// The bf16 weight_operand of each ws[i], written into outs[i] (ws[i]'s shape, bf16_operand_dtype; e.g. the row
// halves of one [2I, D] tensor that serves as one fused operand): the same bits as weight_operands(BF16, ws), one
// convert_to_bf16 call on CUDA.
std::vector<WeightOperand> bf16_weight_operands_into(const std::vector<Tensor>& ws, const std::vector<Tensor>& outs);
void pgemm_xwT(MatmulPrecision p, const Tensor& x_TI, const WeightOperand& w, float beta, Tensor& y_TO);
void pgemm_dyW(MatmulPrecision p, const Tensor& dy_TO, const WeightOperand& w, float beta, Tensor& dx_TI);
Tensor pmatmul_xwT(MatmulPrecision p, const Tensor& x_TI, const WeightOperand& w);
// fp8 with x already quantised: x_rows = fp8_quantize_rows(x, F32 scales) (or rows of it: fp8_rows_slice), so that
// GEMMs sharing an input quantise it once. pgemm_xwT(FP8, x, w, ...) == pgemm_xwT_fp8(fp8 rows of x, w, ...).
Fp8Tensor fp8_input_operand(const Tensor& x_TI);
void pgemm_xwT_fp8(const Fp8Tensor& x_rows, const WeightOperand& w, float beta, Tensor& y_TO);
// The Dgrad likewise: dy_rows = fp8_input_operand(dy) (or rows of it).
void pgemm_dyW_fp8(const Fp8Tensor& dy_rows, const WeightOperand& w, float beta, Tensor& dx_TI);
Tensor pmatmul_dyW(MatmulPrecision p, const Tensor& dy_TO, const WeightOperand& w);
// dW [O, I] += dy [T, O]^T x [T, I] (dW contiguous F32).
void pgemm_dW(MatmulPrecision p, const Tensor& dy_TO, const Tensor& x_TI, Tensor& dW_OI);
// FP8 Wgrad with the input already quantised: x_t = fp8_wgrad_operand(x) (128x1 tiles along the tokens, F32 scales),
// what a Linear keeps for its backward in fp8 instead of x itself (the recipe's FP8-cached activations).
// pgemm_dW(FP8, dy, x, dW) == pgemm_dW_fp8(dy, fp8_wgrad_operand(x), dW), bit for bit.
Fp8Tensor fp8_wgrad_operand(const Tensor& x_TI);
void pgemm_dW_fp8(const Tensor& dy_TO, const Fp8Tensor& x_t, Tensor& dW_OI);

// ---- frozen (quantised) weights in a training precision (model/quant.h's QuantizedWeight) ----------------------------
//   fp32  x [T, in] F32 times the dequantised weight in FP32: quant.h's qmatmul (tile GEMMs on the CPU; on a device the
//         weight dequantised there per call), the reference of LoRA runs;
//   bf16  the same with both operands rounded to BF16 (an FP8 / FP4 weight with E8M0 scales or a BF16 weight is exact
//         in BF16; F32 scales or F32 weights round);
//   fp8   the weight's own FP8 codes and 128x128 block scales (FP4 converted to FP8 blocks by fp4_to_fp8_blocks; BF16 /
//         F32 weights quantised like a trainable one) against x quantised 1x128 with F32 scales (Dgrad: dy 1x128 and
//         the weight's blocks transposed): runtime/fp8.h's block-scaled GEMM, the release's own inference numerics.
Tensor qpmatmul_xwT(MatmulPrecision p, const Tensor& x_TI, const QuantizedWeight& W);
Tensor qpmatmul_dyW(MatmulPrecision p, const Tensor& dy_TO, const QuantizedWeight& W);
// Row-major CPU buffers (the MoE reference's expert GEMMs): Y [n, out] = X W^T + beta Y; dX [n, in] = dY W + beta dX.
// fp32 is exactly quant.h's qgemm_xwT / qgemm_dyW.
void qpgemm_xwT_rows(MatmulPrecision p, const QuantizedWeight& W, int64_t n, const float* X, int64_t ldx, float beta,
                     float* Y, int64_t ldy);
void qpgemm_dyW_rows(MatmulPrecision p, const QuantizedWeight& W, int64_t n, const float* dY, int64_t lddy, float beta,
                     float* dX, int64_t lddx);

// Row-major CPU buffers with leading dimensions (the expert and grouped wo_a GEMMs); fp32 is exactly cpu_gemm.
// Y [n, out] = X [n, in] W [out, in]^T + beta Y
void pgemm_xwT_rows(MatmulPrecision p, int64_t n, int64_t in, int64_t out, const float* X, int64_t ldx, const float* W,
                    float beta, float* Y, int64_t ldy);
// dX [n, in] = dY [n, out] W [out, in] + beta dX
void pgemm_dyW_rows(MatmulPrecision p, int64_t n, int64_t in, int64_t out, const float* dY, int64_t lddy,
                    const float* W, float beta, float* dX, int64_t lddx);
// dW [out, in] += dY [n, out]^T X [n, in]
void pgemm_dW_rows(MatmulPrecision p, int64_t n, int64_t in, int64_t out, const float* dY, int64_t lddy, const float* X,
                   int64_t ldx, float* dW);

}  // namespace dsv4
