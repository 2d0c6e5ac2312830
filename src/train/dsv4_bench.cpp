// dsv4-bench: step benchmarks that print numbers (they never pass or fail).
//   dsv4-bench model --preset tiny|small|proxy-2b --batch B --seq S --steps N [--threads T]
// Runs forward and forward+backward of the CPU reference model and prints time per token, tokens/s and the
// achieved FLOP rate (FLOP convention of shared/design/BENCHMARKS.md, model/flops.h).
//   dsv4-bench gemm [--tokens M] [--iters N] [--shapes N:K,...] [--fallback]
// On a GPU: times BF16 GEMM (cuBLAS, BF16 out, FP32 accumulation) and the block-scaled FP8 GEMM (runtime/fp8.h:
// 1x128 activations x 128x128 weights, F32 out; cuBLASLt where it accepts the shape, else the fallback kernel)
// at DeepSeek-V4 projection shapes, c [M, N] = x [M, K] W[N, K]^T, and prints TFLOP/s (2 M N K per GEMM),
// also with the activation quantisation included. --fallback also times the CUDA-core fallback kernel.
// Without a GPU it says so and exits 0.
//   dsv4-bench grouped [--presets proxy-2b,flash] [--tokens T] [--iters N] [--imbalance S]
// On a GPU: the routed experts' grouped GEMMs (runtime/grouped_gemm.h) at a preset's real expert matrices (w1 / w3
// [I, D]: N = I, K = D; w2 [D, I]: N = D, K = I), tokens x top-k expert-sorted rows split over the experts by a
// fixed-seed multinomial with lognormal expert popularity (--imbalance = sigma of log p; 0 = uniform). Times
// forward y = x W_e^T, dgrad dx = dy W_e, wgrad dW_e = dy^T x (BF16 in, F32 out, FP32 accumulation; one cublasGemmEx
// per expert: cuBLAS's grouped call has no BF16 -> F32 mode) and the block-scaled FP8
// forward (1x128 activations x 128x128 expert weights, quantised once); median of --iters CUDA-event-timed calls
// after 3 warm-up calls, TFLOP/s = 2 T N K / time. Without a GPU it says so and exits 0.
//   dsv4-bench ops | attn: GPU kernel bandwidth / attention and mHC benchmarks, see train/bench_kernels.h.
//   dsv4-bench step: the full training step on a device (tokens/s, TFLOP/s, MFU vs 989 TFLOP/s, peak memory, time
// breakdown mHC / attention / MoE / head+loss / optimizer / other), see train/bench_step.h.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/flops.h"
#include "model/model.h"
#include "runtime/build_info.h"
#include "runtime/cpu_blas.h"
#include "runtime/device.h"
#include "runtime/fp8.h"
#include "runtime/grouped_gemm.h"
#include "runtime/ops.h"
#include "train/bench_kernels.h"
#include "train/bench_step.h"
#if defined(DSV4_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "kernels/cuda_runtime_api.h"
#endif

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int run_model_bench(const std::string& preset, int64_t batch, int64_t seq, int steps, int warmup) {
  using namespace dsv4;
  const ModelConfig cfg = model_preset(preset);
  Model model(cfg);
  model.init_random(1);
  const SeqLayout layout(batch, seq);
  const Tensor ids = bench::random_token_ids(layout.tokens(), cfg.vocab_size, 2);
  const LossWeights weights;

  std::vector<double> fwd, step;
  for (int i = 0; i < warmup + steps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    model.evaluate(ids, ids, layout, weights);
    const double f = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    model.zero_grad();
    model.forward_backward(ids, ids, layout, weights);
    const double fb = seconds_since(t0);
    if (i >= warmup) {
      fwd.push_back(f);
      step.push_back(fb);
    }
  }
  const double tokens = static_cast<double>(layout.tokens());
  const FlopsPerToken fl = model_flops_per_token(cfg, seq);
  const double f_med = median(fwd), s_med = median(step);
  std::printf("dsv4-bench model preset=%s batch=%lld seq=%lld steps=%d (median) threads=%d\n", preset.c_str(),
              static_cast<long long>(batch), static_cast<long long>(seq), steps, cpu_threads());
  std::printf("  params %.3fM (active/token %.3fM, mean visible keys %.1f)\n", model.num_params() / 1e6,
              fl.active_params / 1e6, fl.mean_visible_keys);
  std::printf("  forward          %9.3f ms/step %9.2f us/token %10.1f tokens/s %8.2f GFLOP/s\n", f_med * 1e3,
              f_med / tokens * 1e6, tokens / f_med, fl.forward * tokens / f_med / 1e9);
  std::printf("  backward         %9.3f ms/step %9.2f us/token\n", (s_med - f_med) * 1e3, (s_med - f_med) / tokens * 1e6);
  std::printf("  forward+backward %9.3f ms/step %9.2f us/token %10.1f tokens/s %8.2f GFLOP/s (3 x %.3f MFLOP/token)\n",
              s_med * 1e3, s_med / tokens * 1e6, tokens / s_med, fl.training() * tokens / s_med / 1e9, fl.forward / 1e6);
  return 0;
}

struct GemmShape {
  std::string name;
  int64_t n = 0, k = 0;
};

// "N:K" items separated by commas; default: the V4 projections (wq_a, wq_b, wo_b, expert w1).
std::vector<GemmShape> parse_shapes(const std::string& spec) {
  if (spec.empty())
    return {{"wq_a", 1024, 4096}, {"wq_b", 32768, 1024}, {"wo_b", 4096, 8192}, {"expert_w1", 2048, 4096}};
  std::vector<GemmShape> out;
  size_t pos = 0;
  while (pos <= spec.size()) {
    const size_t end = std::min(spec.find(',', pos), spec.size());
    const std::string item = spec.substr(pos, end - pos);
    const size_t colon = item.find(':');
    if (colon == std::string::npos) throw std::runtime_error("--shapes: expected N:K, got '" + item + "'");
    out.push_back({item, std::stoll(item.substr(0, colon)), std::stoll(item.substr(colon + 1))});
    pos = end + 1;
  }
  return out;
}

int run_gemm_bench(int64_t tokens, int iters, const std::string& shapes_spec, bool fallback) {
  using namespace dsv4;
  const std::vector<GemmShape> shapes = parse_shapes(shapes_spec);
  if (bench::bench_no_device("gemm")) return 0;
#if defined(DSV4_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const auto rand_gpu = [&](int64_t r, int64_t c) {
    std::vector<float> v(static_cast<size_t>(r * c));
    for (auto& x : v) x = u(rng);
    return Tensor::from_floats({r, c}, v).to(gpu);
  };
  // Median seconds of `iters` timed calls after 2 warm-up calls (host clock around a device synchronise).
  const auto time_it = [&](auto&& f) {
    std::vector<double> t;
    for (int i = 0; i < iters + 2; ++i) {
      cuda::synchronize(0);
      const auto t0 = std::chrono::steady_clock::now();
      f();
      cuda::synchronize(0);
      if (i >= 2) t.push_back(seconds_since(t0));
    }
    return median(t);
  };
  std::printf("dsv4-bench gemm M=%lld tokens, median of %d (TFLOP/s = 2 M N K / time)\n",
              static_cast<long long>(tokens), iters);
  std::printf("  %-12s %6s %6s | %-22s | %-22s | %-22s%s\n", "shape", "N", "K", "bf16 cuBLAS", "fp8 gemm",
              "fp8 quant x + gemm", fallback ? " | fp8 fallback kernel" : "");
  for (const GemmShape& s : shapes) {
    const int64_t M = tokens, N = s.n, K = s.k;
    const double flop = 2.0 * double(M) * double(N) * double(K);
    const Tensor x32 = rand_gpu(M, K), w32 = rand_gpu(N, K);
    const Tensor x16 = x32.to(DType::BF16), w16 = w32.to(DType::BF16);
    Tensor c16 = Tensor::empty({M, N}, DType::BF16, gpu);
    const double t_bf16 = time_it([&] { ops::gemm(x16, false, w16, true, 1.0f, 0.0f, c16); });
    const Fp8Tensor a = fp8_quantize_rows(x16, ScaleFormat::F32);
    const Fp8Tensor b = fp8_quantize_blocks(w32, ScaleFormat::F32);  // frozen FP8 weight: quantised once
    Tensor c = Tensor::empty({M, N}, DType::F32, gpu);
    const bool lt = cuda::fp8_gemm_cublaslt_accepts(a.q, b.q, b.layout, c);
    const double t_fp8 = time_it([&] { fp8_gemm(a, b, c); });
    const double t_fp8q = time_it([&] {
      const Fp8Tensor aq = fp8_quantize_rows(x16, ScaleFormat::F32);
      fp8_gemm(aq, b, c);
    });
    std::printf("  %-12s %6lld %6lld | %7.3f ms %7.1f TF/s | %7.3f ms %7.1f TF/s | %7.3f ms %7.1f TF/s", s.name.c_str(),
                static_cast<long long>(N), static_cast<long long>(K), t_bf16 * 1e3, flop / t_bf16 / 1e12, t_fp8 * 1e3,
                flop / t_fp8 / 1e12, t_fp8q * 1e3, flop / t_fp8q / 1e12);
    if (fallback) {
      const double t_fb = time_it([&] { fp8_gemm(a, b, c, Fp8GemmImpl::Fallback); });
      std::printf(" | %8.2f ms %6.1f TF/s", t_fb * 1e3, flop / t_fb / 1e12);
    }
    std::printf("  (fp8 via %s)\n", lt ? "cuBLASLt" : "fallback kernel");
  }
#else
  (void)tokens;
  (void)iters;
  (void)fallback;
#endif
  return 0;
}

// ---- grouped expert GEMMs ------------------------------------------------------------------------------------------

#if defined(DSV4_WITH_CUDA)  // helpers of the grouped benchmark, which only times on a GPU
// Rows per expert: `rows` draws from a fixed-seed multinomial over E experts with p_e ~ exp(sigma z_e), z ~ N(0, 1).
std::vector<int64_t> imbalanced_counts(int64_t E, int64_t rows, double sigma, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> z(0.0, 1.0);
  std::vector<double> w(static_cast<size_t>(E));
  for (auto& x : w) x = std::exp(sigma * z(gen));
  std::discrete_distribution<int64_t> pick(w.begin(), w.end());
  std::vector<int64_t> counts(static_cast<size_t>(E), 0);
  for (int64_t i = 0; i < rows; ++i) ++counts[static_cast<size_t>(pick(gen))];
  return counts;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t end = std::min(s.find(',', pos), s.size());
    if (end > pos) out.push_back(s.substr(pos, end - pos));
    pos = end + 1;
  }
  return out;
}
#endif

int run_grouped_bench(const std::string& presets, int64_t tokens_opt, int iters, double sigma) {
  using namespace dsv4;
  if (bench::bench_no_device("grouped")) return 0;
#if defined(DSV4_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  const auto stream = static_cast<cudaStream_t>(cuda::current_stream(0));
  // Median milliseconds of `iters` calls after 3 warm-up calls, each bracketed by CUDA events on dsv4's stream.
  const auto time_ms = [&](auto&& f) {
    cudaEvent_t a, b;
    if (cudaEventCreate(&a) != cudaSuccess || cudaEventCreate(&b) != cudaSuccess)
      throw std::runtime_error("cudaEventCreate failed");
    std::vector<double> t;
    for (int i = 0; i < iters + 3; ++i) {
      cudaEventRecord(a, stream);
      f();
      cudaEventRecord(b, stream);
      if (cudaEventSynchronize(b) != cudaSuccess) throw std::runtime_error("cudaEventSynchronize failed");
      float ms = 0;
      cudaEventElapsedTime(&ms, a, b);
      if (i >= 3) t.push_back(ms);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return median(t);
  };
  // A BF16 device tensor of uniform [-1, 1) values: one 16M-element random block from the host, tiled.
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int64_t block = int64_t{1} << 24;
  std::vector<float> host(static_cast<size_t>(block));
  for (auto& x : host) x = u(rng);
  const Tensor rand_block = Tensor::from_floats({block}, host, DType::BF16).to(gpu);
  const auto rand_bf16 = [&](const Shape& shape) {
    Tensor t = Tensor::empty(shape, DType::BF16, gpu);
    Tensor flat = t.view({t.numel()});
    for (int64_t i = 0; i < t.numel(); i += block) {
      const int64_t n = std::min(block, t.numel() - i);
      Tensor dst = flat.slice(0, i, i + n);
      ops::copy(rand_block.slice(0, 0, n), dst);
    }
    return t;
  };

  std::printf("dsv4-bench grouped: median of %d (CUDA events, after 3 warm-up calls); TFLOP/s = 2 T N K / time\n",
              iters);
  for (const std::string& preset : split_commas(presets)) {
    const ModelConfig cfg = model_preset(preset);
    const int64_t E = cfg.n_routed_experts, D = cfg.dim, I = cfg.moe_inter_dim, topk = cfg.n_activated_experts;
    const int64_t tokens = tokens_opt > 0 ? tokens_opt : (preset == "flash" || preset == "pro" ? 8192 : 4096);
    const int64_t T = tokens * topk;
    const std::vector<int64_t> counts = imbalanced_counts(E, T, sigma, 17);
    std::vector<int64_t> offsets{0};
    int64_t empty = 0, mx = 0, mn = T, mult4 = 0;
    for (int64_t c : counts) {
      offsets.push_back(offsets.back() + c);
      empty += c == 0;
      mx = std::max(mx, c), mn = std::min(mn, c);
      mult4 += c > 0 && c % 4 == 0;
    }
    std::printf("\n%s: E=%lld experts, D=%lld, I=%lld, %lld tokens x top-%lld = T=%lld rows; rows/expert mean %.1f "
                "min %lld max %lld, %lld empty, %lld with rows %% 4 == 0 (sigma %.2f)\n",
                preset.c_str(), (long long)E, (long long)D, (long long)I, (long long)tokens, (long long)topk,
                (long long)T, double(T) / double(E), (long long)mn, (long long)mx, (long long)empty, (long long)mult4,
                sigma);
    // BF16 inputs, F32 outputs: cuBLAS's grouped GEMM does not support that mix, so the BF16 GEMMs run as Loop.
    std::printf("  %-14s %6s %6s | %-21s | %-21s | %-21s | %-21s\n", "matrix", "N", "K", "bf16 fwd (loop)",
                "bf16 dgrad (loop)", "bf16 wgrad (loop)", "fp8 fwd (auto)");
    struct Mat {
      const char* name;
      int64_t N, K;
    };
    for (const Mat& m : {Mat{"w1/w3 [I, D]", I, D}, Mat{"w2 [D, I]", D, I}}) {
      const double flop = 2.0 * double(T) * double(m.N) * double(m.K);
      Tensor W = rand_bf16({E, m.N, m.K}), x = rand_bf16({T, m.K}), dy = rand_bf16({T, m.N});
      Tensor y = Tensor::empty({T, m.N}, DType::F32, gpu), dx = Tensor::empty({T, m.K}, DType::F32, gpu);
      Tensor dW = Tensor::zeros({E, m.N, m.K}, DType::F32, gpu);
      double ms[4];
      int i = 0;
      const GroupedGemmImpl impl = GroupedGemmImpl::Loop;
      ms[i++] = time_ms([&] { grouped_gemm_forward(x, W, offsets, y, impl); });
      ms[i++] = time_ms([&] { grouped_gemm_dgrad(dy, W, offsets, dx, impl); });
      ms[i++] = time_ms([&] { grouped_gemm_wgrad(dy, x, offsets, dW, /*accumulate=*/true, impl); });
      dW = Tensor();  // frees the F32 gradient before the FP8 copies
      {
        const Fp8ExpertWeights wq = fp8_quantize_expert_blocks(W, ScaleFormat::F32);  // frozen weights: once
        const Fp8Tensor xq = fp8_quantize_rows(x, ScaleFormat::F32);
        ms[i++] = time_ms([&] { grouped_fp8_gemm_forward(xq, wq, offsets, y); });
      }
      std::printf("  %-14s %6lld %6lld", m.name, (long long)m.N, (long long)m.K);
      for (double t : ms) std::printf(" | %8.3f ms %6.1f TF/s", t, flop / (t * 1e-3) / 1e12);
      std::printf("\n");
    }
  }
#else
  (void)presets;
  (void)tokens_opt;
  (void)iters;
  (void)sigma;
#endif
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dsv4-bench: benchmarks that print numbers"};
  app.require_subcommand(1);
  auto* model = app.add_subcommand("model", "CPU reference model: forward and forward+backward per token");
  std::string preset = "tiny";
  int64_t batch = 1, seq = 256;
  int steps = 5, warmup = 1, threads = 0;
  model->add_option("--preset", preset, "model preset (tiny, small, proxy-2b)")->capture_default_str();
  model->add_option("--batch", batch, "sequences per step")->capture_default_str()->check(CLI::PositiveNumber);
  model->add_option("--seq", seq, "tokens per sequence")->capture_default_str()->check(CLI::PositiveNumber);
  model->add_option("--steps", steps, "timed steps")->capture_default_str()->check(CLI::PositiveNumber);
  model->add_option("--warmup", warmup, "untimed steps first")->capture_default_str()->check(CLI::NonNegativeNumber);
  model->add_option("--threads", threads, "OpenBLAS threads (0: library default)")->capture_default_str();
  const dsv4::bench::KernelBenchCli kernel_benches(app);  // ops, attn (src/train/bench_kernels.cpp)
  const dsv4::bench::StepBenchCli step_bench(app);         // step (src/train/bench_step.cpp)
  auto* gemm = app.add_subcommand("gemm", "GPU: BF16 (cuBLAS) vs block-scaled FP8 GEMM at V4 shapes, TFLOP/s");
  int64_t tokens = 4096;
  int iters = 10;
  std::string shapes;
  bool fallback = false;
  gemm->add_option("--tokens", tokens, "M (tokens)")->capture_default_str()->check(CLI::PositiveNumber);
  gemm->add_option("--iters", iters, "timed calls per GEMM")->capture_default_str()->check(CLI::PositiveNumber);
  gemm->add_option("--shapes", shapes, "N:K,... (default: wq_a 1024:4096, wq_b 32768:1024, wo_b 4096:8192, "
                                       "expert w1 2048:4096)");
  gemm->add_flag("--fallback", fallback, "also time the CUDA-core fallback FP8 kernel (slow)");
  auto* grouped = app.add_subcommand("grouped", "GPU: routed-expert grouped GEMMs (BF16 grouped vs loop, FP8), TFLOP/s");
  std::string presets = "proxy-2b,flash";
  int64_t g_tokens = 0;
  int g_iters = 10;
  double sigma = 0.5;
  grouped->add_option("--presets", presets, "model presets whose expert shapes to time")->capture_default_str();
  grouped->add_option("--tokens", g_tokens, "tokens (0: 4096 for proxy-2b, 8192 for flash / pro)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  grouped->add_option("--iters", g_iters, "timed calls (median)")->capture_default_str()->check(CLI::Range(10, 100000));
  grouped->add_option("--imbalance", sigma, "sigma of the lognormal expert popularity")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    dsv4::set_cpu_threads(threads);
    if (kernel_benches.selected()) return kernel_benches.run();
    if (step_bench.selected()) return step_bench.run();
    if (*model) return run_model_bench(preset, batch, seq, steps, warmup);
    if (*gemm) return run_gemm_bench(tokens, iters, shapes, fallback);
    if (*grouped) return run_grouped_bench(presets, g_tokens, g_iters, sigma);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4-bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
