#include "train/data_source.h"

#include <filesystem>

#include "data/dataset.h"
#include "data/loader.h"
#include "data/sha256.h"

namespace dsv4 {

namespace {

class LoaderSource final : public BatchSource {
 public:
  LoaderSource(data::LoaderOptions opts, bool doc_masking, std::string name)
      : loader_(std::move(opts)), doc_masking_(doc_masking), name_(std::move(name)) {}

  TrainBatch next() override {
    std::optional<data::Batch> b = loader_.next();
    DSV4_CHECK(b.has_value(), "{}: the data ran out (max_epochs reached)", name_);
    TrainBatch t{b->input_ids, b->labels, b->layout};
    if (!doc_masking_) t.layout.doc_start.clear();  // attention may then cross documents (as plain HF does)
    return t;
  }
  std::string state() const override { return loader_.state().to_json(); }
  void restore(const std::string& s) override { loader_.restore(data::LoaderState::from_json(s)); }
  std::string describe() const override { return name_; }
  const data::PackedLoader& loader() const { return loader_; }

 private:
  data::PackedLoader loader_;
  bool doc_masking_;
  std::string name_;
};

std::unique_ptr<BatchSource> make_source(const std::vector<std::string>& files, const std::vector<double>& weights,
                                         const TrainConfig& cfg, const ModelConfig& model, int rank, int world,
                                         uint64_t seed) {
  data::LoaderOptions o;
  for (size_t i = 0; i < files.size(); ++i) o.sources.push_back({files[i], weights.empty() ? 1.0 : weights[i]});
  o.seq_len = cfg.data.seq_len;
  o.batch_size = cfg.data.micro_batch;
  o.rank = rank;
  o.world = world;
  o.seed = seed;
  auto src = std::make_unique<LoaderSource>(std::move(o), cfg.data.doc_masking,
                                            fmt::format("[{}] seq {} x {} rows", fmt::join(files, ", "),
                                                        cfg.data.seq_len, cfg.data.micro_batch));
  // Every file against the model: ids must fit its vocabulary and, when the model directory ships its
  // tokenizer.json, the data must have been tokenised with exactly that tokenizer.
  std::string model_tokenizer_sha;
  if (!cfg.model.checkpoint.empty()) {
    const std::filesystem::path tok = std::filesystem::path(cfg.model.checkpoint) / "tokenizer.json";
    if (std::filesystem::exists(tok)) model_tokenizer_sha = data::sha256_file(tok.string());
  }
  for (const data::DatasetInfo& info : src->loader().sources())
    data::check_dataset_compatible(info, model.vocab_size, model_tokenizer_sha);
  return src;
}

}  // namespace

std::unique_ptr<BatchSource> make_train_source(const TrainConfig& cfg, const ModelConfig& model, int rank, int world) {
  return make_source(cfg.data.train, cfg.data.weights, cfg, model, rank, world, static_cast<uint64_t>(cfg.data.seed));
}

std::unique_ptr<BatchSource> make_val_source(const TrainConfig& cfg, const ModelConfig& model, int rank, int world) {
  if (cfg.data.val.empty()) return nullptr;
  return make_source({cfg.data.val}, {}, cfg, model, rank, world, static_cast<uint64_t>(cfg.data.seed) + 1);
}

}  // namespace dsv4
