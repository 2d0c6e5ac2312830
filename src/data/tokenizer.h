// Native reader/runner of a Hugging Face `tokenizer.json` holding a (byte-level) BPE model, encoding and
// decoding exactly like the `tokenizers` library (checked against it in tests/data/test_tokenizer.cpp on the
// fixtures written by tests/ref/data/gen_data_fixtures.py).
//
// Supported (anything else is rejected at load with an error naming the file and the JSON key):
//   model           BPE: vocab, merges ("a b" strings or [a, b] pairs), unk_token, fuse_unk, byte_fallback,
//                   continuing_subword_prefix, end_of_word_suffix, ignore_merges; dropout null or 0
//   added_tokens    special and ordinary, with single_word / lstrip / rstrip / normalized, matched
//                   leftmost-longest before pre-tokenization (non-normalized ones first, like the library)
//   normalizer      null or an empty Sequence (the identity; DeepSeek's tokenizers use that)
//   pre_tokenizer   Split (String or Regex pattern; Removed, Isolated, MergedWithPrevious, MergedWithNext,
//                   Contiguous; invert), Digits, ByteLevel (add_prefix_space, use_regex), Sequence of those.
//                   DeepSeek-V3/V4: Split(\p{N}{1,3}) > Split(CJK run) > Split(main regex) > ByteLevel.
//                   Regexes run on PCRE2 with Oniguruma semantics (see regex.h).
//   post_processor  null, ByteLevel, TemplateProcessing (single sequences), Sequence of those
//   decoder         null (tokens joined by spaces) or ByteLevel (invalid UTF-8 becomes U+FFFD exactly like
//                   Rust's String::from_utf8_lossy)
//   truncation, padding must be null.
//
// DeepSeek's pre-tokenizer chain (the tokenizer.json of DeepSeek-V3, which DeepSeek-V4 keeps: 128K vocabulary,
// GGUF pre-tokenizer type "deepseek-v3"), every Split with behaviour Isolated and invert false, in this order:
//   1. \p{N}{1,3}            digit runs, cut into groups of at most three
//   2. [一-龥぀-ゟ゠-ヿ]+        runs of CJK ideographs U+4E00..U+9FA5 and kana U+3040..U+30FF
//   3. [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   4. ByteLevel(add_prefix_space = false, use_regex = false)
// Source: ggml-org/llama.cpp, src/llama-vocab.cpp (commit 00ad355e), case LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM, which
// transcribes the three regexes of the DeepSeek-V3 tokenizer.json in order; GGUF loaders of DeepSeek-V4-Flash
// require that pre-tokenizer type, and a public census of hub tokenizers lists deepseek-ai/DeepSeek-V4-Flash-0731
// with exactly this chain. The chain is read from tokenizer.json, not hard-coded; the test fixture
// (tests/fixtures/data/tokenizer.json, written by tests/ref/data/gen_data_fixtures.py) uses it verbatim.
//
// Thread-safety: a loaded Tokenizer is immutable; encode/decode may run concurrently from many threads (each
// thread keeps its own word cache and regex scratch).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dsv4::data {

struct AddedTokenSpec {
  int32_t id = 0;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

struct Encoding {
  std::vector<int32_t> ids;
  // Byte range [first, second) of the input text that each token came from (tokens added by the
  // post-processor get an empty range at 0).
  std::vector<std::pair<uint32_t, uint32_t>> offsets;
};

class Tokenizer {
 public:
  static Tokenizer from_file(const std::string& path);
  // `source` names the JSON in error messages; sha256() is the hash of `json` itself.
  static Tokenizer from_json(std::string_view json, const std::string& source = "<tokenizer.json>");

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text` (valid UTF-8, else dsv4::Error). add_special_tokens applies the post-processor's
  // template (the library's default is true; here it is false because the data pipeline adds BOS/EOS itself).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;
  Encoding encode_with_offsets(std::string_view text, bool add_special_tokens = false) const;
  // Text of `ids`; ids that are in neither the vocabulary nor the added tokens are dropped (as the library
  // does); skip_special_tokens drops the added tokens marked special.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // The pre-tokenizer's pieces of `text` (added tokens extracted first; their pieces are the token text).
  std::vector<std::string> pre_tokenize(std::string_view text) const;

  // Id of a token string (added tokens first, then the model vocabulary); nullopt when absent.
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::optional<std::string> id_to_token(int32_t id) const;
  // One past the largest id of the vocabulary and the added tokens: the embedding rows the ids need.
  int64_t vocab_size() const;
  bool is_special(int32_t id) const;
  const std::vector<AddedTokenSpec>& added_tokens() const;

  const std::string& sha256() const;  // lowercase hex SHA-256 of the tokenizer.json bytes
  const std::string& source() const;  // file name (or the source given to from_json)

  // Per-thread cache of word -> ids (default 16384 entries per thread; 0 disables it, e.g. for benchmarks of
  // the uncached path). Results never depend on it.
  void set_cache_capacity(size_t entries);

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);

}  // namespace dsv4::data
