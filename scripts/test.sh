#!/usr/bin/env bash
# Configures, builds and runs the whole test suite (the command README.md gives and .ci/run runs).
# CUDA code is compiled when nvcc is found; GPU tests skip without a GPU.
# Usage: bash scripts/test.sh [build-dir]   (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
jobs=${DSV4_JOBS:-$(nproc)}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build" -j "$jobs"
# OpenBLAS threads would oversubscribe the cores that ctest -j already uses.
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
ctest --test-dir "$build" --output-on-failure -j "$jobs" --timeout 600
