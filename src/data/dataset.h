// Tokenised datasets in HDF5 (written by dsv4-prep, read by the loader).
//
// Layout (format version 1; see README "Data pipeline"):
//   /tokens       int32 [N]    every document's token ids, back to back
//   /doc_offsets  int64 [D+1]  document d is tokens[doc_offsets[d] : doc_offsets[d+1]]; [0] = 0, [D] = N
//   /loss_mask    uint8 [N]    optional (chat data): 1 where the token is a training target
// Root attributes: dsv4_format_version, format ("text" | "chat"), vocab_size, tokenizer_sha256, bos_id,
// eos_id (-1 when none), source_file, num_documents, num_tokens, num_records, num_skipped, split
// ("train" | "val"), created_by.
// Datasets are chunked (chunk_tokens elements) and compressed (shuffle + deflate) so multi-GB corpora
// stream: the writer appends in whole chunks and never holds the corpus in memory; readers decompress only
// the chunks they touch.
//
// Writing is atomic: everything goes to a temporary file next to the output, which is renamed over the output
// by commit(); an exception, abort() or destruction without commit() removes it, and
// install_temp_file_cleanup() makes SIGINT/SIGTERM/SIGHUP remove it too.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace dsv4::data {

inline constexpr int64_t kDatasetFormatVersion = 1;

struct DatasetInfo {
  std::string path;
  int64_t format_version = kDatasetFormatVersion;
  std::string format;  // "text" | "chat"
  int64_t vocab_size = 0;
  std::string tokenizer_sha256;
  int64_t bos_id = -1, eos_id = -1;
  std::string source_file;
  int64_t num_documents = 0, num_tokens = 0;
  int64_t num_records = 0;  // input records (non-blank lines) that went to this split or were skipped
  int64_t num_skipped = 0;  // malformed / rejected records (counted in the train file)
  std::string split = "train";
  std::string created_by;
  bool has_loss_mask = false;
};

class DatasetWriter {
 public:
  struct Options {
    std::string path;  // final output path
    std::string format = "text";
    int64_t vocab_size = 0;  // every id must be in [0, vocab_size)
    std::string tokenizer_sha256;
    int64_t bos_id = -1, eos_id = -1;
    std::string source_file;
    std::string split = "train";
    std::string created_by = "dsv4";
    bool with_loss_mask = false;
    int64_t chunk_tokens = 1 << 16;
    int compression = 4;  // deflate level 0..9 (0: no compression filter)
  };
  explicit DatasetWriter(Options opts);  // creates the temporary file
  ~DatasetWriter();                      // removes the temporary file unless committed
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;

  // Appends one document. Throws when an id is outside [0, vocab_size), when the mask length differs, or a
  // mask is given to a writer without one (or missing for one with).
  void add(std::span<const int32_t> ids, std::span<const uint8_t> mask = {});
  void set_record_counts(int64_t records, int64_t skipped);
  int64_t num_documents() const;
  int64_t num_tokens() const;
  const std::string& temp_path() const;
  // Flushes, writes the attributes, closes, fsyncs and renames over the output path.
  DatasetInfo commit();
  void abort();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class DatasetReader {
 public:
  // Opens and validates (datasets, dtypes, shapes, offsets, attributes); errors name the file and the item.
  explicit DatasetReader(const std::string& path);
  ~DatasetReader();
  DatasetReader(DatasetReader&&) noexcept;
  DatasetReader& operator=(DatasetReader&&) noexcept;

  const DatasetInfo& info() const;
  const std::vector<int64_t>& doc_offsets() const;  // D + 1 entries, read at open
  int64_t num_documents() const { return static_cast<int64_t>(doc_offsets().size()) - 1; }
  // tokens[begin, end) / loss_mask[begin, end) into out (end - begin elements).
  void read_tokens(int64_t begin, int64_t end, int32_t* out) const;
  void read_mask(int64_t begin, int64_t end, uint8_t* out) const;
  // Reads tokens (and the mask) into memory; later reads are copies.
  void preload();
  bool preloaded() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Clear error when a dataset does not fit a model: its ids need more embedding rows than the model has, or
// (when expected_tokenizer_sha256 is given, e.g. the hash of the model's tokenizer.json) it was tokenised with
// a different tokenizer.
void check_dataset_compatible(const DatasetInfo& info, int64_t model_vocab_size,
                              const std::string& expected_tokenizer_sha256 = {});

// Removes registered temporary files on SIGINT, SIGTERM and SIGHUP, then re-raises the signal.
void install_temp_file_cleanup();

}  // namespace dsv4::data
