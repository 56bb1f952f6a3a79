#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs into target/gpu/: the myriad binary
# with the `cuda` feature, the worker's GPU tests and the GEMM benchmark,
# stripped. The device machine has no Rust toolchain and no network, so
# they are built here and carried there (the device tool's `carry`).
#
# Usage: scripts/gpu_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu
mkdir -p "$out"
cargo build --release --locked -p myriad --features cuda
cargo build --release --locked -p myriad-worker --features cuda --example cuda_gemm
tests=$(cargo test --release --locked -p myriad-worker --features cuda --test cuda --no-run --message-format=json \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
cp target/release/myriad "$out/myriad"
cp target/release/examples/cuda_gemm "$out/cuda_gemm"
cp "$tests" "$out/cuda_tests"
strip "$out"/*
du -sh "$out"/*
