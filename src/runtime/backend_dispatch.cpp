#include "runtime/backend_dispatch.h"

#include <mutex>

namespace dsv4 {
namespace {

struct OpNameCounters {
  std::mutex mu;
  std::map<std::string, std::atomic<int64_t>> by_name;  // map nodes never move: the references stay valid
};

OpNameCounters& op_name_counters() {
  static OpNameCounters counters;
  return counters;
}

}  // namespace

std::atomic<int64_t>& detail::op_name_counter(const char* name) {
  OpNameCounters& c = op_name_counters();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.by_name[name];
}

std::map<std::string, int64_t> op_counts_by_name() {
  OpNameCounters& c = op_name_counters();
  std::lock_guard<std::mutex> lock(c.mu);
  std::map<std::string, int64_t> out;
  for (const auto& [name, n] : c.by_name) out[name] = n.load(std::memory_order_relaxed);
  return out;
}

std::map<std::string, int64_t> op_counts_between(const std::map<std::string, int64_t>& a,
                                                 const std::map<std::string, int64_t>& b) {
  std::map<std::string, int64_t> out;
  for (const auto& [name, n] : b) {
    const auto it = a.find(name);
    const int64_t d = n - (it == a.end() ? 0 : it->second);
    if (d != 0) out[name] = d;
  }
  return out;
}

}  // namespace dsv4
