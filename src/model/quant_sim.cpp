#include "model/quant_sim.h"

#include <algorithm>

#include "runtime/dtype.h"

namespace dsv4 {

namespace {
// 2^ceil(log2(v)) for the positive, finite, normal values the callers pass (their amax floors keep v normal).
float pow2_ceil(float v) { return e8m0_to_f32(e8m0_ceil_from_f32(v)); }

template <typename Quant>
void block_rows(float* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t block, Quant quant) {
  DSV4_CHECK(block > 0 && rows >= 0 && cols >= 0, "fake quant: bad sizes rows={} cols={} block={}", rows, cols, block);
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * row_stride;
    for (int64_t b0 = 0; b0 < cols; b0 += block) {
      const int64_t b1 = std::min(cols, b0 + block);
      float amax = 0.0f;
      for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::abs(v[i]));
      quant(v + b0, b1 - b0, amax);
    }
  }
}
}  // namespace

float fp8_block_scale(float amax, bool ue8m0) {
  const float a = std::max(amax, 1e-4f);
  const float inv = static_cast<float>(1.0 / 448.0);  // kernel.py multiplies by fp8_max_inv
  return ue8m0 ? pow2_ceil(a * inv) : a * inv;
}

float fp4_block_scale(float amax) {
  const float a = std::max(amax, 6.0f * 1.1754943508222875e-38f);  // 6 * 2^-126
  return pow2_ceil(a * static_cast<float>(1.0 / 6.0));
}

void fp8_block_fake_quant_rows(float* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t block, bool ue8m0) {
  block_rows(x, rows, cols, row_stride, block, [ue8m0](float* v, int64_t n, float amax) {
    const float s = fp8_block_scale(amax, ue8m0);
    for (int64_t i = 0; i < n; ++i) v[i] = e4m3_to_f32(f32_to_e4m3(v[i] / s)) * s;  // E4M3 saturates = clamp
  });
}

void fp4_block_fake_quant_rows(float* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t block) {
  block_rows(x, rows, cols, row_stride, block, [](float* v, int64_t n, float amax) {
    const float s = fp4_block_scale(amax);
    for (int64_t i = 0; i < n; ++i) v[i] = e2m1_to_f32(f32_to_e2m1(v[i] / s)) * s;
  });
}

}  // namespace dsv4
