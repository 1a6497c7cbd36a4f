#!/usr/bin/env bash
# One-shot check on a GPU host (no Rust toolchain there): run from the project root after
# `../shared/tools/gpu-bundle.sh` built target/gpu-bundle here and both were copied over, with the
# pytorch-grad-cam wheels in .whl/ (see benches/README.md). Writes logs and JSON under $OUT
# (default ./gpu-out):
#   gpu.txt               the device
#   tests.log             every test executable with SCORECAM_REQUIRE_GPU=1 (parity tests included)
#   engine_*.json         `scorecam-gpu bench --json` for both semantics
#   peers.log/peers.json  PyTorch FP16 Score-CAM and pytorch-grad-cam on the same GPU, with ratios
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1 RUST_TEST_NOCAPTURE=1
bin=target/gpu-bundle/scorecam-gpu
# cuDNN/cuBLAS/NVRTC may live in the toolkit, the system or PyTorch's pip wheels: find each one.
sp=$(python3 -c "import site; print(site.getsitepackages()[0])" 2>/dev/null)
for lib in libcudnn.so.9 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
  f=$(find /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu "$sp/nvidia" -maxdepth 3 -name "$lib" 2>/dev/null | head -1)
  [ -n "$f" ] && LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"

export SCORECAM_BIN=$PWD/$bin
echo "== tests"
timeout "${TEST_TIMEOUT:-300}" target/gpu-bundle/run.sh > "$out/tests.log" 2>&1
echo "tests exit: $?" | tee -a "$out/tests.log"
grep -E "^test result|FAILED|panicked|skipped" "$out/tests.log" | head -40

echo "== engine bench"
timeout 120 "$bin" bench --backend cuda --images 1,8,32 --json > "$out/engine_official.json" 2> "$out/bench.err"
timeout 60 "$bin" bench --backend cuda --images 8 --mode channel-softmax --json > "$out/engine_cs.json" 2>> "$out/bench.err"
timeout 60 "$bin" bench --backend cuda --images 8 2>> "$out/bench.err"
cat "$out/engine_official.json" "$out/engine_cs.json"; tail -5 "$out/bench.err"

echo "== peers"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# PyTorch brings its own cuDNN: keep the engine's library path away from it.
timeout "${PEERS_TIMEOUT:-200}" env -u LD_LIBRARY_PATH python3 benches/peers_gpu.py --engine-json "$out/engine_official.json" \
  --json-out "$out/peers.json" 2>&1 | tee "$out/peers.log" | tail -30
