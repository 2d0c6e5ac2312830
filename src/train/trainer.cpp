#include "train/trainer.h"

#include <csignal>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/flops.h"
#include "model/checkpoint_io.h"
#include "model/lora.h"
#include "model/peft.h"
#include "optim/clip.h"
#include "optim/moe_bias.h"
#include "runtime/cpu_blas.h"
#include "runtime/crc32c.h"
#include "runtime/safetensors.h"

namespace dsv4 {

namespace fs = std::filesystem;

namespace {

std::atomic<bool> g_stop{false};
std::atomic<bool> g_checkpoint{false};

extern "C" void on_signal(int sig) {
  if (sig == SIGTERM) g_stop = true;
  if (sig == SIGUSR1) g_checkpoint = true;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  DSV4_CHECK(in.good(), "cannot read '{}'", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, (t / 60) % 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

}  // namespace

ModelConfig resolve_model_config(const TrainConfig& cfg) {
  if (!cfg.model.preset.empty()) return model_preset(cfg.model.preset);
  if (!cfg.model.config.empty()) return load_model_config(cfg.model.config);
  DSV4_CHECK(fs::exists(fs::path(cfg.model.checkpoint) / "config.json"),
             "model.checkpoint '{}' has no config.json; set model.preset or model.config", cfg.model.checkpoint);
  return load_checkpoint_config(cfg.model.checkpoint);
}

void Trainer::request_stop() { g_stop = true; }
void Trainer::request_checkpoint() { g_checkpoint = true; }
void Trainer::install_signal_handlers() {
  std::signal(SIGTERM, on_signal);
  std::signal(SIGUSR1, on_signal);
}

Trainer::Trainer(const TrainConfig& cfg, std::unique_ptr<BatchSource> train, std::unique_ptr<BatchSource> val,
                 const Communicator* dp)
    : cfg_(cfg), dp_(dp), model_cfg_(resolve_model_config(cfg)), train_(std::move(train)), val_(std::move(val)) {
  DSV4_CHECK(train_ != nullptr, "Trainer needs a training batch source");
  g_stop = false;
  g_checkpoint = false;
  set_cpu_threads(static_cast<int>(cfg_.train.threads));
  ModelOptions opts;
  opts.attention.simulate_release_quant = cfg_.model.simulate_release_quant;
  opts.recompute = cfg_.train.recompute;
  DSV4_CHECK(!(cfg_.train.recompute && cfg_.lora.enabled && cfg_.lora.dropout > 0),
             "train.recompute with lora.dropout > 0 is not supported (the recomputed forward would draw other dropout "
             "masks); set one of them to 0");
  const bool lora = cfg_.lora.enabled;
  if (!cfg_.model.checkpoint.empty()) {
    // Release or transformers layout. Full training dequantises FP8/FP4 into trainable F32; LoRA keeps the base
    // frozen in its on-disk precision (no gradient, no optimizer state, no F32/BF16 copy of those weights).
    LoadReport r;
    LoadOptions lo;
    lo.mode = lora ? LoadMode::FrozenQuantized : LoadMode::TrainableF32;
    lo.frozen_wo_a = lora;  // LoRA: wo_a stays in FP8 too
    model_ = load_model(cfg_.model.checkpoint, lo, opts, &r);
    print(fmt::format("loaded {} ({} layout, {} tensors in {} shards{})", r.path, checkpoint_layout_name(r.layout),
                      r.tensors, r.shards,
                      lora ? fmt::format("; {} weights frozen in {:.1f} MiB", r.frozen_weights,
                                         static_cast<double>(r.frozen_bytes) / (1 << 20))
                           : std::string()));
  } else {
    model_ = std::make_unique<Model>(model_cfg_, opts);
    model_->init_random(static_cast<uint64_t>(cfg_.train.seed));
  }
  if (lora) {
    LoraConfig lc;
    lc.rank = cfg_.lora.rank;
    lc.alpha = cfg_.lora.alpha;
    lc.rslora = cfg_.lora.rslora;
    lc.dropout = cfg_.lora.dropout;
    lc.targets = cfg_.lora.targets;
    lc.seed = static_cast<uint64_t>(cfg_.train.seed);
    lora_config_ = lc;
    const int64_t n = apply_lora(*model_, lc);
    set_lora_train_mode(*model_, true);
    int64_t trainable = 0;
    for (Param* p : lora_params(*model_)) trainable += p->value.numel();
    print(fmt::format("LoRA r={} alpha={}: {} adapters, {:.3f}M trainable parameters; the base is frozen", lc.rank,
                      lc.alpha, n, static_cast<double>(trainable) / 1e6));
  }

  OptimizerConfig oc = OptimizerConfig::for_model(
      model_cfg_, cfg_.optim.type == "adamw" ? OptimizerMode::AdamW : OptimizerMode::MuonAdamW);
  oc.muon.momentum = cfg_.optim.muon_momentum;
  oc.muon.update_scale = cfg_.optim.muon_update_scale;
  oc.muon.weight_decay = cfg_.optim.weight_decay;
  oc.adamw.beta1 = cfg_.optim.beta1;
  oc.adamw.beta2 = cfg_.optim.beta2;
  oc.adamw.eps = cfg_.optim.eps;
  oc.adamw.weight_decay = cfg_.optim.weight_decay;
  oc.validate();
  optimizer_ = std::make_unique<Optimizer>(*model_, oc);
  params_ = model_params(*model_);
  // Every optimised parameter gets its gradient buffer now, so an expert that receives no token in a step is
  // still updated (zero gradient: momentum and weight decay move on) in every run, resumed or not.
  const auto assignment = optimizer_->assignment();  // same order as params_
  for (size_t i = 0; i < params_.size() && i < assignment.size(); ++i)
    if (assignment[i].second != OptGroup::None) params_[i]->grad_buffer();

  lr_.decay = lr_decay_from_name(cfg_.optim.schedule);
  lr_.peak_lr = cfg_.optim.lr;
  lr_.min_lr = cfg_.optim.min_lr;
  lr_.warmup_steps = cfg_.optim.warmup_steps;
  lr_.total_steps = cfg_.train.steps;
  lr_.decay_start = std::max<int64_t>(
      lr_.warmup_steps, static_cast<int64_t>(std::llround(cfg_.optim.decay_start * static_cast<double>(cfg_.train.steps))));
  lr_.validate();
  loss_schedule_.mtp_weight = cfg_.loss.mtp_weight;
  loss_schedule_.mtp_weight_after = cfg_.loss.mtp_weight_after_decay;
  loss_schedule_.balance_alpha = cfg_.loss.balance_alpha;
  loss_schedule_.validate();

  rng_.seed(static_cast<uint64_t>(cfg_.train.seed));
  flops_per_token_ = model_flops_per_token(model_cfg_, cfg_.data.seq_len).training();
  // Rank 0 creates the directory (and removes stale temporaries) before the others look at it.
  const std::string ckpt_root = (fs::path(cfg_.train.out_dir) / "checkpoints").string();
  if (is_root()) checkpoints_ = std::make_unique<CheckpointDir>(ckpt_root);
  if (dp_) dp_->barrier();
  if (!is_root()) checkpoints_ = std::make_unique<CheckpointDir>(ckpt_root);

  std::optional<std::string> resume;
  if (cfg_.train.resume == "auto") resume = checkpoints_->latest();
  else if (cfg_.train.resume != "never") resume = cfg_.train.resume;
  if (resume) resume_from(*resume);
  if (is_root())
    metrics_ = std::make_unique<MetricsLogger>(cfg_.train.out_dir, cfg_.logging.metrics_jsonl, cfg_.logging.tensorboard);
}

void Trainer::sum_across_ranks(std::vector<double>& v) const {
  if (!dp_ || dp_->size() == 1 || v.empty()) return;
  // The communicator reduces F32 (not F64): each double travels as a float plus its float remainder (~48 bits).
  Tensor hi = Tensor::empty({static_cast<int64_t>(v.size())}, DType::F32);
  Tensor lo = Tensor::empty({static_cast<int64_t>(v.size())}, DType::F32);
  for (size_t i = 0; i < v.size(); ++i) {
    const float h = static_cast<float>(v[i]);
    hi.data<float>()[i] = h;
    lo.data<float>()[i] = static_cast<float>(v[i] - static_cast<double>(h));
  }
  dp_->all_reduce(hi, CommReduce::Sum);
  dp_->all_reduce(lo, CommReduce::Sum);
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = static_cast<double>(hi.data<float>()[i]) + static_cast<double>(lo.data<float>()[i]);
}

void Trainer::check_replicas_in_sync() const {
  if (!dp_ || dp_->size() == 1) return;
  uint32_t crc = 0;
  model_->visit([&](Param& p) { crc = crc32c(p.value.raw_data(), static_cast<size_t>(p.value.nbytes()), crc); });
  Tensor v = Tensor::from_vector<int64_t>({2}, {static_cast<int64_t>(crc), -static_cast<int64_t>(crc)});
  dp_->all_reduce(v, CommReduce::Max);
  DSV4_CHECK(v.data<int64_t>()[0] == -v.data<int64_t>()[1],
             "data-parallel replicas diverged at step {}: parameter checksums differ across ranks", step_);
}

void Trainer::print(const std::string& line) {
  if (!is_root()) return;
  log_ += line + "\n";
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

StepRecord Trainer::train_step() {
  StepRecord rec;
  rec.lr = lr_.lr_at(step_);
  LossWeights weights = loss_weights_at(loss_schedule_, lr_, step_);
  model_->zero_grad();
  if (cfg_.lora.enabled) set_lora_dropout_step(*model_, static_cast<uint64_t>(step_));  // resumable dropout masks
  // All micro-batches first: the cross-entropies are divided by the global target counts (every micro-batch of
  // every rank), so summing the gradients gives exactly the gradient of the global mean loss.
  const int64_t accum = cfg_.data.grad_accum;
  std::vector<TrainBatch> batches;
  std::vector<double> counts = {0, 0};
  for (int64_t micro = 0; micro < accum; ++micro) {
    batches.push_back(train_->next());
    const TargetCounts c = count_targets(batches.back().labels_T, batches.back().layout,
                                         static_cast<int64_t>(model_->mtp.size()));
    counts[0] += static_cast<double>(c.lm);
    counts[1] += c.mtp.empty() ? 0.0 : static_cast<double>(c.mtp[0]);
  }
  sum_across_ranks(counts);
  weights.lm_normalizer = std::max(counts[0], 1.0);
  weights.mtp_normalizer = std::max(counts[1], 1.0);
  weights.balance_alpha /= static_cast<double>(accum * world());  // the balance term is a mean over sequences
  std::vector<std::vector<int64_t>> loads;
  for (const TrainBatch& b : batches) {
    const LossResult r = model_->forward_backward(b.ids_T, b.labels_T, b.layout, weights);
    rec.loss += r.total;
    rec.lm += r.lm;
    for (double m : r.mtp) rec.mtp += m;
    rec.balance += r.balance;
    rec.tokens += b.layout.tokens();
    accumulate_moe_loads(loads, r.output.moe_stats);
  }
  if (world() > 1) {
    for (Param* p : params_)
      if (p->grad.defined()) dp_->all_reduce(p->grad, CommReduce::Sum);
    std::vector<double> stats = {rec.loss, rec.lm, rec.mtp, rec.balance, static_cast<double>(rec.tokens)};
    sum_across_ranks(stats);
    rec.loss = stats[0];
    rec.lm = stats[1];
    rec.mtp = stats[2];
    rec.balance = stats[3];
    rec.tokens = static_cast<int64_t>(std::llround(stats[4]));
    for (auto& layer : loads) {
      Tensor t = Tensor::from_vector<int64_t>({static_cast<int64_t>(layer.size())}, layer);
      dp_->all_reduce(t, CommReduce::Sum);
      std::copy(t.data<int64_t>(), t.data<int64_t>() + t.numel(), layer.begin());
    }
  }
  const ClipResult clip = clip_grad_norm(params_, cfg_.optim.clip_grad_norm);
  rec.grad_norm = clip.norm;
  if (!clip.finite || !std::isfinite(rec.loss)) {
    rec.skipped = true;
    ++skipped_steps_;
    ++bad_steps_in_row_;
    model_->zero_grad();
    print(fmt::format("step {}: non-finite {} ({}), update skipped ({} in a row)", step_ + 1,
                      clip.finite ? "loss" : "gradient", clip.finite ? fmt::format("{}", rec.loss) : clip.bad_param,
                      bad_steps_in_row_));
    DSV4_CHECK(bad_steps_in_row_ < cfg_.train.max_bad_steps,
               "{} consecutive steps with NaN/Inf loss or gradients (train.max_bad_steps = {}); stopping. The last "
               "good checkpoint is {}",
               bad_steps_in_row_, cfg_.train.max_bad_steps, checkpoints_->latest().value_or("(none)"));
  } else {
    bad_steps_in_row_ = 0;
    optimizer_->step(rec.lr);
    const bool bias_update = cfg_.loss.bias_update_speed > 0 && (!cfg_.lora.enabled || cfg_.lora.moe_bias_update);
    if (bias_update) update_moe_biases(*model_, loads, cfg_.loss.bias_update_speed);
  }
  ++step_;
  tokens_seen_ += rec.tokens;
  rec.step = step_;
  return rec;
}

double Trainer::evaluate() {
  if (!val_) return std::nan("");
  if (cfg_.lora.enabled) set_lora_train_mode(*model_, false);  // no adapter dropout while evaluating
  const std::string start = val_->state();
  double loss_sum = 0;
  int64_t tokens = 0;
  for (int64_t i = 0; i < cfg_.train.eval_batches; ++i) {
    const TrainBatch b = val_->next();
    const LossResult r = model_->evaluate(b.ids_T, b.labels_T, b.layout, LossWeights{0.0, 0.0});
    loss_sum += r.lm * static_cast<double>(r.tokens);
    tokens += r.tokens;
  }
  val_->restore(start);  // every evaluation sees the same batches
  if (cfg_.lora.enabled) set_lora_train_mode(*model_, true);
  std::vector<double> sums = {loss_sum, static_cast<double>(tokens)};
  sum_across_ranks(sums);
  return sums[1] > 0 ? sums[0] / sums[1] : std::nan("");
}

void Trainer::save_checkpoint() {
  check_replicas_in_sync();
  if (!is_root()) {  // replicas are identical: rank 0 writes, the others wait for the commit
    dp_->barrier();
    return;
  }
  const std::string path = checkpoints_->save(
      step_,
      [&](const std::string& dir) {
        // LoRA runs keep the frozen base out of their checkpoints (it is model.checkpoint): the adapters, and the
        // MoE routing biases, which the aux-loss-free rule may move, are the whole state.
        std::vector<std::pair<std::string, Tensor>> params;
        model_->visit([&](Param& p) {
          if (!cfg_.lora.enabled || p.trainable || p.name.find("gate.bias") != std::string::npos)
            params.emplace_back(p.name, p.value);
        });
        write_safetensors((fs::path(dir) / "model.safetensors").string(), params,
                          {{"format", "dsv4"}, {"contents", cfg_.lora.enabled ? "lora" : "full"}});
        if (cfg_.lora.enabled) {  // the same adapters in PEFT's format, loadable by transformers + peft
          const fs::path peft = fs::path(dir) / "adapter";
          fs::create_directories(peft);
          save_peft_adapter(*model_, peft.string(), PeftSaveOptions{lora_config_, cfg_.model.checkpoint});
        }
        std::vector<std::pair<std::string, Tensor>> opt;
        for (auto& [k, v] : optimizer_->state_dict()) opt.emplace_back(k, v);
        write_safetensors((fs::path(dir) / "optimizer.safetensors").string(), opt);
        std::ostringstream rng;
        rng << rng_;
        const nlohmann::json state = {{"step", step_},
                                      {"skipped_steps", skipped_steps_},
                                      {"bad_steps_in_row", bad_steps_in_row_},
                                      {"tokens_seen", tokens_seen_},
                                      {"rng", rng.str()},
                                      {"data", train_->state()}};
        write_file_atomic((fs::path(dir) / "trainer.json").string(), state.dump(2) + "\n");
        write_file_atomic((fs::path(dir) / "config.yaml").string(), cfg_.to_yaml());
        write_file_atomic((fs::path(dir) / "config.json").string(), model_cfg_.to_json() + "\n");
      },
      cfg_.checkpoint.keep);
  print(fmt::format("checkpoint step {} -> {}", step_, path));
  if (dp_) dp_->barrier();
}

void Trainer::resume_from(const std::string& checkpoint) {
  CheckpointDir::verify(checkpoint);
  const SafetensorsFile model_file = SafetensorsFile::open((fs::path(checkpoint) / "model.safetensors").string());
  std::map<std::string, Tensor> state;
  for (const std::string& n : model_file.names()) state[n] = model_file.load(n);
  if (cfg_.lora.enabled) {  // adapters (+ MoE biases) over the base loaded from model.checkpoint
    std::vector<std::string> missing;
    model_->visit([&](Param& p) {
      auto it = state.find(p.name);
      if (it != state.end()) ops::copy(it->second, p.value);
      else if (p.trainable) missing.push_back(p.name);
    });
    DSV4_CHECK(missing.empty(), "{}: LoRA checkpoint lacks {} adapter tensors (first: {}); was it written with the same "
               "lora.targets and lora.rank?", model_file.path(), missing.size(), missing.empty() ? "" : missing[0]);
  } else {
    model_->load_state(state, model_file.path());
  }
  const SafetensorsFile opt_file = SafetensorsFile::open((fs::path(checkpoint) / "optimizer.safetensors").string());
  std::map<std::string, Tensor> opt;
  for (const std::string& n : opt_file.names()) opt[n] = opt_file.load(n);
  optimizer_->load_state_dict(opt, opt_file.path());
  const std::string trainer_path = (fs::path(checkpoint) / "trainer.json").string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text(trainer_path));
    step_ = j.at("step").get<int64_t>();
    skipped_steps_ = j.at("skipped_steps").get<int64_t>();
    bad_steps_in_row_ = j.at("bad_steps_in_row").get<int64_t>();
    tokens_seen_ = j.at("tokens_seen").get<int64_t>();
    std::istringstream rng(j.at("rng").get<std::string>());
    rng >> rng_;
    train_->restore(j.at("data").get<std::string>());
  } catch (const nlohmann::json::exception& e) {
    DSV4_FAIL("'{}': {}", trainer_path, e.what());
  }
  print(fmt::format("resumed from {} at step {}", checkpoint, step_));
}

int64_t Trainer::run() {
  const int64_t start_step = step_;
  print(fmt::format("dsv4-train: {} ({:.3f}M parameters), {} steps from step {}, data {}", model_cfg_.name,
                    static_cast<double>(model_->num_params()) / 1e6, cfg_.train.steps, step_, train_->describe()));
  const auto t_start = std::chrono::steady_clock::now();
  auto t_last = t_start;
  int64_t tokens_since = 0, last_saved = -1;
  Allocator& host = allocator_for(Device::cpu());
  while (step_ < cfg_.train.steps) {
    const StepRecord rec = train_step();
    tokens_since += rec.tokens;
    std::map<std::string, double> m = {{"loss", rec.loss}, {"loss/lm", rec.lm},   {"loss/mtp", rec.mtp},
                                       {"loss/balance", rec.balance}, {"grad_norm", rec.grad_norm},
                                       {"lr", rec.lr}, {"skipped", rec.skipped ? 1.0 : 0.0}};
    if (step_ % cfg_.train.log_interval == 0 || step_ == cfg_.train.steps) {
      const auto now = std::chrono::steady_clock::now();
      const double dt = std::chrono::duration<double>(now - t_last).count();
      const double tok_s = dt > 0 ? static_cast<double>(tokens_since) / dt : 0;
      const double elapsed = std::chrono::duration<double>(now - t_start).count();
      const double eta = elapsed / static_cast<double>(step_ - start_step) * static_cast<double>(cfg_.train.steps - step_);
      m["tokens_per_s"] = tok_s;
      m["gflops"] = tok_s * flops_per_token_ / 1e9;
      print(fmt::format("step {}/{} | loss {:.4f} (lm {:.4f} mtp {:.4f} bal {:.2e}) | gnorm {:.3f} | lr {:.3e} | "
                        "{:.0f} tok/s | {:.2f} GFLOP/s (3 x {:.2f} MFLOP/token) | mem {:.0f} MiB | eta {}",
                        step_, cfg_.train.steps, rec.loss, rec.lm, rec.mtp, rec.balance, rec.grad_norm, rec.lr, tok_s,
                        tok_s * flops_per_token_ / 1e9, flops_per_token_ / 3e6,
                        static_cast<double>(host.stats().peak_bytes) / (1 << 20), format_duration(eta)));
      t_last = now;
      tokens_since = 0;
    }
    if (cfg_.train.eval_interval > 0 && step_ % cfg_.train.eval_interval == 0 && val_) {
      const double v = evaluate();
      m["val/loss"] = v;
      print(fmt::format("step {}: validation loss {:.4f} (ppl {:.2f})", step_, v, std::exp(v)));
    }
    if (metrics_) metrics_->log(step_, m);
    if (on_step) on_step(rec);
    if (world() > 1) {  // every rank must take the same stop / checkpoint decision
      std::vector<double> flags = {g_stop ? 1.0 : 0.0, g_checkpoint ? 1.0 : 0.0};
      sum_across_ranks(flags);
      g_stop = flags[0] > 0;
      g_checkpoint = flags[1] > 0;
    }
    const bool periodic = cfg_.checkpoint.interval > 0 && step_ % cfg_.checkpoint.interval == 0;
    if (periodic || g_checkpoint.exchange(false) || g_stop) {
      save_checkpoint();
      last_saved = step_;
    }
    if (g_stop) {
      print(fmt::format("stop requested: checkpointed at step {}", step_));
      return step_ - start_step;
    }
  }
  if (last_saved != step_) save_checkpoint();
  return step_ - start_step;
}

}  // namespace dsv4
