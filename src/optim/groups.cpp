#include "optim/groups.h"

#include <algorithm>
#include <cctype>
#include <charconv>

#include "runtime/error.h"

namespace dsv4 {

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

}  // namespace

std::string_view group_name(OptGroup g) {
  switch (g) {
    case OptGroup::None: return "none";
    case OptGroup::Muon: return "muon";
    case OptGroup::AdamW: return "adamw";
  }
  return "?";
}

OptGroup group_from_name(std::string_view name) {
  const std::string n = lower(trim(name));
  if (n == "none") return OptGroup::None;
  if (n == "muon") return OptGroup::Muon;
  if (n == "adamw") return OptGroup::AdamW;
  DSV4_FAIL("unknown optimizer group '{}' (expected one of: muon, adamw, none)", name);
}

std::string_view optimizer_mode_name(OptimizerMode m) {
  return m == OptimizerMode::MuonAdamW ? "muon_adamw" : "adamw";
}

OptimizerMode optimizer_mode_from_name(std::string_view name) {
  const std::string n = lower(trim(name));
  if (n == "muon_adamw" || n == "muon") return OptimizerMode::MuonAdamW;
  if (n == "adamw") return OptimizerMode::AdamW;
  DSV4_FAIL("unknown optimizer mode '{}' (expected one of: muon_adamw, adamw)", name);
}

GroupRule parse_group_rule(std::string_view text) {
  const size_t eq = text.rfind('=');
  DSV4_CHECK(eq != std::string_view::npos,
             "optimizer group rule '{}': expected PATTERN=GROUP (e.g. '*.attn_sink=adamw')", text);
  GroupRule r;
  r.pattern = std::string(trim(text.substr(0, eq)));
  DSV4_CHECK(!r.pattern.empty(), "optimizer group rule '{}': empty pattern", text);
  std::string_view rhs = trim(text.substr(eq + 1));
  const size_t slash = rhs.find('/');
  r.group = group_from_name(rhs.substr(0, slash));
  if (slash != std::string_view::npos) {
    const std::string_view num = trim(rhs.substr(slash + 1));
    int64_t v = 0;
    const auto [ptr, ec] = std::from_chars(num.data(), num.data() + num.size(), v);
    DSV4_CHECK(ec == std::errc() && ptr == num.data() + num.size() && v >= 1,
               "optimizer group rule '{}': row blocks '{}' is not a positive integer", text, num);
    DSV4_CHECK(r.group == OptGroup::Muon || v == 1, "optimizer group rule '{}': row blocks apply to muon only", text);
    r.row_blocks = v;
  }
  return r;
}

std::string format_group_rule(const GroupRule& r) {
  std::string s = r.pattern + "=" + std::string(group_name(r.group));
  if (r.row_blocks != 1) s += "/" + std::to_string(r.row_blocks);
  return s;
}

bool glob_match(std::string_view pattern, std::string_view name) {
  // Iterative wildcard match with backtracking to the last '*'.
  size_t p = 0, n = 0, star = std::string_view::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

GroupTable GroupTable::deepseek_v4(int64_t wo_a_groups) {
  GroupTable t;
  t.rules = {
      {"embed.weight", OptGroup::AdamW},
      {"head.weight", OptGroup::AdamW},
      {"*norm.weight", OptGroup::AdamW},  // attn/ffn/q/kv/compressor/enorm/hnorm/final norms
      {"*hc_*_base", OptGroup::AdamW},
      {"*hc_*_scale", OptGroup::AdamW},
      {"*hc_*_fn", OptGroup::Muon},
      {"*attn_sink", OptGroup::AdamW},
      {"*compressor.ape", OptGroup::AdamW},
  };
  if (wo_a_groups > 1) t.rules.push_back({"*.attn.wo_a.weight", OptGroup::Muon, wo_a_groups});
  return t;
}

GroupTable GroupTable::adamw_everywhere() {
  GroupTable t = deepseek_v4();
  t.mode = OptimizerMode::AdamW;
  return t;
}

const GroupRule* GroupTable::match(std::string_view name) const {
  for (const GroupRule& r : rules)
    if (glob_match(r.pattern, name)) return &r;
  return nullptr;
}

OptGroup group_of(const std::string& name, const Shape& shape, const GroupTable& table) {
  const GroupRule* r = table.match(name);
  OptGroup g;
  if (r) {
    g = r->group;
    if (g == OptGroup::Muon) {
      DSV4_CHECK(shape.ndim() == 2, "optimizer group rule '{}' puts {} {} in muon, which needs a 2-D matrix",
                 format_group_rule(*r), name, shape.str());
      DSV4_CHECK(r->row_blocks >= 1 && shape[0] % r->row_blocks == 0,
                 "optimizer group rule '{}': {} rows of {} {} do not split into {} blocks", format_group_rule(*r),
                 shape[0], name, shape.str(), r->row_blocks);
    }
  } else {
    g = shape.ndim() == 2 ? OptGroup::Muon : OptGroup::AdamW;
  }
  if (g == OptGroup::Muon && table.mode == OptimizerMode::AdamW) g = OptGroup::AdamW;
  return g;
}

OptGroup group_of(const Param& p, const GroupTable& table) {
  if (!p.trainable || !p.value.defined() || p.value.dtype() != DType::F32) return OptGroup::None;
  return group_of(p.name, p.value.shape(), table);
}

int64_t muon_row_blocks(const std::string& name, const GroupTable& table) {
  const GroupRule* r = table.match(name);
  return r && r->group == OptGroup::Muon ? r->row_blocks : 1;
}

}  // namespace dsv4
