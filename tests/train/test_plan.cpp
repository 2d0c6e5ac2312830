// dsv4-plan (src/train/plan.h): the estimate of a CPU training step's peak memory against the allocator's measured
// peak for the tiny and small presets (within 10%), weight bytes per dtype against the ParamTable (Flash, Pro),
// layout validation errors, and LoRA adapter counts against apply_lora on a real model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "model/lora.h"
#include "model/param_table.h"
#include "runtime/error.h"
#include "model/flops.h"
#include "train/plan.h"
#include "optim/clip.h"
#include "optim/optimizer.h"
#include "train/trainer.h"

namespace dsv4 {
namespace {

// Random tokens, fixed per call count (the memory of a step does not depend on the values).
class RandomSource : public BatchSource {
 public:
  RandomSource(int64_t batch, int64_t seq, int64_t vocab) : batch_(batch), seq_(seq), vocab_(vocab) {}
  TrainBatch next() override {
    std::mt19937_64 rng(static_cast<uint64_t>(counter_++));
    std::uniform_int_distribution<int64_t> tok(0, vocab_ - 1);
    std::vector<int64_t> ids(static_cast<size_t>(batch_ * seq_));
    for (auto& t : ids) t = tok(rng);
    Tensor t = Tensor::from_vector<int64_t>({batch_ * seq_}, ids);
    return {t, t, SeqLayout(batch_, seq_)};
  }
  std::string state() const override { return std::to_string(counter_); }
  void restore(const std::string& s) override { counter_ = std::stoll(s); }
  std::string describe() const override { return "random"; }

 private:
  int64_t batch_, seq_, vocab_, counter_ = 0;
};

struct Measured {
  int64_t state = 0;      // model + gradient buffers + optimizer state, before the step
  int64_t peak = 0;       // peak of forward_backward (incl. the state)
  int64_t peak_step = 0;  // peak after clipping and the optimizer step too (-1: not run)
};

// What Trainer::train_step does with one micro-batch, without the trainer's files: the model, the optimizer (its
// state allocated at construction), every optimised parameter's gradient buffer, then forward_backward, clipping
// and the optimizer step. Random initialisation (2 s for "small" on a small CPU) only changes values, not sizes.
Measured measure_step(const TrainConfig& cfg, const ModelConfig& mc, bool init, bool optimizer_step) {
  Allocator& host = allocator_for(Device::cpu());
  const int64_t base = host.stats().allocated_bytes;
  Measured m;
  {
    Model model(mc);
    if (init) model.init_random(1);
    Optimizer opt(model, OptimizerConfig::for_model(mc, cfg.optim.type == "adamw" ? OptimizerMode::AdamW
                                                                                  : OptimizerMode::MuonAdamW));
    std::vector<Param*> params = model_params(model);
    const auto assignment = opt.assignment();
    for (size_t i = 0; i < params.size(); ++i)
      if (assignment[i].second != OptGroup::None) params[i]->grad_buffer();
    m.state = host.stats().allocated_bytes - base;
    host.reset_peak();
    RandomSource src(cfg.data.micro_batch, cfg.data.seq_len, mc.vocab_size);
    const TrainBatch b = src.next();
    LossWeights w;
    w.mtp = cfg.loss.mtp_weight;
    w.balance_alpha = cfg.loss.balance_alpha;
    model.forward_backward(b.ids_T, b.labels_T, b.layout, w);
    m.peak = host.stats().peak_bytes - base;
    m.peak_step = -1;
    if (optimizer_step) {
      clip_grad_norm(params, cfg.optim.clip_grad_norm);
      opt.step(1e-3);
      m.peak_step = host.stats().peak_bytes - base;
    }
  }
  return m;
}

TrainConfig step_config(const std::string& preset, int64_t seq, int64_t batch) {
  const std::vector<std::string> o = {fmt::format("data.seq_len={}", seq), fmt::format("data.micro_batch={}", batch)};
  return parse_train_config(fmt::format("model:\n  preset: {}\ndata:\n  train: [synthetic]\n", preset), "plan.yaml", o);
}

class PlanCalibration : public ::testing::TestWithParam<std::tuple<std::string, int64_t, int64_t>> {};

// One CPU training step against plan() on the "cpu" target (F32 everywhere, one rank): the peak of the CPU
// allocator within 10% of the estimate. The optimizer step is run on tiny (it adds nothing to the peak: its
// temporaries are host vectors) and skipped on small to keep the test short.
TEST_P(PlanCalibration, PeakOfOneCpuStepWithinTenPercent) {
  const auto& [preset, seq, batch] = GetParam();
  const TrainConfig cfg = step_config(preset, seq, batch);
  const PlanSetup setup = plan_setup(cfg, "plan.yaml");
  const PlanReport r = plan(setup, HardwareSpec::named("cpu"));
  const bool tiny = preset == "tiny";
  const Measured m = measure_step(cfg, setup.model, tiny, tiny);
  if (m.peak_step >= 0) EXPECT_EQ(m.peak_step, m.peak);
  const int64_t est_state = r.weights + r.grads + r.optimizer;
  const double ratio = static_cast<double>(r.total) / static_cast<double>(m.peak);
  std::printf("[plan] %s seq %lld x %lld: estimated peak %lld B (state %lld + activations %lld), measured peak %lld B "
              "(state %lld + step %lld); estimate / measured = %.4f; activations %.4f\n",
              preset.c_str(), static_cast<long long>(seq), static_cast<long long>(batch),
              static_cast<long long>(r.total), static_cast<long long>(est_state), static_cast<long long>(r.activations),
              static_cast<long long>(m.peak), static_cast<long long>(m.state),
              static_cast<long long>(m.peak - m.state), ratio,
              static_cast<double>(r.activations) / static_cast<double>(m.peak - m.state));
  // The state is exact (every parameter F32, I64 hash tables, F32 gradients of the trainable ones, Muon/AdamW state).
  EXPECT_NEAR(static_cast<double>(est_state), static_cast<double>(m.state), 0.01 * static_cast<double>(m.state));
  EXPECT_NEAR(ratio, 1.0, 0.10);
  // The activation model alone, too.
  EXPECT_NEAR(static_cast<double>(r.activations) / static_cast<double>(m.peak - m.state), 1.0, 0.10);
}

INSTANTIATE_TEST_SUITE_P(Presets, PlanCalibration,
                         ::testing::Values(std::tuple{std::string("tiny"), int64_t{128}, int64_t{4}},
                                           std::tuple{std::string("small"), int64_t{64}, int64_t{1}}),
                         [](const auto& info) { return std::get<0>(info.param); });

// A model whose peak is set by a block's backward working set rather than by the logits: tiny without the MTP block
// and with a 256-token vocabulary.
TEST(Plan, PeakSetByABlockBackwardWithinTenPercent) {
  const TrainConfig cfg = step_config("tiny", 256, 2);
  PlanSetup setup = plan_setup(cfg, "plan.yaml");
  setup.model.n_mtp_layers = 0;
  setup.model.compress_ratios.pop_back();
  setup.model.vocab_size = 256;
  const PlanReport r = plan(setup, HardwareSpec::named("cpu"));
  const Measured m = measure_step(cfg, setup.model, true, true);
  const int64_t max_layer = std::max_element(r.act.layers.begin(), r.act.layers.end(), [](const auto& a, const auto& b) {
                              return a.transient < b.transient;
                            })->transient;
  EXPECT_EQ(r.act.transient, max_layer);  // not the cross-entropy
  std::printf("[plan] tiny without MTP, vocab 256, 2 x 256: estimated peak %lld B (activations %lld), measured %lld B "
              "(step %lld); ratio %.4f\n",
              static_cast<long long>(r.total), static_cast<long long>(r.activations), static_cast<long long>(m.peak),
              static_cast<long long>(m.peak - m.state), static_cast<double>(r.total) / static_cast<double>(m.peak));
  EXPECT_EQ(r.weights + r.grads + r.optimizer, m.state);
  EXPECT_NEAR(static_cast<double>(r.activations) / static_cast<double>(m.peak - m.state), 1.0, 0.10);
  EXPECT_NEAR(static_cast<double>(r.total) / static_cast<double>(m.peak), 1.0, 0.10);
}

// What a forward keeps (the contexts + logits) against the saved part of the activation model.
TEST(Plan, ForwardContextMatchesTheSavedActivations) {
  const ModelConfig cfg = model_preset("tiny");
  Model model(cfg);
  model.init_random(1);
  const int64_t B = 2, S = 96;
  RandomSource src(B, S, cfg.vocab_size);
  const TrainBatch b = src.next();
  Allocator& host = allocator_for(Device::cpu());
  const int64_t before = host.stats().allocated_bytes;
  int64_t kept = 0;
  {
    ModelCtx ctx;
    const ModelOutput out = model.forward(b.ids_T, b.layout, &ctx);
    kept = host.stats().allocated_bytes - before;
  }
  PlanSetup s;
  s.model = cfg;
  s.seq_len = S;
  s.micro_batch = B;
  const ActivationEstimate a = activation_estimate(s, HardwareSpec::named("cpu"));
  const int64_t ids_and_targets = (2 + 1 + cfg.n_mtp_layers) * 8 * B * S;  // not allocated by a bare forward
  const int64_t est = a.saved_layers + a.saved_other - ids_and_targets + a.logits;
  std::printf("[plan] tiny forward context %lld B measured, %lld B estimated\n", static_cast<long long>(kept),
              static_cast<long long>(est));
  EXPECT_NEAR(static_cast<double>(est) / static_cast<double>(kept), 1.0, 0.05);
}

// ---- weights per dtype against the parameter table ------------------------------------------------------------------
struct TableBytes {
  ClassBytes disk{};          // every checkpoint tensor by class
  int64_t param_holder_fp8 = 0;  // FP8 (+ scales) of Param-held weights (attn.wo_a): F32 once loaded frozen
  int64_t param_holder_scales = 0;
};

TableBytes table_bytes(const ParamTable& t) {
  TableBytes b;
  for (const ParamEntry& e : t.entries()) {
    const int64_t w = dtype_nbytes(e.disk_dtype, e.disk_shape.numel());
    const int64_t s = e.scale ? dtype_nbytes(e.scale->dtype, e.scale->shape.numel()) : 0;
    WeightClass k = WeightClass::F32;
    if (e.disk_dtype == DType::F8_E4M3) k = WeightClass::FP8;
    else if (e.disk_dtype == DType::I8) k = WeightClass::FP4;
    else if (e.disk_dtype == DType::BF16) k = WeightClass::BF16;
    else if (e.disk_dtype == DType::I64) k = WeightClass::I64;
    b.disk[static_cast<size_t>(k)] += w;
    b.disk[static_cast<size_t>(WeightClass::Scales)] += s;
    if (e.holder == WeightHolder::Param && e.role == TensorRole::Dense) {
      b.param_holder_fp8 += w;
      b.param_holder_scales += s;
    }
  }
  return b;
}

PlanSetup release_lora_setup(const std::string& preset, int64_t dp, int64_t ep) {
  PlanSetup s;
  s.model = model_preset(preset);
  s.checkpoint = CheckpointFormat::named("instruct");
  s.dp = dp;
  s.ep = ep;
  s.seq_len = 256;
  s.lora.enabled = true;
  return s;
}

TEST(Plan, ReleaseWeightBytesPerDtypeMatchTheParamTable) {
  for (const std::string preset : {"flash", "pro"}) {
    SCOPED_TRACE(preset);
    const PlanReport r = plan(release_lora_setup(preset, 8, 8), HardwareSpec::named("h200"));
    const ParamTable table = ParamTable::build(model_preset(preset), {CheckpointFormat::named("instruct"), false, {}});
    const TableBytes tb = table_bytes(table);
    for (int k = 0; k < kWeightClasses; ++k)
      EXPECT_EQ(r.checkpoint_bytes[static_cast<size_t>(k)], tb.disk[static_cast<size_t>(k)])
          << weight_class_name(static_cast<WeightClass>(k));
    EXPECT_EQ(r.checkpoint_total, table.total_disk_bytes());
    if (preset == "pro") EXPECT_EQ(r.checkpoint_total, int64_t{864704792696});
    // Frozen LoRA base at ep 8, tp 1: every rank holds all dense FP8 weights except attn.wo_a (F32 once loaded)
    // and 1/8 of the FP4 experts.
    EXPECT_EQ(r.weight_bytes[static_cast<size_t>(WeightClass::FP8)],
              tb.disk[static_cast<size_t>(WeightClass::FP8)] - tb.param_holder_fp8);
    EXPECT_EQ(r.weight_bytes[static_cast<size_t>(WeightClass::FP4)], tb.disk[static_cast<size_t>(WeightClass::FP4)] / 8);
  }
}

TEST(Plan, FullTrainingHoldsF32MastersSplitByShardSpec) {
  PlanSetup s;
  s.model = model_preset("flash");
  s.checkpoint = CheckpointFormat::named("instruct");
  s.dp = 1;
  s.tp = 1;
  s.ep = 1;
  const PlanReport one = plan(s, HardwareSpec::named("h100"));
  EXPECT_EQ(one.weight_bytes[static_cast<size_t>(WeightClass::F32)] + one.weight_bytes[static_cast<size_t>(WeightClass::I64)] / 2,
            one.params_total * 4);
  s.dp = 8;
  s.tp = 8;
  s.ep = 64;
  const PlanReport many = plan(s, HardwareSpec::named("h100"));
  // Experts are 1/64 per rank, tp-split tensors 1/8, the rest replicated: far less than 1/8 of the model per rank.
  EXPECT_LT(many.params_rank, one.params_total / 20);
  EXPECT_GT(many.params_rank, one.params_total / 100);
  EXPECT_FALSE(many.fits);  // 8 K tokens without recomputation on 80 GB
  s.zero1 = true;
  const PlanReport z = plan(s, HardwareSpec::named("h100"));
  EXPECT_LT(z.optimizer, many.optimizer);
  EXPECT_GT(z.master_shard, 0);
}

TEST(Plan, Fp8PrecisionRunsTheWeightGemmsAtTwiceTheRate) {
  PlanSetup s;
  s.model = model_preset("proxy-2b");
  s.seq_len = 4096;
  const PlanReport bf = plan(s, HardwareSpec::named("h100"));
  s.precision = "fp8";
  const PlanReport f8 = plan(s, HardwareSpec::named("h100"));
  // The FP8 share: every weight GEMM but the heads, the router gate and the mHC mixing; attention is not one.
  const FlopsPerToken fl = model_flops_per_token(s.model, s.seq_len);
  const double head = 2.0 * double(s.model.dim) * double(s.model.vocab_size) * double(1 + s.model.n_mtp_layers);
  EXPECT_GT(fl.fp8_gemm, 0.5 * (fl.forward - fl.attention - head));
  EXPECT_LT(fl.fp8_gemm, fl.forward - fl.attention - head);
  EXPECT_EQ(bf.fp8_flops_rank, 0.0);
  EXPECT_NEAR(f8.fp8_flops_rank, f8.hw_flops_rank * fl.fp8_gemm / fl.forward, 1e-6 * f8.hw_flops_rank);
  EXPECT_NEAR(f8.compute_seconds, bf.compute_seconds * (1 - 0.5 * fl.fp8_gemm / fl.forward), 1e-9 * bf.compute_seconds);
  EXPECT_EQ(f8.model_flops_rank, bf.model_flops_rank);
  // On the CPU fp8 is an emulation: not modelled as faster.
  EXPECT_EQ(plan(s, HardwareSpec::named("cpu")).fp8_flops_rank, 0.0);
}

// ---- layout validation --------------------------------------------------------------------------------------------
TEST(Plan, LayoutErrorsNameEveryFactor) {
  const ModelConfig flash = model_preset("flash");
  try {
    validate_layout(flash, 3, 3, 7, 10);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.message();
    for (const char* part : {"dp 3 x tp 3 = 9 is not the world size 10", "n_heads 64 is not divisible by tp 3",
                             "o_groups 8 is not divisible by tp 3", "index_n_heads 64 is not divisible by tp 3",
"n_routed_experts 256 is not divisible by ep 7",
                             "world size 10 is not divisible by ep 7"})
      EXPECT_NE(m.find(part), std::string::npos) << "missing '" << part << "' in: " << m;
  }
  EXPECT_NO_THROW(validate_layout(flash, 8, 8, 64, 64));
  EXPECT_NO_THROW(validate_layout(flash, 8, 1, 8, 8));
  // o_groups 8 with tp 16: heads divide, groups do not.
  try {
    validate_layout(flash, 4, 16, 16, 64);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("o_groups 8 is not divisible by tp 16"), std::string::npos) << e.message();
    EXPECT_EQ(e.message().find("n_heads"), std::string::npos) << e.message();
  }
  PlanSetup s;
  s.model = flash;
  s.dp = 2;
  s.tp = 2;
  s.ep = 3;
  EXPECT_THROW(plan(s, HardwareSpec::named("h100")), Error);
}

// ---- LoRA adapters ------------------------------------------------------------------------------------------------------
TEST(Plan, LoraAdapterCountsMatchApplyLora) {
  const ModelConfig cfg = model_preset("tiny");
  const std::vector<std::vector<std::string>> target_sets = {
      {"attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b"},  // the config default
      {"experts.*.w{1,3}"},                                               // fused w13
      {"experts.*.w1", "shared_experts.*", "ffn.gate"},
      {"layers.0.attn.*", "mtp.0.attn.wq_a", "attn.compressor.wkv", "mtp.*.e_proj"},
      {"layers.{1,3}.ffn.experts.{2,5}.w{1,2,3}", "attn.indexer.wq_b"},
  };
  for (const auto& targets : target_sets) {
    Model model(cfg);
    LoraConfig lc;
    lc.rank = 4;
    lc.targets = targets;
    const int64_t n = apply_lora(model, lc);
    int64_t params = 0;
    for (Param* p : lora_params(model)) params += p->value.numel();
    PlanSetup s;
    s.model = cfg;
    s.lora.enabled = true;
    s.lora.rank = 4;
    s.lora.targets = targets;
    const PlanReport r = plan(s, HardwareSpec::named("cpu"));
    EXPECT_EQ(r.lora_adapters, n) << targets.front();
    EXPECT_EQ(r.lora_params_total, params) << targets.front();
    EXPECT_EQ(r.lora_params_rank, params) << targets.front();
    EXPECT_EQ(r.grads, 0);
    EXPECT_EQ(r.lora_grads, params * 4);
  }
  PlanSetup s;
  s.model = cfg;
  s.lora.enabled = true;
  s.lora.targets = {"attn.nothing"};
  EXPECT_THROW(plan(s, HardwareSpec::named("cpu")), Error);
}

TEST(Plan, FlashLoraAdaptersAndTheirShards) {
  const ModelConfig c = model_preset("flash");
  PlanSetup s = release_lora_setup("flash", 8, 8);
  s.lora.rank = 16;
  const PlanReport r = plan(s, HardwareSpec::named("h100"));
  // Default targets: wq_a, wq_b, wkv, wo_b and 8 per-group wo_a adapters in each of the 43 main layers (MTP sites
  // need patterns that name "mtp").
  EXPECT_EQ(r.lora_adapters, 43 * (4 + c.o_groups));
  const int64_t rr = 16, D = c.dim, Q = c.q_lora_rank, HC = c.n_heads * c.head_dim, C = c.head_dim,
                G = c.o_groups, R = c.o_lora_rank;
  const int64_t per_layer = rr * (D + Q) + rr * (Q + HC) + rr * (D + C) + G * rr * (HC / G + R) + rr * (G * R + D);
  EXPECT_EQ(r.lora_params_total, 43 * per_layer);
  EXPECT_EQ(r.lora_params_rank, r.lora_params_total);  // tp 1: every dp rank holds all adapters
  // tp 8 splits wq_b's B, wo_b's A and the wo_a groups.
  PlanSetup t = s;
  t.dp = 1;
  t.tp = 8;
  const PlanReport r8 = plan(t, HardwareSpec::named("h100"));
  const int64_t per_layer8 = rr * (D + Q) + (rr * Q + HC * rr / 8) + rr * (D + C) + (G / 8) * rr * (HC / G + R) +
                             (rr * G * R / 8 + D * rr);
  EXPECT_EQ(r8.lora_params_rank, 43 * per_layer8);
}

}  // namespace
}  // namespace dsv4
