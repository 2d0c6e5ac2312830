// dsv4-bench ops / attn (src/train/bench_kernels.cpp): GPU kernel benchmarks that print numbers (never pass or fail).
//   dsv4-bench ops  [--preset P] [--tokens T] [--iters N] [--tp TP] [--scale e8m0|f32]
//     achieved bandwidth of the memory-bound CUDA ops of runtime/model_ops.h and runtime/fp8.h at the preset's shapes,
//     as GB/s and as a fraction of a measured device-to-device copy.
//   dsv4-bench attn [--preset P] [--tokens T] [--iters N]
//     sparse attention forward/backward (SWA, HCA, CSA) and the fused mHC pre/post forward/backward
//     (kernels/attention_kernels.h): time, TFLOP/s (attention) and GB/s (mHC).
// Without a CUDA device both say so and return 0. --cpu (CUDA builds) checks the harness without a GPU: ops runs the
// same frontend calls on the CPU twins (use a small --tokens; times are host wall times, not GPU numbers), attn
// builds the candidate lists and prints the FLOP formula's inputs without timing.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

namespace dsv4::bench {

struct KernelBenchOptions {
  std::string preset = "proxy-2b";
  int64_t tokens = 4096;
  int iters = 25;
  int64_t tp = 1;  // vocabulary shards: CE runs over a vocab / tp slice
  std::string scale = "e8m0";
  bool cpu = false;  // harness check: the same frontend calls on the CPU twins (ops), host-side setup only (attn)
};

// Adds the `ops` and `attn` subcommands to `app`; run() runs whichever was selected.
class KernelBenchCli {
 public:
  explicit KernelBenchCli(CLI::App& app);
  bool selected() const { return *ops_ || *attn_; }
  int run() const;

 private:
  CLI::App* ops_ = nullptr;
  CLI::App* attn_ = nullptr;
  KernelBenchOptions ops_opt_, attn_opt_;
};

// Prints "dsv4-bench WHAT: no CUDA device visible ..." and returns true when no GPU is visible (the subcommand then
// exits 0 without timing anything).
bool bench_no_device(const char* what);
int run_ops_bench(const KernelBenchOptions& opt);
int run_attn_bench(const KernelBenchOptions& opt);

}  // namespace dsv4::bench
