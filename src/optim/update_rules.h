// The per-tensor update rules on raw host FP32 buffers: Muon (with the hybrid Newton-Schulz orthogonalisation)
// and AdamW. Optimizer (optimizer.h) applies them to named parameters; tests call them directly.
//
// Muon (DeepSeek-V4 report Algorithm 1, dsv4-architecture.md §4), for a matrix W [n, m] with gradient G:
//   M <- mu M + G                       momentum (mu = 0.95)
//   U <- mu M + G  (Nesterov; else U = M)
//   X <- U / max(||U||_F, eps)          (eps 1e-7, as torch.optim.Muon)
//   X <- a X + b (X X^T) X + c (X X^T)^2 X, for each stage of the schedule
//        default: 8 x (3.4445, -4.7750, 2.0315) then 2 x (2, -1.5, 0.5); tall matrices (n > m) are transposed
//        first so the Gram matrix X X^T is the small side (min(n, m)^2), and transposed back
//   O  = X * gamma * sqrt(max(n, m))    (gamma = 0.18: update RMS matched to AdamW's)
//   W <- W (1 - lr wd) - lr O           (decoupled weight decay, wd = 0.1)
// NS runs in FP32 GEMMs (cpu_gemm, row-major). NsPrecision::BF16 emulates a BF16 NS (as torch.optim.Muon runs it):
// U is rounded to BF16, the norm is a BF16 value, the normalised X and every GEMM result (X X^T, b A + c A A,
// a X + B X) are rounded to BF16, with FP32 accumulation inside the GEMMs; on CUDA (the optimizer's tensor-op path,
// runtime/model_ops.h newton_schulz_batched) these are real BF16 cuBLAS GEMMs rounded at the same points.
// With row_blocks = k > 1 the matrix is k independent [n/k, m] matrices (one NS and one sqrt(max(n/k, m)) each).
//
// AdamW (torch.optim.AdamW semantics, step t counted from 1 for each parameter):
//   W <- W (1 - lr wd)
//   m <- m + (1 - b1) (g - m)                 (torch's lerp)
//   v <- b2 v + (1 - b2) g^2
//   W <- W - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// with b1 0.9, b2 0.95, eps 1e-20, wd 0.1 by default. Scalars are formed in double and applied in FP32.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/newton_schulz.h"  // NsStage, hybrid_ns_schedule, NsPrecision, newton_schulz
#include "runtime/update_math.h"    // the element-wise update rules shared with runtime/model_ops.h

namespace dsv4 {

struct MuonConfig {
  double momentum = 0.95;
  bool nesterov = true;
  std::vector<NsStage> ns_schedule = hybrid_ns_schedule();
  double ns_eps = 1e-7;
  double update_scale = 0.18;  // gamma
  double weight_decay = 0.1;
  NsPrecision precision = NsPrecision::F32;

  void validate() const;  // throws naming the bad field
};

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-20;
  double weight_decay = 0.1;

  void validate() const;
};

// One Muon step on W [rows, cols] with gradient g and momentum buffer (all contiguous, FP32).
void muon_update(float* w, const float* g, float* momentum, int64_t rows, int64_t cols, int64_t row_blocks, double lr,
                 const MuonConfig& cfg);

// The three parts of muon_update, for callers that orthogonalise elsewhere (distributed Muon gathers the tp slices
// of U first): U = momentum update of g (momentum updated in place); U orthogonalised in place per row block;
// W <- W (1 - lr wd) - lr gamma sqrt(max(block_rows, cols)) O over n elements.
void muon_momentum(const float* g, float* momentum, float* u, int64_t n, const MuonConfig& cfg);
void muon_orthogonalize(float* u, int64_t rows, int64_t cols, int64_t row_blocks, const MuonConfig& cfg);
void muon_apply(float* w, const float* o, int64_t n, int64_t block_rows, int64_t cols, double lr, const MuonConfig& cfg);

// One AdamW step on n elements; `step` is the parameter's step count including this one (>= 1).
void adamw_update(float* w, const float* g, float* exp_avg, float* exp_avg_sq, int64_t n, int64_t step, double lr,
                  const AdamWConfig& cfg);

}  // namespace dsv4
