#include "train/metrics.h"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "runtime/crc32c.h"
#include "runtime/error.h"

namespace dsv4 {

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_tag(std::string& out, int field, int wire) { put_varint(out, static_cast<uint64_t>(field << 3 | wire)); }
template <typename T>
void put_fixed(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // protobuf fixed fields are little-endian, as is this machine
  out.append(b, sizeof(T));
}
void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_tag(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}

uint32_t masked_crc(const std::string& s) {
  const uint32_t c = crc32c(s.data(), s.size());
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

// proto3 leaves fields at their default value (0) out of the encoding.
std::string event_header(double wall_time, int64_t step) {
  std::string e;
  if (wall_time != 0) {
    put_tag(e, 1, 1);  // wall_time: double
    put_fixed(e, wall_time);
  }
  if (step != 0) {
    put_tag(e, 2, 0);  // step: int64
    put_varint(e, static_cast<uint64_t>(step));
  }
  return e;
}

}  // namespace

std::string tensorboard_version_event(double wall_time) {
  std::string e = event_header(wall_time, 0);
  put_bytes(e, 3, "brain.Event:2");  // Event.file_version
  return e;
}

std::string tensorboard_scalar_event(double wall_time, int64_t step, const std::map<std::string, double>& values) {
  std::string summary;
  for (const auto& [tag, v] : values) {
    std::string value;
    put_bytes(value, 1, tag);  // Summary.Value.tag
    put_tag(value, 2, 5);      // Summary.Value.simple_value: float
    put_fixed(value, static_cast<float>(v));
    put_bytes(summary, 1, value);  // Summary.value (repeated)
  }
  std::string e = event_header(wall_time, step);
  put_bytes(e, 5, summary);  // Event.summary
  return e;
}

std::string tfrecord_frame(const std::string& data) {
  std::string len;
  put_fixed(len, static_cast<uint64_t>(data.size()));
  std::string out = len;
  put_fixed(out, masked_crc(len));
  out += data;
  put_fixed(out, masked_crc(data));
  return out;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  ::gethostname(host, sizeof(host) - 1);
  path_ = (std::filesystem::path(dir) /
           fmt::format("events.out.tfevents.{}.{}.{}", static_cast<int64_t>(now_seconds()), host, ::getpid()))
              .string();
  file_ = std::fopen(path_.c_str(), "wb");
  DSV4_CHECK(file_ != nullptr, "cannot create TensorBoard file '{}': {}", path_, std::strerror(errno));
  write_record(tensorboard_version_event(now_seconds()));
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_) std::fclose(file_);
}

void TensorBoardWriter::write_record(const std::string& data) {
  const std::string rec = tfrecord_frame(data);
  DSV4_CHECK(std::fwrite(rec.data(), 1, rec.size(), file_) == rec.size(), "writing '{}' failed", path_);
}

void TensorBoardWriter::add_scalars(int64_t step, const std::map<std::string, double>& values, double wall_time) {
  write_record(tensorboard_scalar_event(wall_time < 0 ? now_seconds() : wall_time, step, values));
}

void TensorBoardWriter::flush() { std::fflush(file_); }

MetricsLogger::MetricsLogger(const std::string& dir, bool jsonl, bool tensorboard) {
  std::filesystem::create_directories(dir);
  if (jsonl) {
    const std::string path = (std::filesystem::path(dir) / "metrics.jsonl").string();
    jsonl_ = std::fopen(path.c_str(), "a");
    DSV4_CHECK(jsonl_ != nullptr, "cannot open '{}': {}", path, std::strerror(errno));
    jsonl_owner_ = std::shared_ptr<std::FILE>(jsonl_, std::fclose);
  }
  if (tensorboard) tb_ = std::make_unique<TensorBoardWriter>((std::filesystem::path(dir) / "tensorboard").string());
}

void MetricsLogger::log(int64_t step, const std::map<std::string, double>& values) {
  if (jsonl_) {
    std::string line = fmt::format("{{\"step\": {}", step);
    for (const auto& [k, v] : values)
      line += std::isfinite(v) ? fmt::format(", \"{}\": {}", k, v) : fmt::format(", \"{}\": null", k);
    line += "}\n";
    std::fputs(line.c_str(), jsonl_);
    std::fflush(jsonl_);
  }
  if (tb_) {
    tb_->add_scalars(step, values);
    tb_->flush();
  }
}

}  // namespace dsv4
