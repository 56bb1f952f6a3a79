#!/usr/bin/env bash
# Regenerates the committed reference fixtures (tests/fixtures/*) and the
# bundled tiny model (models/tiny-v4) with Hugging Face transformers.
# Creates its own virtualenv (about 6 GB, several minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ref_venv.sh
exec "$VENV/bin/python" scripts/make_fixtures.py "$@"
