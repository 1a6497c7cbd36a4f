#!/usr/bin/env bash
# One-shot check on a GPU host (no Rust toolchain, no network there), in one device call:
#   bash benches/gpu_check.sh
# from the project root, after `bash benches/gpu_bundle.sh` built target/gpu-bundle here and
# both were copied over, with the pytorch-grad-cam wheels in .whl/ (see benches/README.md).
# Everything goes to $OUT (default ./gpu-out), ending with the merged file
# $OUT/gpu-check-<UTC date>.json (benches/gpu_report.py merge) and its tables in $OUT/table.md:
#   gpu.csv, gpu_after.csv  nvidia-smi at the start and after the engine's benches (gpu.fields)
#   libs.txt                the CUDA libraries the engine is pointed at
#   tests.log               the bundled test executables (cuda_parity, cli, kernels_nvrtc) with
#                           SCORECAM_REQUIRE_GPU=1
#   engine_{fp16,fp8,cs}.json/.err   `scorecam-gpu bench --json` (FP16 1,8,32; FP8 1,8,32;
#                           channel-softmax 8) and each one's stderr
#   cudnn_fp8.log           cuDNN's error log during the FP8 bench (CUDNN_LOGLEVEL_DBG=1)
#   peers.json/.log         peers_gpu.py: tuned eager PyTorch FP16 Score-CAM, pytorch-grad-cam 1.5.7
#   peers_compile.json/.log peers_gpu.py --compile-bound: torch.compile(max-autotune) forward bound,
#                           last and only when time is left (PEERS_COMPILE=0 skips it)
#   steps.tsv               per step: name, exit code, wall s, limit s, command, note
# Every step has its own timeout and the whole run keeps within GPU_CHECK_BUDGET_S (default 540 s,
# under the device's 10-minute command limit); a failed step never stops the later ones.
# Limits (seconds, each also capped by the time left): TEST_TIMEOUT 200, BENCH_TIMEOUT 90,
# FP8_TIMEOUT 180, CS_TIMEOUT 90, PEERS_TIMEOUT 120, COMPILE_TIMEOUT 330 (run only if at least
# COMPILE_MIN_S 120 are left; PEERS_COMPILE_MODE picks another torch.compile mode). Exit status: 0 when the tests, the FP16 bench and the peers succeeded.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
t_start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-540}
reserve=25 # kept for the merge and the table
out=${OUT:-gpu-out}
mkdir -p "$out"
steps=$out/steps.tsv
# a reused $OUT must not lend a skipped step the last run's figures
rm -f "$out"/{gpu.fields,gpu.csv,gpu.err,gpu_after.csv,gpu_after.err,libs.txt,tests.log,wheels.log,table.md} \
  "$out"/engine_{fp16,fp8,cs}.{json,err} "$out"/peers{,_compile}.{json,log,json.tmp} "$out/cudnn_fp8.log"
: > "$steps"
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1 RUST_TEST_NOCAPTURE=1
bin=target/gpu-bundle/scorecam-gpu

left() { echo $((t_start + budget - $(date +%s))); }

# run_step NAME LIMIT STDOUT STDERR CMD...: runs CMD under `timeout` (LIMIT capped by the time left
# minus the reserve), appends a line to steps.tsv, returns CMD's exit code (124: timed out).
# STDERR equal to STDOUT sends both to one file.
run_step() {
  local name=$1 limit=$2 so=$3 se=$4 rc t0 t1 wall avail
  shift 4
  avail=$(($(left) - reserve))
  if [ "$avail" -lt 5 ]; then
    skip_step "$name" "no time left (budget ${budget} s)" "$(cmdline "$@")"
    return 125
  fi
  [ "$avail" -lt "$limit" ] && limit=$avail
  echo "== $name (limit ${limit} s): $*"
  t0=$(date +%s.%N)
  if [ "$so" = "$se" ]; then
    timeout -k 10 "$limit" "$@" > "$so" 2>&1
  else
    timeout -k 10 "$limit" "$@" > "$so" 2> "$se"
  fi
  rc=$?
  t1=$(date +%s.%N)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$wall" "$limit" "$(cmdline "$@")" >> "$steps"
  echo "-- $name: exit $rc in ${wall} s$([ "$rc" = 124 ] && echo ' (timed out)')"
  return "$rc"
}
cmdline() { # the command as one line, quoting only the words that need it
  local w line=
  for w in "$@"; do
    [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]] || w=$(printf '%q' "$w")
    line+="${line:+ }$w"
  done
  printf '%s' "$line"
}
skip_step() { # NAME WHY [COMMAND]
  printf '%s\tskip\t0\t0\t%s\t%s\n' "$1" "${3:-}" "$2" >> "$steps"
  echo "-- $1: skipped ($2)"
}

# (a) the device. Fields: any one unknown to the driver fails the whole query, so fall back.
fields=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,clocks.sm,clocks.mem,power.limit,temperature.gpu,pstate,compute_cap
if ! timeout 15 nvidia-smi --query-gpu="$fields" --format=csv,noheader,nounits > /dev/null 2>&1; then
  fields=name,driver_version,memory.total,clocks.max.sm,clocks.sm,clocks.mem,power.limit,temperature.gpu
fi
echo "$fields" > "$out/gpu.fields"
run_step gpu 15 "$out/gpu.csv" "$out/gpu.err" nvidia-smi --query-gpu="$fields" --format=csv,noheader,nounits
cat "$out/gpu.csv"

# cuDNN/cuBLAS/NVRTC may live in the toolkit, the system or PyTorch's pip wheels: find each one.
sp=$(python3 -c "import site; print(site.getsitepackages()[0])" 2> /dev/null)
: > "$out/libs.txt"
for lib in libcudnn.so.9 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
  f=$(find /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu ${sp:+"$sp/nvidia"} -maxdepth 3 -name "$lib" 2> /dev/null | head -1)
  if [ -n "$f" ]; then
    LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    readlink -f "$f" >> "$out/libs.txt"
  else
    echo "$lib: not found" >> "$out/libs.txt"
  fi
done
export LD_LIBRARY_PATH
export SCORECAM_BIN=$PWD/$bin
# Graph-API plan choices are remembered in this run's own directory: the FP16 bench's set-up is a
# first run's (no choices from an earlier session on this machine); the FP8 and channel-softmax
# benches after it find the FP16 ones, as a second run of a job would.
export SCORECAM_PLAN_CACHE="$out/plan-cache"

# (b) tests
# The graph API's plans are tried by their own test (graph_api_convolutions_match_cpu sets it
# explicitly); elsewhere the tests keep prepare short with the legacy API only.
# FP8 plans always go through the graph API: a shorter budget keeps the FP8 tests' prepares short
# (the full mask batch is planned first, so it still gets FP8 plans).
# The kernels' CPU runs (tests/kernels_host.rs, tests/forward_plan.rs) are CI's; here they would
# only spend device time.
run_step tests "${TEST_TIMEOUT:-260}" "$out/tests.log" "$out/tests.log" \
  env SCORECAM_CONV_GRAPH="${TEST_CONV_GRAPH:-off}" SCORECAM_GRAPH_BUDGET_S="${TEST_GRAPH_BUDGET_S:-8}" \
  SCORECAM_KERNEL_HOST=off target/gpu-bundle/run.sh
tests_rc=$?
grep -E "^== |^test result|FAILED|panicked|skipped" "$out/tests.log" | head -60

# (c) the engine: FP16 at 1/8/32 images, FP8 (may be unsupported: recorded, not fatal), channel-softmax
run_step engine_fp16 "${BENCH_TIMEOUT:-90}" "$out/engine_fp16.json" "$out/engine_fp16.err" \
  "$bin" bench --backend cuda --images 1,8,32 --json
fp16_rc=$?
# A hand-written kernel that faults on the device poisons the process's CUDA context, and with it
# every figure of the bench. Then the bench runs again without the newest of them, the Hopper
# wgmma builds (kernels for plain sm_90: the report's `kernels_arch`), and if it fails again with
# cuDNN only (`direct_conv.use: off`); the benches after it keep the setting that worked. Before
# those, where the failed try's errors name a hand-written kernel (a device check that hung or
# faulted), once more without just that kernel.
# steps.tsv keeps each failed try, their outputs the *_failed* files. A timeout is retried without
# the wgmma builds only (a kernel that hangs: the engine stops a hung device check by itself
# after 20 s, but a hang in a timed launch runs to the limit); a second timeout is not retried.
fp16_failed() {
  [ "$fp16_rc" != 0 ] && [ "$fp16_rc" != 124 ] && [ "$fp16_rc" != 125 ] && [ "$fp16_rc" != 137 ]
}
fp16_timed_out() {
  [ "$fp16_rc" = 124 ] || [ "$fp16_rc" = 137 ]
}
retry_fp16() {  # retry_fp16 STEP VAR VALUE: keep the failed try's files, set VAR, run again
  mv "$out/engine_fp16.json" "$out/engine_fp16_failed_before_$1.json" 2> /dev/null
  mv "$out/engine_fp16.err" "$out/engine_fp16_failed_before_$1.err" 2> /dev/null
  export "$2=$3"
  run_step "$1" "${BENCH_TIMEOUT:-90}" "$out/engine_fp16.json" "$out/engine_fp16.err" \
    "$bin" bench --backend cuda --images 1,8,32 --json
  fp16_rc=$?
}
# A device check that hung or faulted names its kernel ("device check (conv3x3_…)"): first the
# same bench without that one kernel (SCORECAM_SKIP_KERNELS), so that the other hand-written
# builds are still measured; if that fails too, the skip is dropped again.
culprit() {
  grep -oE 'device check \(conv3x3_[a-z0-9_]+\)' "$out/engine_fp16.err" 2> /dev/null |
    tail -n 1 | sed -E 's/.*\((conv3x3_[a-z0-9_]+)\)/\1/'
}
k=$(culprit)
if fp16_failed && [ -n "$k" ] && [ "${SCORECAM_CONV_DIRECT:-auto}" != off ]; then
  skipped_before=${SCORECAM_SKIP_KERNELS-}
  retry_fp16 "engine_fp16_skip_$k" SCORECAM_SKIP_KERNELS "${SCORECAM_SKIP_KERNELS:+$SCORECAM_SKIP_KERNELS,}$k"
  if [ "$fp16_rc" != 0 ]; then
    if [ -n "$skipped_before" ]; then export SCORECAM_SKIP_KERNELS=$skipped_before; else unset SCORECAM_SKIP_KERNELS; fi
  fi
fi
if { fp16_failed || fp16_timed_out; } && [ "${SCORECAM_WGMMA:-on}" != off ] &&
  [ "${SCORECAM_CONV_DIRECT:-auto}" != off ]; then
  retry_fp16 engine_fp16_no_wgmma SCORECAM_WGMMA off
fi
if fp16_failed && [ "${SCORECAM_CONV_DIRECT:-auto}" != off ]; then
  retry_fp16 engine_fp16_cudnn_only SCORECAM_CONV_DIRECT off
fi
# FP8 graphs have no NVIDIA sample with an FP16 output: if cuDNN refuses them, its own error log
# (errors only, kept to 4 MB) says why, beside the report's graph_api_search counts.
run_step engine_fp8 "${FP8_TIMEOUT:-180}" "$out/engine_fp8.json" "$out/engine_fp8.err" \
  env SCORECAM_CUDA_VERBOSE=1 CUDNN_LOGLEVEL_DBG=1 CUDNN_LOGDEST_DBG="$out/cudnn_fp8.log" \
  "$bin" bench --backend cuda --precision fp8 --images 1,8,32 --json
if [ -f "$out/cudnn_fp8.log" ]; then
  head -c 4000000 "$out/cudnn_fp8.log" > "$out/cudnn_fp8.log.tmp" && mv "$out/cudnn_fp8.log.tmp" "$out/cudnn_fp8.log"
fi
run_step engine_channel_softmax "${CS_TIMEOUT:-90}" "$out/engine_cs.json" "$out/engine_cs.err" \
  "$bin" bench --backend cuda --mode channel-softmax --images 8 --json
for f in engine_fp16 engine_fp8 engine_cs; do
  echo "-- $f: $(head -c 600 "$out/$f.json" 2> /dev/null)"
  tail -n 3 "$out/$f.err" 2> /dev/null
done
run_step gpu_after 15 "$out/gpu_after.csv" "$out/gpu_after.err" nvidia-smi --query-gpu="$fields" --format=csv,noheader,nounits
cat "$out/gpu_after.csv"

# (d) peers. PyTorch brings its own cuDNN: keep the engine's library path away from it.
site=${TMPDIR:-/tmp}/scorecam-peers-site
if ls .whl/*.whl > /dev/null 2>&1; then
  run_step wheels 20 "$out/wheels.log" "$out/wheels.log" \
    python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl &&
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
else
  skip_step wheels "no .whl/*.whl: pytorch-grad-cam will be reported as not importable"
fi
engine_arg=()
[ -s "$out/engine_fp16.json" ] && engine_arg=(--engine-json "$out/engine_fp16.json")
run_step peers "${PEERS_TIMEOUT:-120}" "$out/peers.log" "$out/peers.log" \
  env -u LD_LIBRARY_PATH python3 benches/peers_gpu.py ${engine_arg[@]+"${engine_arg[@]}"} --json-out "$out/peers.json"
peers_rc=$?
grep -v '^ \|^[{}]' "$out/peers.log" | tail -n 25

# torch.compile(max-autotune) forward bound: slow (minutes of autotuning), so last, with what is left
if [ "${PEERS_COMPILE:-1}" = 0 ]; then
  skip_step peers_compile "PEERS_COMPILE=0"
else
  avail=$(($(left) - reserve))
  lim=${COMPILE_TIMEOUT:-330}
  [ "$avail" -lt "$lim" ] && lim=$avail
  if [ "$lim" -lt "${COMPILE_MIN_S:-120}" ]; then
    skip_step peers_compile "not enough time left (${lim} s < COMPILE_MIN_S ${COMPILE_MIN_S:-120} s)"
  else
    # python gives up 15 s before the shell's timeout, so the JSON says why
    run_step peers_compile "$lim" "$out/peers_compile.log" "$out/peers_compile.log" \
      env -u LD_LIBRARY_PATH python3 benches/peers_gpu.py --skip-tuned --skip-gradcam --no-check \
      --compile-bound "${PEERS_COMPILE_MODE:-max-autotune}" --compile-timeout $((lim - 15)) \
      --json-out "$out/peers_compile.json"
    grep -E "forward|torch.compile|Error|error" "$out/peers_compile.log" | tail -n 8
  fi
fi

# (e) one JSON file with everything, ratios included, and the README's tables from it
json=$(timeout 20 env -u LD_LIBRARY_PATH python3 benches/gpu_report.py merge --dir "$out" --root . --budget-s "$budget")
echo "== merged: $json ($(($(date +%s) - t_start)) s in all)"
if [ -n "$json" ] && [ -f "$json" ]; then
  timeout 20 env -u LD_LIBRARY_PATH python3 benches/gpu_report.py table "$json" | tee "$out/table.md"
fi
status=0
[ "$tests_rc" = 0 ] || { echo "tests: exit $tests_rc"; status=1; }
[ "$fp16_rc" = 0 ] || { echo "engine FP16 bench: exit $fp16_rc"; status=1; }
[ "$peers_rc" = 0 ] || { echo "peers: exit $peers_rc"; status=1; }
exit $status
