#!/usr/bin/env bash
# The GPU checks of the CUDA expert backend, in one run on a machine with an
# NVIDIA GPU (the device machine): what issue 17 asks to see.
#
# 1. The worker's GPU tests: contributions of every stored format against
#    the CPU backend (within 1e-4, and whether bit-identical) and
#    independent of the batch (worker/tests/cuda.rs).
# 2. Grouped expert FFN throughput at V4-Flash's decode and prefill shapes
#    in each format, next to cuBLAS BF16 (worker/examples/cuda_gemm.rs).
# 3. The model fixtures through `myriad generate --workers N --device cuda`
#    against the reference outputs, byte-identical across placements, and
#    concurrent requests to `myriad up --device cuda` equal to their solo
#    runs (scripts/gpu_fixtures.py).
# 4. End-to-end prefill and decode tokens/s with GPU workers next to CPU
#    workers on the larger random config (scripts/bench_gpu.py).
# 5. The GPU tests again under compute-sanitizer's memcheck.
# 6. Nsight Compute's view of the kernels at a prefill and a decode shape,
#    for the next change to them (not a check).
#
# It runs what scripts/gpu_build.sh packs into target/gpu/ where there is a
# Rust toolchain and network (on the device tool: `carry=["target/gpu"]`)
# and writes its logs under $OUT (default /tmp/gpu-check). Exits non-zero
# if a check fails.
#
# Usage: scripts/gpu_check.sh [--skip-e2e] [--skip-profile] (a rerun of the
# checks and the benchmark alone, when device time is short)
set -uo pipefail
skip=" $* "
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
[ -f target/gpu/binaries.tar.xz ] || scripts/gpu_build.sh || exit 1
bin=$(mktemp -d)
python3 -W ignore -m tarfile -e target/gpu/binaries.tar.xz "$bin" || exit 1
# The pinned transformers (with DeepSeek-V4, for step 4) ahead of the
# machine's own; nothing is fetched.
if compgen -G "target/gpu/wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site target/gpu/wheels/*.whl \
    && export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# cudarc loads libnvrtc and libcublas by their unversioned names (or .12);
# a CUDA 13 install may only have libnvrtc.so.13: link them under those names.
libs=$(mktemp -d)
for name in nvrtc nvrtc-builtins cublas cublasLt; do
  found=$(ldconfig -p | awk -v n="lib$name.so" '$1 ~ "^"n {print $NF; exit}')
  [ -n "$found" ] || found=$(find / -xdev -name "lib$name.so*" -type f 2>/dev/null | sort | tail -1)
  if [ -n "$found" ]; then
    ln -sf "$found" "$libs/lib$name.so"
    export LD_LIBRARY_PATH="$libs:$(dirname "$found"):${LD_LIBRARY_PATH:-}"
    echo "lib$name: $found"
  else
    echo "lib$name: not found"
  fi
done

status=0
step() { echo; echo "== $1"; }
# Runs a step under a time limit, its output also in $out/LOG: `run LOG
# SECONDS COMMAND...`. Returns the command's exit status.
run() {
  local log=$1 seconds=$2; shift 2
  timeout --kill-after=5 "$seconds" "$@" 2>&1 | tee "$out/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=1
  return "$rc"
}

# A CUDA tool: on the PATH, else the newest under the usual folders.
tool() {
  command -v "$1" 2>/dev/null \
    || find /usr/local/cuda*/bin /opt/nvidia -name "$1" -type f 2>/dev/null | sort | tail -1
}

step "1. worker GPU tests"
MYRIAD_FIXTURES="$PWD/tests/fixtures" run tests.log 120 "$bin/cuda_tests" --ignored --test-threads 1 --nocapture
if [ $? -ge 124 ]; then
  # A kernel that hangs in the tests hangs in every later step too.
  echo "the GPU tests ran out of time: steps 2-6 skipped"
else
  step "2. grouped expert FFN throughput"
  run gemm.log 150 "$bin/cuda_gemm"

  step "3. fixtures through myriad generate --device cuda, concurrent requests through myriad up"
  run fixtures.log 180 python3 scripts/gpu_fixtures.py "$bin/myriad"

  step "4. end to end, larger random config"
  if [[ $skip == *" --skip-e2e "* ]]; then
    echo "skipped (--skip-e2e)"
  elif python3 -c 'from transformers import DeepseekV4Config' 2>/dev/null; then
    run e2e.log 180 python3 scripts/bench_gpu.py --myriad "$bin/myriad"
  else
    echo "skipped: this machine's transformers has no DeepSeek-V4 to build the checkpoint" | tee "$out/e2e.log"
  fi

  step "5. memcheck of the worker GPU tests (out-of-bounds and misaligned accesses)"
  sanitizer=$(tool compute-sanitizer)
  if [ -n "$sanitizer" ]; then
    MYRIAD_FIXTURES="$PWD/tests/fixtures" timeout --kill-after=5 90 "$sanitizer" --tool memcheck --error-exitcode 3 \
      "$bin/cuda_tests" --ignored --test-threads 1 > "$out/memcheck.log" 2>&1
    rc=$?
    tail -3 "$out/memcheck.log"
    # Some sandboxes' GPUs are closed to the sanitizer ("Device not
    # supported"): step 1 ran the same tests, so that says nothing of the
    # kernels and fails nothing. Errors it found, or tests that fail under
    # it, do.
    if ! grep -q "ERROR SUMMARY: [1-9]" "$out/memcheck.log" \
      && grep -qE "Device not supported|Failed to initialize|LibraryNotLoaded" "$out/memcheck.log"; then
      echo "memcheck not done: compute-sanitizer cannot use this machine's GPU" | tee -a "$out/memcheck.log"
    elif [ "$rc" != 0 ]; then
      status=1
    fi
  else
    echo "skipped: no compute-sanitizer on this machine"
  fi

  step "6. profile: one gate/up and one down launch per shape (Nsight Compute)"
  ncu=$(tool ncu)
  if [[ $skip == *" --skip-profile "* ]]; then
    echo "skipped (--skip-profile)"
  elif [ -n "$ncu" ]; then
    # A diagnosis for the next change to the kernels, not a check: a
    # machine whose profiler cannot read the counters fails nothing.
    for shape in "2048 bf16" "2048 fp4" "16 bf16"; do
      read -r tokens format <<< "$shape"
      echo "== $tokens tokens per expert, $format" >> "$out/ncu.log"
      timeout --kill-after=5 45 "$ncu" -k 'regex:^(gate_up|down)_' -c 2 --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis "$bin/cuda_gemm" --tokens "$tokens" --format "$format" >> "$out/ncu.log" 2>&1
    done
    grep -E "^==|gate_up_|down_|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|cuda_gemm:" \
      "$out/ncu.log" | head -60
  else
    echo "skipped: no ncu on this machine"
  fi
fi

step "summary (full logs in $out)"
grep -hE "bit-identical|test result|panicked" "$out/tests.log" || true
grep -hE "byte-identical|concurrent|FAILED" "$out/fixtures.log" 2>/dev/null | tail -4 || true
grep -hE "tok/s|workers|DIFFER" "$out/e2e.log" 2>/dev/null | tail -4 || true
grep -hE "ERROR SUMMARY|memcheck not done" "$out/memcheck.log" 2>/dev/null || true
echo
echo "gpu_check: exit $status"
exit $status
