// dsv4-prep: tokenise JSONL (plain text or DeepSeek-V4 chat) into HDF5 datasets for training.
//
//   dsv4-prep --tokenizer tokenizer.json --input data.jsonl --format chat|text --output data.h5
//             [--text-key text] [--val-fraction 0.01] [--workers N] [--strict] ...
//
// The HDF5 layout is documented in README.md ("Data pipeline") and src/data/dataset.h.
#include <CLI/CLI.hpp>

#include <iostream>
#include <thread>

#include "data/prep.h"
#include "runtime/error.h"

int main(int argc, char** argv) {
  using namespace dsv4::data;
  PrepOptions o;
  std::string thinking = "chat", mask = "assistant";
  bool no_bos = false, no_eos = false, keep_thinking = false, no_progress = false;
  o.workers = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  CLI::App app{"dsv4-prep: tokenise JSONL into an HDF5 token dataset (see README.md, \"Data pipeline\")"};
  app.add_option("--tokenizer", o.tokenizer_path, "Hugging Face tokenizer.json")->required()->check(CLI::ExistingFile);
  app.add_option("--input", o.input_path, "input JSONL, one record per line")->required()->check(CLI::ExistingFile);
  app.add_option("--output", o.output_path, "output HDF5 file (written atomically)")->required();
  app.add_option("--format", o.format, "text: {\"text\": ...} records; chat: {\"messages\": [...]} in the V4 chat format")
      ->check(CLI::IsMember({"text", "chat"}))
      ->capture_default_str();
  app.add_option("--text-key", o.text_key, "key of the text in --format text records")->capture_default_str();
  app.add_option("--messages-key", o.messages_key, "key of the message list in --format chat records")
      ->capture_default_str();
  app.add_option("--val-fraction", o.val_fraction, "share of records written to a validation file")
      ->check(CLI::Range(0.0, 0.999999))
      ->capture_default_str();
  app.add_option("--val-output", o.val_output_path, "validation file (default: OUTPUT with .h5 -> .val.h5)");
  app.add_option("--seed", o.seed, "seed of the train/validation assignment")->capture_default_str();
  app.add_option("--workers", o.workers, "tokenisation threads")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_flag("--strict", o.strict, "fail on the first bad record instead of skipping it");
  app.add_flag("--no-bos", no_bos, "do not start documents with BOS");
  app.add_flag("--no-eos", no_eos, "do not end text documents with EOS");
  app.add_option("--bos-token", o.tokens.bos, "BOS token string")->capture_default_str();
  app.add_option("--eos-token", o.tokens.eos, "EOS token string")->capture_default_str();
  app.add_option("--thinking", thinking, "chat: default thinking mode of conversations (a record's \"thinking_mode\" "
                 "overrides it)")
      ->check(CLI::IsMember({"chat", "thinking"}))
      ->capture_default_str();
  app.add_flag("--keep-thinking", keep_thinking, "chat: keep the reasoning of turns before the last user message");
  app.add_option("--mask", mask, "chat: loss mask over assistant turns (assistant), the final turn (last), or all "
                 "tokens (all)")
      ->check(CLI::IsMember({"assistant", "last", "all"}))
      ->capture_default_str();
  app.add_option("--vocab-size", o.vocab_limit, "reject records with token ids >= this (default: the tokenizer's)");
  app.add_option("--chunk-tokens", o.chunk_tokens, "HDF5 chunk size in elements")->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--compression", o.compression, "deflate level (0 = none)")->check(CLI::Range(0, 9))
      ->capture_default_str();
  app.add_flag("--progress", o.progress, "show the progress bar even when stderr is not a terminal");
  app.add_flag("--no-progress", no_progress, "never show the progress bar");
  app.add_option("--max-warnings", o.max_warnings, "skipped records reported individually")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  o.add_bos = !no_bos;
  o.add_eos = !no_eos;
  o.chat.add_bos = !no_bos;
  o.chat.drop_thinking = !keep_thinking;
  o.progress_auto = !no_progress;
  if (no_progress) o.progress = false;
  o.created_by = std::string("dsv4-prep ") + DSV4_VERSION;
  install_temp_file_cleanup();
  try {
    o.chat.thinking = parse_thinking_mode(thinking);
    o.chat.mask = parse_mask_policy(mask);
    const PrepStats st = run_prep(o);
    std::cerr << fmt::format("dsv4-prep: {} records from {} ({:.1f} MB in {:.2f} s, {:.1f} MB/s)\n", st.records,
                             o.input_path, st.input_bytes / 1e6, st.seconds,
                             st.seconds > 0 ? st.input_bytes / 1e6 / st.seconds : 0.0);
    std::cerr << fmt::format("dsv4-prep: wrote {}: {} documents, {} tokens\n", st.train.path, st.train_documents,
                             st.train_tokens);
    if (!st.val.path.empty())
      std::cerr << fmt::format("dsv4-prep: wrote {}: {} documents, {} tokens\n", st.val.path, st.val_documents,
                               st.val_tokens);
    return 0;
  } catch (const dsv4::Error& e) {
    std::cerr << "dsv4-prep: error: " << e.message() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "dsv4-prep: error: " << e.what() << "\n";
  }
  return 1;
}
