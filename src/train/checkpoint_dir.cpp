#include "train/checkpoint_dir.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/crc32c.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"

namespace dsv4 {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPrefix = "step_";

std::string step_name(int64_t step) { return fmt::format("{}{:08d}", kPrefix, step); }

std::optional<int64_t> parse_step(const std::string& name) {
  if (name.rfind(kPrefix, 0) != 0 || name.size() <= 5) return std::nullopt;
  const std::string digits = name.substr(5);
  if (!std::all_of(digits.begin(), digits.end(), ::isdigit)) return std::nullopt;
  return std::stoll(digits);
}

void fsync_path(const fs::path& p, bool directory) {
  const int fd = ::open(p.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

}  // namespace

CheckpointDir::CheckpointDir(std::string root) : root_(std::move(root)) {
  fs::create_directories(root_);
  for (const auto& e : fs::directory_iterator(root_))
    if (e.is_directory() && e.path().filename().string().rfind(".tmp-", 0) == 0) fs::remove_all(e.path());
}

std::string CheckpointDir::save(int64_t step, const std::function<void(const std::string&)>& write, int64_t keep) {
  const fs::path tmp = fs::path(root_) / fmt::format(".tmp-{}-{}", step_name(step), ::getpid());
  const fs::path final_dir = fs::path(root_) / step_name(step);
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    write(tmp.string());
    nlohmann::json sums = nlohmann::json::object();
    for (const auto& e : fs::directory_iterator(tmp)) {
      if (!e.is_regular_file()) continue;
      sums[e.path().filename().string()] = {{"crc32c", crc32c_file(e.path().string())},
                                            {"bytes", static_cast<int64_t>(e.file_size())}};
      fsync_path(e.path(), false);
    }
    write_file_atomic((tmp / "checksums.json").string(), sums.dump(2) + "\n");
    fsync_path(tmp, true);
    if (fs::exists(final_dir)) fs::remove_all(final_dir);  // a re-save of the same step replaces it
    fs::rename(tmp, final_dir);
    fsync_path(root_, true);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  write_file_atomic((fs::path(root_) / "latest").string(), step_name(step) + "\n");
  // Prune the oldest complete checkpoints beyond `keep` (never the one `latest` names).
  std::vector<int64_t> all = steps();
  while (static_cast<int64_t>(all.size()) > std::max<int64_t>(keep, 1)) {
    if (all.front() != step) fs::remove_all(fs::path(root_) / step_name(all.front()));
    all.erase(all.begin());
  }
  return final_dir.string();
}

std::optional<std::string> CheckpointDir::latest() const {
  const fs::path ptr = fs::path(root_) / "latest";
  if (!fs::exists(ptr)) return std::nullopt;
  std::ifstream in(ptr);
  std::string name;
  in >> name;
  DSV4_CHECK(parse_step(name).has_value(), "'{}' names '{}', not a checkpoint directory", ptr.string(), name);
  const fs::path dir = fs::path(root_) / name;
  DSV4_CHECK(fs::is_directory(dir), "'{}' points to '{}', which does not exist", ptr.string(), dir.string());
  return dir.string();
}

void CheckpointDir::verify(const std::string& checkpoint) {
  const fs::path sums_path = fs::path(checkpoint) / "checksums.json";
  std::ifstream in(sums_path);
  DSV4_CHECK(in.good(), "checkpoint '{}' has no checksums.json (incomplete or not a dsv4 checkpoint)", checkpoint);
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json sums;
  try {
    sums = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::parse_error& e) {
    DSV4_FAIL("'{}' is not valid JSON: {}", sums_path.string(), e.what());
  }
  for (auto it = sums.begin(); it != sums.end(); ++it) {
    const fs::path file = fs::path(checkpoint) / it.key();
    DSV4_CHECK(fs::exists(file), "checkpoint '{}': file '{}' is missing", checkpoint, it.key());
    const int64_t bytes = it.value().at("bytes").get<int64_t>();
    DSV4_CHECK(static_cast<int64_t>(fs::file_size(file)) == bytes, "checkpoint '{}': '{}' has {} bytes, expected {}",
               checkpoint, it.key(), fs::file_size(file), bytes);
    DSV4_CHECK(crc32c_file(file.string()) == it.value().at("crc32c").get<uint32_t>(),
               "checkpoint '{}': '{}' fails its CRC-32C check (corrupted)", checkpoint, it.key());
  }
}

std::vector<int64_t> CheckpointDir::steps() const {
  std::vector<int64_t> out;
  for (const auto& e : fs::directory_iterator(root_))
    if (e.is_directory())
      if (auto s = parse_step(e.path().filename().string())) out.push_back(*s);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace dsv4
