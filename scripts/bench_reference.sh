#!/usr/bin/env bash
# Decode speed of Myriad against Hugging Face transformers on the same larger
# random DeepSeek-V4 checkpoint (hidden 1024, 8 layers, 64 experts top-6),
# measured side by side in one run. Prints both tokens/s and the ratio.
# Usage: scripts/bench_reference.sh [--prompt-len N] [--new-tokens N]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MYRIAD_REF_VENV:-/tmp/myriad-ref-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch transformers==5.23.0 safetensors tokenizers
fi
cargo build --release -p myriad --locked
exec "$VENV/bin/python" scripts/bench_reference.py --myriad target/release/myriad "$@"
