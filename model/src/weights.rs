//! Typed weights of every layer, fetched from a [`Checkpoint`] with the shape
//! the config implies. A wrong or missing tensor is an error that names it.

use crate::checkpoint::Checkpoint;
use crate::config::{LayerType, MlpType, ModelConfig};
use crate::error::{ModelError, Result};
use crate::kernels::{self, Projection};
use crate::stored::{Stored, StoredMatrix};
use crate::tensor::Tensor;

/// A bias-free projection `y = x · Wᵀ` with `W: [out, in]`, its weights
/// in the format the checkpoint stores them.
#[derive(Debug)]
pub struct Linear {
    pub w: StoredMatrix,
}

impl Linear {
    fn load(ckpt: &Checkpoint, name: &str, out: usize, inp: usize) -> Result<Self> {
        Ok(Linear { w: ckpt.linear(name, out, inp)? })
    }

    /// A projection over f32 weights `data` (`[out, inp]`).
    pub fn from_f32(data: Vec<f32>, out: usize, inp: usize) -> Self {
        Linear { w: StoredMatrix { stored: Stored::F32(Tensor::owned(data, vec![out, inp])), out, inp } }
    }

    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        kernels::linear_with(x, rows, self.w.weights(), self.w.out, self.w.inp)
    }

    /// This projection of `x: [rows, inp]`, for [`kernels::linear_group`].
    pub fn of<'a>(&'a self, x: &'a [f32], rows: usize) -> Projection<'a> {
        Projection { x, rows, w: self.w.weights(), n: self.w.out, k: self.w.inp }
    }

    /// The projection by weight rows `first..first + count` only (one group
    /// of a grouped projection), for [`kernels::linear_group`].
    pub fn rows_of<'a>(&'a self, x: &'a [f32], rows: usize, first: usize, count: usize) -> Projection<'a> {
        let k = self.w.inp;
        Projection { x, rows, w: self.w.weights().rows(k, first, first + count), n: count, k }
    }
}

/// One (routed or shared) SwiGLU expert: `w2 · (silu(clamp(w1·x)) ⊙ clamp(w3·x))`.
#[derive(Debug)]
pub struct ExpertWeights {
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Linear,
}

impl ExpertWeights {
    /// Bytes its weights hold, in their stored formats.
    pub fn bytes(&self) -> usize {
        self.w1.w.bytes() + self.w2.w.bytes() + self.w3.w.bytes()
    }
}

/// The compressor that turns `rate` tokens into one entry (CSA, HCA, indexer).
#[derive(Debug)]
pub struct CompressorWeights {
    /// Entry width (`head_dim`, or `index_head_dim` for the indexer).
    pub dim: usize,
    pub rate: usize,
    /// CSA's two overlapping series (Ca, Cb): projections are `2 * dim` wide.
    pub overlap: bool,
    pub wkv: Linear,
    pub wgate: Linear,
    /// Learned position bias `[rate, width]` added to the gate logits.
    pub ape: Tensor,
    pub norm: Tensor,
}

impl CompressorWeights {
    /// The kv and gate projections of `x: [rows, hidden]`, for
    /// [`kernels::linear_group`].
    pub fn projections<'a>(&'a self, x: &'a [f32], rows: usize) -> [Projection<'a>; 2] {
        [self.wkv.of(x, rows), self.wgate.of(x, rows)]
    }
}

/// The lightning indexer of a CSA layer.
#[derive(Debug)]
pub struct IndexerWeights {
    pub compressor: CompressorWeights,
    pub wq_b: Linear,
    pub weights_proj: Linear,
}

#[derive(Debug)]
pub struct AttentionWeights {
    pub wq_a: Linear,
    pub q_norm: Tensor,
    pub wq_b: Linear,
    pub wkv: Linear,
    pub kv_norm: Tensor,
    pub wo_a: Linear,
    pub wo_b: Linear,
    pub sinks: Tensor,
    pub compressor: Option<CompressorWeights>,
    pub indexer: Option<IndexerWeights>,
}

/// Projection of the `hc_mult` streams into the mHC `pre`/`post`/`comb` weights.
#[derive(Debug)]
pub struct HcWeights {
    pub fn_: Linear,
    pub base: Tensor,
    pub scale: Tensor,
}

#[derive(Debug)]
pub struct MoeWeights {
    pub gate: Linear,
    /// `e_score_correction_bias` (top-k layers only).
    pub bias: Option<Tensor>,
    /// `tid2eid[token * k + j]` (hash layers only), validated to be < n_experts.
    pub tid2eid: Option<Vec<u32>>,
    /// Routed experts by id; empty when they live elsewhere.
    pub experts: Vec<ExpertWeights>,
    pub shared: ExpertWeights,
}

#[derive(Debug)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub hc_attn: HcWeights,
    pub hc_ffn: HcWeights,
    pub attn: AttentionWeights,
    pub moe: MoeWeights,
}

#[derive(Debug)]
pub struct ModelWeights {
    /// `[vocab, hidden]`, as stored (BF16 stays 16-bit).
    pub embed: StoredMatrix,
    /// `None` when the head is tied to the embedding.
    pub head: Option<Linear>,
    pub norm: Tensor,
    pub hc_head: HcWeights,
    pub layers: Vec<LayerWeights>,
}

/// Which routed experts [`ModelWeights::load`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutedExperts {
    /// All of them (single-process generation).
    All,
    /// None: a router, whose routed experts live on workers.
    None,
}

impl ModelWeights {
    pub fn load(ckpt: &Checkpoint, cfg: &ModelConfig, routed: RoutedExperts) -> Result<Self> {
        let h = cfg.hidden_size;
        let hc = cfg.hc_mult;
        let head = if cfg.tie_word_embeddings && !ckpt.contains("head.weight") {
            None
        } else {
            Some(Linear::load(ckpt, "head.weight", cfg.vocab_size, h)?)
        };
        let layers =
            (0..cfg.num_hidden_layers).map(|l| load_layer(ckpt, cfg, l, routed)).collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            embed: ckpt.linear("embed.weight", cfg.vocab_size, h)?,
            head,
            norm: ckpt.f32_tensor("norm.weight", &[h])?,
            hc_head: HcWeights {
                fn_: Linear::load(ckpt, "hc_head.fn", hc, hc * h)?,
                base: ckpt.f32_tensor("hc_head.base", &[hc])?,
                scale: ckpt.f32_tensor("hc_head.scale", &[1])?,
            },
            layers,
        })
    }
}

fn load_hc(ckpt: &Checkpoint, cfg: &ModelConfig, prefix: &str) -> Result<HcWeights> {
    let hc = cfg.hc_mult;
    let mix = (2 + hc) * hc;
    Ok(HcWeights {
        fn_: Linear::load(ckpt, &format!("{prefix}_fn"), mix, hc * cfg.hidden_size)?,
        base: ckpt.f32_tensor(&format!("{prefix}_base"), &[mix])?,
        scale: ckpt.f32_tensor(&format!("{prefix}_scale"), &[3])?,
    })
}

fn load_compressor(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    prefix: &str,
    dim: usize,
    rate: usize,
    overlap: bool,
) -> Result<CompressorWeights> {
    let width = if overlap { 2 * dim } else { dim };
    Ok(CompressorWeights {
        dim,
        rate,
        overlap,
        wkv: Linear::load(ckpt, &format!("{prefix}.wkv.weight"), width, cfg.hidden_size)?,
        wgate: Linear::load(ckpt, &format!("{prefix}.wgate.weight"), width, cfg.hidden_size)?,
        ape: ckpt.f32_tensor(&format!("{prefix}.ape"), &[rate, width])?,
        norm: ckpt.f32_tensor(&format!("{prefix}.norm.weight"), &[dim])?,
    })
}

fn load_layer(ckpt: &Checkpoint, cfg: &ModelConfig, l: usize, routed: RoutedExperts) -> Result<LayerWeights> {
    let h = cfg.hidden_size;
    let p = format!("layers.{l}");
    let heads = cfg.num_attention_heads;
    let hd = cfg.head_dim;
    let (compressor, indexer) = match cfg.layer_types[l] {
        LayerType::Sliding => (None, None),
        LayerType::Hca => {
            (Some(load_compressor(ckpt, cfg, &format!("{p}.attn.compressor"), hd, cfg.hca_rate, false)?), None)
        }
        LayerType::Csa => {
            let idx = cfg.index_head_dim;
            let indexer = IndexerWeights {
                compressor: load_compressor(
                    ckpt,
                    cfg,
                    &format!("{p}.attn.indexer.compressor"),
                    idx,
                    cfg.csa_rate,
                    true,
                )?,
                wq_b: Linear::load(
                    ckpt,
                    &format!("{p}.attn.indexer.wq_b.weight"),
                    cfg.index_n_heads * idx,
                    cfg.q_lora_rank,
                )?,
                weights_proj: Linear::load(
                    ckpt,
                    &format!("{p}.attn.indexer.weights_proj.weight"),
                    cfg.index_n_heads,
                    h,
                )?,
            };
            (Some(load_compressor(ckpt, cfg, &format!("{p}.attn.compressor"), hd, cfg.csa_rate, true)?), Some(indexer))
        }
    };
    let group_in = heads * hd / cfg.o_groups;
    let attn = AttentionWeights {
        wq_a: Linear::load(ckpt, &format!("{p}.attn.wq_a.weight"), cfg.q_lora_rank, h)?,
        q_norm: ckpt.f32_tensor(&format!("{p}.attn.q_norm.weight"), &[cfg.q_lora_rank])?,
        wq_b: Linear::load(ckpt, &format!("{p}.attn.wq_b.weight"), heads * hd, cfg.q_lora_rank)?,
        wkv: Linear::load(ckpt, &format!("{p}.attn.wkv.weight"), hd, h)?,
        kv_norm: ckpt.f32_tensor(&format!("{p}.attn.norm.weight"), &[hd])?,
        wo_a: Linear::load(ckpt, &format!("{p}.attn.wo_a.weight"), cfg.o_groups * cfg.o_lora_rank, group_in)?,
        wo_b: Linear::load(ckpt, &format!("{p}.attn.wo_b.weight"), h, cfg.o_groups * cfg.o_lora_rank)?,
        sinks: ckpt.f32_tensor(&format!("{p}.attn.attn_sink"), &[heads])?,
        compressor,
        indexer,
    };
    let e = cfg.n_routed_experts;
    let (bias, tid2eid) = match cfg.mlp_layer_types[l] {
        MlpType::TopK => (Some(ckpt.f32_tensor(&format!("{p}.ffn.gate.bias"), &[e])?), None),
        MlpType::Hash => {
            let name = format!("{p}.ffn.gate.tid2eid");
            let table = ckpt.int_tensor(&name, &[cfg.vocab_size, cfg.num_experts_per_tok])?;
            let table = table
                .into_iter()
                .map(|v| u32::try_from(v).ok().filter(|&v| (v as usize) < e))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| ModelError::tensor(&name, format!("has an expert id outside 0..{e}")))?;
            (None, Some(table))
        }
    };
    let experts = match routed {
        RoutedExperts::All => (0..e).map(|x| load_expert(ckpt, cfg, l, x)).collect::<Result<Vec<_>>>()?,
        RoutedExperts::None => Vec::new(),
    };
    let i = cfg.moe_intermediate_size;
    let moe = MoeWeights {
        gate: Linear::load(ckpt, &format!("{p}.ffn.gate.weight"), e, h)?,
        bias,
        tid2eid,
        experts,
        shared: ExpertWeights {
            w1: Linear::load(ckpt, &format!("{p}.ffn.shared_experts.w1.weight"), i, h)?,
            w2: Linear::load(ckpt, &format!("{p}.ffn.shared_experts.w2.weight"), h, i)?,
            w3: Linear::load(ckpt, &format!("{p}.ffn.shared_experts.w3.weight"), i, h)?,
        },
    };
    Ok(LayerWeights {
        attn_norm: ckpt.f32_tensor(&format!("{p}.attn_norm.weight"), &[h])?,
        ffn_norm: ckpt.f32_tensor(&format!("{p}.ffn_norm.weight"), &[h])?,
        hc_attn: load_hc(ckpt, cfg, &format!("{p}.hc_attn"))?,
        hc_ffn: load_hc(ckpt, cfg, &format!("{p}.hc_ffn"))?,
        attn,
        moe,
    })
}

/// One routed expert of one layer, from per-expert tensors (DeepSeek naming)
/// or sliced out of the packed `transformers` tensors. Workers call this for
/// just the experts they host.
pub fn load_expert(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize, expert: usize) -> Result<ExpertWeights> {
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let p = format!("layers.{layer}.ffn.experts");
    if ckpt.contains(&format!("{p}.{expert}.w1.weight")) || !ckpt.contains(&format!("{p}.gate_up_proj")) {
        return Ok(ExpertWeights {
            w1: Linear::load(ckpt, &format!("{p}.{expert}.w1.weight"), i, h)?,
            w2: Linear::load(ckpt, &format!("{p}.{expert}.w2.weight"), h, i)?,
            w3: Linear::load(ckpt, &format!("{p}.{expert}.w3.weight"), i, h)?,
        });
    }
    // Packed `[experts, 2I, H]` (gate rows, then up rows) and `[experts, H, I]`.
    let e = cfg.n_routed_experts;
    let gate_up = ckpt.f32_rows(&format!("{p}.gate_up_proj"), &[e, 2 * i, h], expert..expert + 1)?;
    let down = ckpt.f32_rows(&format!("{p}.down_proj"), &[e, h, i], expert..expert + 1)?;
    let linear = |data: &[f32], out: usize, inp: usize| Linear::from_f32(data.to_vec(), out, inp);
    Ok(ExpertWeights {
        w1: linear(&gate_up.data()[..i * h], i, h),
        w3: linear(&gate_up.data()[i * h..], i, h),
        w2: linear(down.data(), h, i),
    })
}
