#!/usr/bin/env bash
# Installs every build and test dependency of dsv4 from Debian packages.
# Used by README.md and .ci/run; safe to run again (apt-get is idempotent).
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libopenmpi-dev openmpi-bin          # MPI: CPU collectives and NCCL bootstrap
  libhdf5-dev                         # token datasets
  libyaml-cpp-dev                     # configs
  nlohmann-json3-dev                  # config.json, safetensors headers
  libgtest-dev libgmock-dev           # unit tests
  libopenblas-dev                     # CPU reference GEMM
  libfmt-dev                          # formatting of messages
  libcli11-dev                        # command-line parsing of the tools
  libpcre2-dev                        # Unicode regex for the tokenizer pre-tokenizer
)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
