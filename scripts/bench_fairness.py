#!/usr/bin/env python3
"""Time to first token of a short streaming request beside a long prompt,
against the same request alone, measured side by side on one `myriad up`.

    cargo build --release -p myriad
    python3 scripts/bench_fairness.py [--tokens 20000] [--binary target/release/myriad]

1. alone: a short prompt, streamed, on an idle server;
2. beside: the same short prompt sent --delay seconds after a prompt of N
   random token ids started (its prefill is chunked within --step-tokens);
The engine shares each step's prompt tokens between waiting prompts, so the
short request should start within a step or two, not after the long prefill.
"""

import argparse
import random
import sys
import threading
import time

from bench_kvcache import start_up, stream


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", default="target/release/myriad")
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--step-tokens", type=int, default=512)
    p.add_argument("--delay", type=float, default=1.0)
    args = p.parse_args()

    flags = ["--workers", str(args.workers), "--no-kvcache", "--step-tokens", str(args.step_tokens)]
    server, base = start_up(args.binary, *flags)
    try:
        rng = random.Random(11)
        # Ids 3..500 of the tiny model's 512 (0-2 are special).
        long = [rng.randrange(3, 500) for _ in range(args.tokens)]
        short = [rng.randrange(3, 500) for _ in range(16)]

        alone = stream(base, short, 16)
        result = {}

        def run_long():
            result["long"] = stream(base, long, 1)

        t = threading.Thread(target=run_long)
        t.start()
        time.sleep(args.delay)
        beside = stream(base, short, 16)
        t.join()
        ttft_long, total_long, _, _ = result["long"]

        print(f"`myriad up`, {args.workers} workers, --step-tokens {args.step_tokens}; "
              f"long prompt {args.tokens} tokens (TTFT {ttft_long:.2f} s)")
        print(f"{'short request':<36} {'TTFT s':>8} {'total s':>8}")
        print(f"{'alone':<36} {alone[0]:>8.3f} {alone[1]:>8.3f}")
        print(f"{f'{args.delay:.1f} s after the long prompt started':<36} {beside[0]:>8.3f} {beside[1]:>8.3f}")
        print(f"TTFT beside / alone: {beside[0] / alone[0]:.1f}x; "
              f"the long prompt's own TTFT is {ttft_long / alone[0]:.0f}x the short one alone")
        if alone[2] != beside[2]:
            sys.exit(f"the short answer changed beside the long prompt: {alone[2]!r} vs {beside[2]!r}")
        print("short answers identical")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
