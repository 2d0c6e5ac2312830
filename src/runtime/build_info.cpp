#include "runtime/build_info.h"

#include <cblas.h>
#include <mpi.h>

#include "runtime/device.h"
#include "runtime/error.h"

#if defined(DSV4_WITH_NCCL)
#include <nccl.h>
#endif

namespace dsv4 {

std::string build_info() {
  char mpi_version[MPI_MAX_LIBRARY_VERSION_STRING] = {0};
  int len = 0;
  MPI_Get_library_version(mpi_version, &len);
  std::string mpi(mpi_version, static_cast<size_t>(len));
  if (auto nl = mpi.find_first_of("\n,"); nl != std::string::npos) mpi.resize(nl);

  std::string s;
  s += fmt::format("  CUDA backend : {}\n", cuda_built() ? fmt::format("built, {} device(s) visible", cuda_device_count())
                                                         : std::string("not built (CPU only)"));
#if defined(DSV4_WITH_NCCL)
  s += fmt::format("  NCCL         : {}.{}.{}\n", NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH);
#else
  s += "  NCCL         : not built\n";
#endif
  s += fmt::format("  MPI          : {}\n", mpi);
  s += fmt::format("  OpenBLAS     : {} ({} threads)\n", openblas_get_config(), openblas_get_num_threads());
  return s;
}

}  // namespace dsv4
