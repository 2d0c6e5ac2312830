// dsv4-bench step (src/train/bench_step.cpp): the full training step (issues 9/10), numbers only.
//   dsv4-bench step [--preset proxy-2b] [--batch 1] [--seq 4096] [--precision bf16|fp8|fp32] [--steps 10]
//                   [--warmup 2] [--device cuda|cpu] [--ops-path] [--recompute] [--ns-precision bf16|fp32]
//                   [--threads T] [--grad-accum N]
// Builds Model(model_preset(preset)), init_random, Model::to(device), set_matmul_precision, an Optimizer (Muon + AdamW,
// state on the device; Muon's Newton-Schulz in --ns-precision, BF16 by default as Muon implementations run it) and
// times, per step: zero_grad, forward_backward on random token ids (one document per row; --grad-accum N: N micro-batches
// of batch x seq tokens, as train.grad_accum), then gradient-norm clipping (max 1.0) and the optimizer step, with a device synchronisation at each boundary. Prints
// the medians: tokens/s, achieved TFLOP/s and MFU against the dense BF16 peak of an H100/H200 SXM (989 TFLOP/s; fp8
// runs also against the FP8 peak, 1979), with the FLOP formula of shared/design/BENCHMARKS.md (model/flops.h:
// 3 x forward FLOPs per token, its inputs printed), the peak allocator memory of the device, and a breakdown of the
// step into mHC, attention, MoE, head+loss, optimizer and other, measured in one extra profiled step (see
// bench_step.cpp). --device cpu runs the same on the CPU (e.g. --preset tiny --seq 64 for a quick sanity run);
// --ops-path runs the CPU modules' tensor-op path (ForceOpsPath). Without a CUDA device, --device cuda says so in one
// line and exits 0 (like the other GPU subcommands).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

#include "runtime/tensor.h"

namespace dsv4::bench {

struct StepBenchOptions {
  std::string preset = "proxy-2b";
  int64_t batch = 1;
  int64_t seq = 4096;
  int64_t grad_accum = 1;  // micro-batches per optimizer step (train.grad_accum)
  std::string precision = "bf16";
  int steps = 10;
  int warmup = 2;
  std::string device = "cuda";
  bool ops_path = false;   // --device cpu: run the modules' tensor-op path (ForceOpsPath)
  bool recompute = false;  // per-layer activation recomputation (ModelOptions::recompute)
  bool tc_attention = false;  // the BF16 tensor-core attention forward and backward (AttentionOptions::tensor_cores)
  std::string ns_precision = "bf16";  // Muon's Newton-Schulz (MuonConfig::precision)
  bool profile = true;     // the extra profiled step for the breakdown
  int threads = 0;         // OpenBLAS threads (0: library default)
  double lr = 1e-4;
  double clip = 1.0;
};

// Adds the `step` subcommand to `app`.
class StepBenchCli {
 public:
  explicit StepBenchCli(CLI::App& app);
  bool selected() const { return static_cast<bool>(*step_); }
  int run() const;

 private:
  CLI::App* step_ = nullptr;
  StepBenchOptions opt_;
};

int run_step_bench(const StepBenchOptions& opt);

// `tokens` uniformly random token ids in [0, vocab) from std::mt19937(seed): the inputs (and labels) of the model
// benchmarks.
Tensor random_token_ids(int64_t tokens, int64_t vocab, uint32_t seed);

}  // namespace dsv4::bench
