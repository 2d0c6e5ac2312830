// Rotary position embedding as DeepSeek-V4 uses it: interleaved pairs (2i, 2i+1) of the LAST rot_dim
// channels of each row, rotated by angle pos * inv_freq[i]:
//   out[2i] = x[2i] cos - x[2i+1] sin ;  out[2i+1] = x[2i+1] cos + x[2i] sin
// Two frequency tables per model: "main" (rope_theta, plain) for sliding-window layers, and "compress"
// (compress_rope_theta with YaRN) for CSA/HCA layers, their compressors and indexers. No YaRN mscale.
// The inverse rotation (sin -> -sin) de-rotates attention outputs; it is also the backward of the rotation.
// Angles are formed in FP32 as float(pos) * inv_freq, like the reference implementations.
#pragma once

#include <cmath>
#include <vector>

#include "model/config.h"
#include "runtime/model_math.h"
#include "runtime/tensor.h"

namespace dsv4 {

struct RopeTable {
  int64_t rot_dim = 0;
  std::vector<float> inv_freq;  // rot_dim / 2 entries

  static RopeTable plain(int64_t rot_dim, double theta);
  static RopeTable yarn(int64_t rot_dim, double theta, const YarnConfig& yarn);
  // The table a layer with compress ratio `ratio` uses (0 -> main, else compress).
  static RopeTable for_ratio(const ModelConfig& c, int64_t ratio);
};

// Rotates (or, with inverse, de-rotates) the last table.rot_dim channels of `rows` rows of length `dim`
// in place; row r sits at x + r * row_stride and has position pos[r].
template <typename T>
void rope_rows(T* x, int64_t rows, int64_t dim, int64_t row_stride, const int64_t* pos, const RopeTable& table,
               bool inverse) {
  rope_rows_freq(x, rows, dim, row_stride, pos, table.inv_freq.data(), table.rot_dim, inverse);
}

// The tensor-op path's form of the same rotation (runtime/model_ops.h rope_apply, CPU and CUDA twins of rope_rows):
// the table's inv_freq as an F32 [rot_dim / 2] tensor and positions as an I64 [P] tensor (index_tensor: any host
// int64 values, also the plan arrays the kernels read), both on `device`.
// rope_apply(x, pos, inv_freq, inverse) on x [R, dim] (R a multiple of P, row r at pos[r / (R / P)]) runs
// rope_rows_freq with the same inv_freq values and rot_dim = 2 * inv_freq.numel(), so its CPU twin equals rope_rows.
Tensor rope_inv_freq(const RopeTable& table, Device device);
Tensor index_tensor(const std::vector<int64_t>& pos, Device device);

}  // namespace dsv4
