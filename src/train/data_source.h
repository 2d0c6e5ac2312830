// BatchSource over dsv4-prep HDF5 datasets (src/data/loader.h), with the dataset/model compatibility check.
#pragma once

#include <memory>

#include "model/config.h"
#include "train/train_config.h"
#include "train/trainer.h"

namespace dsv4 {

// The training stream: data.train files with data.weights, packed into data.seq_len, data.micro_batch rows per
// rank. Checks that every file's vocabulary fits the model (ids < vocab_size) and that the files share one
// tokenizer; errors name the file.
std::unique_ptr<BatchSource> make_train_source(const TrainConfig& cfg, const ModelConfig& model, int rank, int world);
// The held-out stream (data.val), or null when none is configured.
std::unique_ptr<BatchSource> make_val_source(const TrainConfig& cfg, const ModelConfig& model, int rank, int world);

}  // namespace dsv4
