"""Write a DeepSeek-V4 checkpoint in the layout DeepSeek released V4 in.

Used by scripts/make_fixtures.py (reference fixtures) and
scripts/bench_quantized.py (speed). From a model saved by transformers
(`save_pretrained`, f32), `write_release` writes:

* "flash": block-FP8 attention and shared-expert projections with E8M0
  scales `[ceil(out/128), ceil(in/128)]`, MXFP4 routed experts (`I8`
  `[out, in/2]`, low nibble = even input) with E8M0 scales `[out, in/32]`,
  BF16 embeddings, head, norms, router and compressor weights, F32 for mHC,
  sinks, position bias and the router bias; an `mtp.0.*` module; shards
  with an index; `quantization_config` and `expert_dtype: "fp4"`.
* "base": as "flash", but routed experts block-FP8 too and every scale F32
  (`amax / 448`), no `scale_fmt`, `expert_dtype: "fp8"`.

It returns the f32 weights those codes encode (`w = e4m3(q) · scale`,
`w = e2m1(q) · 2^(e-127)`), the values a reference must compute on.
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FP8_BLOCK = 128
FP4_GROUP = 32
E4M3_MAX = 448.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

FP8_PROJECTIONS = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight$|\.shared_experts\.w[123]\.weight$")
ROUTED = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
# Kept F32 in the release; every other tensor that is not quantized is BF16.
F32_NAMES = re.compile(r"hc_|attn_sink|\.ape$|gate\.bias$|tid2eid")

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    "activation_scheme": "dynamic",
}


def release_name(name: str) -> str:
    """transformers' saved name to DeepSeek's own."""
    name = name.removeprefix("model.")
    name = name.replace("embed_tokens.weight", "embed.weight")
    name = re.sub(r"\.attn\.norm\.weight$", ".attn.kv_norm.weight", name)
    return re.sub(r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1", name)


def e8m0_power(amax: torch.Tensor, top: float) -> torch.Tensor:
    """Smallest power of two `s` with `amax / s <= top` (2^-127 for zero blocks)."""
    exponent = torch.ceil(torch.log2(torch.clamp(amax, min=1e-38) / top))
    return torch.exp2(torch.clamp(exponent, -127, 127))


def quantize_fp8(w: torch.Tensor, e8m0: bool):
    """Block-FP8 codes, scales (E8M0 or F32) and the f32 weights they encode."""
    out, inp = w.shape
    rows, cols = math.ceil(out / FP8_BLOCK), math.ceil(inp / FP8_BLOCK)
    amax = torch.zeros(rows, cols)
    for r in range(rows):
        for c in range(cols):
            block = w[r * FP8_BLOCK : (r + 1) * FP8_BLOCK, c * FP8_BLOCK : (c + 1) * FP8_BLOCK]
            amax[r, c] = block.abs().max()
    scales = e8m0_power(amax, E4M3_MAX) if e8m0 else torch.clamp(amax, min=1e-30) / E4M3_MAX
    full = scales.repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
    codes = torch.clamp(w / full, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    encoded = codes.to(torch.float32) * full
    stored_scales = scales.to(torch.float8_e8m0fnu) if e8m0 else scales.to(torch.float32)
    return codes, stored_scales, encoded


def quantize_fp4(w: torch.Tensor):
    """MXFP4 bytes (`I8`), E8M0 group scales and the f32 weights they encode."""
    out, inp = w.shape
    groups = w.reshape(out, inp // FP4_GROUP, FP4_GROUP)
    scales = e8m0_power(groups.abs().amax(dim=-1), 6.0)
    scaled = groups / scales.unsqueeze(-1)
    magnitude = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(dim=-1)
    nibbles = (magnitude | torch.where(scaled < 0, 8, 0)).reshape(out, inp).to(torch.uint8)
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).view(torch.int8)
    values = E2M1[magnitude] * torch.where(scaled < 0, -1.0, 1.0)
    encoded = (values * scales.unsqueeze(-1)).reshape(out, inp)
    return packed, scales.to(torch.float8_e8m0fnu), encoded


def read_saved(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    tensors = {}
    for f in files:
        with safe_open(f, "pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    return tensors


def write_release(saved: Path, out: Path, layout: str, shards: int = 2) -> dict:
    """Writes `saved` (a transformers f32 checkpoint) to `out` in `layout`
    ("flash" or "base"); returns {transformers name: encoded f32 weight} for
    every tensor whose values changed (quantized or BF16-rounded)."""
    assert layout in ("flash", "base")
    out.mkdir(parents=True, exist_ok=True)
    tensors, encoded = {}, {}
    for name, w in read_saved(saved).items():
        rname = release_name(name)
        if ROUTED.search(rname) or FP8_PROJECTIONS.search(rname):
            scale_name = rname.removesuffix(".weight") + ".scale"
            if ROUTED.search(rname) and layout == "flash":
                codes, scales, values = quantize_fp4(w.float())
            else:
                codes, scales, values = quantize_fp8(w.float(), e8m0=layout == "flash")
            tensors[rname], tensors[scale_name] = codes, scales
            encoded[name] = values
        elif w.is_floating_point() and not F32_NAMES.search(rname):
            tensors[rname] = w.to(torch.bfloat16)
            encoded[name] = tensors[rname].float()
        else:
            tensors[rname] = w
    # A multi-token-prediction module as the release ships one (unused).
    hidden = tensors["embed.weight"].shape[1]
    tensors["mtp.0.enorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    mtp = torch.randn(hidden, 2 * hidden, generator=torch.Generator().manual_seed(0)) / hidden
    proj, proj_scale, _ = quantize_fp8(mtp, e8m0=layout == "flash")
    tensors["mtp.0.e_proj.weight"], tensors["mtp.0.e_proj.scale"] = proj, proj_scale

    names = sorted(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[s * per_shard : (s + 1) * per_shard]
        save_file({n: tensors[n].contiguous() for n in chunk}, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))

    config = json.loads((saved / "config.json").read_text())
    quantization = dict(QUANTIZATION_CONFIG)
    if layout == "flash":
        quantization["scale_fmt"] = "ue8m0"
    config["quantization_config"] = quantization
    config["expert_dtype"] = "fp4" if layout == "flash" else "fp8"
    config["num_nextn_predict_layers"] = 1
    # DeepSeek's own schedule keys, as the release's config.json has them
    # (llama.cpp's converter reads these; transformers and Myriad prefer
    # layer_types / mlp_layer_types when both are present).
    rates = {"sliding_attention": 0, **config.get("compress_rates", {})}
    config["compress_ratios"] = [rates[t] for t in config["layer_types"]]
    config["num_hash_layers"] = config["mlp_layer_types"].count("hash_moe")
    config["torch_dtype"] = "bfloat16"
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        if (saved / extra).exists():
            (out / extra).write_bytes((saved / extra).read_bytes())
    return encoded
