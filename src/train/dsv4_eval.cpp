// dsv4-eval: loss and perplexity of a model on a dsv4-prep dataset, and/or a greedy or sampled continuation of a
// prompt for a quick look.
//   dsv4-eval --model DIR [--adapter PEFT_DIR] --data FILE.h5 [--seq-len N] [--batch B] [--max-batches K] [--json]
//   dsv4-eval --model DIR --tokenizer tokenizer.json --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S]
// DIR: a dsv4 training run or checkpoint, or a release / transformers checkpoint directory.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <random>

#include "data/loader.h"
#include "data/tokenizer.h"
#include "runtime/cpu_blas.h"
#include "model/peft.h"
#include "train/model_source.h"

namespace {

using namespace dsv4;

struct EvalResult {
  double loss = 0;
  int64_t tokens = 0;
  int64_t batches = 0;
};

EvalResult evaluate(const Model& model, const std::string& path, int64_t seq_len, int64_t batch, int64_t max_batches) {
  data::LoaderOptions o;
  o.sources.push_back({path, 1.0});
  o.seq_len = seq_len;
  o.batch_size = batch;
  o.shuffle = false;
  o.max_epochs = 1;
  data::PackedLoader loader(o);
  DSV4_CHECK(loader.vocab_size() <= model.config().vocab_size,
             "'{}': its tokenizer has {} tokens but the model's vocabulary has {}", path, loader.vocab_size(),
             model.config().vocab_size);
  EvalResult r;
  double sum = 0;
  while (max_batches <= 0 || r.batches < max_batches) {
    std::optional<data::Batch> b = loader.next();
    if (!b) break;
    const LossResult l = model.evaluate(b->input_ids, b->labels, b->layout, LossWeights{0.0, 0.0});
    sum += l.lm * static_cast<double>(l.tokens);
    r.tokens += l.tokens;
    ++r.batches;
  }
  DSV4_CHECK(r.tokens > 0, "'{}': no complete window of {} tokens to evaluate (try a smaller --seq-len)", path, seq_len);
  r.loss = sum / static_cast<double>(r.tokens);
  return r;
}

std::string generate(const Model& model, const data::Tokenizer& tok, const std::string& prompt, int64_t max_new,
                     double temperature, uint64_t seed) {
  std::vector<int32_t> ids = tok.encode(prompt, /*add_special_tokens=*/false);
  DSV4_CHECK(!ids.empty(), "the prompt encodes to no tokens");
  const auto eos = tok.token_to_id("<｜end▁of▁sentence｜>");
  std::mt19937_64 rng(seed);
  std::vector<int32_t> out;
  const int64_t V = model.config().vocab_size;
  for (int64_t i = 0; i < max_new; ++i) {
    std::vector<int64_t> ids64(ids.begin(), ids.end());
    const int64_t T = static_cast<int64_t>(ids64.size());
    const ModelOutput o = model.forward(Tensor::from_vector<int64_t>({T}, ids64), SeqLayout(1, T), nullptr);
    const float* last = o.logits_TV.data<float>() + (T - 1) * V;
    int32_t next = 0;
    if (temperature <= 0) {
      next = static_cast<int32_t>(std::max_element(last, last + V) - last);
    } else {
      std::vector<double> p(static_cast<size_t>(V));
      const double m = *std::max_element(last, last + V);
      for (int64_t v = 0; v < V; ++v) p[static_cast<size_t>(v)] = std::exp((last[v] - m) / temperature);
      std::discrete_distribution<int32_t> pick(p.begin(), p.end());
      next = pick(rng);
    }
    if (eos && next == *eos) break;
    ids.push_back(next);
    out.push_back(next);
  }
  return tok.decode(out, /*skip_special_tokens=*/true);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dsv4-eval: loss / perplexity on a dataset, or a continuation of a prompt"};
  std::string model_dir, adapter_dir, data_path, tokenizer_path, prompt;
  int64_t seq_len = 128, batch = 4, max_batches = 0, max_new = 32;
  double temperature = 0;
  uint64_t seed = 1;
  int threads = 0;
  bool json = false;
  app.add_option("--model", model_dir, "training run / checkpoint, or release / transformers checkpoint")->required();
  app.add_option("--adapter", adapter_dir, "a PEFT LoRA adapter directory to apply over --model");
  app.add_option("--data", data_path, "HDF5 dataset from dsv4-prep");
  app.add_option("--seq-len", seq_len, "tokens per evaluated sequence")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "sequences per forward")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-batches", max_batches, "stop after this many batches (0: the whole file)")->capture_default_str();
  app.add_flag("--json", json, "print one JSON object {loss, ppl, tokens, batches}");
  app.add_option("--tokenizer", tokenizer_path, "tokenizer.json (for --prompt)");
  app.add_option("--prompt", prompt, "text to continue");
  app.add_option("--max-new-tokens", max_new, "tokens to generate")->capture_default_str();
  app.add_option("--temperature", temperature, "0: greedy; > 0: sample")->capture_default_str();
  app.add_option("--seed", seed, "sampling seed")->capture_default_str();
  app.add_option("--threads", threads, "OpenBLAS threads (0: library default)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    DSV4_CHECK(!data_path.empty() || !prompt.empty(), "give --data FILE.h5 and/or --prompt TEXT");
    DSV4_CHECK(prompt.empty() || !tokenizer_path.empty(), "--prompt needs --tokenizer tokenizer.json");
    set_cpu_threads(threads);
    const OpenedModel m = open_model(model_dir);
    if (!json) std::printf("model: %s\n", m.description.c_str());
    if (!adapter_dir.empty()) {
      const int64_t n = load_peft_adapter(*m.model, adapter_dir);
      if (!json) std::printf("adapter: %s (%lld adapters)\n", adapter_dir.c_str(), static_cast<long long>(n));
    }
    if (!data_path.empty()) {
      const EvalResult r = evaluate(*m.model, data_path, seq_len, batch, max_batches);
      if (json)
        std::printf("{\"loss\": %.6f, \"ppl\": %.6f, \"tokens\": %lld, \"batches\": %lld}\n", r.loss, std::exp(r.loss),
                    static_cast<long long>(r.tokens), static_cast<long long>(r.batches));
      else
        std::printf("%s: loss %.4f nats/token, perplexity %.2f, %lld tokens in %lld batches\n", data_path.c_str(),
                    r.loss, std::exp(r.loss), static_cast<long long>(r.tokens), static_cast<long long>(r.batches));
    }
    if (!prompt.empty()) {
      const data::Tokenizer tok = data::Tokenizer::from_file(tokenizer_path);
      const std::string text = generate(*m.model, tok, prompt, max_new, temperature, seed);
      if (json) std::fprintf(stderr, "%s%s\n", prompt.c_str(), text.c_str());
      else std::printf("%s%s\n", prompt.c_str(), text.c_str());
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "dsv4-eval: error: %s\n", e.message().c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv4-eval: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
