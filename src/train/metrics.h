// Training metrics: one JSON object per line in metrics.jsonl, and TensorBoard event files (TFRecord framing
// with masked CRC-32C around hand-encoded Event/Summary protobufs holding scalar values), readable by
// TensorBoard without any TensorFlow dependency here.
#pragma once

#include <cstdio>
#include <map>
#include <memory>
#include <string>

namespace dsv4 {

class TensorBoardWriter {
 public:
  // Creates dir/events.out.tfevents.<unix time>.<host> and writes the file-version record.
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  void add_scalars(int64_t step, const std::map<std::string, double>& values, double wall_time = -1);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);
  std::string path_;
  std::FILE* file_ = nullptr;
};

// The protobuf bytes of one Event{wall_time, step, summary{value{tag, simple_value}...}} (exposed for tests).
std::string tensorboard_scalar_event(double wall_time, int64_t step, const std::map<std::string, double>& values);
std::string tensorboard_version_event(double wall_time);
// TFRecord framing of `data`: length, masked CRC of the length, data, masked CRC of the data.
std::string tfrecord_frame(const std::string& data);

class MetricsLogger {
 public:
  // Appends to dir/metrics.jsonl (kept across resumes) and, when enabled, a TensorBoard file in dir/tensorboard.
  MetricsLogger(const std::string& dir, bool jsonl, bool tensorboard);
  void log(int64_t step, const std::map<std::string, double>& values);

 private:
  std::FILE* jsonl_ = nullptr;
  std::unique_ptr<TensorBoardWriter> tb_;
  std::shared_ptr<std::FILE> jsonl_owner_;
};

}  // namespace dsv4
