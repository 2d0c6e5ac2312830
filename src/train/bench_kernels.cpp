// dsv4-bench ops / attn: see bench_kernels.h.
//
// Method (both subcommands): every op is called through the frontend the model calls (runtime/model_ops.h,
// runtime/fp8.h: output allocation from the caching allocator and the frontend's zero fills included) or, for
// attention and mHC, through the host API of kernels/attention_kernels.h on dsv4's current stream. Inputs are
// random (never zeros). Each op is called once per buffer set to warm up, then `iters` times back to back, with a
// CUDA event recorded between calls (a few large memsets are queued first so the host runs ahead of the GPU); the
// time of a call is the time between its two events, the result the median. When an op's minimal working set is
// below 4 x the L2 size, ceil(4 x L2 / working set) >= 2 buffer sets (inputs and outputs) are allocated and the
// calls rotate through them, so no call finds its inputs in L2 from the previous one.
//
// Bytes (ops, mHC): the minimal traffic: every input tensor read once and every output written once, at its
// storage size (intermediate workspaces not counted); each op prints the tensors it counts. GB/s = bytes / time
// (1 GB = 1e9 B); "% copy" = that over the bandwidth of cudaMemcpyAsync device-to-device of a 1 GiB buffer,
// counting read + write (2 x 1 GiB per copy).
//
// Attention FLOPs: forward = sum over queries of 2 x 2 x H x C x (keys the query attends to), the convention of
// shared/design/BENCHMARKS.md; backward counted as 2.5 x forward.
#include "train/bench_kernels.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "model/config.h"
#include "runtime/device.h"
#include "runtime/fp8.h"
#include "runtime/model_ops.h"
#include "runtime/tensor.h"
#if defined(DSV4_WITH_CUDA)
#include <cuda_runtime.h>

#include "kernels/attention_kernels.h"
#include "kernels/cuda_runtime_api.h"
#endif

namespace dsv4::bench {

KernelBenchCli::KernelBenchCli(CLI::App& app) {
  ops_ = app.add_subcommand("ops", "GPU: achieved bandwidth of the memory-bound CUDA ops (model_ops.h, fp8.h) at "
                                   "preset shapes, GB/s and fraction of a D2D copy");
  attn_ = app.add_subcommand("attn", "GPU: sparse attention (SWA/HCA/CSA) forward/backward TFLOP/s and fused mHC "
                                     "pre/post forward/backward GB/s at preset shapes");
  attn_opt_.iters = 20;
  for (auto [sub, o] : {std::pair{ops_, &ops_opt_}, std::pair{attn_, &attn_opt_}}) {
    sub->add_option("--preset", o->preset, "model preset for the shapes (proxy-2b, flash, ...)")->capture_default_str();
    sub->add_option("--tokens", o->tokens, "T (tokens)")->capture_default_str()->check(CLI::PositiveNumber);
    sub->add_option("--iters", o->iters, "timed calls per op (median)")->capture_default_str()->check(CLI::Range(3, 100000));
    sub->add_flag("--cpu", o->cpu, "check the harness without a GPU (CUDA builds): CPU twins / host setup only, with a "
                                   "small --tokens; not a benchmark");
  }
  ops_->add_option("--tp", ops_opt_.tp, "vocabulary shards: cross-entropy over a vocab/tp slice")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  ops_->add_option("--scale", ops_opt_.scale, "FP8 scale format of the quantisers")
      ->capture_default_str()
      ->check(CLI::IsMember({"e8m0", "f32"}));
}

int KernelBenchCli::run() const {
  if (*ops_) return run_ops_bench(ops_opt_);
  if (*attn_) return run_attn_bench(attn_opt_);
  return 0;
}

bool bench_no_device(const char* what) {
  if (cuda_device_count() > 0) return false;
  std::printf("dsv4-bench %s: no CUDA device visible%s; nothing to time\n", what,
#if defined(DSV4_WITH_CUDA)
              ""
#else
              " (built without CUDA)"
#endif
  );
  return true;
}

#if !defined(DSV4_WITH_CUDA)

int run_ops_bench(const KernelBenchOptions& opt) {
  if (opt.cpu) std::printf("dsv4-bench ops --cpu: needs a CUDA build\n");
  else bench_no_device("ops");
  return 0;
}
int run_attn_bench(const KernelBenchOptions& opt) {
  if (opt.cpu) std::printf("dsv4-bench attn --cpu: needs a CUDA build\n");
  else bench_no_device("attn");
  return 0;
}

#else

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// The device the ops run on: CUDA 0, or the CPU twins under --cpu.
Device kGpu = Device::cuda(0);
bool on_cpu() { return kGpu.is_cpu(); }

cudaStream_t stream() { return static_cast<cudaStream_t>(cuda::current_stream(0)); }

// Fast deterministic uniform floats (splitmix64).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};

Rng g_rng(12345);

Tensor rnd(const Shape& shape, float lo, float hi, DType dt = DType::F32) {
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (auto& x : v) x = g_rng.uniform(lo, hi);
  return Tensor::from_floats(shape, v, dt).to(kGpu);
}
Tensor rnd_i64(const Shape& shape, int64_t lo, int64_t hi) {  // [lo, hi)
  std::vector<int64_t> v(static_cast<size_t>(shape.numel()));
  for (auto& x : v) x = lo + g_rng.below(hi - lo);
  return Tensor::from_vector<int64_t>(shape, v).to(kGpu);
}
template <typename T>
Tensor upload(const std::vector<T>& v) {
  return Tensor::from_vector<T>({static_cast<int64_t>(v.size())}, v).to(kGpu);
}

// One tensor of a byte count: name, shape, bytes per element.
struct Arr {
  std::string name;
  std::vector<int64_t> shape;
  double elt = 4;
  double bytes() const {
    double n = elt;
    for (int64_t d : shape) n *= static_cast<double>(d);
    return n;
  }
  std::string str() const {
    std::string s = name + "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
    const char* t = elt == 1 ? "u8" : elt == 2 ? "bf16" : elt == 8 ? "64b" : "f32";
    return s + "]" + t;
  }
};
struct Traffic {
  std::vector<Arr> read, write;
  double bytes() const {
    double b = 0;
    for (const auto& a : read) b += a.bytes();
    for (const auto& a : write) b += a.bytes();
    return b;
  }
  std::string str() const {
    std::string s = "R";
    for (const auto& a : read) s += " " + a.str();
    s += " | W";
    for (const auto& a : write) s += " " + a.str();
    return s;
  }
};

struct Timer {
  Tensor lead;  // memset target queued before the timed calls so the host runs ahead
  int iters = 25;
  int64_t l2 = 50 << 20;

  explicit Timer(int it) : iters(it) {
    if (on_cpu()) return;
    int dev = 0, bytes = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, dev), "cudaDeviceGetAttribute(L2)");
    if (bytes > 0) l2 = bytes;
    lead = Tensor::empty({int64_t{64} << 20}, DType::F32, kGpu);  // 256 MiB
  }
  // Buffer sets for a working set of `ws` bytes.
  int sets_for(double ws) const {
    const double cover = 4.0 * static_cast<double>(l2);
    if (ws >= cover) return 1;
    return std::max(2, static_cast<int>(std::ceil(cover / std::max(ws, 1.0))));
  }
  // Median milliseconds of one call; f(i) runs the op on buffer set i.
  double median_ms(int nsets, const std::function<void(int)>& f) const {
    const int warm = std::max(nsets, 3);  // timed call i runs on set (warm + i) % nsets: the rotation continues
    for (int i = 0; i < warm; ++i) f(i % nsets);
    if (on_cpu()) {  // host wall time per call (harness check only)
      std::vector<double> t;
      for (int i = 0; i < iters; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        f((warm + i) % nsets);
        t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(t.begin(), t.end());
      return t[t.size() / 2];
    }
    cuda::synchronize(0);
    std::vector<cudaEvent_t> ev(static_cast<size_t>(iters + 1));
    for (auto& e : ev) check(cudaEventCreate(&e), "cudaEventCreate");
    cudaStream_t st = stream();
    for (int i = 0; i < 4 + iters; ++i)  // ~0.1 ms each on an H100: the host may take ~100 us per call and stay ahead
      check(cudaMemsetAsync(lead.raw_data(), (i % 255) + 1, static_cast<size_t>(lead.nbytes()), st), "cudaMemsetAsync");
    check(cudaEventRecord(ev[0], st), "cudaEventRecord");
    for (int i = 0; i < iters; ++i) {
      f((warm + i) % nsets);
      check(cudaEventRecord(ev[static_cast<size_t>(i + 1)], st), "cudaEventRecord");
    }
    check(cudaEventSynchronize(ev.back()), "cudaEventSynchronize");
    std::vector<double> t;
    for (int i = 0; i < iters; ++i) {
      float ms = 0;
      check(cudaEventElapsedTime(&ms, ev[static_cast<size_t>(i)], ev[static_cast<size_t>(i + 1)]), "cudaEventElapsedTime");
      t.push_back(ms);
    }
    for (auto& e : ev) cudaEventDestroy(e);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

// cudaMemcpyAsync D2D of a 1 GiB buffer: GB/s counting read + write.
double measure_copy_gbs(const Timer& timer) {
  const int64_t n = on_cpu() ? int64_t{16} << 20 : int64_t{256} << 20;  // floats: 1 GiB (CPU: 64 MiB, std::memcpy)
  const Tensor a = rnd({n}, -1, 1), b = Tensor::empty({n}, DType::F32, kGpu);
  if (on_cpu()) {
    const double ms = timer.median_ms(1, [&](int) { std::memcpy(b.raw_data(), a.raw_data(), static_cast<size_t>(a.nbytes())); });
    return 2.0 * static_cast<double>(a.nbytes()) / (ms * 1e-3) / 1e9;
  }
  const double ms = timer.median_ms(1, [&](int) {
    check(cudaMemcpyAsync(b.raw_data(), a.raw_data(), static_cast<size_t>(a.nbytes()), cudaMemcpyDeviceToDevice,
                          stream()),
          "cudaMemcpyAsync");
  });
  return 2.0 * static_cast<double>(a.nbytes()) / (ms * 1e-3) / 1e9;
}

// A benchmark that throws prints its error and the others still run; the command then returns 1.
int g_failures = 0;
void report_failure(const std::string& name, const std::exception& e) {
  ++g_failures;
  std::printf("  %-26s FAILED: %s\n", name.c_str(), e.what());
  std::fflush(stdout);
}

// Runs one op over `nsets` buffer sets built by make(i) and prints its line.
struct OpsTable {
  const Timer& timer;
  double copy_gbs = 0;

  template <typename Set>
  void run(const std::string& name, const Traffic& tr, const std::function<Set()>& make,
           const std::function<void(Set&)>& op, const std::string& note = "") {
    try {
      run_impl<Set>(name, tr, make, op, note);
    } catch (const std::exception& e) {
      report_failure(name, e);
    }
  }
  template <typename Set>
  void run_impl(const std::string& name, const Traffic& tr, const std::function<Set()>& make,
                const std::function<void(Set&)>& op, const std::string& note) {
    const double bytes = tr.bytes();
    const int nsets = timer.sets_for(bytes);
    std::vector<Set> sets;
    sets.reserve(static_cast<size_t>(nsets));
    for (int i = 0; i < nsets; ++i) sets.push_back(make());
    const double ms = timer.median_ms(nsets, [&](int i) { op(sets[static_cast<size_t>(i)]); });
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    std::printf("  %-26s %9.2f %9.1f %8.1f %6.1f%% %4d  %s%s\n", name.c_str(), bytes / 1e6, ms * 1e3, gbs,
                100.0 * gbs / copy_gbs, nsets, tr.str().c_str(), note.empty() ? "" : ("  (" + note + ")").c_str());
    std::fflush(stdout);
    if (!on_cpu()) cuda::synchronize(0);
  }
};

}  // namespace

// Device name and L2 (GPU), or "CPU twins".
std::string device_name() {
  if (on_cpu()) return "CPU twins (harness check, not GPU numbers)";
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  return prop.name;
}

int run_ops_bench(const KernelBenchOptions& opt) {
  kGpu = opt.cpu ? Device::cpu() : Device::cuda(0);
  if (!opt.cpu && bench_no_device("ops")) return 0;
  const ModelConfig cfg = model_preset(opt.preset);
  const int64_t T = opt.tokens, D = cfg.dim, H = cfg.n_heads, C = cfg.head_dim, R = cfg.rope_head_dim;
  const int64_t E = cfg.n_routed_experts, K = cfg.n_activated_experts, I = cfg.moe_inter_dim, N = T * K;
  DSV4_CHECK(cfg.vocab_size % opt.tp == 0, "--tp {} does not divide vocab {}", opt.tp, cfg.vocab_size);
  const int64_t V = cfg.vocab_size / opt.tp;
  // Optimizer tensors: one layer's routed w1 stacked [E * inter, dim] (Muon, FP8 weight quantiser) and the
  // embedding [vocab, dim] (AdamW), each capped at 2^28 elements (1 GiB F32) so that flash fits one GPU.
  const int64_t kCap = int64_t{1} << 28;
  const int64_t mu_rows = std::min(E * I, kCap / D), ad_rows = std::min(cfg.vocab_size, kCap / D);
  const ScaleFormat sf = opt.scale == "f32" ? ScaleFormat::F32 : ScaleFormat::E8M0;
  const double sb = sf == ScaleFormat::F32 ? 4 : 1;

  Timer timer(opt.iters);
  OpsTable tab{timer};
  tab.copy_gbs = measure_copy_gbs(timer);
  std::printf("dsv4-bench ops preset=%s on %s (L2 %.0f MB), median of %d\n", cfg.name.c_str(), device_name().c_str(),
              static_cast<double>(timer.l2) / 1e6, opt.iters);
  std::printf("  shapes: T=%lld tokens, hidden D=%lld, heads H=%lld x head_dim C=%lld (rope %lld), experts E=%lld "
              "top-K=%lld (N=T*K=%lld slots), inter I=%lld, vocab slice V=%lld (tp %lld), fp8 scales %s\n",
              (long long)T, (long long)D, (long long)H, (long long)C, (long long)R, (long long)E, (long long)K,
              (long long)N, (long long)I, (long long)V, (long long)opt.tp, opt.scale.c_str());
  std::printf("  D2D copy (%s, read + write counted): %.1f GB/s\n",
              on_cpu() ? "std::memcpy, 64 MiB" : "cudaMemcpyAsync, 1 GiB", tab.copy_gbs);
  std::printf("  GB/s = minimal bytes (each input read once, each output written once) / median time\n");
  std::printf("  %-26s %9s %9s %8s %7s %4s  %s\n", "op", "MB", "us", "GB/s", "% copy", "sets",
              "minimal bytes: tensors read (R) and written (W)");

  // ---- RMSNorm over the hidden state x [T, D] ----
  {
    struct S { Tensor x, w, dy; RmsNormOut o; };
    const auto make = [&] {
      S s{rnd({T, D}, -2, 2), rnd({D}, 0.5f, 1.5f), rnd({T, D}, -1, 1), {}};
      s.o = rmsnorm_forward(s.x, s.w, cfg.norm_eps);
      return s;
    };
    tab.run<S>("rmsnorm fwd", {{{"x", {T, D}}, {"w", {D}}}, {{"y", {T, D}}, {"rstd", {T}}}}, make,
               [&](S& s) { rmsnorm_forward(s.x, s.w, cfg.norm_eps); });
    tab.run<S>("rmsnorm bwd", {{{"dy", {T, D}}, {"x", {T, D}}, {"w", {D}}, {"rstd", {T}}}, {{"dx", {T, D}}, {"dw", {D}}}},
               make, [&](S& s) { rmsnorm_backward(s.dy, s.x, s.w, s.o.rstd); });
  }
  // ---- RoPE on q [T, H, C] seen as [T*H, C]: the last R channels rotated in place ----
  {
    struct S { Tensor x, pos, inv; };
    const auto make = [&] {
      std::vector<int64_t> p(static_cast<size_t>(T));
      std::iota(p.begin(), p.end(), int64_t{0});
      std::vector<float> inv(static_cast<size_t>(R / 2));
      for (size_t i = 0; i < inv.size(); ++i)
        inv[i] = static_cast<float>(std::pow(cfg.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(R)));
      return S{rnd({T * H, C}, -1, 1), upload(p), upload(inv)};
    };
    const Traffic tr{{{"x_rot", {T * H, R}}, {"pos", {T}, 8}, {"inv_freq", {R / 2}}}, {{"x_rot", {T * H, R}}}};
    tab.run<S>("rope fwd (q)", tr, make, [&](S& s) { rope_apply(s.x, s.pos, s.inv, false); }, "in place, rotated part only");
    tab.run<S>("rope inverse (q)", tr, make, [&](S& s) { rope_apply(s.x, s.pos, s.inv, true); }, "in place, rotated part only");
  }
  // ---- clamped SwiGLU over the routed experts' slots g, u [N, I], slot weights w [N] ----
  {
    struct S { Tensor g, u, w, dh; };
    const auto make = [&] { return S{rnd({N, I}, -12, 12), rnd({N, I}, -12, 12), rnd({N}, 0, 1), rnd({N, I}, -1, 1)}; };
    tab.run<S>("swiglu fwd", {{{"g", {N, I}}, {"u", {N, I}}, {"w", {N}}}, {{"h", {N, I}}}}, make,
               [&](S& s) { swiglu(s.g, s.u, s.w, cfg.swiglu_limit); });
    tab.run<S>("swiglu bwd",
               {{{"g", {N, I}}, {"u", {N, I}}, {"w", {N}}, {"dh", {N, I}}}, {{"dg", {N, I}}, {"du", {N, I}}, {"dw", {N}}}},
               make, [&](S& s) { swiglu_backward(s.g, s.u, s.w, s.dh, cfg.swiglu_limit); });
  }
  // ---- router: scores s [T, E] -> aff = sqrt(softplus(s)) -> top-K (+ bias) and weights ----
  {
    struct S { Tensor s, aff, bias, dw, daff; MoeRoute r; };
    const auto make = [&] {
      S s{rnd({T, E}, -4, 4), {}, rnd({E}, -0.1f, 0.1f), rnd({T, K}, -1, 1), rnd({T, E}, -1, 1), {}};
      s.aff = sqrt_softplus(s.s);
      s.r = moe_route(s.aff, s.bias, Tensor(), K, cfg.route_scale);
      return s;
    };
    tab.run<S>("router sqrt_softplus fwd", {{{"s", {T, E}}}, {{"aff", {T, E}}}}, make, [&](S& s) { sqrt_softplus(s.s); });
    tab.run<S>("router sqrt_softplus bwd", {{{"s", {T, E}}, {"aff", {T, E}}, {"daff", {T, E}}}, {{"ds", {T, E}}}}, make,
               [&](S& s) { sqrt_softplus_backward(s.s, s.aff, s.daff); });
    tab.run<S>("router top-k", {{{"aff", {T, E}}, {"bias", {E}}}, {{"idx", {T, K}, 8}, {"w", {T, K}}}}, make,
               [&](S& s) { moe_route(s.aff, s.bias, Tensor(), K, cfg.route_scale); });
    tab.run<S>("router top-k bwd", {{{"aff", {T, E}}, {"idx", {T, K}, 8}, {"dw", {T, K}}}, {{"daff", {T, E}}}}, make,
               [&](S& s) { moe_route_backward(s.aff, s.r.idx, s.dw, cfg.route_scale); });
  }
  // ---- expert permutation: sort slots, permute x [T, D] -> [N, D], combine [N, D] -> [T, D] ----
  {
    struct I { Tensor idx; };
    tab.run<I>("moe sort slots", {{{"idx", {T, K}, 8}}, {{"offsets", {E + 1}, 8}, {"sorted_slot", {N}, 8}}},
               [&] { return I{rnd_i64({T, K}, 0, E)}; }, [&](I& s) { moe_sort_slots(s.idx, E); });
    struct S { Tensor idx, x, ys, w; MoeSlots sl; };
    const auto make = [&] {
      S s{rnd_i64({T, K}, 0, E), rnd({T, D}, -1, 1), rnd({N, D}, -1, 1), rnd({T, K}, 0, 1), {}};
      s.sl = moe_sort_slots(s.idx, E);
      return s;
    };
    tab.run<S>("moe permute", {{{"x", {T, D}}, {"sorted_slot", {N}, 8}}, {{"out", {N, D}}}}, make,
               [&](S& s) { moe_permute(s.x, s.sl.sorted_slot, K); }, "x counted once although each row is read K times");
    tab.run<S>("moe combine", {{{"y_sorted", {N, D}}, {"sorted_slot", {N}, 8}, {"w", {T, K}}}, {{"y", {T, D}}}}, make,
               [&](S& s) { moe_unpermute(s.ys, s.sl.sorted_slot, s.w, T, K); });
  }
  // ---- cross-entropy partials over logits [T, V] (this rank's vocabulary slice, begin 0) ----
  {
    struct S { Tensor z, tgt, mx; std::vector<double> lse; };
    const auto make = [&] {
      S s{rnd({T, V}, -8, 8), rnd_i64({T}, 0, V), {}, {}};
      s.mx = ce_row_max(s.z);
      const std::vector<double> sums = ce_sums(s.z, s.tgt, s.mx, 0);
      const std::vector<float> m = s.mx.to_floats();
      for (int64_t t = 0; t < T; ++t) s.lse.push_back(m[static_cast<size_t>(t)] + std::log(sums[static_cast<size_t>(t)]));
      return s;
    };
    tab.run<S>("ce row max", {{{"logits", {T, V}}}, {{"max", {T}}}}, make, [&](S& s) { ce_row_max(s.z); });
    tab.run<S>("ce sums", {{{"logits", {T, V}}, {"targets", {T}, 8}, {"max", {T}}}, {{"sums", {2 * T}, 8}}}, make,
               [&](S& s) { ce_sums(s.z, s.tgt, s.mx, 0); }, "returns to the host: includes the D2H copy and sync");
    tab.run<S>("ce backward", {{{"logits", {T, V}}, {"targets", {T}, 8}, {"lse", {T}, 8}}, {{"dlogits", {T, V}}}}, make,
               [&](S& s) { ce_backward(s.z, s.tgt, s.lse, static_cast<double>(T), 0); }, "lse uploaded from the host");
  }
  // ---- optimizer: AdamW on the embedding [vocab, D], Muon on one layer's routed w1 [E*I, D] ----
  {
    struct S { Tensor w, g, m, v; };
    const auto make = [&] { return S{rnd({ad_rows, D}, -1, 1), rnd({ad_rows, D}, -1, 1), rnd({ad_rows, D}, -0.1f, 0.1f), rnd({ad_rows, D}, 0, 0.01f)}; };
    const AdamWScalars sc = adamw_scalars(0.9, 0.95, 1e-8, 0.1, 10, 1e-4);
    tab.run<S>("adamw step", {{{"w", {ad_rows, D}}, {"g", {ad_rows, D}}, {"m", {ad_rows, D}}, {"v", {ad_rows, D}}},
                              {{"w", {ad_rows, D}}, {"m", {ad_rows, D}}, {"v", {ad_rows, D}}}},
               make, [&](S& s) { adamw_step(s.w, s.g, s.m, s.v, sc); }, "in place");
  }
  {
    struct S { Tensor w, g, m, u; };
    const auto make = [&] { return S{rnd({mu_rows, D}, -1, 1), rnd({mu_rows, D}, -1, 1), rnd({mu_rows, D}, -1, 1), rnd({mu_rows, D}, -1, 1)}; };
    const MuonApplyScalars ms = muon_apply_scalars(1e-3, 0.1, 0.2, I, D);
    tab.run<S>("muon momentum", {{{"g", {mu_rows, D}}, {"mom", {mu_rows, D}}}, {{"mom", {mu_rows, D}}, {"u", {mu_rows, D}}}},
               make, [&](S& s) { muon_momentum_step(s.g, s.m, s.u, 0.95f, true); }, "nesterov, in place");
    tab.run<S>("muon apply", {{{"w", {mu_rows, D}}, {"o", {mu_rows, D}}}, {{"w", {mu_rows, D}}}}, make,
               [&](S& s) { muon_apply_step(s.w, s.u, ms); }, "in place");
  }
  // ---- FP8 quantisers: activations x [T, D] BF16 (1x128, and transposed), weights [E*I, D] F32 (128x128) ----
  {
    struct S { Tensor x; };
    const auto make = [&] { return S{rnd({T, D}, -3, 3, DType::BF16)}; };
    tab.run<S>("fp8 quant 1x128 (act)", {{{"x", {T, D}, 2}}, {{"q", {T, D}, 1}, {"scale", {T, fp8_blocks(D)}, sb}}}, make,
               [&](S& s) { fp8_quantize_rows(s.x, sf); });
    tab.run<S>("fp8 quant 1x128 transposed",
               {{{"x", {T, D}, 2}}, {{"q", {D, T}, 1}, {"scale", {D, fp8_blocks(T)}, sb}}}, make,
               [&](S& s) { fp8_quantize_rows_t(s.x, sf); });
  }
  {
    struct S { Tensor w; };
    const auto make = [&] { return S{rnd({mu_rows, D}, -1, 1)}; };
    tab.run<S>("fp8 quant 128x128 (weight)",
               {{{"w", {mu_rows, D}}}, {{"q", {mu_rows, D}, 1}, {"scale", {fp8_blocks(mu_rows), fp8_blocks(D)}, sb}}}, make,
               [&](S& s) { fp8_quantize_blocks(s.w, sf); });
  }
  if (mu_rows < E * I || ad_rows < cfg.vocab_size)
    std::printf("  note: optimizer / weight tensors capped at %lld elements (muon/fp8 weight rows %lld of %lld, adamw "
                "rows %lld of %lld)\n",
                (long long)kCap, (long long)mu_rows, (long long)(E * I), (long long)ad_rows, (long long)cfg.vocab_size);
  return g_failures > 0 ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------------------------
int run_attn_bench(const KernelBenchOptions& opt) {
  kGpu = opt.cpu ? Device::cpu() : Device::cuda(0);
  if (!opt.cpu && bench_no_device("attn")) return 0;
  const ModelConfig cfg = model_preset(opt.preset);
  const int64_t T = opt.tokens, H = cfg.n_heads, C = cfg.head_dim, W = cfg.window_size, topk = cfg.index_topk;
  int64_t csa_ratio = 0, hca_ratio = 0;
  for (int64_t r : cfg.compress_ratios) {
    if (r > 0 && (csa_ratio == 0 || r < csa_ratio)) csa_ratio = r;
    if (r > 0 && r > hca_ratio) hca_ratio = r;
  }
  const float scale = static_cast<float>(std::pow(static_cast<double>(C), -0.5));
  Timer timer(opt.iters);
  std::printf("dsv4-bench attn preset=%s on %s, T=%lld, H=%lld heads x C=%lld head_dim, window %lld, CSA ratio %lld "
              "top-k %lld, HCA ratio %lld, median of %d\n",
              cfg.name.c_str(), device_name().c_str(), (long long)T, (long long)H, (long long)C, (long long)W, (long long)csa_ratio,
              (long long)topk, (long long)hca_ratio, opt.iters);
  std::printf("  FLOPs: forward = sum over queries of 2*2*H*C*(keys attended); backward counted as 2.5 x forward\n");
  std::printf("  %-4s %10s %10s %9s | %10s %9s | %10s %9s\n", "kind", "mean keys", "fwd ms", "TFLOP/s", "bwd ms",
              "TFLOP/s", "fwd+bwd ms", "TFLOP/s");

  const Tensor q = rnd({T, H, C}, -1, 1), kv = rnd({T, C}, -1, 1), sink = rnd({H}, -1, 1), dout = rnd({T, H, C}, -1, 1);
  Tensor o = Tensor::empty({T, H, C}, DType::F32, kGpu), lse = Tensor::empty({T, H}, DType::F32, kGpu);
  Tensor dq = Tensor::empty({T, H, C}, DType::F32, kGpu), dkv = rnd({T, C}, -1, 1), dsink = rnd({H}, -1, 1);
  Tensor ws = Tensor::empty({cuda::sparse_attn_backward_workspace(T, H)}, DType::F32, kGpu);
  std::mt19937_64 pick(7);

  struct Kind { const char* name; int64_t ratio; bool topk; };
  const auto run_kind = [&](const Kind& k) {
    const int64_t n_comp = k.ratio > 0 ? T / k.ratio : 0;
    std::vector<int64_t> wb(static_cast<size_t>(T)), we(static_cast<size_t>(T)), co{0}, ci;
    std::vector<int64_t> pool;
    for (int64_t t = 0; t < T; ++t) {
      wb[static_cast<size_t>(t)] = std::max<int64_t>(0, t - W + 1);
      we[static_cast<size_t>(t)] = t + 1;
      if (k.ratio > 0) {
        const int64_t visible = (t + 1) / k.ratio;  // entries whose whole block is <= t
        if (!k.topk || visible <= topk) {
          for (int64_t e = 0; e < visible; ++e) ci.push_back(e);
        } else {  // random causal top-k: topk distinct of the visible entries, ascending
          pool.resize(static_cast<size_t>(visible));
          std::iota(pool.begin(), pool.end(), int64_t{0});
          for (int64_t j = 0; j < topk; ++j) {
            const int64_t r = j + static_cast<int64_t>(pick() % static_cast<uint64_t>(visible - j));
            std::swap(pool[static_cast<size_t>(j)], pool[static_cast<size_t>(r)]);
          }
          std::sort(pool.begin(), pool.begin() + topk);
          ci.insert(ci.end(), pool.begin(), pool.begin() + topk);
        }
      }
      co.push_back(static_cast<int64_t>(ci.size()));
    }
    std::vector<int32_t> cand_off, cand_ids, key_off, key_q, key_pos_off, key_pos;
    cuda::build_sparse_candidates(wb, we, co, ci, T, cand_off, cand_ids);
    cuda::build_key_major(cand_off, cand_ids, T + n_comp, key_off, key_q);
    const Tensor d_co = upload(cand_off), d_ci = upload(cand_ids), d_ko = upload(key_off), d_kq = upload(key_q);
    const double keys = static_cast<double>(cand_ids.size());
    const double fwd_flop = 2.0 * 2.0 * static_cast<double>(H) * static_cast<double>(C) * keys;
    int64_t expect = 0;  // keys per query by the rule: min(window, t + 1) + visible entries (HCA) or top-k (CSA)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t visible = k.ratio > 0 ? (t + 1) / k.ratio : 0;
      expect += std::min(W, t + 1) + (k.topk ? std::min(topk, visible) : visible);
    }
    DSV4_CHECK(static_cast<int64_t>(cand_ids.size()) == expect && static_cast<int64_t>(cand_off.size()) == T + 1,
               "attn bench: {} candidates built, {} expected", cand_ids.size(), expect);
    const std::string inputs =
        fmt::format("       inputs: {} candidates over {} queries (window {}{}), {} compressed rows; forward {:.2f} GFLOP",
                    cand_ids.size(), T, W,
                    k.ratio == 0 ? std::string()
                    : k.topk     ? fmt::format(" + random causal top-{} of the (t+1)/{} visible entries", topk, k.ratio)
                                 : fmt::format(" + all (t+1)/{} visible entries", k.ratio),
                    n_comp, fwd_flop / 1e9);
    if (on_cpu()) {
      std::printf("  %-4s %10.1f %10s\n%s\n", k.name, keys / static_cast<double>(T), "(not timed)", inputs.c_str());
      return;
    }
    const Tensor ckv = n_comp > 0 ? rnd({n_comp, C}, -1, 1) : Tensor();
    Tensor dckv = n_comp > 0 ? rnd({n_comp, C}, -1, 1) : Tensor();
    const float* ckv_p = n_comp > 0 ? ckv.data<float>() : nullptr;
    float* dckv_p = n_comp > 0 ? dckv.data<float>() : nullptr;
    const auto fwd = [&] {
      cuda::sparse_attn_forward(q.data<float>(), kv.data<float>(), ckv_p, sink.data<float>(), d_co.data<int32_t>(),
                                d_ci.data<int32_t>(), T, T, n_comp, H, C, scale, o.data<float>(), lse.data<float>(),
                                stream());
    };
    const auto bwd = [&] {
      cuda::sparse_attn_backward(q.data<float>(), kv.data<float>(), ckv_p, sink.data<float>(), o.data<float>(),
                                 lse.data<float>(), dout.data<float>(), d_co.data<int32_t>(), d_ci.data<int32_t>(),
                                 d_ko.data<int32_t>(), d_kq.data<int32_t>(), T, T, n_comp, H, C, scale, dq.data<float>(),
                                 dkv.data<float>(), dckv_p, dsink.data<float>(), ws.data<float>(), stream());
    };
    const double t_f = timer.median_ms(1, [&](int) { fwd(); });
    fwd();
    const double t_b = timer.median_ms(1, [&](int) { bwd(); });
    const double t_fb = timer.median_ms(1, [&](int) { fwd(); bwd(); });
    std::printf("  %-4s %10.1f %10.3f %9.1f | %10.3f %9.1f | %10.3f %9.1f\n", k.name, keys / static_cast<double>(T), t_f,
                fwd_flop / (t_f * 1e-3) / 1e12, t_b, 2.5 * fwd_flop / (t_b * 1e-3) / 1e12, t_fb,
                3.5 * fwd_flop / (t_fb * 1e-3) / 1e12);
    std::printf("%s\n", inputs.c_str());
    if (cuda::sparse_attn_tc_supported(H, C)) {
      const double t_tc = timer.median_ms(1, [&](int) {
        cuda::sparse_attn_forward_tc(q.data<float>(), kv.data<float>(), ckv_p, sink.data<float>(), d_co.data<int32_t>(),
                                     d_ci.data<int32_t>(), T, T, n_comp, H, C, scale, o.data<float>(),
                                     lse.data<float>(), stream());
      });
      std::printf("       BF16 tensor-core forward (sparse_attn_forward_tc): %.3f ms, %.1f TFLOP/s\n", t_tc,
                  fwd_flop / (t_tc * 1e-3) / 1e12);
      cuda::build_key_major_positions(cand_off, cand_ids, T + n_comp, key_pos_off, key_pos);
      const Tensor d_kpo = upload(key_pos_off), d_kp = upload(key_pos);
      const int64_t nnz = static_cast<int64_t>(cand_ids.size());
      const Tensor ws_tc =
          Tensor::empty({cuda::sparse_attn_backward_tc_workspace(T, H, C, nnz)}, DType::F32, kGpu);
      const double t_tcb = timer.median_ms(1, [&](int) {
        cuda::sparse_attn_backward_tc(q.data<float>(), kv.data<float>(), ckv_p, sink.data<float>(), o.data<float>(),
                                      lse.data<float>(), dout.data<float>(), d_co.data<int32_t>(), d_ci.data<int32_t>(),
                                      d_kpo.data<int32_t>(), d_kp.data<int32_t>(), T, T, n_comp, nnz, H, C, scale,
                                      dq.data<float>(), dkv.data<float>(), dckv_p, dsink.data<float>(),
                                      ws_tc.data<float>(), stream());
      });
      const int64_t chunk = cuda::sparse_attn_backward_tc_chunk(H, C, nnz);
      std::printf("       BF16 tensor-core backward (sparse_attn_backward_tc): %.3f ms, %.1f TFLOP/s (%.1fx the FP32 "
                  "backward; %lld chunk(s) of <= %lld positions, workspace %.0f MB)\n",
                  t_tcb, 2.5 * fwd_flop / (t_tcb * 1e-3) / 1e12, t_b / t_tcb, (long long)((nnz + chunk - 1) / chunk),
                  (long long)chunk, static_cast<double>(ws_tc.numel()) * 4.0 / 1e6);
    }
    std::fflush(stdout);
  };
  for (const Kind& k : {Kind{"SWA", 0, false}, Kind{"HCA", hca_ratio, false}, Kind{"CSA", csa_ratio, true}}) {
    try {
      run_kind(k);
    } catch (const std::exception& e) {
      report_failure(k.name, e);
    }
  }

  // ---- mHC pre / post, forward / backward ----
  cuda::MhcShape s;
  s.T = T;
  s.n = cfg.hc_mult;
  s.D = cfg.dim;
  s.iters = cfg.hc_sinkhorn_iters;
  s.hc_eps = cfg.hc_eps;
  s.norm_eps = cfg.norm_eps;
  const int64_t n = s.n, D = s.D, M = s.M(), NN = s.N();
  if (on_cpu()) {
    std::printf("  mHC: T=%lld n=%lld D=%lld M=%lld N=%lld (not timed: no CPU twin of the host API)\n", (long long)T,
                (long long)n, (long long)D, (long long)M, (long long)NN);
    return 0;
  }
  std::printf("  mHC: T=%lld, n=%lld streams, D=%lld, M=(2+n)n=%lld mixes, N=nD=%lld, Sinkhorn %lld iterations; GB/s = "
              "minimal bytes / median time\n",
              (long long)T, (long long)n, (long long)D, (long long)M, (long long)NN, (long long)s.iters);
  std::printf("  %-14s %9s %9s %8s  %s\n", "op", "MB", "us", "GB/s", "minimal bytes: tensors read (R) and written (W)");
  struct MS {
    Tensor X, fn, sc, base, x, post, comb, mixes, rstd, dx, dpost, dcomb, dX, dfn, dscale, dbase, ws, F, Xnew, dXnew, dF,
        dpost2, dcomb2;
  };
  const auto make = [&] {
    MS m;
    m.X = rnd({T, n, D}, -1, 1);
    m.fn = rnd({M, NN}, -0.02f, 0.02f);
    m.sc = rnd({3}, 0.5f, 1.5f);
    m.base = rnd({M}, -0.5f, 0.5f);
    m.x = Tensor::empty({T, D}, DType::F32, kGpu);
    m.post = Tensor::empty({T, n}, DType::F32, kGpu);
    m.comb = Tensor::empty({T, n, n}, DType::F32, kGpu);
    m.mixes = Tensor::empty({T, M}, DType::F32, kGpu);
    m.rstd = Tensor::empty({T}, DType::F32, kGpu);
    m.dx = rnd({T, D}, -1, 1);
    m.dpost = rnd({T, n}, -1, 1);
    m.dcomb = rnd({T, n, n}, -1, 1);
    m.dX = Tensor::empty({T, n, D}, DType::F32, kGpu);
    m.dfn = rnd({M, NN}, -1, 1);
    m.dscale = rnd({3}, -1, 1);
    m.dbase = rnd({M}, -1, 1);
    m.ws = Tensor::empty({cuda::mhc_pre_backward_workspace(s)}, DType::F32, kGpu);
    m.F = rnd({T, D}, -1, 1);
    m.Xnew = Tensor::empty({T, n, D}, DType::F32, kGpu);
    m.dXnew = rnd({T, n, D}, -1, 1);
    m.dF = Tensor::empty({T, D}, DType::F32, kGpu);
    m.dpost2 = Tensor::empty({T, n}, DType::F32, kGpu);
    m.dcomb2 = Tensor::empty({T, n, n}, DType::F32, kGpu);
    cuda::mhc_pre_forward(m.X.data<float>(), m.fn.data<float>(), m.sc.data<float>(), m.base.data<float>(),
                          m.x.data<float>(), m.post.data<float>(), m.comb.data<float>(), m.mixes.data<float>(),
                          m.rstd.data<float>(), s, stream());
    return m;
  };
  const auto mrun_impl = [&](const char* name, const Traffic& tr, const std::function<void(MS&)>& op) {
    const double bytes = tr.bytes();
    const int nsets = timer.sets_for(bytes);
    std::vector<MS> sets;
    for (int i = 0; i < nsets; ++i) sets.push_back(make());
    const double ms = timer.median_ms(nsets, [&](int i) { op(sets[static_cast<size_t>(i)]); });
    std::printf("  %-14s %9.2f %9.1f %8.1f  %s%s\n", name, bytes / 1e6, ms * 1e3, bytes / (ms * 1e-3) / 1e9,
                tr.str().c_str(), nsets > 1 ? (" (" + std::to_string(nsets) + " buffer sets)").c_str() : "");
    std::fflush(stdout);
    cuda::synchronize(0);
  };
  const auto mrun = [&](const char* name, const Traffic& tr, const std::function<void(MS&)>& op) {
    try {
      mrun_impl(name, tr, op);
    } catch (const std::exception& e) {
      report_failure(name, e);
    }
  };
  mrun("mhc pre fwd",
       {{{"X", {T, n, D}}, {"fn", {M, NN}}, {"scale", {3}}, {"base", {M}}},
        {{"x", {T, D}}, {"post", {T, n}}, {"comb", {T, n, n}}, {"mixes", {T, M}}, {"rstd", {T}}}},
       [&](MS& m) {
         cuda::mhc_pre_forward(m.X.data<float>(), m.fn.data<float>(), m.sc.data<float>(), m.base.data<float>(),
                               m.x.data<float>(), m.post.data<float>(), m.comb.data<float>(), m.mixes.data<float>(),
                               m.rstd.data<float>(), s, stream());
       });
  mrun("mhc pre bwd",
       {{{"dx", {T, D}}, {"dpost", {T, n}}, {"dcomb", {T, n, n}}, {"X", {T, n, D}}, {"fn", {M, NN}}, {"scale", {3}},
         {"base", {M}}, {"mixes", {T, M}}, {"rstd", {T}}},
        {{"dX", {T, n, D}}, {"dfn", {M, NN}}, {"dscale", {3}}, {"dbase", {M}}}},
       [&](MS& m) {
         cuda::mhc_pre_backward(m.dx.data<float>(), m.dpost.data<float>(), m.dcomb.data<float>(), m.X.data<float>(),
                                m.fn.data<float>(), m.sc.data<float>(), m.base.data<float>(), m.mixes.data<float>(),
                                m.rstd.data<float>(), m.dX.data<float>(), m.dfn.data<float>(), m.dscale.data<float>(),
                                m.dbase.data<float>(), false, m.ws.data<float>(), s, stream());
       });
  mrun("mhc post fwd",
       {{{"F", {T, D}}, {"X", {T, n, D}}, {"post", {T, n}}, {"comb", {T, n, n}}}, {{"Xnew", {T, n, D}}}},
       [&](MS& m) {
         cuda::mhc_post_forward(m.F.data<float>(), m.X.data<float>(), m.post.data<float>(), m.comb.data<float>(),
                                m.Xnew.data<float>(), s, stream());
       });
  mrun("mhc post bwd",
       {{{"dXnew", {T, n, D}}, {"F", {T, D}}, {"X", {T, n, D}}, {"post", {T, n}}, {"comb", {T, n, n}}},
        {{"dF", {T, D}}, {"dX", {T, n, D}}, {"dpost", {T, n}}, {"dcomb", {T, n, n}}}},
       [&](MS& m) {
         cuda::mhc_post_backward(m.dXnew.data<float>(), m.F.data<float>(), m.X.data<float>(), m.post.data<float>(),
                                 m.comb.data<float>(), m.dF.data<float>(), m.dX.data<float>(), m.dpost2.data<float>(),
                                 m.dcomb2.data<float>(), s, stream());
       });
  return g_failures > 0 ? 1 : 0;
}

#endif  // DSV4_WITH_CUDA

}  // namespace dsv4::bench
