// Optimizer groups: which update rule moves each parameter, decided from its name and shape by a small rule table
// (DeepSeek-V4 report, dsv4-architecture.md §4):
//   Muon  : 2-D matrices (attention/compressor/indexer projections, MoE gate, each routed expert's w1/w2/w3
//           separately, shared experts, MTP e_proj/h_proj, mHC hc_*_fn);
//   AdamW : embedding (embed.weight), output head (head.weight), every RMSNorm weight (*norm.weight), mHC static
//           biases and gating factors (hc_*_base, hc_*_scale), attention sinks, compressor position biases (ape),
//           and any other non-matrix parameter;
//   None  : not moved by gradients: trainable == false (MoE gate.bias, moved by the aux-loss-free rule; the frozen
//           indexer), and non-F32 values (hash-routing tables gate.tid2eid).
//
// A table is an ordered list of (glob pattern, group) rules, first match wins; `*` matches any run of characters
// (dots included), everything else matches itself. A name no rule matches falls back to its shape: 2-D -> Muon,
// otherwise AdamW. In AdamW-everywhere mode every Muon result becomes AdamW (None stays None).
//
// A Muon rule may split a matrix into `row_blocks` equal row blocks that Muon treats as independent matrices
// (attention wo_a [G*R, H*C/G] holds G separate per-group projections; OptimizerConfig::for_model adds that rule).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/param.h"

namespace dsv4 {

enum class OptGroup : uint8_t { None, Muon, AdamW };

std::string_view group_name(OptGroup g);             // "none", "muon", "adamw"
OptGroup group_from_name(std::string_view name);     // case-insensitive; throws naming the valid names

enum class OptimizerMode : uint8_t { MuonAdamW, AdamW };
std::string_view optimizer_mode_name(OptimizerMode m);  // "muon_adamw", "adamw"
OptimizerMode optimizer_mode_from_name(std::string_view name);

struct GroupRule {
  std::string pattern;
  OptGroup group = OptGroup::AdamW;
  int64_t row_blocks = 1;  // Muon only: independent equal row blocks

  bool operator==(const GroupRule&) const = default;
};

// "pattern=group" or "pattern=muon/ROWBLOCKS", e.g. "*.attn_sink=adamw", "*.attn.wo_a.weight=muon/8",
// "layers.0.*=none". Throws naming the text on a malformed rule.
GroupRule parse_group_rule(std::string_view text);
std::string format_group_rule(const GroupRule& r);

// True when `name` matches the glob `pattern` (`*` = any run of characters, possibly empty).
bool glob_match(std::string_view pattern, std::string_view name);

struct GroupTable {
  std::vector<GroupRule> rules;  // first match wins; no match -> 2-D Muon, else AdamW
  OptimizerMode mode = OptimizerMode::MuonAdamW;

  // The DeepSeek-V4 split. wo_a_groups > 1 adds "*.attn.wo_a.weight=muon/wo_a_groups".
  static GroupTable deepseek_v4(int64_t wo_a_groups = 1);
  static GroupTable adamw_everywhere();

  const GroupRule* match(std::string_view name) const;  // null when no rule matches
};

// The group of a parameter by name and shape alone (no trainable/dtype check). Throws when a rule puts a
// non-2-D parameter in Muon, or its row_blocks does not divide the rows.
OptGroup group_of(const std::string& name, const Shape& shape, const GroupTable& table = GroupTable::deepseek_v4());
// As above, but None for trainable == false or a non-F32 value.
OptGroup group_of(const Param& p, const GroupTable& table = GroupTable::deepseek_v4());
// Muon row blocks for a parameter the table puts in Muon (1 when no rule says otherwise).
int64_t muon_row_blocks(const std::string& name, const GroupTable& table);

}  // namespace dsv4
