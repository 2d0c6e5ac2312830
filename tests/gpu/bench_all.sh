#!/usr/bin/env bash
# Runs every GPU benchmark of dsv4-bench in one go (numbers, never pass/fail): gemm, ops and attn (proxy-2b, then
# flash shapes), grouped, and the full training step at proxy-2b (batch 1 x 4096 tokens: bf16 with the FP32 attention, then bf16 and fp8 with the tensor-core attention; tokens/s,
# MFU, peak memory, breakdown) when this dsv4-bench has those subcommands (checked in `dsv4-bench --help`). Each
# output is also written to LOG_DIR/bench_<name>.log.
#
#   tests/gpu/bench_all.sh                         # builds dsv4-bench in build-gpu (all cores), then runs
#   BUILD_DIR=build-x JOBS=4 tests/gpu/bench_all.sh
#   BENCH=/path/to/dsv4-bench tests/gpu/bench_all.sh   # no build: runs that binary (e.g. on PATH after device_run.sh)
#   NO_FLASH=1 tests/gpu/bench_all.sh              # ops / attn at proxy-2b shapes only
#   STEP_ARGS="--steps 5 --recompute" tests/gpu/bench_all.sh   # extra arguments of the step benchmarks
#   STEP_ARGS="--ns-precision fp32" tests/gpu/bench_all.sh     # Muon's Newton-Schulz in FP32 (default: bf16)
#   tests/gpu/device_run.sh .devrun env BENCH=dsv4-bench LOG_DIR=/tmp/bench bash tests/gpu/bench_all.sh
#                                                  # on a lent GPU machine, binaries from device_pack.sh
#
# Exit status: 1 when a benchmark failed (crashed or returned non-zero), else 0. Without a GPU every subcommand
# says "no CUDA device visible" and exits 0.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${BUILD_DIR:-$root/build-gpu}"
if [ -n "${BENCH:-}" ]; then
  bench="$BENCH"
else
  jobs="${JOBS:-$(nproc)}"
  cmake_args=(-G Ninja -DDSV4_CUDA=ON -DCMAKE_CUDA20_STANDARD_COMPILE_OPTION=-std=c++20
              -DCMAKE_CUDA20_EXTENSION_COMPILE_OPTION=-std=c++20)
  mkdir -p "$build"
  echo "== configure + build dsv4-bench ($build, -j$jobs)"
  cmake -S "$root" -B "$build" "${cmake_args[@]}" ${CMAKE_ARGS:-} >"$build/configure.log" 2>&1 ||
    { cat "$build/configure.log"; exit 1; }
  cmake --build "$build" --target dsv4-bench -j "$jobs" || exit 1
  bench="$build/bin/dsv4-bench"
fi
command -v "$bench" >/dev/null 2>&1 || [ -x "$bench" ] || { echo "bench_all: $bench not found" >&2; exit 1; }
log_dir="${LOG_DIR:-$build}"
mkdir -p "$log_dir"

echo "== devices"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
else
  echo "   nvidia-smi not found"
fi

status=0
failed=()
run() {  # run NAME ARGS...
  local name="$1"; shift
  echo "== dsv4-bench $*"
  local start=$(date +%s)
  "$bench" "$@" 2>&1 | tee "$log_dir/bench_$name.log"
  local rc=${PIPESTATUS[0]}
  echo "   ($name: exit $rc, $(( $(date +%s) - start )) s)"
  if [ "$rc" -ne 0 ]; then status=1; failed+=("$name"); fi
}

# Subcommands this binary has (CLI11 lists them under SUBCOMMANDS: as "  name  description").
subs="$("$bench" --help 2>&1 | awk 'tolower($0) ~ /^subcommands:/{on=1; next} on && /^ +[a-z]/{print $1}')"
has() { grep -qx "$1" <<<"$subs"; }

run gemm gemm
run ops ops --preset proxy-2b
[ -z "${NO_FLASH:-}" ] && run ops_flash ops --preset flash
run attn attn --preset proxy-2b
[ -z "${NO_FLASH:-}" ] && run attn_flash attn --preset flash
if has grouped; then
  run grouped grouped
else
  echo "== dsv4-bench grouped: not in this build (skipped)"
fi
if has step; then
  # shellcheck disable=SC2086
  run step_bf16 step --preset proxy-2b --batch 1 --seq 4096 --precision bf16 --steps 10 --warmup 2 ${STEP_ARGS:-}
  # shellcheck disable=SC2086
  run step_bf16_tc step --preset proxy-2b --batch 1 --seq 4096 --precision bf16 --tc-attention --steps 10 --warmup 2 \
    ${STEP_ARGS:-}
  # shellcheck disable=SC2086
  run step_fp8_tc step --preset proxy-2b --batch 1 --seq 4096 --precision fp8 --tc-attention --steps 10 --warmup 2 \
    ${STEP_ARGS:-}
else
  echo "== dsv4-bench step: not in this build (skipped)"
fi

echo "== summary"
echo "   logs: $log_dir/bench_*.log"
if [ "$status" -ne 0 ]; then echo "   failed: ${failed[*]}"; else echo "   all benchmarks ran"; fi
exit $status
