// A one-line progress bar with rate and ETA on stderr (redrawn at most every 0.2 s). Enabled when stderr is a
// terminal, or forced.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace dsv4::data {

class ProgressBar {
 public:
  // total_bytes: size of the input (0 when unknown: no percentage or ETA).
  ProgressBar(int64_t total_bytes, bool enabled, std::FILE* out = stderr);
  ~ProgressBar();
  void update(int64_t bytes_done, int64_t tokens_done, bool force = false);
  void finish();  // final redraw and newline
  bool enabled() const { return enabled_; }
  static bool stderr_is_tty();
  // "1.2 MB", "3:04", ... (exposed for tests)
  static std::string format_bytes(double bytes);
  static std::string format_duration(double seconds);
  std::string render(int64_t bytes_done, int64_t tokens_done, double elapsed) const;

 private:
  int64_t total_;
  bool enabled_;
  std::FILE* out_;
  std::chrono::steady_clock::time_point start_, last_;
  bool drawn_ = false, finished_ = false;
  int64_t last_bytes_ = 0, last_tokens_ = 0;
};

}  // namespace dsv4::data
