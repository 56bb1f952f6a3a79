#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs into target/gpu/, the one folder the
# device tool carries there (`carry`, 64 MiB with the working tree):
#
#   binaries.tar.xz  the myriad binary with the `cuda` feature, the worker's
#                    GPU tests and the GEMM benchmark, stripped and packed
#                    (about 7 MB instead of 27);
#   wheels/          transformers as scripts/ref_venv.sh pins it (the
#                    fixtures' version), to build the end-to-end checkpoint
#                    with; the device's Python has the rest of what it needs.
#
# The device machine has no Rust toolchain and no network, so all of it is
# made here. Usage: scripts/gpu_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
rm -rf "$out" && mkdir -p "$out/wheels"

cargo build --release --locked -p myriad --features cuda
cargo build --release --locked -p myriad-worker --features cuda --example cuda_gemm
tests=$(cargo test --release --locked -p myriad-worker --features cuda --test cuda --no-run --message-format=json \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
cp target/release/myriad "$stage/myriad"
cp target/release/examples/cuda_gemm "$stage/cuda_gemm"
cp "$tests" "$stage/cuda_tests"
strip "$stage"/*
tar -C "$stage" -cf - myriad cuda_gemm cuda_tests | xz -T0 -6 > "$out/binaries.tar.xz"

transformers=$(sed -n 's/.*transformers==\([0-9.]*\).*/\1/p' scripts/ref_venv.sh)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$out/wheels" "transformers==$transformers"
du -sh "$out/binaries.tar.xz" "$out"/wheels/*
