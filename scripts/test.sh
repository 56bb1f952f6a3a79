#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then
# checks formatting and lints and runs every test. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

# The store tests start a real etcd (Debian's etcd-server) on free ports.
if ! command -v etcd >/dev/null; then
  apt_install etcd-server
fi

# The end-to-end tests drive `myriad up` with the official `openai` Python
# client, installed from PyPI into a virtualenv under target/.
E2E_VENV=target/e2e-venv
if [ ! -x "$E2E_VENV/bin/pytest" ]; then
  if ! python3 -m venv "$E2E_VENV" 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv "$E2E_VENV"
  fi
  "$E2E_VENV/bin/pip" install -q "openai>=1.50,<3" "pytest>=8,<10"
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== end-to-end: the OpenAI API of myriad up"
cargo build -p myriad --locked
"$E2E_VENV/bin/python" -m pytest -q tests/e2e
