// Parity with Hugging Face transformers DeepseekV4 (FP32) on the committed fixtures written by
// tests/ref/model/gen_model_fixtures.py: logits, loss and the gradient of every parameter.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "model/hf_names.h"
#include "model/model.h"
#include "runtime/safetensors.h"

namespace dsv4 {
namespace {

struct Fixture {
  ModelConfig cfg;
  std::map<std::string, Tensor> params_hf;  // transformers names
  std::map<std::string, Tensor> grads_hf;   // transformers names (without "grad.")
  Tensor input_ids, labels, logits;
  double loss = 0;
};

Fixture load_fixture(const std::string& name) {
  const std::string base = std::string(DSV4_FIXTURE_DIR) + "/model/" + name;
  std::ifstream in(base + ".config.json");
  EXPECT_TRUE(in.good()) << base;
  std::stringstream ss;
  ss << in.rdbuf();
  Fixture f;
  f.cfg = model_config_from_json_text(ss.str(), base + ".config.json");
  const SafetensorsFile file = SafetensorsFile::open(base + ".safetensors");
  for (const std::string& n : file.names()) {
    if (n == "input_ids") f.input_ids = file.load(n);
    else if (n == "labels") f.labels = file.load(n);
    else if (n == "logits") f.logits = file.load(n);
    else if (n == "loss") f.loss = file.load(n).item();
    else if (n.rfind("grad.", 0) == 0) f.grads_hf[n.substr(5)] = file.load(n);
    else if (n.rfind("debug.", 0) == 0) continue;
    else f.params_hf[n] = file.load(n);
  }
  return f;
}

double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (static_cast<double>(got[i]) - ref[i]) * (static_cast<double>(got[i]) - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

void check_parity(const std::string& name) {
  const Fixture f = load_fixture(name);
  Model model(f.cfg);
  model.load_state(hf_state_to_native(f.params_hf), name);
  const int64_t B = f.input_ids.size(0), S = f.input_ids.size(1);
  const SeqLayout layout(B, S);
  const LossResult r = model.forward_backward(f.input_ids.view({B * S}), f.labels.view({B * S}), layout,
                                              LossWeights{/*mtp=*/0.0, /*balance_alpha=*/0.0});

  // Logits: max abs error <= 1e-4.
  const auto got = r.output.logits_TV.to_floats(), ref = f.logits.to_floats();
  ASSERT_EQ(got.size(), ref.size());
  double max_abs = 0;
  for (size_t i = 0; i < got.size(); ++i) max_abs = std::max(max_abs, std::abs(static_cast<double>(got[i]) - ref[i]));
  EXPECT_LE(max_abs, 1e-4) << name << ": logits max abs error";
  // Loss: <= 1e-5 relative.
  EXPECT_LE(std::abs(r.lm - f.loss) / std::abs(f.loss), 1e-5) << name << ": loss " << r.lm << " vs " << f.loss;

  // Gradients: every parameter <= 1e-4 relative (norm-wise); report the worst.
  const auto ref_grads = hf_state_to_native(f.grads_hf);
  double worst = 0;
  std::string worst_name;
  int compared = 0;
  model.visit([&](Param& p) {
    auto it = ref_grads.find(p.name);
    if (it == ref_grads.end()) {
      // No reference gradient: the indexer (top-k is not differentiable) and buffers. Ours must be zero.
      if (p.grad.defined())
        for (float g : p.grad.to_floats()) ASSERT_EQ(g, 0.0f) << name << ": " << p.name << " has a gradient";
      return;
    }
    // An expert no token reached has no gradient buffer: that is a zero gradient.
    const auto g = p.grad.defined() ? p.grad.to_floats() : std::vector<float>(static_cast<size_t>(p.value.numel()), 0.0f);
    const double e = rel_err(g, it->second.to_floats());
    ++compared;
    if (e > worst) {
      worst = e;
      worst_name = p.name;
    }
    EXPECT_LE(e, 1e-4) << name << ": gradient of " << p.name;
  });
  EXPECT_EQ(compared, static_cast<int>(ref_grads.size())) << name << ": every reference gradient is compared";
  std::printf("[parity %s] logits max abs err %.3g, loss %.8f vs %.8f, %d gradients, worst %.3g (%s)\n",
              name.c_str(), max_abs, r.lm, f.loss, compared, worst, worst_name.c_str());
}

TEST(Parity, TinyA) { check_parity("dsv4_tiny_a"); }
TEST(Parity, TinyB) { check_parity("dsv4_tiny_b"); }

}  // namespace
}  // namespace dsv4
