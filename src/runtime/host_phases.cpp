#include "runtime/host_phases.h"

#include <atomic>
#include <mutex>

namespace dsv4 {
namespace {

std::atomic<bool> g_enabled{false};
std::mutex g_mu;
std::function<void()>& sync_hook() {
  static auto* f = new std::function<void()>;
  return *f;
}
std::map<std::string, HostPhaseTotal>& totals() {
  static auto* t = new std::map<std::string, HostPhaseTotal>;
  return *t;
}

}  // namespace

void host_phases_enable(bool on) { g_enabled = on; }
bool host_phases_enabled() { return g_enabled; }

void host_phases_reset() {
  std::lock_guard<std::mutex> lock(g_mu);
  totals().clear();
}

std::map<std::string, HostPhaseTotal> host_phases_snapshot() {
  std::lock_guard<std::mutex> lock(g_mu);
  return totals();
}

void host_phases_set_sync(std::function<void()> sync) {
  std::lock_guard<std::mutex> lock(g_mu);
  sync_hook() = std::move(sync);
}

void host_phases_sync() {
  std::function<void()> f;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    f = sync_hook();
  }
  if (f) f();
}

void host_phase_add(const char* name, double seconds) {
  std::lock_guard<std::mutex> lock(g_mu);
  HostPhaseTotal& t = totals()[name];
  t.seconds += seconds;
  ++t.calls;
}

}  // namespace dsv4
