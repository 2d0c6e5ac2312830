// Newton-Schulz orthogonalisation of Muon (schedule, precision and the CPU FP32/BF16-emulating routine; the
// algorithm is described in optim/update_rules.h). Lives in the runtime so that runtime/model_ops.h can offer a
// batched GPU version with this as its CPU twin; optim/update_rules.h includes it.
#pragma once

#include <cstdint>
#include <vector>

namespace dsv4 {

struct NsStage {
  int64_t steps = 0;
  double a = 0, b = 0, c = 0;
  bool operator==(const NsStage&) const = default;
};

// 8 x (3.4445, -4.7750, 2.0315) then 2 x (2, -1.5, 0.5).
std::vector<NsStage> hybrid_ns_schedule();

enum class NsPrecision : uint8_t { F32, BF16 };

// FLOPs of the GEMMs of newton_schulz on one [rows, cols] matrix: per iteration X X^T (2 r^2 c), b A + c A A (2 r^3)
// and a X + B X (2 r^2 c), with r = min(rows, cols), c = max.
double newton_schulz_flops(int64_t rows, int64_t cols, const std::vector<NsStage>& schedule);

// Orthogonalises x [rows, cols] (row-major, contiguous) into out (same shape; out may equal x).
void newton_schulz(const float* x, float* out, int64_t rows, int64_t cols, const std::vector<NsStage>& schedule,
                   double eps, NsPrecision precision = NsPrecision::F32);

}  // namespace dsv4
