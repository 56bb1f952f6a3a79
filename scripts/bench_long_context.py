"""Long-context prefill and decode of Myriad, with where the time goes.

Runs target/release/examples/long_context (one process per measurement, so
each peak RSS is its own) on the bundled tiny model and on the larger random
checkpoint of scripts/bench_reference.py, and prints:

- prefill seconds, tokens/s and peak RSS per prompt length;
- each part's share of the threads' time (matmuls, attention, indexer
  scores, top-k, compressors, MoE, mHC, the rest);
- the GFLOP/s of attention + indexer scoring next to the matmul kernel's,
  both measured in the same run, and their ratio;
- prefill throughput by chunk size (`myriad generate` prefills in chunks
  of 512 tokens, the engine's default `--step-tokens`);
- decode ms/token on the larger checkpoint at a short and a long context.

Run through scripts/bench_long_context.sh.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = "target/release/examples/long_context"


def run(model, tokens, chunk=None):
    cmd = [EXAMPLE, str(model), str(tokens), "--profile"]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def gflops(parts, names):
    seconds = sum(parts[n]["s"] for n in names)
    flop = sum(parts[n]["gflop"] for n in names)
    return flop / seconds if seconds > 0 else 0.0


def prefill_table(label, model, lengths, chunk):
    print(f"\n## {label}: prefill (chunks of {chunk or 'the whole prompt'})\n")
    header = ["tokens", "prefill s", "tok/s", "peak RSS MiB", "attn+idx GFLOP/s", "matmul GFLOP/s", "ratio"]
    parts_order = ["matmul", "attention", "indexer scores", "top-k", "compressors", "moe", "mhc"]
    print("| " + " | ".join(header + [f"% {p}" for p in parts_order] + ["% other"]) + " |")
    print("|" + "---|" * (len(header) + len(parts_order) + 1))
    for n in lengths:
        r = run(model, n, chunk)
        parts = r["parts"]
        quad = gflops(parts, ["attention", "indexer scores"])
        mm = gflops(parts, ["matmul"])
        thread = max(r["cpu_s"], sum(p["s"] for p in parts.values()))
        shares = [100 * parts[p]["s"] / thread for p in parts_order]
        other = 100 - sum(shares)
        row = [n, f"{r['prefill_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mib']:.0f}",
               f"{quad:.1f}", f"{mm:.1f}", f"{quad / mm:.2f}" if mm else "-"]
        print("| " + " | ".join(str(v) for v in row + [f"{s:.0f}" for s in shares] + [f"{other:.0f}"]) + " |",
              flush=True)


def chunk_table(label, model, tokens, chunks):
    print(f"\n## {label}: prefill of {tokens} tokens by chunk size\n")
    print("| chunk | prefill s | tok/s | peak RSS MiB | vs whole prompt |")
    print("|---|---|---|---|---|")
    base = None
    for c in chunks:
        r = run(model, tokens, c)
        base = base or r["tokens_per_s"]
        print(f"| {c or 'whole'} | {r['prefill_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} "
              f"| {r['tokens_per_s'] / base:.2f}x |", flush=True)


def decode_table(label, model, contexts, steps, chunk, rounds=3):
    print(f"\n## {label}: decode at batch 1 ({steps} steps from each context, "
          f"median of {rounds} interleaved rounds in one process)\n")
    cmd = [EXAMPLE, str(model), str(max(contexts)), "--chunk", str(chunk), "--decode", str(steps),
           "--decode-at", ",".join(map(str, contexts)), "--rounds", str(rounds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    runs = json.loads(out.strip().splitlines()[-1])["decode_ms"]
    print("| context | ms/token | rounds | vs first |")
    print("|---|---|---|---|")
    for r in runs:
        print(f"| {r['context']} | {r['median_ms']:.2f} | {', '.join(f'{m:.2f}' for m in r['ms'])} "
              f"| {r['median_ms'] / runs[0]['median_ms']:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", default="models/tiny-v4")
    ap.add_argument("--larger", default=None, help="the larger checkpoint's folder (skipped when not given)")
    ap.add_argument("--tiny-lengths", default="4096,16384,65536,131072")
    ap.add_argument("--larger-lengths", default="4096,16384")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk for the tables")
    ap.add_argument("--decode-steps", type=int, default=16)
    args = ap.parse_args()
    if not Path(EXAMPLE).exists():
        sys.exit(f"{EXAMPLE} is missing: run scripts/bench_long_context.sh")
    lengths = [int(n) for n in args.tiny_lengths.split(",")]
    prefill_table("tiny-v4", args.tiny, lengths, args.chunk)
    chunk_table("tiny-v4", args.tiny, 65536, [None, 8192, 2048, 512])
    if args.larger:
        prefill_table("larger random checkpoint", args.larger,
                      [int(n) for n in args.larger_lengths.split(",")], args.chunk)
        decode_table("larger random checkpoint", args.larger, [512, 16384], args.decode_steps, args.chunk)


if __name__ == "__main__":
    main()
