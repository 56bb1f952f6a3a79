#!/usr/bin/env bash
# Decode speed of Myriad against Hugging Face transformers on the same larger
# random DeepSeek-V4 checkpoint (hidden 1024, 8 layers, 64 experts top-6),
# measured side by side in one run. Prints both tokens/s and the ratio.
# Usage: scripts/bench_reference.sh [--prompt-len N] [--new-tokens N]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ref_venv.sh
cargo build --release -p myriad --locked
exec "$VENV/bin/python" scripts/bench_reference.py --myriad target/release/myriad "$@"
