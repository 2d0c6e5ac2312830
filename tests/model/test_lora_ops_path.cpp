// LoRA on the tensor-op path (lora.h's tensor forms, the path CUDA tensors take) against the raw-pointer cores, on
// the CPU under ForceOpsPath: a Linear with an adapter on an F32 or frozen FP8 base, without and with dropout, with a
// strided input; output, dx, dA, dB bit-identical (the same CPU GEMMs in the same order; hashed_dropout is
// lora_dropout_keep's mask). And the hashed_dropout op itself against lora_dropout_keep element by element.
#include <gtest/gtest.h>

#include <random>

#include "fd_check.h"
#include "model/exec_path.h"
#include "model/layers.h"
#include "model/lora.h"
#include "runtime/model_ops.h"

namespace dsv4 {
namespace {

void expect_bits(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  const auto x = a.to_floats(), y = b.to_floats();
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(x[i], y[i]) << what << " element " << i;
}

struct LinearRun {
  Tensor y, dx, dA, dB;
};

LinearRun run_linear(bool frozen, double dropout, bool ops_path) {
  std::mt19937 rng(3);
  Linear lin("x.weight", 40, 33);
  lin.weight.value = testing::random_tensor({33, 40}, rng, 0.5f);
  if (frozen) lin.set_frozen(quantize_weight(lin.weight.value, WeightFormat::FP8, ScaleFormat::E8M0, "x"));
  lin.lora.emplace("x", 4, 40, 33, 1.7, dropout, 99);
  LoraAdapter& ad = *lin.lora;
  ad.train = true;
  ad.A.value = testing::random_tensor({4, 40}, rng, 0.4f);
  ad.B.value = testing::random_tensor({33, 4}, rng, 0.4f);
  ad.draws = 3;
  const Tensor wide = testing::random_tensor({9, 50}, rng);
  const Tensor x = wide.slice(1, 5, 45);  // a strided input
  const Tensor dy = testing::random_tensor({9, 33}, rng);
  std::optional<ForceOpsPath> scope;
  if (ops_path) scope.emplace();
  LinearCtx ctx;
  LinearRun r;
  r.y = lin.forward(x, &ctx);
  r.dx = lin.backward(dy, ctx);
  r.dA = ad.A.grad;
  r.dB = ad.B.grad;
  return r;
}

TEST(LoraOpsPath, LinearAdapterBitIdenticalToCores) {
  for (bool frozen : {false, true})
    for (double p : {0.0, 0.3}) {
      SCOPED_TRACE(std::string(frozen ? "fp8 base" : "f32 base") + " dropout " + std::to_string(p));
      const LinearRun ref = run_linear(frozen, p, false), got = run_linear(frozen, p, true);
      expect_bits(ref.y, got.y, "y");
      expect_bits(ref.dx, got.dx, "dx");
      expect_bits(ref.dA, got.dA, "dA");
      expect_bits(ref.dB, got.dB, "dB");
    }
}

TEST(LoraOpsPath, HashedDropoutIsTheAdaptersMask) {
  LoraAdapter ad("u", 2, 70, 3, 1.0, 0.35, 1234);
  ad.train = true;
  std::mt19937 rng(5);
  const Tensor wide = testing::random_tensor({6, 80}, rng);
  const Tensor x = wide.slice(1, 3, 73);
  const uint64_t draw = 7, offset = 1000;
  const float ks = static_cast<float>(1.0 / (1.0 - 0.35));
  const Tensor d = hashed_dropout(x, dropout_stream(ad.dropout_key, draw), 0.35, ks, offset);
  const auto xv = x.contiguous().to_floats(), dv = d.to_floats();
  int64_t dropped = 0;
  for (int64_t i = 0; i < 6 * 70; ++i) {
    const bool keep = lora_dropout_keep(ad, draw, offset + static_cast<uint64_t>(i));
    dropped += keep ? 0 : 1;
    ASSERT_EQ(dv[static_cast<size_t>(i)], keep ? xv[static_cast<size_t>(i)] * ks : 0.0f) << i;
  }
  EXPECT_GT(dropped, 100);  // about 35% of 420
  EXPECT_LT(dropped, 200);
}

}  // namespace
}  // namespace dsv4

#include "model/checkpoint_io.h"
#include "test_lora_util.h"

namespace dsv4 {
namespace {

// A LoRA run as the trainer sets it up (release-format tiny checkpoint: FP8 dense + FP4 experts, loaded frozen with
// wo_a FP8 too; adapters on every attention site incl. wo_a per group, shared and routed experts and the router;
// dropout on): forward_backward on the tensor-op path equals the reference bit for bit (losses and every adapter
// gradient).
TEST(LoraOpsPath, FrozenReleaseModelWithAdaptersBitIdentical) {
  lora_test::TmpDir d("ops_path");
  auto build = [&](bool write) {
    auto m = lora_test::adapted_release_model(d.str(), write);
    lora_test::fill_B(*m, 8, 0.05f);
    return m;
  };
  const SeqLayout layout(2, 17);
  const Tensor ids = lora_test::random_ids(layout.tokens(), 2048, 2);
  const LossWeights w{0.3, 1e-3};
  auto ref_m = build(true), ops_m = build(false);
  const LossResult ref = ref_m->forward_backward(ids, ids, layout, w);
  LossResult got;
  {
    ForceOpsPath scope;
    got = ops_m->forward_backward(ids, ids, layout, w);
  }
  EXPECT_EQ(got.total, ref.total);
  EXPECT_EQ(got.lm, ref.lm);
  const std::vector<Param*> a = lora_params(*ref_m), b = lora_params(*ops_m);
  ASSERT_EQ(a.size(), b.size());
  ASSERT_GT(a.size(), 20u);
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(a[i]->grad.defined()) << a[i]->name;
    expect_bits(a[i]->grad, b[i]->grad, a[i]->name);
  }
}

}  // namespace
}  // namespace dsv4
