#!/usr/bin/env python3
"""Time to first token for a long prompt, cold and with its prefix in the
KV-cache, measured side by side on one `myriad up`.

    cargo build --release -p myriad
    python3 scripts/bench_kvcache.py [--tokens 32768] [--binary target/release/myriad]

Three requests through the OpenAI API (streaming, time to the first token):
1. cold: a prompt of N random token ids, computed in full;
2. a second turn: the same prompt plus 32 new tokens, after the first turn's
   state was stored (only the new tokens, and the last of the prompt, are
   prefilled);
3. the identical prompt again (everything but its last token restored).
The script checks that the restored runs report their cached tokens and that
request 3 gives the same greedy tokens as request 1.
"""

import argparse
import json
import random
import re
import subprocess
import sys
import time
import urllib.request


def request(base, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=3600)


def saves(base):
    text = request(base, "/metrics").read().decode()
    m = re.search(r'^myriad_router_kvcache_saves_total\{result="ok"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def stream(base, prompt, max_tokens):
    """(seconds to the first token, seconds in all, tokens, cached prompt tokens)."""
    body = {
        "model": "tiny-v4", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}
    }
    start = time.perf_counter()
    first, text, usage = None, "", None
    with request(base, "/v1/completions", body) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text") and first is None:
                    first = time.perf_counter() - start
                text += choice.get("text", "")
    total = time.perf_counter() - start
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return first if first is not None else total, total, text, cached


def wait_ready(base):
    deadline = time.time() + 120
    while True:
        try:
            if request(base, "/ready").status == 200:
                return
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit("myriad up did not become ready")
        time.sleep(0.1)


def wait_for_saves(base, n):
    deadline = time.time() + 300
    while saves(base) < n:
        if time.time() > deadline:
            sys.exit("the router did not store the state in time")
        time.sleep(0.05)


def start_up(binary, *flags):
    """`myriad up` on a free port with `flags`: (process, base URL), once ready."""
    server = subprocess.Popen([binary, "up", "--listen", "127.0.0.1:0", *flags], stdout=subprocess.PIPE, text=True)
    banner = server.stdout.readline()
    m = re.search(r"http://(\S+)/v1", banner)
    if not m:
        server.kill()
        sys.exit(f"myriad up did not start: {banner!r}")
    base = f"http://{m.group(1)}"
    wait_ready(base)
    return server, base


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", default="target/release/myriad")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()

    server, base = start_up(args.binary, "--workers", str(args.workers), "--kvcache-memory", "8GiB")
    try:
        rng = random.Random(7)
        # Ids 3..500 of the tiny model's 512 (0-2 are special).
        prompt = [rng.randrange(3, 500) for _ in range(args.tokens)]
        turn2 = prompt + [rng.randrange(3, 500) for _ in range(32)]

        cold = stream(base, prompt, args.max_tokens)
        # The state after the prompt, and after the turn: two saves.
        wait_for_saves(base, 2)
        second = stream(base, turn2, args.max_tokens)
        again = stream(base, prompt, args.max_tokens)

        print(f"prompt: {args.tokens} tokens, {args.max_tokens} new tokens, `myriad up` with {args.workers} workers")
        print(f"{'request':<30} {'TTFT s':>9} {'total s':>9} {'cached':>8} {'vs cold':>8}")
        for name, (ttft, total, _, cached) in [
            ("cold (computed in full)", cold), ("turn 2 (prefix stored)", second), ("same prompt (stored)", again),
        ]:
            print(f"{name:<30} {ttft:>9.3f} {total:>9.3f} {cached:>8} {cold[0] / ttft:>7.1f}x")
        if cold[2] != again[2]:
            sys.exit(f"restored output differs: {cold[2]!r} vs {again[2]!r}")
        if second[3] < args.tokens - 1 or again[3] < args.tokens - 1:
            sys.exit("the stored prefix was not used")
        print("outputs identical; restored prompts report their cached tokens")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
