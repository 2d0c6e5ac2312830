// The packed loader: window coverage, label/target alignment with the model's shift, document starts and
// loss masks, deterministic shuffling, data-parallel sharding, exact resume, mixtures, and an end-to-end step
// of the tiny model on the bundled corpus.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "data/dataset.h"
#include "data/loader.h"
#include "data/prep.h"
#include "data/sha256.h"
#include "data_test_util.h"
#include "model/embedding.h"
#include "model/model.h"
#include "runtime/error.h"

namespace dsv4::data {
namespace {
using test::TempDir;

// Token value = 1000 * (document + 1) + position in the document (+ `bias`), so a token tells where it is from.
constexpr int32_t kVocab = 1 << 20;

std::vector<int64_t> doc_lengths(int n, uint32_t seed) {
  std::vector<int64_t> v;
  uint32_t x = seed;
  for (int d = 0; d < n; ++d) {
    x = x * 1664525u + 1013904223u;
    v.push_back(1 + (x >> 8) % 37);
  }
  return v;
}

std::string write_dataset(const TempDir& dir, const std::string& name, const std::vector<int64_t>& lens,
                          int32_t bias = 0, bool with_mask = false, const std::string& sha = std::string(64, 'e')) {
  DatasetWriter::Options o;
  o.path = dir.file(name);
  o.vocab_size = kVocab;
  o.tokenizer_sha256 = sha;
  o.with_loss_mask = with_mask;
  o.chunk_tokens = 64;
  o.format = with_mask ? "chat" : "text";
  DatasetWriter w(o);
  for (size_t d = 0; d < lens.size(); ++d) {
    std::vector<int32_t> ids;
    std::vector<uint8_t> mask;
    for (int64_t p = 0; p < lens[d]; ++p) {
      ids.push_back(bias + 1000 * static_cast<int32_t>(d + 1) + static_cast<int32_t>(p));
      mask.push_back(p % 3 != 0);
    }
    if (with_mask)
      w.add(ids, mask);
    else
      w.add(ids);
  }
  w.commit();
  return o.path;
}

int64_t doc_of(int64_t tok) { return (tok % 100000) / 1000 - 1; }
int64_t pos_of(int64_t tok) { return tok % 1000; }

std::vector<int64_t> vec(const Tensor& t) {
  const int64_t* p = t.data<int64_t>();
  return {p, p + t.numel()};
}

TEST(Loader, WindowsAlignWithTheModelsShiftAndDocuments) {
  TempDir dir;
  const auto lens = doc_lengths(40, 1);
  LoaderOptions o;
  o.sources = {{write_dataset(dir, "a.h5", lens)}};
  o.seq_len = 16;
  o.batch_size = 3;
  o.seed = 11;
  PackedLoader loader(o);
  for (int step = 0; step < 6; ++step) {
    const Batch b = *loader.next();
    ASSERT_EQ(b.rows, 3);
    ASSERT_EQ(b.input_ids.numel(), 48);
    b.layout.validate("loader batch");
    const auto ids = vec(b.input_ids), labels = vec(b.labels), targets = vec(b.targets);
    const auto* lm = b.loss_mask.data<uint8_t>();
    // The model shifts labels by one within each row: that is `targets` except at each row's last position.
    const Tensor shifted = shift_targets(b.labels, b.rows, b.seq_len, 1);
    const auto sh = vec(shifted);
    int64_t counted = 0;
    for (int64_t r = 0; r < b.rows; ++r) {
      for (int64_t s = 0; s < b.seq_len; ++s) {
        const size_t t = static_cast<size_t>(r * b.seq_len + s);
        const bool doc_start = pos_of(ids[t]) == 0;
        // Labels are the inputs themselves except at document starts (no cross-document target).
        EXPECT_EQ(labels[t], doc_start ? kIgnoreIndex : ids[t]);
        EXPECT_EQ(lm[t], labels[t] != kIgnoreIndex);
        if (s + 1 < b.seq_len) {
          EXPECT_EQ(sh[t], targets[t]);
          counted += sh[t] != kIgnoreIndex;
          // Within a document the target is the next token of the same document.
          if (targets[t] != kIgnoreIndex) {
            EXPECT_EQ(doc_of(targets[t]), doc_of(ids[t]));
            EXPECT_EQ(pos_of(targets[t]), pos_of(ids[t]) + 1);
          } else {
            EXPECT_EQ(pos_of(ids[t + 1]), 0);  // only a document start is not a target
          }
        } else {
          EXPECT_EQ(sh[t], kIgnoreIndex);
        }
        // doc_start points at the row position where this token's document starts (0 if before the row).
        const int64_t ds = b.layout.doc_start[t];
        EXPECT_EQ(ds, std::max<int64_t>(0, s - pos_of(ids[t])));
      }
    }
    EXPECT_EQ(counted, b.target_count);
  }
}

TEST(Loader, OneEpochCoversEveryDocumentOnceAndReshufflesNext) {
  TempDir dir;
  const auto lens = doc_lengths(50, 2);
  int64_t total = 0;
  for (int64_t l : lens) total += l;
  LoaderOptions o;
  o.sources = {{write_dataset(dir, "a.h5", lens)}};
  o.seq_len = 8;
  o.seed = 5;
  PackedLoader loader(o);
  const int64_t W = loader.windows_per_epoch(0);
  EXPECT_EQ(W, (total - 1) / 8);
  std::vector<int64_t> stream[2];
  for (int e = 0; e < 2; ++e) {
    int64_t prev_last_target = 0;
    for (int64_t w = 0; w < W; ++w) {
      const Batch b = *loader.next();
      const auto ids = vec(b.input_ids);
      // Consecutive windows overlap by one token: the last target of a row is the next row's first input
      // (or -100 when that token starts a document).
      if (w > 0) {
        if (prev_last_target == kIgnoreIndex) {
          EXPECT_EQ(pos_of(ids.front()), 0);
        } else {
          EXPECT_EQ(ids.front(), prev_last_target);
        }
      }
      prev_last_target = vec(b.targets).back();
      stream[e].insert(stream[e].end(), ids.begin(), ids.end());
    }
    // Documents appear whole and in some order; all but the cut tail are present exactly once.
    std::map<int64_t, int64_t> seen;
    for (size_t i = 0; i < stream[e].size(); ++i) {
      const int64_t d = doc_of(stream[e][i]);
      if (pos_of(stream[e][i]) == 0) {
        EXPECT_EQ(seen.count(d), 0u) << "document repeated in an epoch";
      } else if (i > 0) {
        EXPECT_EQ(stream[e][i], stream[e][i - 1] + 1);
      }
      seen[d]++;
    }
    // Only the document cut by the end of the last window can be partial; the epoch's remaining tail is
    // shorter than a window.
    int64_t partial = 0, seen_tokens = 0;
    for (const auto& [d, n] : seen) {
      partial += n != lens[static_cast<size_t>(d)];
      seen_tokens += n;
    }
    EXPECT_LE(partial, 1);
    EXPECT_EQ(seen_tokens, W * 8);
    EXPECT_LT(total - seen_tokens, 8 + 1);
  }
  EXPECT_NE(stream[0], stream[1]);  // a new order in the second epoch
  // Unshuffled: file order.
  o.shuffle = false;
  PackedLoader plain(o);
  const auto first = vec(plain.next()->input_ids);
  EXPECT_EQ(first.front(), 1000);
}

TEST(Loader, DeterministicShardedAndResumable) {
  TempDir dir;
  const std::string path = write_dataset(dir, "a.h5", doc_lengths(60, 3));
  LoaderOptions o;
  o.sources = {{path}};
  o.seq_len = 12;
  o.seed = 99;
  o.batch_size = 4;
  auto run = [](LoaderOptions opts, int steps) {
    PackedLoader l(std::move(opts));
    std::vector<std::vector<int64_t>> rows;
    for (int i = 0; i < steps; ++i) {
      const Batch b = *l.next();
      const auto ids = vec(b.input_ids);
      for (int64_t r = 0; r < b.rows; ++r)
        rows.emplace_back(ids.begin() + r * b.seq_len, ids.begin() + (r + 1) * b.seq_len);
    }
    return rows;
  };
  const auto single = run(o, 6);
  EXPECT_EQ(run(o, 6), single);  // same seed, same batches
  LoaderOptions other = o;
  other.seed = 100;
  EXPECT_NE(run(other, 6), single);
  // Two ranks with half the batch each see exactly the rows of the single-rank run, split by rank.
  LoaderOptions r0 = o, r1 = o;
  r0.batch_size = r1.batch_size = 2;
  r0.world = r1.world = 2;
  r1.rank = 1;
  const auto a = run(r0, 6), b = run(r1, 6);
  for (int step = 0; step < 6; ++step)
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(a[static_cast<size_t>(step * 2 + i)], single[static_cast<size_t>(step * 4 + i)]);
      EXPECT_EQ(b[static_cast<size_t>(step * 2 + i)], single[static_cast<size_t>(step * 4 + 2 + i)]);
    }
  // Resume: save the position after 3 steps; a fresh loader restored from it continues identically, also
  // with another data-parallel layout.
  PackedLoader l(o);
  for (int i = 0; i < 3; ++i) l.next();
  const std::string saved = l.state().to_json();
  PackedLoader resumed(o);
  resumed.restore(LoaderState::from_json(saved));
  for (int i = 3; i < 6; ++i) {
    const auto want = vec(l.next()->input_ids);
    const Batch got = *resumed.next();
    EXPECT_EQ(vec(got.input_ids), want);
    EXPECT_EQ(got.step, i);
  }
  PackedLoader resumed_r1(r1);
  resumed_r1.restore(LoaderState::from_json(saved));
  const auto ids = vec(resumed_r1.next()->input_ids);
  EXPECT_EQ(std::vector<int64_t>(ids.begin(), ids.begin() + 12), single[3 * 4 + 2]);
  // A state from another configuration is refused.
  LoaderOptions wrong = o;
  wrong.seed = 1;
  PackedLoader w(wrong);
  EXPECT_THROW(w.restore(LoaderState::from_json(saved)), Error);
  EXPECT_THROW(LoaderState::from_json("{\"format\": \"something else\"}"), Error);
  EXPECT_THROW(LoaderState::from_json("not json"), Error);
}

TEST(Loader, LossMaskMixtureAndEpochLimit) {
  TempDir dir;
  const std::string chat = write_dataset(dir, "chat.h5", doc_lengths(30, 4), 0, /*with_mask=*/true);
  const std::string text = write_dataset(dir, "text.h5", doc_lengths(30, 5), 500000);
  LoaderOptions o;
  o.sources = {{chat, 3.0}, {text, 1.0}};
  o.seq_len = 10;
  o.batch_size = 8;
  o.seed = 3;
  PackedLoader loader(o);
  int64_t rows[2] = {0, 0};
  for (int step = 0; step < 150; ++step) {
    const Batch b = *loader.next();
    const auto ids = vec(b.input_ids), labels = vec(b.labels);
    for (int64_t r = 0; r < b.rows; ++r) {
      const int32_t src = b.row_source[static_cast<size_t>(r)];
      ++rows[src];
      for (int64_t s = 0; s < b.seq_len; ++s) {
        const size_t t = static_cast<size_t>(r * b.seq_len + s);
        EXPECT_EQ(ids[t] >= 500000, src == 1);
        const bool masked_out = src == 0 && pos_of(ids[t]) % 3 == 0;  // chat mask: positions 0, 3, 6, ... off
        EXPECT_EQ(labels[t] == kIgnoreIndex, masked_out || pos_of(ids[t]) == 0);
      }
    }
  }
  const double share = static_cast<double>(rows[0]) / static_cast<double>(rows[0] + rows[1]);
  EXPECT_NEAR(share, 0.75, 0.05);
  // With the loss mask off, chat tokens are all targets except document starts.
  o.use_loss_mask = false;
  o.sources = {{chat}};
  PackedLoader nomask(o);
  const Batch nb = *nomask.next();
  const auto nids = vec(nb.input_ids), nlabels = vec(nb.labels);
  for (size_t t = 0; t < nids.size(); ++t) EXPECT_EQ(nlabels[t], pos_of(nids[t]) == 0 ? kIgnoreIndex : nids[t]);
  // max_epochs: exactly windows_per_epoch rows, then the end.
  LoaderOptions once;
  once.sources = {{text}};
  once.seq_len = 10;
  once.max_epochs = 1;
  once.shuffle = false;
  PackedLoader l(once);
  int64_t n = 0;
  while (l.next()) ++n;
  EXPECT_EQ(n, l.windows_per_epoch(0));
}

TEST(Loader, RejectsInconsistentConfigurations) {
  TempDir dir;
  const std::string a = write_dataset(dir, "a.h5", doc_lengths(10, 6));
  const std::string b = write_dataset(dir, "b.h5", doc_lengths(10, 7), 0, false, std::string(64, 'f'));
  auto expect_error = [](LoaderOptions o, const std::string& needle) {
    try {
      PackedLoader l(std::move(o));
      ADD_FAILURE() << "no error, expected " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  LoaderOptions o;
  o.seq_len = 8;
  o.sources = {{a}, {b}};
  expect_error(o, "must share one tokenizer");
  o.sources = {{a}};
  o.seq_len = 100000;
  expect_error(o, "fewer than one row");
  o.seq_len = 8;
  o.rank = 2;
  expect_error(o, "rank 2");
  o.rank = 0;
  o.sources = {{a, -1.0}};
  expect_error(o, "mixture weight");
  o.sources = {};
  expect_error(o, "no data sources");
}

// dsv4-prep on the bundled corpus -> loader -> one training step of the tiny model: the loader's batch is what
// Model::forward_backward takes, and the dataset passes the model's vocabulary check.
TEST(Loader, FeedsTheModel) {
  TempDir dir;
  PrepOptions p;
  p.tokenizer_path = test::fixture("tokenizer.json");
  p.input_path = test::bundled("chat.jsonl");
  p.output_path = dir.file("chat.h5");
  p.format = "chat";
  p.progress_auto = false;
  run_prep(p);
  LoaderOptions o;
  o.sources = {{p.output_path}};
  o.seq_len = 24;
  o.batch_size = 2;
  PackedLoader loader(o);
  ModelConfig cfg = model_preset("tiny");
  check_dataset_compatible(loader.sources()[0], cfg.vocab_size, sha256_file(test::fixture("tokenizer.json")));
  DatasetInfo too_small = loader.sources()[0];
  EXPECT_THROW(check_dataset_compatible(too_small, 1000), Error);
  Model model(cfg);
  model.init_random(1);
  const Batch b = *loader.next();
  const LossResult r = model.forward_backward(b.input_ids, b.labels, b.layout, LossWeights{});
  EXPECT_TRUE(std::isfinite(r.lm));
  EXPECT_GT(r.lm, 0.0);
  EXPECT_EQ(r.tokens, b.target_count);
  EXPECT_GT(b.target_count, 0);
}

}  // namespace
}  // namespace dsv4::data
