// CPU reference of the block-scaled FP8 ops (runtime/fp8.h): quantisers, dequantiser and the GEMM, whose exact
// definitions are in the header. The CUDA twins are kernels/ops_fp8_quant.cu and kernels/ops_fp8_gemm.cu.
#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "runtime/fp8.h"

namespace dsv4::cpu {
namespace {

const std::array<float, 256>& e4m3_lut() {
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> l{};
    for (int c = 0; c < 256; ++c) l[static_cast<size_t>(c)] = e4m3_to_f32(static_cast<uint8_t>(c));
    return l;
  }();
  return lut;
}

ScaleFormat format_of(const Tensor& scale) { return scale.dtype() == DType::F32 ? ScaleFormat::F32 : ScaleFormat::E8M0; }

float scale_at(const Tensor& scale, int64_t idx) {
  return scale.dtype() == DType::F32 ? scale.data<float>()[idx] : e8m0_to_f32(scale.data_u8()[idx]);
}

void store_scale(Tensor& scale, int64_t idx, float s, uint8_t code) {
  if (scale.dtype() == DType::F32)
    scale.data<float>()[idx] = s;
  else
    scale.data_u8()[idx] = code;
}

// x[r, c] of a 2-D F32 tensor with any strides.
struct Strided2d {
  const float* p;
  int64_t s0, s1;
  float operator()(int64_t r, int64_t c) const { return p[r * s0 + c * s1]; }
};
Strided2d view2d(const Tensor& x) { return {x.data<float>(), x.stride(0), x.stride(1)}; }

// Quantises x (logically [R, C], element (r, c) = get(r, c)) into q [R, C] with one scale per group of
// `group_rows` x 128 (group_rows = 1: Rows1x128, 128: Blocks128x128).
template <typename Get>
void quantize_groups(Get get, int64_t R, int64_t C, int64_t group_rows, Tensor& q, Tensor& scale) {
  const ScaleFormat fmt = format_of(scale);
  uint8_t* qp = q.data_u8();
  const int64_t RB = (R + group_rows - 1) / group_rows, KB = fp8_blocks(C);
  for (int64_t br = 0; br < RB; ++br) {
    const int64_t r0 = br * group_rows, r1 = std::min(R, r0 + group_rows);
    for (int64_t bc = 0; bc < KB; ++bc) {
      const int64_t c0 = bc * kFp8Group, c1 = std::min(C, c0 + kFp8Group);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::abs(get(r, c)));
      uint8_t code = 0;
      const float s = fp8_block_scale(amax, fmt, &code);
      store_scale(scale, br * KB + bc, s, code);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) qp[r * C + c] = f32_to_e4m3(get(r, c) / s);
    }
  }
}

}  // namespace

void fp8_quantize_rows(const Tensor& x, Tensor& q, Tensor& scale) {
  const Strided2d v = view2d(x);
  quantize_groups(v, x.size(0), x.size(1), 1, q, scale);
}

void fp8_quantize_rows_t(const Tensor& x, Tensor& q, Tensor& scale) {
  const Strided2d v = view2d(x);
  quantize_groups([&](int64_t r, int64_t c) { return v(c, r); }, x.size(1), x.size(0), 1, q, scale);
}

void fp8_quantize_blocks(const Tensor& x, Tensor& q, Tensor& scale) {
  const Strided2d v = view2d(x);
  quantize_groups(v, x.size(0), x.size(1), kFp8Group, q, scale);
}

void fp8_dequantize(const Tensor& q, const Tensor& scale, Fp8Layout layout, Tensor& out) {
  const int64_t R = q.size(0), C = q.size(1), KB = fp8_blocks(C);
  const auto& lut = e4m3_lut();
  const uint8_t* qp = q.data_u8();
  float* op = out.data<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t sr = layout == Fp8Layout::Rows1x128 ? r : r / kFp8Group;
    for (int64_t c = 0; c < C; ++c) op[r * C + c] = lut[qp[r * C + c]] * scale_at(scale, sr * KB + c / kFp8Group);
  }
}

void fp8_gemm(const Tensor& a_q, const Tensor& a_scale, const Tensor& b_q, const Tensor& b_scale, Fp8Layout b_layout,
              Fp8GemmImpl /*impl*/, Tensor& c) {
  const int64_t M = a_q.size(0), K = a_q.size(1), N = b_q.size(0), KB = fp8_blocks(K);
  const auto& lut = e4m3_lut();
  const uint8_t* ap = a_q.data_u8();
  const uint8_t* bp = b_q.data_u8();
  float* cp = c.data<float>();
  // Decoded scales (FP32) and rows of decoded codes (FP64: the products and block sums are exact).
  std::vector<float> sa(static_cast<size_t>(M * KB)), sb(static_cast<size_t>(b_scale.numel()));
  for (int64_t i = 0; i < M * KB; ++i) sa[static_cast<size_t>(i)] = scale_at(a_scale, i);
  for (int64_t i = 0; i < b_scale.numel(); ++i) sb[static_cast<size_t>(i)] = scale_at(b_scale, i);
  std::vector<double> bdec(static_cast<size_t>(N * K));
  for (int64_t i = 0; i < N * K; ++i) bdec[static_cast<size_t>(i)] = lut[bp[i]];
  std::vector<double> arow(static_cast<size_t>(K));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) arow[static_cast<size_t>(k)] = lut[ap[m * K + k]];
    for (int64_t n = 0; n < N; ++n) {
      const double* brow = bdec.data() + n * K;
      const int64_t sbr = b_layout == Fp8Layout::Rows1x128 ? n : n / kFp8Group;
      float acc = 0.0f;
      for (int64_t kb = 0; kb < KB; ++kb) {
        const int64_t k0 = kb * kFp8Group, k1 = std::min(K, k0 + kFp8Group);
        double p = 0.0;
        for (int64_t k = k0; k < k1; ++k) p += arow[static_cast<size_t>(k)] * brow[k];
        const float p32 = static_cast<float>(p);
        const float s = sa[static_cast<size_t>(m * KB + kb)] * sb[static_cast<size_t>(sbr * KB + kb)];
        const float term = p32 * s;
        acc = acc + term;
      }
      cp[m * N + n] = acc;
    }
  }
}

int64_t fp4_to_fp8_blocks(const Tensor& packed, const Tensor& scale, Tensor& q, Tensor& s) {
  const int64_t R = packed.size(0), C = packed.size(1), groups = scale.size(1), KB = fp8_blocks(C);
  const uint8_t* q4 = packed.data_u8();
  const uint8_t* s4 = scale.data_u8();
  uint8_t* q8 = q.data_u8();
  uint8_t* s8 = s.data_u8();
  for (int64_t br = 0; br * kFp8Group < R; ++br) {
    const int64_t r0 = br * kFp8Group, r1 = std::min(R, r0 + kFp8Group);
    for (int64_t bc = 0; bc < KB; ++bc) {
      const int64_t c0 = bc * kFp8Group, c1 = std::min(C, c0 + kFp8Group);
      const int64_t g0 = c0 / 32, g1 = (c1 + 31) / 32;
      int kmax = 0;
      for (int64_t row = r0; row < r1; ++row)
        for (int64_t g = g0; g < g1; ++g) {
          const int k = s4[row * groups + g];
          if (k == 0xFF) return row * groups + g;
          kmax = std::max(kmax, k);
        }
      const int S = std::max(kmax - 6, 0);
      s8[br * KB + bc] = static_cast<uint8_t>(S);
      for (int64_t row = r0; row < r1; ++row)
        for (int64_t c = c0; c < c1; ++c)
          q8[row * C + c] = fp4_code_to_e4m3(fp4_get(q4 + row * (C / 2), c), s4[row * groups + c / 32], S);
    }
  }
  return -1;
}

void fp8_transpose_blocks(const Tensor& q, const Tensor& scale, Tensor& qt, Tensor& st) {
  const int64_t R = q.size(0), C = q.size(1);
  const uint8_t* src = q.data_u8();
  uint8_t* dst = qt.data_u8();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) dst[c * R + r] = src[r * C + c];
  const int64_t SR = scale.size(0), SC = scale.size(1), es = dtype_nbytes(scale.dtype(), 1);
  const auto* ss = static_cast<const uint8_t*>(scale.raw_data());
  auto* sd = static_cast<uint8_t*>(st.raw_data());
  for (int64_t r = 0; r < SR; ++r)
    for (int64_t c = 0; c < SC; ++c) std::copy_n(ss + (r * SC + c) * es, es, sd + (c * SR + r) * es);
}

}  // namespace dsv4::cpu
