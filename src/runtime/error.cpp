#include "runtime/error.h"

#include <mpi.h>

namespace dsv4 {

void throw_error(const char* file, int line, const char* expr, const std::string& message) {
  std::string what = fmt::format("{}:{}: ", file, line);
  if (expr) what += fmt::format("check `{}` failed", expr);
  if (!message.empty()) what += (expr ? ": " : "") + message;
  throw Error(what, message.empty() ? what : message);
}

void throw_mpi_error(const char* file, int line, const char* expr, int code) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) fmt::format_to_n(text, sizeof(text) - 1, "code {}", code);
  throw_error(file, line, expr, fmt::format("MPI error: {}", text));
}

}  // namespace dsv4
