// Element types and exact scalar conversions, shared by the CPU reference and the CUDA kernels
// (every function is __host__ __device__ under nvcc), so both backends round identically.
//
// Semantics are bit-identical to ml_dtypes / numpy (checked by tests/runtime/test_dtype.cpp against
// fixtures written by tests/ref/gen_dtype_fixtures.py):
//   F32 -> BF16     round-to-nearest-even; NaN -> quiet NaN 0x7FC0 with the sign kept.
//   F32 -> F16      round-to-nearest-even with subnormals; overflow -> inf; NaN keeps its top payload bits.
//   F32 -> F8_E4M3  (e4m3fn: bias 7, no inf, max 448) saturating round-to-nearest-even: |x| >= 448 and
//                   inf give +-448; NaN -> sign|0x7F. Equals ml_dtypes(clip(x, -448, 448)).
//   F32 -> F4_E2M1  (bias 1, no inf/NaN, max 6) saturating RNE. NaN follows ml_dtypes: +NaN -> 0x8, -NaN -> 0x0.
//   F8_E8M0         unsigned power-of-two scale 2^(e-127); 0xFF is NaN. Encoded only from exact powers of
//                   two or by the ceiling rule used for quantisation scales (e8m0_ceil_from_f32).
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#if defined(__CUDACC__)
#define DSV4_HD __host__ __device__ __forceinline__
#else
#define DSV4_HD inline
#endif

namespace dsv4 {

enum class DType : uint8_t { F32, BF16, F16, F8_E4M3, F8_E8M0, F4_E2M1, I8, I32, I64, U8 };
inline constexpr int kNumDTypes = 10;

// Storage bits per element (4 for packed FP4: two elements per byte, low nibble = even index).
constexpr int dtype_bits(DType t) {
  switch (t) {
    case DType::F32: case DType::I32: return 32;
    case DType::BF16: case DType::F16: return 16;
    case DType::F8_E4M3: case DType::F8_E8M0: case DType::I8: case DType::U8: return 8;
    case DType::F4_E2M1: return 4;
    case DType::I64: return 64;
  }
  return 0;
}
constexpr bool dtype_is_float(DType t) {
  return t == DType::F32 || t == DType::BF16 || t == DType::F16 || t == DType::F8_E4M3 ||
         t == DType::F8_E8M0 || t == DType::F4_E2M1;
}
// Bytes needed for n elements (packed FP4 rounds up to whole bytes).
constexpr int64_t dtype_nbytes(DType t, int64_t n) { return (n * dtype_bits(t) + 7) / 8; }

// Names as in safetensors headers ("F32", "BF16", "F8_E4M3", "F8_E8M0", ...); packed FP4 is "F4_E2M1".
std::string_view dtype_name(DType t);
// Parses a name produced by dtype_name; throws dsv4::Error naming the text otherwise.
DType dtype_from_name(std::string_view name);

template <typename T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::F32; };
template <> struct dtype_of<int8_t> { static constexpr DType value = DType::I8; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::U8; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::I32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::I64; };

// ---- bit casts ---------------------------------------------------------------------------------------
DSV4_HD uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
DSV4_HD float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// ---- BF16 -----------------------------------------------------------------------------------------
DSV4_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7FC0u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
DSV4_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }
// Round an FP32 value to the nearest BF16 value, returned as FP32 (the emulation of a BF16 store).
DSV4_HD float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// ---- F16 (IEEE binary16) ----------------------------------------------------------------------------
DSV4_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) {  // inf or NaN
    if (a == 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u);
    uint32_t payload = (a & 0x7FFFFFu) >> 13;
    return static_cast<uint16_t>(sign | 0x7C00u | (payload ? payload : 1u));
  }
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds past 65504 -> inf
  const int e = static_cast<int>(a >> 23) - 127;
  if (e >= -14) {  // normal half
    const uint32_t r = a - ((127u - 15u) << 23);
    return static_cast<uint16_t>(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
  }
  const int shift = -1 - e;  // half subnormal m = |x| * 2^24, mantissa with implicit bit is 24 bits
  if (shift > 24 || a < 0x00800000u) return static_cast<uint16_t>(sign);
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t m = (mant + (1u << (shift - 1)) - 1u + ((mant >> shift) & 1u)) >> shift;
  return static_cast<uint16_t>(sign | m);
}
DSV4_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return f32_from_bits(sign | 0x7F800000u | (m << 13));
  if (e != 0) return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
  return f32_from_bits(sign | f32_bits(static_cast<float>(m) * 5.9604644775390625e-8f));  // m * 2^-24
}

// ---- small saturating minifloats (E4M3FN, E2M1) --------------------------------------------------
namespace detail {
// Round |x| (f32 bits `a`, finite, below the saturation threshold) to a minifloat with kMant mantissa
// bits and exponent bias kBias; returns exponent|mantissa bits without the sign.
template <int kMant, int kBias>
DSV4_HD uint32_t minifloat_magnitude(uint32_t a) {
  const int e = static_cast<int>(a >> 23) - 127;
  if (e >= 1 - kBias) {  // normal: rebias, then round the mantissa to kMant bits (carry may bump exponent)
    const uint32_t r = a - (static_cast<uint32_t>(127 - kBias) << 23);
    constexpr int kShift = 23 - kMant;
    return (r + (1u << (kShift - 1)) - 1u + ((r >> kShift) & 1u)) >> kShift;
  }
  // subnormal: value / 2^(1 - kBias - kMant), an integer 0..2^kMant after rounding
  const int shift = 24 - kBias - kMant - e;
  if (shift > 24 || a < 0x00800000u) return 0;
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  return (mant + (1u << (shift - 1)) - 1u + ((mant >> shift) & 1u)) >> shift;
}
}  // namespace detail

inline constexpr float kE4M3Max = 448.0f;
inline constexpr float kE2M1Max = 6.0f;

DSV4_HD uint8_t f32_to_e4m3(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Fu);
  if (a >= 0x43E00000u) return static_cast<uint8_t>(sign | 0x7Eu);  // >= 448 (and inf) saturate
  return static_cast<uint8_t>(sign | detail::minifloat_magnitude<3, 7>(a));
}
DSV4_HD float e4m3_to_f32(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t e = (c >> 3) & 0xFu, m = c & 0x7u;
  if (e == 0xF && m == 0x7) return f32_from_bits(sign | 0x7FC00000u);
  if (e != 0) return f32_from_bits(sign | ((e + 120u) << 23) | (m << 20));
  return f32_from_bits(sign | f32_bits(static_cast<float>(m) * 0.001953125f));  // m * 2^-9
}

DSV4_HD uint8_t f32_to_e2m1(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return (u >> 31) ? 0x0u : 0x8u;  // ml_dtypes' NaN mapping (E2M1 has no NaN)
  const uint32_t sign = (u >> 28) & 0x8u;
  if (a >= 0x40C00000u) return static_cast<uint8_t>(sign | 0x7u);  // >= 6 (and inf) saturate
  return static_cast<uint8_t>(sign | detail::minifloat_magnitude<1, 1>(a));
}
DSV4_HD float e2m1_to_f32(uint8_t c) {
  // 0, .5, 1, 1.5, 2, 3, 4, 6 for codes 0..7; code 8..15 are the negatives (8 is -0).
  const uint32_t mag = c & 0x7u;
  const float v = mag < 2 ? 0.5f * static_cast<float>(mag)
                          : f32_from_bits(((static_cast<uint32_t>(mag >> 1) + 126u) << 23) | ((mag & 1u) << 22));
  return (c & 0x8u) ? -v : v;
}

// ---- E8M0 scales ----------------------------------------------------------------------------------
DSV4_HD float e8m0_to_f32(uint8_t c) {
  if (c == 0xFF) return f32_from_bits(0x7FC00000u);
  if (c == 0) return f32_from_bits(0x00400000u);  // 2^-127 is an FP32 subnormal
  return f32_from_bits(static_cast<uint32_t>(c) << 23);
}
// Code of the smallest power of two >= x (x > 0, finite): the ue8m0 quantisation-scale rule
// 2^ceil(log2(x)). Values below 2^-127 give code 0; above 2^127, or x <= 0 / NaN, give 0xFF (NaN).
DSV4_HD uint8_t e8m0_ceil_from_f32(float x) {
  const uint32_t u = f32_bits(x);
  if ((u >> 31) || u == 0 || u >= 0x7F800000u) return 0xFF;
  if (u <= 0x00400000u) return 0;  // <= 2^-127
  if (u < 0x00800000u) return 1;   // (2^-127, 2^-126)
  const uint32_t e = u >> 23, m = u & 0x7FFFFFu;
  const uint32_t c = e + (m != 0 ? 1u : 0u);
  return c >= 0xFF ? static_cast<uint8_t>(0xFF) : static_cast<uint8_t>(c);
}

// Packed FP4 access: element i lives in byte i/2, low nibble for even i.
DSV4_HD uint8_t fp4_get(const uint8_t* packed, int64_t i) { return (packed[i >> 1] >> ((i & 1) * 4)) & 0xFu; }
DSV4_HD void fp4_set(uint8_t* packed, int64_t i, uint8_t code) {
  const int s = static_cast<int>(i & 1) * 4;
  packed[i >> 1] = static_cast<uint8_t>((packed[i >> 1] & ~(0xFu << s)) | ((code & 0xFu) << s));
}

}  // namespace dsv4
