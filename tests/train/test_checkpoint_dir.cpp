// Checkpoint directories: atomic commit, latest pointer, pruning, checksums, crash in the middle of a write.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "runtime/error.h"
#include "train/checkpoint_dir.h"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

class CheckpointDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root = fs::temp_directory_path() /
           ("dsv4_ckpt_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root);
  }
  void TearDown() override { fs::remove_all(root); }
  static void write_file(const std::string& dir, const std::string& name, const std::string& text) {
    std::ofstream(fs::path(dir) / name) << text;
  }
  fs::path root;
};

TEST_F(CheckpointDirTest, SaveMovesLatestAndPrunes) {
  CheckpointDir c(root.string());
  EXPECT_FALSE(c.latest().has_value());
  for (int64_t step : {10, 20, 30, 40}) {
    const std::string path = c.save(step, [&](const std::string& d) { write_file(d, "model.bin", std::to_string(step)); }, 2);
    EXPECT_EQ(c.latest(), path);
    CheckpointDir::verify(path);
  }
  EXPECT_EQ(c.steps(), (std::vector<int64_t>{30, 40}));
  EXPECT_EQ(fs::path(*c.latest()).filename(), "step_00000040");
}

TEST_F(CheckpointDirTest, FailedWriteKeepsThePreviousCheckpoint) {
  CheckpointDir c(root.string());
  const std::string good = c.save(1, [&](const std::string& d) { write_file(d, "model.bin", "good"); }, 3);
  EXPECT_THROW(c.save(2,
                      [&](const std::string& d) {
                        write_file(d, "model.bin", "half");
                        throw std::runtime_error("disk full");
                      },
                      3),
               std::runtime_error);
  EXPECT_EQ(c.latest(), good);
  EXPECT_EQ(c.steps(), std::vector<int64_t>{1});
  for (const auto& e : fs::directory_iterator(root)) EXPECT_NE(e.path().filename().string().rfind(".tmp-", 0), 0u);
}

TEST_F(CheckpointDirTest, StaleTemporaryDirectoriesFromACrashAreRemoved) {
  fs::create_directories(root / ".tmp-step_00000005-999");
  write_file((root / ".tmp-step_00000005-999").string(), "model.bin", "partial");
  CheckpointDir c(root.string());
  EXPECT_FALSE(fs::exists(root / ".tmp-step_00000005-999"));
  EXPECT_FALSE(c.latest().has_value());
}

TEST_F(CheckpointDirTest, VerifyNamesTheCorruptedFile) {
  CheckpointDir c(root.string());
  const std::string path = c.save(3, [&](const std::string& d) { write_file(d, "optim.bin", "abcdef"); }, 1);
  { std::ofstream(fs::path(path) / "optim.bin") << "abcdeX"; }
  try {
    CheckpointDir::verify(path);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("'optim.bin' fails its CRC-32C check"), std::string::npos) << e.message();
  }
  fs::remove(fs::path(path) / "optim.bin");
  try {
    CheckpointDir::verify(path);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("'optim.bin' is missing"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace dsv4
