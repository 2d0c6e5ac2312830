// Validation and device dispatch of every op (the backends trust these checks).
#include "runtime/ops.h"
#include "runtime/backend_dispatch.h"

#include <algorithm>

#if defined(DSV4_WITH_CUDA)
#include "kernels/cuda_runtime_api.h"
#endif

namespace dsv4 {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E8M0: return "F8_E8M0";
    case DType::F4_E2M1: return "F4_E2M1";
    case DType::I8: return "I8";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  return "?";
}

DType dtype_from_name(std::string_view name) {
  for (int i = 0; i < kNumDTypes; ++i) {
    const auto t = static_cast<DType>(i);
    if (dtype_name(t) == name) return t;
  }
  DSV4_FAIL("unknown dtype '{}' (expected one of F32, BF16, F16, F8_E4M3, F8_E8M0, F4_E2M1, I8, I32, I64, U8)",
            name);
}

namespace {


void check_defined(const Tensor& t, const char* op, const char* arg) {
  DSV4_CHECK(t.defined(), "{}: argument '{}' is an undefined tensor", op, arg);
}

void check_same_device(const char* op, const Tensor& a, const Tensor& b) {
  DSV4_CHECK(a.device() == b.device(), "{}: tensors on different devices ({} and {})", op, a.device().str(),
             b.device().str());
}

bool is_float_compute(DType t, Device d) { return t == DType::F32 || (d.is_cuda() && t == DType::BF16); }

void check_float(const char* op, const Tensor& t) {
  DSV4_CHECK(is_float_compute(t.dtype(), t.device()), "{}: expected F32{} tensor, got {}", op,
             t.device().is_cuda() ? " or BF16" : "", t.str());
}

void check_index(const char* op, const Tensor& index) {
  DSV4_CHECK(index.dtype() == DType::I32 || index.dtype() == DType::I64, "{}: index must be I32 or I64, got {}", op,
             index.str());
}

// Checks that every index value lies in [0, bound). Indices are validated on the host: it costs a copy
// for CUDA tensors, but an out-of-range index would otherwise be silent memory corruption.
void check_index_range(const char* op, const Tensor& index, int64_t bound) {
  const Tensor host = index.to(Device::cpu()).contiguous();
  const int64_t n = host.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = host.dtype() == DType::I64 ? host.data<int64_t>()[i] : host.data<int32_t>()[i];
    DSV4_CHECK(v >= 0 && v < bound, "{}: index {} at position {} is outside [0, {})", op, v, i, bound);
  }
}

Shape broadcast_shapes(const Shape& a, const Shape& b) {
  const int n = std::max(a.ndim(), b.ndim());
  Shape out;
  for (int i = 0; i < n; ++i) out.push_back(1);
  for (int i = 0; i < n; ++i) {
    const int ia = a.ndim() - n + i, ib = b.ndim() - n + i;
    const int64_t da = ia >= 0 ? a[ia] : 1, db = ib >= 0 ? b[ib] : 1;
    DSV4_CHECK(da == db || da == 1 || db == 1, "shapes {} and {} do not broadcast", a.str(), b.str());
    out[i] = da == 1 ? db : da;
  }
  return out;
}

}  // namespace

namespace ops {

void fill(Tensor& out, double value) {
  check_defined(out, "fill", "out");
  DSV4_BACKEND_DISPATCH(out.device(), fill, out, value);
}

void copy(const Tensor& src, Tensor& dst) {
  check_defined(src, "copy", "src");
  check_defined(dst, "copy", "dst");
  DSV4_CHECK(src.shape() == dst.shape(), "copy: shape {} into {}", src.shape().str(), dst.shape().str());
  if (src.dtype() != dst.dtype()) {
    if (src.device() == dst.device() && dst.is_contiguous()) {  // straight into dst
      DSV4_BACKEND_DISPATCH(src.device(), convert, src, dst);
      return;
    }
    // Convert on the source device, then move.
    Tensor converted = Tensor::empty(src.shape(), dst.dtype(), src.device());
    DSV4_BACKEND_DISPATCH(src.device(), convert, src, converted);
    copy(converted, dst);
    return;
  }
  if (src.device() == dst.device()) {
    DSV4_BACKEND_DISPATCH(src.device(), copy, src, dst);
    return;
  }
#if defined(DSV4_WITH_CUDA)
  // Cross-device: contiguous staging on the source side, one memcpy, strided copy on the target side.
  const Tensor src_c = src.contiguous();
  const bool dst_direct = dst.is_contiguous();
  Tensor staging = dst_direct ? dst : Tensor::empty(dst.shape(), dst.dtype(), dst.device());
  const size_t nbytes = static_cast<size_t>(src_c.nbytes());
  if (src.device().is_cpu() && dst.device().is_cuda()) {
    cuda::memcpy_h2d(staging.raw_data(), src_c.raw_data(), nbytes, dst.device().index);
  } else if (src.device().is_cuda() && dst.device().is_cpu()) {
    cuda::memcpy_d2h(staging.raw_data(), src_c.raw_data(), nbytes, src.device().index);
  } else {
    DSV4_FAIL("copy between {} and {} is not supported (stage through the host)", src.device().str(),
              dst.device().str());
  }
  if (!dst_direct) DSV4_BACKEND_DISPATCH(dst.device(), copy, staging, dst);
#else
  DSV4_FAIL("copy from {} to {}: dsv4 was built without CUDA", src.device().str(), dst.device().str());
#endif
}

Tensor convert(const Tensor& x, DType dtype) {
  check_defined(x, "convert", "x");
  Tensor out = Tensor::empty(x.shape(), dtype, x.device());
  if (x.dtype() == dtype)
    DSV4_BACKEND_DISPATCH(x.device(), copy, x, out);
  else
    DSV4_BACKEND_DISPATCH(x.device(), convert, x, out);
  return out;
}

Tensor unary(UnaryOp op, const Tensor& x) {
  check_defined(x, "unary", "x");
  check_float("unary", x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  DSV4_BACKEND_DISPATCH(x.device(), unary, op, x, out);
  return out;
}

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) {
  check_defined(a, "binary", "a");
  check_defined(b, "binary", "b");
  check_same_device("binary", a, b);
  check_float("binary", a);
  DSV4_CHECK(a.dtype() == b.dtype(), "binary: dtypes differ ({} and {})", a.str(), b.str());
  Tensor out = Tensor::empty(broadcast_shapes(a.shape(), b.shape()), a.dtype(), a.device());
  DSV4_BACKEND_DISPATCH(a.device(), binary, op, a, b, out);
  return out;
}

Tensor affine(const Tensor& x, double alpha, double beta) {
  check_defined(x, "affine", "x");
  check_float("affine", x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  DSV4_BACKEND_DISPATCH(x.device(), affine, x, alpha, beta, out);
  return out;
}

Tensor reduce(ReduceOp op, const Tensor& x, int dim, bool keepdim) {
  check_defined(x, "reduce", "x");
  check_float("reduce", x);
  const int d = x.normalize_dim(dim);
  DSV4_CHECK(x.size(d) > 0 || op == ReduceOp::Sum, "reduce: max/min/mean over empty dim {} of {}", d, x.str());
  Shape out_shape = x.shape();
  out_shape[d] = 1;
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  DSV4_BACKEND_DISPATCH(x.device(), reduce, op, x, d, out);
  if (keepdim) return out;
  Shape squeezed;
  for (int i = 0; i < x.ndim(); ++i)
    if (i != d) squeezed.push_back(x.size(i));
  return out.view(squeezed);
}

Tensor softmax(const Tensor& x) {
  check_defined(x, "softmax", "x");
  check_float("softmax", x);
  DSV4_CHECK(x.ndim() >= 1, "softmax of a 0-d tensor");
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  DSV4_BACKEND_DISPATCH(x.device(), softmax, x, out);
  return out;
}

Tensor log_softmax(const Tensor& x) {
  check_defined(x, "log_softmax", "x");
  check_float("log_softmax", x);
  DSV4_CHECK(x.ndim() >= 1, "log_softmax of a 0-d tensor");
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  DSV4_BACKEND_DISPATCH(x.device(), log_softmax, x, out);
  return out;
}

namespace {
// The stride of a size-1 last dim never matters.
bool has_unit_inner_stride(const Tensor& t) { return t.size(-1) == 1 || t.stride(-1) == 1; }
struct GemmDims {
  int64_t batch, m, n, k;
};
GemmDims check_gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b) {
  check_defined(a, "gemm", "a");
  check_defined(b, "gemm", "b");
  check_same_device("gemm", a, b);
  DSV4_CHECK(a.ndim() == b.ndim() && (a.ndim() == 2 || a.ndim() == 3), "gemm: operands must both be 2-D or 3-D, got {} and {}",
             a.str(), b.str());
  DSV4_CHECK(a.dtype() == b.dtype(), "gemm: dtypes differ ({} and {})", a.str(), b.str());
  check_float("gemm", a);
  DSV4_CHECK(has_unit_inner_stride(a) && has_unit_inner_stride(b),
             "gemm: operands need unit stride in the last dim ({}, {})", a.str(), b.str());
  const int r = a.ndim() - 2;
  const int64_t m = trans_a ? a.size(r + 1) : a.size(r), ka = trans_a ? a.size(r) : a.size(r + 1);
  const int64_t kb = trans_b ? b.size(r + 1) : b.size(r), n = trans_b ? b.size(r) : b.size(r + 1);
  DSV4_CHECK(ka == kb, "gemm: inner dims differ: op(a) is [{}, {}] and op(b) is [{}, {}]", m, ka, kb, n);
  int64_t batch = 1;
  if (r == 1) {
    DSV4_CHECK(a.size(0) == b.size(0) || a.size(0) == 1 || b.size(0) == 1, "gemm: batch sizes {} and {} differ",
               a.size(0), b.size(0));
    batch = std::max(a.size(0), b.size(0));
  }
  return {batch, m, n, ka};
}
}  // namespace

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha, float beta, Tensor& c) {
  const GemmDims d = check_gemm(a, trans_a, b, trans_b);
  check_defined(c, "gemm", "c");
  check_same_device("gemm", a, c);
  check_float("gemm", c);
  const Shape expected = a.ndim() == 2 ? Shape{d.m, d.n} : Shape{d.batch, d.m, d.n};
  DSV4_CHECK(c.shape() == expected, "gemm: c is {} but op(a) @ op(b) is {}", c.str(), expected.str());
  DSV4_CHECK(has_unit_inner_stride(c), "gemm: c needs unit stride in the last dim");
  DSV4_BACKEND_DISPATCH(a.device(), gemm, a, trans_a, b, trans_b, alpha, beta, c);
}

Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, DType out_dtype) {
  const GemmDims d = check_gemm(a, trans_a, b, trans_b);
  const Shape shape = a.ndim() == 2 ? Shape{d.m, d.n} : Shape{d.batch, d.m, d.n};
  Tensor c = Tensor::empty(shape, out_dtype, a.device());
  gemm(a, trans_a, b, trans_b, 1.0f, 0.0f, c);
  return c;
}

Tensor index_select(const Tensor& x, const Tensor& index) {
  check_defined(x, "index_select", "x");
  check_defined(index, "index_select", "index");
  check_same_device("index_select", x, index);
  check_index("index_select", index);
  DSV4_CHECK(x.ndim() >= 1 && index.ndim() == 1, "index_select: x {} needs >= 1 dim and index {} must be 1-D",
             x.str(), index.str());
  DSV4_CHECK(x.dtype() != DType::F4_E2M1 || x.ndim() >= 2, "index_select: packed FP4 needs whole rows");
  check_index_range("index_select", index, x.size(0));
  Shape shape = x.shape();
  shape[0] = index.size(0);
  Tensor out = Tensor::empty(shape, x.dtype(), x.device());
  DSV4_BACKEND_DISPATCH(x.device(), index_select, x, index, out);
  return out;
}

void index_add(Tensor& out, const Tensor& index, const Tensor& src) {
  check_defined(out, "index_add", "out");
  check_defined(index, "index_add", "index");
  check_defined(src, "index_add", "src");
  check_same_device("index_add", out, src);
  check_same_device("index_add", out, index);
  check_index("index_add", index);
  check_float("index_add", out);
  DSV4_CHECK(out.dtype() == src.dtype(), "index_add: dtypes differ ({} and {})", out.str(), src.str());
  DSV4_CHECK(index.ndim() == 1 && src.ndim() == out.ndim() && src.size(0) == index.size(0),
             "index_add: src {} must have index {}'s length in dim 0 and out {}'s rank", src.str(), index.str(),
             out.str());
  for (int i = 1; i < out.ndim(); ++i)
    DSV4_CHECK(src.size(i) == out.size(i), "index_add: src {} and out {} differ in dim {}", src.str(), out.str(), i);
  check_index_range("index_add", index, out.size(0));
  DSV4_BACKEND_DISPATCH(out.device(), index_add, src, index, out);
}

namespace {
void check_last_dim_index(const char* op, const Tensor& data, const Tensor& index) {
  check_index(op, index);
  check_same_device(op, data, index);
  DSV4_CHECK(data.ndim() == index.ndim() && data.ndim() >= 1, "{}: {} and index {} need the same rank", op,
             data.str(), index.str());
  for (int i = 0; i + 1 < data.ndim(); ++i)
    DSV4_CHECK(data.size(i) == index.size(i), "{}: {} and index {} differ in dim {}", op, data.str(), index.str(), i);
}
}  // namespace

Tensor gather_last(const Tensor& x, const Tensor& index) {
  check_defined(x, "gather_last", "x");
  check_defined(index, "gather_last", "index");
  check_float("gather_last", x);
  check_last_dim_index("gather_last", x, index);
  check_index_range("gather_last", index, x.size(-1));
  Tensor out = Tensor::empty(index.shape(), x.dtype(), x.device());
  DSV4_BACKEND_DISPATCH(x.device(), gather_last, x, index, out);
  return out;
}

void scatter_add_last(Tensor& out, const Tensor& index, const Tensor& src) {
  check_defined(out, "scatter_add_last", "out");
  check_defined(index, "scatter_add_last", "index");
  check_defined(src, "scatter_add_last", "src");
  check_float("scatter_add_last", out);
  DSV4_CHECK(out.dtype() == src.dtype(), "scatter_add_last: dtypes differ ({} and {})", out.str(), src.str());
  check_same_device("scatter_add_last", out, src);
  check_last_dim_index("scatter_add_last", out, index);
  DSV4_CHECK(src.shape() == index.shape(), "scatter_add_last: src {} must have index {}'s shape", src.str(),
             index.str());
  check_index_range("scatter_add_last", index, out.size(-1));
  DSV4_BACKEND_DISPATCH(out.device(), scatter_add_last, src, index, out);
}

TopK topk(const Tensor& x, int64_t k) {
  check_defined(x, "topk", "x");
  check_float("topk", x);
  DSV4_CHECK(x.ndim() >= 1, "topk of a 0-d tensor");
  DSV4_CHECK(k >= 0 && k <= x.size(-1), "topk: k = {} but the last dim of {} has {} entries", k, x.str(),
             x.size(-1));
  Shape shape = x.shape();
  shape[shape.ndim() - 1] = k;
  TopK r{Tensor::empty(shape, x.dtype(), x.device()), Tensor::empty(shape, DType::I64, x.device())};
  DSV4_BACKEND_DISPATCH(x.device(), topk, x, k, r.values, r.indices);
  return r;
}

}  // namespace ops
}  // namespace dsv4
