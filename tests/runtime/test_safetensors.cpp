// safetensors reader/writer: round trips, header validation with errors naming file and tensor, sharded
// checkpoints, atomic writes.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "runtime/safetensors.h"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dsv4_st_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes a raw file: 8-byte length, header text, then `data_bytes` zero bytes.
  std::string raw(const std::string& name, const std::string& header, size_t data_bytes, int64_t len_override = -1) {
    std::ofstream out(path(name), std::ios::binary);
    uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xFF));
    out << header << std::string(data_bytes, '\0');
    return path(name);
  }

  static std::string error_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }

  fs::path dir_;
};

TEST_F(Safetensors, RoundTripEveryDtypeAndMetadata) {
  Tensor f32 = Tensor::from_floats({2, 3}, {1, -2, 3.5f, 0, 1e-7f, -1e7f});
  Tensor bf16 = Tensor::from_floats({3}, {1.0f, -0.5f, 3.0f}, DType::BF16);
  Tensor e4m3 = Tensor::from_floats({2, 2}, {448.0f, -0.015625f, 1.0f, 0.0f}, DType::F8_E4M3);
  Tensor scale = Tensor::from_vector<uint8_t>({2}, {127, 130}).view({2});
  Tensor fp4 = Tensor::from_floats({2, 4}, {0.5f, 1, 1.5f, 2, -3, -4, -6, 0}, DType::F4_E2M1);
  Tensor i64 = Tensor::from_vector<int64_t>({2}, {int64_t{1} << 40, -7});
  Tensor i32 = Tensor::from_vector<int32_t>({1}, {42});
  Tensor empty = Tensor::empty({0, 4}, DType::F32);
  write_safetensors(path("a.safetensors"),
                    {{"f32", f32}, {"bf16", bf16}, {"e4m3", e4m3}, {"fp4", fp4}, {"i64", i64}, {"i32", i32},
                     {"empty", empty}},
                    {{"format", "pt"}, {"producer", "dsv4"}});
  const SafetensorsFile f = SafetensorsFile::open(path("a.safetensors"));
  EXPECT_EQ(f.metadata().at("producer"), "dsv4");
  EXPECT_EQ(f.entries().size(), 7u);
  EXPECT_EQ(f.view("f32").to_floats(), f32.to_floats());
  EXPECT_EQ(f.view("bf16").dtype(), DType::BF16);
  EXPECT_EQ(f.view("bf16").to_floats(), bf16.to_floats());
  EXPECT_EQ(f.view("e4m3").to_floats(), e4m3.to_floats());
  // Packed FP4 is stored as I8 with the last dim halved (release convention).
  EXPECT_EQ(f.entry("fp4").dtype, DType::I8);
  EXPECT_EQ(f.entry("fp4").shape, (Shape{2, 2}));
  EXPECT_EQ(as_packed_fp4(f.view("fp4")).to_floats(), fp4.to_floats());
  EXPECT_EQ(f.view("i64").data<int64_t>()[0], int64_t{1} << 40);
  EXPECT_EQ(f.view("i32").item(), 42.0);
  EXPECT_EQ(f.view("empty").shape(), (Shape{0, 4}));
  // A loaded copy outlives the file object; a view keeps the mapping alive.
  Tensor view = f.view("f32");
  Tensor copy = f.load("f32");
  EXPECT_NE(copy.raw_data(), view.raw_data());
  EXPECT_EQ(copy.to_floats(), f32.to_floats());
  EXPECT_NE(error_of([&] { (void)f.entry("nope"); }).find("no tensor named 'nope'"), std::string::npos);
  (void)scale;
}

TEST_F(Safetensors, ViewOutlivesFileObject) {
  write_safetensors(path("v.safetensors"), {{"x", Tensor::from_floats({4}, {1, 2, 3, 4})}});
  Tensor v;
  { v = SafetensorsFile::open(path("v.safetensors")).view("x"); }
  EXPECT_EQ(v.to_floats(), (std::vector<float>{1, 2, 3, 4}));
}

TEST_F(Safetensors, RejectsMalformedFilesNamingFileAndTensor) {
  const std::string ok_entry = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  EXPECT_NO_THROW(SafetensorsFile::open(raw("ok.st", "{" + ok_entry + "}", 8)));

  EXPECT_NE(error_of([&] { SafetensorsFile::open(raw("empty_header.st", "", 0)); }).find("not valid JSON"),
            std::string::npos);
  {
    std::ofstream(path("tiny.st")) << "abc";
    EXPECT_NE(error_of([&] { SafetensorsFile::open(path("tiny.st")); }).find("shorter than the 8-byte header length"),
              std::string::npos);
  }
  EXPECT_NE(error_of([&] { SafetensorsFile::open(raw("long.st", "{}", 0, 1000)); }).find("runs past the end"),
            std::string::npos);
  EXPECT_NE(error_of([&] { SafetensorsFile::open(raw("huge.st", "{}", 0, int64_t{1} << 40)); }).find("exceeds"),
            std::string::npos);
  EXPECT_NE(error_of([&] { SafetensorsFile::open(raw("json.st", "{\"w\":", 0)); }).find("not valid JSON"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              SafetensorsFile::open(raw("dtype.st", R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8));
            }).find("tensor 'w' has unsupported dtype \"F64\""),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              SafetensorsFile::open(raw("range.st", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8));
            }).find("'w' byte range [0, 16) lies outside"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              SafetensorsFile::open(raw("size.st", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8));
            }).find("tensor 'w' F32[3] needs 12 bytes but data_offsets span 8"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              SafetensorsFile::open(raw("overlap.st",
                                        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                        12));
            }).find("overlap"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              SafetensorsFile::open(raw("hole.st", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8));
            }).find("hole in the data section before tensor 'w'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { SafetensorsFile::open(raw("trail.st", "{" + ok_entry + "}", 12)); }).find("4 trailing bytes"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              SafetensorsFile::open(raw("fields.st", R"({"w":{"dtype":"F32","shape":[2]}})", 0));
            }).find("tensor 'w' needs dtype, shape and data_offsets"),
            std::string::npos);
  const std::string msg = error_of([&] { SafetensorsFile::open(path("missing.st")); });
  EXPECT_NE(msg.find("missing.st"), std::string::npos) << msg;
}

TEST_F(Safetensors, ShardedCheckpointThroughIndex) {
  write_safetensors(path("model-00001-of-00002.safetensors"), {{"embed.weight", Tensor::from_floats({2}, {1, 2})}});
  write_safetensors(path("model-00002-of-00002.safetensors"),
                    {{"head.weight", Tensor::from_floats({2}, {3, 4})}, {"norm.weight", Tensor::from_floats({1}, {5})}});
  write_safetensors_index(path("model.safetensors.index.json"),
                          {{"embed.weight", "model-00001-of-00002.safetensors"},
                           {"head.weight", "model-00002-of-00002.safetensors"},
                           {"norm.weight", "model-00002-of-00002.safetensors"}},
                          20);
  const SafetensorsCheckpoint c = SafetensorsCheckpoint::open(dir_.string());
  EXPECT_EQ(c.names(), (std::vector<std::string>{"embed.weight", "head.weight", "norm.weight"}));
  EXPECT_EQ(c.load("head.weight").to_floats(), (std::vector<float>{3, 4}));
  EXPECT_EQ(c.view("embed.weight").to_floats(), (std::vector<float>{1, 2}));
  EXPECT_EQ(c.index_metadata().at("total_size"), "20");
  EXPECT_NE(error_of([&] { (void)c.file_of("mtp.0.x"); }).find("has no tensor 'mtp.0.x'"), std::string::npos);
  c.release_shards();
  EXPECT_EQ(c.load("norm.weight").item(), 5.0);

  // An index naming a tensor its shard lacks, and a missing shard file.
  write_safetensors_index(path("model.safetensors.index.json"),
                          {{"embed.weight", "model-00001-of-00002.safetensors"},
                           {"ghost.weight", "model-00001-of-00002.safetensors"}},
                          8);
  const SafetensorsCheckpoint bad = SafetensorsCheckpoint::open(dir_.string());
  EXPECT_NE(error_of([&] { (void)bad.load("embed.weight"); })
                .find("lists tensor 'ghost.weight' in shard 'model-00001-of-00002.safetensors'"),
            std::string::npos);
  write_safetensors_index(path("model.safetensors.index.json"), {{"x", "model-00009-of-00009.safetensors"}}, 8);
  EXPECT_NE(error_of([&] { SafetensorsCheckpoint::open(dir_.string()); }).find("model-00009-of-00009.safetensors"),
            std::string::npos);
}

TEST_F(Safetensors, SingleFileCheckpointAndMissingDirectoryContents) {
  write_safetensors(path("model.safetensors"), {{"w", Tensor::from_floats({1}, {9})}});
  EXPECT_EQ(SafetensorsCheckpoint::open(dir_.string()).load("w").item(), 9.0);
  fs::remove(path("model.safetensors"));
  EXPECT_NE(error_of([&] { SafetensorsCheckpoint::open(dir_.string()); }).find("neither model.safetensors.index.json"),
            std::string::npos);
}

TEST_F(Safetensors, FailedWriteKeepsThePreviousFile) {
  write_safetensors(path("ckpt.safetensors"), {{"w", Tensor::from_floats({1}, {1})}});
  EXPECT_THROW(write_safetensors(path("ckpt.safetensors"), {{"w", Tensor::from_floats({1}, {2})}, {"w", Tensor()}}),
               Error);
  EXPECT_EQ(SafetensorsFile::open(path("ckpt.safetensors")).load("w").item(), 1.0);
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename().string().rfind(".tmp.", 0), std::string::npos) << "temporary file left behind";
  EXPECT_THROW(write_safetensors(path("no/such/dir/x.safetensors"), {}), Error);
}

}  // namespace
}  // namespace dsv4
