#include "train/model_source.h"

#include <filesystem>

#include "model/checkpoint_io.h"
#include "model/peft.h"
#include "runtime/safetensors.h"
#include "train/checkpoint_dir.h"
#include "train/sharded_state.h"
#include "train/train_config.h"

namespace dsv4 {

namespace fs = std::filesystem;

OpenedModel open_model(const std::string& dir_in) {
  fs::path dir(dir_in);
  DSV4_CHECK(fs::is_directory(dir), "model directory '{}' does not exist", dir_in);
  if (fs::is_directory(dir / "checkpoints")) {  // a training run: its latest checkpoint
    const CheckpointDir c((dir / "checkpoints").string());
    const auto latest = c.latest();
    DSV4_CHECK(latest.has_value(), "training run '{}' has no checkpoint yet", dir_in);
    dir = *latest;
  }
  OpenedModel out;
  if (fs::exists(dir / "trainer.json") && fs::exists(dir / "adapter" / "adapter_config.json")) {
    // A LoRA run's checkpoint: the frozen base it was trained on (model.checkpoint of its resolved config) plus
    // the adapters it saved in PEFT's format.
    CheckpointDir::verify(dir.string());
    const TrainConfig tc = load_train_config((dir / "config.yaml").string());
    DSV4_CHECK(!tc.model.checkpoint.empty(), "'{}': a LoRA checkpoint whose config names no base model.checkpoint",
               dir.string());
    LoadOptions lo;
    lo.mode = LoadMode::FrozenQuantized;
    lo.frozen_wo_a = true;
    out.model = load_model(tc.model.checkpoint, lo);
    const int64_t n = load_peft_adapter(*out.model, (dir / "adapter").string());
    out.description = fmt::format("{} (LoRA checkpoint: {} adapters over {})", dir.string(), n, tc.model.checkpoint);
    return out;
  }
  if (fs::exists(dir / "trainer.json")) {  // a dsv4 training checkpoint (one-rank or per-rank slice files)
    CheckpointDir::verify(dir.string());
    const ShardedState st = ShardedState::open(dir.string(), "model");
    const ModelConfig cfg = load_model_config((dir / "config.json").string());
    out.model = std::make_unique<Model>(cfg);
    std::map<std::string, Tensor> state;
    for (const std::string& n : st.names()) state[n] = st.read(n);
    out.model->load_state(state, st.where());
    out.description = fmt::format("{} (dsv4 training checkpoint, {})", dir.string(), cfg.name);
    return out;
  }
  LoadReport report;
  out.model = load_model(dir.string(), LoadOptions{LoadMode::TrainableF32, {}, {}}, ModelOptions{}, &report);
  out.description = fmt::format("{} ({} layout, {} tensors in {} shards)", dir.string(),
                                checkpoint_layout_name(report.layout), report.tensors, report.shards);
  return out;
}

}  // namespace dsv4
