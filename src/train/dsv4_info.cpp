// dsv4-info: prints the build configuration and the devices this process can see.
#include <cstdio>

#include "runtime/build_info.h"

int main() {
  std::printf("dsv4 %s (%s build, CUDA archs %s)\n%s", DSV4_VERSION, DSV4_BUILD_TYPE, DSV4_CUDA_ARCHS,
              dsv4::build_info().c_str());
  return 0;
}
