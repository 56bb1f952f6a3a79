#!/usr/bin/env bash
# Long-context prefill and decode, with each part's share of the time and the
# GFLOP/s of attention + indexer next to the matmul kernel's, measured in the
# same run (scripts/bench_long_context.py). The tiny model always runs; the
# larger random checkpoint of scripts/bench_reference.py runs when it exists
# (MYRIAD_BENCH_LARGER, default /tmp/myriad-bench/larger-v4; build it with
# MYRIAD_BENCH_BUILD_LARGER=1, which needs the reference venv).
# Usage: scripts/bench_long_context.sh [--tiny-lengths 4096,16384] [--chunk N] ...
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p myriad-model --example long_context --locked
LARGER=${MYRIAD_BENCH_LARGER:-/tmp/myriad-bench/larger-v4}
if [ ! -f "$LARGER/config.json" ] && [ "${MYRIAD_BENCH_BUILD_LARGER:-0}" = 1 ]; then
  source scripts/ref_venv.sh
  "$VENV/bin/python" -c "import sys; sys.path.insert(0, 'scripts'); \
from pathlib import Path; from bench_reference import build; build(Path('$LARGER'))"
fi
larger=()
if [ -f "$LARGER/config.json" ]; then larger=(--larger "$LARGER"); fi
exec python3 scripts/bench_long_context.py "${larger[@]}" "$@"
