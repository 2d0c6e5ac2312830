// HDF5 token datasets (writer/reader round trips, atomic output, validation) and dsv4-prep (run_prep):
// worker-independent output, train/validation split, chat masks, bad-input policy, vocabulary limit.
#include <gtest/gtest.h>

#include <random>
#include <sstream>

#include "data/chat.h"
#include "data/dataset.h"
#include "data/prep.h"
#include "data/progress.h"
#include "data/tokenizer.h"
#include "data_test_util.h"
#include "runtime/error.h"

namespace dsv4::data {
namespace {
using test::bundled;
using test::fixture;
using test::TempDir;

std::vector<std::string> dir_entries(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<int32_t> doc_tokens(const DatasetReader& r, int64_t d) {
  const auto& off = r.doc_offsets();
  std::vector<int32_t> v(static_cast<size_t>(off[d + 1] - off[d]));
  r.read_tokens(off[d], off[d + 1], v.data());
  return v;
}

std::vector<uint8_t> doc_mask(const DatasetReader& r, int64_t d) {
  const auto& off = r.doc_offsets();
  std::vector<uint8_t> v(static_cast<size_t>(off[d + 1] - off[d]));
  r.read_mask(off[d], off[d + 1], v.data());
  return v;
}

TEST(Dataset, RoundTripAcrossChunkBoundaries) {
  TempDir dir;
  DatasetWriter::Options o;
  o.path = dir.file("d.h5");
  o.format = "chat";
  o.vocab_size = 5000;
  o.tokenizer_sha256 = std::string(64, 'a');
  o.bos_id = 0;
  o.eos_id = 1;
  o.source_file = "src.jsonl";
  o.with_loss_mask = true;
  o.chunk_tokens = 7;  // tiny chunks: documents straddle many of them, and flushes happen mid-run
  std::mt19937 rng(7);
  std::vector<std::vector<int32_t>> docs;
  std::vector<std::vector<uint8_t>> masks;
  DatasetWriter w(o);
  for (int d = 0; d < 60; ++d) {
    std::vector<int32_t> ids(rng() % 40);  // includes empty documents
    std::vector<uint8_t> m(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      ids[i] = static_cast<int32_t>(rng() % 5000);
      m[i] = rng() % 2;
    }
    w.add(ids, m);
    docs.push_back(ids);
    masks.push_back(m);
  }
  w.set_record_counts(70, 10);
  EXPECT_FALSE(std::filesystem::exists(o.path));  // nothing at the final path before commit
  EXPECT_TRUE(std::filesystem::exists(w.temp_path()));
  const DatasetInfo wi = w.commit();
  EXPECT_EQ(dir_entries(dir.path()), std::vector<std::string>{"d.h5"});

  for (bool preload : {false, true}) {
    DatasetReader r(o.path);
    if (preload) r.preload();
    const DatasetInfo& in = r.info();
    EXPECT_EQ(in.format, "chat");
    EXPECT_EQ(in.vocab_size, 5000);
    EXPECT_EQ(in.tokenizer_sha256, o.tokenizer_sha256);
    EXPECT_EQ(in.bos_id, 0);
    EXPECT_EQ(in.eos_id, 1);
    EXPECT_EQ(in.source_file, "src.jsonl");
    EXPECT_EQ(in.num_documents, 60);
    EXPECT_EQ(in.num_tokens, wi.num_tokens);
    EXPECT_EQ(in.num_records, 70);
    EXPECT_EQ(in.num_skipped, 10);
    EXPECT_EQ(in.split, "train");
    EXPECT_TRUE(in.has_loss_mask);
    ASSERT_EQ(r.num_documents(), 60);
    for (int d = 0; d < 60; ++d) {
      EXPECT_EQ(doc_tokens(r, d), docs[static_cast<size_t>(d)]) << d;
      EXPECT_EQ(doc_mask(r, d), masks[static_cast<size_t>(d)]) << d;
    }
    std::vector<int32_t> one(1);
    EXPECT_THROW(r.read_tokens(in.num_tokens, in.num_tokens + 1, one.data()), Error);
  }
}

TEST(Dataset, NeverLeavesPartialOutput) {
  TempDir dir;
  DatasetWriter::Options o;
  o.path = dir.file("out.h5");
  o.vocab_size = 10;
  {
    DatasetWriter w(o);
    w.add(std::vector<int32_t>{1, 2, 3});
    EXPECT_THROW(w.add(std::vector<int32_t>{4, 10}), Error);  // id >= vocab_size
    EXPECT_THROW(w.add(std::vector<int32_t>{1}, std::vector<uint8_t>{1}), Error);  // mask without a mask dataset
  }  // destroyed without commit
  EXPECT_TRUE(dir_entries(dir.path()).empty());
  {
    DatasetWriter w(o);
    w.add(std::vector<int32_t>{1});
    w.abort();
  }
  EXPECT_TRUE(dir_entries(dir.path()).empty());
  // An existing output is replaced only by a complete new file.
  {
    DatasetWriter w(o);
    w.add(std::vector<int32_t>{1, 2});
    w.commit();
  }
  {
    DatasetWriter w(o);
    w.add(std::vector<int32_t>{3, 4, 5});
    // not committed: the old file stays
  }
  EXPECT_EQ(DatasetReader(o.path).info().num_tokens, 2);
  EXPECT_EQ(dir_entries(dir.path()), std::vector<std::string>{"out.h5"});
  o.path = dir.file("missing_dir/out.h5");
  EXPECT_THROW(DatasetWriter{o}, Error);
}

TEST(Dataset, ReaderErrorsNameTheFile) {
  TempDir dir;
  auto expect_error = [](const std::string& path, const std::string& needle) {
    try {
      DatasetReader r(path);
      ADD_FAILURE() << "no error for " << path;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  };
  expect_error(dir.file("nope.h5"), "no such dataset file");
  test::write_file(dir.file("text.h5"), "not hdf5 at all");
  expect_error(dir.file("text.h5"), "not an HDF5 file");
}

TEST(Dataset, CompatibilityCheck) {
  DatasetInfo in;
  in.path = "train.h5";
  in.vocab_size = 1502;
  in.tokenizer_sha256 = "abc";
  EXPECT_NO_THROW(check_dataset_compatible(in, 129280, "abc"));
  EXPECT_NO_THROW(check_dataset_compatible(in, 1502));
  try {
    check_dataset_compatible(in, 1000);
    ADD_FAILURE();
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("train.h5"), std::string::npos) << w;
    EXPECT_NE(w.find("vocab_size is 1000"), std::string::npos) << w;
  }
  try {
    check_dataset_compatible(in, 129280, "def");
    ADD_FAILURE();
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("abc"), std::string::npos) << w;
    EXPECT_NE(w.find("def"), std::string::npos) << w;
  }
}

PrepOptions prep_options(const TempDir& dir, const std::string& input, const std::string& format) {
  PrepOptions o;
  o.tokenizer_path = fixture("tokenizer.json");
  o.input_path = input;
  o.output_path = dir.file(format + ".h5");
  o.format = format;
  o.progress_auto = false;
  o.chunk_tokens = 512;
  return o;
}

TEST(Prep, TextMatchesTokenizerAndIsWorkerIndependent) {
  TempDir dir;
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  std::vector<std::string> texts;
  for (const auto& j : test::read_jsonl(bundled("text.jsonl"))) texts.push_back(j["text"]);
  std::vector<std::vector<int32_t>> docs[2];
  for (int k = 0; k < 2; ++k) {
    PrepOptions o = prep_options(dir, bundled("text.jsonl"), "text");
    o.workers = k == 0 ? 1 : 3;
    o.output_path = dir.file("w" + std::to_string(o.workers) + ".h5");
    std::ostringstream log;
    o.log = &log;
    const PrepStats st = run_prep(o);
    EXPECT_EQ(st.records, static_cast<int64_t>(texts.size()));
    EXPECT_EQ(st.skipped, 0);
    EXPECT_TRUE(log.str().empty()) << log.str();
    DatasetReader r(o.output_path);
    EXPECT_EQ(r.info().format, "text");
    EXPECT_EQ(r.info().tokenizer_sha256, tok.sha256());
    EXPECT_EQ(r.info().vocab_size, tok.vocab_size());
    EXPECT_EQ(r.info().source_file, "text.jsonl");
    EXPECT_FALSE(r.info().has_loss_mask);
    ASSERT_EQ(r.num_documents(), static_cast<int64_t>(texts.size()));
    for (int64_t d = 0; d < r.num_documents(); ++d) docs[k].push_back(doc_tokens(r, d));
  }
  EXPECT_EQ(docs[0], docs[1]);
  for (size_t d = 0; d < texts.size(); ++d) {
    std::vector<int32_t> want = {0};
    const auto ids = tok.encode(texts[d]);
    want.insert(want.end(), ids.begin(), ids.end());
    want.push_back(1);
    EXPECT_EQ(docs[0][d], want) << d;
    EXPECT_EQ(tok.decode(docs[0][d], true), texts[d]);
  }
}

TEST(Prep, ValidationSplitIsDisjointAndDeterministic) {
  TempDir dir;
  PrepOptions o = prep_options(dir, bundled("text.jsonl"), "text");
  o.val_fraction = 0.25;
  o.workers = 2;
  const PrepStats st = run_prep(o);
  EXPECT_EQ(st.val.path, dir.file("text.val.h5"));
  DatasetReader train(o.output_path), val(st.val.path);
  EXPECT_EQ(val.info().split, "val");
  EXPECT_GT(val.num_documents(), 0);
  EXPECT_GT(train.num_documents(), val.num_documents());
  EXPECT_EQ(train.num_documents() + val.num_documents(), st.records);
  // Same split again, with one worker.
  PrepOptions o2 = o;
  o2.workers = 1;
  o2.output_path = dir.file("again.h5");
  const PrepStats st2 = run_prep(o2);
  EXPECT_EQ(st2.val_documents, st.val_documents);
  EXPECT_EQ(st2.val_tokens, st.val_tokens);
  EXPECT_EQ(default_val_path("a/b.h5"), "a/b.val.h5");
  EXPECT_EQ(default_val_path("b.hdf5"), "b.val.hdf5");
  EXPECT_EQ(default_val_path("b"), "b.val.h5");
}

TEST(Prep, ChatDocumentsCarryTheAssistantMask) {
  TempDir dir;
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  PrepOptions o = prep_options(dir, bundled("chat.jsonl"), "chat");
  o.workers = 2;
  const PrepStats st = run_prep(o);
  const auto rows = test::read_jsonl(bundled("chat.jsonl"));
  EXPECT_EQ(st.skipped, 0);
  DatasetReader r(o.output_path);
  ASSERT_TRUE(r.info().has_loss_mask);
  ASSERT_EQ(r.num_documents(), static_cast<int64_t>(rows.size()));
  for (size_t d = 0; d < rows.size(); ++d) {
    std::vector<ChatMessage> msgs;
    for (const auto& m : rows[d]["messages"]) msgs.push_back({m["role"], m["content"], m.value("reasoning_content", "")});
    ChatOptions co;
    co.thinking = parse_thinking_mode(rows[d].value("thinking_mode", "chat"));
    const EncodedChat e = encode_chat(tok, msgs, co);
    EXPECT_EQ(doc_tokens(r, static_cast<int64_t>(d)), e.ids);
    EXPECT_EQ(doc_mask(r, static_cast<int64_t>(d)), e.loss_mask);
  }
}

TEST(Prep, BadRecordsAreSkippedWithLineNumbersOrFailStrictly) {
  TempDir dir;
  const std::string input = dir.file("bad.jsonl");
  test::write_file(input,
                   "{\"text\": \"fine\"}\n"
                   "\n"
                   "{\"text\": \"broken\"\n"
                   "[1, 2]\n"
                   "{\"other\": 1}\n"
                   "{\"text\": 42}\n"
                   "{\"text\": \"also fine\"}\r\n");
  PrepOptions o = prep_options(dir, input, "text");
  std::ostringstream log;
  o.log = &log;
  const PrepStats st = run_prep(o);
  EXPECT_EQ(st.lines, 7);
  EXPECT_EQ(st.blank, 1);
  EXPECT_EQ(st.records, 6);
  EXPECT_EQ(st.skipped, 4);
  EXPECT_EQ(st.train_documents, 2);
  const std::string l = log.str();
  for (const char* needle : {"bad.jsonl:3: malformed JSON", "bad.jsonl:4: expected a JSON object, found array",
                             "bad.jsonl:5: missing key \"text\"", "bad.jsonl:6: key \"text\" must be a string",
                             "skipped 4 of 6 records"})
    EXPECT_NE(l.find(needle), std::string::npos) << needle << "\n" << l;
  DatasetReader r(o.output_path);
  EXPECT_EQ(r.info().num_skipped, 4);
  EXPECT_EQ(r.info().num_records, 6);
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  EXPECT_EQ(tok.decode(doc_tokens(r, 1), true), "also fine");  // CRLF line ending stripped

  // --strict: the first bad record is an error naming file:line; no output or temporary file remains, and an
  // existing output is untouched.
  o.strict = true;
  const auto before = std::filesystem::file_size(o.output_path);
  try {
    run_prep(o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.message()).find("bad.jsonl:3: malformed JSON"), std::string::npos) << e.what();
  }
  EXPECT_EQ(std::filesystem::file_size(o.output_path), before);
  o.output_path = dir.file("strict.h5");
  o.val_fraction = 0.5;
  EXPECT_THROW(run_prep(o), Error);
  EXPECT_EQ(dir_entries(dir.path()), (std::vector<std::string>{"bad.jsonl", "text.h5"}));
}

TEST(Prep, ChatErrorsAndVocabularyLimit) {
  TempDir dir;
  const std::string input = dir.file("chat.jsonl");
  test::write_file(input,
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n"
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"tool_calls\": []}]}\n"
                   "{\"messages\": [{\"role\": \"wizard\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n"
                   "{\"messages\": []}\n"
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n"
                   "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"blocks\"}]}, "
                   "{\"role\": \"assistant\", \"content\": \"ok\"}], \"thinking_mode\": \"thinking\"}\n");
  PrepOptions o = prep_options(dir, input, "chat");
  std::ostringstream log;
  o.log = &log;
  const PrepStats st = run_prep(o);
  EXPECT_EQ(st.skipped, 4);
  EXPECT_EQ(st.train_documents, 2);
  for (const char* needle : {"chat.jsonl:2: messages[1]: tool calls are not supported", "chat.jsonl:3:",
                             "wizard", "chat.jsonl:4: key \"messages\" must be a non-empty list",
                             "chat.jsonl:5: the conversation has no assistant message"})
    EXPECT_NE(log.str().find(needle), std::string::npos) << needle << "\n" << log.str();

  // Token ids >= the vocabulary limit are rejected (here: everything but the lowest ids).
  PrepOptions t = prep_options(dir, bundled("text.jsonl"), "text");
  t.vocab_limit = 300;
  std::ostringstream log2;
  t.log = &log2;
  const PrepStats st2 = run_prep(t);
  EXPECT_GT(st2.skipped, 0);
  EXPECT_NE(log2.str().find("is outside the vocabulary [0, 300)"), std::string::npos) << log2.str();
}

TEST(Progress, Rendering) {
  EXPECT_EQ(ProgressBar::format_bytes(999), "999 B");
  EXPECT_EQ(ProgressBar::format_bytes(1.5e6), "1.5 MB");
  EXPECT_EQ(ProgressBar::format_duration(65), "1:05");
  EXPECT_EQ(ProgressBar::format_duration(3725), "1:02:05");
  const ProgressBar bar(2'000'000, false);
  const std::string s = bar.render(500'000, 100'000, 2.0);
  EXPECT_NE(s.find(" 25.0%"), std::string::npos) << s;
  EXPECT_NE(s.find("250.0 kB/s"), std::string::npos) << s;
  EXPECT_NE(s.find("ETA 0:06"), std::string::npos) << s;
}

}  // namespace
}  // namespace dsv4::data
