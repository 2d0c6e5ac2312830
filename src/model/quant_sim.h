// Release-only numerics of DeepSeek-V4's attention, simulated in FP32 ("fake quantisation"):
//   * hadamard_rows: the normalised Walsh-Hadamard rotation y = H x / sqrt(n) (Sylvester order, as
//     fast_hadamard_transform(x, scale = n^-0.5) in the official indexer). H/sqrt(n) is symmetric and
//     orthogonal, so it is its own inverse and its own backward.
//   * fp8_block_fake_quant_rows: official kernel.py act_quant(..., inplace=True): per block of `block`
//     consecutive channels, amax = max(|x|, 1e-4), scale s = amax / 448 (or, with ue8m0 scales,
//     2^ceil(log2(amax * (1/448)))), y = e4m3(x / s) * s with the saturating E4M3 conversion of dtype.h.
//   * fp4_block_fake_quant_rows: official fp4_act_quant(..., inplace=True): amax = max(|x|, 6 * 2^-126),
//     s = 2^ceil(log2(amax * (1/6))), y = e2m1(x / s) * s.
// Rows of length `cols` whose length is not a multiple of the block end with one shorter block (the release
// shapes are always multiples; the tiny test shapes are not).
//
// These are OFF by default in the model (AttentionOptions::simulate_release_quant): the Hugging Face port,
// our FP32 oracle, has none of them. Gradients pass straight through the fake quantisers (STE).
#pragma once

#include <cmath>
#include <cstdint>

#include "runtime/error.h"

namespace dsv4 {

// In place, for `rows` rows of length n (a power of two) at x + r * row_stride.
template <typename T>
void hadamard_rows(T* x, int64_t rows, int64_t n, int64_t row_stride) {
  DSV4_CHECK(n > 0 && (n & (n - 1)) == 0, "hadamard_rows: length {} is not a power of two", n);
  const T norm = static_cast<T>(1.0 / std::sqrt(static_cast<double>(n)));
  for (int64_t r = 0; r < rows; ++r) {
    T* v = x + r * row_stride;
    for (int64_t h = 1; h < n; h *= 2)
      for (int64_t i = 0; i < n; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const T a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
    for (int64_t i = 0; i < n; ++i) v[i] *= norm;
  }
}

// In place on `cols` channels of `rows` rows at x + r * row_stride.
void fp8_block_fake_quant_rows(float* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t block, bool ue8m0);
void fp4_block_fake_quant_rows(float* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t block);

// Scalar helpers (exposed for tests): the scale a block with absolute maximum `amax` gets.
float fp8_block_scale(float amax, bool ue8m0);
float fp4_block_scale(float amax);

}  // namespace dsv4
