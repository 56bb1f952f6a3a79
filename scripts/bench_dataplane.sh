#!/usr/bin/env bash
# Decode speed of the expert-parallel data plane against one process, side by
# side in one run, on the larger random V4 checkpoint (hidden 1024, 8 layers,
# 64 experts top-6): single process vs a router + N in-process workers over
# loopback gRPC. Checks the outputs are byte-identical and prints tokens/s,
# the ratio, and the expert traffic per token per MoE layer.
# Usage: scripts/bench_dataplane.sh [WORKERS] [NEW_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-4}
new_tokens=${2:-64}
ckpt=${MYRIAD_BENCH_CHECKPOINT:-/tmp/myriad-bench/larger-v4}
if [ ! -f "$ckpt/config.json" ]; then
  source scripts/ref_venv.sh
  "$VENV/bin/python" scripts/bench_reference.py --checkpoint "$ckpt" --build-only
fi
cargo build --release -p myriad --locked
prompt=$(seq 1 256 | awk '{ printf "%s%d", (NR > 1 ? "," : ""), (NR * 7919) % 16000 + 2 }')
run() {
  ./target/release/myriad generate --model "$ckpt" --prompt-ids "$prompt" --max-new-tokens "$new_tokens" \
    --ignore-eos --json "$@" 2>"$tmp/err" >"$tmp/out"
  decode=$(sed -n 's/.*decode: [0-9]* tokens at \([0-9.]*\) tokens\/s.*/\1/p' "$tmp/err")
  prefill=$(sed -n 's/^prefill: [0-9]* tokens at \([0-9.]*\) tokens\/s.*/\1/p' "$tmp/err")
  traffic=$(sed -n 's/^dispatch: \(.*\)$/\1/p' "$tmp/err")
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Warm the page cache first, so neither side pays for reading the file.
./target/release/myriad generate --model "$ckpt" --prompt-ids 5 --max-new-tokens 1 >/dev/null 2>&1
run
single_decode=$decode single_prefill=$prefill
cp "$tmp/out" "$tmp/single"
run --workers "$workers"
identical=no
cmp -s "$tmp/out" "$tmp/single" && identical=yes
echo "256-token prompt, $new_tokens new tokens, $(nproc) cores; outputs byte-identical: $identical"
printf '%-22s %14s %13s\n' "" "prefill tok/s" "decode tok/s"
printf '%-22s %14s %13s\n' "single process" "$single_prefill" "$single_decode"
printf '%-22s %14s %13s\n' "router + $workers workers" "$prefill" "$decode"
awk -v a="$prefill" -v b="$single_prefill" -v c="$decode" -v d="$single_decode" \
  'BEGIN { printf "%-22s %13.2fx %12.2fx\n", "ratio", a / b, c / d }'
echo "expert traffic: $traffic"
[ "$identical" = yes ] || { echo "outputs differ" >&2; exit 1; }
