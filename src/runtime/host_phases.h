// Host time spent in named phases of a step (building candidate lists, waiting for device results the host needs),
// for benchmarks: the breakdown of `dsv4-bench step` shows how much of a module's time is host work during which the
// GPU may idle. Off unless a benchmark turns it on; then each HostPhase scope adds its wall time to its name.
// A synchronised phase (HostPhase(name, Sync::Device)) also calls the benchmark's synchronisation hook at both ends,
// so its time is the device time of the work it enqueues (the optimizer's parts); without a hook it is a host phase.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
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
// The device synchronisation of synchronised phases (empty: none); set by a benchmark.
void host_phases_set_sync(std::function<void()> sync);
void host_phases_sync();

// Adds the scope's wall time to `name` when host phases are enabled.
class HostPhase {
 public:
  enum class Sync : uint8_t { None, Device };
  explicit HostPhase(const char* name, Sync sync = Sync::None)
      : name_(host_phases_enabled() ? name : nullptr), sync_(sync == Sync::Device) {
    if (!name_) return;
    if (sync_) host_phases_sync();
    start_ = std::chrono::steady_clock::now();
  }
  ~HostPhase() {
    if (!name_) return;
    if (sync_) host_phases_sync();
    host_phase_add(name_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }
  HostPhase(const HostPhase&) = delete;
  HostPhase& operator=(const HostPhase&) = delete;

 private:
  const char* name_;
  bool sync_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace dsv4
