"""Decode tokens/s of Myriad vs transformers on one larger random V4 checkpoint.

Both run greedy on the same prompt, on this machine's cores, in one run; the
greedy tokens must agree (a correctness check at a realistic size). Run
through scripts/bench_reference.sh.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import randomize  # noqa: E402

LARGER = dict(
    vocab_size=16384,
    hidden_size=1024,
    moe_intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=16,
    head_dim=128,
    partial_rotary_factor=0.5,
    q_lora_rank=256,
    num_experts_per_tok=6,
    n_routed_experts=64,
    o_groups=4,
    o_lora_rank=256,
    index_n_heads=8,
    index_head_dim=64,
    index_topk=64,
    sliding_window=128,
    hc_mult=4,
    layer_types=["heavily_compressed_attention", "heavily_compressed_attention"]
    + ["compressed_sparse_attention", "heavily_compressed_attention"] * 3,
    mlp_layer_types=["hash_moe", "hash_moe"] + ["moe"] * 6,
)


def build(path: Path):
    if (path / "config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    cfg = DeepseekV4Config(**LARGER)
    model = DeepseekV4ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize(model, seed=5)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e6:.0f} M-parameter checkpoint in {path}", file=sys.stderr)
    model.save_pretrained(path)


@torch.no_grad()
def reference(path: Path, prompt, new_tokens):
    model = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    start = time.perf_counter()
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    prefill = time.perf_counter() - start
    past, logits, generated = out.past_key_values, out.logits[0, -1], []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(logits.argmax())
        generated.append(token)
        if len(generated) == new_tokens:
            break
        out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    decode = time.perf_counter() - start
    return generated, len(prompt) / prefill, (new_tokens - 1) / decode


def myriad(binary, path: Path, prompt, new_tokens, extra=()):
    args = [binary, "generate", "--model", str(path), "--prompt-ids", ",".join(map(str, prompt)),
            "--max-new-tokens", str(new_tokens), "--ignore-eos", "--json", *extra]
    run = subprocess.run(args, capture_output=True, text=True, check=True)
    generated = json.loads(run.stdout)["generated"]
    m = re.search(r"prefill: \d+ tokens at ([\d.]+) tokens/s; decode: \d+ tokens at ([\d.]+) tokens/s", run.stderr)
    return generated, float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--myriad")
    ap.add_argument("--checkpoint", default="/tmp/myriad-bench/larger-v4")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--build-only", action="store_true", help="only create the checkpoint")
    args = ap.parse_args()
    path = Path(args.checkpoint)
    build(path)
    if args.build_only:
        return
    g = torch.Generator().manual_seed(99)
    prompt = torch.randint(2, LARGER["vocab_size"], (args.prompt_len,), generator=g).tolist()
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}", file=sys.stderr)
    ref_tokens, ref_prefill, ref_decode = reference(path, prompt, args.new_tokens)
    our_tokens, our_prefill, our_decode = myriad(args.myriad, path, prompt, args.new_tokens)
    same = ref_tokens == our_tokens
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy tokens identical: {same}")
    print(f"{'':12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{'transformers':12} {ref_prefill:14.1f} {ref_decode:13.2f}")
    print(f"{'myriad':12} {our_prefill:14.1f} {our_decode:13.2f}")
    print(f"{'ratio':12} {our_prefill / ref_prefill:13.1f}x {our_decode / ref_decode:12.1f}x")
    if not same:
        sys.exit("greedy tokens differ between myriad and transformers")


if __name__ == "__main__":
    main()
