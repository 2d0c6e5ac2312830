#include "model/quant.h"

#include "runtime/ops.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/cpu_blas.h"
#include "runtime/dtype.h"
#include "runtime/safetensors.h"

namespace dsv4 {

std::string_view weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::F32: return "f32";
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::FP8: return "fp8";
    case WeightFormat::FP4: return "fp4";
  }
  return "?";
}

std::string_view scale_format_name(ScaleFormat f) { return f == ScaleFormat::E8M0 ? "ue8m0" : "fp32"; }

namespace {

// Decoding tables (built from dtype.h's exact decoders).
struct Luts {
  std::array<float, 256> e4m3{};
  std::array<float, 256> e8m0{};
  std::array<float, 16> e2m1{};
  Luts() {
    for (int c = 0; c < 256; ++c) {
      e4m3[static_cast<size_t>(c)] = e4m3_to_f32(static_cast<uint8_t>(c));
      e8m0[static_cast<size_t>(c)] = e8m0_to_f32(static_cast<uint8_t>(c));
    }
    for (int c = 0; c < 16; ++c) e2m1[static_cast<size_t>(c)] = e2m1_to_f32(static_cast<uint8_t>(c));
  }
};
const Luts& luts() {
  static const Luts l;
  return l;
}

void check_matrix(const Tensor& t, const char* what, const std::string& name) {
  DSV4_CHECK(t.defined() && t.ndim() == 2 && t.is_contiguous() && t.device().is_cpu(),
             "{}: {} must be a contiguous 2-D CPU tensor, got {}", name, what, t.defined() ? t.str() : "none");
}

// Scale of FP8 block (br, bc) as float.
inline float fp8_scale_at(const Tensor& scale, int64_t br, int64_t bc) {
  const int64_t idx = br * scale.size(1) + bc;
  return scale.dtype() == DType::F32 ? scale.data<float>()[idx] : luts().e8m0[scale.data_u8()[idx]];
}

void check_finite_rows(const float* w, int64_t n, const std::string& name) {
  for (int64_t i = 0; i < n; ++i)
    DSV4_CHECK(std::isfinite(w[i]), "{}: cannot quantise a non-finite value ({}) at flat index {}", name, w[i], i);
}

Tensor f32_contiguous(const Tensor& w, const std::string& name) {
  DSV4_CHECK(w.defined() && w.ndim() == 2 && w.device().is_cpu(), "{}: expected a 2-D CPU weight, got {}", name,
             w.defined() ? w.str() : "none");
  Tensor f = w.dtype() == DType::F32 ? w.contiguous() : w.to(DType::F32).contiguous();
  check_finite_rows(f.data<float>(), f.numel(), name);
  return f;
}

}  // namespace

// ---- QuantizedWeight -------------------------------------------------------------------------------------
std::string QuantizedWeight::str() const {
  if (!defined()) return "QuantizedWeight(undefined)";
  if (!scale.defined()) return fmt::format("{}{}", weight_format_name(format), data.shape().str());
  return fmt::format("{}{} ({} scales {})", weight_format_name(format), data.shape().str(),
                     scale.dtype() == DType::F32 ? "f32" : "e8m0", scale.shape().str());
}

void QuantizedWeight::validate(const std::string& name) const {
  check_matrix(data, "weight", name);
  const int64_t out = data.size(0), in = data.size(1);
  switch (format) {
    case WeightFormat::F32:
    case WeightFormat::BF16: {
      const DType want = format == WeightFormat::F32 ? DType::F32 : DType::BF16;
      DSV4_CHECK(data.dtype() == want, "{}: {} weight stored as {}", name, weight_format_name(format),
                 dtype_name(data.dtype()));
      DSV4_CHECK(!scale.defined(), "{}: a {} weight has no scale (got {})", name, weight_format_name(format), scale.str());
      break;
    }
    case WeightFormat::FP8: {
      DSV4_CHECK(data.dtype() == DType::F8_E4M3, "{}: fp8 weight stored as {}", name, dtype_name(data.dtype()));
      check_matrix(scale, "fp8 block scale", name);
      DSV4_CHECK(scale.dtype() == DType::F8_E8M0 || scale.dtype() == DType::F32,
                 "{}: fp8 block scales must be F8_E8M0 or F32, got {}", name, dtype_name(scale.dtype()));
      DSV4_CHECK(scale.shape() == fp8_scale_shape(out, in), "{}: fp8 weight [{}, {}] needs block scales {}, got {}",
                 name, out, in, fp8_scale_shape(out, in).str(), scale.shape().str());
      break;
    }
    case WeightFormat::FP4: {
      DSV4_CHECK(data.dtype() == DType::F4_E2M1, "{}: fp4 weight stored as {}", name, dtype_name(data.dtype()));
      check_matrix(scale, "fp4 group scale", name);
      DSV4_CHECK(scale.dtype() == DType::F8_E8M0, "{}: fp4 scales must be F8_E8M0, got {}", name,
                 dtype_name(scale.dtype()));
      DSV4_CHECK(scale.shape() == fp4_scale_shape(out, in), "{}: fp4 weight [{}, {}] needs scales {}, got {}", name,
                 out, in, fp4_scale_shape(out, in).str(), scale.shape().str());
      break;
    }
  }
}

void QuantizedWeight::dequant_rows(int64_t r0, int64_t r1, float* out) const {
  const int64_t in = cols();
  DSV4_CHECK(0 <= r0 && r0 <= r1 && r1 <= rows(), "dequant_rows [{}, {}) of {}", r0, r1, str());
  const Luts& L = luts();
  switch (format) {
    case WeightFormat::F32:
      std::memcpy(out, data.data<float>() + r0 * in, static_cast<size_t>((r1 - r0) * in) * sizeof(float));
      return;
    case WeightFormat::BF16: {
      const uint16_t* p = data.data_u16() + r0 * in;
      for (int64_t i = 0; i < (r1 - r0) * in; ++i) out[i] = bf16_to_f32(p[i]);
      return;
    }
    case WeightFormat::FP8: {
      const uint8_t* q = data.data_u8();
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* qr = q + r * in;
        float* o = out + (r - r0) * in;
        for (int64_t c0 = 0; c0 < in; c0 += kFp8Block) {
          const float s = fp8_scale_at(scale, r / kFp8Block, c0 / kFp8Block);
          const int64_t c1 = std::min(in, c0 + kFp8Block);
          for (int64_t c = c0; c < c1; ++c) o[c] = L.e4m3[qr[c]] * s;
        }
      }
      return;
    }
    case WeightFormat::FP4: {
      const uint8_t* q = data.data_u8();
      const uint8_t* sc = scale.data_u8();
      const int64_t groups = scale.size(1);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* qr = q + r * (in / 2);
        float* o = out + (r - r0) * in;
        for (int64_t g = 0; g < groups; ++g) {
          const float s = L.e8m0[sc[r * groups + g]];
          const int64_t c1 = std::min(in, (g + 1) * kFp4Group);
          for (int64_t c = g * kFp4Group; c < c1; ++c) o[c] = L.e2m1[fp4_get(qr, c)] * s;
        }
      }
      return;
    }
  }
}

Tensor QuantizedWeight::dequantize() const {
  DSV4_CHECK(defined(), "dequantize() of an undefined QuantizedWeight");
  Tensor out = Tensor::empty(data.shape(), DType::F32);
  dequant_rows(0, rows(), out.data<float>());
  return out;
}

QuantizedWeight QuantizedWeight::clone() const {
  QuantizedWeight q;
  q.format = format;
  if (data.defined()) {
    // Packed FP4 is copied as bytes (the copy op works on elements; bytes are simplest and exact).
    if (data.dtype() == DType::F4_E2M1) {
      Tensor bytes = Tensor::empty({data.size(0), data.size(1) / 2}, DType::U8);
      std::memcpy(bytes.raw_data(), data.raw_data(), static_cast<size_t>(data.nbytes()));
      q.data = as_packed_fp4(bytes);
    } else {
      q.data = data.clone();
    }
  }
  if (scale.defined()) q.scale = scale.clone();
  return q;
}

QuantizedWeight QuantizedWeight::from_tensors(const Tensor& data, const Tensor& scale, const std::string& name) {
  DSV4_CHECK(data.defined() && data.ndim() == 2, "{}: expected a 2-D weight, got {}", name,
             data.defined() ? data.str() : "none");
  QuantizedWeight q;
  switch (data.dtype()) {
    case DType::F32: q.format = WeightFormat::F32; q.data = data; break;
    case DType::BF16: q.format = WeightFormat::BF16; q.data = data; break;
    case DType::F8_E4M3: q.format = WeightFormat::FP8; q.data = data; q.scale = scale; break;
    case DType::F4_E2M1: q.format = WeightFormat::FP4; q.data = data; q.scale = scale; break;
    case DType::I8:
    case DType::U8:
      q.format = WeightFormat::FP4;
      DSV4_CHECK(data.is_contiguous(), "{}: packed FP4 bytes must be contiguous, got {}", name, data.str());
      q.data = as_packed_fp4(data);
      q.scale = scale;
      break;
    default:
      DSV4_FAIL("{}: {} is not a weight format (expected F32, BF16, F8_E4M3 + scale, or I8 packed FP4 + scale)", name,
                data.str());
  }
  if (q.format == WeightFormat::FP8 || q.format == WeightFormat::FP4)
    DSV4_CHECK(scale.defined(), "{}: a {} weight needs its scale tensor", name, weight_format_name(q.format));
  q.validate(name);
  return q;
}

// ---- reference dequantisation ---------------------------------------------------------------------------
Tensor dequant_fp8_block(const Tensor& q_e4m3, const Tensor& scale) {
  return QuantizedWeight::from_tensors(q_e4m3, scale, "dequant_fp8_block").dequantize();
}

Tensor dequant_fp4_group(const Tensor& packed, const Tensor& scale) {
  DSV4_CHECK(packed.dtype() == DType::F4_E2M1 || packed.dtype() == DType::I8 || packed.dtype() == DType::U8,
             "dequant_fp4_group: expected packed FP4 (F4_E2M1, or I8/U8 bytes), got {}", packed.str());
  return QuantizedWeight::from_tensors(packed, scale, "dequant_fp4_group").dequantize();
}

// ---- FP4 -> FP8 --------------------------------------------------------------------------------------------
QuantizedWeight fp4_to_fp8(const QuantizedWeight& fp4, const std::string& name) {
  DSV4_CHECK(fp4.format == WeightFormat::FP4, "fp4_to_fp8({}): expected an fp4 weight, got {}", name, fp4.str());
  fp4.validate(name);
  Fp8Tensor t = fp4_to_fp8_blocks(fp4.data, fp4.scale, name);  // the shared rule of runtime/fp8.h
  QuantizedWeight r;
  r.format = WeightFormat::FP8;
  r.data = std::move(t.q);
  r.scale = std::move(t.scale);
  return r;
}

// ---- quantisers ------------------------------------------------------------------------------------------
QuantizedWeight quantize_fp8_block(const Tensor& w_in, ScaleFormat scale_fmt, const std::string& name) {
  const Tensor w = f32_contiguous(w_in, name);
  Fp8Tensor t = fp8_quantize_blocks(w, scale_fmt);  // the shared rule of runtime/fp8.h (CPU reference)
  QuantizedWeight q;
  q.format = WeightFormat::FP8;
  q.data = std::move(t.q);
  q.scale = std::move(t.scale);
  return q;
}

QuantizedWeight quantize_fp4_group(const Tensor& w_in, const std::string& name) {
  const Tensor w = f32_contiguous(w_in, name);
  const int64_t out = w.size(0), in = w.size(1);
  DSV4_CHECK(in % 2 == 0, "{}: packed FP4 needs an even input dim, got [{}, {}]", name, out, in);
  QuantizedWeight q;
  q.format = WeightFormat::FP4;
  Tensor bytes = Tensor::zeros({out, in / 2}, DType::U8);
  q.data = as_packed_fp4(bytes);
  const Shape ss = fp4_scale_shape(out, in);
  q.scale = Tensor::empty(ss, DType::F8_E8M0);
  const float* wp = w.data<float>();
  uint8_t* qp = bytes.data_u8();
  uint8_t* sp = q.scale.data_u8();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < ss[1]; ++g) {
      const int64_t c0 = g * kFp4Group, c1 = std::min(in, c0 + kFp4Group);
      float amax = 0.0f;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::abs(wp[r * in + c]));
      const uint8_t code = amax > 0.0f ? e8m0_ceil_from_f32(amax / kE2M1Max) : uint8_t{127};
      sp[r * ss[1] + g] = code;
      const float s = e8m0_to_f32(code);
      for (int64_t c = c0; c < c1; ++c) fp4_set(qp + r * (in / 2), c, f32_to_e2m1(wp[r * in + c] / s));
    }
  return q;
}

QuantizedWeight quantize_weight(const Tensor& w, WeightFormat format, ScaleFormat scale, const std::string& name) {
  switch (format) {
    case WeightFormat::FP8: return quantize_fp8_block(w, scale, name);
    case WeightFormat::FP4: return quantize_fp4_group(w, name);
    case WeightFormat::F32:
    case WeightFormat::BF16: {
      DSV4_CHECK(w.defined() && w.ndim() == 2 && w.device().is_cpu(), "{}: expected a 2-D CPU weight, got {}", name,
                 w.defined() ? w.str() : "none");
      QuantizedWeight q;
      q.format = format;
      const DType t = format == WeightFormat::F32 ? DType::F32 : DType::BF16;
      q.data = w.dtype() == t ? w.contiguous().clone() : w.to(t).contiguous();
      return q;
    }
  }
  DSV4_FAIL("{}: unknown weight format", name);
}

// ---- GEMMs -----------------------------------------------------------------------------------------------
namespace {
void check_gemm(const QuantizedWeight& W, int64_t& row0, int64_t& row1, const char* what) {
  DSV4_CHECK(W.defined(), "{}: undefined weight", what);
  if (row1 < 0) row1 = W.rows();
  DSV4_CHECK(0 <= row0 && row0 <= row1 && row1 <= W.rows(), "{}: rows [{}, {}) outside {}", what, row0, row1, W.str());
}
}  // namespace

void qgemm_xwT(const QuantizedWeight& W, int64_t n, const float* x, int64_t ldx, float beta, float* y, int64_t ldy,
               int64_t row0, int64_t row1) {
  check_gemm(W, row0, row1, "qgemm_xwT");
  const int64_t in = W.cols();
  if (W.format == WeightFormat::F32) {  // in place: the same single GEMM an F32 Linear does
    cpu_gemm(false, true, n, row1 - row0, in, 1.0f, x, ldx, W.data.data<float>() + row0 * in, in, beta, y, ldy);
    return;
  }
  std::vector<float> tile(static_cast<size_t>(std::min(kQTileRows, row1 - row0) * in));
  for (int64_t r0 = row0; r0 < row1; r0 += kQTileRows) {
    const int64_t r1 = std::min(row1, r0 + kQTileRows);
    W.dequant_rows(r0, r1, tile.data());
    cpu_gemm(false, true, n, r1 - r0, in, 1.0f, x, ldx, tile.data(), in, beta, y + (r0 - row0), ldy);
  }
}

void qgemm_dyW(const QuantizedWeight& W, int64_t n, const float* dy, int64_t lddy, float beta, float* dx,
               int64_t lddx, int64_t row0, int64_t row1) {
  check_gemm(W, row0, row1, "qgemm_dyW");
  const int64_t in = W.cols();
  if (W.format == WeightFormat::F32) {
    cpu_gemm(false, false, n, in, row1 - row0, 1.0f, dy, lddy, W.data.data<float>() + row0 * in, in, beta, dx, lddx);
    return;
  }
  if (row0 == row1) {  // an empty sum: dx = beta * dx
    cpu_gemm(false, false, n, in, 0, 1.0f, dy, lddy, nullptr, in, beta, dx, lddx);
    return;
  }
  std::vector<float> tile(static_cast<size_t>(std::min(kQTileRows, row1 - row0) * in));
  for (int64_t r0 = row0; r0 < row1; r0 += kQTileRows) {
    const int64_t r1 = std::min(row1, r0 + kQTileRows);
    W.dequant_rows(r0, r1, tile.data());
    cpu_gemm(false, false, n, in, r1 - r0, 1.0f, dy + (r0 - row0), lddy, tile.data(), in, r0 == row0 ? beta : 1.0f,
             dx, lddx);
  }
}

QuantizedWeight to_device(const QuantizedWeight& W, Device device, const std::string& name) {
  if (!W.defined()) return W;
  (void)name;
  QuantizedWeight out;
  out.format = W.format;
  out.data = W.data.to(device);
  if (W.scale.defined()) out.scale = W.scale.to(device);
  return out;
}

Tensor dequantize_on_device(const QuantizedWeight& W) {
  switch (W.format) {
    case WeightFormat::F32: return W.data;
    case WeightFormat::BF16: return W.data.to(DType::F32);
    case WeightFormat::FP8: return fp8_dequantize(Fp8Tensor{W.data, W.scale, Fp8Layout::Blocks128x128});
    case WeightFormat::FP4: return fp8_dequantize(fp4_to_fp8_blocks(W.data, W.scale));  // transient FP8, then F32
  }
  DSV4_FAIL("dequantize_on_device: bad weight format");
}

namespace {
void check_weight_device(const Tensor& x, const QuantizedWeight& W, const char* op) {
  DSV4_CHECK(x.device() == W.data.device(), "{}: input on {} but the frozen weight {} on {}", op, x.device().str(),
             W.str(), W.data.device().str());
}
}  // namespace

Tensor qmatmul_xwT(const Tensor& x_TI, const QuantizedWeight& W) {
  DSV4_CHECK(x_TI.dtype() == DType::F32 && x_TI.ndim() == 2 && x_TI.size(1) == W.cols(),
             "qmatmul_xwT: input {} does not match weight {}", x_TI.str(), W.str());
  check_weight_device(x_TI, W, "qmatmul_xwT");
  if (!x_TI.device().is_cpu()) return ops::matmul(x_TI, dequantize_on_device(W), false, true);
  const Tensor x = x_TI.contiguous();
  Tensor y = Tensor::empty({x.size(0), W.rows()}, DType::F32);
  qgemm_xwT(W, x.size(0), x.data<float>(), W.cols(), 0.0f, y.data<float>(), W.rows());
  return y;
}

Tensor qmatmul_dyW(const Tensor& dy_TO, const QuantizedWeight& W) {
  DSV4_CHECK(dy_TO.dtype() == DType::F32 && dy_TO.ndim() == 2 && dy_TO.size(1) == W.rows(),
             "qmatmul_dyW: gradient {} does not match weight {}", dy_TO.str(), W.str());
  check_weight_device(dy_TO, W, "qmatmul_dyW");
  if (!dy_TO.device().is_cpu()) return ops::matmul(dy_TO, dequantize_on_device(W));
  const Tensor dy = dy_TO.contiguous();
  Tensor dx = Tensor::empty({dy.size(0), W.cols()}, DType::F32);
  qgemm_dyW(W, dy.size(0), dy.data<float>(), W.rows(), 0.0f, dx.data<float>(), W.cols());
  return dx;
}

}  // namespace dsv4
