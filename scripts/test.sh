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

# The worker's CUDA kernels are also run on the CPU, compiled as C++20
# (worker/src/cuda/emulate.rs).
if ! command -v c++ >/dev/null; then
  apt_install g++
fi

# The end-to-end tests drive `myriad up` with the official `openai` Python
# client; the deploy tests render the Helm chart with Helm's engine. Both come
# from PyPI into a virtualenv under target/ (tests/requirements.txt).
E2E_VENV=target/e2e-venv
if [ ! -x "$E2E_VENV/bin/python" ]; then
  if ! python3 -m venv "$E2E_VENV" 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv "$E2E_VENV"
  fi
fi
"$E2E_VENV/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt

# A clean build needs a few GB under target/; a full disk shows up as the
# linker dying with SIGBUS, so say up front how much there is.
echo "== disk free under target/: $(df -h --output=avail . | tail -1 | tr -d ' ')"
# Incremental caches only pay off when rebuilding; on a clean checkout they
# would double the disk the build takes.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The `cuda` feature loads CUDA at run time, so it builds and runs here
# without a GPU; its GPU tests run on the device machine (scripts/gpu_check.sh).
echo "== cargo clippy, with the cuda feature"
cargo clippy --workspace --all-targets --locked --features myriad/cuda -- -D warnings
echo "== cargo test, the worker with the cuda feature (no GPU: clear errors; the kernels compile, and run emulated)"
nvrtc=$("$E2E_VENV/bin/python" -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(nvidia.cuda_nvrtc.__path__[0], "lib"))')
LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test -p myriad-worker --features cuda --lib --locked
echo "== cargo test"
cargo test --workspace --locked
echo "== end-to-end: the OpenAI API of myriad up"
# cargo test built target/debug/myriad for the CLI tests; the Python tests use
# that binary (a separate `cargo build -p myriad` would resolve features anew
# and rebuild much of the tree).
test -x target/debug/myriad
"$E2E_VENV/bin/python" -m pytest -q tests/e2e
echo "== deploy: the Helm chart and the container build context"
"$E2E_VENV/bin/python" -m pytest -q tests/deploy
