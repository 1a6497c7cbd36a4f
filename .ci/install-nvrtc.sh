#!/usr/bin/env bash
# Install NVRTC 13 + the CUDA 13 headers from PyPI wheels into target/nvrtc (never system-wide), so
# that a machine with no GPU and no CUDA toolkit can still prove every kernel compiles.
#
# Usage (stdout is only `export` lines; everything else goes to stderr):
#   eval "$(bash .ci/install-nvrtc.sh)"
#   SCORECAM_REQUIRE_NVRTC=1 cargo test --test kernels_nvrtc
#
# Idempotent: a second run with the wheels already in place downloads nothing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${SCORECAM_NVRTC_DIR:-$root/target/nvrtc}"
py="${PYTHON:-python3}"
pkgs=("nvidia-cuda-nvrtc==13.*" "nvidia-cuda-runtime==13.*")

cu="$dest/nvidia/cu13"
if [ ! -e "$cu/lib/libnvrtc.so.13" ] || [ ! -e "$cu/include/cuda_fp16.h" ]; then
    command -v "$py" >/dev/null 2>&1 || { echo "install-nvrtc: $py not found" >&2; exit 1; }
    mkdir -p "$dest"
    echo "install-nvrtc: pip-installing ${pkgs[*]} into $dest" >&2
    "$py" -m pip install --quiet --disable-pip-version-check --no-input --upgrade \
        --target "$dest" "${pkgs[@]}" >&2
fi

# The wheels' layout: nvidia/cu13/lib/libnvrtc.so.13 (+ libnvrtc-builtins.so.13.*),
# nvidia/cu13/include/cuda_fp16.h. Older wheel layouts used nvidia/cuda_nvrtc/lib: accept both.
lib=""
for d in "$cu/lib" "$dest/nvidia/cuda_nvrtc/lib"; do
    if ls "$d"/libnvrtc.so.* >/dev/null 2>&1; then lib="$d"; break; fi
done
[ -n "$lib" ] || { echo "install-nvrtc: no libnvrtc.so.* under $dest/nvidia" >&2; exit 1; }
inc=""
for d in "$cu/include" "$dest/nvidia/cuda_runtime/include"; do
    if [ -e "$d/cuda_fp16.h" ]; then inc="$d"; break; fi
done
[ -n "$inc" ] || { echo "install-nvrtc: no cuda_fp16.h under $dest/nvidia" >&2; exit 1; }

# cudarc tries libnvrtc.so first and libnvrtc.so.13 later; give it the unversioned name too.
if [ ! -e "$lib/libnvrtc.so" ]; then
    real="$(ls "$lib"/libnvrtc.so.* | grep -v builtins | sort | head -n1)"
    ln -s "$(basename "$real")" "$lib/libnvrtc.so"
fi

printf 'export LD_LIBRARY_PATH=%q\n' "$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
printf 'export SCORECAM_CUDA_INCLUDE=%q\n' "$inc"
