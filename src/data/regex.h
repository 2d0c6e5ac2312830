// Regular expressions for the pre-tokenizer, with the semantics the Hugging Face `tokenizers` library gets
// from Oniguruma, executed by PCRE2 (UTF-8, Unicode properties, JIT).
//
// Patterns are translated before compilation (translate_oniguruma):
//   \s / \S      -> Unicode White_Space (Oniguruma's set; PCRE2's \s also matches U+180E)
//   \p{L|N|P|S|M} (and \P, \p{^..}) -> PCRE2's class plus the code points Oniguruma assigns to it that are
//                   unassigned in PCRE2 10.42's Unicode 14.0 tables (src/data/unicode_extras.inc), so
//                   characters added in Unicode 15/16 split like in the reference
//   \h / \H      -> hexadecimal digit (Oniguruma's Ruby syntax), not PCRE2's horizontal space
// Nested classes and class intersection (&&) have no PCRE2 equivalent and are rejected.
//
// find_all() iterates matches like onig::FindMatches (the iterator tokenizers uses): an empty match right
// where the previous match ended is skipped by advancing one character. Matching is thread-safe (per-thread
// match data and JIT stack). Subjects must be valid UTF-8 (the tokenizer validates its input once).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

struct pcre2_real_code_8;

namespace dsv4::data {

struct CodeRange {
  int32_t lo, hi;
};

std::string translate_oniguruma(std::string_view pattern, std::string_view where);

class Regex {
 public:
  // `where` names the pattern's origin (file and JSON key) in error messages.
  explicit Regex(std::string_view pattern, std::string_view where = "regex");
  // A regex matching `s` literally.
  static Regex literal(std::string_view s, std::string_view where = "regex");
  ~Regex();
  Regex(Regex&& o) noexcept;
  Regex& operator=(Regex&& o) noexcept;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends (start, end) byte offsets of every match in `text` to `out` (not cleared).
  void find_all(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>& out) const;
  // True when the whole of `text` matches.
  bool full_match(std::string_view text) const;

  const std::string& pattern() const { return pattern_; }
  const std::string& translated() const { return translated_; }

 private:
  // Returns false when there is no match at or after `start`.
  bool search(std::string_view text, size_t start, size_t& mstart, size_t& mend, bool anchored) const;

  std::string pattern_, translated_, where_;
  pcre2_real_code_8* code_ = nullptr;
};

// Unicode White_Space (what \s matches in the reference: Oniguruma, and Rust's regex crate).
bool is_white_space(uint32_t cp);

// Length in bytes of the UTF-8 sequence starting with byte `b` (1 for invalid lead bytes).
inline size_t utf8_len(uint8_t b) { return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4; }
// Byte offset of the first invalid UTF-8 sequence in s (overlongs, surrogates, > U+10FFFF are invalid), or
// npos when s is valid.
size_t find_invalid_utf8(std::string_view s);
// The UTF-8 sequence starting at byte i: `expected` its length by the lead byte (1 for ASCII, 0 for a byte that
// cannot start one) and `valid` how many of its bytes are well formed (== expected when complete; otherwise the
// maximal valid prefix, the unit Rust's from_utf8_lossy replaces by one U+FFFD).
struct Utf8Step {
  size_t expected = 0, valid = 0;
};
Utf8Step utf8_step(std::string_view s, size_t i);

}  // namespace dsv4::data
