#!/usr/bin/env bash
# Builds test_gpu, test_mpi and dsv4-bench, runs the GPU suite (ctest -L gpu), the NCCL communicator tests and the
# GEMM benchmark, then prints a summary.
#
#   tests/gpu/run_all.sh                 # build dir build-gpu, all cores
#   BUILD_DIR=build-x JOBS=4 tests/gpu/run_all.sh
#   GTEST_FILTER='GpuOps.Gemm*' tests/gpu/run_all.sh   # runs the binary directly with a filter instead
#   NO_BENCH=1 tests/gpu/run_all.sh      # tests only (by default dsv4-bench gemm runs after the tests)
#
# Exit status: 0 when every test passed (or skipped), 1 otherwise. Without a visible GPU every GPU test
# skips; the summary then says so, so a "pass" with no device is never mistaken for a real run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${BUILD_DIR:-$root/build-gpu}"
jobs="${JOBS:-$(nproc)}"
cmake_args=(-G Ninja -DDSV4_CUDA=ON)
# CMake < 3.26 lacks nvcc's C++20 flag; supplying it is harmless on newer versions.
cmake_args+=(-DCMAKE_CUDA20_STANDARD_COMPILE_OPTION=-std=c++20 -DCMAKE_CUDA20_EXTENSION_COMPILE_OPTION=-std=c++20)

mkdir -p "$build"
echo "== configure ($build)"
cmake -S "$root" -B "$build" "${cmake_args[@]}" ${CMAKE_ARGS:-} >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log"; exit 1; }
grep -E '^\-\-   \[' "$build/configure.log" || true

echo "== build test_gpu, test_mpi, dsv4-bench (-j$jobs)"
start=$(date +%s)
cmake --build "$build" --target test_gpu test_mpi dsv4-bench -j "$jobs"
echo "   built in $(( $(date +%s) - start )) s"

echo "== devices"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
else
  echo "   nvidia-smi not found"
fi

log="$build/gpu_tests.log"
status=0
if [ -n "${GTEST_FILTER:-}" ]; then
  echo "== $build/tests/test_gpu --gtest_filter=$GTEST_FILTER"
  "$build/tests/test_gpu" --gtest_filter="$GTEST_FILTER" 2>&1 | tee "$log" || status=1
  echo "== summary"
  grep -E '^\[  (PASSED|FAILED|SKIPPED) \]|tests? from .* ran' "$log" || true
  exit $status
fi

echo "== ctest -L gpu (full output: $log)"
start=$(date +%s)
ctest --test-dir "$build" -L gpu -V >"$log" 2>&1 || status=1
elapsed=$(( $(date +%s) - start ))
grep -E '^ *[0-9]+/[0-9]+ Test +#' "$log" || true

total=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#' "$log" || true)
skipped=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#.*\*\*\*Skipped' "$log" || true)
failed=$(grep -E '^ *[0-9]+/[0-9]+ Test +#.*\*\*\*' "$log" | grep -vc '\*\*\*Skipped' || true)
if [ "$status" -ne 0 ]; then
  echo "== failures"
  grep -E '^[0-9]+: .*(Failure|FAILED|error|what\(\))' "$log" | head -200 || true
fi
# NCCL: the communicator tests of test_mpi on one rank (the NCCL ones skip without a GPU or NCCL).
echo "== mpirun -np 1 test_mpi --gtest_filter='Nccl*'"
root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
mpirun -np 1 "${root[@]}" "$build/tests/test_mpi" --gtest_filter='Nccl*' --gtest_color=no > "$build/nccl_tests.log" 2>&1 || status=1
grep -E '^\[  (PASSED|FAILED|SKIPPED) \]|tests? from .* ran' "$build/nccl_tests.log" || true
# Benchmarks (numbers, not pass/fail): GEMM TFLOP/s on the GPU, then the fallback kernel for reference.
if [ -z "${NO_BENCH:-}" ]; then
  echo "== dsv4-bench gemm"
  "$build/bin/dsv4-bench" gemm 2>&1 | tee "$build/bench_gemm.log" || status=1
fi
echo "== summary"
echo "   tests:   $total"
echo "   passed:  $(( total - failed - skipped ))"
echo "   skipped: $skipped (GPU tests skip when no CUDA device is visible)"
echo "   failed:  $failed"
echo "   time:    ${elapsed} s"
exit $status
