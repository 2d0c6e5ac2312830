// The model's memory-bound layers and the optimizer's element-wise rules as runtime-level ops over Tensors, with a
// CPU twin (src/runtime/cpu_model_ops.cpp: exactly the loops of runtime/model_math.h and runtime/update_math.h that
// the model and optimizer run) and a CUDA twin (kernels/ops_model_*.cu). Frontends validate, allocate and dispatch on
// the inputs' device, like runtime/fp8.h. All tensors F32 and contiguous unless said otherwise; index tensors I64.
//
// Legend: T rows (tokens), D row width, E experts, K experts per token, N = T*K slots, V (local) vocabulary.
//
// How close the CUDA twins come to the CPU (tests/gpu/test_gpu_model_ops.cpp checks these bounds):
//   bit-identical  hashed_dropout, moe_route (given the same affinities), moe_sort_slots, moe_permute, moe_unpermute, adamw_step,
//                  muon_momentum_step, muon_apply_step (the CUDA files are built with --fmad=false and use IEEE
//                  division / square root; sums that the CPU runs sequentially run in the same order).
//   last bits      functions of exp / log / sin / cos (sqrt_softplus(+backward), swiglu(+backward), rope: CUDA's
//                  expf/log1pf differ from glibc by an ulp or two), RMSNorm (double sums in another order; dweight
//                  sums rows in FP32 per block of rows, then over the blocks), cross-entropy (double sums in another
//                  order, CUDA exp), Newton-Schulz (cuBLAS FP32 GEMMs vs CPU BLAS: rounding differs, within 1e-3).
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/newton_schulz.h"
#include "runtime/tensor.h"
#include "runtime/update_math.h"

namespace dsv4 {

inline constexpr int64_t kCeIgnoreIndex = -100;  // = model/embedding.h kIgnoreIndex

// ---- RMSNorm: y = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) over rows of x [T, D] ----------------------------
struct RmsNormOut {
  Tensor y;     // [T, D]
  Tensor rstd;  // [T]
};
// w: [D] or undefined (unweighted).
RmsNormOut rmsnorm_forward(const Tensor& x, const Tensor& w, double eps);
struct RmsNormGrad {
  Tensor dx;  // [T, D]
  Tensor dw;  // [D] = sum over rows of dy * x * rstd (written, not accumulated); undefined without w
};
RmsNormGrad rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd);

// ---- interleaved partial RoPE (model/rope.h) on the last rot_dim = 2 * inv_freq.numel() channels of each row -------
// x [R, dim] in place (last dim contiguous, any row stride). pos I64 [P] with R % P == 0: row r has position
// pos[r / (R / P)] (x [T, H, d] seen as [T*H, d] with pos [T]). inv_freq F32 [rot_dim / 2] on x's device.
// inverse = true de-rotates; the backward of one direction is the other.
void rope_apply(Tensor& x, const Tensor& pos, const Tensor& inv_freq, bool inverse);

// ---- clamped SwiGLU: h = w[r] * silu(min(g, L)) * clamp(u, -L, L) over g, u [T, I]; w [T] or undefined ------------
// g and u: contiguous, or the column halves [:, :I] and [:, I:] of one [T, 2I] tensor (the fused w1 | w3 GEMM's
// output): a contiguous last dim and the same row stride. h, dh contiguous.
Tensor swiglu(const Tensor& g, const Tensor& u, const Tensor& w, double limit);
struct SwigluGrad {
  Tensor dg, du;  // [T, I]: contiguous, or with fused_grads the column halves of dgu
  Tensor dgu;     // [T, 2I] (only with fused_grads)
  Tensor dw;      // [T] (only with w)
};
SwigluGrad swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& w, const Tensor& dh, double limit,
                           bool fused_grads = false);

// ---- hashed dropout (model/lora.h's drop()): out [n, m] (contiguous) = x * keep_scale where
// dropout_keep(stream, mask_offset + i * m + j, p) (runtime/model_math.h), else 0. x: F32 [n, m], unit stride in the
// last dim (any row stride). Bit-identical on both backends.
Tensor hashed_dropout(const Tensor& x, uint64_t stream, double p, float keep_scale, uint64_t mask_offset);

// ---- router: aff = sqrt(softplus(s)); top-K of aff + bias (ties to the lower id, NaN first) or fixed ids (hash);
// w = aff[idx] / (sum aff[idx] + 1e-20) * route_scale ------------------------------------------------------------
Tensor sqrt_softplus(const Tensor& s);                                                   // any shape
Tensor sqrt_softplus_backward(const Tensor& s, const Tensor& aff, const Tensor& daff);  // ds
struct MoeRoute {
  Tensor idx;  // I64 [T, K] (learned: descending by aff + bias)
  Tensor w;    // [T, K]
};
// aff [T, E]; bias [E] or undefined; fixed_idx I64 [T, K] or undefined (then K = fixed_idx.size(1) must match).
MoeRoute moe_route(const Tensor& aff, const Tensor& bias, const Tensor& fixed_idx, int64_t K, double route_scale);
// daff [T, E] (zeros, then the gradient of w given dw [T, K]).
Tensor moe_route_backward(const Tensor& aff, const Tensor& idx, const Tensor& dw, double route_scale);

// ---- token permutation into expert-sorted slots (model/moe.cpp's dispatch order) ---------------------------------
struct MoeSlots {
  Tensor offsets;      // I64 [E + 1]: expert e owns sorted positions [offsets[e], offsets[e + 1])
  Tensor sorted_slot;  // I64 [N]: slot t*K + j at each sorted position (slot-ascending inside an expert)
};
// idx I64 [T, K] with entries in [0, E) (CUDA does not check them).
MoeSlots moe_sort_slots(const Tensor& idx, int64_t E);
// out [N, D]: out[p] = x[sorted_slot[p] / K].
Tensor moe_permute(const Tensor& x, const Tensor& sorted_slot, int64_t K);
// y [T, D]: y[t] = sum over the sorted positions p of t's slots, ascending, of (w[slot] *) y_sorted[p], from +0
// (moe.cpp's combine order). w: [T, K] slot weights or undefined.
Tensor moe_unpermute(const Tensor& y_sorted, const Tensor& sorted_slot, const Tensor& w, int64_t T, int64_t K);

// ---- cross-entropy partials over logits [T, V] (this rank's vocabulary columns [begin, begin + V)) --------------
// targets I64 [T] in global ids (kIgnoreIndex = -100 skips a row). Per row: max = max_v z (float), the
// vocab-parallel caller takes the max over tp, then sumexp = sum_v exp(double(z - max)) and target = z[target - begin]
// (0 when the target is not in this shard or ignored), then lse = max + log(sum over tp of sumexp).
Tensor ce_row_max(const Tensor& logits);  // F32 [T]
// [sumexp (T) | target (T)] in double on the host, the layout model/embedding.cpp reduces over tp with group_sum.
// row_max: F32 [T] on logits' device.
std::vector<double> ce_sums(const Tensor& logits, const Tensor& targets, const Tensor& row_max, int64_t begin);
// dlogits [T, V] = float(exp(double(z) - lse) / norm), then -= float(1 / norm) at the target column; 0 for ignored
// rows; all zeros when norm <= 0. lse [T] (host doubles).
Tensor ce_backward(const Tensor& logits, const Tensor& targets, const std::vector<double>& lse, double norm,
                   int64_t begin);

// ---- gradient clipping over many tensors (optim/clip.h): one call per device, whatever the tensor count ----------
// xs: contiguous F32 tensors on one device (any shapes, empty allowed). sum_squares returns per tensor the sum of x^2
// in double: the CPU adds in element order; CUDA adds fixed chunks of 16384 elements (tree sums in double) and then the
// chunk sums in chunk order, one launch for all tensors. scale_in_place: x = x * factor (FP32 products, the same bits
// on both backends).
std::vector<double> sum_squares(const std::vector<Tensor>& xs);
void scale_in_place(const std::vector<Tensor>& xs, float factor);
// ys[i] = xs[i] rounded to BF16 (dtype.h's f32_to_bf16) for contiguous F32 xs and BF16 ys of the same shapes on one
// device: one launch for the list on CUDA (a layer's expert weights as GEMM operands).
void convert_to_bf16(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys);

// ---- optimizer (optim/update_rules.h), in place, F32 contiguous of equal shapes -------------------------------------
void adamw_step(Tensor& w, const Tensor& g, Tensor& exp_avg, Tensor& exp_avg_sq, const AdamWScalars& s);
void muon_momentum_step(const Tensor& g, Tensor& momentum, Tensor& u, float mu, bool nesterov);
void muon_apply_step(Tensor& w, const Tensor& o, const MuonApplyScalars& s);
// The same updates over lists of tensors (entry i of every list of equal shape; all on one device; s[i] for w[i]):
// one launch for all of them on CUDA (the single-tensor forms above call these).
void adamw_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& g, const std::vector<Tensor>& exp_avg,
                 const std::vector<Tensor>& exp_avg_sq, const std::vector<AdamWScalars>& s);
void muon_momentum_steps(const std::vector<Tensor>& g, const std::vector<Tensor>& momentum,
                         const std::vector<Tensor>& u, float mu, bool nesterov);
void muon_apply_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& o, const MuonApplyScalars& s);
// x [B, r, c] (or [r, c], F32): each matrix orthogonalised in place as newton_schulz(..., precision) does. CPU: that
// loop per matrix. CUDA: batched cuBLAS GEMMs X X^T, b A + c A A, a X + B X on the wide orientation, in FP32 or (BF16)
// on BF16 X, A, B, Y with FP32 accumulation, rounded where the CPU emulation rounds; the GEMMs sum in another order,
// so results differ from the CPU by FP32 rounding (F32) or a few BF16 ulps (BF16).
void newton_schulz_batched(Tensor& x, const std::vector<NsStage>& schedule, double eps,
                           NsPrecision precision = NsPrecision::F32);

// ---- backends: one function per idea, CPU reference and CUDA twin with the same signature -----------------------
// Arguments validated and outputs allocated by the frontends.
#define DSV4_MODEL_BACKEND_OPS                                                                                      \
  void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);                      \
  void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,         \
                        Tensor& dw);                                                                                \
  void rope_apply(Tensor& x, const Tensor& pos, const Tensor& inv_freq, bool inverse);                              \
  void swiglu(const Tensor& g, const Tensor& u, const Tensor& w, double limit, Tensor& h);                          \
  void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& w, const Tensor& dh, double limit,           \
                       Tensor& dg, Tensor& du, Tensor& dw);                                                         \
  void hashed_dropout(const Tensor& x, uint64_t stream, double p, float keep_scale, uint64_t mask_offset,          \
                      Tensor& out);                                                                                 \
  void sqrt_softplus(const Tensor& s, Tensor& aff);                                                                 \
  void sqrt_softplus_backward(const Tensor& s, const Tensor& aff, const Tensor& daff, Tensor& ds);                  \
  void moe_route(const Tensor& aff, const Tensor& bias, const Tensor& fixed_idx, double route_scale, Tensor& idx,   \
                 Tensor& w);                                                                                        \
  void moe_route_backward(const Tensor& aff, const Tensor& idx, const Tensor& dw, double route_scale,               \
                          Tensor& daff);                                                                            \
  void moe_sort_slots(const Tensor& idx, int64_t E, Tensor& offsets, Tensor& sorted_slot);                          \
  void moe_permute(const Tensor& x, const Tensor& sorted_slot, int64_t K, Tensor& out);                             \
  void moe_unpermute(const Tensor& y_sorted, const Tensor& sorted_slot, const Tensor& w, int64_t K, Tensor& y);     \
  void ce_row_max(const Tensor& logits, Tensor& row_max);                                                           \
  void ce_sums(const Tensor& logits, const Tensor& targets, const Tensor& row_max, int64_t begin,                 \
               std::vector<double>& sums);                                                                          \
  void ce_backward(const Tensor& logits, const Tensor& targets, const std::vector<double>& lse, double norm,       \
                   int64_t begin, Tensor& dlogits);                                                                 \
  void adamw_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& g, const std::vector<Tensor>& exp_avg,  \
                   const std::vector<Tensor>& exp_avg_sq, const std::vector<AdamWScalars>& s);                      \
  void muon_momentum_steps(const std::vector<Tensor>& g, const std::vector<Tensor>& momentum,                      \
                           const std::vector<Tensor>& u, float mu, bool nesterov);                                  \
  void muon_apply_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& o, const MuonApplyScalars& s);     \
  void newton_schulz_batched(Tensor& x, const std::vector<NsStage>& schedule, double eps, NsPrecision precision); \
  void sum_squares(const std::vector<Tensor>& xs, std::vector<double>& sums);                                       \
  void scale_in_place(const std::vector<Tensor>& xs, float factor);                                                \
  void convert_to_bf16(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys);
namespace cpu {
DSV4_MODEL_BACKEND_OPS
}
namespace cuda {
DSV4_MODEL_BACKEND_OPS
}
#undef DSV4_MODEL_BACKEND_OPS

}  // namespace dsv4
