// Tokenizer parity with the Hugging Face `tokenizers` library (fixtures from tests/ref/data/gen_data_fixtures.py):
// ids, decoded text and Unicode classes must match exactly.
#include <gtest/gtest.h>

#include <thread>

#include "data/regex.h"
#include "data/sha256.h"
#include "data/tokenizer.h"
#include "data_test_util.h"
#include "runtime/error.h"

namespace dsv4::data {
namespace {
using test::fixture;
using test::ids_of;

std::string show(const std::vector<int32_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

TEST(Sha256, Fips180Vectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  Sha256 h;  // one million 'a', fed in uneven pieces
  const std::string chunk(997, 'a');
  size_t left = 1000000;
  while (left > 0) {
    const size_t n = std::min(left, chunk.size());
    h.update(chunk.data(), n);
    left -= n;
  }
  EXPECT_EQ(h.hex_digest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, FileMatchesTokenizerHash) {
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  EXPECT_EQ(tok.sha256(), sha256_file(fixture("tokenizer.json")));
  EXPECT_EQ(tok.sha256().size(), 64u);
  EXPECT_THROW(sha256_file(fixture("does_not_exist.json")), Error);
}

// Oniguruma's \s and \p{L,N,P,S,M} (as the `tokenizers` wheel runs them) against the translated PCRE2 classes,
// for every Unicode scalar value: one string holding all of them in order, scanned with "X+".
TEST(Regex, UnicodeClassesMatchOniguruma) {
  const auto j = nlohmann::json::parse(std::ifstream(fixture("unicode_classes.json")));
  std::string all;
  std::vector<uint32_t> cp_at;  // code point starting at each byte offset (0 for continuation bytes)
  for (uint32_t cp = 0; cp < 0x110000; ++cp) {
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;
    const size_t before = all.size();
    if (cp < 0x80) {
      all += char(cp);
    } else if (cp < 0x800) {
      all += char(0xC0 | (cp >> 6));
      all += char(0x80 | (cp & 63));
    } else if (cp < 0x10000) {
      all += char(0xE0 | (cp >> 12));
      all += char(0x80 | ((cp >> 6) & 63));
      all += char(0x80 | (cp & 63));
    } else {
      all += char(0xF0 | (cp >> 18));
      all += char(0x80 | ((cp >> 12) & 63));
      all += char(0x80 | ((cp >> 6) & 63));
      all += char(0x80 | (cp & 63));
    }
    cp_at.resize(all.size(), 0);
    cp_at[before] = cp;
  }
  for (const char* name : {"s", "L", "N", "P", "S", "M"}) {
    const std::string cls = std::string(name) == "s" ? "\\s" : fmt::format("\\p{{{}}}", name);
    std::vector<uint8_t> expect(0x110000, 0), got(0x110000, 0);
    for (const auto& r : j["classes"][name])
      for (int64_t c = r[0].get<int64_t>(); c <= r[1].get<int64_t>(); ++c) expect[static_cast<size_t>(c)] = 1;
    std::vector<std::pair<uint32_t, uint32_t>> runs;
    Regex(cls + "+").find_all(all, runs);
    for (const auto& [a, b] : runs)
      for (uint32_t k = a; k < b; ++k)
        if ((static_cast<uint8_t>(all[k]) & 0xC0) != 0x80) got[cp_at[k]] = 1;
    int64_t mismatches = 0;
    uint32_t first = 0;
    for (uint32_t cp = 0; cp < 0x110000; ++cp)
      if (got[cp] != expect[cp] && mismatches++ == 0) first = cp;
    EXPECT_EQ(mismatches, 0) << cls << ": first mismatch at U+" << std::hex << first;
  }
}

TEST(Regex, TranslationAndIteration) {
  EXPECT_THROW(Regex("[a[b]]"), Error);     // nested class
  EXPECT_THROW(Regex("[a&&b]"), Error);     // intersection
  EXPECT_THROW(Regex("[\\S]"), Error);      // negated class escape inside a class
  EXPECT_THROW(Regex("(unclosed"), Error);  // PCRE2 compile error names the pattern
  EXPECT_TRUE(Regex("\\h+").full_match("0aF9"));
  EXPECT_FALSE(Regex("\\h").full_match(" "));
  EXPECT_FALSE(Regex("\\s").full_match("\xE1\xA0\x8E"));  // U+180E is not White_Space
  EXPECT_TRUE(Regex("[^\\s]").full_match("\xE1\xA0\x8E"));
  EXPECT_TRUE(Regex("\\p{^L}").full_match("1"));
  EXPECT_TRUE(Regex::literal("a.b\\E*").full_match("a.b\\E*"));
  // Empty matches: like onig::FindMatches, every position yields one, none right after a match.
  std::vector<std::pair<uint32_t, uint32_t>> m;
  Regex("x*").find_all("axxb", m);
  const std::vector<std::pair<uint32_t, uint32_t>> want = {{0, 0}, {1, 3}, {4, 4}};
  EXPECT_EQ(m, want);
  EXPECT_EQ(find_invalid_utf8("ok\xC3\xA9"), std::string_view::npos);
  EXPECT_EQ(find_invalid_utf8("ab\xC0\x80"), 2u);        // overlong
  EXPECT_EQ(find_invalid_utf8("\xED\xA0\x80"), 0u);      // surrogate
  EXPECT_EQ(find_invalid_utf8("x\xF4\x90\x80\x80"), 1u);  // > U+10FFFF
  EXPECT_EQ(find_invalid_utf8("\xE4\xB8"), 0u);          // truncated
}

TEST(Tokenizer, DeepSeekPreTokenizerPieces) {
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  // CJK runs split from Latin; digit groups of three; the special token is extracted first.
  EXPECT_EQ(tok.pre_tokenize("Hello, world! 1234567 中文测试 <｜User｜>x   tab"),
            (std::vector<std::string>{"Hello", ",", " world", "!", " ", "123", "456", "7", " ", "中文测试", " ",
                                      "<｜User｜>", "x", "  ", " tab"}));
}

struct Counts {
  int64_t cases = 0, ids_ok = 0, decode_ok = 0;
};

TEST(Tokenizer, ParityWithReference) {
  const Tokenizer base = Tokenizer::from_file(fixture("tokenizer.json"));
  const Tokenizer va = Tokenizer::from_file(fixture("tokenizer_variant_a.json"));
  const Tokenizer vb = Tokenizer::from_file(fixture("tokenizer_variant_b.json"));
  const Tokenizer vc = Tokenizer::from_file(fixture("tokenizer_variant_c.json"));
  const std::vector<std::pair<const char*, const Tokenizer*>> toks = {{"base", &base}, {"a", &va}, {"b", &vb}, {"c", &vc}};
  std::map<std::string, Counts> counts;
  int reported = 0;
  for (const auto& row : test::read_jsonl(fixture("tokenizer_cases.jsonl"))) {
    const std::string text = row["text"];
    for (const auto& [name, tok] : toks) {
      Counts& c = counts[name];
      ++c.cases;
      const auto want = ids_of(row[name]);
      const auto got = tok->encode(text);
      if (got == want) ++c.ids_ok;
      else if (reported++ < 5)
        ADD_FAILURE() << name << " case " << row["i"] << " " << nlohmann::json(text).dump() << "\n got  " << show(got)
                      << "\n want " << show(want);
      const std::string key = std::string(name) + "_decoded";
      if (name == std::string("base") || row.contains(key)) {
        const std::string want_text = row.contains(key) ? row[key].get<std::string>() : text;
        if (tok->decode(want) == want_text) ++c.decode_ok;
        else if (reported++ < 5)
          ADD_FAILURE() << name << " decode of case " << row["i"] << ": " << nlohmann::json(tok->decode(want)).dump()
                        << " vs " << nlohmann::json(want_text).dump();
      } else {
        ++c.decode_ok;
      }
    }
    const std::string dec = row.contains("base_decoded") ? row["base_decoded"].get<std::string>() : text;
    const std::string skip = row.contains("base_decoded_skip") ? row["base_decoded_skip"].get<std::string>() : dec;
    EXPECT_EQ(base.decode(ids_of(row["base"]), true), skip) << "case " << row["i"];
    if (row.contains("a_special")) {
      EXPECT_EQ(show(va.encode(text, true)), show(ids_of(row["a_special"])));
    }
  }
  for (const auto& [name, c] : counts) {
    EXPECT_EQ(c.ids_ok, c.cases) << name;
    EXPECT_EQ(c.decode_ok, c.cases) << name;
    std::printf("[ parity ] tokenizer %-4s: %lld/%lld id sequences and %lld/%lld decodes identical\n", name.c_str(),
                static_cast<long long>(c.ids_ok), static_cast<long long>(c.cases),
                static_cast<long long>(c.decode_ok), static_cast<long long>(c.cases));
  }
  EXPECT_GT(counts["base"].cases, 300);
}

TEST(Tokenizer, DecodeParity) {
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  int64_t n = 0;
  for (const auto& row : test::read_jsonl(fixture("decode_cases.jsonl"))) {
    const auto ids = ids_of(row["ids"]);
    EXPECT_EQ(tok.decode(ids), row["decoded"].get<std::string>()) << show(ids);
    EXPECT_EQ(tok.decode(ids, true), row["decoded_skip"].get<std::string>()) << show(ids);
    ++n;
  }
  EXPECT_EQ(n, 300);
}

TEST(Tokenizer, LossyUtf8LikeRust) {
  EXPECT_EQ(utf8_lossy("a\xC3"), "a\xEF\xBF\xBD");
  EXPECT_EQ(utf8_lossy("\xE4\xB8\xE4\xB8\xAD"), "\xEF\xBF\xBD\xE4\xB8\xAD");  // truncated then valid
  EXPECT_EQ(utf8_lossy("\xF0\x80\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // F0 80: maximal subpart is 1 byte
  EXPECT_EQ(utf8_lossy("\xFF"), "\xEF\xBF\xBD");
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(Tokenizer, OffsetsCoverTheInput) {
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  const std::string text = "Hello  <｜User｜>中文 1234 👍🏽\n\n";
  const Encoding e = tok.encode_with_offsets(text);
  ASSERT_EQ(e.ids.size(), e.offsets.size());
  uint32_t pos = 0;
  for (const auto& [a, b] : e.offsets) {
    EXPECT_EQ(a, pos);
    EXPECT_GT(b, a);
    pos = b;
  }
  EXPECT_EQ(pos, text.size());
  EXPECT_EQ(e.ids, tok.encode(text));
}

TEST(Tokenizer, Vocabulary) {
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  EXPECT_EQ(tok.vocab_size(), 1502);
  EXPECT_EQ(tok.token_to_id("<｜begin▁of▁sentence｜>"), 0);
  EXPECT_EQ(tok.token_to_id("<｜end▁of▁sentence｜>"), 1);
  EXPECT_EQ(tok.token_to_id("</think>"), 1501);
  EXPECT_FALSE(tok.token_to_id("not a token").has_value());
  EXPECT_TRUE(tok.is_special(0));
  EXPECT_FALSE(tok.is_special(1500));  // <think> is an ordinary added token
  EXPECT_EQ(tok.id_to_token(3), "<｜User｜>");
  EXPECT_FALSE(tok.id_to_token(99999).has_value());
  EXPECT_EQ(tok.decode(std::vector<int32_t>{0, -5, 99999, 1}), "<｜begin▁of▁sentence｜><｜end▁of▁sentence｜>");
}

TEST(Tokenizer, CacheDoesNotChangeResultsAndThreadsAgree) {
  Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  std::vector<std::string> texts;
  for (const auto& row : test::read_jsonl(fixture("tokenizer_cases.jsonl"))) texts.push_back(row["text"]);
  std::vector<std::vector<int32_t>> ref;
  for (const auto& t : texts) ref.push_back(tok.encode(t));
  std::vector<int> bad(2, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 2; ++k)
    threads.emplace_back([&, k] {
      for (int rep = 0; rep < 2; ++rep)
        for (size_t i = 0; i < texts.size(); ++i) bad[k] += tok.encode(texts[i]) != ref[i];
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad[0] + bad[1], 0);
  tok.set_cache_capacity(0);
  for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(tok.encode(texts[i]), ref[i]);
}

TEST(Tokenizer, RejectsWhatItCannotReproduce) {
  const std::string good = [] {
    std::ifstream f(fixture("tokenizer.json"));
    return std::string(std::istreambuf_iterator<char>(f), {});
  }();
  auto with = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(good);
    edit(j);
    return j.dump();
  };
  auto expect_error = [](const std::string& json, const std::string& needle) {
    try {
      Tokenizer::from_json(json, "tok.json");
      ADD_FAILURE() << "no error; expected one mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("tok.json"), std::string::npos) << e.what();
    }
  };
  expect_error(with([](auto& j) { j["normalizer"] = {{"type", "NFC"}}; }), "normalizer.type");
  expect_error(with([](auto& j) { j["model"]["type"] = "WordPiece"; }), "model.type");
  expect_error(with([](auto& j) { j["model"]["dropout"] = 0.1; }), "model.dropout");
  expect_error(with([](auto& j) { j["model"]["merges"][0] = {"Ġ", "not-in-vocab"}; }), "model.merges[0]");
  expect_error(with([](auto& j) { j["pre_tokenizer"]["pretokenizers"][2]["behavior"] = "Sideways"; }),
               "pre_tokenizer.pretokenizers[2].behavior");
  expect_error(with([](auto& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(a"; }),
               "pre_tokenizer.pretokenizers[0].pattern");
  expect_error(with([](auto& j) { j["truncation"] = {{"max_length", 8}}; }), "truncation");
  expect_error(with([](auto& j) { j["added_tokens"][0].erase("content"); }), "added_tokens[0].content");
  expect_error(with([](auto& j) { j["decoder"] = {{"type", "WordPiece"}}; }), "decoder.type");
  expect_error("{not json", "not valid JSON");
  const Tokenizer tok = Tokenizer::from_json(good, "tok.json");
  EXPECT_THROW(tok.encode("bad \xC3 utf8"), Error);
}

}  // namespace
}  // namespace dsv4::data
