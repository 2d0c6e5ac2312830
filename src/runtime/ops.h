// Tensor operations. Each op validates its arguments once here and dispatches to the backend of the
// tensors' device: the CPU reference (cpu_ops.cpp) or, when built, the CUDA kernels (kernels/).
// Both backends implement the signatures listed in backend_ops.def. All tensors of one call must be on
// the same device.
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace dsv4 {

enum class UnaryOp : uint8_t { Neg, Abs, Exp, Log, Sqrt, Rsqrt, Square, Sigmoid, Silu, Relu, Tanh, Softplus };
enum class BinaryOp : uint8_t { Add, Sub, Mul, Div, Max, Min };
enum class ReduceOp : uint8_t { Sum, Mean, Max, Min };

// Backend function tables, declared from backend_ops.def.
#define DSV4_BACKEND_OP(name, params) void name params;
namespace cpu {
#include "runtime/backend_ops.def"
}
namespace cuda {
#include "runtime/backend_ops.def"
}
#undef DSV4_BACKEND_OP

namespace ops {

// Out-of-place frontends: allocate the result on the inputs' device.
void fill(Tensor& out, double value);
Tensor unary(UnaryOp op, const Tensor& x);
Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b);  // numpy broadcasting
inline Tensor add(const Tensor& a, const Tensor& b) { return binary(BinaryOp::Add, a, b); }
inline Tensor sub(const Tensor& a, const Tensor& b) { return binary(BinaryOp::Sub, a, b); }
inline Tensor mul(const Tensor& a, const Tensor& b) { return binary(BinaryOp::Mul, a, b); }
inline Tensor div(const Tensor& a, const Tensor& b) { return binary(BinaryOp::Div, a, b); }
Tensor affine(const Tensor& x, double alpha, double beta);  // alpha * x + beta
Tensor reduce(ReduceOp op, const Tensor& x, int dim, bool keepdim = false);
inline Tensor sum(const Tensor& x, int dim, bool keepdim = false) { return reduce(ReduceOp::Sum, x, dim, keepdim); }
inline Tensor max(const Tensor& x, int dim, bool keepdim = false) { return reduce(ReduceOp::Max, x, dim, keepdim); }
inline Tensor mean(const Tensor& x, int dim, bool keepdim = false) { return reduce(ReduceOp::Mean, x, dim, keepdim); }
Tensor softmax(const Tensor& x);      // over the last dim
Tensor log_softmax(const Tensor& x);  // over the last dim
// op(a) @ op(b); out dtype F32 (or `out_dtype`). 2-D or 3-D batched (dim 0), batch 1 broadcasts.
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false,
              DType out_dtype = DType::F32);
// c = alpha * op(a) @ op(b) + beta * c into an existing c.
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha, float beta, Tensor& c);
Tensor index_select(const Tensor& x, const Tensor& index);            // rows of x along dim 0
void index_add(Tensor& out, const Tensor& index, const Tensor& src);  // out[index[i]] += src[i]
Tensor gather_last(const Tensor& x, const Tensor& index);             // x[..., index[..., j]]
void scatter_add_last(Tensor& out, const Tensor& index, const Tensor& src);
struct TopK {
  Tensor values;   // x's dtype, [..., k]
  Tensor indices;  // I64, [..., k]
};
TopK topk(const Tensor& x, int64_t k);
// Exact dtype conversion (same as Tensor::to(DType)).
Tensor convert(const Tensor& x, DType dtype);
// Copy between tensors of the same shape (any devices, any dtypes; converts when dtypes differ).
void copy(const Tensor& src, Tensor& dst);

}  // namespace ops
}  // namespace dsv4
