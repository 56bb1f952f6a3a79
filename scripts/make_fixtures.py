"""Build small random DeepSeek-V4 checkpoints and record what the Hugging Face
reference computes on them.

Run through scripts/make_fixtures.sh (it creates the virtualenv). Writes:

* tests/fixtures/<name>/  config.json, safetensors weights, expected.json
                          (release-flash, release-base: DeepSeek's release
                          layouts, written by scripts/release_layout.py)
* models/tiny-v4/         the bundled model for `myriad generate` / `myriad up`,
                          with a byte-level BPE tokenizer.json

Every fixture is checked for self-consistency before it is written: the
reference's cached decoding must equal its own full forward, and logits at a
position must not change when the sequence grows. A fixture that fails this
(for example through exact ties in the lightning indexer) is an error, not a
fixture.
"""

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from release_layout import read_saved, write_release

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY = ROOT / "models" / "tiny-v4"

# Small but complete: every layer type, hash and top-k MoE, hc_mult 4.
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    moe_intermediate_size=32,
    num_attention_heads=4,
    head_dim=32,
    partial_rotary_factor=0.5,
    q_lora_rank=32,
    num_experts_per_tok=2,
    n_routed_experts=8,
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=8,
    index_head_dim=16,
    index_topk=6,
    sliding_window=24,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    bos_token_id=0,
    eos_token_id=1,
)

MIXED = dict(
    BASE,
    num_hidden_layers=5,
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
    ],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    scoring_func="sqrtsoftplus",
    swiglu_limit=1.5,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
    },
)

# Written to config.json with the legacy key names older checkpoints ship.
LEGACY_SIGMOID = dict(
    BASE,
    num_hidden_layers=3,
    compress_ratios=[4, 128, 0],
    compress_rate_csa=4,
    compress_rate_hca=32,
    num_hash_layers=1,
    qk_rope_head_dim=8,
    scoring_func="sigmoid",
    routed_scaling_factor=2.5,
)
del LEGACY_SIGMOID["partial_rotary_factor"]

DEFAULT_RATES_SHARDED = dict(
    BASE,
    num_hidden_layers=2,
    layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["moe", "hash_moe"],
    sliding_window=40,
)

# Release layouts: projections at least 256 wide (several 128-blocks, many
# 32-groups). RELEASE_BASE's q_lora_rank of 320 ends in a partial 128-block.
RELEASE_FLASH = dict(
    BASE,
    hidden_size=256,
    moe_intermediate_size=256,
    head_dim=64,
    q_lora_rank=256,
    o_lora_rank=128,
    index_head_dim=32,
    num_hidden_layers=3,
    layer_types=["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    swiglu_limit=4.0,
)
RELEASE_BASE = dict(RELEASE_FLASH, q_lora_rank=320)

# V4's control tokens (never part of decoded text) and the markup tokens of
# its chat encoding (tests/fixtures/v4-chat/README.md). Like the released
# V4 folders, the tiny model ships no Jinja chat template: the router
# renders chats with its own V4 encoder.
V4_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
V4_MARKUP = ["<think>", "</think>", "｜DSML｜", "<tool_result>", "</tool_result>"]

CORPUS = """
Myriad spreads the experts of a large mixture-of-experts model over many machines.
A router runs attention and the shared expert, then sends each token to the
workers that hold its chosen experts and adds their answers back together.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
def forward(self, hidden_states): return self.down(self.act(self.gate(x)) * self.up(x))
fn main() { println!("hello, world"); let total: u64 = (1..=10).sum(); }
{"role": "user", "content": "What is the capital of France?"}
{"role": "assistant", "content": "The capital of France is Paris."}
0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 42 1024 4096 65536
Long context: the cache keeps a sliding window of recent tokens and compressed
entries for the rest, so a conversation of a million tokens stays small enough
to move between machines.
"""


# DeepSeek-V4-style chat format (written for Myriad): `thinking` opens a
# <think> block, `reasoning_effort == "max"` adds the Think Max instruction.


def randomize(model: DeepseekV4ForCausalLM, seed: int) -> None:
    """Fill every parameter and buffer with O(1)-scaled random values.

    The default init (std 0.02, zero sinks / biases / position bias, ones for
    scales) leaves whole code paths at trivial values; a fixture must exercise
    them all.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if name.endswith("embed_tokens.weight"):
                value = randn(shape)
            elif "norm" in name and name.endswith("weight"):
                value = randn(shape, 0.2, 1.0)
            elif name.endswith("sinks"):
                value = randn(shape)
            elif name.endswith("position_bias"):
                value = randn(shape, 0.5)
            elif name.endswith(".base") or name.endswith("hc_base"):
                value = randn(shape, 0.5)
            elif name.endswith(".scale") or name.endswith("hc_scale"):
                value = randn(shape, 0.3, 1.0)
            elif name.endswith("gate_up_proj"):
                value = randn(shape, 1.0 / math.sqrt(shape[-1]))
            elif name.endswith("experts.down_proj"):
                value = randn(shape, 1.0 / math.sqrt(shape[-1]))
            elif p.dim() == 2:
                value = randn(shape, 1.0 / math.sqrt(shape[-1]))
            else:
                raise SystemExit(f"no init rule for parameter {name} {tuple(shape)}")
            p.copy_(value.to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(randn(b.shape, 0.1))
            elif name.endswith("tid2eid"):
                n_experts = model.config.n_routed_experts
                rows = [torch.randperm(n_experts, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]
                b.copy_(torch.stack(rows).to(b.dtype))


def load(path: Path) -> DeepseekV4ForCausalLM:
    model = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def full_logits(model, ids):
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def greedy_cached(model, prompt, n_new):
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    past = out.past_key_values
    step_logits = [out.logits[0, -1].float()]
    generated = []
    for _ in range(n_new):
        token = int(step_logits[-1].argmax())
        generated.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        step_logits.append(out.logits[0, -1].float())
    return generated, step_logits


class Fragile(Exception):
    """The reference's answer on this prompt hinges on rounding noise."""


def check(cond, what):
    if not cond:
        raise SystemExit(f"reference is not self-consistent: {what}")


INDEXER_MARGIN = 1e-4


@torch.no_grad()
def indexer_margin(model, ids):
    """Smallest gap, over all queries and CSA layers, between the k-th and the
    (k+1)-th best causally visible indexer score. Below rounding noise the
    reference's own top-k choice is arbitrary (exact ReLU-zero ties, or near
    ties that flip with the GEMM's summation order)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer

    margins = []

    def hook(module, args, output):
        scores = module.scorer.last_scores  # [1, S, T]
        seq_len, entries = scores.shape[1], scores.shape[2]
        for s in range(seq_len):
            visible = (s + 1) // module.compress_rate
            if visible > module.index_topk:
                top = scores[0, s, :visible].topk(module.index_topk + 1).values
                margins.append(float(top[-2] - top[-1]))

    def remember(module, args, output):
        module.last_scores = output

    handles = []
    for m in model.modules():
        if isinstance(m, DeepseekV4Indexer):
            handles.append(m.scorer.register_forward_hook(remember))
            handles.append(m.register_forward_hook(hook))
    try:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return min(margins, default=float("inf"))


def gap(logits):
    top2 = logits.topk(2).values
    return float(top2[0] - top2[1])


def expected_for_prompt(model, prompt, n_new, name):
    generated, step_logits = greedy_cached(model, prompt, n_new)
    sequence = prompt + generated
    margin = indexer_margin(model, sequence)
    if margin < INDEXER_MARGIN:
        raise Fragile(f"{name}: indexer top-k margin {margin:.2e}")
    full = full_logits(model, sequence[:-1])
    p = len(prompt)
    for i, logits in enumerate(step_logits[:-1]):
        diff = float((full[p - 1 + i] - logits).abs().max())
        check(diff < 2e-5, f"{name}: cached step {i} differs from full forward by {diff}")
        check(int(full[p - 1 + i].argmax()) == int(logits.argmax()), f"{name}: cached argmax differs at step {i}")
    # Growing the sequence must not change earlier logits (indexer ties would).
    for cut in sorted({max(1, p // 3), max(1, (2 * p) // 3), p}):
        shorter = full_logits(model, sequence[:cut])
        diff = float((full[:cut] - shorter).abs().max())
        check(diff < 2e-5, f"{name}: logits up to {cut} change when the sequence grows ({diff})")
    # Greedy decisions must not hinge on rounding noise.
    for i in range(len(sequence) - 1):
        if gap(full[i]) < 1e-4:
            raise Fragile(f"{name}: near-tie between the two best tokens at position {i}")
    positions = sorted({0, p // 4, p // 2, (3 * p) // 4, p - 1, len(sequence) - 2})
    return {
        "prompt": prompt,
        "generated": generated,
        "prompt_last_logits": step_logits[0].tolist(),
        "decode_step_logits": [l.tolist() for l in step_logits[1:-1]],
        "positions": positions,
        "position_logits": [full[i].tolist() for i in positions],
        "argmax_all": [int(x) for x in full.argmax(dim=-1)],
    }


def random_prompt(vocab, seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (length,), generator=g).tolist()


def robust_case(model, vocab, seed, length, n_new, name):
    """A random prompt of `length` tokens on which the reference is robust;
    tries further seeds while the reference's answer hinges on rounding."""
    for attempt in range(40):
        try:
            return expected_for_prompt(model, random_prompt(vocab, seed + 1000 * attempt, length), n_new, name)
        except Fragile as why:
            print(f"  skip prompt: {why}", file=sys.stderr)
    raise SystemExit(f"{name}: no robust prompt found")


def write_expected(model, out_dir, name, lengths, n_new, note, seed=11):
    vocab = model.config.vocab_size
    cases = [robust_case(model, vocab, seed + i, n, n_new, f"{name}[{i}]") for i, n in enumerate(lengths)]
    write_cases(out_dir, name, cases, n_new, note)


def write_cases(out_dir, name, cases, n_new, note):
    prompts = [c["prompt"] for c in cases]
    expected = {"name": name, "note": note, "max_new_tokens": n_new, "cases": cases}
    (out_dir / "expected.json").write_text(json.dumps(expected, separators=(",", ":")))
    print(f"{name}: {len(cases)} prompts, lengths {[len(p) for p in prompts]}", file=sys.stderr)


def build(config_kwargs, seed):
    cfg = DeepseekV4Config(**config_kwargs)
    model = DeepseekV4ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize(model, seed)
    return model.eval()


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_mixed():
    out = fresh(FIXTURES / "mixed-f32")
    model = build(MIXED, seed=1)
    model.save_pretrained(out)
    write_expected(load(out), out, "mixed-f32", [7, 320], 12, "all layer types, hash + sqrtsoftplus MoE, YaRN compress rope, clamped SwiGLU")
    return out


def make_bf16(mixed_dir):
    out = fresh(FIXTURES / "mixed-bf16")
    # from_pretrained in bf16 keeps the reference's fp32-strict modules (mHC,
    # norms, sinks, position bias, correction bias) in f32: a mixed checkpoint.
    model = DeepseekV4ForCausalLM.from_pretrained(mixed_dir, dtype=torch.bfloat16)
    model.save_pretrained(out)
    # The reference computes in f32 on the bf16-rounded weights, as Myriad does.
    write_expected(load(out), out, "mixed-bf16", [7, 320], 12, "mixed-f32 stored in bf16 (+f32 strict modules); reference computed in f32")


def make_legacy():
    out = fresh(FIXTURES / "legacy-sigmoid")
    model = build(LEGACY_SIGMOID, seed=2)
    model.save_pretrained(out)
    # Rewrite config.json with the legacy names and check the reference reads it back the same.
    saved = json.loads((out / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters"):
        saved.pop(key, None)
    saved.pop("qk_rope_head_dim", None)
    for key in ("compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers", "qk_rope_head_dim"):
        saved[key] = LEGACY_SIGMOID[key]
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    reloaded = load(out)
    check(reloaded.config.layer_types == model.config.layer_types, "legacy config re-read differently")
    check(reloaded.config.compress_rates == model.config.compress_rates, "legacy rates re-read differently")
    write_expected(reloaded, out, "legacy-sigmoid", [5, 300], 10, "legacy config names, sigmoid scoring")


def make_sharded():
    # transformers 5.23 has no `softmax` router activation (ACT2FN lacks it), so
    # softmax scoring has no reference fixture; Rust unit tests cover it.
    out = fresh(FIXTURES / "default-rates-sharded")
    model = build(DEFAULT_RATES_SHARDED, seed=3)
    model.save_pretrained(out, max_shard_size="200KB")
    check((out / "model.safetensors.index.json").exists(), "sharded save wrote no index")
    write_expected(load(out), out, "default-rates-sharded", [300], 10, "default compress rates (4/128), sharded checkpoint")


def make_release(name, layout, config, seed, note, whole_blocks=True):
    """A random model written in a release layout; the reference computes in
    f32 on exactly the weights the stored codes and scales encode. Where
    every 128-block is whole, transformers also loads the folder itself
    (5.23 refuses a partial block: "not divisible by scale grid")."""
    out = fresh(FIXTURES / name)
    model = build(config, seed)
    with tempfile.TemporaryDirectory() as tmp:
        saved, dequantized = Path(tmp) / "saved", Path(tmp) / "dequantized"
        model.save_pretrained(saved)
        encoded = write_release(saved, out, layout)
        dequantized.mkdir()
        save_file({**read_saved(saved), **encoded}, dequantized / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(saved / "config.json", dequantized / "config.json")
        reference = load(dequantized)
    if whole_blocks:
        # transformers reads the release folder itself (dequantizing); its
        # weights must be exactly the ones we encoded.
        theirs = DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
        ours = reference.state_dict()
        for key, value in theirs.state_dict().items():
            check(torch.equal(value.float(), ours[key].float()), f"{name}: transformers dequantizes {key} differently")
        print(f"{name}: transformers loads the folder to the same weights", file=sys.stderr)
    write_expected(reference, out, name, [7, 200], 10, note)


def make_releases():
    make_release("release-flash", "flash", RELEASE_FLASH, 21,
                 "Flash/Pro layout: FP8 (E8M0) attention + shared, MXFP4 experts, BF16 rest, mtp.0, 2 shards")
    make_release("release-base", "base", RELEASE_BASE, 22,
                 "Base layout: FP8 experts and projections with F32 scales, a partial 128-block, mtp.0, 2 shards",
                 whole_blocks=False)


def make_tiny():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    out = fresh(TINY)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512 - len(V4_MARKUP),
        special_tokens=V4_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.strip().splitlines() * 4, trainer=trainer)
    # The markup the V4 encoder writes and the parser reads back: one token
    # each, as in the real tokenizer, and kept in decoded text.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in V4_MARKUP])
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    model = build(dict(MIXED, vocab_size=vocab, num_hidden_layers=5), seed=7)
    model.save_pretrained(out)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<｜begin▁of▁sentence｜>",
                "eos_token": "<｜end▁of▁sentence｜>",
                "model_max_length": 1048576,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    # A text prompt through the real tokenizer, so `--prompt` is checked too.
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text).ids
    case = expected_for_prompt(load(out), ids, 16, "tiny-v4")
    case["prompt_text"] = text
    tiny_expected = fresh(FIXTURES / "tiny-v4")
    write_cases(tiny_expected, "tiny-v4", [case], 16, "models/tiny-v4; the prompt is prompt_text through tokenizer.json")
    print(f"tiny-v4: vocab {vocab}", file=sys.stderr)


def main():
    torch.manual_seed(0)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    steps = {
        "mixed": lambda: make_bf16(make_mixed()),
        "legacy": make_legacy,
        "sharded": make_sharded,
        "release": make_releases,
        "tiny": make_tiny,
    }
    for name, step in steps.items():
        if not only or name in only:
            step()


if __name__ == "__main__":
    main()
