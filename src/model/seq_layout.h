// SeqLayout: how the T = batch * seq rows of an activation map onto sequences, positions and documents.
// Token t = b * seq + s. Without packing every row is one document and position(t) = s. With packed
// documents, doc_start[t] is the index s0 in the row where t's document begins: attention never crosses a
// document boundary and positions restart at every document (position(t) = s - s0).
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/error.h"

namespace dsv4 {

struct SeqLayout {
  int64_t batch = 1;
  int64_t seq = 0;
  std::vector<int64_t> doc_start;  // empty (one document per row) or batch * seq entries

  SeqLayout() = default;
  SeqLayout(int64_t b, int64_t s) : batch(b), seq(s) {}

  int64_t tokens() const { return batch * seq; }
  bool packed() const { return !doc_start.empty(); }
  // Sequence index where token t's document begins (0 without packing).
  int64_t doc_begin(int64_t t) const { return packed() ? doc_start[static_cast<size_t>(t)] : 0; }
  int64_t position(int64_t t) const { return t % seq - doc_begin(t); }

  // Checks sizes and that doc_start is a valid segmentation (starts at 0, non-decreasing, each start is a
  // start of itself). `source` names the caller in errors.
  void validate(const char* source) const {
    DSV4_CHECK(batch >= 0 && seq >= 0, "{}: bad layout batch={} seq={}", source, batch, seq);
    if (!packed()) return;
    DSV4_CHECK(static_cast<int64_t>(doc_start.size()) == tokens(), "{}: doc_start has {} entries for {} tokens", source,
               doc_start.size(), tokens());
    for (int64_t t = 0; t < tokens(); ++t) {
      const int64_t s = t % seq, d = doc_start[static_cast<size_t>(t)];
      DSV4_CHECK(d >= 0 && d <= s, "{}: doc_start[{}] = {} outside [0, {}]", source, t, d, s);
      DSV4_CHECK(doc_start[static_cast<size_t>(t - s + d)] == d,
                 "{}: doc_start[{}] = {} but token {} (that start) belongs to a document starting at {}", source, t, d,
                 t - s + d, doc_start[static_cast<size_t>(t - s + d)]);
      if (s > 0) DSV4_CHECK(d >= doc_start[static_cast<size_t>(t - 1)], "{}: doc_start decreases at token {}", source, t);
    }
  }
};

}  // namespace dsv4
