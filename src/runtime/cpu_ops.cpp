// CPU reference backend: every op of backend_ops.def in namespace dsv4::cpu.
//
// The frontend (ops.cpp) has validated devices, dtypes, shapes and index ranges and allocated the
// outputs; the functions here only compute. Tensors are N-d and arbitrarily strided (strides in
// elements, offsets relative to raw_data()); all loops go through one index iterator
// (for_each_offset) that walks a shape in row-major order and keeps one running element offset per
// operand. Math is FP32 (the frontend admits only F32 on the CPU); sum/mean accumulate in FP64;
// gemm goes through OpenBLAS cblas_sgemm.
#include <cblas.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "runtime/ops.h"

namespace dsv4::cpu {
namespace {

// ---- iteration -----------------------------------------------------------------------------------

// Calls f(off) for every index of `shape` in row-major order, where off[n] is the element offset
// sum_d index[d] * strides[n][d] of operand n. A 0-d shape visits one element; an empty one none.
template <size_t N, typename F>
void for_each_offset(const Shape& shape, const std::array<Shape, N>& strides, F&& f) {
  const int nd = shape.ndim();
  if (shape.numel() == 0) return;
  std::array<int64_t, N> off{};
  if (nd == 0) {
    f(static_cast<const std::array<int64_t, N>&>(off));
    return;
  }
  const int last = nd - 1;
  const int64_t inner = shape[last];
  std::array<int64_t, N> inner_stride{};
  for (size_t n = 0; n < N; ++n) inner_stride[n] = strides[n][last];
  std::array<int64_t, kMaxDims> idx{};
  while (true) {
    std::array<int64_t, N> o = off;
    for (int64_t i = 0; i < inner; ++i) {
      f(static_cast<const std::array<int64_t, N>&>(o));
      for (size_t n = 0; n < N; ++n) o[n] += inner_stride[n];
    }
    int d = last - 1;
    for (; d >= 0; --d) {  // odometer step over the outer dims
      const size_t ud = static_cast<size_t>(d);
      ++idx[ud];
      for (size_t n = 0; n < N; ++n) off[n] += strides[n][d];
      if (idx[ud] < shape[d]) break;
      for (size_t n = 0; n < N; ++n) off[n] -= strides[n][d] * shape[d];
      idx[ud] = 0;
    }
    if (d < 0) return;
  }
}

// Shape / strides without the last dim (rows of a last-dim op).
Shape drop_last(const Shape& s) {
  Shape r;
  for (int i = 0; i + 1 < s.ndim(); ++i) r.push_back(s[i]);
  return r;
}
// Shape / strides without dim 0 (whole rows of dim-0 ops).
Shape drop_first(const Shape& s) {
  Shape r;
  for (int i = 1; i < s.ndim(); ++i) r.push_back(s[i]);
  return r;
}

// Strides of `t` broadcast (numpy rules, leading dims aligned right) to `out_shape`: 0 where t has
// size 1 or lacks the dim.
Shape broadcast_strides(const Tensor& t, const Shape& out_shape) {
  Shape st;
  const int lead = out_shape.ndim() - t.ndim();
  for (int i = 0; i < out_shape.ndim(); ++i) {
    const int it = i - lead;
    st.push_back(it < 0 || t.size(it) == 1 ? 0 : t.stride(it));
  }
  return st;
}

int64_t index_at(const Tensor& index, int64_t off) {
  return index.dtype() == DType::I64 ? index.data<int64_t>()[off]
                                     : static_cast<int64_t>(index.data<int32_t>()[off]);
}

// ---- element access of any dtype ------------------------------------------------------------------

// Bytes per element of whole-byte dtypes (0 for packed FP4).
int64_t elem_bytes(DType t) { return dtype_bits(t) % 8 == 0 ? dtype_bits(t) / 8 : 0; }

uint8_t* bytes_of(const Tensor& t) { return static_cast<uint8_t*>(t.raw_data()); }

bool is_int(DType t) { return t == DType::I8 || t == DType::I32 || t == DType::I64 || t == DType::U8; }

// Float value of element `e` (offset from raw_data) of a float-dtype tensor.
float load_float(const uint8_t* p, DType t, int64_t e) {
  switch (t) {
    case DType::F32: { float v; std::memcpy(&v, p + e * 4, 4); return v; }
    case DType::BF16: { uint16_t h; std::memcpy(&h, p + e * 2, 2); return bf16_to_f32(h); }
    case DType::F16: { uint16_t h; std::memcpy(&h, p + e * 2, 2); return f16_to_f32(h); }
    case DType::F8_E4M3: return e4m3_to_f32(p[e]);
    case DType::F8_E8M0: return e8m0_to_f32(p[e]);
    case DType::F4_E2M1: return e2m1_to_f32(fp4_get(p, e));
    default: break;
  }
  DSV4_FAIL("load_float on {}", dtype_name(t));
}

int64_t load_int(const uint8_t* p, DType t, int64_t e) {
  switch (t) {
    case DType::I8: return static_cast<int8_t>(p[e]);
    case DType::U8: return p[e];
    case DType::I32: { int32_t v; std::memcpy(&v, p + e * 4, 4); return v; }
    case DType::I64: { int64_t v; std::memcpy(&v, p + e * 8, 8); return v; }
    default: break;
  }
  DSV4_FAIL("load_int on {}", dtype_name(t));
}


// Encoding of a float in a float dtype, as little-endian bytes (FP4: the nibble in byte 0).
std::array<uint8_t, 8> encode_float(DType t, float v) {
  std::array<uint8_t, 8> b{};
  switch (t) {
    case DType::F32: std::memcpy(b.data(), &v, 4); break;
    case DType::BF16: { const uint16_t h = f32_to_bf16(v); std::memcpy(b.data(), &h, 2); break; }
    case DType::F16: { const uint16_t h = f32_to_f16(v); std::memcpy(b.data(), &h, 2); break; }
    case DType::F8_E4M3: b[0] = f32_to_e4m3(v); break;
    case DType::F8_E8M0: b[0] = e8m0_ceil_from_f32(v)  /* ceiling power of two, as on CUDA */; break;
    case DType::F4_E2M1: b[0] = f32_to_e2m1(v); break;
    default: DSV4_FAIL("encode_float to {}", dtype_name(t));
  }
  return b;
}

std::array<uint8_t, 8> encode_int(DType t, int64_t v) {
  std::array<uint8_t, 8> b{};
  switch (t) {  // narrowing wraps modulo 2^bits (numpy astype semantics)
    case DType::I8: b[0] = static_cast<uint8_t>(static_cast<int8_t>(v)); break;
    case DType::U8: b[0] = static_cast<uint8_t>(v); break;
    case DType::I32: { const auto x = static_cast<int32_t>(v); std::memcpy(b.data(), &x, 4); break; }
    case DType::I64: std::memcpy(b.data(), &v, 8); break;
    default: DSV4_FAIL("encode_int to {}", dtype_name(t));
  }
  return b;
}

// Float -> integer: truncation toward zero, saturating at the dtype's range; NaN gives 0 (the
// behaviour of CUDA's __float2int_rz family, so both backends agree).
template <typename I>
int64_t trunc_saturate(double v) {
  if (std::isnan(v)) return 0;
  constexpr double lo = static_cast<double>(std::numeric_limits<I>::min());
  constexpr double hi = static_cast<double>(std::numeric_limits<I>::max());
  if (v <= lo) return static_cast<int64_t>(std::numeric_limits<I>::min());
  if (v >= hi) return static_cast<int64_t>(std::numeric_limits<I>::max());
  return static_cast<int64_t>(static_cast<I>(std::trunc(v)));
}
int64_t float_to_int(DType t, double v) {
  switch (t) {
    case DType::I8: return trunc_saturate<int8_t>(v);
    case DType::U8: return trunc_saturate<uint8_t>(v);
    case DType::I32: return trunc_saturate<int32_t>(v);
    case DType::I64: return trunc_saturate<int64_t>(v);
    default: DSV4_FAIL("float_to_int to {}", dtype_name(t));
  }
}

// Writes an encoded element (from encode_*) at element `e`.
void store_encoded(uint8_t* p, DType t, int64_t e, const std::array<uint8_t, 8>& b) {
  if (t == DType::F4_E2M1) {
    fp4_set(p, e, b[0]);
    return;
  }
  const int64_t sz = elem_bytes(t);
  std::memcpy(p + e * sz, b.data(), static_cast<size_t>(sz));
}

// Strided element copy between two same-dtype, same-shape regions given by base pointers (at element
// offset 0 of each region) and strides. Whole-byte dtypes move bytes; packed FP4 moves nibbles.
void copy_region(DType t, const Shape& shape, const uint8_t* src, const Shape& src_strides, uint8_t* dst,
                 const Shape& dst_strides) {
  const Shape contig = contiguous_strides(shape);
  const int64_t n = shape.numel();
  auto is_dense = [&](const Shape& st) {
    for (int i = 0; i < shape.ndim(); ++i)
      if (shape[i] != 1 && st[i] != contig[i]) return false;
    return true;
  };
  if (n > 0 && is_dense(src_strides) && is_dense(dst_strides) && (t != DType::F4_E2M1 || n % 2 == 0)) {
    std::memmove(dst, src, static_cast<size_t>(dtype_nbytes(t, n)));
    return;
  }
  const std::array<Shape, 2> st{src_strides, dst_strides};
  switch (elem_bytes(t)) {
    case 0:
      for_each_offset(shape, st, [&](const auto& o) { fp4_set(dst, o[1], fp4_get(src, o[0])); });
      break;
    case 1:
      for_each_offset(shape, st, [&](const auto& o) { dst[o[1]] = src[o[0]]; });
      break;
    case 2:
      for_each_offset(shape, st, [&](const auto& o) { std::memcpy(dst + 2 * o[1], src + 2 * o[0], 2); });
      break;
    case 4:
      for_each_offset(shape, st, [&](const auto& o) { std::memcpy(dst + 4 * o[1], src + 4 * o[0], 4); });
      break;
    case 8:
      for_each_offset(shape, st, [&](const auto& o) { std::memcpy(dst + 8 * o[1], src + 8 * o[0], 8); });
      break;
    default: DSV4_FAIL("copy of {}", dtype_name(t));
  }
}

// Pointer to element `e` (relative to raw_data) of a whole-byte or packed-FP4 tensor. FP4 element
// offsets of whole rows are even (the tensor invariants), so e / 2 is exact there.
uint8_t* elem_ptr(const Tensor& t, int64_t e) {
  if (t.dtype() == DType::F4_E2M1) {
    DSV4_CHECK(e % 2 == 0, "packed FP4 row starts at odd element {}", e);
    return bytes_of(t) + e / 2;
  }
  return bytes_of(t) + e * elem_bytes(t.dtype());
}

// ---- math helpers -----------------------------------------------------------------------------------

float softplus(float x) {
  // log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow for large x, exact tail for very negative x.
  if (std::isnan(x)) return x;
  return std::max(x, 0.0f) + std::log1p(std::exp(-std::fabs(x)));
}

float sigmoid(float x) {
  // Evaluate with e^-|x| <= 1 so neither branch overflows.
  const float z = std::exp(-std::fabs(x));
  return x >= 0.0f ? 1.0f / (1.0f + z) : z / (1.0f + z);
}

float apply_unary(UnaryOp op, float x) {
  switch (op) {
    case UnaryOp::Neg: return -x;
    case UnaryOp::Abs: return std::fabs(x);
    case UnaryOp::Exp: return std::exp(x);
    case UnaryOp::Log: return std::log(x);
    case UnaryOp::Sqrt: return std::sqrt(x);
    case UnaryOp::Rsqrt: return 1.0f / std::sqrt(x);
    case UnaryOp::Square: return x * x;
    case UnaryOp::Sigmoid: return sigmoid(x);
    case UnaryOp::Silu: return x * sigmoid(x);
    case UnaryOp::Relu: return x > 0.0f ? x : (std::isnan(x) ? x : 0.0f);
    case UnaryOp::Tanh: return std::tanh(x);
    case UnaryOp::Softplus: return softplus(x);
  }
  DSV4_FAIL("unknown UnaryOp {}", static_cast<int>(op));
}

// Max / min propagate NaN (as torch.maximum / numpy.maximum).
float nan_max(float a, float b) { return std::isnan(a) || a > b ? a : b; }
float nan_min(float a, float b) { return std::isnan(a) || a < b ? a : b; }

float apply_binary(BinaryOp op, float a, float b) {
  switch (op) {
    case BinaryOp::Add: return a + b;
    case BinaryOp::Sub: return a - b;
    case BinaryOp::Mul: return a * b;
    case BinaryOp::Div: return a / b;
    case BinaryOp::Max: return std::isnan(b) ? b : nan_max(a, b);
    case BinaryOp::Min: return std::isnan(b) ? b : nan_min(a, b);
  }
  DSV4_FAIL("unknown BinaryOp {}", static_cast<int>(op));
}

// Calls f(x_row, out_row) with the element offsets of every row (all dims but the last).
template <typename F>
void for_each_row(const Tensor& x, const Tensor& out, F&& f) {
  for_each_offset(drop_last(x.shape()), std::array<Shape, 2>{drop_last(x.strides()), drop_last(out.strides())},
                  [&](const auto& o) { f(o[0], o[1]); });
}

// ---- gemm helpers -----------------------------------------------------------------------------------

// One row-major matrix operand for cblas: pointer and leading dimension.
struct BlasMat {
  float* p;
  blasint ld;
};

blasint to_blasint(int64_t v, const char* what) {
  DSV4_CHECK(v >= 0 && v <= static_cast<int64_t>(std::numeric_limits<blasint>::max()) &&
                 v <= static_cast<int64_t>(INT_MAX),
             "gemm: {} = {} does not fit a BLAS integer", what, v);
  return static_cast<blasint>(v);
}

// A rows x cols matrix with strides (rs, cs) is BLAS-compatible when columns are unit-stride and rows
// do not overlap (ld >= cols). With a single row (or column) the unused stride does not matter.
bool blas_layout(int64_t rows, int64_t cols, int64_t rs, int64_t cs, int64_t* ld) {
  if (cols > 1 && cs != 1) return false;
  if (rows <= 1) {
    *ld = std::max<int64_t>(cols, 1);
    return true;
  }
  if (rs < std::max<int64_t>(cols, 1)) return false;
  *ld = rs;
  return true;
}

// Matrix `b` (batch index) of a 2-D or 3-D operand, as a cblas operand. Copies into `scratch` when the
// layout is not BLAS-compatible (only for inputs; the output is handled by the caller).
BlasMat gemm_operand(const Tensor& t, int64_t batch, std::vector<float>& scratch) {
  const int r = t.ndim() - 2;
  float* base = t.data<float>();
  if (r == 1 && t.size(0) > 1) base += batch * t.stride(0);
  const int64_t rows = t.size(r), cols = t.size(r + 1), rs = t.stride(r), cs = t.stride(r + 1);
  int64_t ld = 0;
  if (blas_layout(rows, cols, rs, cs, &ld)) return {base, to_blasint(ld, "leading dim")};
  scratch.resize(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) scratch[static_cast<size_t>(i * cols + j)] = base[i * rs + j * cs];
  return {scratch.data(), to_blasint(std::max<int64_t>(cols, 1), "leading dim")};
}

}  // namespace

// ---- fill / copy / convert --------------------------------------------------------------------------

void fill(Tensor& out, double value) {
  const DType t = out.dtype();
  std::array<uint8_t, 8> code{};
  if (is_int(t)) {
    code = encode_int(t, float_to_int(t, value));
  } else {
    code = encode_float(t, static_cast<float>(value));
  }
  uint8_t* p = bytes_of(out);
  if (out.numel() == 0) return;
  if (out.is_contiguous() && elem_bytes(t) == 1) {
    std::memset(p, code[0], static_cast<size_t>(out.numel()));
    return;
  }
  if (out.is_contiguous() && t == DType::F4_E2M1 && out.numel() % 2 == 0) {  // two nibbles per byte
    std::memset(p, code[0] | (code[0] << 4), static_cast<size_t>(out.numel() / 2));
    return;
  }
  for_each_offset(out.shape(), std::array<Shape, 1>{out.strides()},
                  [&](const auto& o) { store_encoded(p, t, o[0], code); });
}

void copy(const Tensor& src, Tensor& out) {
  DSV4_CHECK(src.dtype() == out.dtype() && src.shape() == out.shape(), "cpu::copy {} into {}", src.str(), out.str());
  if (src.numel() == 0) return;
  copy_region(src.dtype(), src.shape(), bytes_of(src), src.strides(), bytes_of(out), out.strides());
}

void convert(const Tensor& src, Tensor& out) {
  DSV4_CHECK(src.shape() == out.shape(), "cpu::convert {} into {}", src.str(), out.str());
  if (src.numel() == 0) return;
  const DType st = src.dtype(), dt = out.dtype();
  const uint8_t* sp = bytes_of(src);
  uint8_t* dp = bytes_of(out);
  const std::array<Shape, 2> strides{src.strides(), out.strides()};
  if (is_int(st) && is_int(dt)) {  // integers stay exact (wrapping when narrowing)
    for_each_offset(src.shape(), strides,
                    [&](const auto& o) { store_encoded(dp, dt, o[1], encode_int(dt, load_int(sp, st, o[0]))); });
  } else if (is_int(st)) {  // int -> F32 rounds to nearest, then to the target's exact rounding
    for_each_offset(src.shape(), strides, [&](const auto& o) {
      store_encoded(dp, dt, o[1], encode_float(dt, static_cast<float>(load_int(sp, st, o[0]))));
    });
  } else if (is_int(dt)) {  // float -> int truncates toward zero (saturating, NaN -> 0)
    for_each_offset(src.shape(), strides, [&](const auto& o) {
      store_encoded(dp, dt, o[1], encode_int(dt, float_to_int(dt, load_float(sp, st, o[0]))));
    });
  } else {  // float -> float through F32 (exact: F32 holds every value of the narrower formats)
    for_each_offset(src.shape(), strides, [&](const auto& o) {
      store_encoded(dp, dt, o[1], encode_float(dt, load_float(sp, st, o[0])));
    });
  }
}

// ---- elementwise ----------------------------------------------------------------------------------

void unary(UnaryOp op, const Tensor& x, Tensor& out) {
  const float* xp = x.data<float>();
  float* op_ = out.data<float>();
  for_each_offset(x.shape(), std::array<Shape, 2>{x.strides(), out.strides()},
                  [&](const auto& o) { op_[o[1]] = apply_unary(op, xp[o[0]]); });
}

void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  const float* ap = a.data<float>();
  const float* bp = b.data<float>();
  float* outp = out.data<float>();
  const Shape& shape = out.shape();
  for_each_offset(shape, std::array<Shape, 3>{broadcast_strides(a, shape), broadcast_strides(b, shape), out.strides()},
                  [&](const auto& o) { outp[o[2]] = apply_binary(op, ap[o[0]], bp[o[1]]); });
}

void affine(const Tensor& x, double alpha, double beta, Tensor& out) {
  const float* xp = x.data<float>();
  float* outp = out.data<float>();
  const float a = static_cast<float>(alpha), b = static_cast<float>(beta);
  for_each_offset(x.shape(), std::array<Shape, 2>{x.strides(), out.strides()},
                  [&](const auto& o) { outp[o[1]] = a * xp[o[0]] + b; });
}

// ---- reductions -------------------------------------------------------------------------------------

void reduce(ReduceOp op, const Tensor& x, int dim, Tensor& out) {
  const float* xp = x.data<float>();
  float* outp = out.data<float>();
  const int64_t n = x.size(dim), step = x.stride(dim);
  // Iterate over out's shape (x's with dim collapsed to 1); the x offset then points at the first
  // element of each reduced fibre.
  for_each_offset(out.shape(), std::array<Shape, 2>{x.strides(), out.strides()}, [&](const auto& o) {
    const float* p = xp + o[0];
    float r = 0.0f;
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Mean: {
        double acc = 0.0;
        for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(p[i * step]);
        if (op == ReduceOp::Mean) acc /= static_cast<double>(n);
        r = static_cast<float>(acc);
        break;
      }
      case ReduceOp::Max:
        r = p[0];
        for (int64_t i = 1; i < n; ++i) r = nan_max(r, p[i * step]);
        break;
      case ReduceOp::Min:
        r = p[0];
        for (int64_t i = 1; i < n; ++i) r = nan_min(r, p[i * step]);
        break;
    }
    outp[o[1]] = r;
  });
}

// softmax(x)_j = e^(x_j - m) / sum_i e^(x_i - m) with m = max_i x_i; FP32 values, FP64 sum.
void softmax(const Tensor& x, Tensor& out) {
  const float* xp = x.data<float>();
  float* outp = out.data<float>();
  const int64_t n = x.size(-1), xs = x.stride(-1), os = out.stride(-1);
  if (n == 0) return;
  for_each_row(x, out, [&](int64_t xo, int64_t oo) {
    float m = xp[xo];
    for (int64_t j = 1; j < n; ++j) m = nan_max(m, xp[xo + j * xs]);
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const float e = std::exp(xp[xo + j * xs] - m);
      outp[oo + j * os] = e;
      sum += static_cast<double>(e);
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < n; ++j) outp[oo + j * os] *= inv;
  });
}

// log_softmax(x)_j = x_j - m - log(sum_i e^(x_i - m)).
void log_softmax(const Tensor& x, Tensor& out) {
  const float* xp = x.data<float>();
  float* outp = out.data<float>();
  const int64_t n = x.size(-1), xs = x.stride(-1), os = out.stride(-1);
  if (n == 0) return;
  for_each_row(x, out, [&](int64_t xo, int64_t oo) {
    float m = xp[xo];
    for (int64_t j = 1; j < n; ++j) m = nan_max(m, xp[xo + j * xs]);
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(std::exp(xp[xo + j * xs] - m));
    const float lse = m + static_cast<float>(std::log(sum));
    for (int64_t j = 0; j < n; ++j) outp[oo + j * os] = xp[xo + j * xs] - lse;
  });
}

// ---- gemm -------------------------------------------------------------------------------------------

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha, float beta, Tensor& c) {
  const int r = c.ndim() - 2;
  const int64_t batch = r == 1 ? c.size(0) : 1;
  const int64_t m = c.size(r), n = c.size(r + 1);
  const int64_t k = trans_a ? a.size(r) : a.size(r + 1);
  if (batch == 0 || m == 0 || n == 0) return;
  const blasint bm = to_blasint(m, "m"), bn = to_blasint(n, "n"), bk = to_blasint(k, "k");
  const int64_t crs = c.stride(r), ccs = c.stride(r + 1);
  int64_t ldc_direct = 0;
  const bool c_direct = blas_layout(m, n, crs, ccs, &ldc_direct);
  std::vector<float> sa, sb, sc;
  for (int64_t bi = 0; bi < batch; ++bi) {
    float* cbase = c.data<float>() + (r == 1 ? bi * c.stride(0) : 0);
    // C as a BLAS operand: c itself, or a contiguous scratch copied back afterwards.
    float* cp = cbase;
    blasint ldc = 0;
    if (c_direct) {
      ldc = to_blasint(ldc_direct, "ldc");
    } else {
      sc.assign(static_cast<size_t>(m * n), 0.0f);
      if (beta != 0.0f)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) sc[static_cast<size_t>(i * n + j)] = cbase[i * crs + j * ccs];
      cp = sc.data();
      ldc = bn;
    }
    // beta == 0 means "ignore c" (NaN or garbage included): clear it instead of trusting BLAS to.
    if (beta == 0.0f && c_direct)
      for (int64_t i = 0; i < m; ++i) std::fill_n(cp + i * ldc, n, 0.0f);
    if (k == 0) {  // empty product: c = beta * c
      if (beta != 0.0f && beta != 1.0f)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) cp[i * ldc + j] *= beta;
    } else {
      const BlasMat A = gemm_operand(a, bi, sa), B = gemm_operand(b, bi, sb);
      cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, bm, bn, bk,
                  alpha, A.p, A.ld, B.p, B.ld, beta, cp, ldc);
    }
    if (!c_direct)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) cbase[i * crs + j * ccs] = sc[static_cast<size_t>(i * n + j)];
  }
}

// ---- indexing ---------------------------------------------------------------------------------------

void index_select(const Tensor& x, const Tensor& index, Tensor& out) {
  const Shape row_shape = drop_first(x.shape());
  const Shape xs = drop_first(x.strides()), os = drop_first(out.strides());
  const int64_t rows = index.size(0), istride = index.stride(0);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t src_row = index_at(index, i * istride);
    copy_region(x.dtype(), row_shape, elem_ptr(x, src_row * x.stride(0)), xs, elem_ptr(out, i * out.stride(0)), os);
  }
}

void index_add(const Tensor& src, const Tensor& index, Tensor& out) {
  const float* sp = src.data<float>();
  float* outp = out.data<float>();
  const Shape row_shape = drop_first(src.shape());
  const std::array<Shape, 2> strides{drop_first(src.strides()), drop_first(out.strides())};
  const int64_t rows = index.size(0), istride = index.stride(0);
  for (int64_t i = 0; i < rows; ++i) {  // sequential over i: duplicate indices accumulate in order
    const float* s = sp + i * src.stride(0);
    float* d = outp + index_at(index, i * istride) * out.stride(0);
    for_each_offset(row_shape, strides, [&](const auto& o) { d[o[1]] += s[o[0]]; });
  }
}

void gather_last(const Tensor& x, const Tensor& index, Tensor& out) {
  const float* xp = x.data<float>();
  float* outp = out.data<float>();
  const int64_t n = index.size(-1), xs = x.stride(-1), is = index.stride(-1), os = out.stride(-1);
  const Shape rows = drop_last(index.shape());
  for_each_offset(rows, std::array<Shape, 3>{drop_last(x.strides()), drop_last(index.strides()), drop_last(out.strides())},
                  [&](const auto& o) {
                    for (int64_t j = 0; j < n; ++j) outp[o[2] + j * os] = xp[o[0] + index_at(index, o[1] + j * is) * xs];
                  });
}

void scatter_add_last(const Tensor& src, const Tensor& index, Tensor& out) {
  const float* sp = src.data<float>();
  float* outp = out.data<float>();
  const int64_t n = index.size(-1), ss = src.stride(-1), is = index.stride(-1), os = out.stride(-1);
  const Shape rows = drop_last(index.shape());
  for_each_offset(rows, std::array<Shape, 3>{drop_last(src.strides()), drop_last(index.strides()), drop_last(out.strides())},
                  [&](const auto& o) {
                    for (int64_t j = 0; j < n; ++j) outp[o[2] + index_at(index, o[1] + j * is) * os] += sp[o[0] + j * ss];
                  });
}

void topk(const Tensor& x, int64_t k, Tensor& values, Tensor& indices) {
  const float* xp = x.data<float>();
  float* vp = values.data<float>();
  int64_t* ip = indices.data<int64_t>();
  const int64_t n = x.size(-1), xs = x.stride(-1), vs = values.stride(-1), is = indices.stride(-1);
  if (k == 0) return;
  std::vector<int64_t> order(static_cast<size_t>(n));
  for_each_offset(drop_last(x.shape()),
                  std::array<Shape, 3>{drop_last(x.strides()), drop_last(values.strides()), drop_last(indices.strides())},
                  [&](const auto& o) {
                    const float* row = xp + o[0];
                    // Strict weak order "i ranks before j": NaN above every number (NaNs among themselves
                    // by index), then larger value, then lower index (so +0 and -0 tie).
                    auto before = [&](int64_t i, int64_t j) {
                      const float vi = row[i * xs], vj = row[j * xs];
                      const bool ni = std::isnan(vi), nj = std::isnan(vj);
                      if (ni != nj) return ni;
                      if (!ni && vi != vj) return vi > vj;
                      return i < j;
                    };
                    std::iota(order.begin(), order.end(), int64_t{0});
                    std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
                    for (int64_t j = 0; j < k; ++j) {
                      const int64_t src = order[static_cast<size_t>(j)];
                      vp[o[1] + j * vs] = row[src * xs];
                      ip[o[2] + j * is] = src;
                    }
                  });
}

}  // namespace dsv4::cpu
