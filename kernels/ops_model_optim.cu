// CUDA twins of the optimizer ops of runtime/model_ops.h (CPU reference src/runtime/cpu_model_ops.cpp): AdamW,
// Muon's momentum and apply (the element rules of runtime/update_math.h; this file is built with --fmad=false, so
// they compute the CPU's bits) and a batched Newton-Schulz on cuBLAS (GEMMs through runtime/ops.h's gemm,
// strided-batched over the matrices, tall ones without transposed copies, FP32 accumulation; same schedule, operation order and, for NsPrecision::BF16,
// the same BF16 rounding points as runtime/newton_schulz.cpp).
#include "kernels/cuda_check.cuh"  // first: makes fmt usable under nvcc

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>

#include "kernels/ops_common.cuh"
#include "runtime/model_ops.h"
#include "runtime/ops.h"

namespace dsv4::cuda {
namespace {

using detail::blocks_for;
using detail::stream_of;
constexpr int kThreads = 256;



// The Frobenius normalisation before the iterations, over X [B, n] (n = r * c): the squares summed in double
// (of the BF16-rounded values for NsPrecision::BF16), in fixed chunks of kNsNormChunk elements per block so that the
// whole GPU works on it (one block per matrix left most SMs idle and read at a few GB/s per SM) and the sums do not
// depend on the device; then per matrix the chunk sums in chunk order and one scale.
constexpr int64_t kNsNormChunk = 16384;

__device__ double block_sum(double v) {
  __shared__ double smem[kThreads];
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  return smem[0];
}

// partial[b * chunks + j] = sum of v^2 over chunk j of matrix b; grid (chunks, min(B, 65535)).
__global__ void ns_sumsq_kernel(const float* x, int64_t n, int64_t chunks, int64_t B, bool bf16, double* partial) {
  const int64_t j = blockIdx.x;
  const int64_t hi = min(n, (j + 1) * kNsNormChunk);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float* xb = x + b * n;
    double ss = 0;
    for (int64_t i = j * kNsNormChunk + threadIdx.x; i < hi; i += blockDim.x) {
      const double v = bf16 ? round_bf16(xb[i]) : xb[i];
      ss += v * v;
    }
    const double total = block_sum(ss);
    if (threadIdx.x == 0) partial[b * chunks + j] = total;
    __syncthreads();  // block_sum's shared memory is reused by the next matrix
  }
}

// Per matrix: F32 the factor float(1 / max(||X||, eps)); BF16 the divisor bf16(float(max(||bf16(X)||, eps))) (the CPU
// emulation's rounding points: torch's BF16 norm and division).
__global__ void ns_norm_kernel(const double* partial, int64_t chunks, int64_t B, double eps, bool bf16, float* out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double ss = 0;
  for (int64_t j = 0; j < chunks; ++j) ss += partial[b * chunks + j];
  const double nrm = fmax(sqrt(ss), eps);
  out[b] = bf16 ? round_bf16(static_cast<float>(nrm)) : static_cast<float>(1.0 / nrm);
}

// X[b] *= inv[b] over X [B, n] (F32, in place).
__global__ void ns_scale_kernel(float* x, const float* inv, int64_t n, int64_t total) {
  GRID_STRIDE(i, total) x[i] *= inv[i / n];
}

// X16[b] = bf16(bf16(U[b]) / nrm[b]) over U [B, n].
__global__ void ns_scale_bf16_kernel(const float* u, const float* nrm, uint16_t* x, int64_t n, int64_t total) {
  GRID_STRIDE(i, total) x[i] = f32_to_bf16(round_bf16(u[i]) / nrm[i / n]);
}

// Normalises U [B, n] (F32) into out: in place for F32 (out == U), into the BF16 tensor out for bf16.
void ns_normalize(const Tensor& U, double eps, Tensor& out) {
  const int64_t B = U.size(0), n = U.numel() / std::max<int64_t>(B, 1), chunks = (n + kNsNormChunk - 1) / kNsNormChunk;
  const bool bf16 = out.dtype() == DType::BF16;
  cudaStream_t st = stream_of(U);
  Tensor partial = Tensor::empty({B * chunks}, DType::I64, U.device());  // doubles
  double* partial_d = static_cast<double*>(partial.raw_data());
  Tensor scale = Tensor::empty({B}, DType::F32, U.device());
  ns_sumsq_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(B, 65535))), kThreads, 0,
                    st>>>(U.data<float>(), n, chunks, B, bf16, partial_d);
  CUDA_CHECK_LAUNCH();
  ns_norm_kernel<<<blocks_for(B), kThreads, 0, st>>>(partial_d, chunks, B, eps, bf16, scale.data<float>());
  CUDA_CHECK_LAUNCH();
  if (bf16)
    ns_scale_bf16_kernel<<<blocks_for(U.numel()), kThreads, 0, st>>>(U.data<float>(), scale.data<float>(),
                                                                      out.data_u16(), n, U.numel());
  else
    ns_scale_kernel<<<blocks_for(U.numel()), kThreads, 0, st>>>(out.data<float>(), scale.data<float>(), n, U.numel());
  CUDA_CHECK_LAUNCH();
}

// ---- many tensors per launch (optimizer updates, gradient clipping, BF16 weight operands) ----------------------
// A device table over T tensors, each cut into chunks of kNsNormChunk elements, one block per chunk:
//   [P pointer arrays (T each) | sizes (T) | first_chunk (T + 1) | payload bytes (per-tensor scalars)]
// Tensor t owns chunks [first_chunk[t], first_chunk[t + 1]); P lists of equal-shape tensors share the sizes.
template <int P>
struct MultiTable {
  const int64_t* base = nullptr;
  int64_t T = 0;
  __device__ float* ptr(int p, int64_t t) const { return reinterpret_cast<float*>(base[p * T + t]); }
  __device__ int64_t size(int64_t t) const { return base[P * T + t]; }
  __device__ const int64_t* first_chunk() const { return base + (P + 1) * T; }
  __device__ const void* payload() const { return base + (P + 2) * T + 1; }
  // The tensor of chunk c: the last t with first_chunk[t] <= c (tensors without chunks are never chosen).
  __device__ int64_t owner(int64_t c) const {
    const int64_t* fc = first_chunk();
    int64_t lo = 0, hi = T;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (fc[mid] <= c) lo = mid; else hi = mid;
    }
    while (fc[lo + 1] <= c) ++lo;
    return lo;
  }
};

// The host side: the table on the lists' device (uploaded without waiting: cuda_context.cu's memcpy_h2d) and the
// chunk count.
template <int P>
struct MultiTableHost {
  Tensor table;
  MultiTable<P> view;
  int64_t chunks = 0;
};

template <int P>
MultiTableHost<P> multi_table(const std::array<const std::vector<Tensor>*, P>& lists, const void* payload = nullptr,
                              size_t payload_bytes = 0) {
  const std::vector<Tensor>& first = *lists[0];
  const int64_t T = static_cast<int64_t>(first.size());
  const int64_t words = (P + 2) * T + 1 + static_cast<int64_t>((payload_bytes + 7) / 8);
  std::vector<int64_t> h(static_cast<size_t>(words), 0);
  MultiTableHost<P> mt;
  for (int64_t t = 0; t < T; ++t) {
    for (int p = 0; p < P; ++p)
      h[static_cast<size_t>(p * T + t)] =
          static_cast<int64_t>(reinterpret_cast<uintptr_t>((*lists[static_cast<size_t>(p)])[static_cast<size_t>(t)].raw_data()));
    const int64_t n = first[static_cast<size_t>(t)].numel();
    h[static_cast<size_t>(P * T + t)] = n;
    h[static_cast<size_t>((P + 1) * T + t)] = mt.chunks;
    mt.chunks += (n + kNsNormChunk - 1) / kNsNormChunk;
  }
  h[static_cast<size_t>((P + 2) * T)] = mt.chunks;
  if (payload_bytes) std::memcpy(h.data() + (P + 2) * T + 1, payload, payload_bytes);
  DSV4_CHECK(mt.chunks < (int64_t{1} << 31), "multi-tensor op: {} chunks in one call", mt.chunks);
  mt.table = Tensor::from_vector<int64_t>({words}, h).to(first[0].device());
  mt.view.base = mt.table.template data<int64_t>();
  mt.view.T = T;
  return mt;
}

// f(table, t, i) for every element i of every tensor t; one block per chunk.
template <int P, typename F>
__global__ void multi_apply_kernel(MultiTable<P> tab, F f) {
  const int64_t c = blockIdx.x, t = tab.owner(c);
  const int64_t b = (c - tab.first_chunk()[t]) * kNsNormChunk, e = min(tab.size(t), b + kNsNormChunk);
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) f(tab, t, i);
}

template <int P, typename F>
void multi_apply(const MultiTableHost<P>& mt, const Tensor& on, F f) {
  if (mt.chunks == 0) return;
  multi_apply_kernel<P, F><<<static_cast<unsigned>(mt.chunks), kThreads, 0, stream_of(on)>>>(mt.view, f);
  CUDA_CHECK_LAUNCH();
}

// Lists: w, g, exp_avg, exp_avg_sq; payload: AdamWScalars per tensor.
struct AdamWOp {
  __device__ void operator()(const MultiTable<4>& tab, int64_t t, int64_t i) const {
    const AdamWScalars s = static_cast<const AdamWScalars*>(tab.payload())[t];
    float* w = tab.ptr(0, t);
    float* m = tab.ptr(2, t);
    float* v = tab.ptr(3, t);
    float wi = w[i], mi = m[i], vi = v[i];
    adamw_element(wi, tab.ptr(1, t)[i], mi, vi, s);
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
  }
};

// Lists: g, momentum, u.
struct MomentumOp {
  float mu;
  bool nesterov;
  __device__ void operator()(const MultiTable<3>& tab, int64_t t, int64_t i) const {
    float* m = tab.ptr(1, t);
    float mi = m[i], ui = 0.0f;
    muon_momentum_element(tab.ptr(0, t)[i], mi, ui, mu, nesterov);
    m[i] = mi;
    tab.ptr(2, t)[i] = ui;
  }
};

// Lists: w, o.
struct ApplyOp {
  MuonApplyScalars s;
  __device__ void operator()(const MultiTable<2>& tab, int64_t t, int64_t i) const {
    float* w = tab.ptr(0, t);
    w[i] = muon_apply_element(w[i], tab.ptr(1, t)[i], s);
  }
};

// Lists: x (F32), y (BF16).
struct ToBf16Op {
  __device__ void operator()(const MultiTable<2>& tab, int64_t t, int64_t i) const {
    reinterpret_cast<uint16_t*>(tab.ptr(1, t))[i] = f32_to_bf16(tab.ptr(0, t)[i]);
  }
};

struct ScaleOp {
  float factor;
  __device__ void operator()(const MultiTable<1>& tab, int64_t t, int64_t i) const {
    float* x = tab.ptr(0, t);
    x[i] = __fmul_rn(x[i], factor);
  }
};

// partial[c] = sum of x^2 over chunk c (double); grid = the chunks.
__global__ void multi_sumsq_kernel(MultiTable<1> tab, double* partial) {
  const int64_t c = blockIdx.x, t = tab.owner(c);
  const float* x = tab.ptr(0, t);
  const int64_t b = (c - tab.first_chunk()[t]) * kNsNormChunk, e = min(tab.size(t), b + kNsNormChunk);
  double ss = 0;
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) ss += static_cast<double>(x[i]) * x[i];
  const double total = block_sum(ss);
  if (threadIdx.x == 0) partial[c] = total;
}

// out[t] = the chunk sums of tensor t in chunk order.
__global__ void multi_sumsq_finish_kernel(MultiTable<1> tab, const double* partial, double* out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tab.T) return;
  double s = 0;
  for (int64_t c = tab.first_chunk()[t]; c < tab.first_chunk()[t + 1]; ++c) s += partial[c];
  out[t] = s;
}

__global__ void scale_kernel(const float* x, float a, float* y, int64_t n) {
  GRID_STRIDE(i, n) y[i] = a * x[i];
}

// The three GEMMs of one Newton-Schulz iteration on X [B, r, c]. Wide (r <= c): A = X X^T [B, r, r], B = b A + c A A,
// Y = a X + B X. Tall (r > c): the CPU reference's iteration on Z = X^T, written without transposing anything:
// A = Z Z^T = X^T X [B, c, c], B as above, Y^T = a Z + B Z, i.e. Y = a X + X B^T (B^T read through the transpose flag,
// so no symmetry of the computed B is assumed). The same sums as the reference, in cuBLAS's summation order.
// The terms b A and a X enter as the GEMMs' C operands: F32 scales them first (scale_kernel, then beta = 1: the CPU's
// rounding points); BF16 copies them (exact) and scales by beta inside the GEMM (its FP32 epilogue, one rounding to
// BF16 at the end, as the CPU emulation rounds the GEMM's result once).
void ns_iteration_gemms(const Tensor& x, Tensor& A, Tensor& Bm, Tensor& y, const NsStage& s, bool tall) {
  const float a = static_cast<float>(s.a), b = static_cast<float>(s.b), cc = static_cast<float>(s.c);
  const bool f32 = x.dtype() == DType::F32;
  cudaStream_t st = stream_of(x);
  const auto scaled_copy = [&](const Tensor& src, float alpha, Tensor& dst) {
    if (!f32) {
      dst.copy_from(src);
      return;
    }
    scale_kernel<<<blocks_for(src.numel()), kThreads, 0, st>>>(src.data<float>(), alpha, dst.data<float>(), src.numel());
    CUDA_CHECK_LAUNCH();
  };
  if (tall)
    dsv4::ops::gemm(x, true, x, false, 1.0f, 0.0f, A);  // A = X^T X
  else
    dsv4::ops::gemm(x, false, x, true, 1.0f, 0.0f, A);  // A = X X^T
  scaled_copy(A, b, Bm);
  dsv4::ops::gemm(A, false, A, false, cc, f32 ? 1.0f : b, Bm);  // B = b A + c A A
  scaled_copy(x, a, y);
  if (tall)
    dsv4::ops::gemm(x, false, Bm, true, 1.0f, f32 ? 1.0f : a, y);  // Y = a X + X B^T
  else
    dsv4::ops::gemm(Bm, false, x, false, 1.0f, f32 ? 1.0f : a, y);  // Y = a X + B X
}

// Newton-Schulz in BF16 on X [B, r, c] (F32 in and out; either orientation). X, A, B and Y are BF16 tensors; each
// GEMM accumulates in FP32 and rounds its result once to BF16 (the CPU emulation's rounding points; the copies of
// BF16 values are exact).
void ns_bf16(Tensor& X, const std::vector<NsStage>& schedule, double eps) {
  const int64_t B = X.size(0), r = X.size(1), c = X.size(2), k = std::min(r, c);
  cudaStream_t st = stream_of(X);
  Tensor x16 = Tensor::empty(X.shape(), DType::BF16, X.device());
  Tensor y16 = Tensor::empty(X.shape(), DType::BF16, X.device());
  Tensor A = Tensor::empty({B, k, k}, DType::BF16, X.device());
  Tensor Bm = Tensor::empty({B, k, k}, DType::BF16, X.device());
  ns_normalize(X, eps, x16);
  Tensor* x = &x16;
  Tensor* y = &y16;
  for (const NsStage& s : schedule)
    for (int64_t i = 0; i < s.steps; ++i) {
      ns_iteration_gemms(*x, A, Bm, *y, s, r > c);
      std::swap(x, y);
    }
  X.copy_from(*x);  // BF16 -> F32, exact
}

// Newton-Schulz on X [B, r, c] (either orientation), in place.
void ns_batched(Tensor& X, const std::vector<NsStage>& schedule, double eps, NsPrecision precision) {
  if (precision == NsPrecision::BF16) {
    ns_bf16(X, schedule, eps);
    return;
  }
  const int64_t B = X.size(0), r = X.size(1), c = X.size(2), k = std::min(r, c);
  cudaStream_t st = stream_of(X);
  ns_normalize(X, eps, X);
  Tensor A = Tensor::empty({B, k, k}, DType::F32, X.device());
  Tensor Bm = Tensor::empty({B, k, k}, DType::F32, X.device());
  Tensor Y = Tensor::empty(X.shape(), DType::F32, X.device());
  Tensor* x = &X;
  Tensor* y = &Y;
  for (const NsStage& s : schedule)
    for (int64_t i = 0; i < s.steps; ++i) {
      ns_iteration_gemms(*x, A, Bm, *y, s, r > c);
      std::swap(x, y);
    }
  if (x != &X) X.copy_from(*x);
}

}  // namespace

void adamw_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& g, const std::vector<Tensor>& exp_avg,
                 const std::vector<Tensor>& exp_avg_sq, const std::vector<AdamWScalars>& s) {
  detail::DeviceGuard guard(w[0].device().index);
  static_assert(std::is_trivially_copyable_v<AdamWScalars>);
  multi_apply(multi_table<4>({&w, &g, &exp_avg, &exp_avg_sq}, s.data(), s.size() * sizeof(AdamWScalars)), w[0],
              AdamWOp{});
}

void muon_momentum_steps(const std::vector<Tensor>& g, const std::vector<Tensor>& momentum,
                         const std::vector<Tensor>& u, float mu, bool nesterov) {
  detail::DeviceGuard guard(g[0].device().index);
  multi_apply(multi_table<3>({&g, &momentum, &u}), g[0], MomentumOp{mu, nesterov});
}

void muon_apply_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& o, const MuonApplyScalars& s) {
  detail::DeviceGuard guard(w[0].device().index);
  multi_apply(multi_table<2>({&w, &o}), w[0], ApplyOp{s});
}

void sum_squares(const std::vector<Tensor>& xs, std::vector<double>& sums) {
  detail::DeviceGuard guard(xs[0].device().index);
  const MultiTableHost<1> mt = multi_table<1>({&xs});
  cudaStream_t st = stream_of(xs[0]);
  Tensor partial = Tensor::empty({std::max<int64_t>(mt.chunks, 1)}, DType::I64, xs[0].device());  // doubles
  Tensor out = Tensor::empty({mt.view.T}, DType::I64, xs[0].device());                             // doubles
  double* partial_d = static_cast<double*>(partial.raw_data());
  if (mt.chunks > 0) {
    multi_sumsq_kernel<<<static_cast<unsigned>(mt.chunks), kThreads, 0, st>>>(mt.view, partial_d);
    CUDA_CHECK_LAUNCH();
  }
  multi_sumsq_finish_kernel<<<blocks_for(mt.view.T), kThreads, 0, st>>>(mt.view, partial_d,
                                                                       static_cast<double*>(out.raw_data()));
  CUDA_CHECK_LAUNCH();
  const Tensor host = out.to(Device::cpu());
  std::memcpy(sums.data(), host.raw_data(), sums.size() * sizeof(double));
}

void convert_to_bf16(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys) {
  detail::DeviceGuard guard(xs[0].device().index);
  multi_apply(multi_table<2>({&xs, &ys}), xs[0], ToBf16Op{});
}

void scale_in_place(const std::vector<Tensor>& xs, float factor) {
  detail::DeviceGuard guard(xs[0].device().index);
  multi_apply(multi_table<1>({&xs}), xs[0], ScaleOp{factor});
}

void newton_schulz_batched(Tensor& x, const std::vector<NsStage>& schedule, double eps, NsPrecision precision) {
  detail::DeviceGuard guard(x.device().index);
  Tensor x3 = x.ndim() == 3 ? x : x.unsqueeze(0);
  ns_batched(x3, schedule, eps, precision);
}

}  // namespace dsv4::cuda
