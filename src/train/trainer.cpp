#include "train/trainer.h"

#include <csignal>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cinttypes>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/flops.h"
#include "model/checkpoint_io.h"
#include "model/lora.h"
#include "model/peft.h"
#include "optim/clip.h"
#include "optim/grad_sync.h"
#include "train/plan.h"
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

ParallelDims resolve_layout(const TrainConfig& cfg, const ModelConfig& model, int64_t world) {
  ParallelDims d{cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.ep};
  if (d.dp == 1 && world > 1 && d.tp * d.dp != world && world % d.tp == 0) d.dp = world / d.tp;  // dp fills the rest
  validate_layout(model, d.dp, d.tp, d.ep, world);
  return d;
}

Trainer::Trainer(const TrainConfig& cfg, std::unique_ptr<BatchSource> train, std::unique_ptr<BatchSource> val,
                 const Communicator* world)
    : cfg_(cfg), world_(world), model_cfg_(resolve_model_config(cfg)), train_(std::move(train)), val_(std::move(val)) {
  DSV4_CHECK(train_ != nullptr, "Trainer needs a training batch source");
  par_ = std::make_unique<Parallel>(world, resolve_layout(cfg_, model_cfg_, world ? world->size() : 1));
  g_stop = false;
  g_checkpoint = false;
  set_cpu_threads(static_cast<int>(cfg_.train.threads));
  ModelOptions opts;
  opts.attention.simulate_release_quant = cfg_.model.simulate_release_quant;
  opts.recompute = cfg_.train.recompute;
  opts.attention.tensor_cores = cfg_.train.attention_precision == "bf16";
  opts.parallel = par_.get();
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
  model_->set_matmul_precision(parse_matmul_precision(cfg_.train.precision, "train.precision"));
  if (lora) {
    LoraConfig lc;
    lc.rank = cfg_.lora.rank;
    lc.alpha = cfg_.lora.alpha;
    lc.rslora = cfg_.lora.rslora;
    lc.dropout = cfg_.lora.dropout;
    lc.targets = cfg_.lora.targets;
    lc.seed = static_cast<uint64_t>(cfg_.train.seed);
    lora_config_ = lc;
    apply_lora(*model_, lc);
    set_lora_train_mode(*model_, true);
    // Whole-model counts: each adapter tensor once (its canonical copy), tp slices of one adapter counted once.
    std::vector<int64_t> counts = {0, 0};  // adapters, trainable elements
    for (Param* p : lora_params(*model_)) {
      if (!canonical_copy(*par_, *p)) continue;
      counts[1] += p->value.numel();
      const bool is_a = p->name.size() > 7 && p->name.compare(p->name.size() - 7, 7, ".lora_A") == 0;
      if (is_a && (p->placement != Placement::TpSplit || par_->tp_rank() == 0)) ++counts[0];
    }
    group_sum(par_->world(), counts);
    print(fmt::format("LoRA r={} alpha={}: {} adapters, {:.3f}M trainable parameters; the base is frozen", lc.rank,
                      lc.alpha, counts[0], static_cast<double>(counts[1]) / 1e6));
  }

  if (cfg_.train.device == "cuda") {
    // One GPU per process: the parameters (a LoRA run's frozen base in its FP8 / FP4 / BF16 format),
    // their gradients and the optimizer state live there; batches come from the host loader and are uploaded by the
    // model. What the GPU path does not cover yet fails here, before any step or checkpoint.
    DSV4_CHECK(cuda_device_count() > 0, "train.device: cuda, but {}",
               cuda_built() ? "no CUDA device is visible" : "this dsv4 was built without CUDA (no nvcc at configure time)");
    // Several ranks: one GPU per rank (the rank's index among those on its host); collectives of device tensors run
    // over NCCL twins of the parallel groups (Parallel::attach_device), host values over MPI.
    const int local = local_rank(par_->world());
    DSV4_CHECK(local < cuda_device_count(), "train.device: cuda: rank {} is local rank {} on its host, which has only {} "
               "visible CUDA device(s) (one rank per GPU)", par_->rank(), local, cuda_device_count());
    const Device dev = Device::cuda(local);
    par_->attach_device(dev);
    model_->to(dev);
  }

  OptimizerConfig oc = OptimizerConfig::for_model(
      model_cfg_, cfg_.optim.type == "adamw" ? OptimizerMode::AdamW : OptimizerMode::MuonAdamW);
  oc.muon.momentum = cfg_.optim.muon_momentum;
  oc.muon.update_scale = cfg_.optim.muon_update_scale;
  oc.muon.precision = cfg_.optim.muon_ns_precision == "bf16" ? NsPrecision::BF16 : NsPrecision::F32;
  oc.muon.weight_decay = cfg_.optim.weight_decay;
  oc.adamw.beta1 = cfg_.optim.beta1;
  oc.adamw.beta2 = cfg_.optim.beta2;
  oc.adamw.eps = cfg_.optim.eps;
  oc.adamw.weight_decay = cfg_.optim.weight_decay;
  oc.validate();
  optimizer_ = std::make_unique<Optimizer>(*model_, oc, OptimizerSharding{par_.get(), cfg_.parallel.zero1});
  params_ = model_params(*model_);
  // Every optimised parameter gets its gradient buffer now, so an expert that receives no token in a step is
  // still updated (zero gradient: momentum and weight decay move on) in every run, resumed or not. One flat buffer
  // per device, in the sync order: zeroed in one call, summed over the ranks in place.
  model_->allocate_grads(gradient_sync_order(optimizer_->optimised_params()));

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
  if (par_->world()) par_->world()->barrier();
  if (!is_root()) checkpoints_ = std::make_unique<CheckpointDir>(ckpt_root);

  std::optional<std::string> resume;
  if (cfg_.train.resume == "auto") resume = checkpoints_->latest();
  else if (cfg_.train.resume != "never") resume = cfg_.train.resume;
  if (resume) resume_from(*resume);
  if (par_->world_size() > 1)
    print(fmt::format("layout {} over {} ranks: dp {} x tp {}, ep {} (ZeRO-1 {})", par_->dims().str(),
                      par_->world_size(), par_->dp_size(), par_->tp_size(), par_->ep_size(),
                      cfg_.parallel.zero1 ? "on" : "off"));
  if (is_root())
    metrics_ = std::make_unique<MetricsLogger>(cfg_.train.out_dir, cfg_.logging.metrics_jsonl, cfg_.logging.tensorboard);
}

void Trainer::check_replicas_in_sync() const {
  // Dense parameters must agree across dp replicas, experts across edp replicas.
  for (const bool expert : {false, true}) {
    const Communicator* g = expert ? par_->edp() : par_->dp();
    if (!g) continue;
    uint32_t crc = 0;
    model_->visit([&](Param& p) {
      if ((p.placement == Placement::Expert) == expert && p.value.defined()) {
        const Tensor h = p.value.to(Device::cpu()).contiguous();
        crc = crc32c(h.raw_data(), static_cast<size_t>(h.nbytes()), crc);
      }
    });
    Tensor v = Tensor::from_vector<int64_t>({2}, {static_cast<int64_t>(crc), -static_cast<int64_t>(crc)});
    g->all_reduce(v, CommReduce::Max);
    DSV4_CHECK(v.data<int64_t>()[0] == -v.data<int64_t>()[1],
               "{} replicas diverged at step {}: parameter checksums differ across ranks",
               expert ? "expert-data-parallel" : "data-parallel", step_);
  }
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
  group_sum(par_->dp(), counts);  // tp ranks of one dp rank share its batches
  weights.lm_normalizer = std::max(counts[0], 1.0);
  weights.mtp_normalizer = std::max(counts[1], 1.0);
  // The balance term is a mean over sequences.
  weights.balance_alpha /= static_cast<double>(accum * par_->dp_size());
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
  if (par_->world_size() > 1) {
    complete_gradients(*par_, params_);
    // Losses are already whole on every tp rank (vocab-parallel CE, tp-summed balance rows): sum over dp only.
    std::vector<double> stats = {rec.loss, rec.lm, rec.mtp, rec.balance, static_cast<double>(rec.tokens)};
    group_sum(par_->dp(), stats);
    rec.loss = stats[0];
    rec.lm = stats[1];
    rec.mtp = stats[2];
    rec.balance = stats[3];
    rec.tokens = static_cast<int64_t>(std::llround(stats[4]));
    // Each token's routing happened on exactly one rank (MoE splits tokens over tp): loads sum over the world.
    for (auto& layer : loads) group_sum(par_->world(), layer);
  }
  // Each distinct gradient element counts once in the norm: replicated parameters on rank 0, tp slices on dp rank 0,
  // experts on edp rank 0.
  std::vector<Param*> counted;
  for (Param* p : params_)
    if (canonical_copy(*par_, *p)) counted.push_back(p);
  const ClipResult clip = clip_grad_norm(params_, cfg_.optim.clip_grad_norm, counted, par_->world());
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
  group_sum(par_->dp(), sums);
  return sums[1] > 0 ? sums[0] / sums[1] : std::nan("");
}

namespace {
StateSlice slice_of(const Param& p, const std::string& key, const Tensor& value) {
  StateSlice s;
  s.name = key;
  s.value = value;
  if (p.placement == Placement::TpSplit && value.shape() == p.value.shape()) {
    s.dim = p.shard_dim;
    s.offset = p.shard_offset;
    s.global = p.global_shape();
  } else {
    s.global = value.shape();
  }
  return s;
}
}  // namespace

std::vector<StateSlice> Trainer::model_slices() const {
  // Every distinct tensor once: replicated ones from rank 0, tp slices from dp rank 0, experts from edp rank 0.
  // LoRA runs keep the frozen base out of their checkpoints (it is model.checkpoint): the adapters, and the MoE
  // routing biases, which the aux-loss-free rule may move, are the whole state.
  std::vector<StateSlice> out;
  model_->visit([&](Param& p) {
    if (cfg_.lora.enabled && !p.trainable && p.name.find("gate.bias") == std::string::npos) return;
    if (canonical_copy(*par_, p)) out.push_back(slice_of(p, p.name, p.value));
  });
  return out;
}

std::vector<StateSlice> Trainer::optimizer_slices() const {
  // The owners' states (ZeRO-1: one owner per parameter among its replicas; otherwise the canonical copy writes); tp
  // ranks of an owner each write their slice of a tp-split parameter.
  std::map<std::string, Param*> by_name;
  for (Param* p : params_) by_name[p->name] = p;
  std::vector<StateSlice> out;
  for (auto& [key, value] : optimizer_->state_dict()) {
    if (key == "optimizer/steps") {
      if (par_->rank() == 0) out.push_back(slice_of(Param(), key, value));
      continue;
    }
    const std::string pname = key.substr(0, key.rfind('/'));
    const Param& p = *by_name.at(pname);
    // ZeRO-1: the owner is unique among the replicas; otherwise the canonical copy writes. Whole entries of a tp-split
    // parameter (its step count) come from tp rank 0 only.
    const bool writer = cfg_.parallel.zero1 || canonical_copy(*par_, p);
    const bool slice = p.placement == Placement::TpSplit && value.shape() == p.value.shape();
    if (writer && (slice || p.placement != Placement::TpSplit || par_->tp_rank() == 0))
      out.push_back(slice_of(p, key, value));
  }
  return out;
}

void Trainer::load_model_state(const ShardedState& st) {
  std::vector<std::string> missing;
  model_->visit([&](Param& p) {
    if (cfg_.lora.enabled && !p.trainable && p.name.find("gate.bias") == std::string::npos) return;
    if (!st.contains(p.name)) {
      missing.push_back(p.name);
      return;
    }
    if (p.placement == Placement::TpSplit)
      st.read_into(p.name, p.value, p.shard_dim, p.shard_offset);
    else
      st.read_into(p.name, p.value);
  });
  DSV4_CHECK(missing.empty(), "{}: checkpoint lacks {} tensors of this model (first: {}){}", st.where(), missing.size(),
             missing.empty() ? "" : missing[0],
             cfg_.lora.enabled ? "; was it written with the same lora.targets and lora.rank?" : "");
}

void Trainer::load_optimizer_state(const ShardedState& st) {
  std::map<std::string, Param*> by_name;
  for (Param* p : params_) by_name[p->name] = p;
  std::map<std::string, Tensor> state = optimizer_->state_dict();  // this rank's keys and shapes
  for (auto& [key, value] : state) {
    if (!st.contains(key)) continue;  // reported by load_state_dict as missing
    const auto it = by_name.find(key.substr(0, key.rfind('/')));
    const Param* p = it == by_name.end() ? nullptr : it->second;
    if (p && p->placement == Placement::TpSplit && value.shape() == p->value.shape())
      st.read_into(key, value, p->shard_dim, p->shard_offset);
    else
      st.read_into(key, value);
  }
  for (auto it = state.begin(); it != state.end();)
    it = st.contains(it->first) ? std::next(it) : state.erase(it);
  optimizer_->load_state_dict(state, st.where());
}

void Trainer::save_checkpoint() {
  check_replicas_in_sync();
  const Communicator* world = par_->world();
  const int64_t W = par_->world_size(), R = par_->rank();
  // Rank 0 fills a fresh temporary directory through CheckpointDir::save; the other ranks write their files into it
  // while rank 0 waits, then rank 0 checksums and commits the whole directory.
  auto write_mine = [&](const std::string& dir) {
    write_state_slices(dir, "model", R, W, model_slices(),
                       {{"format", "dsv4"}, {"contents", cfg_.lora.enabled ? "lora" : "full"},
                        {"layout", par_->dims().str()}});
    write_state_slices(dir, "optimizer", R, W, optimizer_slices());
  };
  // Every rank writes its files; past the agreement every rank has finished (or some failed: all throw, nothing is
  // committed and the previous checkpoint stays `latest`).
  auto write_all = [&](const std::string& dir) {
    std::string error;
    try {
      write_mine(dir);
    } catch (const std::exception& e) {
      error = e.what();
    }
    std::vector<double> failed = {error.empty() ? 0.0 : 1.0};
    group_sum(world, failed);
    DSV4_CHECK(error.empty(), "rank {}: writing the checkpoint of step {} failed: {}", R, step_, error);
    DSV4_CHECK(failed[0] == 0, "rank {}: another rank failed to write its part of the checkpoint of step {}", R, step_);
  };
  if (!is_root()) {
    Tensor path = Tensor::zeros({4096}, DType::U8);
    world->broadcast(path, 0);
    write_all(std::string(reinterpret_cast<const char*>(path.data<uint8_t>())));
    world->barrier();  // rank 0 commits
    return;
  }
  const std::string path = checkpoints_->save(
      step_,
      [&](const std::string& dir) {
        if (world) {
          Tensor buf = Tensor::zeros({4096}, DType::U8);
          DSV4_CHECK(dir.size() < 4096, "checkpoint path too long: {}", dir);
          std::copy(dir.begin(), dir.end(), buf.data<uint8_t>());
          world->broadcast(buf, 0);
        }
        write_all(dir);
        if (cfg_.lora.enabled) {
          // The same adapters in PEFT's format (loadable by transformers + peft), assembled from every rank's slices.
          const ShardedState st = ShardedState::open(dir, "model");
          AdapterSet set;
          for (const std::string& n : st.names()) {
            if (n.size() < 7 || n.compare(n.size() - 7, 7, ".lora_A") != 0) continue;
            const std::string unit = n.substr(0, n.size() - 7);
            set.adapters.push_back({unit, st.read(n), st.read(unit + ".lora_B"), lora_config_->scale()});
          }
          std::sort(set.adapters.begin(), set.adapters.end(),
                    [](const AdapterTensors& a, const AdapterTensors& b) { return a.unit < b.unit; });
          set.dropout = lora_config_->dropout;
          set.r = lora_config_->rank;
          set.lora_alpha = lora_config_->alpha;
          set.use_rslora = lora_config_->rslora;
          set.base_model_name_or_path = cfg_.model.checkpoint;
          write_peft_adapter((fs::path(dir) / "adapter").string(), set, model_cfg_);
        }
        std::ostringstream rng;
        rng << rng_;
        const nlohmann::json state = {{"step", step_},
                                      {"skipped_steps", skipped_steps_},
                                      {"bad_steps_in_row", bad_steps_in_row_},
                                      {"tokens_seen", tokens_seen_},
                                      {"rng", rng.str()},
                                      {"layout", par_->dims().str()},
                                      {"data", train_->state()}};
        write_file_atomic((fs::path(dir) / "trainer.json").string(), state.dump(2) + "\n");
        write_file_atomic((fs::path(dir) / "config.yaml").string(), cfg_.to_yaml());
        write_file_atomic((fs::path(dir) / "config.json").string(), model_cfg_.to_json() + "\n");
      },
      cfg_.checkpoint.keep);
  print(fmt::format("checkpoint step {} -> {}", step_, path));
  if (world) world->barrier();
}

void Trainer::resume_from(const std::string& checkpoint) {
  CheckpointDir::verify(checkpoint);
  load_model_state(ShardedState::open(checkpoint, "model"));
  load_optimizer_state(ShardedState::open(checkpoint, "optimizer"));
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
  const std::string from = j.contains("layout") ? j["layout"].get<std::string>() : "single";
  print(fmt::format("resumed from {} at step {}{}", checkpoint, step_,
                    from != par_->dims().str() ? fmt::format(" (written as {}, resharded to {})", from, par_->dims().str())
                                              : std::string()));
}

int64_t Trainer::run() {
  const int64_t start_step = step_;
  std::vector<int64_t> params_total = {0};  // F32 parameters of the whole model (each tensor's canonical copy)
  model_->visit([&](Param& p) {
    if (p.value.defined() && p.value.dtype() == DType::F32 && canonical_copy(*par_, p)) params_total[0] += p.value.numel();
  });
  group_sum(par_->world(), params_total);
  const int64_t global_params = params_total[0];
  print(fmt::format("dsv4-train: {} ({:.3f}M parameters), {} steps from step {}, data {}", model_cfg_.name,
                    static_cast<double>(global_params) / 1e6, cfg_.train.steps, step_, train_->describe()));
  const auto t_start = std::chrono::steady_clock::now();
  auto t_last = t_start;
  int64_t tokens_since = 0, last_saved = -1;
  Allocator& mem = allocator_for(par_->device());  // where the model lives (train.device)
  // Fault injection for the launch tests: DSV4_FAULT=RANK:STEP makes that rank fail as step STEP begins.
  int64_t fault_rank = -1, fault_step = -1;
  if (const char* f = std::getenv("DSV4_FAULT"))
    DSV4_CHECK(std::sscanf(f, "%" SCNd64 ":%" SCNd64, &fault_rank, &fault_step) == 2, "DSV4_FAULT='{}': expected RANK:STEP", f);
  while (step_ < cfg_.train.steps) {
    DSV4_CHECK(!(par_->rank() == fault_rank && step_ + 1 == fault_step), "injected fault (DSV4_FAULT={}:{})",
               fault_rank, fault_step);
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
                        static_cast<double>(mem.stats().peak_bytes) / (1 << 20), format_duration(eta)));
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
    if (par_->world_size() > 1) {  // every rank must take the same stop / checkpoint decision
      std::vector<double> flags = {g_stop ? 1.0 : 0.0, g_checkpoint ? 1.0 : 0.0};
      group_sum(par_->world(), flags);
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
