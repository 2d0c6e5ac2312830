// Optimizer group assignment: glob rules, rule parsing, and the DeepSeek-V4 split on the tiny model's parameters.
#include <gtest/gtest.h>

#include <map>

#include "optim/groups.h"
#include "optim/optimizer.h"

namespace dsv4 {
namespace {

TEST(Glob, Matches) {
  EXPECT_TRUE(glob_match("embed.weight", "embed.weight"));
  EXPECT_FALSE(glob_match("embed.weight", "xembed.weight"));
  EXPECT_FALSE(glob_match("head.weight", "mtp.0.head.weight"));
  EXPECT_TRUE(glob_match("*norm.weight", "norm.weight"));
  EXPECT_TRUE(glob_match("*norm.weight", "layers.3.attn.compressor.norm.weight"));
  EXPECT_FALSE(glob_match("*norm.weight", "layers.3.attn.norm.weight.x"));
  EXPECT_TRUE(glob_match("*hc_*_fn", "mtp.0.hc_head_fn"));
  EXPECT_TRUE(glob_match("*hc_*_fn", "hc_attn_fn"));
  EXPECT_FALSE(glob_match("*hc_*_fn", "layers.0.hc_attn_base"));
  EXPECT_TRUE(glob_match("*", ""));
  EXPECT_TRUE(glob_match("a*b*c", "aXXbYYbc"));
  EXPECT_FALSE(glob_match("a*b*c", "aXXbYYbcd"));
  EXPECT_TRUE(glob_match("**x", "x"));
}

TEST(GroupRules, ParseAndFormat) {
  GroupRule r = parse_group_rule(" *.attn_sink = AdamW ");
  EXPECT_EQ(r.pattern, "*.attn_sink");
  EXPECT_EQ(r.group, OptGroup::AdamW);
  EXPECT_EQ(r.row_blocks, 1);
  r = parse_group_rule("*.attn.wo_a.weight=muon/8");
  EXPECT_EQ(r.group, OptGroup::Muon);
  EXPECT_EQ(r.row_blocks, 8);
  EXPECT_EQ(format_group_rule(r), "*.attn.wo_a.weight=muon/8");
  EXPECT_EQ(parse_group_rule("layers.0.*=none").group, OptGroup::None);
  EXPECT_THROW(parse_group_rule("no-equals"), Error);
  EXPECT_THROW(parse_group_rule("x=sgd"), Error);
  EXPECT_THROW(parse_group_rule("x=adamw/2"), Error);
  EXPECT_THROW(parse_group_rule("x=muon/0"), Error);
  EXPECT_THROW(parse_group_rule("=muon"), Error);
  try {
    group_from_name("lion");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("muon, adamw, none"), std::string::npos) << e.what();
  }
}

TEST(GroupRules, DefaultTableByNameAndShape) {
  const GroupTable t = GroupTable::deepseek_v4();
  EXPECT_EQ(group_of("embed.weight", Shape{10, 4}, t), OptGroup::AdamW);
  EXPECT_EQ(group_of("head.weight", Shape{10, 4}, t), OptGroup::AdamW);
  EXPECT_EQ(group_of("layers.2.attn.wq_b.weight", Shape{10, 4}, t), OptGroup::Muon);
  EXPECT_EQ(group_of("layers.2.ffn.experts.5.w3.weight", Shape{8, 4}, t), OptGroup::Muon);
  EXPECT_EQ(group_of("layers.2.hc_ffn_fn", Shape{24, 256}, t), OptGroup::Muon);
  EXPECT_EQ(group_of("layers.2.hc_ffn_base", Shape{24}, t), OptGroup::AdamW);
  EXPECT_EQ(group_of("layers.2.hc_ffn_scale", Shape{3}, t), OptGroup::AdamW);
  EXPECT_EQ(group_of("layers.2.attn.compressor.ape", Shape{4, 64}, t), OptGroup::AdamW);  // 2-D but AdamW
  EXPECT_EQ(group_of("something.bias", Shape{7}, t), OptGroup::AdamW);                   // 1-D fallback
  EXPECT_EQ(group_of("something.weight", Shape{7, 3}, t), OptGroup::Muon);               // 2-D fallback
  EXPECT_EQ(group_of("something.weight", Shape{2, 7, 3}, t), OptGroup::AdamW);           // not a matrix
  // AdamW everywhere keeps the None decisions (made from the Param) and turns Muon into AdamW.
  const GroupTable a = GroupTable::adamw_everywhere();
  EXPECT_EQ(group_of("layers.2.attn.wq_b.weight", Shape{10, 4}, a), OptGroup::AdamW);
  EXPECT_EQ(group_of("layers.2.hc_ffn_fn", Shape{24, 256}, a), OptGroup::AdamW);
  // A Muon rule on a non-matrix is an error naming the rule and the parameter.
  GroupTable bad;
  bad.rules = {parse_group_rule("*.attn_sink=muon")};
  try {
    group_of("layers.0.attn.attn_sink", Shape{4}, bad);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.0.attn.attn_sink"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("*.attn_sink=muon"), std::string::npos) << e.what();
  }
  bad.rules = {parse_group_rule("x=muon/3")};
  EXPECT_THROW(group_of("x", Shape{4, 4}, bad), Error);
}

TEST(GroupRules, ParamLevelNone) {
  Param p("layers.3.ffn.gate.bias", Shape{8});
  EXPECT_EQ(group_of(p), OptGroup::AdamW);  // by name and shape...
  p.trainable = false;
  EXPECT_EQ(group_of(p), OptGroup::None);  // ...but it is not gradient-trained
  Param t;
  t.name = "layers.0.ffn.gate.tid2eid";
  t.value = Tensor::zeros(Shape{16, 2}, DType::I64);
  EXPECT_EQ(group_of(t), OptGroup::None);  // non-F32
}

TEST(GroupRules, TinyModelAssignment) {
  const ModelConfig cfg = model_preset("tiny");
  Model model(cfg);
  Optimizer opt(model, OptimizerConfig::for_model(cfg));
  std::map<std::string, OptGroup> g;
  std::map<std::string, Shape> shape;
  std::map<std::string, bool> trainable;
  model.visit([&](Param& p) {
    g[p.name] = opt.group(p.name);
    shape[p.name] = p.value.shape();
    trainable[p.name] = p.trainable && p.value.dtype() == DType::F32;
  });
  // Spot checks of every category of the report's split.
  const std::map<std::string, OptGroup> expect = {
      {"embed.weight", OptGroup::AdamW},
      {"head.weight", OptGroup::AdamW},
      {"norm.weight", OptGroup::AdamW},
      {"hc_head_fn", OptGroup::Muon},
      {"hc_head_base", OptGroup::AdamW},
      {"hc_head_scale", OptGroup::AdamW},
      {"layers.0.attn_norm.weight", OptGroup::AdamW},
      {"layers.0.ffn_norm.weight", OptGroup::AdamW},
      {"layers.0.attn.q_norm.weight", OptGroup::AdamW},
      {"layers.0.attn.kv_norm.weight", OptGroup::AdamW},
      {"layers.0.attn.attn_sink", OptGroup::AdamW},
      {"layers.0.attn.wq_a.weight", OptGroup::Muon},
      {"layers.0.attn.wq_b.weight", OptGroup::Muon},
      {"layers.0.attn.wkv.weight", OptGroup::Muon},
      {"layers.0.attn.wo_a.weight", OptGroup::Muon},
      {"layers.0.attn.wo_b.weight", OptGroup::Muon},
      {"layers.0.hc_attn_fn", OptGroup::Muon},
      {"layers.0.hc_attn_base", OptGroup::AdamW},
      {"layers.0.hc_attn_scale", OptGroup::AdamW},
      {"layers.0.hc_ffn_fn", OptGroup::Muon},
      {"layers.0.ffn.gate.weight", OptGroup::Muon},
      {"layers.0.ffn.gate.tid2eid", OptGroup::None},
      {"layers.0.ffn.experts.0.w1.weight", OptGroup::Muon},
      {"layers.0.ffn.experts.7.w2.weight", OptGroup::Muon},
      {"layers.0.ffn.shared_experts.w3.weight", OptGroup::Muon},
      {"layers.1.attn.compressor.wkv.weight", OptGroup::Muon},
      {"layers.1.attn.compressor.wgate.weight", OptGroup::Muon},
      {"layers.1.attn.compressor.ape", OptGroup::AdamW},
      {"layers.1.attn.compressor.norm.weight", OptGroup::AdamW},
      {"layers.1.attn.indexer.wq_b.weight", OptGroup::None},  // the indexer is frozen (trainable = false)
      {"layers.1.attn.indexer.weights_proj.weight", OptGroup::None},
      {"layers.1.attn.indexer.compressor.ape", OptGroup::None},
      {"layers.2.attn.compressor.ape", OptGroup::AdamW},
      {"layers.3.ffn.gate.bias", OptGroup::None},
      {"mtp.0.e_proj.weight", OptGroup::Muon},
      {"mtp.0.h_proj.weight", OptGroup::Muon},
      {"mtp.0.enorm.weight", OptGroup::AdamW},
      {"mtp.0.hnorm.weight", OptGroup::AdamW},
      {"mtp.0.norm.weight", OptGroup::AdamW},
      {"mtp.0.hc_head_fn", OptGroup::Muon},
      {"mtp.0.hc_head_base", OptGroup::AdamW},
      {"mtp.0.ffn.gate.bias", OptGroup::None},
      {"mtp.0.ffn.experts.3.w1.weight", OptGroup::Muon},
  };
  for (const auto& [name, want] : expect) {
    ASSERT_TRUE(g.count(name)) << name;
    EXPECT_EQ(g[name], want) << name;
  }
  // wo_a holds o_groups independent per-group projections: Muon treats each row block as its own matrix.
  EXPECT_EQ(opt.row_blocks("layers.2.attn.wo_a.weight"), cfg.o_groups);
  EXPECT_EQ(opt.row_blocks("mtp.0.attn.wo_a.weight"), cfg.o_groups);
  EXPECT_EQ(opt.row_blocks("layers.2.attn.wo_b.weight"), 1);
  EXPECT_EQ(opt.row_blocks("embed.weight"), 0);
  Optimizer plain(model, OptimizerConfig{});  // the name-only default table does not split
  EXPECT_EQ(plain.row_blocks("layers.2.attn.wo_a.weight"), 1);
  // Invariants over every parameter: Muon only for trainable F32 matrices; None exactly for the untrained ones;
  // every 1-D trainable parameter in AdamW.
  int64_t muon = 0, adamw = 0, none = 0, experts = 0;
  for (const auto& [name, grp] : g) {
    if (grp == OptGroup::Muon) {
      ++muon;
      EXPECT_EQ(shape[name].ndim(), 2) << name;
    }
    if (grp == OptGroup::AdamW) ++adamw;
    if (grp == OptGroup::None) ++none;
    EXPECT_EQ(grp == OptGroup::None, !trainable[name]) << name;
    if (trainable[name] && shape[name].ndim() == 1) EXPECT_EQ(grp, OptGroup::AdamW) << name;
    if (name.find(".experts.") != std::string::npos) {
      ++experts;
      EXPECT_EQ(grp, OptGroup::Muon) << name;  // each routed expert matrix is its own Muon matrix
    }
  }
  EXPECT_EQ(experts, (cfg.n_layers + 1) * cfg.n_routed_experts * 3);
  EXPECT_EQ(muon, opt.count(OptGroup::Muon));
  EXPECT_EQ(adamw, opt.count(OptGroup::AdamW));
  EXPECT_EQ(none, opt.count(OptGroup::None));
  EXPECT_EQ(muon + adamw + none, static_cast<int64_t>(g.size()));

  // AdamW everywhere: the same None set, everything else AdamW.
  Optimizer all(model, OptimizerConfig::for_model(cfg, OptimizerMode::AdamW));
  EXPECT_EQ(all.count(OptGroup::Muon), 0);
  EXPECT_EQ(all.count(OptGroup::AdamW), muon + adamw);
  EXPECT_EQ(all.count(OptGroup::None), none);

  // A configurable table: freeze the sinks, AdamW for wq_a.
  OptimizerConfig custom = OptimizerConfig::for_model(cfg);
  custom.groups.rules.insert(custom.groups.rules.begin(),
                             {parse_group_rule("*.attn_sink=none"), parse_group_rule("*.wq_a.weight=adamw")});
  Optimizer c(model, custom);
  EXPECT_EQ(c.group("layers.2.attn.attn_sink"), OptGroup::None);
  EXPECT_EQ(c.group("mtp.0.attn.wq_a.weight"), OptGroup::AdamW);
  EXPECT_EQ(c.group("mtp.0.attn.wq_b.weight"), OptGroup::Muon);
}

}  // namespace
}  // namespace dsv4
