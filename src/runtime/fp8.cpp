// Frontends of the block-scaled FP8 ops (runtime/fp8.h): validation, allocation and device dispatch.
#include "runtime/fp8.h"
#include "runtime/backend_dispatch.h"

#include "runtime/error.h"

namespace dsv4 {
namespace {


DType scale_dtype(ScaleFormat f) { return f == ScaleFormat::F32 ? DType::F32 : DType::F8_E8M0; }

// The input of a quantiser: 2-D float; the CPU computes in F32 (BF16 is widened exactly), CUDA reads F32 or BF16.
Tensor quantiser_input(const Tensor& x, const char* op) {
  DSV4_CHECK(x.defined() && x.ndim() == 2, "{}: expected a 2-D tensor, got {}", op, x.defined() ? x.str() : "none");
  DSV4_CHECK(x.dtype() == DType::F32 || x.dtype() == DType::BF16, "{}: expected F32 or BF16, got {}", op,
             dtype_name(x.dtype()));
  if (x.device().is_cpu() && x.dtype() != DType::F32) return x.to(DType::F32);
  return x;
}

void check_fp8(const Fp8Tensor& t, const char* op, const char* arg) {
  DSV4_CHECK(t.q.defined() && t.q.ndim() == 2 && t.q.dtype() == DType::F8_E4M3 && t.q.is_contiguous(),
             "{}: {} codes must be a contiguous 2-D F8_E4M3 tensor, got {}", op, arg, t.q.defined() ? t.q.str() : "none");
  DSV4_CHECK(t.scale.defined() && (t.scale.dtype() == DType::F32 || t.scale.dtype() == DType::F8_E8M0) &&
                 t.scale.is_contiguous(),
             "{}: {} scales must be contiguous F32 or F8_E8M0, got {}", op, arg, t.scale.defined() ? t.scale.str() : "none");
  const Shape want = fp8_scale_shape(t.rows(), t.cols(), t.layout);
  DSV4_CHECK(t.scale.shape() == want, "{}: {} codes {} need {} scales of shape {}, got {}", op, arg,
             t.q.shape().str(), t.layout == Fp8Layout::Rows1x128 ? "1x128" : "128x128", want.str(), t.scale.shape().str());
  DSV4_CHECK(t.q.device() == t.scale.device(), "{}: {} codes on {} but scales on {}", op, arg, t.q.device().str(),
             t.scale.device().str());
}

Fp8Tensor alloc(int64_t rows, int64_t cols, Fp8Layout layout, ScaleFormat fmt, Device device) {
  Fp8Tensor t;
  t.layout = layout;
  t.q = Tensor::empty({rows, cols}, DType::F8_E4M3, device);
  t.scale = Tensor::empty(fp8_scale_shape(rows, cols, layout), scale_dtype(fmt), device);
  return t;
}

}  // namespace

Fp8Tensor fp8_quantize_rows(const Tensor& x_in, ScaleFormat fmt) {
  const Tensor x = quantiser_input(x_in, "fp8_quantize_rows");
  Fp8Tensor t = alloc(x.size(0), x.size(1), Fp8Layout::Rows1x128, fmt, x.device());
  if (x.numel() > 0) DSV4_BACKEND_DISPATCH(x.device(), fp8_quantize_rows, x, t.q, t.scale);
  return t;
}

Fp8Tensor fp8_quantize_rows_t(const Tensor& x_in, ScaleFormat fmt) {
  const Tensor x = quantiser_input(x_in, "fp8_quantize_rows_t");
  Fp8Tensor t = alloc(x.size(1), x.size(0), Fp8Layout::Rows1x128, fmt, x.device());
  if (x.numel() > 0) DSV4_BACKEND_DISPATCH(x.device(), fp8_quantize_rows_t, x, t.q, t.scale);
  return t;
}

Fp8Tensor fp8_quantize_blocks(const Tensor& w_in, ScaleFormat fmt) {
  const Tensor w = quantiser_input(w_in, "fp8_quantize_blocks");
  Fp8Tensor t = alloc(w.size(0), w.size(1), Fp8Layout::Blocks128x128, fmt, w.device());
  if (w.numel() > 0) DSV4_BACKEND_DISPATCH(w.device(), fp8_quantize_blocks, w, t.q, t.scale);
  return t;
}

Tensor fp8_dequantize(const Fp8Tensor& t) {
  check_fp8(t, "fp8_dequantize", "input");
  Tensor out = Tensor::empty(t.q.shape(), DType::F32, t.q.device());
  if (out.numel() > 0) DSV4_BACKEND_DISPATCH(t.q.device(), fp8_dequantize, t.q, t.scale, t.layout, out);
  return out;
}

Fp8Tensor fp4_to_fp8_blocks(const Tensor& packed, const Tensor& scale, const std::string& name) {
  DSV4_CHECK(packed.defined() && packed.ndim() == 2 && packed.dtype() == DType::F4_E2M1 && packed.is_contiguous() &&
                 packed.size(1) % 2 == 0,
             "fp4_to_fp8_blocks({}): expected contiguous packed F4_E2M1 [R, C] codes with C even, got {}", name,
             packed.defined() ? packed.str() : "none");
  const int64_t R = packed.size(0), C = packed.size(1);
  const Shape want{R, (C + 31) / 32};
  DSV4_CHECK(scale.defined() && scale.dtype() == DType::F8_E8M0 && scale.is_contiguous() && scale.shape() == want,
             "fp4_to_fp8_blocks({}): expected contiguous F8_E8M0 1x32 scales of shape {}, got {}", name, want.str(),
             scale.defined() ? scale.str() : "none");
  DSV4_CHECK(packed.device() == scale.device(), "fp4_to_fp8_blocks({}): codes on {} but scales on {}", name,
             packed.device().str(), scale.device().str());
  Fp8Tensor t = alloc(R, C, Fp8Layout::Blocks128x128, ScaleFormat::E8M0, packed.device());
  if (packed.numel() == 0) return t;
  const int64_t bad = DSV4_BACKEND_DISPATCH(packed.device(), fp4_to_fp8_blocks, packed, scale, t.q, t.scale);
  DSV4_CHECK(bad < 0, "fp4_to_fp8({}): scale [{}, {}] is NaN (E8M0 0xFF)", name, bad / want[1], bad % want[1]);
  return t;
}

Fp8Tensor fp8_transpose_blocks(const Fp8Tensor& t) {
  check_fp8(t, "fp8_transpose_blocks", "input");
  DSV4_CHECK(t.layout == Fp8Layout::Blocks128x128, "fp8_transpose_blocks: expected 128x128 block scales");
  Fp8Tensor r = alloc(t.cols(), t.rows(), Fp8Layout::Blocks128x128, t.scale_format(), t.q.device());
  if (t.q.numel() > 0) DSV4_BACKEND_DISPATCH(t.q.device(), fp8_transpose_blocks, t.q, t.scale, r.q, r.scale);
  return r;
}

void fp8_gemm(const Fp8Tensor& a, const Fp8Tensor& b, Tensor& c, Fp8GemmImpl impl) {
  check_fp8(a, "fp8_gemm", "a");
  check_fp8(b, "fp8_gemm", "b");
  DSV4_CHECK(a.layout == Fp8Layout::Rows1x128, "fp8_gemm: a (activations) must have 1x128 scales");
  DSV4_CHECK(a.cols() == b.cols(), "fp8_gemm: a {} and b {} differ in K (c = a b^T)", a.q.shape().str(),
             b.q.shape().str());
  DSV4_CHECK(a.q.device() == b.q.device(), "fp8_gemm: a on {} but b on {}", a.q.device().str(), b.q.device().str());
  DSV4_CHECK(c.defined() && c.dtype() == DType::F32 && c.is_contiguous() && c.shape() == Shape({a.rows(), b.rows()}) &&
                 c.device() == a.q.device(),
             "fp8_gemm: c must be a contiguous F32 [{}, {}] tensor on {}, got {}", a.rows(), b.rows(),
             a.q.device().str(), c.defined() ? c.str() : "none");
  if (c.numel() == 0) return;
  DSV4_BACKEND_DISPATCH(c.device(), fp8_gemm, a.q, a.scale, b.q, b.scale, b.layout, impl, c);
}

Tensor fp8_matmul(const Fp8Tensor& a, const Fp8Tensor& b, Fp8GemmImpl impl) {
  Tensor c = Tensor::empty({a.q.defined() ? a.rows() : 0, b.q.defined() ? b.rows() : 0}, DType::F32, a.q.device());
  fp8_gemm(a, b, c, impl);
  return c;
}

}  // namespace dsv4
