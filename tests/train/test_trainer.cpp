// The training loop on a synthetic, learnable stream: loss falls, resume is bit-exact, NaN steps are skipped
// and stop the run after train.max_bad_steps.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>

#include "model/exec_path.h"
#include "runtime/safetensors.h"
#include "train/trainer.h"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

// Rows of an arithmetic token sequence with a row-dependent stride: next token = (token + stride) % V.
class PatternSource : public BatchSource {
 public:
  PatternSource(int64_t batch, int64_t seq, int64_t vocab) : batch_(batch), seq_(seq), vocab_(vocab) {}
  TrainBatch next() override {
    std::vector<int64_t> ids;
    for (int64_t b = 0; b < batch_; ++b) {
      const int64_t stride = 1 + (counter_ + b) % 3, start = (counter_ * 7 + b * 13) % vocab_;
      for (int64_t s = 0; s < seq_; ++s) ids.push_back((start + s * stride) % vocab_);
    }
    ++counter_;
    Tensor t = Tensor::from_vector<int64_t>({batch_ * seq_}, ids);
    return {t, t, SeqLayout(batch_, seq_)};
  }
  std::string state() const override { return std::to_string(counter_); }
  void restore(const std::string& s) override { counter_ = std::stoll(s); }
  std::string describe() const override { return "pattern"; }

 private:
  int64_t batch_, seq_, vocab_, counter_ = 0;
};

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() /
          ("dsv4_trainer_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir);
  }
  void TearDown() override { fs::remove_all(dir); }
  TrainConfig config(int64_t steps, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> o = {"train.out_dir=" + dir.string(), fmt::format("train.steps={}", steps),
                                  "optim.warmup_steps=2", "optim.lr=1e-2", "optim.min_lr=1e-3",
                                  "train.log_interval=5", "checkpoint.interval=0", "logging.tensorboard=false",
                                  "train.threads=1"};
    o.insert(o.end(), extra.begin(), extra.end());
    return parse_train_config("model:\n  preset: tiny\ndata:\n  train: [synthetic]\n  seq_len: 24\n", "test.yaml", o);
  }
  // 32 distinct tokens of the 2048-token vocabulary: the unigram restriction alone is worth ln(2048/32) = 4.2 nats.
  std::unique_ptr<BatchSource> source() { return std::make_unique<PatternSource>(2, 24, 32); }
  fs::path dir;
};

TEST_F(TrainerTest, LossFallsOnALearnableStream) {
  Trainer t(config(40), source(), nullptr);
  std::vector<double> losses;
  t.on_step = [&](const StepRecord& r) { losses.push_back(r.lm); };
  EXPECT_EQ(t.run(), 40);
  ASSERT_EQ(losses.size(), 40u);
  const double first = (losses[0] + losses[1]) / 2, last = (losses[38] + losses[39]) / 2;
  EXPECT_LT(last, first - 2.0) << "first " << first << " last " << last;
  EXPECT_NE(t.log_text().find("step 40/40 | loss"), std::string::npos);
  EXPECT_TRUE(fs::exists(dir / "metrics.jsonl"));
  EXPECT_TRUE(fs::exists(dir / "checkpoints" / "step_00000040" / "model.safetensors"));
}

TEST_F(TrainerTest, ResumeIsBitExact) {
  std::vector<StepRecord> straight;
  {
    Trainer t(config(8), source(), nullptr);
    t.on_step = [&](const StepRecord& r) { straight.push_back(r); };
    t.run();
  }
  fs::remove_all(dir);
  std::vector<StepRecord> resumed;
  {
    Trainer t(config(8, {"checkpoint.interval=3"}), source(), nullptr);
    t.on_step = [&](const StepRecord& r) {
      resumed.push_back(r);
      if (r.step == 5) Trainer::request_stop();  // as SIGTERM would: checkpoint at 5 and return
    };
    EXPECT_EQ(t.run(), 5);
  }
  {
    Trainer t(config(8, {"checkpoint.interval=3"}), source(), nullptr);  // resume: auto
    EXPECT_EQ(t.step(), 5);
    t.on_step = [&](const StepRecord& r) { resumed.push_back(r); };
    EXPECT_EQ(t.run(), 3);
  }
  ASSERT_EQ(resumed.size(), straight.size());
  for (size_t i = 0; i < straight.size(); ++i) {
    EXPECT_EQ(resumed[i].step, straight[i].step);
    EXPECT_EQ(resumed[i].loss, straight[i].loss) << "step " << i + 1;
    EXPECT_EQ(resumed[i].grad_norm, straight[i].grad_norm) << "step " << i + 1;
    EXPECT_EQ(resumed[i].lr, straight[i].lr) << "step " << i + 1;
  }
}

// The whole training loop on the tensor-op path (what train.device: cuda runs: every module, the loss, clipping, the
// Muon/AdamW ops, the bias update, checkpoints of device state) run on the CPU under ForceOpsPath: the same losses
// and final checkpoint bit for bit, with a resume half-way on the ops path. The gradient norm is summed in FP32 per
// tensor on the ops path (double on the CPU path): within 1e-6 relative, and the clip factor rounds to the same float.
TEST_F(TrainerTest, OpsPathRunEqualsTheReferenceBitForBit) {
  std::vector<StepRecord> ref, ops;
  {
    Trainer t(config(6), source(), nullptr);
    t.on_step = [&](const StepRecord& r) { ref.push_back(r); };
    t.run();
  }
  const std::string ref_ckpt = (dir / "checkpoints" / "step_00000006" / "model.safetensors").string();
  const Tensor ref_embed = SafetensorsFile::open(ref_ckpt).load("embed.weight");
  fs::remove_all(dir);
  {
    ForceOpsPath scope;
    {
      Trainer t(config(6, {"checkpoint.interval=3"}), source(), nullptr);
      t.on_step = [&](const StepRecord& r) {
        ops.push_back(r);
        if (r.step == 3) Trainer::request_stop();
      };
      EXPECT_EQ(t.run(), 3);
    }
    Trainer t(config(6, {"checkpoint.interval=3"}), source(), nullptr);
    EXPECT_EQ(t.step(), 3);
    t.on_step = [&](const StepRecord& r) { ops.push_back(r); };
    EXPECT_EQ(t.run(), 3);
  }
  ASSERT_EQ(ops.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_EQ(ops[i].loss, ref[i].loss) << "step " << i + 1;
    EXPECT_NEAR(ops[i].grad_norm, ref[i].grad_norm, 1e-6 * ref[i].grad_norm) << "step " << i + 1;
  }
  const Tensor ops_embed = SafetensorsFile::open(ref_ckpt).load("embed.weight");
  const auto a = ref_embed.to_floats(), b = ops_embed.to_floats();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << i;
}

TEST_F(TrainerTest, NonFiniteStepsAreSkippedThenStopTheRun) {
  Trainer t(config(10, {"train.max_bad_steps=3"}), source(), nullptr);
  t.train_step();
  t.save_checkpoint();
  t.model().visit([](Param& p) {
    if (p.name == "layers.0.attn.wq_a.weight") p.value.data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
  });
  const StepRecord bad = t.train_step();
  EXPECT_TRUE(bad.skipped);
  EXPECT_TRUE(std::isnan(t.model().layers[0]->attn.wq_a.weight.value.data<float>()[0]));  // no update applied
  t.train_step();
  try {
    t.train_step();
    FAIL() << "expected the run to stop";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("3 consecutive steps with NaN/Inf"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("step_00000001"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace dsv4

namespace dsv4 {
namespace {

// train.device: cuda on a machine (or build) without a GPU stops before anything is written, with one line saying why.
TEST_F(TrainerTest, CudaDeviceWithoutAGpuFailsClearly) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is visible";
  try {
    Trainer t(config(2, {"train.device=cuda"}), source(), nullptr);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("train.device: cuda, but"), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
  EXPECT_FALSE(fs::exists(dir / "checkpoints" / "step_00000001"));
}

}  // namespace
}  // namespace dsv4
