"""End-to-end speed of `myriad generate` with expert workers on a GPU against
the same workers on the CPU, on the larger random config in the release
layout (block-FP8 attention, MXFP4 experts), in one run: prefill and decode
tokens/s, and the greedy tokens must agree. Needs transformers with
DeepSeek-V4 (it builds the checkpoint). Run by scripts/gpu_check.sh; without
a GPU, `--device cpu` runs the same steps with CPU workers in both rows.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import LARGER, build, myriad  # noqa: E402
from release_layout import write_release  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--myriad", required=True)
    ap.add_argument("--dir", default="/tmp/myriad-bench")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="the second row's workers")
    args = ap.parse_args()
    base = Path(args.dir)
    f32, flash = base / "larger-v4", base / "larger-v4-flash"
    build(f32)
    if not (flash / "config.json").exists():
        write_release(f32, flash, "flash")
        for extra in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(ROOT / "models" / "tiny-v4" / extra, flash / extra)
    g = torch.Generator().manual_seed(99)
    prompt = torch.randint(2, LARGER["vocab_size"], (args.prompt_len,), generator=g).tolist()
    # A short run first, so that neither row pays for reading the files the
    # build has just written.
    myriad(args.myriad, flash, prompt[:16], 2, ["--workers", "2"])
    rows = {}
    for name, extra in [("CPU workers", ["--workers", "2"]), ("GPU workers", ["--workers", "2", "--device", args.device])]:
        rows[name] = myriad(args.myriad, flash, prompt, args.new_tokens, extra)
    print(f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens, 2 expert workers, release layout")
    print(f"{'':12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, (_, prefill, decode) in rows.items():
        print(f"{name:12} {prefill:>14.1f} {decode:>13.1f}")
    same = rows["CPU workers"][0] == rows["GPU workers"][0]
    print("greedy tokens", "identical" if same else "DIFFER", "between CPU and GPU workers")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
