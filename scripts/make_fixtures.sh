#!/usr/bin/env bash
# Regenerates the committed reference fixtures (tests/fixtures/*) and the
# bundled tiny model (models/tiny-v4) with Hugging Face transformers.
# Creates its own virtualenv (about 6 GB, several minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MYRIAD_REF_VENV:-/tmp/myriad-ref-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch transformers==5.23.0 safetensors tokenizers
fi
exec "$VENV/bin/python" scripts/make_fixtures.py "$@"
