// dsv4-prep as a library call: JSONL (plain text or V4 chat) -> tokenised HDF5 dataset(s).
//
// Input: one JSON object per line. format "text": {"<text_key>": "..."} becomes BOS + tokens + EOS (each
// optional). format "chat": {"<messages_key>": [{"role": ..., "content": ..., "reasoning_content": ...}, ...]}
// is rendered in the DeepSeek-V4 chat format (chat.h) with a loss mask over assistant turns; a record may
// override the thinking mode with "thinking_mode": "chat" | "thinking". Blank lines are ignored.
//
// Bad records (malformed JSON, missing or mistyped keys, unsupported roles, token ids >= the vocabulary
// limit, empty documents) are skipped and counted, the first `max_warnings` reported with their line number;
// with strict = true the first one is an error (dsv4::Error naming file:line) and no output is left behind.
//
// Lines are tokenised by `workers` threads in batches; the output does not depend on the number of workers.
// Records go to the validation file when a hash of (seed, line number) falls below val_fraction.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>

#include "data/chat.h"
#include "data/dataset.h"

namespace dsv4::data {

struct PrepOptions {
  std::string tokenizer_path;
  std::string input_path;
  std::string output_path;
  std::string format = "text";  // "text" | "chat"
  std::string text_key = "text";
  std::string messages_key = "messages";
  double val_fraction = 0;
  std::string val_output_path;  // default: output with ".h5" replaced by ".val.h5"
  uint64_t seed = 0;            // of the train/validation assignment
  int workers = 1;
  bool strict = false;
  bool add_bos = true, add_eos = true;  // text format
  ChatOptions chat;                     // chat format (its add_bos applies too)
  ChatTokens tokens;                    // BOS/EOS/role token strings
  int64_t vocab_limit = 0;              // ids >= this are rejected (0: the tokenizer's vocabulary size)
  int64_t chunk_tokens = 1 << 16;
  int compression = 4;
  bool progress = false;        // force the progress bar
  bool progress_auto = true;    // show it when stderr is a terminal
  int max_warnings = 10;
  std::string created_by = "dsv4-prep";
  std::ostream* log = nullptr;  // warnings and the summary (nullptr: std::cerr)
};

struct PrepStats {
  int64_t lines = 0, blank = 0, records = 0, skipped = 0;
  int64_t train_documents = 0, train_tokens = 0, val_documents = 0, val_tokens = 0;
  int64_t input_bytes = 0;
  double seconds = 0;
  DatasetInfo train, val;  // val.path empty when no validation file was written
};

PrepStats run_prep(const PrepOptions& opts);

// "data.h5" -> "data.val.h5"
std::string default_val_path(const std::string& output_path);

}  // namespace dsv4::data
