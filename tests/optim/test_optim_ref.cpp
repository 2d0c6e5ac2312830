// The Optimizer against tests/fixtures/optim/steps.safetensors: four steps on named parameters with per-step
// gradients and learning rates, computed by torch.optim.AdamW and a float64 torch Muon reference (see
// tests/ref/optim/gen_optim_fixtures.py), in the DeepSeek-V4 split ("mixed/") and AdamW everywhere ("adamw/").
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <sstream>

#include "optim/optimizer.h"
#include "optim_test_util.h"
#include "runtime/safetensors.h"

namespace dsv4 {
namespace {

using testing::max_rel;

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

class StepsFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    file = std::make_unique<SafetensorsFile>(
        SafetensorsFile::open(std::string(DSV4_FIXTURE_DIR) + "/optim/steps.safetensors"));
    const auto& md = file->metadata();
    for (const std::string& lr : split(md.at("lrs"), ',')) lrs.push_back(std::stod(lr));
    names = split(md.at("params"), ',');
    for (const std::string& kv : split(md.at("groups"), ',')) {
      const size_t eq = kv.find('=');
      groups[kv.substr(0, eq)] = group_from_name(kv.substr(eq + 1));
    }
    for (const std::string& nk : split(md.at("no_grad"), ',')) {
      const size_t at = nk.find('@');
      no_grad.insert({nk.substr(0, at), std::stoi(nk.substr(at + 1))});
    }
  }
  std::unique_ptr<SafetensorsFile> file;
  std::vector<double> lrs;
  std::vector<std::string> names;
  std::map<std::string, OptGroup> groups;
  std::set<std::pair<std::string, int>> no_grad;
};

TEST_P(StepsFixture, MatchesTorchReference) {
  const std::string scenario = GetParam();
  const bool all_adamw = scenario == "adamw";
  ASSERT_EQ(lrs.size(), 4u);
  ASSERT_EQ(names.size(), 10u);
  ASSERT_EQ(no_grad.size(), 2u);
  std::vector<Param> params;
  params.reserve(names.size());
  for (const std::string& n : names) {
    const Tensor w0 = file->load(scenario + "/" + n + "/w0");
    Param p(n, w0.shape());
    p.value.copy_from(w0);
    params.push_back(std::move(p));
  }
  std::vector<Param*> ptrs;
  for (Param& p : params) ptrs.push_back(&p);
  OptimizerConfig cfg;  // defaults are the fixture's hyper-parameters (checked in the metadata below)
  if (all_adamw) cfg.groups.mode = OptimizerMode::AdamW;
  EXPECT_NE(file->metadata().at("muon").find("\"gamma\": 0.18"), std::string::npos);
  EXPECT_NE(file->metadata().at("adamw").find("\"eps\": 1e-20"), std::string::npos);
  Optimizer opt(ptrs, cfg);
  // The default rule table assigns the groups the reference used.
  for (const std::string& n : names)
    EXPECT_EQ(opt.group(n), all_adamw ? OptGroup::AdamW : groups.at(n)) << n;

  for (size_t k = 0; k < lrs.size(); ++k) {
    for (Param& p : params) {
      if (no_grad.count({p.name, static_cast<int>(k)})) {
        p.grad = Tensor();  // no gradient this step: the reference skipped it
      } else {
        p.grad_buffer().copy_from(file->load(scenario + "/" + p.name + "/grad." + std::to_string(k)));
      }
    }
    const std::vector<std::vector<float>> before = [&] {
      std::vector<std::vector<float>> b;
      for (Param& p : params) b.push_back(p.value.to_floats());
      return b;
    }();
    const OptimizerStepStats st = opt.step(lrs[k]);
    int64_t skips = 0;
    for (const auto& [n, step] : no_grad) skips += step == static_cast<int>(k);
    EXPECT_EQ(st.skipped, skips);
    EXPECT_EQ(st.muon + st.adamw + st.skipped, static_cast<int64_t>(params.size()));
    for (size_t i = 0; i < params.size(); ++i) {
      const Param& p = params[i];
      const std::vector<float> want = file->load(scenario + "/" + p.name + "/w." + std::to_string(k)).to_floats();
      const std::vector<float> got = p.value.to_floats();
      EXPECT_LT(max_rel(got, want), 1e-6) << scenario << " " << p.name << " step " << k;
      if (no_grad.count({p.name, static_cast<int>(k)})) {
        EXPECT_EQ(got, before[i]) << p.name << " has no gradient at step " << k << " and must not move";
        continue;
      }
      // The update itself (w_k - w_{k-1}) must agree closely too, not just the weights.
      std::vector<float> du(got.size()), dw(got.size());
      for (size_t e = 0; e < got.size(); ++e) {
        du[e] = got[e] - before[i][e];
        dw[e] = want[e] - before[i][e];
      }
      EXPECT_LT(max_rel(du, dw), 2e-5) << scenario << " " << p.name << " update of step " << k;
    }
  }
  EXPECT_EQ(opt.steps(), 4);
  // Final optimizer state against torch's.
  const std::map<std::string, Tensor> state = opt.state_dict();
  for (const std::string& n : names) {
    const std::string base = scenario + "/" + n;
    const int64_t want_step = file->load(base + "/step").data<int64_t>()[0];
    EXPECT_EQ(opt.param_step(n), want_step) << n;
    EXPECT_EQ(state.at(n + "/step").data<int64_t>()[0], want_step) << n;
    if (opt.group(n) == OptGroup::Muon) {
      EXPECT_LT(max_rel(state.at(n + "/momentum").to_floats(), file->load(base + "/momentum").to_floats()), 1e-6) << n;
    } else {
      EXPECT_LT(max_rel(state.at(n + "/exp_avg").to_floats(), file->load(base + "/exp_avg").to_floats()), 1e-6) << n;
      EXPECT_LT(max_rel(state.at(n + "/exp_avg_sq").to_floats(), file->load(base + "/exp_avg_sq").to_floats()), 1e-6)
          << n;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Scenarios, StepsFixture, ::testing::Values("mixed", "adamw"));

}  // namespace
}  // namespace dsv4
