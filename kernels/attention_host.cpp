// Host helpers of kernels/attention_kernels.h: candidate CSR construction and its key-major transpose, the
// indexer's top-k offsets.
#include <algorithm>
#include <limits>

#include "kernels/attention_kernels.h"
#include "runtime/error.h"

namespace dsv4::cuda {

void build_sparse_candidates(const std::vector<int64_t>& win_begin, const std::vector<int64_t>& win_end,
                             const std::vector<int64_t>& comp_offsets, const std::vector<int64_t>& comp_ids,
                             int64_t n_raw, std::vector<int32_t>& cand_offsets, std::vector<int32_t>& cand_ids) {
  const size_t T = win_begin.size();
  DSV4_CHECK(win_end.size() == T && comp_offsets.size() == T + 1,
             "build_sparse_candidates: {} window begins, {} ends, {} offsets", T, win_end.size(), comp_offsets.size());
  cand_offsets.assign(T + 1, 0);
  cand_ids.clear();
  for (size_t t = 0; t < T; ++t) {
    for (int64_t j = win_begin[t]; j < win_end[t]; ++j) cand_ids.push_back(static_cast<int32_t>(j));
    for (int64_t c = comp_offsets[t]; c < comp_offsets[t + 1]; ++c)
      cand_ids.push_back(static_cast<int32_t>(n_raw + comp_ids[static_cast<size_t>(c)]));
    DSV4_CHECK(cand_ids.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
               "build_sparse_candidates: more than 2^31 candidates");
    cand_offsets[t + 1] = static_cast<int32_t>(cand_ids.size());
  }
}

namespace {
// Counting sort of the candidate positions by row: key_offsets [n_rows + 1]; per row, emit(slot, t, position) in
// ascending position order (so ascending query order, a row listed twice by one query in list order).
template <typename Emit>
void key_major_transpose(const std::vector<int32_t>& cand_offsets, const std::vector<int32_t>& cand_ids, int64_t n_rows,
                         std::vector<int32_t>& key_offsets, Emit emit) {
  DSV4_CHECK(!cand_offsets.empty(), "build_key_major: empty offsets");
  const size_t T = cand_offsets.size() - 1;
  DSV4_CHECK(static_cast<size_t>(cand_offsets[T]) == cand_ids.size(), "build_key_major: offsets end at {} but {} ids",
             cand_offsets[T], cand_ids.size());
  key_offsets.assign(static_cast<size_t>(n_rows) + 1, 0);
  for (int32_t id : cand_ids) {
    DSV4_CHECK(0 <= id && id < n_rows, "build_key_major: candidate id {} outside [0, {})", id, n_rows);
    ++key_offsets[static_cast<size_t>(id) + 1];
  }
  for (size_t r = 0; r < static_cast<size_t>(n_rows); ++r) key_offsets[r + 1] += key_offsets[r];
  std::vector<int32_t> fill(key_offsets.begin(), key_offsets.end() - 1);
  for (size_t t = 0; t < T; ++t)  // queries ascending: each row's list comes out sorted
    for (int32_t c = cand_offsets[t]; c < cand_offsets[t + 1]; ++c)
      emit(static_cast<size_t>(fill[static_cast<size_t>(cand_ids[static_cast<size_t>(c)])]++), static_cast<int32_t>(t),
           c);
}
}  // namespace

void build_key_major(const std::vector<int32_t>& cand_offsets, const std::vector<int32_t>& cand_ids, int64_t n_rows,
                     std::vector<int32_t>& key_offsets, std::vector<int32_t>& key_queries) {
  key_queries.assign(cand_ids.size(), 0);
  key_major_transpose(cand_offsets, cand_ids, n_rows, key_offsets,
                      [&](size_t slot, int32_t t, int32_t) { key_queries[slot] = t; });
}

void build_key_major_positions(const std::vector<int32_t>& cand_offsets, const std::vector<int32_t>& cand_ids,
                               int64_t n_rows, std::vector<int32_t>& key_offsets, std::vector<int32_t>& key_positions) {
  key_positions.assign(cand_ids.size(), 0);
  key_major_transpose(cand_offsets, cand_ids, n_rows, key_offsets,
                      [&](size_t slot, int32_t, int32_t position) { key_positions[slot] = position; });
}

void indexer_topk_offsets(const std::vector<int64_t>& n_visible, int64_t topk, std::vector<int64_t>& topk_offsets) {
  DSV4_CHECK(topk >= 0, "indexer_topk_offsets: topk {} < 0", topk);
  topk_offsets.assign(n_visible.size() + 1, 0);
  for (size_t t = 0; t < n_visible.size(); ++t) {
    DSV4_CHECK(n_visible[t] >= 0, "indexer_topk_offsets: n_visible[{}] = {} < 0", t, n_visible[t]);
    topk_offsets[t + 1] = topk_offsets[t] + std::min(topk, n_visible[t]);
  }
}

}  // namespace dsv4::cuda
