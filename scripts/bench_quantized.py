"""Speed on DeepSeek's release layout, measured side by side in one run.

The larger random V4 config of bench_reference.py, written in the Flash
release layout (block-FP8 attention and shared experts, MXFP4 routed
experts, BF16 rest; scripts/release_layout.py), run by:

* Myriad on the release folder,
* Myriad on the same weight values stored as f32 (the f32 path),
* transformers on the same values in f32 (what it dequantizes the release
  folder to),
* llama.cpp (`llama-bench`) on the GGUF its converter makes from the same
  folder, when --llama-bench and --llama-convert are given.

Prints prefill and decode tokens/s, the weight bytes a decoded token reads,
and this machine's read bandwidth measured here, with ratios. Myriad,
llama.cpp and the bandwidth are measured in several interleaved rounds
(--rounds, the two Myriad runs in alternating order). Each speed is the
median of its rounds; each ratio, and the share of the bandwidth, is the
median of the per-round ratios, which compare runs seconds apart, so that a
burst of load from other tenants of a shared machine does not fall on one
side of a ratio only. Every round is printed too. Transformers, far slower,
runs once. The greedy tokens of the Myriad runs
and transformers must agree. Run through scripts/bench_quantized.sh.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import LARGER, build, myriad, reference  # noqa: E402
from release_layout import read_saved, write_release  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def read_bandwidth() -> float:
    """GB/s for summing 1 GiB with torch on every core, best of 5."""
    data = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        float(data.sum())
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def tensor_bytes(folder: Path) -> dict:
    """Stored bytes of every tensor, from the safetensors headers."""
    sizes = {}
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                sizes[name] = end - start
    return sizes


def bytes_per_token(folder: Path) -> int:
    """Weight bytes one decoded token reads: every tensor but the embedding
    table (one row), the unused mtp module and the routed experts, plus
    num_experts_per_tok routed experts per layer."""
    sizes = tensor_bytes(folder)
    dense = sum(b for n, b in sizes.items() if ".experts." not in n and not n.startswith(("mtp.", "embed.")))
    routed = sum(b for n, b in sizes.items() if ".ffn.experts." in n)
    share = LARGER["num_experts_per_tok"] / LARGER["n_routed_experts"]
    return int(dense + routed * share)


def dequantized_copy(saved: Path, encoded: dict, out: Path):
    """The release folder's weight values, stored as f32."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({**read_saved(saved), **encoded}, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(saved / "config.json", out / "config.json")


def llama_cpp(convert: str, bench: Path, folder: Path, gguf: Path, prompt_len: int, new_tokens: int, threads: int):
    if not gguf.exists():
        subprocess.run(convert.split() + [str(folder), "--outfile", str(gguf)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = subprocess.run([str(bench), "-m", str(gguf), "-p", str(prompt_len), "-n", str(new_tokens),
                          "-t", str(threads), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    results = json.loads(run.stdout)
    prefill = next(r["avg_ts"] for r in results if r["n_prompt"] > 0)
    decode = next(r["avg_ts"] for r in results if r["n_gen"] > 0)
    return prefill, decode


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--myriad", required=True)
    ap.add_argument("--dir", default="/tmp/myriad-bench")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    ap.add_argument("--llama-convert", help="scripts/llama_convert.py's command line, as one string")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    args = ap.parse_args()
    base = Path(args.dir)
    f32, flash, flash_f32 = base / "larger-v4", base / "larger-v4-flash", base / "larger-v4-flash-f32"
    build(f32)
    if not (flash / "config.json").exists() or not (flash_f32 / "config.json").exists():
        encoded = write_release(f32, flash, "flash")
        for extra in ("tokenizer.json", "tokenizer_config.json"):  # llama.cpp's converter wants one
            shutil.copy(ROOT / "models" / "tiny-v4" / extra, flash / extra)
        dequantized_copy(f32, encoded, flash_f32)
    threads = os.cpu_count()
    g = torch.Generator().manual_seed(99)
    prompt = torch.randint(2, LARGER["vocab_size"], (args.prompt_len,), generator=g).tolist()
    gguf = base / "larger-v4-flash.gguf"
    with_llama = bool(args.llama_bench and args.llama_convert)

    samples = {}  # name -> list of (tokens, prefill, decode), one per round
    bandwidths = []
    ours_name, f32_name = "myriad, release layout", "myriad, same values f32"
    for round in range(args.rounds):
        bandwidths.append(read_bandwidth())
        for name in ([ours_name, f32_name] if round % 2 == 0 else [f32_name, ours_name]):
            folder = flash if name == ours_name else flash_f32
            samples.setdefault(name, []).append(myriad(args.myriad, folder, prompt, args.new_tokens))
        if with_llama:
            prefill, decode = llama_cpp(args.llama_convert, Path(args.llama_bench), flash, gguf,
                                        args.prompt_len, args.new_tokens, threads)
            samples.setdefault("llama.cpp (GGUF of it)", []).append((None, prefill, decode))
    # transformers would dequantize the release folder itself into BF16
    # parameters next to f32 ones (and then refuse the f32 forward); its
    # dequantized values are exactly the encoded ones (make_fixtures.py
    # checks that on release-flash), so it runs on the f32 copy.
    samples["transformers (f32)"] = [reference(flash_f32, prompt, args.new_tokens)]
    runs = {name: (median([r[1] for r in rounds]), median([r[2] for r in rounds])) for name, rounds in samples.items()}
    tokens = {f"{name} (round {i + 1})": r[0] for name, rounds in samples.items()
              for i, r in enumerate(rounds) if r[0] is not None}
    ours = samples[ours_name]

    def ratio(rounds, i):
        """Median of our per-round speed over theirs (transformers: its one run)."""
        return median([ours[r][i] / rounds[min(r, len(rounds) - 1)][i] for r in range(len(ours))])

    quantized_bytes, f32_bytes = bytes_per_token(flash), bytes_per_token(flash_f32)
    shares = [quantized_bytes * r[2] / 1e9 / b for r, b in zip(ours, bandwidths)]
    print(f"{threads} cores; read bandwidth {median(bandwidths):.1f} GB/s (torch sum of 1 GiB); "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens; {args.rounds} interleaved rounds "
          f"(transformers: 1): speeds are medians, ratios medians of per-round ratios")
    print(f"weights read per decoded token: {quantized_bytes / 1e6:.1f} MB release layout, "
          f"{f32_bytes / 1e6:.1f} MB as f32")
    for r, (bandwidth, q, f) in enumerate(zip(bandwidths, ours, samples[f32_name])):
        print(f"  round {r + 1}: bandwidth {bandwidth:.1f} GB/s; decode {q[2]:.1f} release layout, {f[2]:.1f} f32 "
              f"({q[2] / f[2]:.2f}x); release layout reads {100 * shares[r]:.0f}% of the bandwidth")
    print(f"{'':26} {'prefill tok/s':>13} {'decode tok/s':>13} {'ours/this prefill':>18} {'ours/this decode':>17}")
    for name, (prefill, decode) in runs.items():
        print(f"{name:26} {prefill:13.1f} {decode:13.1f} {ratio(samples[name], 1):17.2f}x "
              f"{ratio(samples[name], 2):16.2f}x")
    used = quantized_bytes * runs[ours_name][1] / 1e9
    print(f"release layout decode reads {used:.1f} GB/s of weights (median speed); median per-round share "
          f"of the read bandwidth: {100 * median(shares):.0f}%")
    if len(set(map(tuple, tokens.values()))) != 1:
        sys.exit(f"greedy tokens differ: {tokens}")
    print("greedy tokens identical across Myriad (both formats, every round) and transformers")


if __name__ == "__main__":
    main()
