// One checking facility for the whole project. Checks stay on in release builds.
//
//   DSV4_CHECK(cond, "format {}", args...)   -> throws dsv4::Error("file:line: check `cond` failed: message")
//   DSV4_FAIL("format {}", args...)          -> throws unconditionally
//   DSV4_MPI_CHECK(call)                     -> checks an MPI return code
// CUDA_CHECK / CUBLAS_CHECK / NCCL_CHECK live in kernels/cuda_check.cuh and use the same Error type.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace dsv4 {

// what() is "file:line: check `expr` failed: message" (for developers and logs); message() is the message
// alone, the one line a command-line tool shows its user.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what), message_(what) {}
  Error(const std::string& what, std::string message) : std::runtime_error(what), message_(std::move(message)) {}
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

[[noreturn]] void throw_error(const char* file, int line, const char* expr, const std::string& message);

namespace detail {
inline std::string format_message() { return {}; }
template <typename... Args>
std::string format_message(fmt::format_string<Args...> f, Args&&... args) {
  return fmt::format(f, std::forward<Args>(args)...);
}
}  // namespace detail

}  // namespace dsv4

#define DSV4_CHECK(cond, ...)                                                                    \
  do {                                                                                           \
    if (!(cond)) [[unlikely]]                                                                    \
      ::dsv4::throw_error(__FILE__, __LINE__, #cond, ::dsv4::detail::format_message(__VA_ARGS__)); \
  } while (0)

#define DSV4_FAIL(...) ::dsv4::throw_error(__FILE__, __LINE__, nullptr, ::dsv4::detail::format_message(__VA_ARGS__))

// MPI calls return MPI_SUCCESS (0) on success; the error string is looked up in error.cpp.
#define DSV4_MPI_CHECK(call)                                                   \
  do {                                                                         \
    int dsv4_mpi_rc_ = (call);                                                 \
    if (dsv4_mpi_rc_ != 0) [[unlikely]]                                        \
      ::dsv4::throw_mpi_error(__FILE__, __LINE__, #call, dsv4_mpi_rc_);        \
  } while (0)

namespace dsv4 {
[[noreturn]] void throw_mpi_error(const char* file, int line, const char* expr, int code);
}
