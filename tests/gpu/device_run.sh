#!/usr/bin/env bash
# Device side of device_pack.sh: unpacks DIR/payload.tar.xz, points the loader at the carried libraries and the
# machine's CUDA (toolkit and Python wheels), then runs a command with the binaries on PATH.
#
#   tests/gpu/device_run.sh DIR COMMAND...   e.g. tests/gpu/device_run.sh .devrun test_gpu --gtest_brief=1
set -euo pipefail
dir="$1"; shift
dest="/tmp/dsv4-device"
if [ ! -d "$dest/bin" ]; then
  mkdir -p "$dest" && tar -C "$dest" -xJf "$dir/payload.tar.xz"
fi
libs="$dest/lib"
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libs="$libs:$d"
done
for d in $(python3 -c 'import nvidia, os; p = list(nvidia.__path__)[0]; print(" ".join(os.path.join(p, s, "lib") for s in sorted(os.listdir(p))))' 2>/dev/null); do
  [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$dest/bin:$PATH"
exec "$@"
