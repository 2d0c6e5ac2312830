#include "model/matmul_precision.h"

#include <algorithm>
#include <memory>

#include "runtime/cpu_blas.h"
#include "runtime/error.h"
#include "runtime/fp8.h"
#include "runtime/model_ops.h"
#include "runtime/ops.h"

namespace dsv4 {

std::string_view matmul_precision_name(MatmulPrecision p) {
  switch (p) {
    case MatmulPrecision::F32: return "fp32";
    case MatmulPrecision::BF16: return "bf16";
    case MatmulPrecision::FP8: return "fp8";
  }
  return "?";
}

Tensor bf16_operand(const Tensor& t) {
  if (t.dtype() == DType::BF16) return t;
  Tensor b = t.to(DType::BF16);
  return t.device().is_cpu() ? b.to(DType::F32) : b;
}

Tensor precision_operand(MatmulPrecision p, const Tensor& t) {
  return p == MatmulPrecision::BF16 ? bf16_operand(t) : t;
}

MatmulPrecision parse_matmul_precision(std::string_view s, std::string_view what) {
  if (s == "fp32") return MatmulPrecision::F32;
  if (s == "bf16") return MatmulPrecision::BF16;
  if (s == "fp8") return MatmulPrecision::FP8;
  DSV4_FAIL("{}: unknown precision '{}' (expected fp32, bf16 or fp8)", what, s);
}

namespace {

constexpr ScaleFormat kFp8Scales = ScaleFormat::F32;  // the recipe's s = amax / 448


// A non-owning [rows, cols] view of a row-major CPU buffer with leading dimension ld.
Tensor rows_view(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  std::shared_ptr<const void> borrowed(p, [](const void*) {});
  return Tensor::from_blob(const_cast<float*>(p), Shape{rows, ld}, DType::F32, Device::cpu(), std::move(borrowed))
      .slice(1, 0, cols);
}

// Y = R + beta Y over an [n, m] block with leading dimension ldy (R contiguous).
void store_rows(const Tensor& R, float beta, float* Y, int64_t ldy) {
  const Tensor r = R.contiguous();
  const int64_t n = r.size(0), m = r.size(1);
  const float* rp = r.data<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      float& y = Y[i * ldy + j];
      y = beta == 0.0f ? rp[i * m + j] : rp[i * m + j] + beta * y;
    }
}


// y = r + beta y for the FP8 GEMMs (fp8_gemm overwrites a contiguous output).
void fp8_gemm_into(const Fp8Tensor& a, const Fp8Tensor& b, float beta, Tensor& y) {
  if (beta == 0.0f && y.is_contiguous()) {
    fp8_gemm(a, b, y);
    return;
  }
  const Tensor r = fp8_matmul(a, b);
  ops::copy(beta == 0.0f ? r : ops::binary(BinaryOp::Add, r, beta == 1.0f ? y : ops::affine(y, beta, 0.0)), y);
}
}  // namespace

WeightOperand weight_operand(MatmulPrecision p, const Tensor& w_OI) {
  switch (p) {
    case MatmulPrecision::F32: return {w_OI, {}};
    case MatmulPrecision::BF16: return {bf16_operand(w_OI), {}};
    case MatmulPrecision::FP8: return {Tensor(), fp8_quantize_blocks(w_OI, kFp8Scales)};
  }
  DSV4_FAIL("weight_operand: bad precision");
}

std::vector<WeightOperand> weight_operands(MatmulPrecision p, const std::vector<Tensor>& ws) {
  if (p != MatmulPrecision::BF16) {
    std::vector<WeightOperand> out;
    out.reserve(ws.size());
    for (const Tensor& w : ws) out.push_back(weight_operand(p, w));
    return out;
  }
  std::vector<Tensor> outs;
  outs.reserve(ws.size());
  for (const Tensor& w : ws) outs.push_back(Tensor::empty(w.shape(), bf16_operand_dtype(w.device()), w.device()));
  return bf16_weight_operands_into(ws, outs);
}

DType bf16_operand_dtype(Device device) { return device.is_cpu() ? DType::F32 : DType::BF16; }

std::vector<WeightOperand> bf16_weight_operands_into(const std::vector<Tensor>& ws, const std::vector<Tensor>& outs) {
  DSV4_CHECK(outs.size() == ws.size(), "bf16_weight_operands_into: {} outputs for {} weights", outs.size(), ws.size());
  for (size_t i = 0; i < ws.size(); ++i)
    DSV4_CHECK(outs[i].defined() && outs[i].shape() == ws[i].shape() &&
                   outs[i].dtype() == bf16_operand_dtype(ws[i].device()) && outs[i].device() == ws[i].device(),
               "bf16_weight_operands_into: output {} is {}, expected {} [{}] on {}", i, outs[i].str(),
               dtype_name(bf16_operand_dtype(ws[i].device())), ws[i].shape().str(), ws[i].device().str());
  const bool batched = !ws.empty() && std::all_of(ws.begin(), ws.end(), [&](const Tensor& w) {
    return w.device().is_cuda() && w.device() == ws[0].device() && w.dtype() == DType::F32 && w.is_contiguous();
  }) && std::all_of(outs.begin(), outs.end(), [](const Tensor& o) { return o.is_contiguous(); });
  if (batched) {
    convert_to_bf16(ws, outs);
  } else {
    for (size_t i = 0; i < ws.size(); ++i) {
      Tensor o = outs[i];
      // BF16 outputs round in the copy; the CPU's F32 outputs take the BF16 values, widened exactly.
      o.copy_from(o.dtype() == DType::BF16 || ws[i].dtype() == DType::BF16 ? ws[i] : ws[i].to(DType::BF16));
    }
  }
  std::vector<WeightOperand> out;
  out.reserve(ws.size());
  for (const Tensor& o : outs) out.push_back({o, {}});
  return out;
}

namespace {
const Tensor& weight_tensor(const WeightOperand& w, MatmulPrecision p, const char* op) {
  DSV4_CHECK(w.t.defined(), "{}: the weight operand has no {} tensor", op, matmul_precision_name(p));
  return w.t;
}
const Fp8Tensor& weight_blocks(const WeightOperand& w, const char* op) {
  DSV4_CHECK(w.blocks.q.defined() && w.blocks.layout == Fp8Layout::Blocks128x128,
             "{}: the weight operand has no FP8 128x128 blocks", op);
  return w.blocks;
}
}  // namespace

void pgemm_xwT(MatmulPrecision p, const Tensor& x_TI, const WeightOperand& w, float beta, Tensor& y_TO) {
  switch (p) {
    case MatmulPrecision::F32: ops::gemm(x_TI, false, weight_tensor(w, p, "pgemm_xwT"), true, 1.0f, beta, y_TO); return;
    case MatmulPrecision::BF16:
      ops::gemm(bf16_operand(x_TI), false, weight_tensor(w, p, "pgemm_xwT"), true, 1.0f, beta, y_TO);
      return;
    case MatmulPrecision::FP8: pgemm_xwT_fp8(fp8_input_operand(x_TI), w, beta, y_TO); return;
  }
  DSV4_FAIL("pgemm_xwT: bad precision");
}

Fp8Tensor fp8_input_operand(const Tensor& x_TI) { return fp8_quantize_rows(x_TI, kFp8Scales); }

void pgemm_xwT_fp8(const Fp8Tensor& x_rows, const WeightOperand& w, float beta, Tensor& y_TO) {
  fp8_gemm_into(x_rows, weight_blocks(w, "pgemm_xwT_fp8"), beta, y_TO);
}

void pgemm_dyW_fp8(const Fp8Tensor& dy_rows, const WeightOperand& w, float beta, Tensor& dx_TI) {
  fp8_gemm_into(dy_rows, fp8_transpose_blocks(weight_blocks(w, "pgemm_dyW_fp8")), beta, dx_TI);
}

void pgemm_dyW(MatmulPrecision p, const Tensor& dy_TO, const WeightOperand& w, float beta, Tensor& dx_TI) {
  switch (p) {
    case MatmulPrecision::F32: ops::gemm(dy_TO, false, weight_tensor(w, p, "pgemm_dyW"), false, 1.0f, beta, dx_TI); return;
    case MatmulPrecision::BF16:
      ops::gemm(bf16_operand(dy_TO), false, weight_tensor(w, p, "pgemm_dyW"), false, 1.0f, beta, dx_TI);
      return;
    case MatmulPrecision::FP8: pgemm_dyW_fp8(fp8_input_operand(dy_TO), w, beta, dx_TI); return;
  }
  DSV4_FAIL("pgemm_dyW: bad precision");
}

Tensor pmatmul_xwT(MatmulPrecision p, const Tensor& x_TI, const WeightOperand& w) {
  const int64_t out = w.t.defined() ? w.t.size(0) : w.blocks.rows();
  Tensor y = Tensor::empty({x_TI.size(0), out}, DType::F32, x_TI.device());
  pgemm_xwT(p, x_TI, w, 0.0f, y);
  return y;
}

Tensor pmatmul_dyW(MatmulPrecision p, const Tensor& dy_TO, const WeightOperand& w) {
  const int64_t in = w.t.defined() ? w.t.size(1) : w.blocks.cols();
  Tensor dx = Tensor::empty({dy_TO.size(0), in}, DType::F32, dy_TO.device());
  pgemm_dyW(p, dy_TO, w, 0.0f, dx);
  return dx;
}

void pgemm_xwT(MatmulPrecision p, const Tensor& x_TI, const Tensor& w_OI, float beta, Tensor& y_TO) {
  pgemm_xwT(p, x_TI, weight_operand(p, w_OI), beta, y_TO);
}

void pgemm_dyW(MatmulPrecision p, const Tensor& dy_TO, const Tensor& w_OI, float beta, Tensor& dx_TI) {
  pgemm_dyW(p, dy_TO, weight_operand(p, w_OI), beta, dx_TI);
}

Tensor pmatmul_xwT(MatmulPrecision p, const Tensor& x_TI, const Tensor& w_OI) {
  return pmatmul_xwT(p, x_TI, weight_operand(p, w_OI));
}

Tensor pmatmul_dyW(MatmulPrecision p, const Tensor& dy_TO, const Tensor& w_OI) {
  return pmatmul_dyW(p, dy_TO, weight_operand(p, w_OI));
}

void pgemm_dW(MatmulPrecision p, const Tensor& dy_TO, const Tensor& x_TI, Tensor& dW_OI) {
  switch (p) {
    case MatmulPrecision::F32: ops::gemm(dy_TO, true, x_TI, false, 1.0f, 1.0f, dW_OI); return;
    case MatmulPrecision::BF16: ops::gemm(bf16_operand(dy_TO), true, bf16_operand(x_TI), false, 1.0f, 1.0f, dW_OI); return;
    case MatmulPrecision::FP8: pgemm_dW_fp8(dy_TO, fp8_wgrad_operand(x_TI), dW_OI); return;
  }
  DSV4_FAIL("pgemm_dW: bad precision");
}

Fp8Tensor fp8_wgrad_operand(const Tensor& x_TI) { return fp8_quantize_rows_t(x_TI, kFp8Scales); }

void pgemm_dW_fp8(const Tensor& dy_TO, const Fp8Tensor& x_t, Tensor& dW_OI) {
  if (dy_TO.size(0) == 0) return;
  const Tensor g = fp8_matmul(fp8_quantize_rows_t(dy_TO, kFp8Scales), x_t);
  ops::copy(ops::binary(BinaryOp::Add, dW_OI, g), dW_OI);
}

namespace {
// The frozen weight as block-scaled FP8 (its own codes and scales; FP4 through fp4_to_fp8_blocks; BF16 / F32 quantised).
Fp8Tensor frozen_fp8_blocks(const QuantizedWeight& W) {
  switch (W.format) {
    case WeightFormat::FP8: return Fp8Tensor{W.data, W.scale, Fp8Layout::Blocks128x128};
    case WeightFormat::FP4: return fp4_to_fp8_blocks(W.data, W.scale);
    case WeightFormat::BF16:
    case WeightFormat::F32: return fp8_quantize_blocks(W.data.to(DType::F32), kFp8Scales);
  }
  DSV4_FAIL("frozen_fp8_blocks: bad weight format");
}

// The frozen weight as F32 on its device (the CPU: a transient full dequantisation; bf16 only).
Tensor frozen_f32(const QuantizedWeight& W) { return W.data.device().is_cpu() ? W.dequantize() : dequantize_on_device(W); }
}  // namespace

Tensor qpmatmul_xwT(MatmulPrecision p, const Tensor& x_TI, const QuantizedWeight& W) {
  switch (p) {
    case MatmulPrecision::F32: return qmatmul_xwT(x_TI, W);
    case MatmulPrecision::BF16: return pmatmul_xwT(p, x_TI, frozen_f32(W));
    case MatmulPrecision::FP8: return fp8_matmul(fp8_quantize_rows(x_TI, kFp8Scales), frozen_fp8_blocks(W));
  }
  DSV4_FAIL("qpmatmul_xwT: bad precision");
}

Tensor qpmatmul_dyW(MatmulPrecision p, const Tensor& dy_TO, const QuantizedWeight& W) {
  switch (p) {
    case MatmulPrecision::F32: return qmatmul_dyW(dy_TO, W);
    case MatmulPrecision::BF16: return pmatmul_dyW(p, dy_TO, frozen_f32(W));
    case MatmulPrecision::FP8:
      return fp8_matmul(fp8_quantize_rows(dy_TO, kFp8Scales), fp8_transpose_blocks(frozen_fp8_blocks(W)));
  }
  DSV4_FAIL("qpmatmul_dyW: bad precision");
}

void qpgemm_xwT_rows(MatmulPrecision p, const QuantizedWeight& W, int64_t n, const float* X, int64_t ldx, float beta,
                     float* Y, int64_t ldy) {
  if (p == MatmulPrecision::F32) {
    qgemm_xwT(W, n, X, ldx, beta, Y, ldy);
    return;
  }
  if (n == 0) return;
  store_rows(qpmatmul_xwT(p, rows_view(X, n, W.cols(), ldx), W), beta, Y, ldy);
}

void qpgemm_dyW_rows(MatmulPrecision p, const QuantizedWeight& W, int64_t n, const float* dY, int64_t lddy, float beta,
                     float* dX, int64_t lddx) {
  if (p == MatmulPrecision::F32) {
    qgemm_dyW(W, n, dY, lddy, beta, dX, lddx);
    return;
  }
  if (n == 0) return;
  store_rows(qpmatmul_dyW(p, rows_view(dY, n, W.rows(), lddy), W), beta, dX, lddx);
}

void pgemm_xwT_rows(MatmulPrecision p, int64_t n, int64_t in, int64_t out, const float* X, int64_t ldx, const float* W,
                    float beta, float* Y, int64_t ldy) {
  if (p == MatmulPrecision::F32) {
    cpu_gemm(false, true, n, out, in, 1.0f, X, ldx, W, in, beta, Y, ldy);
    return;
  }
  if (n == 0) return;
  store_rows(pmatmul_xwT(p, rows_view(X, n, in, ldx), rows_view(W, out, in, in)), beta, Y, ldy);
}

void pgemm_dyW_rows(MatmulPrecision p, int64_t n, int64_t in, int64_t out, const float* dY, int64_t lddy,
                    const float* W, float beta, float* dX, int64_t lddx) {
  if (p == MatmulPrecision::F32) {
    cpu_gemm(false, false, n, in, out, 1.0f, dY, lddy, W, in, beta, dX, lddx);
    return;
  }
  if (n == 0) return;
  store_rows(pmatmul_dyW(p, rows_view(dY, n, out, lddy), rows_view(W, out, in, in)), beta, dX, lddx);
}

void pgemm_dW_rows(MatmulPrecision p, int64_t n, int64_t in, int64_t out, const float* dY, int64_t lddy, const float* X,
                   int64_t ldx, float* dW) {
  if (p == MatmulPrecision::F32) {
    cpu_gemm(true, false, out, in, n, 1.0f, dY, lddy, X, ldx, 1.0f, dW, in);
    return;
  }
  if (n == 0) return;
  Tensor dWv = rows_view(dW, out, in, in);
  pgemm_dW(p, rows_view(dY, n, out, lddy), rows_view(X, n, in, ldx), dWv);
}

}  // namespace dsv4
