#!/usr/bin/env bash
# Speed on DeepSeek's release layout (FP8 + MXFP4) against the f32 path,
# transformers and llama.cpp, measured side by side in one run
# (scripts/bench_quantized.py). llama.cpp is a benchmark-only dependency:
# built here from the source vendored in the llama-cpp-python 0.3.36 sdist
# (MYRIAD_BENCH_LLAMA=0 skips it).
# Usage: scripts/bench_quantized.sh [--prompt-len N] [--new-tokens N]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ref_venv.sh
cargo build --release -p myriad --locked
llama_args=()
if [ "${MYRIAD_BENCH_LLAMA:-1}" != 0 ]; then
  LLAMA=/tmp/myriad-bench/llama-cpp-python-0.3.36
  if [ ! -x "$LLAMA/build/bin/llama-bench" ]; then
    mkdir -p /tmp/myriad-bench
    url=$(curl -fsS https://pypi.org/simple/llama-cpp-python/ \
      | grep -o 'https://files.pythonhosted.org/[^"#]*/llama_cpp_python-0.3.36.tar.gz' | head -1)
    curl -fsS -o /tmp/myriad-bench/llama-cpp-python.tar.gz "$url"
    rm -rf "$LLAMA" && mkdir -p "$LLAMA"
    tar xzf /tmp/myriad-bench/llama-cpp-python.tar.gz -C "$LLAMA" --strip-components=3 \
      llama_cpp_python-0.3.36/vendor/llama.cpp
    "$VENV/bin/pip" install -q cmake
    "$VENV/bin/cmake" -S "$LLAMA" -B "$LLAMA/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF > /dev/null
    "$VENV/bin/cmake" --build "$LLAMA/build" --target llama-bench -j "$(nproc)" > /dev/null
  fi
  llama_args=(--llama-bench "$LLAMA/build/bin/llama-bench"
              --llama-convert "$VENV/bin/python scripts/llama_convert.py $LLAMA")
fi
exec "$VENV/bin/python" scripts/bench_quantized.py --myriad target/release/myriad "${llama_args[@]}" "$@"
