// The one way a runtime frontend (ops.h, model_ops.h, fp8.h, grouped_gemm.h) calls a backend: the cpu:: or cuda::
// function of the same name on the tensors' device, counted for benchmarks (op_count(): about one kernel launch or
// library call each on CUDA; the attention kernels, called directly by the model, are not counted). Without CUDA a
// device tensor is an error naming the op (the branch still names the CPU call so that both branches have its type).
#pragma once

#include <atomic>
#include <cstdint>

#include "runtime/error.h"

namespace dsv4 {

namespace detail {
inline std::atomic<int64_t> g_op_count{0};
inline void op_count_add() { g_op_count.fetch_add(1, std::memory_order_relaxed); }
}  // namespace detail

// Backend calls since the start of the process.
inline int64_t op_count() { return detail::g_op_count.load(std::memory_order_relaxed); }

}  // namespace dsv4

#if defined(DSV4_WITH_CUDA)
#define DSV4_BACKEND_DISPATCH(device, name, ...) \
  (::dsv4::detail::op_count_add(),              \
   (device).is_cuda() ? ::dsv4::cuda::name(__VA_ARGS__) : ::dsv4::cpu::name(__VA_ARGS__))
#else
#define DSV4_BACKEND_DISPATCH(device, name, ...)                                                     \
  (::dsv4::detail::op_count_add(),                                                                   \
   (device).is_cuda() ? (DSV4_FAIL("op " #name " on {}: dsv4 was built without CUDA", (device).str()), \
                         ::dsv4::cpu::name(__VA_ARGS__))                                             \
                      : ::dsv4::cpu::name(__VA_ARGS__))
#endif
