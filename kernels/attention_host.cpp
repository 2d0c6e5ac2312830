// Host helpers of kernels/attention_kernels.h: candidate CSR construction and its key-major transpose, the
// indexer's top-k offsets.
//
// The candidate builder and the transpose run on several host threads for large inputs (a CSA layer at T = 4096 has
// ~2M candidates, rebuilt per layer and step while the GPU waits). The work is split into contiguous query ranges
// and every output element is written by exactly one thread at the slot the sequential algorithm gives it, so the
// result is bit-identical for every thread count (and single-threaded below kMinPerThread candidates per thread).
#include <algorithm>
#include <exception>
#include <limits>
#include <memory>
#include <thread>

#include "kernels/attention_kernels.h"
#include "runtime/error.h"

namespace dsv4::cuda {

namespace {
constexpr size_t kMaxThreads = 16;
constexpr size_t kMinPerThread = size_t{1} << 15;  // candidates per thread: 2 threads from 64K candidates
// Per-thread row histograms of the transpose: at most this many int32 counters in all (64 MiB).
constexpr size_t kMaxHistogramEntries = size_t{1} << 24;

// Threads for `work` candidates: the hardware's (capped), at most one per kMinPerThread.
size_t threads_for(size_t work) {
  const size_t hw = std::max<size_t>(1, std::thread::hardware_concurrency());
  return std::max<size_t>(1, std::min({hw, kMaxThreads, work / kMinPerThread}));
}

// Runs fn(i) for i in [0, n), i = 0 on the calling thread and the others on their own threads; after all joined,
// rethrows the exception of the lowest i that threw (a chunk stops at its first error, and chunks are in input
// order, so that is the error the sequential loop meets first). A thread that cannot be started runs inline.
template <typename Fn>
void run_chunks(size_t n, const Fn& fn) {
  if (n <= 1) {
    fn(size_t{0});
    return;
  }
  std::vector<std::exception_ptr> errors(n);
  const auto guarded = [&](size_t i) {
    try {
      fn(i);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n - 1);
  for (size_t i = 1; i < n; ++i) {
    try {
      threads.emplace_back(guarded, i);
    } catch (...) {
      guarded(i);
    }
  }
  guarded(0);
  for (std::thread& th : threads) th.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

// Splits queries [0, T) into n contiguous ranges [bounds[i], bounds[i + 1]) of about equal candidate counts
// (offsets [T + 1], non-decreasing).
template <typename Offset>
std::vector<size_t> split_queries(const std::vector<Offset>& offsets, size_t n) {
  const size_t T = offsets.size() - 1;
  const auto total = static_cast<uint64_t>(offsets[T] - offsets[0]);
  std::vector<size_t> bounds(n + 1, T);
  bounds[0] = 0;
  for (size_t i = 1; i < n; ++i) {
    const auto target = static_cast<Offset>(offsets[0] + static_cast<Offset>(total * i / n));
    bounds[i] = static_cast<size_t>(std::lower_bound(offsets.begin(), offsets.end() - 1, target) - offsets.begin());
    bounds[i] = std::max(bounds[i], bounds[i - 1]);
  }
  return bounds;
}
}  // namespace

void build_sparse_candidates(const std::vector<int64_t>& win_begin, const std::vector<int64_t>& win_end,
                             const std::vector<int64_t>& comp_offsets, const std::vector<int64_t>& comp_ids,
                             int64_t n_raw, std::vector<int32_t>& cand_offsets, std::vector<int32_t>& cand_ids) {
  const size_t T = win_begin.size();
  DSV4_CHECK(win_end.size() == T && comp_offsets.size() == T + 1,
             "build_sparse_candidates: {} window begins, {} ends, {} offsets", T, win_end.size(), comp_offsets.size());
  // Offsets first (one pass over T), then every range of queries fills its own part of cand_ids.
  cand_offsets.resize(T + 1);
  cand_offsets[0] = 0;
  int64_t total = 0;
  for (size_t t = 0; t < T; ++t) {
    const int64_t n_comp = comp_offsets[t + 1] - comp_offsets[t];
    if (n_comp > 0)
      DSV4_CHECK(comp_offsets[t] >= 0 && comp_offsets[t + 1] <= static_cast<int64_t>(comp_ids.size()),
                 "build_sparse_candidates: query {} lists compressed ids [{}, {}) of {}", t, comp_offsets[t],
                 comp_offsets[t + 1], comp_ids.size());
    total += std::max<int64_t>(0, win_end[t] - win_begin[t]) + std::max<int64_t>(0, n_comp);
    DSV4_CHECK(total <= std::numeric_limits<int32_t>::max(), "build_sparse_candidates: more than 2^31 candidates");
    cand_offsets[t + 1] = static_cast<int32_t>(total);
  }
  cand_ids.resize(static_cast<size_t>(total));
  const size_t n_threads = threads_for(static_cast<size_t>(total));
  const std::vector<size_t> bounds = split_queries(cand_offsets, n_threads);
  run_chunks(n_threads, [&](size_t i) {
    int32_t* out = cand_ids.data() + cand_offsets[bounds[i]];
    for (size_t t = bounds[i]; t < bounds[i + 1]; ++t) {
      for (int64_t j = win_begin[t]; j < win_end[t]; ++j) *out++ = static_cast<int32_t>(j);
      for (int64_t c = comp_offsets[t]; c < comp_offsets[t + 1]; ++c)
        *out++ = static_cast<int32_t>(n_raw + comp_ids[static_cast<size_t>(c)]);
    }
  });
}

namespace {
// Counting sort of the candidate positions by row: key_offsets [n_rows + 1]; per row, emit(slot, t, position) in
// ascending position order (so ascending query order, a row listed twice by one query in list order).
// Threaded: each thread counts the rows of its contiguous range of queries (its own histogram); a combine pass
// gives each (thread, row) its first slot (the row's offset plus the counts of the earlier threads for that row);
// each thread then scatters its range. Ranges are in ascending position order, so every row stays ascending.
template <typename Emit>
void key_major_transpose(const std::vector<int32_t>& cand_offsets, const std::vector<int32_t>& cand_ids, int64_t n_rows,
                         std::vector<int32_t>& key_offsets, Emit emit) {
  DSV4_CHECK(!cand_offsets.empty(), "build_key_major: empty offsets");
  const size_t T = cand_offsets.size() - 1;
  DSV4_CHECK(cand_offsets[0] == 0 && static_cast<size_t>(cand_offsets[T]) == cand_ids.size(),
             "build_key_major: offsets run from {} to {} but there are {} ids", cand_offsets[0], cand_offsets[T],
             cand_ids.size());
  for (size_t t = 0; t < T; ++t)
    DSV4_CHECK(cand_offsets[t] <= cand_offsets[t + 1], "build_key_major: offsets decrease at query {}", t);
  DSV4_CHECK(n_rows >= 0, "build_key_major: {} rows", n_rows);
  const auto R = static_cast<size_t>(n_rows);
  const size_t N = cand_ids.size();
  // Threads: one per kMinPerThread candidates, each histogram no more work than the candidates it counts, and
  // all histograms within kMaxHistogramEntries.
  const size_t R1 = std::max<size_t>(R, 1);
  const size_t n_threads = std::max<size_t>(1, std::min({threads_for(N), N / R1, kMaxHistogramEntries / R1}));
  const std::vector<size_t> bounds = split_queries(cand_offsets, n_threads);
  const std::unique_ptr<int32_t[]> hist(new int32_t[n_threads * R]);  // filled per thread below
  run_chunks(n_threads, [&](size_t i) {
    int32_t* count = hist.get() + i * R;
    std::fill(count, count + R, 0);
    const int32_t* ids = cand_ids.data();
    for (auto c = static_cast<size_t>(cand_offsets[bounds[i]]); c < static_cast<size_t>(cand_offsets[bounds[i + 1]]);
         ++c) {
      const int32_t id = ids[c];
      DSV4_CHECK(0 <= id && id < n_rows, "build_key_major: candidate id {} outside [0, {})", id, n_rows);
      ++count[static_cast<size_t>(id)];
    }
  });
  key_offsets.resize(R + 1);
  int32_t running = 0;
  for (size_t r = 0; r < R; ++r) {
    key_offsets[r] = running;
    for (size_t i = 0; i < n_threads; ++i) {
      int32_t& slot = hist[i * R + r];
      const int32_t n = slot;
      slot = running;
      running += n;
    }
  }
  key_offsets[R] = running;
  run_chunks(n_threads, [&](size_t i) {
    int32_t* fill = hist.get() + i * R;
    for (size_t t = bounds[i]; t < bounds[i + 1]; ++t)  // queries ascending: each row's list comes out sorted
      for (int32_t c = cand_offsets[t]; c < cand_offsets[t + 1]; ++c)
        emit(static_cast<size_t>(fill[static_cast<size_t>(cand_ids[static_cast<size_t>(c)])]++), static_cast<int32_t>(t),
             c);
  });
}
}  // namespace

void build_key_major(const std::vector<int32_t>& cand_offsets, const std::vector<int32_t>& cand_ids, int64_t n_rows,
                     std::vector<int32_t>& key_offsets, std::vector<int32_t>& key_queries) {
  key_queries.resize(cand_ids.size());  // every slot is written once
  key_major_transpose(cand_offsets, cand_ids, n_rows, key_offsets,
                      [&](size_t slot, int32_t t, int32_t) { key_queries[slot] = t; });
}

void build_key_major_positions(const std::vector<int32_t>& cand_offsets, const std::vector<int32_t>& cand_ids,
                               int64_t n_rows, std::vector<int32_t>& key_offsets, std::vector<int32_t>& key_positions) {
  key_positions.resize(cand_ids.size());  // every slot is written once
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
