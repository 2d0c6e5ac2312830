// CUDA twin of the block-scaled FP8 GEMM (runtime/fp8.h; CPU reference src/runtime/cpu_fp8.cpp):
// c [M, N] F32 = a [M, K] (E4M3, 1x128 scales) · b [N, K]^T (E4M3, 1x128 or 128x128 scales).
//
// Two implementations:
//  * cuBLASLt's Hopper block-scaled FP8 modes (cuBLAS >= 12.9). Verified in the installed header
//    /usr/local/cuda-13.0/include/cublasLt.h (cuBLAS 13.1.0): cublasLtMatmulMatrixScale_t has
//    CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F = 4 ("a dedicated CUDA_R_32F scaling factor for each 128-element
//    block in the innermost dimension") and CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F = 5 ("for each
//    128x128-element block"), selected with CUBLASLT_MATMUL_DESC_A_SCALE_MODE / _B_SCALE_MODE (31 / 32) and
//    passed through CUBLASLT_MATMUL_DESC_A_SCALE_POINTER / _B_SCALE_POINTER (17 / 18). The docs (nvmath-python's
//    MatmulMatrixScale binding lists VEC128_32F = 4, BLK128x128_32F = 5) agree. Not in the header, taken from
//    users of the API (TransformerEngine's cuBLAS scale munger and grouped-GEMM setup; unverified on a GPU here):
//      - scales of a 1x128 operand stored row-major [x] = [K / 128, rows] (the row index fastest);
//      - scales of a 128x128 operand stored [rows / 128, pad4(K / 128)] (K blocks fastest, padded to 4);
//      - 1D x 1D, 1D x 2D and 2D x 1D are supported, 2D x 2D is not; sm_90 only (no sm_100/120 kernels).
//    FP8 on Hopper wants the "TN" form: cuBLAS's A = b (weight, K x N column-major = our row-major [N, K],
//    TRANSA = T), B = a (K x M, TRANSB = N), D = N x M column-major = our row-major c [M, N], F32.
//    Every shape goes through it padded so that the layout questions above do not arise: K up to a multiple of 128
//    (no partial K block), M and N up to multiples of 4 (the row-fastest scale rows), zero codes past the real
//    rows / columns (exact zeros in every sum), 16-byte aligned copies where needed and a scratch output when the
//    padded shape differs; only where cuBLASLt's heuristic returns no algorithm does Auto fall back. Expert GEMMs
//    (any row count, any token count in the weight gradient) need this: the fallback below is a CUDA-core kernel.
//    The scales are re-laid out (and E8M0 decoded to F32, exactly) into a scratch buffer per call.
//    Precision: the tensor cores accumulate each 128-wide K block in their own order and the result is
//    promoted to FP32 with the scales; the result equals the reference up to FP32 rounding of the accumulation
//    (tests/gpu/test_gpu_fp8.cpp states the bound).
//  * A CUDA-core fallback (any shape; Fp8GemmImpl::Fallback, or Auto when cuBLASLt declines) that computes the
//    reference's exact definition bit for bit: 64x64 output tile per 256-thread block, 4x4 outputs per thread,
//    K staged through shared memory in chunks of 32 decoded values; per-block partial sums in FP64 (exact),
//    promoted with __double2float_rn and acc = __fadd_rn(acc, __fmul_rn(p32, __fmul_rn(sa, sb))).
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <cublasLt.h>
#include <cublas_v2.h>

#include <array>
#include <climits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "kernels/ops_common.cuh"
#include "runtime/fp8.h"

namespace dsv4::cuda {
namespace {

// ---- fallback kernel --------------------------------------------------------------------------------------------
constexpr int kTile = 64;    // output tile (rows and columns)
constexpr int kChunk = 32;   // K values per shared-memory stage (4 per 128-wide block)
constexpr int kPer = 4;      // outputs per thread along each dim (16 x 16 threads)

__device__ __forceinline__ float scale_value(const float* f32, const uint8_t* e8, int64_t i) {
  return f32 ? f32[i] : e8m0_to_f32(e8[i]);
}

__global__ void __launch_bounds__(256) fp8_gemm_fallback_kernel(const uint8_t* __restrict__ a, const float* sa32,
                                                               const uint8_t* sa8, const uint8_t* __restrict__ b,
                                                               const float* sb32, const uint8_t* sb8, bool b_rows,
                                                               int64_t M, int64_t N, int64_t K, float* c) {
  __shared__ float as[kTile][kChunk + 1];
  __shared__ float bs[kTile][kChunk + 1];
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t KB = (K + kFp8Group - 1) / kFp8Group;
  float acc[kPer][kPer];
  double part[kPer][kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = 0.0f;

  for (int64_t kb = 0; kb < KB; ++kb) {
#pragma unroll
    for (int i = 0; i < kPer; ++i)
#pragma unroll
      for (int j = 0; j < kPer; ++j) part[i][j] = 0.0;
    const int64_t kend = min(K, (kb + 1) * kFp8Group);
    for (int64_t k0 = kb * kFp8Group; k0 < kend; k0 += kChunk) {
      for (int t = static_cast<int>(threadIdx.x); t < kTile * kChunk; t += blockDim.x) {
        const int r = t / kChunk, kk = t % kChunk;
        const int64_t k = k0 + kk;
        const int64_t m = m0 + r, n = n0 + r;
        as[r][kk] = (m < M && k < kend) ? e4m3_to_f32(a[m * K + k]) : 0.0f;
        bs[r][kk] = (n < N && k < kend) ? e4m3_to_f32(b[n * K + k]) : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kChunk; ++kk) {
        double av[kPer], bv[kPer];
#pragma unroll
        for (int i = 0; i < kPer; ++i) av[i] = as[ty + 16 * i][kk];
#pragma unroll
        for (int j = 0; j < kPer; ++j) bv[j] = bs[tx + 16 * j][kk];
#pragma unroll
        for (int i = 0; i < kPer; ++i)
#pragma unroll
          for (int j = 0; j < kPer; ++j) part[i][j] = __fma_rn(av[i], bv[j], part[i][j]);  // exact
      }
      __syncthreads();
    }
    // Promotion of the block: FP32, the reference's order and roundings.
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      const float sa = m < M ? scale_value(sa32, sa8, m * KB + kb) : 0.0f;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (m >= M || n >= N) continue;
        const float sb = scale_value(sb32, sb8, (b_rows ? n : n / kFp8Group) * KB + kb);
        acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(__double2float_rn(part[i][j]), __fmul_rn(sa, sb)));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < M && n < N) c[m * N + n] = acc[i][j];
    }
}

void run_fallback(const Tensor& a_q, const Tensor& a_scale, const Tensor& b_q, const Tensor& b_scale, bool b_rows,
                  Tensor& c) {
  const int64_t M = a_q.size(0), K = a_q.size(1), N = b_q.size(0);
  DSV4_CHECK((M + kTile - 1) / kTile <= 65535, "cuda::fp8_gemm: M = {} too large for the fallback kernel", M);
  DSV4_CHECK((N + kTile - 1) / kTile <= INT_MAX, "cuda::fp8_gemm: N = {} too large", N);
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile), static_cast<unsigned>((M + kTile - 1) / kTile));
  const bool a32 = a_scale.dtype() == DType::F32, b32 = b_scale.dtype() == DType::F32;
  fp8_gemm_fallback_kernel<<<grid, 256, 0, detail::stream_of(c)>>>(
      a_q.data_u8(), a32 ? a_scale.data<float>() : nullptr, a32 ? nullptr : a_scale.data_u8(), b_q.data_u8(),
      b32 ? b_scale.data<float>() : nullptr, b32 ? nullptr : b_scale.data_u8(), b_rows, M, N, K, c.data<float>());
  CUDA_CHECK_LAUNCH();
}

// ---- scale re-layout for cuBLASLt --------------------------------------------------------------------------------
// out [out_rows, out_ld] F32 from a natural row-major scale [in_rows, in_cols]: transpose (out[j, i] = in[i, j],
// the row-fastest 1x128 layout) or copy with the rows padded to out_ld (zeros) for 128x128 scales.
__global__ void relayout_scales_kernel(const float* in32, const uint8_t* in8, int64_t in_rows, int64_t in_cols,
                                       bool transpose, int64_t out_rows, int64_t out_ld, float* out) {
  const int64_t n = out_rows * out_ld;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < n;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = o / out_ld, col = o - r * out_ld;
    const int64_t i = transpose ? col : r, j = transpose ? r : col;
    out[o] = (i < in_rows && j < in_cols) ? scale_value(in32, in8, i * in_cols + j) : 0.0f;
  }
}

Tensor relayout_scales(const Tensor& s, bool transpose, int64_t pad_to) {
  const int64_t rows = s.size(0), cols = s.size(1);
  const int64_t out_rows = transpose ? cols : rows;
  const int64_t inner = transpose ? rows : cols;
  const int64_t out_ld = (inner + pad_to - 1) / pad_to * pad_to;
  // F32 128x128 scales whose rows need no padding (K a multiple of 4 x 128, e.g. every weight of the proxy and release
  // shapes) already are the layout: no copy.
  if (!transpose && s.dtype() == DType::F32 && out_ld == cols && s.is_contiguous() &&
      reinterpret_cast<uintptr_t>(s.raw_data()) % 16 == 0)
    return s;
  Tensor out = Tensor::empty({out_rows, out_ld}, DType::F32, s.device());
  const bool f32 = s.dtype() == DType::F32;
  relayout_scales_kernel<<<detail::blocks_for(out.numel()), detail::kThreads, 0, detail::stream_of(s)>>>(
      f32 ? s.data<float>() : nullptr, f32 ? nullptr : s.data_u8(), rows, cols, transpose, out_rows, out_ld,
      out.data<float>());
  CUDA_CHECK_LAUNCH();
  return out;
}

// ---- cuBLASLt ---------------------------------------------------------------------------------------------------
constexpr int kMaxDevices = 64;
constexpr size_t kLtWorkspaceBytes = size_t{32} << 20;

// Descriptors of one problem (RAII).
struct LtProblem {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  LtProblem(int64_t M, int64_t N, int64_t K, Fp8Layout b_layout, const void* sa_ptr, const void* sb_ptr) {
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof(opT)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof(opN)));
    // cuBLAS's A is our b (weight), its B our a (activations).
    const int32_t mode_a = b_layout == Fp8Layout::Blocks128x128 ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
                                                                : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    const int32_t mode_b = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode_a, sizeof(mode_a)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode_b, sizeof(mode_b)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sb_ptr, sizeof(sb_ptr)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa_ptr, sizeof(sa_ptr)));
    const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, u(K), u(N), K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, u(K), u(M), K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, u(N), u(M), N));
  }
  ~LtProblem() {
    if (lc) (void)cublasLtMatrixLayoutDestroy(lc);
    if (lb) (void)cublasLtMatrixLayoutDestroy(lb);
    if (la) (void)cublasLtMatrixLayoutDestroy(la);
    if (desc) (void)cublasLtMatmulDescDestroy(desc);
  }
  LtProblem(const LtProblem&) = delete;
  LtProblem& operator=(const LtProblem&) = delete;
};

// A cached problem: the heuristic's algorithm and the descriptors (created once; the scale pointers are set per call
// under Lt::mu). Creating the descriptors on every call cost about as much host time as a small GEMM.
struct LtHeuristic {
  bool ok = false;
  cublasLtMatmulAlgo_t algo{};
  std::shared_ptr<LtProblem> problem;
};

struct Lt {
  std::mutex mu;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, LtHeuristic> cache;  // (M, N, K, b_layout)
};

Lt& lt_for(int device) {
  DSV4_CHECK(device >= 0 && device < kMaxDevices, "cuda:{}: device index out of range", device);
  static auto* once = new std::array<std::once_flag, kMaxDevices>;
  static auto* lts = new std::array<Lt, kMaxDevices>;  // leaked on purpose (used until exit)
  Lt& lt = (*lts)[static_cast<size_t>(device)];
  std::call_once((*once)[static_cast<size_t>(device)], [&] {
    CUBLAS_CHECK(cublasLtCreate(&lt.handle));
    CUDA_CHECK(cudaMalloc(&lt.workspace, kLtWorkspaceBytes));
  });
  return lt;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Heuristic for (M, N, K, layout), cached per device; the caller holds lt.mu.
const LtHeuristic& lt_heuristic(Lt& lt, int64_t M, int64_t N, int64_t K, Fp8Layout b_layout) {
  const auto key = std::make_tuple(M, N, K, static_cast<int>(b_layout));
  auto it = lt.cache.find(key);
  if (it != lt.cache.end()) return it->second;
  LtHeuristic h;
  // Scale pointers are not read by the heuristic; any non-null device address stands in (set per call later).
  h.problem = std::make_shared<LtProblem>(M, N, K, b_layout, lt.workspace, lt.workspace);
  const LtProblem& p = *h.problem;
  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = kLtWorkspaceBytes;
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(lt.handle, p.desc, p.la, p.lb, p.lc, p.lc, pref, 1, &res, &found);
  (void)cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS) {
    h.ok = true;
    h.algo = res.algo;
  }
  return lt.cache.emplace(key, h).first->second;
}

// The padded problem cuBLASLt runs: K up to a multiple of 128, M and N up to multiples of 4. Zero codes past the
// real rows / columns add exact zeros, and the scale tensors already have ceil(K / 128) blocks (a multiple of 4
// never crosses a 128 boundary), so the padded product's first M x N outputs are the unpadded product's.
struct LtShape {
  int64_t M, N, K;
};
LtShape lt_shape(const Tensor& a_q, const Tensor& b_q) {
  return {round_up(a_q.size(0), 4), round_up(b_q.size(0), 4), round_up(a_q.size(1), kFp8Group)};
}

bool lt_accepts(const Tensor& a_q, const Tensor& b_q, Fp8Layout b_layout, const Tensor& c) {
  const LtShape s = lt_shape(a_q, b_q);
  if (s.K <= 0 || s.M > INT32_MAX || s.N > INT32_MAX || s.K > INT32_MAX) return false;
  Lt& lt = lt_for(c.device().index);
  std::lock_guard<std::mutex> lock(lt.mu);
  return lt_heuristic(lt, s.M, s.N, s.K, b_layout).ok;
}

// q [rows, cols] E4M3 codes as a 16-byte aligned [prows, pcols] matrix (zeros past the real ones); q itself when
// it already is one.
Tensor padded_codes(const Tensor& q, int64_t prows, int64_t pcols) {
  const int64_t rows = q.size(0), cols = q.size(1);
  if (rows == prows && cols == pcols && aligned16(q.raw_data())) return q;
  Tensor out = Tensor::empty({prows, pcols}, q.dtype(), q.device());
  const cudaStream_t st = detail::stream_of(q);
  CUDA_CHECK(cudaMemsetAsync(out.raw_data(), 0, static_cast<size_t>(prows * pcols), st));
  if (rows > 0 && cols > 0)
    CUDA_CHECK(cudaMemcpy2DAsync(out.raw_data(), static_cast<size_t>(pcols), q.raw_data(), static_cast<size_t>(cols),
                                 static_cast<size_t>(cols), static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, st));
  return out;
}

void run_cublaslt(const Tensor& a_q, const Tensor& a_scale, const Tensor& b_q, const Tensor& b_scale,
                  Fp8Layout b_layout, Tensor& c) {
  const int64_t M = a_q.size(0), N = b_q.size(0);
  const LtShape s = lt_shape(a_q, b_q);
  const Tensor a = padded_codes(a_q, s.M, s.K), b = padded_codes(b_q, s.N, s.K);
  const Tensor sa = relayout_scales(a_scale, /*transpose=*/true, 4);  // [K/128, pad4(M)]
  const Tensor sb = b_layout == Fp8Layout::Rows1x128 ? relayout_scales(b_scale, true, 4)    // [K/128, pad4(N)]
                                                     : relayout_scales(b_scale, false, 4);  // [N/128, pad4(K/128)]
  const bool direct_out = s.M == M && s.N == N && aligned16(c.raw_data());
  Tensor out = direct_out ? c : Tensor::empty({s.M, s.N}, DType::F32, c.device());
  Lt& lt = lt_for(c.device().index);
  {
    std::lock_guard<std::mutex> lock(lt.mu);
    const LtHeuristic& h = lt_heuristic(lt, s.M, s.N, s.K, b_layout);
    DSV4_CHECK(h.ok, "cuda::fp8_gemm: cuBLASLt has no block-scaled algorithm for M={} N={} K={}", s.M, s.N, s.K);
    const LtProblem& p = *h.problem;
    const void* sa_ptr = sa.raw_data();
    const void* sb_ptr = sb.raw_data();
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sb_ptr, sizeof(sb_ptr)));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa_ptr, sizeof(sa_ptr)));
    const float alpha = 1.0f, beta = 0.0f;
    CUBLAS_CHECK(cublasLtMatmul(lt.handle, p.desc, &alpha, b.raw_data(), p.la, a.raw_data(), p.lb, &beta,
                                out.raw_data(), p.lc, out.raw_data(), p.lc, &h.algo, lt.workspace, kLtWorkspaceBytes,
                                detail::stream_of(c)));
  }
  if (!direct_out)
    CUDA_CHECK(cudaMemcpy2DAsync(c.raw_data(), static_cast<size_t>(N) * sizeof(float), out.raw_data(),
                                 static_cast<size_t>(s.N) * sizeof(float), static_cast<size_t>(N) * sizeof(float),
                                 static_cast<size_t>(M), cudaMemcpyDeviceToDevice, detail::stream_of(c)));
}

}  // namespace

bool fp8_gemm_cublaslt_accepts(const Tensor& a_q, const Tensor& b_q, Fp8Layout b_layout, const Tensor& c) {
  detail::DeviceGuard guard(c.device().index);
  return lt_accepts(a_q, b_q, b_layout, c);
}

void fp8_gemm(const Tensor& a_q, const Tensor& a_scale, const Tensor& b_q, const Tensor& b_scale, Fp8Layout b_layout,
              Fp8GemmImpl impl, Tensor& c) {
  detail::DeviceGuard guard(c.device().index);
  if (a_q.size(1) == 0) {  // empty sum
    fill(c, 0.0);
    return;
  }
  const bool use_lt = impl == Fp8GemmImpl::CublasLt ||
                      (impl == Fp8GemmImpl::Auto && lt_accepts(a_q, b_q, b_layout, c));
  if (use_lt) {
    DSV4_CHECK(impl != Fp8GemmImpl::CublasLt || lt_accepts(a_q, b_q, b_layout, c),
               "cuda::fp8_gemm: cuBLASLt has no block-scaled algorithm for M={} N={} K={} (padded to multiples of "
               "4, 4 and 128)",
               a_q.size(0), b_q.size(0), a_q.size(1));
    run_cublaslt(a_q, a_scale, b_q, b_scale, b_layout, c);
  } else {
    run_fallback(a_q, a_scale, b_q, b_scale, b_layout == Fp8Layout::Rows1x128, c);
  }
}

}  // namespace dsv4::cuda
