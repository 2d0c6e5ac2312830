// dsv4-train configuration: defaults, types, ranges, unknown keys with hints, overrides, round trip.
#include <gtest/gtest.h>

#include "runtime/error.h"
#include "train/train_config.h"

namespace dsv4 {
namespace {

const char* kMinimal = R"(
model:
  preset: tiny
data:
  train: [data/corpus.h5]
  seq_len: 128
optim:
  lr: 1e-3
  warmup_steps: 10
train:
  steps: 200
)";

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(TrainConfig, ParsesValuesAndKeepsDefaults) {
  const TrainConfig c = parse_train_config(kMinimal, "run.yaml");
  EXPECT_EQ(c.model.preset, "tiny");
  EXPECT_EQ(c.data.train, std::vector<std::string>{"data/corpus.h5"});
  EXPECT_EQ(c.data.seq_len, 128);
  EXPECT_DOUBLE_EQ(c.optim.lr, 1e-3);
  EXPECT_EQ(c.train.steps, 200);
  EXPECT_EQ(c.optim.type, "muon");         // default
  EXPECT_DOUBLE_EQ(c.optim.eps, 1e-20);    // DeepSeek's AdamW epsilon
  EXPECT_DOUBLE_EQ(c.loss.mtp_weight, 0.3);
}

TEST(TrainConfig, UnknownKeysNameTheClosestValidOne) {
  std::string msg = error_of([] { parse_train_config("optim:\n  lrr: 1\n", "run.yaml"); });
  EXPECT_NE(msg.find("run.yaml:2: unknown key 'optim.lrr' (did you mean 'lr'?)"), std::string::npos) << msg;
  msg = error_of([] { parse_train_config("optimizer:\n  lr: 1\n", "run.yaml"); });
  EXPECT_NE(msg.find("unknown section 'optimizer' (did you mean 'optim'?)"), std::string::npos) << msg;
  msg = error_of([] { parse_train_config(std::string(kMinimal) + "checkpoint:\n  intervall: 5\n", "run.yaml"); });
  EXPECT_NE(msg.find("'checkpoint.intervall' (did you mean 'interval'?)"), std::string::npos) << msg;
}

TEST(TrainConfig, TypesRangesAndChoicesAreChecked) {
  auto with = [](const std::string& extra) { return std::string(kMinimal) + extra; };
  std::string msg = error_of([&] { parse_train_config(with("loss:\n  mtp_weight: abc\n"), "run.yaml"); });
  EXPECT_NE(msg.find("'loss.mtp_weight' must be a number, got 'abc'"), std::string::npos) << msg;
  msg = error_of([&] { parse_train_config(with("parallel:\n  tp: 0\n"), "run.yaml"); });
  EXPECT_NE(msg.find("'parallel.tp' = 0 is out of range"), std::string::npos) << msg;
  msg = error_of([&] { parse_train_config(with("lora:\n  dropout: 1.5\n"), "run.yaml"); });
  EXPECT_NE(msg.find("'lora.dropout' = 1.5 is out of range [0, 1]"), std::string::npos) << msg;
  msg = error_of([&] { parse_train_config(with("logging:\n  tensorboard: maybe\n"), "run.yaml"); });
  EXPECT_NE(msg.find("'logging.tensorboard' must be true or false"), std::string::npos) << msg;
  msg = error_of([&] { parse_train_config(std::string(kMinimal) + "  resume: [a, b]\n", "run.yaml"); });
  EXPECT_NE(msg.find("'train.resume' must be a string, got a list"), std::string::npos) << msg;
  msg = error_of([] { parse_train_config("model:\n  preset: flahs\ndata:\n  train: [x]\n", "run.yaml"); });
  EXPECT_NE(msg.find("'model.preset' = 'flahs' is not one of"), std::string::npos) << msg;
  EXPECT_NE(msg.find("did you mean 'flash'"), std::string::npos) << msg;
  msg = error_of([&] { parse_train_config(with("optim:\n  muon_ns_precision: fp16\n"), "run.yaml"); });
  EXPECT_NE(msg.find("'optim.muon_ns_precision' = 'fp16' is not one of"), std::string::npos) << msg;
  EXPECT_EQ(parse_train_config(with("optim:\n  muon_ns_precision: bf16\n"), "run.yaml").optim.muon_ns_precision, "bf16");
  msg = error_of([] { parse_train_config("model: [1, 2\n", "bad.yaml"); });
  EXPECT_NE(msg.find("bad.yaml:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not valid YAML"), std::string::npos) << msg;
}

TEST(TrainConfig, CrossFieldChecks) {
  EXPECT_NE(error_of([] { parse_train_config("data:\n  train: [x]\n", "r.yaml"); }).find("set 'model.preset'"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_train_config("model:\n  preset: tiny\n", "r.yaml"); }).find("'data.train' needs"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              parse_train_config(std::string(kMinimal) + "  weights: [1, 2]\n", "r.yaml");
            }).find("unknown key 'train.weights'"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              parse_train_config("model:\n  preset: tiny\ndata:\n  train: [a]\n  weights: [1, 2]\n", "r.yaml");
            }).find("'data.weights' has 2 entries for 1"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_train_config(kMinimal, "r.yaml", {"optim.min_lr=1"}); }).find("exceeds 'optim.lr'"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_train_config(kMinimal, "r.yaml", {"train.attention_precision=bf16"}); })
                .find("'train.attention_precision' = bf16 needs 'train.device' = cuda"),
            std::string::npos);
  EXPECT_EQ(parse_train_config(kMinimal, "r.yaml", {"train.attention_precision=bf16", "train.device=cuda"})
                .train.attention_precision,
            "bf16");
}

TEST(TrainConfig, CommandLineOverrides) {
  const TrainConfig c =
      parse_train_config(kMinimal, "run.yaml", {"optim.lr=5e-4", "data.train=[a.h5, b.h5]", "lora.enabled=true"});
  EXPECT_DOUBLE_EQ(c.optim.lr, 5e-4);
  EXPECT_EQ(c.data.train, (std::vector<std::string>{"a.h5", "b.h5"}));
  EXPECT_TRUE(c.lora.enabled);
  std::string msg = error_of([] { parse_train_config(kMinimal, "run.yaml", {"optim.lrate=1"}); });
  EXPECT_NE(msg.find("unknown key 'optim.lrate' (did you mean 'optim.lr'?)"), std::string::npos) << msg;
  msg = error_of([] { parse_train_config(kMinimal, "run.yaml", {"steps=5"}); });
  EXPECT_NE(msg.find("expected section.key=value"), std::string::npos) << msg;
}

TEST(TrainConfig, ResolvedYamlRoundTrips) {
  const TrainConfig c = parse_train_config(kMinimal, "run.yaml", {"lora.targets=[attn.wq_a]", "optim.eps=1e-20"});
  const std::string yaml = c.to_yaml();
  const TrainConfig back = parse_train_config(yaml, "resolved.yaml");
  EXPECT_EQ(back.to_yaml(), yaml);
  EXPECT_DOUBLE_EQ(back.optim.eps, 1e-20);
  EXPECT_EQ(back.lora.targets, std::vector<std::string>{"attn.wq_a"});
}

TEST(TrainConfig, ClosestMatch) {
  EXPECT_EQ(closest_match("warmup", {"warmup_steps", "lr", "min_lr"}), "warmup_steps");
  EXPECT_EQ(closest_match("zzzzzz", {"lr", "eps"}), "");
}

}  // namespace
}  // namespace dsv4

#include <filesystem>

namespace dsv4 {
namespace {
TEST(TrainConfig, EveryShippedConfigParses) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(std::string(DSV4_SOURCE_DIR) + "/configs")) {
    if (e.path().extension() != ".yaml") continue;
    EXPECT_NO_THROW(load_train_config(e.path().string())) << e.path();
    ++n;
  }
  EXPECT_GE(n, 3);
}
}  // namespace
}  // namespace dsv4
