#include "data/prep.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "data/progress.h"
#include "data/tokenizer.h"
#include "runtime/error.h"

namespace dsv4::data {
namespace {
using json = nlohmann::json;

struct Record {
  int64_t line = 0;
  bool blank = false;
  bool val = false;
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;
  std::string error;  // non-empty: rejected
};

struct Job {
  int64_t seq = 0;
  int64_t first_line = 0;
  int64_t bytes = 0;
  std::vector<std::string> lines;
};

struct Done {
  int64_t bytes = 0;
  std::vector<Record> records;
};

uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::string type_name(const json& j) { return j.type_name(); }

std::string message_text(const json& content, const std::string& where) {
  if (content.is_null()) return "";
  if (content.is_string()) return content.get<std::string>();
  DSV4_CHECK(content.is_array(), "{}.content must be a string, null or a list of text blocks, found {}", where,
             type_name(content));
  std::string s;
  for (size_t i = 0; i < content.size(); ++i) {
    const json& b = content[i];
    DSV4_CHECK(b.is_object() && b.value("type", "") == "text" && b.contains("text") && b["text"].is_string(),
               "{}.content[{}] must be a {{\"type\": \"text\", \"text\": ...}} block (images and other blocks are not "
               "supported)", where, i);
    s += b["text"].get<std::string>();
  }
  return s;
}

class Processor {
 public:
  Processor(const PrepOptions& o, const Tokenizer& tok, int64_t limit, std::optional<int32_t> bos,
            std::optional<int32_t> eos)
      : o_(o), tok_(tok), limit_(limit), bos_(bos), eos_(eos), chat_(o.format == "chat") {}

  Record run(int64_t line_no, const std::string& line) const {
    Record r;
    r.line = line_no;
    if (line.find_first_not_of(" \t\r\n") == std::string::npos) {
      r.blank = true;
      return r;
    }
    try {
      process(line, r);
    } catch (const Error& e) {
      r.error = e.message();
    }
    if (r.error.empty()) {
      for (int32_t id : r.ids)
        if (id < 0 || id >= limit_) {
          r.error = fmt::format("token id {} is outside the vocabulary [0, {})", id, limit_);
          break;
        }
      if (r.error.empty() && r.ids.empty()) r.error = "empty document (no tokens)";
    }
    if (!r.error.empty()) {
      r.ids.clear();
      r.mask.clear();
    }
    r.val = o_.val_fraction > 0 &&
            static_cast<double>(mix(o_.seed ^ mix(static_cast<uint64_t>(line_no))) >> 11) * 0x1.0p-53 < o_.val_fraction;
    return r;
  }

 private:
  void process(const std::string& line, Record& r) const {
    json j;
    try {
      j = json::parse(line);
    } catch (const json::parse_error& e) {
      std::string what = e.what();
      if (const size_t p = what.find("] "); p != std::string::npos) what = what.substr(p + 2);
      r.error = "malformed JSON: " + what;
      return;
    }
    if (!j.is_object()) {
      r.error = fmt::format("expected a JSON object, found {}", type_name(j));
      return;
    }
    if (!chat_) {
      auto it = j.find(o_.text_key);
      if (it == j.end()) {
        r.error = fmt::format("missing key \"{}\"", o_.text_key);
        return;
      }
      if (!it->is_string()) {
        r.error = fmt::format("key \"{}\" must be a string, found {}", o_.text_key, type_name(*it));
        return;
      }
      if (bos_) r.ids.push_back(*bos_);
      const std::vector<int32_t> ids = tok_.encode(it->get_ref<const std::string&>());
      r.ids.insert(r.ids.end(), ids.begin(), ids.end());
      if (eos_) r.ids.push_back(*eos_);
      return;
    }
    auto it = j.find(o_.messages_key);
    if (it == j.end()) {
      r.error = fmt::format("missing key \"{}\"", o_.messages_key);
      return;
    }
    if (!it->is_array() || it->empty()) {
      r.error = fmt::format("key \"{}\" must be a non-empty list of messages, found {}", o_.messages_key,
                            it->is_array() ? "an empty list" : type_name(*it));
      return;
    }
    ChatOptions opts = o_.chat;
    if (auto tm = j.find("thinking_mode"); tm != j.end()) {
      if (!tm->is_string()) {
        r.error = "\"thinking_mode\" must be \"chat\" or \"thinking\"";
        return;
      }
      opts.thinking = parse_thinking_mode(tm->get<std::string>());
    }
    std::vector<ChatMessage> msgs;
    bool has_assistant = false;
    for (size_t i = 0; i < it->size(); ++i) {
      const json& m = (*it)[i];
      const std::string where = fmt::format("{}[{}]", o_.messages_key, i);
      if (!m.is_object()) {
        r.error = fmt::format("{} must be an object, found {}", where, type_name(m));
        return;
      }
      if (m.contains("tool_calls") || m.contains("tools")) {
        r.error = fmt::format("{}: tool calls are not supported yet", where);
        return;
      }
      auto role = m.find("role");
      if (role == m.end() || !role->is_string()) {
        r.error = fmt::format("{}.role is missing or not a string", where);
        return;
      }
      ChatMessage cm;
      cm.role = role->get<std::string>();
      cm.content = message_text(m.contains("content") ? m["content"] : json(), where);
      if (auto rc = m.find("reasoning_content"); rc != m.end() && !rc->is_null()) {
        if (!rc->is_string()) {
          r.error = fmt::format("{}.reasoning_content must be a string", where);
          return;
        }
        cm.reasoning_content = rc->get<std::string>();
      }
      has_assistant |= cm.role == "assistant";
      msgs.push_back(std::move(cm));
    }
    if (!has_assistant && opts.mask != LossMaskPolicy::kAll) {
      r.error = "the conversation has no assistant message (nothing to train on)";
      return;
    }
    EncodedChat e = encode_chat(tok_, msgs, opts, o_.tokens);
    r.ids = std::move(e.ids);
    r.mask = std::move(e.loss_mask);
  }

  const PrepOptions& o_;
  const Tokenizer& tok_;
  int64_t limit_;
  std::optional<int32_t> bos_, eos_;
  bool chat_;
};

// Worker threads: jobs in, finished batches out (by sequence number, so the writer keeps input order).
class Pool {
 public:
  Pool(int n, const Processor& proc) : proc_(proc) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_jobs_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void submit(Job job) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_jobs_.notify_one();
  }
  Done wait(int64_t seq) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [&] { return done_.count(seq) > 0; });
    Done d = std::move(done_[seq]);
    done_.erase(seq);
    return d;
  }

 private:
  void loop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_jobs_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      Done d;
      d.bytes = job.bytes;
      for (size_t i = 0; i < job.lines.size(); ++i)
        d.records.push_back(proc_.run(job.first_line + static_cast<int64_t>(i), job.lines[i]));
      {
        std::lock_guard<std::mutex> lk(mu_);
        done_[job.seq] = std::move(d);
      }
      cv_done_.notify_all();
    }
  }
  const Processor& proc_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_jobs_, cv_done_;
  std::deque<Job> jobs_;
  std::map<int64_t, Done> done_;
  bool stop_ = false;
};
}  // namespace

std::string default_val_path(const std::string& out) {
  for (const char* ext : {".h5", ".hdf5"}) {
    const std::string e(ext);
    if (out.size() > e.size() && out.compare(out.size() - e.size(), e.size(), e) == 0)
      return out.substr(0, out.size() - e.size()) + ".val" + e;
  }
  return out + ".val.h5";
}

PrepStats run_prep(const PrepOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  std::ostream& log = o.log ? *o.log : std::cerr;
  DSV4_CHECK(o.format == "text" || o.format == "chat", "--format must be text or chat, got {:?}", o.format);
  DSV4_CHECK(o.val_fraction >= 0 && o.val_fraction < 1, "--val-fraction must be in [0, 1), got {}", o.val_fraction);
  DSV4_CHECK(o.workers >= 1, "--workers must be at least 1, got {}", o.workers);
  DSV4_CHECK(!o.output_path.empty(), "no output path");

  const Tokenizer tok = Tokenizer::from_file(o.tokenizer_path);
  const int64_t limit = o.vocab_limit > 0 ? std::min(o.vocab_limit, tok.vocab_size()) : tok.vocab_size();
  auto special = [&](bool want, const std::string& token, const char* what, const char* flag) -> std::optional<int32_t> {
    if (!want) return std::nullopt;
    auto id = tok.token_to_id(token);
    DSV4_CHECK(id.has_value(), "{}: the tokenizer has no {} token {:?} (pass {} or name another with --{}-token)",
               o.tokenizer_path, what, token, flag, what);
    return id;
  };
  const bool chat = o.format == "chat";
  const std::optional<int32_t> bos = special(chat ? o.chat.add_bos : o.add_bos, o.tokens.bos, "bos", "--no-bos");
  const std::optional<int32_t> eos = special(!chat && o.add_eos, o.tokens.eos, "eos", "--no-eos");
  const std::optional<int32_t> eos_id = tok.token_to_id(o.tokens.eos);

  std::ifstream in(o.input_path, std::ios::binary);
  DSV4_CHECK(in.good(), "{}: cannot open the input", o.input_path);
  std::error_code ec;
  const auto total = static_cast<int64_t>(std::filesystem::file_size(o.input_path, ec));

  DatasetWriter::Options wo;
  wo.path = o.output_path;
  wo.format = o.format;
  wo.vocab_size = tok.vocab_size();
  wo.tokenizer_sha256 = tok.sha256();
  wo.bos_id = tok.token_to_id(o.tokens.bos).value_or(-1);
  wo.eos_id = eos_id.value_or(-1);
  wo.source_file = std::filesystem::path(o.input_path).filename().string();
  wo.with_loss_mask = chat;
  wo.chunk_tokens = o.chunk_tokens;
  wo.compression = o.compression;
  wo.created_by = o.created_by;
  DatasetWriter train(wo);
  std::optional<DatasetWriter> val;
  if (o.val_fraction > 0) {
    DatasetWriter::Options vo = wo;
    vo.path = o.val_output_path.empty() ? default_val_path(o.output_path) : o.val_output_path;
    vo.split = "val";
    val.emplace(vo);
  }

  const Processor proc(o, tok, limit, bos, eos);
  ProgressBar bar(ec ? 0 : total, o.progress || (o.progress_auto && ProgressBar::stderr_is_tty()));
  PrepStats st;
  int warnings = 0;
  auto consume = [&](Done& d) {
    for (Record& r : d.records) {
      ++st.lines;
      if (r.blank) {
        ++st.blank;
        continue;
      }
      ++st.records;
      if (!r.error.empty()) {
        if (o.strict) DSV4_FAIL("{}:{}: {} (--strict)", o.input_path, r.line, r.error);
        ++st.skipped;
        if (warnings++ < o.max_warnings) log << fmt::format("dsv4-prep: {}:{}: {} (skipped)\n", o.input_path, r.line, r.error);
        continue;
      }
      DatasetWriter& w = r.val ? *val : train;
      w.add(r.ids, chat ? std::span<const uint8_t>(r.mask) : std::span<const uint8_t>());
      (r.val ? st.val_tokens : st.train_tokens) += static_cast<int64_t>(r.ids.size());
      ++(r.val ? st.val_documents : st.train_documents);
    }
    st.input_bytes += d.bytes;
    bar.update(st.input_bytes, st.train_tokens + st.val_tokens);
  };

  constexpr size_t kBatchLines = 256;
  constexpr int64_t kBatchBytes = 1 << 20;
  std::optional<Pool> pool;
  if (o.workers > 1) pool.emplace(o.workers, proc);
  const int64_t max_in_flight = 2 * o.workers + 2;
  int64_t submitted = 0, written = 0, line_no = 0;
  Job job;
  auto flush_job = [&] {
    if (job.lines.empty()) return;
    job.seq = submitted++;
    if (pool) {
      pool->submit(std::move(job));
      while (submitted - written >= max_in_flight) {
        Done d = pool->wait(written++);
        consume(d);
      }
    } else {
      Done d;
      d.bytes = job.bytes;
      for (size_t i = 0; i < job.lines.size(); ++i)
        d.records.push_back(proc.run(job.first_line + static_cast<int64_t>(i), job.lines[i]));
      ++written;
      consume(d);
    }
    job = Job{};
  };
  std::string line;
  while (std::getline(in, line)) {
    ++line_no;
    if (job.lines.empty()) job.first_line = line_no;
    job.bytes += static_cast<int64_t>(line.size()) + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    job.lines.push_back(std::move(line));
    line.clear();
    if (job.lines.size() >= kBatchLines || job.bytes >= kBatchBytes) flush_job();
  }
  DSV4_CHECK(!in.bad(), "{}: read error after line {}", o.input_path, line_no);
  flush_job();
  while (written < submitted) {
    Done d = pool->wait(written++);
    consume(d);
  }
  pool.reset();
  bar.update(st.input_bytes, st.train_tokens + st.val_tokens, true);
  bar.finish();

  train.set_record_counts(st.records, st.skipped);
  if (val) val->set_record_counts(st.records, st.skipped);
  st.train = train.commit();
  if (val) st.val = val->commit();
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (st.skipped > 0)
    log << fmt::format("dsv4-prep: skipped {} of {} records (malformed or rejected; --strict makes that an error)\n",
                       st.skipped, st.records);
  return st;
}

}  // namespace dsv4::data
