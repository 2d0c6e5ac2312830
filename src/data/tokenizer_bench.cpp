// dsv4-tokenizer-bench: single-core throughput of the native tokenizer (encode and decode, MB/s of UTF-8 input).
//
//   dsv4-tokenizer-bench --tokenizer data/tokenizer.json --input data/text.jsonl [--seconds 2] [--no-cache]
//
// The input is JSONL (the --text-key field of each line) or, when a line is not JSON, plain text. The first
// pass runs with an empty word cache; the steady-state figure is the mean over further passes for --seconds.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>
#include <iostream>

#include "data/tokenizer.h"
#include "runtime/error.h"

int main(int argc, char** argv) {
  using namespace dsv4::data;
  std::string tok_path, input, key = "text";
  double seconds = 2.0;
  bool no_cache = false;
  CLI::App app{"dsv4-tokenizer-bench: tokenizer throughput on one core"};
  app.add_option("--tokenizer", tok_path, "tokenizer.json")->required()->check(CLI::ExistingFile);
  app.add_option("--input", input, "JSONL or text file")->required()->check(CLI::ExistingFile);
  app.add_option("--text-key", key, "JSONL text field")->capture_default_str();
  app.add_option("--seconds", seconds, "minimum measuring time per phase")->capture_default_str();
  app.add_flag("--no-cache", no_cache, "disable the per-thread word cache");
  CLI11_PARSE(app, argc, argv);
  try {
    Tokenizer tok = Tokenizer::from_file(tok_path);
    if (no_cache) tok.set_cache_capacity(0);
    std::vector<std::string> texts;
    std::ifstream f(input);
    std::string line;
    size_t bytes = 0;
    while (std::getline(f, line)) {
      if (line.empty()) continue;
      auto j = nlohmann::json::parse(line, nullptr, false);
      texts.push_back(j.is_object() && j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : line + "\n");
      bytes += texts.back().size();
    }
    DSV4_CHECK(!texts.empty(), "{}: no text", input);
    using clock = std::chrono::steady_clock;
    size_t n_tokens = 0;
    auto t0 = clock::now();
    std::vector<std::vector<int32_t>> ids;
    for (const auto& t : texts) {
      ids.push_back(tok.encode(t));
      n_tokens += ids.back().size();
    }
    const double cold = std::chrono::duration<double>(clock::now() - t0).count();
    size_t passes = 0, sink = 0;
    t0 = clock::now();
    double el = 0;
    while (el < seconds) {
      for (const auto& t : texts) sink += tok.encode(t).size();
      ++passes;
      el = std::chrono::duration<double>(clock::now() - t0).count();
    }
    const double enc = el / static_cast<double>(passes);
    size_t dpasses = 0, out_bytes = 0;
    t0 = clock::now();
    el = 0;
    while (el < seconds) {
      for (const auto& v : ids) out_bytes += tok.decode(v).size();
      ++dpasses;
      el = std::chrono::duration<double>(clock::now() - t0).count();
    }
    const double dec = el / static_cast<double>(dpasses);
    DSV4_CHECK(sink == passes * n_tokens, "encode results changed between passes");
    std::cout << fmt::format("input: {} texts, {:.1f} kB, {} tokens ({:.2f} bytes/token); tokenizer {} ({} ids)\n",
                             texts.size(), bytes / 1e3, n_tokens, static_cast<double>(bytes) / n_tokens, tok_path,
                             tok.vocab_size());
    std::cout << fmt::format("encode, first pass (empty cache): {:8.2f} MB/s  {:6.2f} M tokens/s\n", bytes / cold / 1e6,
                             n_tokens / cold / 1e6);
    std::cout << fmt::format("encode, steady state{:<13} {:8.2f} MB/s  {:6.2f} M tokens/s  ({} passes)\n",
                             no_cache ? " (no cache):" : ":", bytes / enc / 1e6, n_tokens / enc / 1e6, passes);
    std::cout << fmt::format("decode:                            {:8.2f} MB/s  {:6.2f} M tokens/s  ({} passes)\n",
                             bytes / dec / 1e6, n_tokens / dec / 1e6, dpasses);
    return 0;
  } catch (const dsv4::Error& e) {
    std::cerr << "dsv4-tokenizer-bench: error: " << e.message() << "\n";
    return 1;
  }
}
