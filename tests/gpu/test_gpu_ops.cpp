// Every CUDA op of backend_ops.def against the CPU reference, on random and odd shapes (non-multiples of
// 128, one element, empty tensors, non-contiguous views). Tolerances, per op:
//   fill, copy, convert, index_select, gather_last, topk (values and indices)    bit-exact
//   binary, affine, unary neg/abs/sqrt/rsqrt/square/relu, reduce max/min          bit-exact (F32 and BF16:
//       one correctly rounded FP32 operation, then the same BF16 rounding)
//   unary exp/log/sigmoid/silu/tanh/softplus     F32: rtol 2e-6 (libm vs CUDA ulp differences)
//   reduce sum/mean                              1e-6 * sum|x| of the row (FP32 tree vs FP64 reference)
//   softmax / log_softmax                        rtol 1e-5 (+ atol 1e-7 / 1e-5)
//   gemm                                         4 k 2^-24 |alpha| (|a||b|)_ij + 2^-23 |beta c_ij| (k·u bound)
//   index_add, scatter_add_last                  atol 1e-5 + rtol 1e-6 (FP32 atomics: order varies)
//   every BF16 result that is not bit-exact      + one BF16 ulp (rtol 2^-7) for the final rounding
#include <cmath>
#include <functional>
#include <limits>

#include "gpu_test_util.h"

namespace dsv4::gputest {
namespace {

class GpuOps : public GpuTest {};

constexpr DType kAllDTypes[] = {DType::F32,     DType::BF16, DType::F16, DType::F8_E4M3, DType::F8_E8M0,
                                DType::F4_E2M1, DType::I8,   DType::I32, DType::I64,     DType::U8};
constexpr DType kFloatDTypes[] = {DType::F32, DType::BF16};

bool is_int(DType t) { return t == DType::I8 || t == DType::U8 || t == DType::I32 || t == DType::I64; }

// CPU tensor of random bit patterns (every pattern is a valid element of every dtype).
Tensor random_bits(const Shape& shape, DType dt) {
  Tensor t = Tensor::empty(shape, dt);
  auto* p = static_cast<uint8_t*>(t.raw_data());
  for (int64_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng()());
  return t;
}

// A named view, applied identically to the CPU and the GPU tensor.
struct View {
  std::string name;
  std::function<Tensor(const Tensor&)> apply;
};
const View kIdentity{"contiguous", [](const Tensor& t) { return t; }};

// The CPU reference of a float op evaluated in F32; `x` holds the (BF16-exact when dt is BF16) values.
Tensor cpu_f32(const Tensor& x) { return x.dtype() == DType::F32 ? x : x.to(DType::F32); }

// ---- fill ---------------------------------------------------------------------------------------------

TEST_F(GpuOps, FillMatchesCpuBitwiseForEveryDtype) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (DType dt : kAllDTypes) {
    const std::vector<double> values = dt == DType::F8_E8M0 ? std::vector<double>{0.25, 1.0, 4096.0, nan}
                                                            : std::vector<double>{0.0, 1.5, -3.25, 300.7, -1e10, nan};
    for (double v : values) {
      const std::string what = fmt::format("fill {} with {}", dtype_name(dt), v);
      for (const Shape& shape : {Shape{5, 7, 6}, Shape{0, 4}, Shape{1, 2}, Shape{}, Shape{3}}) {
        if (dt == DType::F4_E2M1 && (shape.ndim() == 0 || shape[shape.ndim() - 1] % 2 != 0)) continue;
        Tensor g = Tensor::empty(shape, dt, kGpu);
        Tensor c = Tensor::empty(shape, dt);
        ops::fill(g, v);
        ops::fill(c, v);
        expect_same_bits(g, c, what + " " + shape.str());
      }
      // Strided views: only the viewed elements change.
      Tensor gb = Tensor::empty({5, 8, 6}, dt, kGpu), cb = Tensor::empty({5, 8, 6}, dt);
      ops::fill(gb, 1.0);
      ops::fill(cb, 1.0);
      Tensor gv = gb.slice(1, 2, 7).transpose(0, 1), cv = cb.slice(1, 2, 7).transpose(0, 1);
      ops::fill(gv, v);
      ops::fill(cv, v);
      expect_same_bits(gb, cb, what + " through a strided view");
    }
  }
}

// ---- copy ---------------------------------------------------------------------------------------------

TEST_F(GpuOps, CopyOfStridedViewsIsExact) {
  const std::vector<View> views = {
      kIdentity,
      {"transpose01", [](const Tensor& t) { return t.transpose(0, 1); }},
      {"slice_mid", [](const Tensor& t) { return t.slice(1, 1, 5); }},
      {"slice_last", [](const Tensor& t) { return t.slice(2, 2, 8); }},
      {"select", [](const Tensor& t) { return t.select(0, 2); }},
      {"transpose02", [](const Tensor& t) { return t.transpose(0, 2); }},
      {"one_element", [](const Tensor& t) { return t.slice(0, 1, 2).slice(1, 3, 4).slice(2, 4, 6); }},
      {"empty", [](const Tensor& t) { return t.slice(1, 2, 2); }},
  };
  for (DType dt : {DType::F32, DType::BF16, DType::I64, DType::I32, DType::U8, DType::F8_E4M3, DType::F4_E2M1}) {
    const Tensor src = random_bits({4, 6, 10}, dt);
    const Tensor src_g = src.to(kGpu);
    for (const View& v : views) {
      if (dt == DType::F4_E2M1 && v.name == "transpose02") continue;  // FP4 stays contiguous in the last dim
      const std::string what = fmt::format("copy {} {}", dtype_name(dt), v.name);
      const Tensor want = v.apply(src).contiguous();
      const Tensor sv = v.apply(src_g);
      // Into a contiguous tensor.
      Tensor out = Tensor::empty(sv.shape(), dt, kGpu);
      ops::copy(sv, out);
      expect_same_bits(out, want, what + " -> contiguous");
      // Into a transposed (non-contiguous) tensor.
      if (sv.ndim() >= 2 && !(dt == DType::F4_E2M1 && sv.ndim() == 2)) {
        Shape swapped = sv.shape();
        std::swap(swapped[0], swapped[1]);
        Tensor dst = Tensor::empty(swapped, dt, kGpu).transpose(0, 1);
        ops::copy(sv, dst);
        expect_same_bits(dst, want, what + " -> transposed");
      }
    }
  }
  // 0-d
  const Tensor s = Tensor::from_floats({}, {3.5f});
  Tensor d = Tensor::empty({}, DType::F32, kGpu);
  ops::copy(s.to(kGpu), d);
  EXPECT_EQ(d.item(), 3.5);
}

// ---- convert --------------------------------------------------------------------------------------------

// Source values for a conversion src -> dst that the CPU reference accepts (it rejects E8M0 targets that
// are not powers of two), covering specials and out-of-range values otherwise.
Tensor convert_source(DType src, DType dst, const Shape& shape) {
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  if (dst == DType::F8_E8M0) {
    const std::vector<float> pow2 = is_int(src) ? std::vector<float>{1, 2, 4, 8, 16, 32, 64}
                                                : std::vector<float>{0.5f, 1, 2, 4};
    for (auto& x : v) x = pow2[static_cast<size_t>(pick(rng())) % pow2.size()];
    if (src == DType::F32 || src == DType::BF16 || src == DType::F16 || src == DType::F8_E4M3)
      v[3] = std::numeric_limits<float>::quiet_NaN();
    return Tensor::from_floats(shape, v).to(src);
  }
  if (src == DType::F8_E8M0) return random_bits(shape, src);  // all 256 codes, NaN included
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), -0.0f, 0.0f, 1e30f, -1e30f, 1e-40f, -1e-40f,
                            448.0f, 449.0f, 464.0f, 65504.0f, 65520.0f, 6.0f, 7.0f, 0.25f, 2.5f, -2.5f, 127.5f,
                            128.0f, 255.9f, 256.0f, -129.0f, 3e9f, -3e9f, 1e19f, -1e19f, 5.0f, 1.0f / 3.0f};
  const auto wide = uniform(shape.numel(), -300.0f, 300.0f), narrow = uniform(shape.numel(), -2.0f, 2.0f);
  for (size_t i = 0; i < v.size(); ++i) {
    const int r = pick(rng()) % 4;
    v[i] = r == 0 ? specials[static_cast<size_t>(pick(rng())) % std::size(specials)] : r == 1 ? wide[i] : narrow[i];
  }
  return Tensor::from_floats(shape, v).to(src);
}

TEST_F(GpuOps, ConvertEveryDtypePairMatchesCpuBitwise) {
  const std::vector<View> views = {kIdentity,
                                   {"row_slice", [](const Tensor& t) { return t.slice(1, 2, 32); }},
                                   {"rows_1_to_4", [](const Tensor& t) { return t.slice(0, 1, 4); }},
                                   {"empty", [](const Tensor& t) { return t.slice(0, 2, 2); }}};
  for (DType s : kAllDTypes) {
    for (DType d : kAllDTypes) {
      if (s == d) continue;
      const Tensor src = convert_source(s, d, {6, 34});
      const Tensor src_g = src.to(kGpu);
      for (const View& v : views) {
        const std::string what = fmt::format("convert {} -> {} ({})", dtype_name(s), dtype_name(d), v.name);
        expect_same_bits(ops::convert(v.apply(src_g), d), ops::convert(v.apply(src), d), what);
      }
      if (s != DType::F4_E2M1 && d != DType::F4_E2M1) {  // transposed (last dim strided)
        const std::string what = fmt::format("convert {} -> {} (transposed)", dtype_name(s), dtype_name(d));
        expect_same_bits(ops::convert(src_g.transpose(0, 1), d), ops::convert(src.transpose(0, 1), d), what);
      }
    }
  }
}

// The contiguous F32 <-> BF16 kernels: vector bodies (4 per thread), scalar tails, and unaligned starts (views that
// begin 1 or 2 elements in) that take the scalar form.
TEST_F(GpuOps, ConvertF32Bf16ContiguousMatchesCpuBitwise) {
  for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{4}, int64_t{5}, int64_t{4099}, (int64_t{1} << 20) + 3}) {
    for (int64_t skip : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{4}}) {
      for (auto [s, d] : {std::pair{DType::F32, DType::BF16}, std::pair{DType::BF16, DType::F32}}) {
        const Tensor src = convert_source(s, d, {n + skip}).slice(0, skip, n + skip);
        const Tensor src_g = src.contiguous().to(kGpu);
        const Tensor view_g = convert_source(s, d, {n + skip}).to(kGpu).slice(0, skip, n + skip);
        const std::string what = fmt::format("convert {} -> {} n={} skip={}", dtype_name(s), dtype_name(d), n, skip);
        expect_same_bits(ops::convert(src_g, d), ops::convert(src, d), what + " (aligned)");
        Tensor into = Tensor::empty({n + skip}, d, kGpu).slice(0, skip, n + skip);  // unaligned output too
        ops::copy(view_g, into);
        expect_same_bits(into, ops::convert(view_g.to(Device::cpu()), d), what + " (view in, view out)");
      }
    }
  }
}

// ---- unary / binary / affine --------------------------------------------------------------------------------

// The contiguous F32 forms of unary / binary / affine (4 per thread when every pointer is 16-byte aligned): lengths with
// tails, and views 1 element in (unaligned: the scalar form), against the CPU bit for bit.
TEST_F(GpuOps, ElementwiseContiguousFormsMatchCpuBitwise) {
  for (int64_t n : {int64_t{1}, int64_t{6}, int64_t{4099}, (int64_t{1} << 20) + 1}) {
    for (int64_t skip : {int64_t{0}, int64_t{1}}) {
      const auto part = [&](const Tensor& t) { return t.slice(0, skip, skip + n); };
      const Tensor a = rand_cpu({n + skip}, -2.0f, 2.0f), b = rand_cpu({n + skip}, 0.5f, 2.0f);
      const Tensor ag = a.to(kGpu), bg = b.to(kGpu);
      const std::string what = fmt::format("n={} skip={}", n, skip);
      for (BinaryOp op : {BinaryOp::Add, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max})
        expect_same_bits(ops::binary(op, part(ag), part(bg)), ops::binary(op, part(a), part(b)),
                         fmt::format("binary {} {}", static_cast<int>(op), what));
      expect_same_bits(ops::affine(part(ag), 1.5, -0.25), ops::affine(part(a), 1.5, -0.25), "affine " + what);
      expect_same_bits(ops::unary(UnaryOp::Square, part(ag)), ops::unary(UnaryOp::Square, part(a)), "square " + what);
    }
  }
}

TEST_F(GpuOps, UnaryMatchesCpu) {
  struct OpCase {
    UnaryOp op;
    const char* name;
    float lo, hi;
    double rtol;  // F32 tolerance; 0 = bit-exact
  };
  const OpCase cases[] = {{UnaryOp::Neg, "neg", -6, 6, 0},           {UnaryOp::Abs, "abs", -6, 6, 0},
                          {UnaryOp::Exp, "exp", -6, 6, 2e-6},        {UnaryOp::Log, "log", 0.01f, 10, 2e-6},
                          {UnaryOp::Sqrt, "sqrt", 0.01f, 10, 0},     {UnaryOp::Rsqrt, "rsqrt", 0.01f, 10, 0},
                          {UnaryOp::Square, "square", -6, 6, 0},     {UnaryOp::Sigmoid, "sigmoid", -12, 12, 2e-6},
                          {UnaryOp::Silu, "silu", -12, 12, 2e-6},    {UnaryOp::Relu, "relu", -6, 6, 0},
                          {UnaryOp::Tanh, "tanh", -6, 6, 2e-6},      {UnaryOp::Softplus, "softplus", -25, 25, 2e-6}};
  const std::vector<View> views = {kIdentity, {"transposed", [](const Tensor& t) { return t.transpose(0, 1); }}};
  for (const OpCase& c : cases) {
    for (DType dt : kFloatDTypes) {
      for (const Shape& shape : {Shape{7, 131}, Shape{1, 1}, Shape{0, 5}, Shape{130, 3}}) {
        const Tensor x = rand_cpu(shape, c.lo, c.hi, dt);
        const Tensor xg = x.to(kGpu);
        for (const View& v : views) {
          const std::string what = fmt::format("{} {} {} {}", c.name, dtype_name(dt), shape.str(), v.name);
          const Tensor got = ops::unary(c.op, v.apply(xg));
          const Tensor want = ops::unary(c.op, v.apply(cpu_f32(x)));
          if (c.rtol == 0)
            expect_same_bits(got, want.to(dt), what);
          else if (dt == DType::F32)
            expect_close(got, want, c.rtol, 1e-7, what);
          else
            expect_close(got, want, kBf16Rtol, 1e-7, what);
        }
      }
    }
  }
}

TEST_F(GpuOps, BinaryBroadcastMatchesCpuBitwise) {
  struct ShapeCase {
    Shape a, b;
  };
  const ShapeCase shapes[] = {{{5, 1, 7}, {3, 1}}, {{129}, {4, 129}},  {{}, {2, 3}},        {{0, 3}, {1, 3}},
                              {{1}, {1}},          {{2, 3, 4}, {2, 3, 4}}, {{300, 257}, {257}}, {{3, 1}, {1, 0}}};
  const BinaryOp ops_[] = {BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min};
  for (DType dt : kFloatDTypes) {
    for (BinaryOp op : ops_) {
      for (const ShapeCase& s : shapes) {
        const Tensor a = rand_cpu(s.a, -2.0f, 2.0f, dt), b = rand_cpu(s.b, 0.5f, 2.0f, dt);
        const std::string what = fmt::format("binary {} {} {} {}", static_cast<int>(op), dtype_name(dt),
                                             s.a.str(), s.b.str());
        expect_same_bits(ops::binary(op, a.to(kGpu), b.to(kGpu)),
                         ops::binary(op, cpu_f32(a), cpu_f32(b)).to(dt), what);
      }
      // Non-contiguous operands: a transposed, b a strided column slice.
      const Tensor a = rand_cpu({7, 5}, -2.0f, 2.0f, dt), b = rand_cpu({5, 14}, 0.5f, 2.0f, dt);
      const auto av = [](const Tensor& t) { return t.transpose(0, 1); };         // [5, 7]
      const auto bv = [](const Tensor& t) { return t.slice(1, 3, 10); };         // [5, 7], row stride 14
      expect_same_bits(ops::binary(op, av(a.to(kGpu)), bv(b.to(kGpu))),
                       ops::binary(op, av(cpu_f32(a)), bv(cpu_f32(b))).to(dt),
                       fmt::format("binary {} {} strided", static_cast<int>(op), dtype_name(dt)));
    }
  }
}

TEST_F(GpuOps, AffineMatchesCpuBitwise) {
  for (DType dt : kFloatDTypes) {
    for (const auto& [alpha, beta] : {std::pair{1.7, -0.3}, std::pair{0.0, 2.0}, std::pair{-1.0, 0.0}}) {
      const Tensor x = rand_cpu({33, 129}, -3.0f, 3.0f, dt);
      const Tensor xg = x.to(kGpu);
      const std::string what = fmt::format("affine {} {} {}", dtype_name(dt), alpha, beta);
      expect_same_bits(ops::affine(xg, alpha, beta), ops::affine(cpu_f32(x), alpha, beta).to(dt), what);
      expect_same_bits(ops::affine(xg.transpose(0, 1), alpha, beta),
                       ops::affine(cpu_f32(x).transpose(0, 1), alpha, beta).to(dt), what + " transposed");
    }
  }
}

// ---- reductions --------------------------------------------------------------------------------------------

TEST_F(GpuOps, ReduceMatchesCpu) {
  struct Case {
    Shape shape;
    int dim;
    bool transpose;
  };
  const Case cases[] = {{{3, 257, 5}, 0, false}, {{3, 257, 5}, 1, false},  {{3, 257, 5}, 2, false},
                        {{3, 257, 5}, -1, false}, {{1000, 40}, 1, false},  {{1000, 40}, 0, false},
                        {{2, 100000}, 1, false},  {{50000, 3}, 1, false},  {{1}, 0, false},
                        {{9, 7}, 0, true},        {{9, 7}, 1, true},       {{4, 0, 3}, 1, false},
                        {{0, 5}, 1, false}};
  const ReduceOp rops[] = {ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min};
  for (DType dt : kFloatDTypes) {
    for (const Case& c : cases) {
      const Tensor base = rand_cpu(c.shape, -1.0f, 1.0f, dt);
      const Tensor x = c.transpose ? base.transpose(0, 1) : base;
      const Tensor xg = c.transpose ? base.to(kGpu).transpose(0, 1) : base.to(kGpu);
      const Tensor xf = cpu_f32(x);
      for (ReduceOp op : rops) {
        if (x.size(c.dim) == 0 && op != ReduceOp::Sum) continue;  // only sum is defined over an empty dim
        const std::string what = fmt::format("reduce {} {} {} dim {}{}", static_cast<int>(op), dtype_name(dt),
                                             c.shape.str(), c.dim, c.transpose ? " transposed" : "");
        const Tensor got = ops::reduce(op, xg, c.dim, true);
        const Tensor want = ops::reduce(op, xf, c.dim, true);
        if (op == ReduceOp::Max || op == ReduceOp::Min) {
          expect_same_bits(got, want.to(dt), what);
          continue;
        }
        const Tensor abs_sum = ops::reduce(ReduceOp::Sum, ops::unary(UnaryOp::Abs, xf), c.dim, true);
        const int64_t r = std::max<int64_t>(x.size(c.dim), 1);
        const auto as = abs_sum.to_floats(), w = want.to_floats();
        std::vector<float> tol(as.size());
        for (size_t i = 0; i < tol.size(); ++i) {
          const double scale = op == ReduceOp::Mean ? 1.0 / static_cast<double>(r) : 1.0;
          tol[i] = static_cast<float>(1e-6 * as[i] * scale + 1e-7 +
                                      (dt == DType::BF16 ? kBf16Rtol * std::fabs(w[i]) : 0.0));
        }
        expect_within(got, want, tol, what);
      }
    }
  }
  // keepdim = false squeezes on both backends alike.
  const Tensor x = rand_cpu({4, 6});
  EXPECT_EQ(ops::sum(x.to(kGpu), 1).shape(), (Shape{4}));
}

TEST_F(GpuOps, SoftmaxAndLogSoftmaxMatchCpu) {
  const std::vector<Shape> shapes = {{1, 1}, {3, 1}, {5, 7}, {4, 1000}, {2, 5000}, {0, 4}, {6}, {2, 3, 129}};
  for (DType dt : kFloatDTypes) {
    for (const Shape& shape : shapes) {
      Tensor x = rand_cpu(shape, -20.0f, 20.0f, DType::F32);
      if (shape == Shape{5, 7}) {  // a row with -inf entries
        std::vector<float> v = x.to_floats();
        v[0] = v[3] = -std::numeric_limits<float>::infinity();
        x = Tensor::from_floats(shape, v);
      }
      x = x.to(dt);
      for (bool transposed : {false, true}) {
        if (transposed && shape.ndim() < 2) continue;
        // Transposed: softmax runs over a strided last dim of a [.., n, m] tensor viewed as [.., m, n].
        const Tensor src = transposed ? x.transpose(-1, -2).contiguous().transpose(-1, -2) : x;
        const Tensor xg = transposed ? x.transpose(-1, -2).contiguous().to(kGpu).transpose(-1, -2) : x.to(kGpu);
        const std::string what = fmt::format("{} {}{}", dtype_name(dt), shape.str(), transposed ? " transposed" : "");
        const double extra = dt == DType::BF16 ? kBf16Rtol : 0.0;
        expect_close(ops::softmax(xg), ops::softmax(cpu_f32(src)), 1e-5 + extra, 1e-7, "softmax " + what);
        expect_close(ops::log_softmax(xg), ops::log_softmax(cpu_f32(src)), 1e-5 + extra, 1e-5, "log_softmax " + what);
      }
    }
  }
}

// ---- gemm ------------------------------------------------------------------------------------------------

struct GemmCase {
  int64_t batch_a, batch_b;  // 0 = 2-D
  int64_t m, n, k;
  bool ta, tb;
  float alpha, beta;
  bool strided;  // operands and c with leading dims larger than their rows
};

// Random operand holding op(x) = [rows, cols] (stored transposed when `trans`), optionally with a padded
// leading dim, BF16-exact when `dt` is BF16. Returned as F32 on the CPU.
Tensor gemm_operand(int64_t batch, int64_t rows, int64_t cols, bool trans, bool strided, DType dt) {
  const int64_t r = trans ? cols : rows, c = trans ? rows : cols;
  const int64_t pad = strided ? 5 : 0;
  Shape shape = batch > 0 ? Shape{batch, r, c + pad} : Shape{r, c + pad};
  Tensor t = rand_cpu(shape, -1.0f, 1.0f, dt).to(DType::F32);
  return t.slice(-1, 0, c);
}

void run_gemm_case(const GemmCase& gc, DType in_dt, DType out_dt) {
  const std::string what =
      fmt::format("gemm batch ({},{}) m={} n={} k={} ta={} tb={} alpha={} beta={} strided={} {}->{}", gc.batch_a, gc.batch_b, gc.m, gc.n, gc.k, gc.ta, gc.tb, gc.alpha, gc.beta, gc.strided,
                  dtype_name(in_dt), dtype_name(out_dt));
  const Tensor a = gemm_operand(gc.batch_a, gc.m, gc.k, gc.ta, gc.strided, in_dt);
  const Tensor b = gemm_operand(gc.batch_b, gc.k, gc.n, gc.tb, gc.strided, in_dt);
  const int64_t batch = std::max(gc.batch_a, gc.batch_b);
  const Tensor c0 = gemm_operand(gc.batch_a > 0 ? batch : 0, gc.m, gc.n, false, gc.strided, out_dt);

  Tensor want = c0.clone();
  ops::gemm(a, gc.ta, b, gc.tb, gc.alpha, gc.beta, want);

  // GPU: same values in the tested dtypes and the same strided layouts.
  const auto to_gpu_like = [](const Tensor& t, DType dt) {
    // Rebuild the padded layout on the GPU: copy the padded parent, then take the same slice.
    const int last = t.ndim() - 1;
    const int64_t cols = t.size(last), ld = t.ndim() >= 2 ? t.stride(last - 1) : cols;
    Shape parent = t.shape();
    parent[last] = std::max<int64_t>(ld, cols);
    Tensor pg = Tensor::zeros(parent, dt, kGpu);
    Tensor view = pg.slice(last, 0, cols);
    view.copy_from(t.to(dt));
    return view;
  };
  const Tensor ag = to_gpu_like(a, in_dt), bg = to_gpu_like(b, in_dt);
  Tensor cg = to_gpu_like(c0, out_dt);
  ops::gemm(ag, gc.ta, bg, gc.tb, gc.alpha, gc.beta, cg);

  // Tolerance from |a| |b|.
  Tensor abs_prod = Tensor::zeros(want.shape(), DType::F32);
  ops::gemm(ops::unary(UnaryOp::Abs, a), gc.ta, ops::unary(UnaryOp::Abs, b), gc.tb, 1.0f, 0.0f, abs_prod);
  const auto ap = abs_prod.to_floats(), c0v = c0.to_floats(), wv = want.to_floats();
  std::vector<float> tol(ap.size());
  const double u = std::ldexp(1.0, -24);
  for (size_t i = 0; i < tol.size(); ++i) {
    tol[i] = static_cast<float>(4.0 * static_cast<double>(gc.k) * u * std::fabs(gc.alpha) * ap[i] +
                                2.0 * u * std::fabs(gc.beta * c0v[i]) + 1e-6 +
                                (out_dt == DType::BF16 ? kBf16Rtol * std::fabs(wv[i]) : 0.0));
  }
  expect_within(cg, want, tol, what);
}

TEST_F(GpuOps, GemmMatchesCpu) {
  std::vector<GemmCase> cases = {
      {0, 0, 1, 1, 1, false, false, 1.0f, 0.0f, false},      {0, 0, 64, 1, 513, false, false, 1.0f, 0.0f, false},
      {0, 0, 1, 200, 77, false, false, 1.0f, 0.0f, false},   {0, 0, 257, 129, 65, false, true, 0.75f, 0.5f, true},
      {0, 0, 5, 6, 0, false, false, 1.0f, 2.0f, false},      {0, 0, 5, 6, 0, false, false, 1.0f, 0.0f, false},
      {0, 0, 0, 5, 7, false, false, 1.0f, 0.0f, false},      {3, 3, 33, 17, 65, true, false, 1.0f, 0.0f, false},
      {1, 4, 33, 17, 65, false, true, 1.25f, -1.0f, false},  {4, 1, 20, 31, 9, true, true, 1.0f, 0.0f, true},
      {2, 2, 1, 1, 300, false, false, 1.0f, 1.0f, false},
  };
  for (bool ta : {false, true})
    for (bool tb : {false, true}) cases.push_back({0, 0, 129, 67, 300, ta, tb, 1.0f, 0.0f, false});
  const std::pair<DType, DType> dtypes[] = {
      {DType::F32, DType::F32}, {DType::BF16, DType::F32}, {DType::BF16, DType::BF16}, {DType::F32, DType::BF16}};
  for (const auto& [in_dt, out_dt] : dtypes)
    for (const GemmCase& gc : cases) run_gemm_case(gc, in_dt, out_dt);
}

TEST_F(GpuOps, MatmulFrontendOnGpu) {
  const Tensor a = rand_cpu({3, 40, 70}), b = rand_cpu({1, 50, 70});
  const Tensor c = ops::matmul(a.to(kGpu), b.to(kGpu), false, true);
  EXPECT_EQ(c.shape(), (Shape{3, 40, 50}));
  expect_close(c, ops::matmul(a, b, false, true), 1e-5, 5e-5, "matmul batch-broadcast b^T");
  const Tensor cb = ops::matmul(a.to(kGpu).to(DType::BF16), b.to(kGpu).to(DType::BF16), false, true, DType::BF16);
  EXPECT_EQ(cb.dtype(), DType::BF16);
  expect_close(cb, ops::matmul(a.to(DType::BF16).to(DType::F32), b.to(DType::BF16).to(DType::F32), false, true),
               kBf16Rtol, 1e-4, "matmul BF16");
}

// ---- index ops ------------------------------------------------------------------------------------------

TEST_F(GpuOps, IndexSelectIsExact) {
  for (DType dt : {DType::F32, DType::BF16, DType::I64, DType::I32, DType::U8, DType::F8_E4M3, DType::F4_E2M1}) {
    for (DType it : {DType::I32, DType::I64}) {
      for (const Shape& shape : {Shape{10, 6}, Shape{10, 3, 4}, Shape{10}, Shape{1, 2}}) {
        if (dt == DType::F4_E2M1 && shape.ndim() < 2) continue;
        const Tensor x = random_bits(shape, dt);
        const Tensor xg = x.to(kGpu);
        for (int64_t len : {0, 1, 25}) {
          const Tensor idx = rand_index({len}, shape[0], it);
          const std::string what =
              fmt::format("index_select {} {} index {}[{}]", dtype_name(dt), shape.str(), dtype_name(it), len);
          expect_same_bits(ops::index_select(xg, idx.to(kGpu)), ops::index_select(x, idx), what);
        }
      }
      // Non-contiguous x and index (every other element of a [30, 2] index).
      const Tensor base = random_bits({10, 12}, dt);
      const Tensor idx_base = rand_index({30, 2}, 10, it);
      const Tensor idx = idx_base.select(1, 0), idx_g = idx_base.to(kGpu).select(1, 0);
      const auto view = [](const Tensor& t) { return t.slice(1, 2, 8); };
      expect_same_bits(ops::index_select(view(base.to(kGpu)), idx_g), ops::index_select(view(base), idx),
                       fmt::format("index_select {} strided", dtype_name(dt)));
      if (dt != DType::F4_E2M1) {
        const Tensor tb = random_bits({6, 10}, dt);
        expect_same_bits(ops::index_select(tb.to(kGpu).transpose(0, 1), idx_g),
                         ops::index_select(tb.transpose(0, 1), idx),
                         fmt::format("index_select {} transposed", dtype_name(dt)));
      }
    }
  }
}

TEST_F(GpuOps, IndexAddMatchesCpu) {
  for (DType dt : kFloatDTypes) {
    for (DType it : {DType::I32, DType::I64}) {
      for (const Shape& shape : {Shape{10, 3, 5}, Shape{10}, Shape{1, 130}}) {
        for (int64_t len : {0, 1, 25}) {
          Shape src_shape = shape;
          src_shape[0] = len;
          const Tensor out0 = rand_cpu(shape, -1.0f, 1.0f, dt), src = rand_cpu(src_shape, -1.0f, 1.0f, dt);
          const Tensor idx = rand_index({len}, shape[0], it);
          Tensor want = cpu_f32(out0).clone();
          ops::index_add(want, idx, cpu_f32(src));
          Tensor got = out0.to(kGpu);
          ops::index_add(got, idx.to(kGpu), src.to(kGpu));
          const std::string what =
              fmt::format("index_add {} {} index {}[{}]", dtype_name(dt), shape.str(), dtype_name(it), len);
          expect_close(got, want, 1e-6 + (dt == DType::BF16 ? kBf16Rtol : 0.0), 1e-5, what);
        }
      }
    }
    // Non-contiguous out and src (transposed inner dims).
    const Tensor out0 = rand_cpu({10, 5, 3}, -1.0f, 1.0f, dt), src = rand_cpu({25, 5, 3}, -1.0f, 1.0f, dt);
    const Tensor idx = rand_index({25}, 10);
    Tensor want = cpu_f32(out0).clone().transpose(1, 2);
    ops::index_add(want, idx, cpu_f32(src).transpose(1, 2));
    Tensor got_base = out0.to(kGpu);
    Tensor got = got_base.transpose(1, 2);
    ops::index_add(got, idx.to(kGpu), src.to(kGpu).transpose(1, 2));
    expect_close(got, want, 1e-6 + (dt == DType::BF16 ? kBf16Rtol : 0.0), 1e-5,
                 fmt::format("index_add {} strided", dtype_name(dt)));
  }
}

TEST_F(GpuOps, GatherLastIsExact) {
  for (DType dt : kFloatDTypes) {
    for (DType it : {DType::I32, DType::I64}) {
      struct Case {
        Shape x, index;
      };
      for (const Case& c : {Case{{4, 7, 50}, {4, 7, 13}}, Case{{1}, {1}}, Case{{3, 129}, {3, 0}},
                            Case{{5, 1000}, {5, 1000}}}) {
        const Tensor x = rand_cpu(c.x, -1.0f, 1.0f, dt);  // not random bits: the CPU path re-rounds BF16 NaNs
        const Tensor idx = rand_index(c.index, c.x[c.x.ndim() - 1], it);
        const std::string what =
            fmt::format("gather_last {} {} index {}{}", dtype_name(dt), c.x.str(), dtype_name(it), c.index.str());
        expect_same_bits(ops::gather_last(x.to(kGpu), idx.to(kGpu)),
                         ops::gather_last(cpu_f32(x), idx).to(dt), what);
      }
      // Strided x (a slice of the last dim) and transposed index.
      const Tensor xb = rand_cpu({4, 7, 64}, -1.0f, 1.0f, dt);
      const Tensor ib = rand_index({4, 13, 7}, 50, it);
      const auto xv = [](const Tensor& t) { return t.slice(2, 3, 53); };
      const auto iv = [](const Tensor& t) { return t.transpose(1, 2); };
      expect_same_bits(ops::gather_last(xv(xb.to(kGpu)), iv(ib.to(kGpu))),
                       ops::gather_last(xv(cpu_f32(xb)), iv(ib)).to(dt),
                       fmt::format("gather_last {} strided", dtype_name(dt)));
    }
  }
}

TEST_F(GpuOps, ScatterAddLastMatchesCpu) {
  for (DType dt : kFloatDTypes) {
    for (DType it : {DType::I32, DType::I64}) {
      struct Case {
        Shape out, index;
      };
      for (const Case& c : {Case{{4, 7, 50}, {4, 7, 100}}, Case{{1}, {3}}, Case{{3, 129}, {3, 0}},
                            Case{{2, 1000}, {2, 4000}}}) {
        const Tensor out0 = rand_cpu(c.out, -1.0f, 1.0f, dt), src = rand_cpu(c.index, -1.0f, 1.0f, dt);
        const Tensor idx = rand_index(c.index, c.out[c.out.ndim() - 1], it);
        Tensor want = cpu_f32(out0).clone();
        ops::scatter_add_last(want, idx, cpu_f32(src));
        Tensor got = out0.to(kGpu);
        ops::scatter_add_last(got, idx.to(kGpu), src.to(kGpu));
        const std::string what = fmt::format("scatter_add_last {} {} index {}{}", dtype_name(dt), c.out.str(),
                                             dtype_name(it), c.index.str());
        expect_close(got, want, 1e-6 + (dt == DType::BF16 ? kBf16Rtol : 0.0), 1e-5, what);
      }
    }
    // Non-contiguous out, src and index.
    const Tensor out0 = rand_cpu({4, 50, 7}, -1.0f, 1.0f, dt), src = rand_cpu({4, 30, 7}, -1.0f, 1.0f, dt);
    const Tensor idx = rand_index({4, 30, 7}, 50);
    const auto tv = [](const Tensor& t) { return t.transpose(1, 2); };
    Tensor want_base = cpu_f32(out0).clone();
    Tensor want = tv(want_base);
    ops::scatter_add_last(want, tv(idx), tv(cpu_f32(src)));
    Tensor got_base = out0.to(kGpu);
    Tensor got = tv(got_base);
    ops::scatter_add_last(got, tv(idx.to(kGpu)), tv(src.to(kGpu)));
    expect_close(got_base, want_base, 1e-6 + (dt == DType::BF16 ? kBf16Rtol : 0.0), 1e-5,
                 fmt::format("scatter_add_last {} strided", dtype_name(dt)));
  }
}

// ---- topk ----------------------------------------------------------------------------------------------

// Values with many ties (multiples of 0.5), some NaN, signed zeros and infinities.
Tensor topk_input(const Shape& shape) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int> pick(0, 99);
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (auto& x : v) {
    const int p = pick(rng());
    if (p == 0)
      x = std::numeric_limits<float>::quiet_NaN();
    else if (p == 1)
      x = -0.0f;
    else if (p == 2)
      x = 0.0f;
    else if (p == 3)
      x = std::numeric_limits<float>::infinity();
    else if (p == 4)
      x = -std::numeric_limits<float>::infinity();
    else
      x = std::round(normal(rng())) * 0.5f;
  }
  return Tensor::from_floats(shape, v);
}

void check_topk(const Tensor& x_cpu_f32, DType dt, int64_t k, bool transposed, const std::string& what) {
  const Tensor xd = x_cpu_f32.to(dt);  // values in the tested dtype
  const auto view = [&](const Tensor& t) { return transposed ? t.transpose(0, 1) : t; };
  const ops::TopK got = ops::topk(view(xd.to(kGpu)), k);
  const ops::TopK want = ops::topk(view(cpu_f32(xd)), k);
  expect_same_bits(got.indices, want.indices, what + " indices");
  expect_same_bits(dt == DType::F32 ? got.values : got.values.to(DType::F32), want.values, what + " values");
}

TEST_F(GpuOps, TopkMatchesCpuExactlyWithTiesAndNaN) {
  for (DType dt : kFloatDTypes) {
    for (int64_t n : {1, 5, 128, 1000, 4096, 4097, 10000}) {
      const int64_t rows = n >= 4097 ? 3 : 6;
      const Tensor x = topk_input({rows, n});
      for (int64_t k : {int64_t{0}, int64_t{1}, std::min<int64_t>(7, n), n}) {
        check_topk(x, dt, k, false, fmt::format("topk {} [{}, {}] k={}", dtype_name(dt), rows, n, k));
      }
    }
    // Strided rows (transposed input) and 3-D.
    const Tensor xt = topk_input({1000, 6});
    check_topk(xt, dt, 10, true, fmt::format("topk {} transposed", dtype_name(dt)));
    const Tensor x3 = topk_input({2, 3, 100});
    const ops::TopK got = ops::topk(x3.to(dt).to(kGpu), 17);
    const ops::TopK want = ops::topk(cpu_f32(x3.to(dt)), 17);
    expect_same_bits(got.indices, want.indices, fmt::format("topk {} 3-D indices", dtype_name(dt)));
    // Empty rows.
    const ops::TopK e = ops::topk(Tensor::empty({0, 5}, dt, kGpu), 2);
    EXPECT_EQ(e.indices.shape(), (Shape{0, 2}));
  }
}

}  // namespace
}  // namespace dsv4::gputest
