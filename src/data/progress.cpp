#include "data/progress.h"

#include <unistd.h>

#include <fmt/format.h>

namespace dsv4::data {

ProgressBar::ProgressBar(int64_t total_bytes, bool enabled, std::FILE* out)
    : total_(total_bytes), enabled_(enabled), out_(out), start_(std::chrono::steady_clock::now()), last_(start_) {}

ProgressBar::~ProgressBar() {
  if (drawn_ && !finished_) std::fputc('\n', out_);
}

bool ProgressBar::stderr_is_tty() { return isatty(STDERR_FILENO) == 1; }

std::string ProgressBar::format_bytes(double b) {
  const char* units[] = {"B", "kB", "MB", "GB", "TB"};
  int u = 0;
  while (b >= 1000 && u < 4) {
    b /= 1000;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} {}", b, units[u]) : fmt::format("{:.1f} {}", b, units[u]);
}

std::string ProgressBar::format_duration(double s) {
  if (!(s >= 0) || s > 99 * 3600) return "--:--";
  const auto t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}:{:02d}:{:02d}", t / 3600, (t / 60) % 60, t % 60);
  return fmt::format("{}:{:02d}", t / 60, t % 60);
}

std::string ProgressBar::render(int64_t bytes, int64_t tokens, double elapsed) const {
  const double rate = elapsed > 0 ? bytes / elapsed : 0;
  const double tok_rate = elapsed > 0 ? tokens / elapsed : 0;
  std::string s;
  if (total_ > 0) {
    const double frac = std::min(1.0, static_cast<double>(bytes) / static_cast<double>(total_));
    const int width = 24, full = static_cast<int>(frac * width);
    s = fmt::format("{:5.1f}% [{}{}] {}/{}", 100 * frac, std::string(static_cast<size_t>(full), '#'),
                    std::string(static_cast<size_t>(width - full), '.'), format_bytes(static_cast<double>(bytes)),
                    format_bytes(static_cast<double>(total_)));
  } else {
    s = format_bytes(static_cast<double>(bytes));
  }
  s += fmt::format("  {}/s  {:.2f}M tok/s", format_bytes(rate), tok_rate / 1e6);
  if (total_ > 0) {
    const double eta = rate > 0 ? static_cast<double>(total_ - bytes) / rate : -1;
    s += "  ETA " + format_duration(bytes >= total_ ? 0 : eta);
  }
  s += "  elapsed " + format_duration(elapsed);
  return s;
}

void ProgressBar::update(int64_t bytes, int64_t tokens, bool force) {
  last_bytes_ = bytes;
  last_tokens_ = tokens;
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!force && drawn_ && now - last_ < std::chrono::milliseconds(200)) return;
  last_ = now;
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  std::fprintf(out_, "\r%s\x1b[K", render(bytes, tokens, elapsed).c_str());
  std::fflush(out_);
  drawn_ = true;
}

void ProgressBar::finish() {
  if (!enabled_ || finished_) return;
  update(last_bytes_, last_tokens_, true);
  std::fputc('\n', out_);
  finished_ = true;
}

}  // namespace dsv4::data
