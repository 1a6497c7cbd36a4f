#!/usr/bin/env bash
# What a GPU session carries, prepared on the dev machine in one command (project root):
#   bash benches/gpu_bundle.sh
# 1. ../shared/tools/gpu-bundle.sh builds the binary and every test executable into
#    target/gpu-bundle/ (with run.sh, which runs whatever test executables lie there);
# 2. the commit goes to target/gpu-bundle/COMMIT (the GPU host has no .git);
# 3. only the test executables that touch the GPU or the host's CUDA libraries stay: the others
#    compute on the CPU exactly as CI does, and on the GPU host they would spend device time (the
#    tests step has 200 s) and carry bytes (64 MiB in all with the checkout and .whl/);
# 4. the carried total is checked against that limit.
# Exit status: 0 when the bundle is ready and fits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/tools/gpu-bundle.sh
git describe --always --dirty --abbrev=40 > target/gpu-bundle/COMMIT

# cuda_parity: every CUDA op, model and map against the CPU (the GPU tests); cli: the binary on
# the GPU (`--backend cuda|auto`); kernels_nvrtc: the kernels compiled by the host's own NVRTC.
# (The job, eval, fixtures, methods and twin tests run `--backend cpu` or the CpuBackend.)
keep=" cuda_parity cli kernels_nvrtc "
for t in target/gpu-bundle/tests/*; do
  name=$(basename "$t")
  if [[ $keep != *" $name "* ]]; then rm -f "$t"; fi
done
for name in $keep; do
  [ -x "target/gpu-bundle/tests/$name" ] || { echo "gpu_bundle: test executable $name missing" >&2; exit 1; }
done

bundle=$(du -sk target/gpu-bundle | cut -f1)
whl=$(du -sk .whl 2> /dev/null | cut -f1 || echo 0)
tree=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1024 ))
total=$(( (bundle + ${whl:-0} + tree) / 1024 ))
echo "gpu_bundle: tests $(cd target/gpu-bundle/tests && echo *)"
echo "gpu_bundle: carried ≈ ${total} MiB (bundle $((bundle / 1024)), .whl $(( ${whl:-0} / 1024 )), checkout $((tree / 1024)))"
if [ "$total" -gt 60 ]; then
  echo "gpu_bundle: over 60 MiB; the device call carries 64 MiB at most" >&2
  exit 1
fi
