// Packed, shuffled, data-parallel-sharded and resumable batches from dsv4-prep datasets.
//
// Stream. Each source (one HDF5 file) is read epoch by epoch: its documents are put in a random order that
// depends only on (seed, source index, epoch) (or file order with shuffle = false) and concatenated; the
// stream is cut into windows of seq_len + 1 tokens with stride seq_len, so window w covers stream tokens
// [w*seq_len, w*seq_len + seq_len + 1) and every token except the first is the next-token target of exactly one
// input position. The tail shorter than a window is dropped (a different tail each epoch).
//
// Rows and sharding. The global sequence of rows (windows) is fixed by the seed: global row g comes from a
// source drawn with probability proportional to the mixture weights (a counter-based hash of (seed, g)), and
// takes that source's next window. Step t uses global rows [t*G, (t+1)*G) with G = world * batch_size; rank r
// takes rows t*G + r*batch_size ... + batch_size - 1. All ranks compute the same global order; none reads
// another rank's tokens.
//
// Position. LoaderState is the number of global rows consumed and the number of windows drawn from each
// source: a few integers, serialisable to JSON for the training checkpoint. A loader restored from a state
// yields exactly the batches the original would have produced next, even with a different world size or
// batch size (the global row order does not depend on them).
//
// What a batch holds (T = rows * seq_len tokens, row-major, as Model::forward_backward takes them):
//   input_ids  I64 [T]   window tokens 0 .. seq_len-1
//   labels     I64 [T]   the model's convention: NOT shifted. labels[t] = input_ids[t], or kIgnoreIndex (-100)
//                        where the token must not be a target: loss_mask == 0 (chat prompts) or the first
//                        token of a document (no prediction across documents). Model::forward_backward shifts
//                        them (shift_targets: position s is trained on labels[s + 1] of its row), so the last
//                        position of each row gets no target there.
//   targets    I64 [T]   the same targets already shifted: targets[t] = label of window token s + 1, including
//                        the extra (seq_len+1)-th token, for losses that take next-token targets directly.
//                        shift_targets(labels, rows, seq_len, 1) equals targets except at each row's last
//                        position (which it sets to -100).
//   loss_mask  U8  [T]   1 where labels[t] != -100.
//   layout     SeqLayout{rows, seq_len, doc_start}: doc_start[t] = position in the row where t's document begins
//                        (0 for a document continuing from the previous row), so attention stays inside a
//                        document and positions restart at each document.
// Note: the model (make_targets in model.cpp) also drops, in packed rows, every shifted target that belongs to another
// document than its position, so the MTP targets (labels shifted by 2) never pair two documents either.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/seq_layout.h"
#include "runtime/tensor.h"

namespace dsv4::data {

struct DatasetInfo;

struct LoaderSource {
  std::string path;
  double weight = 1.0;  // relative share of rows (normalised over the sources)
};

struct LoaderOptions {
  std::vector<LoaderSource> sources;
  int64_t seq_len = 0;     // tokens per row fed to the model
  int64_t batch_size = 1;  // rows per rank per step
  int rank = 0, world = 1;
  uint64_t seed = 0;
  bool shuffle = true;                // random document order per epoch (else file order)
  int64_t max_epochs = 0;             // 0: endless; else next() returns nullopt once a source would start this epoch
  bool mask_document_starts = true;   // no target across document boundaries
  bool use_loss_mask = true;          // apply the dataset's loss mask (chat data)
  int64_t preload_max_bytes = int64_t{1} << 30;  // sources at most this large are read into memory at open
};

struct LoaderState {
  uint64_t seed = 0;
  int64_t seq_len = 0;
  int64_t global_rows = 0;              // rows consumed by all ranks together
  std::vector<int64_t> source_rows;     // windows drawn from each source
  std::vector<std::string> source_sha;  // tokenizer hash of each source (checked on restore)

  std::string to_json() const;
  static LoaderState from_json(const std::string& json);  // throws dsv4::Error on malformed input
};

struct Batch {
  int64_t rows = 0, seq_len = 0;
  int64_t step = 0;  // index of this step in the global stream
  Tensor input_ids, labels, targets, loss_mask;
  SeqLayout layout;
  std::vector<int32_t> row_source;  // source index of each row
  int64_t target_count = 0;         // positions whose (shifted) target is not -100, as the model counts them
};

class PackedLoader {
 public:
  explicit PackedLoader(LoaderOptions opts);
  ~PackedLoader();
  PackedLoader(PackedLoader&&) noexcept;
  PackedLoader& operator=(PackedLoader&&) noexcept;

  // This rank's rows of the next global step; nullopt when max_epochs is reached.
  std::optional<Batch> next();
  LoaderState state() const;
  // Continues from a state saved by state() (seed, seq_len, source count and tokenizer hashes must match).
  void restore(const LoaderState& s);

  const std::vector<DatasetInfo>& sources() const;
  int64_t windows_per_epoch(size_t source) const;
  int64_t vocab_size() const;               // the sources' common vocab size
  const std::string& tokenizer_sha256() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv4::data
