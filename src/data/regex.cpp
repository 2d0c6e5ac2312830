#define PCRE2_CODE_UNIT_WIDTH 8
#include "data/regex.h"

#include <pcre2.h>

#include <memory>

#include "runtime/error.h"

namespace dsv4::data {
namespace {
#include "data/unicode_extras.inc"

template <size_t N>
std::string class_body(const CodeRange (&ranges)[N]) {
  std::string s;
  for (const CodeRange& r : ranges) {
    if (r.hi < r.lo) continue;
    s += fmt::format("\\x{{{:x}}}", r.lo);
    if (r.hi > r.lo) s += fmt::format("-\\x{{{:x}}}", r.hi);
  }
  return s;
}

const std::string& white_space_body() {
  static const std::string s = class_body(kWhiteSpace);
  return s;
}

// Extra code points of a general category (empty when the category needs none).
std::string extras_for(std::string_view cat) {
  if (cat == "L") return class_body(kExtraL);
  if (cat == "N") return class_body(kExtraN);
  if (cat == "P") return class_body(kExtraP);
  if (cat == "S") return class_body(kExtraS);
  if (cat == "M") return class_body(kExtraM);
  return {};
}

std::string pcre2_error(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}

// Per-thread match data and JIT stack (PCRE2 match data is not shareable between threads).
struct Scratch {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mctx = nullptr;
  pcre2_jit_stack* jit = nullptr;
  Scratch() {
    md = pcre2_match_data_create(32, nullptr);
    mctx = pcre2_match_context_create(nullptr);
    jit = pcre2_jit_stack_create(64 * 1024, 8 * 1024 * 1024, nullptr);
    if (jit) pcre2_jit_stack_assign(mctx, nullptr, jit);
  }
  ~Scratch() {
    pcre2_match_data_free(md);
    pcre2_match_context_free(mctx);
    if (jit) pcre2_jit_stack_free(jit);
  }
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}
}  // namespace

std::string translate_oniguruma(std::string_view p, std::string_view where) {
  std::string out;
  out.reserve(p.size() + 64);
  bool in_class = false;
  size_t class_start = 0;  // index in p just after '[' or '[^'
  for (size_t i = 0; i < p.size();) {
    const char c = p[i];
    if (c == '\\') {
      DSV4_CHECK(i + 1 < p.size(), "{}: pattern ends with a backslash: {}", where, p);
      const char e = p[i + 1];
      if (e == 's' || e == 'S' || e == 'h' || e == 'H') {
        const bool neg = (e == 'S' || e == 'H');
        const std::string body = (e == 's' || e == 'S') ? white_space_body() : std::string("0-9a-fA-F");
        if (in_class) {
          DSV4_CHECK(!neg, "{}: \\{} inside a character class is not supported: {}", where, e, p);
          out += body;
        } else {
          out += neg ? "[^" : "[";
          out += body;
          out += ']';
        }
        i += 2;
        continue;
      }
      if ((e == 'p' || e == 'P') && i + 2 < p.size() && p[i + 2] == '{') {
        const size_t close = p.find('}', i + 3);
        DSV4_CHECK(close != std::string_view::npos, "{}: unterminated \\{}{{ in pattern: {}", where, e, p);
        std::string_view name = p.substr(i + 3, close - i - 3);
        bool neg = (e == 'P');
        if (!name.empty() && name[0] == '^') {
          neg = !neg;
          name.remove_prefix(1);
        }
        const std::string extras = extras_for(name);
        const std::string prop = fmt::format("\\p{{{}}}", name);
        if (extras.empty()) {
          out += fmt::format("\\{}{{{}}}", neg ? 'P' : 'p', name);
        } else if (in_class) {
          DSV4_CHECK(!neg, "{}: a negated \\p{{{}}} inside a character class is not supported: {}", where, name, p);
          out += prop + extras;
        } else {
          out += (neg ? "[^" : "[") + prop + extras + "]";
        }
        i = close + 1;
        continue;
      }
      // Any other escape is copied with its (possibly multi-byte) character.
      const size_t n = 1 + utf8_len(static_cast<uint8_t>(e));
      out.append(p.substr(i, n));
      i += n;
      continue;
    }
    if (!in_class) {
      if (c == '[') {
        in_class = true;
        out += c;
        ++i;
        if (i < p.size() && p[i] == '^') out += p[i++];
        class_start = i;
        continue;
      }
      out += c;
      ++i;
      continue;
    }
    // Inside a class.
    if (c == ']' && i != class_start) {
      in_class = false;
      out += c;
      ++i;
      continue;
    }
    if (c == '[') {
      DSV4_CHECK(i + 1 < p.size() && p[i + 1] == ':', "{}: nested character classes are not supported: {}", where, p);
      const size_t close = p.find(":]", i + 2);
      DSV4_CHECK(close != std::string_view::npos, "{}: unterminated POSIX class in pattern: {}", where, p);
      out.append(p.substr(i, close + 2 - i));
      i = close + 2;
      continue;
    }
    DSV4_CHECK(!(c == '&' && i + 1 < p.size() && p[i + 1] == '&'),
               "{}: class intersection (&&) is not supported: {}", where, p);
    out += c;
    ++i;
  }
  DSV4_CHECK(!in_class, "{}: unterminated character class in pattern: {}", where, p);
  return out;
}

Regex::Regex(std::string_view pattern, std::string_view where)
    : pattern_(pattern), translated_(translate_oniguruma(pattern, where)), where_(where) {
  int err = 0;
  PCRE2_SIZE off = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated_.data()), translated_.size(), PCRE2_UTF | PCRE2_UCP,
                        &err, &off, nullptr);
  DSV4_CHECK(code_ != nullptr, "{}: cannot compile regex {:?}: {} (at offset {} of the PCRE2 form {:?})", where,
             pattern_, pcre2_error(err), off, translated_);
  pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
}

Regex Regex::literal(std::string_view s, std::string_view where) {
  std::string q = "\\Q";
  for (size_t i = 0; i < s.size(); ++i) {
    if (s.substr(i, 2) == "\\E") {
      q += "\\E\\\\E\\Q";
      ++i;
    } else {
      q += s[i];
    }
  }
  q += "\\E";
  return Regex(q, where);
}

Regex::~Regex() {
  if (code_) pcre2_code_free(code_);
}
Regex::Regex(Regex&& o) noexcept
    : pattern_(std::move(o.pattern_)), translated_(std::move(o.translated_)), where_(std::move(o.where_)),
      code_(o.code_) {
  o.code_ = nullptr;
}
Regex& Regex::operator=(Regex&& o) noexcept {
  if (this != &o) {
    if (code_) pcre2_code_free(code_);
    pattern_ = std::move(o.pattern_);
    translated_ = std::move(o.translated_);
    where_ = std::move(o.where_);
    code_ = o.code_;
    o.code_ = nullptr;
  }
  return *this;
}

bool Regex::search(std::string_view text, size_t start, size_t& ms, size_t& me, bool anchored) const {
  Scratch& s = scratch();
  const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start,
                             PCRE2_NO_UTF_CHECK | (anchored ? PCRE2_ANCHORED : 0u), s.md, s.mctx);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  DSV4_CHECK(rc >= 0, "{}: regex {:?} failed on a {}-byte input: {}", where_, pattern_, text.size(), pcre2_error(rc));
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(s.md);
  ms = ov[0];
  me = ov[1];
  return true;
}

void Regex::find_all(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>& out) const {
  size_t last_end = 0;
  bool have_last = false;
  size_t last_match_end = 0;
  while (last_end <= text.size()) {
    size_t s = 0, e = 0;
    if (!search(text, last_end, s, e, false)) break;
    if (s == e && have_last && last_match_end == e) {
      last_end += last_end < text.size() ? utf8_len(static_cast<uint8_t>(text[last_end])) : 1;
      continue;
    }
    last_end = e;
    last_match_end = e;
    have_last = true;
    out.emplace_back(static_cast<uint32_t>(s), static_cast<uint32_t>(e));
  }
}

bool Regex::full_match(std::string_view text) const {
  size_t s = 0, e = 0;
  return search(text, 0, s, e, true) && e == text.size();
}

bool is_white_space(uint32_t cp) {
  for (const CodeRange& r : kWhiteSpace)
    if (static_cast<int32_t>(cp) >= r.lo && static_cast<int32_t>(cp) <= r.hi) return true;
  return false;
}

Utf8Step utf8_step(std::string_view str, size_t i) {
  const auto* s = reinterpret_cast<const uint8_t*>(str.data());
  const size_t n = str.size();
  const uint8_t b = s[i];
  if (b < 0x80) return {1, 1};
  Utf8Step st;
  uint8_t lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    st.expected = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    st.expected = 3;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;
  } else if (b >= 0xF0 && b <= 0xF4) {
    st.expected = 4;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;
  } else {
    return st;  // not a lead byte
  }
  st.valid = 1;
  while (st.valid < st.expected && i + st.valid < n) {
    const uint8_t c = s[i + st.valid];
    const bool ok = st.valid == 1 ? (c >= lo && c <= hi) : (c & 0xC0) == 0x80;
    if (!ok) break;
    ++st.valid;
  }
  return st;
}

size_t find_invalid_utf8(std::string_view str) {
  size_t i = 0;
  while (i < str.size()) {
    const Utf8Step st = utf8_step(str, i);
    if (st.expected == 0 || st.valid != st.expected) return i;
    i += st.expected;
  }
  return std::string_view::npos;
}

}  // namespace dsv4::data
