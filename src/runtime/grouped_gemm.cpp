// Frontends of the grouped expert GEMMs (runtime/grouped_gemm.h): validation, allocation, device dispatch, the
// degenerate cases (empty sums, experts without rows) and the FP8 forward as a loop of runtime/fp8.h's fp8_gemm.
#include "runtime/grouped_gemm.h"
#include "runtime/backend_dispatch.h"

#include <algorithm>

#include "runtime/error.h"
#include "runtime/ops.h"

namespace dsv4 {
namespace {


std::string describe(const Tensor& t) { return t.defined() ? t.str() : std::string("none"); }

// A defined contiguous input of `ndim` dims, F32 or BF16, on `device` (undefined device: the tensor's own).
void check_input(const Tensor& t, int ndim, const char* op, const char* arg) {
  DSV4_CHECK(t.defined() && t.ndim() == ndim && t.is_contiguous() &&
                 (t.dtype() == DType::F32 || t.dtype() == DType::BF16),
             "{}: {} must be a contiguous F32 or BF16 {}-D tensor, got {}", op, arg, ndim, describe(t));
}
void check_output(const Tensor& t, const Shape& shape, const Device& device, const char* op, const char* arg) {
  DSV4_CHECK(t.defined() && t.dtype() == DType::F32 && t.is_contiguous() && t.shape() == shape && t.device() == device,
             "{}: {} must be a contiguous F32 {} tensor on {}, got {}", op, arg, shape.str(), device.str(), describe(t));
}
void check_pair(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  DSV4_CHECK(a.dtype() == b.dtype(), "{}: {} is {} but {} is {} (both F32 or both BF16)", op, an, dtype_name(a.dtype()),
             bn, dtype_name(b.dtype()));
  DSV4_CHECK(a.device() == b.device(), "{}: {} on {} but {} on {}", op, an, a.device().str(), bn, b.device().str());
}
// The CPU reference computes in F32: BF16 widens exactly.
Tensor cpu_f32(const Tensor& t) { return t.device().is_cpu() && t.dtype() != DType::F32 ? t.to(DType::F32) : t; }

}  // namespace

const char* grouped_gemm_impl_name(GroupedGemmImpl impl) {
  switch (impl) {
    case GroupedGemmImpl::Auto: return "auto";
    case GroupedGemmImpl::Grouped: return "grouped";
    case GroupedGemmImpl::Loop: return "loop";
  }
  return "?";
}

void check_group_offsets(const std::vector<int64_t>& offsets, int64_t E, int64_t T, const char* op) {
  DSV4_CHECK(static_cast<int64_t>(offsets.size()) == E + 1, "{}: offsets has {} entries, expected E + 1 = {}", op,
             offsets.size(), E + 1);
  DSV4_CHECK(offsets.front() == 0 && offsets.back() == T, "{}: offsets must run from 0 to T = {}, got {} .. {}", op, T,
             offsets.front(), offsets.back());
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    DSV4_CHECK(offsets[e] <= offsets[e + 1], "{}: offsets decrease at expert {} ({} > {})", op, e, offsets[e],
               offsets[e + 1]);
}

void grouped_gemm_forward(const Tensor& x_TK, const Tensor& W_ENK, const std::vector<int64_t>& offsets, Tensor& y_TN,
                          GroupedGemmImpl impl) {
  const char* op = "grouped_gemm_forward";
  check_input(x_TK, 2, op, "x");
  check_input(W_ENK, 3, op, "W");
  check_pair(x_TK, W_ENK, op, "x", "W");
  const int64_t T = x_TK.size(0), K = x_TK.size(1), E = W_ENK.size(0), N = W_ENK.size(1);
  DSV4_CHECK(W_ENK.size(2) == K, "{}: x {} and W {} differ in K", op, x_TK.shape().str(), W_ENK.shape().str());
  check_output(y_TN, Shape{T, N}, x_TK.device(), op, "y");
  check_group_offsets(offsets, E, T, op);
  if (y_TN.numel() == 0) return;
  if (K == 0) return ops::fill(y_TN, 0.0);
  DSV4_BACKEND_DISPATCH(x_TK.device(), grouped_gemm_forward, cpu_f32(x_TK), cpu_f32(W_ENK), offsets, impl, y_TN);
}

void grouped_gemm_dgrad(const Tensor& dy_TN, const Tensor& W_ENK, const std::vector<int64_t>& offsets, Tensor& dx_TK,
                        GroupedGemmImpl impl) {
  const char* op = "grouped_gemm_dgrad";
  check_input(dy_TN, 2, op, "dy");
  check_input(W_ENK, 3, op, "W");
  check_pair(dy_TN, W_ENK, op, "dy", "W");
  const int64_t T = dy_TN.size(0), N = dy_TN.size(1), E = W_ENK.size(0), K = W_ENK.size(2);
  DSV4_CHECK(W_ENK.size(1) == N, "{}: dy {} and W {} differ in N", op, dy_TN.shape().str(), W_ENK.shape().str());
  check_output(dx_TK, Shape{T, K}, dy_TN.device(), op, "dx");
  check_group_offsets(offsets, E, T, op);
  if (dx_TK.numel() == 0) return;
  if (N == 0) return ops::fill(dx_TK, 0.0);
  DSV4_BACKEND_DISPATCH(dy_TN.device(), grouped_gemm_dgrad, cpu_f32(dy_TN), cpu_f32(W_ENK), offsets, impl, dx_TK);
}

void grouped_gemm_wgrad(const Tensor& dy_TN, const Tensor& x_TK, const std::vector<int64_t>& offsets, Tensor& dW_ENK,
                        bool accumulate, GroupedGemmImpl impl) {
  const char* op = "grouped_gemm_wgrad";
  check_input(dy_TN, 2, op, "dy");
  check_input(x_TK, 2, op, "x");
  check_pair(dy_TN, x_TK, op, "dy", "x");
  const int64_t T = dy_TN.size(0), N = dy_TN.size(1), K = x_TK.size(1);
  DSV4_CHECK(x_TK.size(0) == T, "{}: dy {} and x {} differ in T", op, dy_TN.shape().str(), x_TK.shape().str());
  DSV4_CHECK(dW_ENK.defined() && dW_ENK.ndim() == 3, "{}: dW must be a 3-D [E, N, K] tensor, got {}", op,
             describe(dW_ENK));
  const int64_t E = dW_ENK.size(0);
  check_output(dW_ENK, Shape{E, N, K}, dy_TN.device(), op, "dW");
  check_group_offsets(offsets, E, T, op);
  if (dW_ENK.numel() == 0) return;
  bool any = false;
  for (int64_t e = 0; e < E; ++e) {
    const bool empty = offsets[size_t(e + 1)] == offsets[size_t(e)];
    any = any || !empty;
    if (empty && !accumulate) {  // the empty sum
      Tensor slice = dW_ENK.select(0, e);
      ops::fill(slice, 0.0);
    }
  }
  if (!any) return;
  DSV4_BACKEND_DISPATCH(dy_TN.device(), grouped_gemm_wgrad, cpu_f32(dy_TN), cpu_f32(x_TK), offsets, accumulate, impl,
                        dW_ENK);
}

Tensor grouped_matmul(const Tensor& x_TK, const Tensor& W_ENK, const std::vector<int64_t>& offsets,
                      GroupedGemmImpl impl) {
  check_input(x_TK, 2, "grouped_matmul", "x");
  check_input(W_ENK, 3, "grouped_matmul", "W");
  Tensor y = Tensor::empty({x_TK.size(0), W_ENK.size(1)}, DType::F32, x_TK.device());
  grouped_gemm_forward(x_TK, W_ENK, offsets, y, impl);
  return y;
}

Tensor grouped_matmul_dgrad(const Tensor& dy_TN, const Tensor& W_ENK, const std::vector<int64_t>& offsets,
                            GroupedGemmImpl impl) {
  check_input(dy_TN, 2, "grouped_matmul_dgrad", "dy");
  check_input(W_ENK, 3, "grouped_matmul_dgrad", "W");
  Tensor dx = Tensor::empty({dy_TN.size(0), W_ENK.size(2)}, DType::F32, dy_TN.device());
  grouped_gemm_dgrad(dy_TN, W_ENK, offsets, dx, impl);
  return dx;
}

Tensor grouped_matmul_wgrad(const Tensor& dy_TN, const Tensor& x_TK, const std::vector<int64_t>& offsets,
                            GroupedGemmImpl impl) {
  check_input(dy_TN, 2, "grouped_matmul_wgrad", "dy");
  check_input(x_TK, 2, "grouped_matmul_wgrad", "x");
  DSV4_CHECK(!offsets.empty(), "grouped_matmul_wgrad: offsets must have E + 1 >= 1 entries");
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  Tensor dW = Tensor::empty({E, dy_TN.size(1), x_TK.size(1)}, DType::F32, dy_TN.device());
  grouped_gemm_wgrad(dy_TN, x_TK, offsets, dW, /*accumulate=*/false, impl);
  return dW;
}

// ---- FP8 ---------------------------------------------------------------------------------------------------------

Fp8ExpertWeights fp8_quantize_expert_blocks(const Tensor& W_ENK, ScaleFormat fmt) {
  DSV4_CHECK(W_ENK.defined() && W_ENK.ndim() == 3, "fp8_quantize_expert_blocks: expected W [E, N, K], got {}",
             describe(W_ENK));
  const int64_t E = W_ENK.size(0), N = W_ENK.size(1), K = W_ENK.size(2);
  const Shape s = fp8_scale_shape(N, K, Fp8Layout::Blocks128x128);
  Fp8ExpertWeights w;
  w.q = Tensor::empty({E, N, K}, DType::F8_E4M3, W_ENK.device());
  w.scale = Tensor::empty({E, s[0], s[1]}, fmt == ScaleFormat::F32 ? DType::F32 : DType::F8_E8M0, W_ENK.device());
  for (int64_t e = 0; e < E; ++e) {
    const Fp8Tensor b = fp8_quantize_blocks(W_ENK.select(0, e), fmt);
    Tensor q = w.q.select(0, e), sc = w.scale.select(0, e);
    ops::copy(b.q, q);
    ops::copy(b.scale, sc);
  }
  return w;
}

void grouped_fp8_gemm_forward(const Fp8Tensor& x_TK, const Fp8ExpertWeights& W_ENK, const std::vector<int64_t>& offsets,
                              Tensor& y_TN, Fp8GemmImpl impl) {
  const char* op = "grouped_fp8_gemm_forward";
  DSV4_CHECK(x_TK.q.defined() && x_TK.q.ndim() == 2 && x_TK.layout == Fp8Layout::Rows1x128,
             "{}: x must be a 2-D 1x128-scaled FP8 tensor, got {}", op, describe(x_TK.q));
  DSV4_CHECK(W_ENK.q.defined() && W_ENK.q.ndim() == 3 && W_ENK.q.dtype() == DType::F8_E4M3 && W_ENK.q.is_contiguous(),
             "{}: W codes must be a contiguous F8_E4M3 [E, N, K] tensor, got {}", op, describe(W_ENK.q));
  const int64_t T = x_TK.rows(), K = x_TK.cols(), E = W_ENK.q.size(0), N = W_ENK.q.size(1);
  DSV4_CHECK(W_ENK.q.size(2) == K, "{}: x {} and W {} differ in K", op, x_TK.q.shape().str(), W_ENK.q.shape().str());
  const Shape s = fp8_scale_shape(N, K, Fp8Layout::Blocks128x128);
  DSV4_CHECK(W_ENK.scale.defined() && W_ENK.scale.is_contiguous() && W_ENK.scale.shape() == Shape({E, s[0], s[1]}),
             "{}: W scales must be contiguous [{}, {}, {}], got {}", op, E, s[0], s[1], describe(W_ENK.scale));
  check_output(y_TN, Shape{T, N}, x_TK.q.device(), op, "y");
  check_group_offsets(offsets, E, T, op);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[size_t(e)], r1 = offsets[size_t(e + 1)];
    if (r1 == r0) continue;
    const Fp8Tensor w = W_ENK.expert(e);
    const int64_t m = r1 - r0, m4 = (m + 3) / 4 * 4;
    // Auto on CUDA: a pad4(m)-row window of x containing the expert's rows, through a scratch (see the header).
    if (impl == Fp8GemmImpl::Auto && x_TK.q.device().is_cuda() && m4 != m && m4 <= T) {
      const int64_t w0 = std::min(r0, T - m4);
      const Fp8Tensor xw = fp8_rows_slice(x_TK, w0, w0 + m4);
      Tensor yw = Tensor::empty({m4, N}, DType::F32, y_TN.device());
      fp8_gemm(xw, w, yw, impl);
      Tensor ye = y_TN.slice(0, r0, r1);
      ops::copy(yw.slice(0, r0 - w0, r0 - w0 + m), ye);
      continue;
    }
    const Fp8Tensor xe = fp8_rows_slice(x_TK, r0, r1);
    Tensor ye = y_TN.slice(0, r0, r1);
    fp8_gemm(xe, w, ye, impl);
  }
}

Tensor grouped_fp8_matmul(const Fp8Tensor& x_TK, const Fp8ExpertWeights& W_ENK, const std::vector<int64_t>& offsets,
                          Fp8GemmImpl impl) {
  DSV4_CHECK(x_TK.q.defined() && W_ENK.q.defined() && W_ENK.q.ndim() == 3,
             "grouped_fp8_matmul: x and W [E, N, K] must be defined");
  Tensor y = Tensor::empty({x_TK.rows(), W_ENK.q.size(1)}, DType::F32, x_TK.q.device());
  grouped_fp8_gemm_forward(x_TK, W_ENK, offsets, y, impl);
  return y;
}

}  // namespace dsv4
