#!/usr/bin/env bash
# Packs GPU binaries built here for a lent GPU machine that has CUDA but none of the project's other libraries
# (MPI, OpenBLAS, fmt, yaml-cpp): the stripped binaries and their non-system, non-CUDA shared libraries go into
# one archive, DIR/payload.tar.xz. On the device: tests/gpu/device_run.sh DIR unpacks it and runs the suite.
#
#   tests/gpu/device_pack.sh [BUILD_DIR=build-gpu] [DIR=.devrun]
set -euo pipefail
build="${1:-build-gpu}"
dir="${2:-.devrun}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib" "$dir"
bins=("$build/tests/test_gpu" "$build/tests/test_mpi" "$build/bin/dsv4-bench")
for b in "${bins[@]}"; do
  [ -x "$b" ] || { echo "device_pack: $b missing (build test_gpu test_mpi dsv4-bench first)" >&2; exit 1; }
  strip -o "$stage/bin/$(basename "$b")" "$b"
done
# glibc and the CUDA libraries come from the device; everything else travels.
skip='^(libc|libm|libdl|libpthread|librt|libgcc_s|libcudart|libcublas|libcublasLt|libnccl|linux-vdso|ld-linux-x86-64)\.so'
ldd "${bins[@]}" | awk '/=> \//{print $1, $3}' | sort -u | while read -r name path; do
  [[ "$name" =~ $skip ]] && continue
  cp -L "$path" "$stage/lib/$name"
done
tar -C "$stage" -cJf "$dir/payload.tar.xz" bin lib
ls -la "$dir/payload.tar.xz"
