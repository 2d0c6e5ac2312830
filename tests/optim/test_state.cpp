// Optimizer state: save -> load restores a run bit for bit (also through a safetensors file), and mismatched
// state is rejected with one error naming every problem.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "optim/optimizer.h"
#include "optim_test_util.h"
#include "runtime/safetensors.h"

namespace dsv4 {
namespace {

std::map<std::string, Tensor> param_values(Model& m) {
  std::map<std::string, Tensor> out;
  m.visit([&](Param& p) { out[p.name] = p.value.clone(); });
  return out;
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.contiguous().raw_data(), b.contiguous().raw_data(), static_cast<size_t>(a.nbytes())) == 0;
}

TEST(OptimizerState, RoundTripIsBitExact) {
  const ModelConfig cfg = testing::tiny_optim_cfg();
  const auto opt_cfg = OptimizerConfig::for_model(cfg);
  Model a(cfg);
  a.init_random(1, 0.05);
  Optimizer oa(a, opt_cfg);
  for (int k = 0; k < 2; ++k) {
    testing::set_pseudo_grads(a, k);
    oa.step(1e-3 * (k + 1));
  }
  // Checkpoint: parameters and optimizer state, through a safetensors file.
  const std::map<std::string, Tensor> params = param_values(a);
  const std::map<std::string, Tensor> state = oa.state_dict();
  const std::string path = ::testing::TempDir() + "/optim_state_roundtrip.safetensors";
  {
    std::vector<std::pair<std::string, Tensor>> tensors(state.begin(), state.end());
    write_safetensors(path, tensors);
  }
  // The uninterrupted run continues.
  for (int k = 2; k < 4; ++k) {
    testing::set_pseudo_grads(a, k);
    oa.step(1e-3 * (k + 1));
  }
  // A fresh model/optimizer resumes from the checkpoint.
  Model b(cfg);
  b.load_state(params, "test params");
  Optimizer ob(b, opt_cfg);
  std::map<std::string, Tensor> loaded;
  const SafetensorsFile f = SafetensorsFile::open(path);
  for (const std::string& n : f.names()) loaded[n] = f.load(n);
  ob.load_state_dict(loaded, path);
  EXPECT_EQ(ob.steps(), 2);
  EXPECT_EQ(ob.param_step("layers.1.attn.attn_sink"), 1);  // skipped on step 1
  EXPECT_EQ(ob.param_step("layers.1.attn.wq_a.weight"), 2);
  for (const auto& [k, t] : ob.state_dict()) EXPECT_TRUE(bit_equal(t, state.at(k))) << k;
  for (int k = 2; k < 4; ++k) {
    testing::set_pseudo_grads(b, k);
    ob.step(1e-3 * (k + 1));
  }
  const auto va = param_values(a), vb = param_values(b);
  int64_t compared = 0;
  for (const auto& [n, t] : va) {
    EXPECT_TRUE(bit_equal(t, vb.at(n))) << n;
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int64_t>(va.size()));
  const auto sa = oa.state_dict(), sb = ob.state_dict();
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [k, t] : sa) EXPECT_TRUE(bit_equal(t, sb.at(k))) << k;
  // The run actually moved the parameters (and Muon and AdamW both had state).
  EXPECT_FALSE(bit_equal(va.at("layers.0.attn.wq_a.weight"), params.at("layers.0.attn.wq_a.weight")));
  EXPECT_FALSE(bit_equal(va.at("embed.weight"), params.at("embed.weight")));
  EXPECT_TRUE(sa.count("layers.0.attn.wq_a.weight/momentum"));
  EXPECT_TRUE(sa.count("embed.weight/exp_avg_sq"));
  EXPECT_FALSE(sa.count("layers.3.ffn.gate.bias/step"));  // None group: no state
  std::filesystem::remove(path);
}

TEST(OptimizerState, MismatchesAreReportedTogether) {
  const ModelConfig cfg = testing::tiny_optim_cfg();
  Model m(cfg);
  Optimizer muon(m, OptimizerConfig::for_model(cfg));
  std::map<std::string, Tensor> st = muon.state_dict();
  st.erase("layers.0.attn.wq_a.weight/momentum");                          // missing
  st["layers.0.attn_norm.weight/exp_avg"] = Tensor::zeros(Shape{3}, DType::F32);  // wrong shape
  st["bogus/thing"] = Tensor::zeros(Shape{1}, DType::F32);                 // unexpected
  st["embed.weight/step"] = Tensor::zeros(Shape{1}, DType::F32);           // wrong dtype
  Optimizer fresh(m, OptimizerConfig::for_model(cfg));
  try {
    fresh.load_state_dict(st, "ckpt/optimizer.safetensors");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* part : {"ckpt/optimizer.safetensors", "layers.0.attn.wq_a.weight/momentum",
                             "layers.0.attn_norm.weight/exp_avg", "bogus/thing", "embed.weight/step", "1 missing",
                             "1 unexpected", "2 mis-shaped"})
      EXPECT_NE(msg.find(part), std::string::npos) << part << " not in: " << msg;
  }
  EXPECT_EQ(fresh.steps(), 0);  // nothing was loaded

  // AdamW-everywhere state into a Muon/AdamW optimizer: named as the other group's state.
  Optimizer adamw(m, OptimizerConfig::for_model(cfg, OptimizerMode::AdamW));
  try {
    fresh.load_state_dict(adamw.state_dict(), "adamw run");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("layers.0.attn.wq_a.weight/exp_avg (adamw state, but the parameter is in group muon here)"),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("layers.0.attn.wq_a.weight/momentum"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace dsv4
