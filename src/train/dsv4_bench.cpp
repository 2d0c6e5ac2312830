// dsv4-bench: step benchmarks that print numbers (they never pass or fail).
//   dsv4-bench model --preset tiny|small|proxy-2b --batch B --seq S --steps N [--threads T]
// Runs forward and forward+backward of the CPU reference model and prints time per token, tokens/s and the
// achieved FLOP rate (FLOP convention of shared/design/BENCHMARKS.md, model/flops.h).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "model/flops.h"
#include "model/model.h"
#include "runtime/build_info.h"
#include "runtime/cpu_blas.h"

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
  std::mt19937 rng(2);
  std::uniform_int_distribution<int64_t> tok(0, cfg.vocab_size - 1);
  std::vector<int64_t> ids_v(static_cast<size_t>(layout.tokens()));
  for (auto& t : ids_v) t = tok(rng);
  const Tensor ids = Tensor::from_vector<int64_t>({layout.tokens()}, ids_v);
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
  CLI11_PARSE(app, argc, argv);
  try {
    dsv4::set_cpu_threads(threads);
    if (*model) return run_model_bench(preset, batch, seq, steps, warmup);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4-bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
