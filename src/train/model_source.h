// Opening a model for evaluation or sampling from any directory a user has: a dsv4 training run (out_dir, its
// checkpoints/latest), one training checkpoint (step_N/ with model.safetensors + config.json), or a release- or
// transformers-layout checkpoint (config.json + safetensors shards).
#pragma once

#include <memory>
#include <string>

#include "model/model.h"

namespace dsv4 {

struct OpenedModel {
  std::unique_ptr<Model> model;
  std::string description;  // what was loaded, for the log line
};

OpenedModel open_model(const std::string& dir);

}  // namespace dsv4
