#!/usr/bin/env bash
# Prefix reuse over several KV-cache instances with shared system prompts:
# three `myriad kvcache` processes, one worker hosting every expert, a
# router spreading conversations over the instances (first-block hashing),
# and `myriad bench --shared-prefixes`, which prints the prompt tokens
# restored and each instance's lookups, hits, snapshots and bytes.
#
#   scripts/bench_kvcache_instances.sh [--copies 2] [--prefixes 24] [--requests 96]
set -euo pipefail
cd "$(dirname "$0")/.."
copies=1 prefixes=24 requests=96
while [ $# -gt 0 ]; do
  case "$1" in
    --copies) copies=$2; shift 2 ;;
    --prefixes) prefixes=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build -q --release -p myriad
bin=target/release/myriad
out=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$out"' EXIT
# The first word after "listening on" / "up:" in a banner: the address.
addr() { until [ -s "$1" ]; do sleep 0.1; done; head -1 "$1" | grep -oE '(127\.0\.0\.1:[0-9]+|http://[^ ]+)' | head -1; }
for i in 1 2 3; do
  "$bin" kvcache --listen 127.0.0.1:0 --memory 256MiB > "$out/kv$i" 2>/dev/null & pids+=($!)
done
"$bin" worker --listen 127.0.0.1:0 --experts '*:*' > "$out/worker" 2>/dev/null & pids+=($!)
kv=$(for i in 1 2 3; do addr "$out/kv$i"; done | paste -sd,)
"$bin" router --listen 127.0.0.1:0 --worker-addr "$(addr "$out/worker")" --kvcache "$kv" \
  --kvcache-replicas "$copies" > "$out/router" 2>/dev/null & pids+=($!)
url=$(addr "$out/router")
"$bin" bench --url "$url" --requests "$requests" --concurrency 4 --prompt-len 64 --max-tokens 8 \
  --shared-prefixes "$prefixes" --prefix-len 512 --seed 7 --kvcache "$kv"
