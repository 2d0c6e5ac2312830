// Release weight formats of DeepSeek-V4 and frozen weights kept in them (dsv4-architecture.md §2.6, §3;
// hf-transformers-deepseek-v4-and-peft.md §3.3).
//
// Formats of one weight matrix W [out, in] (the checkpoint layout, y = x W^T):
//   FP8  F8_E4M3 q [out, in] with 128x128 block scales s [ceil(out/128), ceil(in/128)], F8_E8M0 (instruct,
//        "ue8m0") or F32 (base):                 W[o, i] = float(q[o, i]) * float(s[o/128, i/128])
//   FP4  packed E2M1 (I8 [out, in/2] on disk, two per byte, low nibble = even index) with 1x32 E8M0 scales
//        s [out, ceil(in/32)]:                   W[o, i] = e2m1(q[o, i]) * float(s[o, i/32])
//   BF16 / F32 plain, no scale.
// Dequantisation is one FP32 multiply of the exactly decoded code and scale (dtype.h's decoders, checked
// bit-for-bit against ml_dtypes), i.e. bit-exact with the reference `q.float() * s.float()`. With E8M0 scales the
// product is exact (an E4M3 / E2M1 value has at most 4 significant bits) unless it leaves FP32's range (scales of
// 2^120 and up overflow for large codes; nothing underflows since 2^-9 * 2^-127 >= 2^-149), and for scales above
// 2^-118 it is also exactly representable in BF16: the reference's conversion of wo_a to BF16 loses nothing there.
//
// FP4 -> FP8 (the release convert.py `--expert-dtype fp8`, §3.3): per 128x128 block, with kmax the largest E8M0
// code of the FP4 scales touching the block, S = 2^(kmax-127) / 2^6 (code max(kmax - 6, 0)) and
//   q8 = e4m3(e2m1 * s_fp4 / S),  scale8 = S (E8M0).
// e2m1 * s_fp4 / S = e2m1 * 2^(k - kmax + 6) <= 6 * 2^6 = 384 < 448 never saturates, and it is exact (the
// conversion is lossless) whenever every FP4 scale code k in the block is >= kmax - 14: below that the small
// E2M1 values fall under E4M3's subnormal step 2^-9 and are rounded to nearest even, exactly as the reference's
// cast to float8_e4m3fn rounds them. Scales of code 0xFF (NaN) are rejected.
//
// Quantisers (for writing release-format checkpoints from FP32 values), per block with amax = max |w|:
//   FP8 ue8m0  s = 2^ceil(log2(amax / 448))  (e8m0_ceil_from_f32(amax / 448)),  q = e4m3(w / s)
//   FP8 F32    s = amax / 448,                                                  q = e4m3(w / s)
//   FP4        s = 2^ceil(log2(amax / 6))    (per 1x32 group, E8M0),            q = e2m1(w / s)
// An all-zero block gets scale 1 (code 127). Non-finite weights are errors naming the tensor. Conversions are
// dtype.h's saturating round-to-nearest-even. With power-of-two scales re-quantising dequantised values gives
// the same values back (the codes may differ where a block's largest code was exactly half the maximum).
// quantize_fp8_block is runtime/fp8.h's fp8_quantize_blocks (the CPU reference of the CUDA quantiser).
//
// QuantizedWeight holds one matrix in any of these formats; qgemm_* multiply with it, dequantising tiles of
// kQTileRows rows on the fly into a scratch of kQTileRows x in floats (never a full F32/BF16 copy), on the CPU
// with FP32 accumulation (OpenBLAS). F32 weights are used in place (no scratch, the same single GEMM as an F32
// Linear).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "runtime/fp8.h"
#include "runtime/tensor.h"

namespace dsv4 {

inline constexpr int64_t kFp8Block = 128;  // FP8 block scales: 128 x 128
inline constexpr int64_t kFp4Group = 32;   // FP4 scales: 1 x 32 along the input dim
inline constexpr int64_t kQTileRows = 128; // rows dequantised at a time by the GEMMs (one FP8 block row)

enum class WeightFormat : uint8_t { F32, BF16, FP8, FP4 };
// ScaleFormat (E8M0 | F32, of FP8 block scales; FP4 scales are always E8M0) is runtime/fp8.h's.

std::string_view weight_format_name(WeightFormat f);  // "f32", "bf16", "fp8", "fp4"
std::string_view scale_format_name(ScaleFormat f);    // "ue8m0", "fp32"

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Scale shapes of a weight [out, in].
inline Shape fp8_scale_shape(int64_t out, int64_t in) { return Shape{ceil_div(out, kFp8Block), ceil_div(in, kFp8Block)}; }
inline Shape fp4_scale_shape(int64_t out, int64_t in) { return Shape{out, ceil_div(in, kFp4Group)}; }

// One weight matrix [out, in] in its storage precision. Tensors are contiguous CPU tensors (owned, or views of a
// mapping that the tensors keep alive).
struct QuantizedWeight {
  WeightFormat format = WeightFormat::F32;
  Tensor data;   // F32 / BF16 / F8_E4M3 [out, in], or F4_E2M1 [out, in] (packed, logical shape)
  Tensor scale;  // FP8: F8_E8M0 or F32 fp8_scale_shape; FP4: F8_E8M0 fp4_scale_shape; else undefined

  bool defined() const { return data.defined(); }
  int64_t rows() const { return data.size(0); }
  int64_t cols() const { return data.size(1); }
  Shape shape() const { return data.shape(); }
  ScaleFormat scale_format() const { return scale.defined() && scale.dtype() == DType::F32 ? ScaleFormat::F32 : ScaleFormat::E8M0; }
  int64_t nbytes() const { return data.nbytes() + (scale.defined() ? scale.nbytes() : 0); }
  std::string str() const;  // "fp8[out, in] (ue8m0 scales [a, b])"

  // Checks dtypes, shapes, contiguity and device; throws naming `name`.
  void validate(const std::string& name) const;
  // Rows [r0, r1) dequantised into out (row-major, row stride cols()).
  void dequant_rows(int64_t r0, int64_t r1, float* out) const;
  // The whole matrix as a fresh F32 tensor (conversions and tests; the model never calls it on the hot path).
  Tensor dequantize() const;
  // Deep copy into owned memory (detaches from a memory-mapped file).
  QuantizedWeight clone() const;

  // Builds a weight from checkpoint tensors, inferring the format from the dtypes: F32 / BF16 (no scale),
  // F8_E4M3 + (F8_E8M0 | F32) scale, F4_E2M1 or I8/U8 packed [out, in/2] + F8_E8M0 scale. Validates; the
  // tensors are used as given (views stay views: call clone() to own them).
  static QuantizedWeight from_tensors(const Tensor& data, const Tensor& scale, const std::string& name);
};

// ---- reference dequantisation ----------------------------------------------------------------------------
Tensor dequant_fp8_block(const Tensor& q_e4m3, const Tensor& scale);  // F32 [out, in]
Tensor dequant_fp4_group(const Tensor& packed, const Tensor& scale);  // packed: F4_E2M1 [out, in] or I8 [out, in/2]

// ---- conversions -----------------------------------------------------------------------------------------
// FP4 (1x32 E8M0) -> FP8 (128x128 E8M0), see the header comment. `name` labels errors.
QuantizedWeight fp4_to_fp8(const QuantizedWeight& fp4, const std::string& name = "weight");

// ---- quantisers --------------------------------------------------------------------------------------------
QuantizedWeight quantize_fp8_block(const Tensor& w, ScaleFormat scale, const std::string& name = "weight");
QuantizedWeight quantize_fp4_group(const Tensor& w, const std::string& name = "weight");
// Any format: F32 (copy), BF16 (round to nearest even), FP8 (with `scale`), FP4.
QuantizedWeight quantize_weight(const Tensor& w, WeightFormat format, ScaleFormat scale = ScaleFormat::E8M0,
                                const std::string& name = "weight");

// ---- GEMMs with on-the-fly dequantisation (CPU, FP32 accumulation) ----------------------------------------
// Rows [row0, row1) of W (row1 < 0: all rows) are used; call them W' [R, in].
// y [n, R] (row stride ldy) = x [n, in] (row stride ldx) W'^T + beta * y
void qgemm_xwT(const QuantizedWeight& W, int64_t n, const float* x, int64_t ldx, float beta, float* y, int64_t ldy,
               int64_t row0 = 0, int64_t row1 = -1);
// dx [n, in] (row stride lddx) = dy [n, R] (row stride lddy) W' + beta * dx
void qgemm_dyW(const QuantizedWeight& W, int64_t n, const float* dy, int64_t lddy, float beta, float* dx,
               int64_t lddx, int64_t row0 = 0, int64_t row1 = -1);
// Tensor forms on F32 inputs: x [T, in] -> [T, out]; dy [T, out] -> [T, in]. On the CPU the tile GEMMs above; with
// the weight and the input on a CUDA device, the whole matrix is dequantised there into a transient F32 tensor
// (dequantize_on_device, exact) and multiplied in FP32 (cuBLAS), the same products as the CPU's.
Tensor qmatmul_xwT(const Tensor& x_TI, const QuantizedWeight& W);
Tensor qmatmul_dyW(const Tensor& dy_TO, const QuantizedWeight& W);
// W as F32 on its own device, a transient tensor (F32 as is, BF16 widened, FP8 through runtime/fp8.h's fp8_dequantize,
// FP4 through fp4_to_fp8_blocks first: equal to the direct FP4 dequantisation whenever that conversion is lossless,
// which it is for the release's scales, see the header comment).
Tensor dequantize_on_device(const QuantizedWeight& W);
// W's tensors copied to `device` in their own format (FP4 stays packed FP4: 0.5 byte per weight on the device too).
QuantizedWeight to_device(const QuantizedWeight& W, Device device, const std::string& name);

}  // namespace dsv4
