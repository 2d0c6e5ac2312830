// Host time spent in named phases of a step (building candidate lists, waiting for device results the host needs),
// for benchmarks: the breakdown of `dsv4-bench step` shows how much of a module's time is host work during which the
// GPU may idle. Off unless a benchmark turns it on; then each HostPhase scope adds its wall time to its name.
#pragma once

#include <chrono>
#include <map>
#include <string>

namespace dsv4 {

struct HostPhaseTotal {
  double seconds = 0;
  int64_t calls = 0;
};

void host_phases_enable(bool on);
bool host_phases_enabled();
void host_phases_reset();
std::map<std::string, HostPhaseTotal> host_phases_snapshot();
void host_phase_add(const char* name, double seconds);

// Adds the scope's wall time to `name` when host phases are enabled.
class HostPhase {
 public:
  explicit HostPhase(const char* name) : name_(host_phases_enabled() ? name : nullptr) {
    if (name_) start_ = std::chrono::steady_clock::now();
  }
  ~HostPhase() {
    if (name_) host_phase_add(name_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }
  HostPhase(const HostPhase&) = delete;
  HostPhase& operator=(const HostPhase&) = delete;

 private:
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace dsv4
