#include "data/tokenizer.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <deque>
#include <functional>
#include <fstream>
#include <limits>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "data/regex.h"
#include "data/sha256.h"
#include "runtime/error.h"

namespace dsv4::data {
namespace {
using json = nlohmann::json;

// ---- UTF-8 helpers ------------------------------------------------------------------------------------
void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Code point at s[i] (valid UTF-8 assumed); advances i.
uint32_t next_cp(std::string_view s, size_t& i) {
  const auto b = static_cast<uint8_t>(s[i]);
  const size_t n = utf8_len(b);
  uint32_t cp = n == 1 ? b : n == 2 ? (b & 0x1F) : n == 3 ? (b & 0x0F) : (b & 0x07);
  for (size_t k = 1; k < n && i + k < s.size(); ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

// Code point ending at s[end) (valid UTF-8 assumed).
uint32_t prev_cp(std::string_view s, size_t end) {
  size_t b = end - 1;
  while (b > 0 && (static_cast<uint8_t>(s[b]) & 0xC0) == 0x80) --b;
  return next_cp(s, b);
}

// ---- GPT-2 byte-level alphabet ------------------------------------------------------------------------
struct ByteAlphabet {
  uint32_t cp[256];                            // byte -> code point
  std::string utf8[256];                       // byte -> UTF-8 of that code point
  std::unordered_map<uint32_t, uint8_t> back;  // code point -> byte
  ByteAlphabet() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    bool direct[256] = {};
    for (int b : bs) direct[b] = true;
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) cp[b] = direct[b] ? static_cast<uint32_t>(b) : 256 + n++;
    for (int b = 0; b < 256; ++b) {
      append_utf8(utf8[b], cp[b]);
      back[cp[b]] = static_cast<uint8_t>(b);
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

// Bytes that the ByteLevel decoder emits for a token string: the inverse byte mapping when every character
// belongs to the alphabet, else the token's own UTF-8 (as the library does).
std::string byte_level_decode(std::string_view token) {
  const ByteAlphabet& a = byte_alphabet();
  std::string out;
  for (size_t i = 0; i < token.size();) {
    auto it = a.back.find(next_cp(token, i));
    if (it == a.back.end()) return std::string(token);
    out += static_cast<char>(it->second);
  }
  return out;
}

// ---- merges: (left id, right id) -> (rank, merged id), open addressing ---------------------------------
class PairMap {
 public:
  struct Val {
    uint32_t rank;
    int32_t id;
  };
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n + 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, Val{0, 0});
    mask_ = cap - 1;
    size_ = 0;
  }
  void insert_or_assign(int32_t a, int32_t b, Val v) {
    if (keys_.empty() || 2 * (size_ + 1) > keys_.size()) grow();
    const uint64_t k = key(a, b);
    size_t i = slot(k);
    while (keys_[i] != kEmpty && keys_[i] != k) i = (i + 1) & mask_;
    if (keys_[i] == kEmpty) ++size_;
    keys_[i] = k;
    vals_[i] = v;
  }
  const Val* find(int32_t a, int32_t b) const {
    if (keys_.empty()) return nullptr;
    const uint64_t k = key(a, b);
    for (size_t i = slot(k);; i = (i + 1) & mask_) {
      if (keys_[i] == k) return &vals_[i];
      if (keys_[i] == kEmpty) return nullptr;
    }
  }
  size_t size() const { return size_; }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  size_t slot(uint64_t k) const { return static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> 20) & mask_; }
  void grow() {
    std::vector<uint64_t> ok = std::move(keys_);
    std::vector<Val> ov = std::move(vals_);
    reserve(std::max<size_t>(16, ok.size()));
    for (size_t i = 0; i < ok.size(); ++i)
      if (ok[i] != kEmpty) insert_or_assign(static_cast<int32_t>(ok[i] >> 32), static_cast<int32_t>(ok[i]), ov[i]);
  }
  std::vector<uint64_t> keys_;
  std::vector<Val> vals_;
  size_t mask_ = 0, size_ = 0;
};

// ---- added tokens: byte trie, leftmost-longest ---------------------------------------------------------
class Trie {
 public:
  Trie() { nodes_.emplace_back(); }
  bool empty() const { return nodes_.size() == 1; }
  void insert(std::string_view s, int32_t value) {
    int32_t n = 0;
    for (char ch : s) {
      const auto c = static_cast<uint8_t>(ch);
      int32_t nx = child(n, c);
      if (nx < 0) {
        nx = static_cast<int32_t>(nodes_.size());
        nodes_[static_cast<size_t>(n)].next.emplace_back(c, nx);
        nodes_.emplace_back();
      }
      n = nx;
    }
    nodes_[static_cast<size_t>(n)].value = value;
    first_[static_cast<uint8_t>(s[0])] = true;
  }
  // Length of the longest entry starting at text[pos] (0 if none); its value in `value`.
  size_t longest_at(std::string_view text, size_t pos, int32_t& value) const {
    if (!first_[static_cast<uint8_t>(text[pos])]) return 0;
    size_t best = 0;
    int32_t n = 0;
    for (size_t i = pos; i < text.size(); ++i) {
      n = child(n, static_cast<uint8_t>(text[i]));
      if (n < 0) break;
      if (nodes_[static_cast<size_t>(n)].value >= 0) {
        best = i + 1 - pos;
        value = nodes_[static_cast<size_t>(n)].value;
      }
    }
    return best;
  }

 private:
  struct Node {
    int32_t value = -1;
    std::vector<std::pair<uint8_t, int32_t>> next;
  };
  int32_t child(int32_t n, uint8_t c) const {
    for (const auto& [k, v] : nodes_[static_cast<size_t>(n)].next)
      if (k == c) return v;
    return -1;
  }
  std::vector<Node> nodes_;
  bool first_[256] = {};
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  std::shared_ptr<const Regex> re;  // the Split pattern, or the GPT-2 regex of ByteLevel(use_regex)
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;
};

// A pre-tokenizer piece: bytes (a view of the input, or of an arena string when a prefix space was added) and
// the input offset it starts at. `prefixed`: the first byte is the added space, not part of the input.
struct Piece {
  std::string_view text;
  uint32_t orig = 0;
  bool prefixed = false;
  uint32_t orig_at(size_t k) const {
    return orig + static_cast<uint32_t>(prefixed ? (k > 0 ? k - 1 : 0) : k);
  }
};

struct Segment {  // a run of input text, or an extracted added token
  uint32_t start = 0, end = 0;
  int32_t token = -1;  // index into Impl::added, or -1 for text
};

struct Sym {
  int32_t id;
  uint32_t len;  // input bytes covered
};

struct CachedWord {
  std::vector<int32_t> ids;
  std::vector<uint32_t> lens;
};

struct StringHash {  // lets the cache be probed with a string_view (no allocation on hits)
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

struct WordCache {
  uint64_t owner = 0;
  std::unordered_map<std::string, CachedWord, StringHash, std::equal_to<>> map;
};
WordCache& word_cache() {
  thread_local WordCache c;
  return c;
}

std::atomic<uint64_t> g_next_uid{1};

// ---- JSON access with the key path in errors -----------------------------------------------------------
struct JsonCtx {
  const std::string& file;
  const json& at(const json& j, const std::string& path, const char* key) const {
    DSV4_CHECK(j.is_object(), "{}: {} must be an object", file, path.empty() ? "<root>" : path);
    auto it = j.find(key);
    DSV4_CHECK(it != j.end(), "{}: missing key {}", file, join(path, key));
    return *it;
  }
  static std::string join(const std::string& path, const char* key) {
    return path.empty() ? std::string(key) : path + "." + key;
  }
  bool boolean(const json& j, const std::string& path, const char* key, bool def) const {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return def;
    DSV4_CHECK(it->is_boolean(), "{}: {} must be true or false", file, join(path, key));
    return it->get<bool>();
  }
  std::string str(const json& j, const std::string& path, const char* key) const {
    const json& v = at(j, path, key);
    DSV4_CHECK(v.is_string(), "{}: {} must be a string", file, join(path, key));
    return v.get<std::string>();
  }
  std::optional<std::string> opt_str(const json& j, const std::string& path, const char* key) const {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return std::nullopt;
    DSV4_CHECK(it->is_string(), "{}: {} must be a string or null", file, join(path, key));
    return it->get<std::string>();
  }
  int32_t id(const json& v, const std::string& path) const {
    DSV4_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < std::numeric_limits<int32_t>::max(),
               "{}: {} must be a non-negative 32-bit integer id", file, path);
    return static_cast<int32_t>(v.get<int64_t>());
  }
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  DSV4_CHECK(f.good(), "{}: cannot open tokenizer file", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  DSV4_CHECK(!f.bad(), "{}: read error", path);
  return ss.str();
}

const char* kGpt2Regex = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace

// =========================================================================================================
struct Tokenizer::Impl {
  std::string source, sha;
  uint64_t uid = 0;
  size_t cache_capacity = 16384;

  // model (BPE)
  std::unordered_map<std::string, int32_t> vocab;
  PairMap merges;
  std::optional<int32_t> unk_id;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::string cont_prefix, eow_suffix;
  bool byte_level = false;  // words reach the model mapped to the byte-level alphabet
  bool byte_fast = false;   // ... and BPE can run on raw bytes (no subword prefix/suffix)
  int32_t byte_id[256];
  std::unordered_map<std::string, int32_t> byte_vocab;  // raw bytes -> id, for ignore_merges on raw bytes

  // added tokens
  std::vector<AddedTokenSpec> added;
  std::unordered_map<std::string, int32_t> added_ids;  // content -> id
  Trie raw_trie, norm_trie;                            // values index `added`
  std::unique_ptr<Regex> word_char;

  // pipeline
  std::vector<PreStep> pre;
  struct TemplateItem {
    bool sequence = false;
    std::vector<int32_t> ids;
  };
  std::vector<std::vector<TemplateItem>> templates;  // applied in order when add_special_tokens
  bool byte_level_decoder = false;

  // per id
  int64_t n_ids = 0;
  std::vector<uint8_t> id_known, id_special;
  std::vector<std::string> id_token;   // the token string (added content first)
  std::vector<std::string> id_decoded; // what the decoder emits for it (ByteLevel) -- else == id_token

  void load(const json& j);
  void load_model(const JsonCtx& c, const json& m);
  void load_added(const JsonCtx& c, const json& a);
  void load_pre(const JsonCtx& c, const json& p, const std::string& path);
  void load_post(const JsonCtx& c, const json& p, const std::string& path);
  void finish();

  void split_added(std::string_view text, std::vector<Segment>& segs) const;
  void find_added(std::string_view text, uint32_t base, const Trie& trie, std::vector<Segment>& out) const;
  void pre_tokenize(std::string_view text, uint32_t base, std::deque<std::string>& arena,
                    std::vector<Piece>& pieces) const;
  void bpe(const Piece& piece, std::vector<int32_t>& ids, std::vector<std::pair<uint32_t, uint32_t>>* offsets) const;
  void word_symbols(std::string_view text, std::vector<Sym>& syms) const;
  void merge_all(std::vector<Sym>& syms) const;
  void encode(std::string_view text, bool add_special, std::vector<int32_t>& ids,
              std::vector<std::pair<uint32_t, uint32_t>>* offsets) const;
};

void Tokenizer::Impl::load(const json& j) {
  const JsonCtx c{source};
  DSV4_CHECK(j.is_object(), "{}: the top level must be a JSON object", source);
  for (const char* k : {"truncation", "padding"}) {
    auto it = j.find(k);
    DSV4_CHECK(it == j.end() || it->is_null(), "{}: {} is not supported (set it to null)", source, k);
  }
  if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) {
    const std::string type = c.str(*it, "normalizer", "type");
    const bool identity = type == "Sequence" && it->contains("normalizers") && (*it)["normalizers"].is_array() &&
                          (*it)["normalizers"].empty();
    DSV4_CHECK(identity, "{}: normalizer.type {:?} is not supported (only null or an empty Sequence)", source, type);
  }
  load_model(c, c.at(j, "", "model"));
  if (auto it = j.find("pre_tokenizer"); it != j.end() && !it->is_null()) load_pre(c, *it, "pre_tokenizer");
  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) load_added(c, *it);
  if (auto it = j.find("post_processor"); it != j.end() && !it->is_null()) load_post(c, *it, "post_processor");
  if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
    std::function<void(const json&, const std::string&)> dec = [&](const json& d, const std::string& path) {
      const std::string type = c.str(d, path, "type");
      if (type == "ByteLevel") {
        byte_level_decoder = true;
      } else if (type == "Sequence") {
        const json& ds = c.at(d, path, "decoders");
        DSV4_CHECK(ds.is_array(), "{}: {}.decoders must be an array", source, path);
        for (size_t i = 0; i < ds.size(); ++i) dec(ds[i], fmt::format("{}.decoders[{}]", path, i));
      } else {
        DSV4_FAIL("{}: {}.type {:?} is not supported (ByteLevel, Sequence or null)", source, path, type);
      }
    };
    dec(*it, "decoder");
  }
  finish();
}

void Tokenizer::Impl::load_model(const JsonCtx& c, const json& m) {
  if (auto it = m.find("type"); it != m.end())
    DSV4_CHECK(it->is_string() && it->get<std::string>() == "BPE", "{}: model.type {} is not supported (only BPE)",
               source, it->dump());
  if (auto it = m.find("dropout"); it != m.end() && !it->is_null())
    DSV4_CHECK(it->is_number() && it->get<double>() == 0.0,
               "{}: model.dropout {} is not supported (BPE dropout makes encoding random)", source, it->dump());
  const json& v = c.at(m, "model", "vocab");
  DSV4_CHECK(v.is_object(), "{}: model.vocab must be an object", source);
  vocab.reserve(v.size());
  for (auto it = v.begin(); it != v.end(); ++it) vocab[it.key()] = c.id(it.value(), "model.vocab[" + it.key() + "]");
  if (auto u = c.opt_str(m, "model", "unk_token")) {
    auto it = vocab.find(*u);
    DSV4_CHECK(it != vocab.end(), "{}: model.unk_token {:?} is not in model.vocab", source, *u);
    unk_id = it->second;
  }
  fuse_unk = c.boolean(m, "model", "fuse_unk", false);
  byte_fallback = c.boolean(m, "model", "byte_fallback", false);
  ignore_merges = c.boolean(m, "model", "ignore_merges", false);
  cont_prefix = c.opt_str(m, "model", "continuing_subword_prefix").value_or("");
  eow_suffix = c.opt_str(m, "model", "end_of_word_suffix").value_or("");

  const json& mg = c.at(m, "model", "merges");
  DSV4_CHECK(mg.is_array(), "{}: model.merges must be an array", source);
  merges.reserve(mg.size());
  for (size_t i = 0; i < mg.size(); ++i) {
    std::string a, b;
    const json& e = mg[i];
    if (e.is_string()) {
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ');
      DSV4_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos,
                 "{}: model.merges[{}] {:?} must be two tokens separated by one space", source, i, s);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      DSV4_CHECK(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string(),
                 "{}: model.merges[{}] must be \"a b\" or [\"a\", \"b\"]", source, i);
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    }
    auto ia = vocab.find(a), ib = vocab.find(b);
    DSV4_CHECK(ia != vocab.end(), "{}: model.merges[{}]: token {:?} is not in model.vocab", source, i, a);
    DSV4_CHECK(ib != vocab.end(), "{}: model.merges[{}]: token {:?} is not in model.vocab", source, i, b);
    std::string merged = a;
    if (!cont_prefix.empty() && b.compare(0, cont_prefix.size(), cont_prefix) == 0)
      merged += b.substr(cont_prefix.size());
    else
      merged += b;
    auto im = vocab.find(merged);
    DSV4_CHECK(im != vocab.end(), "{}: model.merges[{}]: merged token {:?} is not in model.vocab", source, i, merged);
    merges.insert_or_assign(ia->second, ib->second, PairMap::Val{static_cast<uint32_t>(i), im->second});
  }
}

void Tokenizer::Impl::load_added(const JsonCtx& c, const json& a) {
  DSV4_CHECK(a.is_array(), "{}: added_tokens must be an array", source);
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string path = fmt::format("added_tokens[{}]", i);
    AddedTokenSpec t;
    t.id = c.id(c.at(a[i], path, "id"), path + ".id");
    t.content = c.str(a[i], path, "content");
    t.single_word = c.boolean(a[i], path, "single_word", false);
    t.lstrip = c.boolean(a[i], path, "lstrip", false);
    t.rstrip = c.boolean(a[i], path, "rstrip", false);
    t.normalized = c.boolean(a[i], path, "normalized", !c.boolean(a[i], path, "special", false));
    t.special = c.boolean(a[i], path, "special", false);
    if (t.content.empty()) continue;  // ignored by the library too
    DSV4_CHECK(find_invalid_utf8(t.content) == std::string::npos, "{}: {}.content is not valid UTF-8", source, path);
    added_ids[t.content] = t.id;
    added.push_back(std::move(t));
  }
  // Later entries with the same content override earlier ones in the library's maps; the tries keep the last.
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedTokenSpec& t = added[i];
    if (added_ids[t.content] != t.id) continue;
    (t.normalized ? norm_trie : raw_trie).insert(t.content, static_cast<int32_t>(i));
    if (t.single_word && !word_char)
      word_char = std::make_unique<Regex>(R"([\p{L}\p{Nl}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])", source + ": \\w");
  }
}

void Tokenizer::Impl::load_pre(const JsonCtx& c, const json& p, const std::string& path) {
  const std::string type = c.str(p, path, "type");
  DSV4_CHECK(pre.empty() || pre.back().kind != PreStep::Kind::kByteLevel,
             "{}: {}: a pre-tokenizer after ByteLevel is not supported", source, path);
  if (type == "Sequence") {
    const json& seq = c.at(p, path, "pretokenizers");
    DSV4_CHECK(seq.is_array(), "{}: {}.pretokenizers must be an array", source, path);
    for (size_t i = 0; i < seq.size(); ++i) load_pre(c, seq[i], fmt::format("{}.pretokenizers[{}]", path, i));
    return;
  }
  PreStep s;
  if (type == "Split") {
    const json& pat = c.at(p, path, "pattern");
    const std::string where = fmt::format("{}: {}.pattern", source, path);
    if (pat.contains("Regex")) {
      s.re = std::make_shared<Regex>(c.str(pat, path + ".pattern", "Regex"), where);
    } else {
      s.re = std::make_shared<Regex>(Regex::literal(c.str(pat, path + ".pattern", "String"), where));
    }
    const std::string b = c.str(p, path, "behavior");
    if (b == "Removed") s.behavior = Behavior::kRemoved;
    else if (b == "Isolated") s.behavior = Behavior::kIsolated;
    else if (b == "MergedWithPrevious") s.behavior = Behavior::kMergedWithPrevious;
    else if (b == "MergedWithNext") s.behavior = Behavior::kMergedWithNext;
    else if (b == "Contiguous") s.behavior = Behavior::kContiguous;
    else DSV4_FAIL("{}: {}.behavior {:?} is not a known split behaviour", source, path, b);
    s.invert = c.boolean(p, path, "invert", false);
  } else if (type == "Digits") {
    s.re = std::make_shared<Regex>(R"(\p{N})", source + ": " + path);
    s.behavior = c.boolean(p, path, "individual_digits", false) ? Behavior::kIsolated : Behavior::kContiguous;
  } else if (type == "ByteLevel") {
    s.kind = PreStep::Kind::kByteLevel;
    s.add_prefix_space = c.boolean(p, path, "add_prefix_space", true);
    if (c.boolean(p, path, "use_regex", true)) s.re = std::make_shared<Regex>(kGpt2Regex, source + ": " + path);
    byte_level = true;
  } else {
    DSV4_FAIL("{}: {}.type {:?} is not supported (Split, Digits, ByteLevel, Sequence)", source, path, type);
  }
  pre.push_back(std::move(s));
}

void Tokenizer::Impl::load_post(const JsonCtx& c, const json& p, const std::string& path) {
  const std::string type = c.str(p, path, "type");
  if (type == "ByteLevel") return;  // offsets only
  if (type == "Sequence") {
    const json& seq = c.at(p, path, "processors");
    DSV4_CHECK(seq.is_array(), "{}: {}.processors must be an array", source, path);
    for (size_t i = 0; i < seq.size(); ++i) load_post(c, seq[i], fmt::format("{}.processors[{}]", path, i));
    return;
  }
  DSV4_CHECK(type == "TemplateProcessing", "{}: {}.type {:?} is not supported (TemplateProcessing, ByteLevel, "
             "Sequence)", source, path, type);
  const json& single = c.at(p, path, "single");
  const json& specials = c.at(p, path, "special_tokens");
  DSV4_CHECK(single.is_array(), "{}: {}.single must be an array", source, path);
  std::vector<TemplateItem> items;
  for (size_t i = 0; i < single.size(); ++i) {
    const std::string ipath = fmt::format("{}.single[{}]", path, i);
    TemplateItem item;
    if (single[i].contains("Sequence")) {
      const std::string id = c.str(single[i]["Sequence"], ipath + ".Sequence", "id");
      DSV4_CHECK(id == "A", "{}: {}: only sequence A is supported in single templates", source, ipath);
      item.sequence = true;
    } else {
      const std::string name = c.str(c.at(single[i], ipath, "SpecialToken"), ipath + ".SpecialToken", "id");
      const json& st = c.at(specials, path + ".special_tokens", name.c_str());
      const json& ids = c.at(st, path + ".special_tokens." + name, "ids");
      DSV4_CHECK(ids.is_array(), "{}: {}.special_tokens.{}.ids must be an array", source, path, name);
      for (const json& v : ids) item.ids.push_back(c.id(v, path + ".special_tokens." + name + ".ids"));
    }
    items.push_back(std::move(item));
  }
  templates.push_back(std::move(items));
}

void Tokenizer::Impl::finish() {
  byte_fast = byte_level && cont_prefix.empty() && eow_suffix.empty();
  const ByteAlphabet& alpha = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    auto it = vocab.find(alpha.utf8[b]);
    byte_id[b] = it == vocab.end() ? -1 : it->second;
  }
  if (byte_fast && ignore_merges) {
    for (const auto& [tok, id] : vocab) {
      std::string raw;
      bool ok = true;
      for (size_t i = 0; i < tok.size() && ok;) {
        auto it = alpha.back.find(next_cp(tok, i));
        ok = it != alpha.back.end();
        if (ok) raw += static_cast<char>(it->second);
      }
      if (ok) byte_vocab.emplace(std::move(raw), id);
    }
  }
  int64_t max_id = -1;
  for (const auto& [tok, id] : vocab) max_id = std::max<int64_t>(max_id, id);
  for (const auto& t : added) max_id = std::max<int64_t>(max_id, t.id);
  n_ids = max_id + 1;
  id_known.assign(static_cast<size_t>(n_ids), 0);
  id_special.assign(static_cast<size_t>(n_ids), 0);
  id_token.assign(static_cast<size_t>(n_ids), {});
  for (const auto& [tok, id] : vocab) {
    id_known[static_cast<size_t>(id)] = 1;
    id_token[static_cast<size_t>(id)] = tok;
  }
  std::unordered_set<std::string> special_contents;
  for (const auto& t : added) {
    id_known[static_cast<size_t>(t.id)] = 1;
    id_token[static_cast<size_t>(t.id)] = t.content;  // the added vocabulary wins when decoding
    if (t.special) special_contents.insert(t.content);
  }
  for (int64_t i = 0; i < n_ids; ++i)
    id_special[static_cast<size_t>(i)] = id_known[static_cast<size_t>(i)] && special_contents.count(id_token[static_cast<size_t>(i)]);
  id_decoded.resize(static_cast<size_t>(n_ids));
  for (int64_t i = 0; i < n_ids; ++i)
    if (id_known[static_cast<size_t>(i)])
      id_decoded[static_cast<size_t>(i)] =
          byte_level_decoder ? byte_level_decode(id_token[static_cast<size_t>(i)]) : id_token[static_cast<size_t>(i)];
  for (const auto& items : templates)
    for (const auto& it : items)
      for (int32_t id : it.ids)
        DSV4_CHECK(id < n_ids, "{}: post_processor special token id {} is outside the vocabulary ({} ids)", source,
                   id, n_ids);
  uid = g_next_uid.fetch_add(1);
}

// ---- added tokens --------------------------------------------------------------------------------------
void Tokenizer::Impl::find_added(std::string_view s, uint32_t base, const Trie& trie, std::vector<Segment>& out) const {
  if (trie.empty() || s.empty()) {
    if (!s.empty()) out.push_back({base, base + static_cast<uint32_t>(s.size()), -1});
    return;
  }
  size_t start_offset = 0;
  size_t pos = 0;
  while (pos < s.size()) {
    int32_t value = -1;
    size_t len = 0, p = pos;
    for (; p < s.size(); ++p)
      if ((len = trie.longest_at(s, p, value)) > 0) break;
    if (len == 0) break;
    size_t start = p, stop = p + len;
    pos = stop;  // the matcher resumes after the match whatever is done with it
    const AddedTokenSpec& t = added[static_cast<size_t>(value)];
    if (t.single_word) {
      auto is_word = [&](uint32_t cp) {
        std::string u;
        append_utf8(u, cp);
        return word_char->full_match(u);
      };
      const bool start_space = start == 0 || !is_word(prev_cp(s, start));
      size_t q = stop;
      const bool stop_space = stop == s.size() || !is_word(next_cp(s, q));
      if (!start_space || !stop_space) continue;
    }
    if (t.lstrip) {
      size_t ns = start;
      while (ns > 0) {
        size_t b = ns - 1;
        while (b > 0 && (static_cast<uint8_t>(s[b]) & 0xC0) == 0x80) --b;
        size_t q = b;
        if (!is_white_space(next_cp(s, q))) break;
        ns = b;
      }
      start = std::max(ns, start_offset);
    }
    if (t.rstrip) {
      while (stop < s.size()) {
        size_t q = stop;
        if (!is_white_space(next_cp(s, q))) break;
        stop = q;
      }
    }
    if (start_offset < start) out.push_back({base + static_cast<uint32_t>(start_offset), base + static_cast<uint32_t>(start), -1});
    out.push_back({base + static_cast<uint32_t>(start), base + static_cast<uint32_t>(stop), value});
    start_offset = stop;
  }
  if (start_offset < s.size())
    out.push_back({base + static_cast<uint32_t>(start_offset), base + static_cast<uint32_t>(s.size()), -1});
}

void Tokenizer::Impl::split_added(std::string_view text, std::vector<Segment>& segs) const {
  segs.clear();
  if (raw_trie.empty() && norm_trie.empty()) {
    if (!text.empty()) segs.push_back({0, static_cast<uint32_t>(text.size()), -1});
    return;
  }
  std::vector<Segment> first;
  find_added(text, 0, raw_trie, first);
  for (const Segment& s : first) {
    if (s.token >= 0) {
      segs.push_back(s);
    } else {
      find_added(text.substr(s.start, s.end - s.start), s.start, norm_trie, segs);
    }
  }
}

// ---- pre-tokenization ----------------------------------------------------------------------------------
void Tokenizer::Impl::pre_tokenize(std::string_view text, uint32_t base, std::deque<std::string>& arena,
                                   std::vector<Piece>& pieces) const {
  pieces.clear();
  pieces.push_back({text, base, false});
  struct Part {
    uint32_t a, b;
    bool flag;  // is_match before the behaviour is applied; `remove` after
  };
  thread_local std::vector<Piece> next;  // per-thread scratch, reused across calls
  thread_local std::vector<std::pair<uint32_t, uint32_t>> matches;
  thread_local std::vector<Part> parts, out;
  for (const PreStep& step : pre) {
    next.clear();
    for (const Piece& piece : pieces) {
      Piece cur = piece;
      if (step.kind == PreStep::Kind::kByteLevel) {
        if (step.add_prefix_space && cur.text.front() != ' ') {
          arena.push_back(" " + std::string(cur.text));
          cur = {arena.back(), cur.orig, true};
        }
        if (!step.re) {
          next.push_back(cur);
          continue;
        }
      }
      matches.clear();
      step.re->find_all(cur.text, matches);
      parts.clear();
      uint32_t prev = 0;
      for (const auto& [s, e] : matches) {
        if (prev != s) parts.push_back({prev, s, false});
        parts.push_back({s, e, true});
        prev = e;
      }
      if (prev != cur.text.size()) parts.push_back({prev, static_cast<uint32_t>(cur.text.size()), false});
      if (step.invert)
        for (Part& p : parts) p.flag = !p.flag;
      out.clear();
      const Behavior beh = step.kind == PreStep::Kind::kByteLevel ? Behavior::kIsolated : step.behavior;
      switch (beh) {
        case Behavior::kIsolated:
          for (const Part& p : parts) out.push_back({p.a, p.b, false});
          break;
        case Behavior::kRemoved:
          for (const Part& p : parts) out.push_back({p.a, p.b, p.flag});
          break;
        case Behavior::kContiguous: {
          bool prev_match = false;
          for (const Part& p : parts) {
            if (p.flag == prev_match && !out.empty()) out.back().b = p.b;
            else out.push_back({p.a, p.b, false});
            prev_match = p.flag;
          }
          break;
        }
        case Behavior::kMergedWithPrevious: {
          bool prev_match = false;
          for (const Part& p : parts) {
            if (p.flag && !prev_match && !out.empty()) out.back().b = p.b;
            else out.push_back({p.a, p.b, false});
            prev_match = p.flag;
          }
          break;
        }
        case Behavior::kMergedWithNext: {
          bool prev_match = false;
          for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
            if (it->flag && !prev_match && !out.empty()) out.back().a = it->a;
            else out.push_back({it->a, it->b, false});
            prev_match = it->flag;
          }
          std::reverse(out.begin(), out.end());
          break;
        }
      }
      for (const Part& p : out) {
        if (p.flag || p.b <= p.a) continue;
        next.push_back({cur.text.substr(p.a, p.b - p.a), cur.orig_at(p.a), cur.prefixed && p.a == 0});
      }
    }
    pieces.swap(next);
  }
}

// ---- BPE ----------------------------------------------------------------------------------------------
// Initial symbols of a word, following the library's BPE::merge_word (unknown characters: byte fallback,
// then unk with optional fusing, else dropped).
void Tokenizer::Impl::word_symbols(std::string_view text, std::vector<Sym>& syms) const {
  syms.clear();
  const ByteAlphabet& alpha = byte_alphabet();
  std::optional<Sym> unk;
  size_t i = 0;
  std::string s;
  while (i < text.size()) {
    const size_t begin = i;
    uint32_t in_len;
    int32_t id = -1;
    if (byte_fast) {
      const auto b = static_cast<uint8_t>(text[i++]);
      in_len = 1;
      id = byte_id[b];
      if (id < 0) s = alpha.utf8[b];
    } else {
      if (byte_level) {
        s = alpha.utf8[static_cast<uint8_t>(text[i++])];
        in_len = 1;
      } else {
        next_cp(text, i);
        s.assign(text.substr(begin, i - begin));
        in_len = static_cast<uint32_t>(i - begin);
      }
      if (begin > 0 && !cont_prefix.empty()) s = cont_prefix + s;
      if (i >= text.size() && !eow_suffix.empty()) s += eow_suffix;
      auto it = vocab.find(s);
      if (it != vocab.end()) id = it->second;
    }
    if (id >= 0) {
      if (unk) {
        syms.push_back(*unk);
        unk.reset();
      }
      syms.push_back({id, in_len});
      continue;
    }
    if (byte_fallback) {
      std::vector<int32_t> fb;
      for (char ch : s) {
        auto it = vocab.find(fmt::format("<0x{:02X}>", static_cast<uint8_t>(ch)));
        if (it == vocab.end()) {
          fb.clear();
          break;
        }
        fb.push_back(it->second);
      }
      if (!fb.empty()) {
        for (size_t k = 0; k < fb.size(); ++k) syms.push_back({fb[k], k == 0 ? in_len : 0u});
        continue;
      }
    }
    if (unk_id) {
      if (unk && fuse_unk) {
        unk->len += in_len;
      } else {
        if (unk) syms.push_back(*unk);
        unk = Sym{*unk_id, in_len};
      }
    }
  }
  if (unk) syms.push_back(*unk);
}

// Applies merges lowest rank first, leftmost first among equal ranks (the library's Word::merge_all without
// dropout). Short words use a direct scan; long ones a heap over a linked list, like the library.
void Tokenizer::Impl::merge_all(std::vector<Sym>& syms) const {
  const size_t n = syms.size();
  if (n < 2) return;
  constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
  if (n <= 32) {
    // rank[i] / merged[i]: the merge of the pair (w[i], w[i+1]); only the neighbours change after a merge.
    std::vector<Sym>& w = syms;
    uint32_t rank[32];
    int32_t merged[32];
    auto look = [&](size_t i) {
      const PairMap::Val* v = merges.find(w[i].id, w[i + 1].id);
      rank[i] = v ? v->rank : kNone;
      merged[i] = v ? v->id : 0;
    };
    for (size_t i = 0; i + 1 < n; ++i) look(i);
    size_t len = n;
    while (len > 1) {
      size_t at = 0;
      for (size_t i = 1; i + 1 < len; ++i)
        if (rank[i] < rank[at]) at = i;
      if (rank[at] == kNone) break;
      w[at].id = merged[at];
      w[at].len += w[at + 1].len;
      for (size_t i = at + 1; i + 1 < len; ++i) {
        w[i] = w[i + 1];
        rank[i] = rank[i + 1];
        merged[i] = merged[i + 1];
      }
      --len;
      if (at + 1 < len) look(at);
      if (at > 0) look(at - 1);
    }
    w.resize(len);
    return;
  }
  struct Node {
    int32_t id;
    uint32_t len;
    int64_t prev, next;
  };
  struct Cand {
    uint32_t rank;
    size_t pos;
    int32_t id;
    bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }  // min-heap
  };
  std::vector<Node> nodes(n);
  for (size_t i = 0; i < n; ++i)
    nodes[i] = {syms[i].id, syms[i].len, static_cast<int64_t>(i) - 1, i + 1 < n ? static_cast<int64_t>(i + 1) : -1};
  std::vector<Cand> heap;
  for (size_t i = 0; i + 1 < n; ++i)
    if (const PairMap::Val* v = merges.find(nodes[i].id, nodes[i + 1].id)) heap.push_back({v->rank, i, v->id});
  std::make_heap(heap.begin(), heap.end());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Cand top = heap.back();
    heap.pop_back();
    Node& cur = nodes[top.pos];
    if (cur.len == 0 || cur.next < 0) continue;
    const Node right = nodes[static_cast<size_t>(cur.next)];
    const PairMap::Val* v = merges.find(cur.id, right.id);
    if (!v || v->id != top.id) continue;  // stale entry
    const size_t right_pos = static_cast<size_t>(cur.next);
    cur.id = top.id;
    cur.len += right.len;
    cur.next = right.next;
    nodes[right_pos].len = 0;
    if (right.next >= 0) nodes[static_cast<size_t>(right.next)].prev = static_cast<int64_t>(top.pos);
    if (cur.prev >= 0) {
      const Node& p = nodes[static_cast<size_t>(cur.prev)];
      if (const PairMap::Val* pv = merges.find(p.id, cur.id)) {
        heap.push_back({pv->rank, static_cast<size_t>(cur.prev), pv->id});
        std::push_heap(heap.begin(), heap.end());
      }
    }
    if (cur.next >= 0) {
      const Node& nx = nodes[static_cast<size_t>(cur.next)];
      if (const PairMap::Val* nv = merges.find(cur.id, nx.id)) {
        heap.push_back({nv->rank, top.pos, nv->id});
        std::push_heap(heap.begin(), heap.end());
      }
    }
  }
  syms.clear();
  for (int64_t i = 0; i >= 0; i = nodes[static_cast<size_t>(i)].next)
    syms.push_back({nodes[static_cast<size_t>(i)].id, nodes[static_cast<size_t>(i)].len});
}

void Tokenizer::Impl::bpe(const Piece& piece, std::vector<int32_t>& ids,
                          std::vector<std::pair<uint32_t, uint32_t>>* offsets) const {
  const std::string_view text = piece.text;
  if (text.empty()) return;
  auto emit = [&](const std::vector<int32_t>& wids, const std::vector<uint32_t>& lens) {
    size_t k = 0;
    for (size_t t = 0; t < wids.size(); ++t) {
      ids.push_back(wids[t]);
      if (offsets) offsets->emplace_back(piece.orig_at(k), piece.orig_at(k + lens[t]));
      k += lens[t];
    }
  };
  if (ignore_merges) {
    std::optional<int32_t> whole;
    if (byte_fast) {
      if (auto it = byte_vocab.find(std::string(text)); it != byte_vocab.end()) whole = it->second;
    } else {
      std::string key;
      if (byte_level)
        for (char ch : text) key += byte_alphabet().utf8[static_cast<uint8_t>(ch)];
      else
        key.assign(text);
      if (auto it = vocab.find(key); it != vocab.end()) whole = it->second;
    }
    if (whole) {
      emit({*whole}, {static_cast<uint32_t>(text.size())});
      return;
    }
  }
  WordCache& cache = word_cache();
  if (cache.owner != uid) {
    cache.map.clear();
    cache.owner = uid;
  }
  const bool use_cache = cache_capacity > 0 && text.size() < 256;
  if (use_cache) {
    auto it = cache.map.find(text);
    if (it != cache.map.end()) {
      emit(it->second.ids, it->second.lens);
      return;
    }
  }
  thread_local std::vector<Sym> syms;
  word_symbols(text, syms);
  merge_all(syms);
  CachedWord w;
  w.ids.reserve(syms.size());
  w.lens.reserve(syms.size());
  for (const Sym& s : syms) {
    w.ids.push_back(s.id);
    w.lens.push_back(s.len);
  }
  emit(w.ids, w.lens);
  if (use_cache) {
    if (cache.map.size() >= cache_capacity) cache.map.clear();
    cache.map.emplace(std::string(text), std::move(w));
  }
}

void Tokenizer::Impl::encode(std::string_view text, bool add_special, std::vector<int32_t>& ids,
                             std::vector<std::pair<uint32_t, uint32_t>>* offsets) const {
  const size_t bad = find_invalid_utf8(text);
  DSV4_CHECK(bad == std::string_view::npos, "tokenizer {}: input text is not valid UTF-8 (byte {} of {})", source,
             bad, text.size());
  DSV4_CHECK(text.size() < std::numeric_limits<uint32_t>::max(), "tokenizer {}: input of {} bytes is too long",
             source, text.size());
  ids.clear();
  if (offsets) offsets->clear();
  std::vector<Segment> segs;
  split_added(text, segs);
  std::deque<std::string> arena;
  std::vector<Piece> pieces;
  for (const Segment& s : segs) {
    if (s.token >= 0) {
      ids.push_back(added[static_cast<size_t>(s.token)].id);
      if (offsets) offsets->emplace_back(s.start, s.end);
      continue;
    }
    pre_tokenize(text.substr(s.start, s.end - s.start), s.start, arena, pieces);
    for (const Piece& p : pieces) bpe(p, ids, offsets);
  }
  if (add_special) {
    for (const auto& items : templates) {
      std::vector<int32_t> out;
      std::vector<std::pair<uint32_t, uint32_t>> out_off;
      for (const TemplateItem& it : items) {
        if (it.sequence) {
          out.insert(out.end(), ids.begin(), ids.end());
          if (offsets) out_off.insert(out_off.end(), offsets->begin(), offsets->end());
        } else {
          out.insert(out.end(), it.ids.begin(), it.ids.end());
          if (offsets) out_off.insert(out_off.end(), it.ids.size(), std::pair<uint32_t, uint32_t>{0u, 0u});
        }
      }
      ids.swap(out);
      if (offsets) offsets->swap(out_off);
    }
  }
}

// =========================================================================================================
Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  const std::string text = read_file(path);
  return from_json(text, path);
}

Tokenizer Tokenizer::from_json(std::string_view text, const std::string& source) {
  auto impl = std::make_unique<Impl>();
  impl->source = source;
  impl->sha = sha256_hex(text);
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    DSV4_FAIL("{}: not valid JSON: {}", source, e.what());
  }
  impl->load(j);
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> ids;
  impl_->encode(text, add_special_tokens, ids, nullptr);
  return ids;
}

Encoding Tokenizer::encode_with_offsets(std::string_view text, bool add_special_tokens) const {
  Encoding e;
  impl_->encode(text, add_special_tokens, e.ids, &e.offsets);
  return e;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const Impl& m = *impl_;
  std::string out;
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || id >= m.n_ids || !m.id_known[static_cast<size_t>(id)]) continue;
    if (skip_special_tokens && m.id_special[static_cast<size_t>(id)]) continue;
    if (!m.byte_level_decoder && !first) out += ' ';
    out += m.id_decoded[static_cast<size_t>(id)];
    first = false;
  }
  return m.byte_level_decoder ? utf8_lossy(out) : out;
}

std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
  DSV4_CHECK(find_invalid_utf8(text) == std::string_view::npos, "tokenizer {}: input text is not valid UTF-8",
             impl_->source);
  std::vector<std::string> out;
  std::vector<Segment> segs;
  impl_->split_added(text, segs);
  std::deque<std::string> arena;
  std::vector<Piece> pieces;
  for (const Segment& s : segs) {
    if (s.token >= 0) {
      out.emplace_back(text.substr(s.start, s.end - s.start));
      continue;
    }
    impl_->pre_tokenize(text.substr(s.start, s.end - s.start), s.start, arena, pieces);
    for (const Piece& p : pieces) out.emplace_back(p.text);
  }
  return out;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const std::string key(token);
  if (auto it = impl_->added_ids.find(key); it != impl_->added_ids.end()) return it->second;
  if (auto it = impl_->vocab.find(key); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= impl_->n_ids || !impl_->id_known[static_cast<size_t>(id)]) return std::nullopt;
  return impl_->id_token[static_cast<size_t>(id)];
}

int64_t Tokenizer::vocab_size() const { return impl_->n_ids; }
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < impl_->n_ids && impl_->id_special[static_cast<size_t>(id)];
}
const std::vector<AddedTokenSpec>& Tokenizer::added_tokens() const { return impl_->added; }
const std::string& Tokenizer::sha256() const { return impl_->sha; }
const std::string& Tokenizer::source() const { return impl_->source; }
void Tokenizer::set_cache_capacity(size_t entries) { impl_->cache_capacity = entries; }

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    const Utf8Step st = utf8_step(bytes, i);
    if (st.expected != 0 && st.valid == st.expected) {
      out.append(bytes.substr(i, st.expected));
      i += st.expected;
    } else {  // one U+FFFD per maximal invalid subsequence (a stray byte, or a truncated / broken sequence)
      out += "\xEF\xBF\xBD";
      i += std::max<size_t>(st.valid, 1);
    }
  }
  return out;
}

}  // namespace dsv4::data
