// dsv4-bench step: see bench_step.h.
//
// Timed steps: each step is zero_grad + --grad-accum x Model::forward_backward (token ids and labels on the host; one
// document per row), then clip_grad_norm (max --clip) + Optimizer::step(--lr), with a device synchronisation before the step,
// between the two parts and after; the host clock measures each part. --warmup steps first, then the medians of
// --steps steps (forward+backward, optimizer, whole step; tokens/s and FLOP rates from the whole step's median).
//
// FLOPs (shared/design/BENCHMARKS.md, model/flops.h): per token 3 x forward, forward = 2 x multiply-adds of every
// matmul a token goes through (projections, compressor/indexer, mHC mixing, gate, shared + top-k routed experts,
// head, MTP) + attention 2 x 2 x heads x head_dim x keys attended + the indexer's scoring; embeddings 0, no
// recomputation. TFLOP/s = 3 x forward x tokens / step time; MFU = that / 989 TFLOP/s (dense BF16 peak, H100/H200 SXM,
// also for fp8 runs) and, for fp8, / 1979 TFLOP/s too.
//
// Breakdown (one extra profiled step after the timed ones, never in the timed steps): the model's modules are called
// from outside on the same inputs the real step gives them, with a device synchronisation around every call:
//   - a forward with contexts (untimed) gives every block's input streams; each decoder block (main layers and MTP
//     blocks) is then re-run module by module as Block::forward / Block::backward run them (hc pre, attn_norm,
//     attention, hc post, hc pre, ffn_norm, MoE, hc post; then the backward in reverse), on the real input and a
//     fixed output gradient;
//   - head+loss: the output head (Linear) forward, cross-entropy with its gradient, the head's backward, for the main
//     head and each MTP head (their inputs: the final streams of the forward); the HyperHead collapse counts as mHC
//     and the final RMSNorm with the other norms;
//   - optimizer: gradient clipping + Optimizer::step (median of the timed steps);
//   - other = median forward+backward - (mHC + attention + MoE + head+loss): RMSNorms (also printed alone, as
//     measured), embeddings, MTP input projections, stream expansion, glue ops and launch gaps. The profiled module
//     times include one synchronisation each, so `other` can come out slightly low (even negative for tiny models).
// The block re-runs accumulate parameter gradients; the profiled step zeroes them afterwards and touches no weights.
#include "train/bench_step.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "model/exec_path.h"
#include "model/flops.h"
#include "model/matmul_precision.h"
#include "model/model.h"
#include "optim/clip.h"
#include "optim/grad_sync.h"
#include "optim/optimizer.h"
#include "runtime/backend_dispatch.h"
#include "runtime/cpu_blas.h"
#include "runtime/device.h"
#include "runtime/host_phases.h"
#include "runtime/ops.h"
#include "train/bench_kernels.h"
#if defined(DSV4_WITH_CUDA)
#include "kernels/cuda_runtime_api.h"
#endif

namespace dsv4::bench {

StepBenchCli::StepBenchCli(CLI::App& app) {
  step_ = app.add_subcommand(
      "step",
      "full training step (forward+backward, grad clip, Muon/AdamW) on a device: tokens/s, TFLOP/s, MFU vs 989 "
      "TFLOP/s BF16 (FLOPs/token = 3 x forward, BENCHMARKS.md), peak memory, breakdown mHC/attention/MoE/head+loss/"
      "optimizer/other");
  StepBenchOptions& o = opt_;
  step_->add_option("--preset", o.preset, "model preset (tiny, small, proxy-2b, ...)")->capture_default_str();
  step_->add_option("--batch", o.batch, "sequences per step")->capture_default_str()->check(CLI::PositiveNumber);
  step_->add_option("--seq", o.seq, "tokens per sequence")->capture_default_str()->check(CLI::PositiveNumber);
  step_->add_option("--grad-accum", o.grad_accum,
                    "micro-batches of batch x seq tokens per optimizer step (train.grad_accum); tokens/s and MFU count "
                    "all of them")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  step_->add_option("--precision", o.precision, "weight GEMM precision (train.precision)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16", "fp8"}));
  step_->add_option("--steps", o.steps, "timed steps (medians)")->capture_default_str()->check(CLI::PositiveNumber);
  step_->add_option("--warmup", o.warmup, "untimed steps first")->capture_default_str()->check(CLI::NonNegativeNumber);
  step_->add_option("--device", o.device, "cuda (device 0) or cpu")
      ->capture_default_str()
      ->check(CLI::IsMember({"cuda", "cpu"}));
  step_->add_flag("--ops-path", o.ops_path, "--device cpu: run the modules' tensor-op path (ForceOpsPath)");
  step_->add_flag("--recompute", o.recompute, "per-layer activation recomputation");
  step_->add_flag("--tc-attention", o.tc_attention,
                  "BF16 tensor-core attention forward and backward where supported (C = 512, H % 16 == 0)");
  step_->add_option("--ns-precision", o.ns_precision,
                    "Muon's Newton-Schulz GEMMs (muon.ns_precision); bf16 is what Muon implementations use in practice")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16"}));
  step_->add_flag("!--no-profile", o.profile, "skip the profiled step (no breakdown)");
  step_->add_option("--threads", o.threads, "OpenBLAS threads (0: library default)")->capture_default_str();
  step_->add_option("--lr", o.lr, "learning rate of the optimizer steps")->capture_default_str();
  step_->add_option("--clip", o.clip, "gradient-norm clipping threshold (0: measure only)")->capture_default_str();
}

int StepBenchCli::run() const { return run_step_bench(opt_); }

namespace {

constexpr double kBf16PeakTflops = 989.0;   // H100/H200 SXM dense BF16
constexpr double kFp8PeakTflops = 1979.0;   // H100/H200 SXM dense FP8

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Host clock with a device synchronisation first (a no-op on the CPU).
struct Clock {
  Device device;
  void sync() const {
#if defined(DSV4_WITH_CUDA)
    if (device.is_cuda()) cuda::synchronize(device.index);
#endif
  }
  double now() const {
    sync();
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
};

// Seconds per part of the profiled step.
struct Breakdown {
  double mhc = 0, attn = 0, moe = 0, head = 0, norms = 0;
  double attn_bwd = 0, moe_bwd = 0;  // the backward parts of attn / moe
};

// Times f() into `acc` (synchronised on both sides) and returns its result.
template <typename F>
auto timed(const Clock& clk, double& acc, F&& f) {
  const double t0 = clk.now();
  if constexpr (std::is_void_v<decltype(f())>) {
    f();
    acc += clk.now() - t0;
  } else {
    auto r = f();
    acc += clk.now() - t0;
    return r;
  }
}

// One decoder block's forward and backward, module by module as Block::forward / Block::backward call them.
void profile_block(Block& blk, const Tensor& X, const Tensor& ids_T, const SeqLayout& layout, double balance_alpha,
                   const Clock& clk, Breakdown& b) {
  BlockCtx c;
  const HcPreOut p = timed(clk, b.mhc, [&] { return blk.hc_attn.pre(X, &c.attn_pre); });
  const Tensor a_in = timed(clk, b.norms, [&] { return blk.attn_norm.forward(p.x_TD, &c.attn_norm); });
  const Tensor a = timed(clk, b.attn, [&] { return blk.attn.forward(a_in, layout, &c.attn); });
  const Tensor X1 = timed(clk, b.mhc, [&] { return blk.hc_attn.post(a, X, p.post_TN, p.comb_TNN, &c.attn_post); });
  const HcPreOut q = timed(clk, b.mhc, [&] { return blk.hc_ffn.pre(X1, &c.ffn_pre); });
  const Tensor m_in = timed(clk, b.norms, [&] { return blk.ffn_norm.forward(q.x_TD, &c.ffn_norm); });
  const Tensor m = timed(clk, b.moe, [&] { return blk.ffn.forward(m_in, ids_T, layout, &c.ffn, nullptr); });
  const Tensor Y = timed(clk, b.mhc, [&] { return blk.hc_ffn.post(m, X1, q.post_TN, q.comb_TNN, &c.ffn_post); });
  const Tensor dY = ops::affine(Y, 1e-3, 0.0);  // a fixed output gradient (values do not matter for timing)
  const double alpha = blk.ffn.hash_routed() ? 0.0 : balance_alpha;
  HcPostGrads g2 = timed(clk, b.mhc, [&] { return blk.hc_ffn.post_backward(dY, c.ffn_post); });
  const double moe_before = b.moe;
  const Tensor dm_in = timed(clk, b.moe, [&] { return blk.ffn.backward(g2.dF_TD, c.ffn, alpha); });
  b.moe_bwd += b.moe - moe_before;
  const Tensor dx2 = timed(clk, b.norms, [&] { return blk.ffn_norm.backward(dm_in, c.ffn_norm); });
  Tensor dX1 = g2.dX_TND;
  timed(clk, b.mhc, [&] { blk.hc_ffn.pre_backward_accumulate(dx2, g2.dpost_TN, g2.dcomb_TNN, c.ffn_pre, dX1); });
  HcPostGrads g1 = timed(clk, b.mhc, [&] { return blk.hc_attn.post_backward(dX1, c.attn_post); });
  const double attn_before = b.attn;
  const Tensor da_in = timed(clk, b.attn, [&] { return blk.attn.backward(g1.dF_TD, c.attn); });
  b.attn_bwd += b.attn - attn_before;
  const Tensor dx1 = timed(clk, b.norms, [&] { return blk.attn_norm.backward(da_in, c.attn_norm); });
  Tensor dX0 = g1.dX_TND;
  timed(clk, b.mhc, [&] { blk.hc_attn.pre_backward_accumulate(dx1, g1.dpost_TN, g1.dcomb_TNN, c.attn_pre, dX0); });
}

// HyperHead collapse (mHC), final norm (norms), output head + cross-entropy with gradient + head backward (head), then
// the norm's and the collapse's backward.
void profile_head(HyperHead& hc_head, RMSNorm& norm, Linear& head, const Tensor& X_TND, const Tensor& targets_T,
                  const VocabShard& shard, const Clock& clk, Breakdown& b) {
  HcHeadCtx hctx;
  RMSNormCtx nctx;
  LinearCtx lctx;
  const Tensor hf = timed(clk, b.mhc, [&] { return hc_head.forward(X_TND, &hctx); });
  const Tensor h = timed(clk, b.norms, [&] { return norm.forward(hf, &nctx); });
  const Tensor dh = timed(clk, b.head, [&] {
    const Tensor logits = head.forward(h, &lctx);
    const CrossEntropyResult ce = cross_entropy(logits, targets_T, true, 0, shard);
    return head.backward(ce.dlogits_TV, lctx);
  });
  const Tensor dhf = timed(clk, b.norms, [&] { return norm.backward(dh, nctx); });
  timed(clk, b.mhc, [&] { return hc_head.backward(dhf, hctx); });
}

Breakdown profile_step(Model& model, const Tensor& ids, const SeqLayout& layout, const LossWeights& weights,
                       const Clock& clk) {
  Breakdown b;
  ModelCtx ctx;
  model.forward(ids, layout, &ctx);  // untimed: every block's input and the final streams
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const Tensor& X = ctx.block_inputs.empty() ? ctx.blocks[i].attn_pre.X : ctx.block_inputs[i];
    profile_block(*model.layers[i], X, ids, layout, weights.balance_alpha, clk, b);
  }
  const int64_t B = layout.batch, S = layout.seq;
  profile_head(model.hc_head, model.norm, model.head, ctx.X_final_TND, shift_targets(ids, B, S, 1),
               model.embed.shard(), clk, b);
  for (size_t j = 0; j < model.mtp.size(); ++j) {
    Mtp& m = *model.mtp[j];
    const MtpCtx& mc = ctx.mtp[j];
    profile_block(m.block, mc.block.attn_pre.X, mc.next_ids_T, layout, weights.balance_alpha, clk, b);
    profile_head(m.hc_head, m.norm, model.head, mc.head.X, shift_targets(ids, B, S, static_cast<int64_t>(j) + 2),
                 model.embed.shard(), clk, b);
  }
  clk.sync();
  model.zero_grad();
  return b;
}

// One line of op names by calls, most first ("gemm 812, convert 640, ...").
void print_op_counts(const char* what, const std::map<std::string, int64_t>& by_name) {
  std::vector<std::pair<int64_t, std::string>> sorted;
  for (const auto& [name, n] : by_name) sorted.emplace_back(n, name);
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
  std::printf("    %s by op:", what);
  for (size_t i = 0; i < sorted.size(); ++i)
    std::printf("%s %s %lld", i ? "," : "", sorted[i].second.c_str(), static_cast<long long>(sorted[i].first));
  std::printf("\n");
}

}  // namespace

Tensor random_token_ids(int64_t tokens, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> tok(0, vocab - 1);
  std::vector<int64_t> ids(static_cast<size_t>(tokens));
  for (auto& t : ids) t = tok(rng);
  return Tensor::from_vector<int64_t>({tokens}, ids);
}

int run_step_bench(const StepBenchOptions& opt) {
  const bool cuda = opt.device == "cuda";
  if (cuda && bench_no_device("step")) return 0;
  set_cpu_threads(opt.threads);
  const Device dev = cuda ? Device::cuda(0) : Device::cpu();
  const Clock clk{dev};
  std::unique_ptr<ForceOpsPath> force;
  if (opt.ops_path) force = std::make_unique<ForceOpsPath>();

  const ModelConfig cfg = model_preset(opt.preset);
  ModelOptions mopts;
  mopts.recompute = opt.recompute;
  mopts.attention.tensor_cores = opt.tc_attention;
  const double w0 = clk.now();
  Model model(cfg, mopts);
  model.init_random(1);
  const double w1 = clk.now();
  model.to(dev);
  std::fprintf(stderr, "step bench: model built and initialised in %.1f s, moved to %s in %.1f s\n", w1 - w0,
               cuda ? "cuda:0" : "cpu", clk.now() - w1);
  const MatmulPrecision precision = parse_matmul_precision(opt.precision, "--precision");
  model.set_matmul_precision(precision);
  OptimizerConfig ocfg = OptimizerConfig::for_model(cfg);
  ocfg.muon.precision = opt.ns_precision == "bf16" ? NsPrecision::BF16 : NsPrecision::F32;
  Optimizer optimizer(model, ocfg);
  const std::vector<Param*> params = model_params(model);
  model.allocate_grads(gradient_sync_order(optimizer.optimised_params()));  // as the trainer does

  // Random token ids, one document per row; the labels are the ids (Model::forward_backward shifts them).
  const SeqLayout layout(opt.batch, opt.seq);
  const Tensor ids = random_token_ids(layout.tokens(), cfg.vocab_size, 2);
  const LossWeights weights;

  Allocator& alloc = allocator_for(dev);
  clk.sync();
  const int64_t resident = alloc.stats().allocated_bytes;  // weights + optimizer state
  alloc.reset_peak();
  std::vector<double> t_fb, t_opt, t_step;
  int64_t ops_fb = 0, ops_opt = 0;  // backend op calls of the last step (runtime/backend_dispatch.h)
  std::map<std::string, int64_t> ops_fb_by_name, ops_opt_by_name;
  double loss = 0, gnorm = 0;
  for (int i = 0; i < opt.warmup + opt.steps; ++i) {
    const double t0 = clk.now();
    const int64_t ops0 = op_count();
    const auto names0 = op_counts_by_name();
    model.zero_grad();
    LossResult r;
    for (int64_t m = 0; m < opt.grad_accum; ++m) r = model.forward_backward(ids, ids, layout, weights);
    const double t1 = clk.now();
    const int64_t ops1 = op_count();
    const auto names1 = op_counts_by_name();
    const ClipResult c = clip_grad_norm(params, opt.clip);
    if (c.finite) optimizer.step(opt.lr);
    const double t2 = clk.now();
    ops_fb = ops1 - ops0;
    ops_opt = op_count() - ops1;
    ops_fb_by_name = op_counts_between(names0, names1);
    ops_opt_by_name = op_counts_between(names1, op_counts_by_name());
    loss = r.total;
    gnorm = c.norm;
    std::fprintf(stderr, "step bench: %s step %d: forward+backward %.3f s, clip+optimizer %.3f s, loss %.4f\n",
                 i < opt.warmup ? "warmup" : "timed", i, t1 - t0, t2 - t1, r.total);
    if (i >= opt.warmup) {
      t_fb.push_back(t1 - t0);
      t_opt.push_back(t2 - t1);
      t_step.push_back(t2 - t0);
    }
  }
  const AllocatorStats mem = alloc.stats();
  Breakdown b;
  std::map<std::string, HostPhaseTotal> host_phases;
  if (opt.profile) {
    host_phases_reset();
    host_phases_enable(true);
    b = profile_step(model, ids, layout, weights, clk);
    host_phases_enable(false);
    host_phases = host_phases_snapshot();
  }
  // The optimizer's parts: one more clip + optimizer step (after everything else is measured) with every part
  // synchronised on the device.
  std::map<std::string, HostPhaseTotal> opt_phases;
  if (opt.profile) {
    host_phases_reset();
    host_phases_set_sync([&clk] { clk.sync(); });
    host_phases_enable(true);
    const ClipResult c = clip_grad_norm(params, opt.clip);
    if (c.finite) optimizer.step(opt.lr);
    clk.sync();
    host_phases_enable(false);
    host_phases_set_sync({});
    opt_phases = host_phases_snapshot();
  }

  const double fb = median(t_fb), op = median(t_opt), st = median(t_step);
  const double tokens = static_cast<double>(layout.tokens() * opt.grad_accum);  // per optimizer step
  const FlopsPerToken fl = model_flops_per_token(cfg, opt.seq);
  const double tflops = fl.training() * tokens / st / 1e12;
  std::printf("dsv4-bench step preset=%s batch=%lld seq=%lld grad_accum=%lld precision=%s ns_precision=%s device=%s%s%s steps=%d "
              "warmup=%d (medians)\n",
              opt.preset.c_str(), static_cast<long long>(opt.batch), static_cast<long long>(opt.seq),
              static_cast<long long>(opt.grad_accum), opt.precision.c_str(), opt.ns_precision.c_str(), dev.str().c_str(), opt.ops_path ? " (ops path)" : "",
              opt.recompute ? " recompute" : "", opt.steps, opt.warmup);
  std::printf("  params %.3fM; FLOPs/token = 3 x forward = 3 x %.4g (active params/token %.4gM, mean visible keys "
              "%.1f, attention part of forward %.1f%%, fp8-eligible GEMMs %.1f%%)\n",
              model.num_params() / 1e6, fl.forward, fl.active_params / 1e6, fl.mean_visible_keys,
              100 * fl.attention / fl.forward, 100 * fl.fp8_gemm / fl.forward);
  std::printf("  step %9.3f ms = forward+backward %9.3f ms + clip+optimizer %8.3f ms; last loss %.4f, grad norm %.4g\n",
              st * 1e3, fb * 1e3, op * 1e3, loss, gnorm);
  std::printf("  %.1f tokens/s, %.4g TFLOP/s achieved, MFU %.3g%% of %.0f TFLOP/s (BF16 dense peak)", tokens / st,
              tflops, 100 * tflops / kBf16PeakTflops, kBf16PeakTflops);
  if (precision == MatmulPrecision::FP8) std::printf(", %.3g%% of %.0f TFLOP/s (FP8 peak)", 100 * tflops / kFp8PeakTflops, kFp8PeakTflops);
  std::printf("\n");
  // With gradient accumulation the optimizer runs once per several micro-batches; this is the limit of many.
  const double tflops_fb = fl.training() * tokens / fb / 1e12;
  std::printf("  forward+backward alone: %.1f tokens/s, %.4g TFLOP/s, MFU %.3g%% (the optimizer amortised over many "
              "accumulated micro-batches)\n",
              tokens / fb, tflops_fb, 100 * tflops_fb / kBf16PeakTflops);
  std::printf("  backend op calls per step (runtime ops dispatched to the device: about one kernel launch or cuBLAS call "
              "each; the attention kernels not counted): forward+backward %lld, clip+optimizer %lld\n",
              static_cast<long long>(ops_fb), static_cast<long long>(ops_opt));
  print_op_counts("forward+backward", ops_fb_by_name);
  print_op_counts("clip+optimizer", ops_opt_by_name);
  std::printf("  memory (%s allocator): peak %.3f GiB during the timed steps, %.3f GiB resident before them (weights + "
              "optimizer state)\n",
              dev.str().c_str(), mem.peak_bytes / 1073741824.0, resident / 1073741824.0);
  if (opt.profile) {
    // The profiled step is one micro-batch: its module times count grad_accum times in a step.
    const double n = static_cast<double>(opt.grad_accum);
    const double other = fb - n * (b.mhc + b.attn + b.moe + b.head);
    const double total = st;
    std::printf("  breakdown (profiled step, synchronised per module%s; other = forward+backward - the modules):\n",
                opt.grad_accum > 1 ? ", module times x grad_accum" : "");
    const auto row = [&](const char* name, double s, const char* note) {
      if (std::string_view(name) != "optimizer" && std::string_view(name) != "other") s *= n;
      std::printf("    %-10s %9.3f ms %6.1f%%  %s\n", name, s * 1e3, 100 * s / total, note);
    };
    row("mHC", b.mhc, "hc pre/post fwd+bwd of every block, HyperHead collapses");
    row("attention", b.attn, "Attention fwd+bwd (projections, compressor, indexer, sparse core)");
    row("  fwd", b.attn - b.attn_bwd, "");
    row("  bwd", b.attn_bwd, "");
    row("MoE", b.moe, "gate, routing, shared + routed experts fwd+bwd");
    row("  fwd", b.moe - b.moe_bwd, "");
    row("  bwd", b.moe_bwd, "");
    row("head+loss", b.head, "output heads (main + MTP) fwd, cross-entropy, head bwd");
    row("optimizer", op, "grad-norm clip + Muon/AdamW step (timed steps' median)");
    row("other", other, "norms, embeddings, MTP projections, glue, gaps");
    std::printf("    (RMSNorms as profiled: %.3f ms)\n", n * b.norms * 1e3);
    if (!host_phases.empty()) std::printf("  host phases within the profiled step (GPU possibly idle meanwhile):\n");
    for (const auto& [name, t] : host_phases)
      std::printf("    %9.3f ms in %5lld calls  %s\n", t.seconds * 1e3, static_cast<long long>(t.calls), name.c_str());
  }
  if (!opt_phases.empty()) {
    double ns_flops = 0;  // the Newton-Schulz GEMMs of every Muon matrix (block) of this rank
    for (const Param* p : params)
      if (p->trainable && p->value.defined() && group_of(*p, ocfg.groups) == OptGroup::Muon) {
        const int64_t blocks = muon_row_blocks(p->name, ocfg.groups);
        ns_flops += static_cast<double>(blocks) *
                    newton_schulz_flops(p->value.size(0) / blocks, p->value.size(1), ocfg.muon.ns_schedule);
      }
    double ns_seconds = 0;
    std::printf("  optimizer parts (one more clip + optimizer step, the device synchronised around each part):\n");
    for (const auto& [name, t] : opt_phases) {
      std::printf("    %9.3f ms in %5lld calls  %s\n", t.seconds * 1e3, static_cast<long long>(t.calls), name.c_str());
      if (name.rfind("optimizer: newton-schulz", 0) == 0) ns_seconds += t.seconds;
    }
    std::printf("    newton-schulz GEMMs %.4g TFLOP (from the shapes: 4 r^2 c + 2 r^3 per iteration, r <= c) in %.3f ms: "
                "%.4g TFLOP/s\n",
                ns_flops / 1e12, ns_seconds * 1e3, ns_seconds > 0 ? ns_flops / ns_seconds / 1e12 : 0.0);
  }
  return 0;
}

}  // namespace dsv4::bench
