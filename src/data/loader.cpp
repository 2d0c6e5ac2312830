#include "data/loader.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "data/dataset.h"
#include "model/embedding.h"
#include "runtime/error.h"

namespace dsv4::data {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// xoshiro256** (Blackman & Vigna), seeded through splitmix64; platform-independent unlike <random>'s
// distributions.
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (auto& v : s_) v = seed = splitmix64(seed);
  }
  uint64_t next() {
    const uint64_t r = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return r;
  }
  // Uniform in [0, n) without modulo bias (Lemire's multiply-shift with rejection).
  uint64_t below(uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
    uint64_t lo = static_cast<uint64_t>(m);
    if (lo < n) {
      const uint64_t threshold = (0 - n) % n;
      while (lo < threshold) {
        m = static_cast<unsigned __int128>(next()) * n;
        lo = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

struct EpochOrder {
  int64_t epoch = -1;
  std::vector<int64_t> perm;    // documents in stream order
  std::vector<int64_t> prefix;  // stream offset of each of them, + total
};

struct Source {
  DatasetReader reader;
  DatasetInfo info;
  int64_t windows = 0;  // per epoch
  EpochOrder cache[2];
  int next_slot = 0;

  explicit Source(const std::string& path) : reader(path), info(reader.info()) {}

  const EpochOrder& order(int64_t epoch, uint64_t seed, size_t index, bool shuffle) {
    for (const EpochOrder& o : cache)
      if (o.epoch == epoch) return o;
    EpochOrder& o = cache[next_slot];
    next_slot ^= 1;
    const std::vector<int64_t>& off = reader.doc_offsets();
    const int64_t d = reader.num_documents();
    o.epoch = epoch;
    o.perm.resize(static_cast<size_t>(d));
    std::iota(o.perm.begin(), o.perm.end(), int64_t{0});
    if (shuffle) {
      Rng rng(splitmix64(seed ^ splitmix64(0x5EED0000ull + index) ^ splitmix64(static_cast<uint64_t>(epoch) << 20)));
      for (int64_t i = d - 1; i > 0; --i)
        std::swap(o.perm[static_cast<size_t>(i)], o.perm[rng.below(static_cast<uint64_t>(i) + 1)]);
    }
    o.prefix.resize(static_cast<size_t>(d) + 1);
    o.prefix[0] = 0;
    for (int64_t i = 0; i < d; ++i) {
      const int64_t doc = o.perm[static_cast<size_t>(i)];
      o.prefix[static_cast<size_t>(i) + 1] =
          o.prefix[static_cast<size_t>(i)] + off[static_cast<size_t>(doc) + 1] - off[static_cast<size_t>(doc)];
    }
    return o;
  }
};

}  // namespace

std::string LoaderState::to_json() const {
  nlohmann::json j;
  j["format"] = "dsv4-loader-state";
  j["version"] = 1;
  j["seed"] = seed;
  j["seq_len"] = seq_len;
  j["global_rows"] = global_rows;
  j["source_rows"] = source_rows;
  j["source_tokenizer_sha256"] = source_sha;
  return j.dump();
}

LoaderState LoaderState::from_json(const std::string& text) {
  LoaderState s;
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    DSV4_CHECK(j.value("format", "") == "dsv4-loader-state", "loader state: missing \"format\": \"dsv4-loader-state\"");
    DSV4_CHECK(j.value("version", 0) == 1, "loader state: version {} is not supported", j.value("version", 0));
    s.seed = j.at("seed").get<uint64_t>();
    s.seq_len = j.at("seq_len").get<int64_t>();
    s.global_rows = j.at("global_rows").get<int64_t>();
    s.source_rows = j.at("source_rows").get<std::vector<int64_t>>();
    s.source_sha = j.at("source_tokenizer_sha256").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    DSV4_FAIL("loader state: malformed JSON: {}", e.what());
  }
  DSV4_CHECK(s.source_rows.size() == s.source_sha.size() && s.global_rows >= 0,
             "loader state: inconsistent source lists or negative row count");
  return s;
}

struct PackedLoader::Impl {
  LoaderOptions o;
  std::vector<Source> src;
  std::vector<DatasetInfo> infos;
  std::vector<double> cum;  // cumulative normalised weights
  int64_t global_rows = 0;
  std::vector<int64_t> source_rows;

  size_t choose(int64_t g) const {
    if (src.size() == 1) return 0;
    const uint64_t h = splitmix64(o.seed ^ splitmix64(0xC0FFEEull ^ static_cast<uint64_t>(g)));
    const double u = static_cast<double>(h >> 11) * 0x1.0p-53;
    for (size_t j = 0; j + 1 < cum.size(); ++j)
      if (u < cum[j]) return j;
    return cum.size() - 1;
  }

  // Fills window w of epoch e of source j: S + 1 tokens, their mask, and whether a document starts there.
  void fill(size_t j, int64_t epoch, int64_t w, int32_t* tok, uint8_t* mask, uint8_t* starts) {
    Source& s = src[j];
    const int64_t S = o.seq_len;
    const EpochOrder& ord = s.order(epoch, o.seed, j, o.shuffle);
    const std::vector<int64_t>& off = s.reader.doc_offsets();
    const int64_t pos = w * S;
    size_t k = static_cast<size_t>(std::upper_bound(ord.prefix.begin(), ord.prefix.end(), pos) - ord.prefix.begin()) - 1;
    int64_t i = 0;
    while (i < S + 1) {
      DSV4_CHECK(k < ord.perm.size(), "{}: window {} of epoch {} runs past the stream", s.info.path, w, epoch);
      const int64_t doc = ord.perm[k];
      const int64_t len = ord.prefix[k + 1] - ord.prefix[k];
      const int64_t in_doc = pos + i - ord.prefix[k];
      if (len == 0 || in_doc >= len) {
        ++k;
        continue;
      }
      const int64_t take = std::min(len - in_doc, S + 1 - i);
      const int64_t begin = off[static_cast<size_t>(doc)] + in_doc;
      s.reader.read_tokens(begin, begin + take, tok + i);
      if (s.info.has_loss_mask && o.use_loss_mask)
        s.reader.read_mask(begin, begin + take, mask + i);
      else
        std::fill(mask + i, mask + i + take, uint8_t{1});
      std::fill(starts + i, starts + i + take, uint8_t{0});
      starts[i] = in_doc == 0;
      i += take;
      ++k;
    }
  }
};

PackedLoader::PackedLoader(LoaderOptions opts) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.o = std::move(opts);
  const LoaderOptions& o = m.o;
  DSV4_CHECK(!o.sources.empty(), "loader: no data sources");
  DSV4_CHECK(o.seq_len > 0, "loader: seq_len must be positive, got {}", o.seq_len);
  DSV4_CHECK(o.batch_size > 0, "loader: batch_size must be positive, got {}", o.batch_size);
  DSV4_CHECK(o.world > 0 && o.rank >= 0 && o.rank < o.world, "loader: rank {} is not in [0, world = {})", o.rank,
             o.world);
  DSV4_CHECK(o.max_epochs >= 0, "loader: max_epochs must be >= 0");
  double total = 0;
  for (const LoaderSource& s : o.sources) {
    DSV4_CHECK(std::isfinite(s.weight) && s.weight > 0, "loader: {}: mixture weight {} must be positive", s.path,
               s.weight);
    total += s.weight;
  }
  for (const LoaderSource& s : o.sources) {
    m.src.emplace_back(s.path);
    Source& src = m.src.back();
    const DatasetInfo& in = src.info;
    const DatasetInfo& first = m.src.front().info;
    DSV4_CHECK(in.tokenizer_sha256 == first.tokenizer_sha256 && in.vocab_size == first.vocab_size,
               "loader: {} was tokenised with tokenizer sha256 {} (vocab {}) but {} with {} (vocab {}); all sources "
               "must share one tokenizer",
               in.path, in.tokenizer_sha256, in.vocab_size, first.path, first.tokenizer_sha256, first.vocab_size);
    src.windows = in.num_tokens > 0 ? (in.num_tokens - 1) / o.seq_len : 0;
    DSV4_CHECK(src.windows > 0, "loader: {} has {} tokens, fewer than one row of seq_len + 1 = {}", in.path,
               in.num_tokens, o.seq_len + 1);
    const int64_t bytes = in.num_tokens * (4 + (in.has_loss_mask ? 1 : 0));
    if (bytes <= o.preload_max_bytes) src.reader.preload();
    m.infos.push_back(in);
    m.cum.push_back((m.cum.empty() ? 0.0 : m.cum.back()) + s.weight / total);
  }
  m.source_rows.assign(m.src.size(), 0);
}

PackedLoader::~PackedLoader() = default;
PackedLoader::PackedLoader(PackedLoader&&) noexcept = default;
PackedLoader& PackedLoader::operator=(PackedLoader&&) noexcept = default;

std::optional<Batch> PackedLoader::next() {
  Impl& m = *impl_;
  const LoaderOptions& o = m.o;
  const int64_t B = o.batch_size, S = o.seq_len, G = B * o.world;
  std::vector<int64_t> counts = m.source_rows;
  std::vector<std::pair<size_t, int64_t>> mine;  // (source, window index in the source's stream)
  for (int64_t i = 0; i < G; ++i) {
    const size_t j = m.choose(m.global_rows + i);
    const int64_t k = counts[j]++;
    if (o.max_epochs > 0 && k >= m.src[j].windows * o.max_epochs) return std::nullopt;
    if (i >= o.rank * B && i < (o.rank + 1) * B) mine.emplace_back(j, k);
  }

  Batch b;
  b.rows = B;
  b.seq_len = S;
  b.step = m.global_rows / G;
  const int64_t T = B * S;
  b.input_ids = Tensor::empty(Shape{T}, DType::I64);
  b.labels = Tensor::empty(Shape{T}, DType::I64);
  b.targets = Tensor::empty(Shape{T}, DType::I64);
  b.loss_mask = Tensor::empty(Shape{T}, DType::U8);
  b.layout = SeqLayout(B, S);
  b.layout.doc_start.resize(static_cast<size_t>(T));
  int64_t* ids = b.input_ids.data<int64_t>();
  int64_t* labels = b.labels.data<int64_t>();
  int64_t* targets = b.targets.data<int64_t>();
  uint8_t* lmask = b.loss_mask.data<uint8_t>();
  std::vector<int32_t> tok(static_cast<size_t>(S) + 1);
  std::vector<uint8_t> mask(static_cast<size_t>(S) + 1), starts(static_cast<size_t>(S) + 1);
  std::vector<int64_t> label_ext(static_cast<size_t>(S) + 1);
  for (int64_t r = 0; r < B; ++r) {
    const auto [j, k] = mine[static_cast<size_t>(r)];
    const int64_t W = m.src[j].windows;
    m.fill(j, k / W, k % W, tok.data(), mask.data(), starts.data());
    b.row_source.push_back(static_cast<int32_t>(j));
    for (int64_t i = 0; i <= S; ++i) {
      const bool drop = (o.mask_document_starts && starts[static_cast<size_t>(i)]) || !mask[static_cast<size_t>(i)];
      label_ext[static_cast<size_t>(i)] = drop ? kIgnoreIndex : tok[static_cast<size_t>(i)];
    }
    int64_t doc_begin = 0;
    for (int64_t s = 0; s < S; ++s) {
      const size_t t = static_cast<size_t>(r * S + s);
      if (starts[static_cast<size_t>(s)]) doc_begin = s;
      ids[t] = tok[static_cast<size_t>(s)];
      labels[t] = label_ext[static_cast<size_t>(s)];
      targets[t] = label_ext[static_cast<size_t>(s) + 1];
      lmask[t] = labels[t] != kIgnoreIndex;
      b.layout.doc_start[t] = doc_begin;
      if (s + 1 < S && label_ext[static_cast<size_t>(s) + 1] != kIgnoreIndex) ++b.target_count;
    }
  }
  m.global_rows += G;
  m.source_rows = std::move(counts);
  return b;
}

LoaderState PackedLoader::state() const {
  const Impl& m = *impl_;
  LoaderState s;
  s.seed = m.o.seed;
  s.seq_len = m.o.seq_len;
  s.global_rows = m.global_rows;
  s.source_rows = m.source_rows;
  for (const DatasetInfo& in : m.infos) s.source_sha.push_back(in.tokenizer_sha256);
  return s;
}

void PackedLoader::restore(const LoaderState& s) {
  Impl& m = *impl_;
  DSV4_CHECK(s.seed == m.o.seed, "loader: the saved state has seed {} but this loader seed {}", s.seed, m.o.seed);
  DSV4_CHECK(s.seq_len == m.o.seq_len, "loader: the saved state has seq_len {} but this loader {}", s.seq_len,
             m.o.seq_len);
  DSV4_CHECK(s.source_rows.size() == m.src.size(), "loader: the saved state has {} sources but this loader {}",
             s.source_rows.size(), m.src.size());
  for (size_t j = 0; j < m.src.size(); ++j)
    DSV4_CHECK(s.source_sha[j] == m.infos[j].tokenizer_sha256,
               "loader: source {} ({}) has tokenizer sha256 {} but the saved state {}", j, m.infos[j].path,
               m.infos[j].tokenizer_sha256, s.source_sha[j]);
  int64_t sum = 0;
  for (int64_t r : s.source_rows) sum += r;
  DSV4_CHECK(sum == s.global_rows, "loader: the saved state's per-source rows sum to {} but global_rows is {}", sum,
             s.global_rows);
  m.global_rows = s.global_rows;
  m.source_rows = s.source_rows;
}

const std::vector<DatasetInfo>& PackedLoader::sources() const { return impl_->infos; }
int64_t PackedLoader::windows_per_epoch(size_t source) const { return impl_->src.at(source).windows; }
int64_t PackedLoader::vocab_size() const { return impl_->infos.front().vocab_size; }
const std::string& PackedLoader::tokenizer_sha256() const { return impl_->infos.front().tokenizer_sha256; }

}  // namespace dsv4::data
