// Metrics: CRC-32C, TensorBoard event bytes against TensorBoard's own writer (fixture), metrics.jsonl.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/crc32c.h"
#include "train/metrics.h"

namespace dsv4 {
namespace {

std::string hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

std::map<std::string, std::string> read_fixture() {
  std::ifstream in(std::string(DSV4_FIXTURE_DIR) + "/train/tensorboard_event.txt");
  EXPECT_TRUE(in.good());
  std::map<std::string, std::string> m;
  std::string key, value;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    ls >> key >> value;
    m[key] = value;
  }
  return m;
}

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  const std::string a = "hello ", b = "world";
  EXPECT_EQ(crc32c(b.data(), b.size(), crc32c(a.data(), a.size())), crc32c("hello world", 11));
}

TEST(TensorBoard, EventBytesMatchTensorBoardsWriter) {
  const auto fx = read_fixture();
  const std::map<std::string, double> values = {{"loss/lm", 2.5}, {"lr", 0.00027}, {"tokens_per_s", 12345.0}};
  const std::string event = tensorboard_scalar_event(1700000000.25, 42, values);
  EXPECT_EQ(hex(event), fx.at("event"));
  EXPECT_EQ(hex(tfrecord_frame(event)), fx.at("record"));
  EXPECT_EQ(hex(tensorboard_version_event(1.5)), fx.at("version_event"));
}

TEST(Metrics, JsonlLinesAndEventFile) {
  const auto dir = std::filesystem::temp_directory_path() / ("dsv4_metrics_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  {
    MetricsLogger log(dir.string(), true, true);
    log.log(1, {{"loss", 3.5}, {"lr", 1e-3}});
    log.log(2, {{"loss", std::nan("")}});
  }
  std::ifstream in(dir / "metrics.jsonl");
  std::string l1, l2;
  std::getline(in, l1);
  std::getline(in, l2);
  EXPECT_EQ(l1, "{\"step\": 1, \"loss\": 3.5, \"lr\": 0.001}");
  EXPECT_EQ(l2, "{\"step\": 2, \"loss\": null}");
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir / "tensorboard")) {
    ++files;
    EXPECT_NE(e.path().filename().string().find("events.out.tfevents."), std::string::npos);
    EXPECT_GT(std::filesystem::file_size(e.path()), 40u);
  }
  EXPECT_EQ(files, 1);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dsv4
