// The one way a runtime frontend (ops.h, model_ops.h, fp8.h, grouped_gemm.h) calls a backend: the cpu:: or cuda::
// function of the same name on the tensors' device, counted for benchmarks (op_count(): about one kernel launch or
// library call each on CUDA; the attention kernels, called directly by the model, are not counted). Without CUDA a
// device tensor is an error naming the op (the branch still names the CPU call so that both branches have its type).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>

#include "runtime/error.h"

namespace dsv4 {

namespace detail {
inline std::atomic<int64_t> g_op_count{0};
// The counter of one op name (registered once per call site, stable for the process).
std::atomic<int64_t>& op_name_counter(const char* name);
inline void op_count_add(std::atomic<int64_t>& per_name) {
  g_op_count.fetch_add(1, std::memory_order_relaxed);
  per_name.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace detail

// Backend calls since the start of the process.
inline int64_t op_count() { return detail::g_op_count.load(std::memory_order_relaxed); }
// Backend calls since the start of the process by op name (the backend function's name).
std::map<std::string, int64_t> op_counts_by_name();
// b - a by name, names with no calls in between dropped.
std::map<std::string, int64_t> op_counts_between(const std::map<std::string, int64_t>& a,
                                                 const std::map<std::string, int64_t>& b);

}  // namespace dsv4

#define DSV4_OP_COUNT_ADD(name)                                                                        \
  ::dsv4::detail::op_count_add([]() -> std::atomic<int64_t>& {                                         \
    static std::atomic<int64_t>& counter = ::dsv4::detail::op_name_counter(#name);                      \
    return counter;                                                                                    \
  }())

#if defined(DSV4_WITH_CUDA)
#define DSV4_BACKEND_DISPATCH(device, name, ...) \
  (DSV4_OP_COUNT_ADD(name),                     \
   (device).is_cuda() ? ::dsv4::cuda::name(__VA_ARGS__) : ::dsv4::cpu::name(__VA_ARGS__))
#else
#define DSV4_BACKEND_DISPATCH(device, name, ...)                                                     \
  (DSV4_OP_COUNT_ADD(name),                                                                          \
   (device).is_cuda() ? (DSV4_FAIL("op " #name " on {}: dsv4 was built without CUDA", (device).str()), \
                         ::dsv4::cpu::name(__VA_ARGS__))                                             \
                      : ::dsv4::cpu::name(__VA_ARGS__))
#endif
