//! `config.json` of a DeepSeek-V4 checkpoint, parsed the way the reference
//! (`transformers` `DeepseekV4Config`) reads it, legacy names included, and
//! validated once so the forward pass can trust every number.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::rope::RopeParams;

/// Attention schedule of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Sliding window only.
    Sliding,
    /// Compressed sparse attention: overlapping windows + lightning indexer.
    Csa,
    /// Heavily compressed attention: non-overlapping windows, no indexer.
    Hca,
}

/// Expert selection of one layer's MoE block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpType {
    /// Frozen `tid2eid[token]` table picks the experts.
    Hash,
    /// Top-k of `score + e_score_correction_bias`.
    TopK,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    SqrtSoftplus,
    Sigmoid,
    Softmax,
}

/// The validated model configuration. Field names follow `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub head_dim: usize,
    pub q_lora_rank: usize,
    pub num_experts_per_tok: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub scoring_func: ScoringFunc,
    pub routed_scaling_factor: f32,
    pub max_position_embeddings: usize,
    pub layer_types: Vec<LayerType>,
    pub mlp_layer_types: Vec<MlpType>,
    /// Tokens per compressed entry in CSA layers (`m`, 4 in V4).
    pub csa_rate: usize,
    /// Tokens per compressed entry in HCA layers (`m'`, 128 in V4).
    pub hca_rate: usize,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub swiglu_limit: f32,
    pub sliding_window: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub rms_norm_eps: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub tie_word_embeddings: bool,
    /// RoPE of sliding-only layers (`rope_parameters.main`).
    pub rope_main: RopeParams,
    /// RoPE of CSA/HCA layers, their compressors and the indexer.
    pub rope_compress: RopeParams,
}

/// `config.json` as written, every field optional so that defaults and legacy
/// names can be resolved in one place ([`ModelConfig::from_raw`]).
#[derive(Debug, Deserialize)]
struct RawConfig {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    q_lora_rank: Option<usize>,
    num_experts_per_tok: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    scoring_func: Option<String>,
    norm_topk_prob: Option<bool>,
    routed_scaling_factor: Option<f32>,
    max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    layer_types: Option<Vec<String>>,
    compress_rates: Option<std::collections::BTreeMap<String, usize>>,
    compress_rope_theta: Option<f64>,
    hc_mult: Option<usize>,
    hc_sinkhorn_iters: Option<usize>,
    hc_eps: Option<f32>,
    mlp_layer_types: Option<Vec<String>>,
    swiglu_limit: Option<f32>,
    sliding_window: Option<usize>,
    o_groups: Option<usize>,
    o_lora_rank: Option<usize>,
    index_n_heads: Option<usize>,
    index_head_dim: Option<usize>,
    index_topk: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f32>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    tie_word_embeddings: Option<bool>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    partial_rotary_factor: Option<f64>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    /// The released checkpoints' weight formats (checked, see [`check_quantization`]).
    quantization_config: Option<Value>,
    expert_dtype: Option<String>,
    // Legacy names folded into the fields above, as the reference does.
    compress_ratios: Option<Vec<usize>>,
    compress_rate_csa: Option<usize>,
    compress_rate_hca: Option<usize>,
    num_hash_layers: Option<usize>,
    qk_rope_head_dim: Option<usize>,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`; also returns its bytes (part of
    /// the model's fingerprint).
    pub fn read(dir: &Path) -> Result<(Self, Vec<u8>)> {
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(format!("read {}", path.display()), e))?;
        let config = std::str::from_utf8(&bytes)
            .map_err(|e| format!("not UTF-8: {e}"))
            .and_then(Self::from_json)
            .map_err(|message| ModelError::Config { path: path.clone(), message })?;
        Ok((config, bytes))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("not a valid config: {e}"))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> std::result::Result<Self, String> {
        check_quantization(raw.quantization_config.as_ref(), raw.expert_dtype.as_deref())?;
        let n = raw.num_hidden_layers.unwrap_or(43);
        let head_dim = raw.head_dim.unwrap_or(512);

        let mut csa_rate = raw.compress_rates.as_ref().and_then(|r| r.get("compressed_sparse_attention").copied());
        let mut hca_rate = raw.compress_rates.as_ref().and_then(|r| r.get("heavily_compressed_attention").copied());
        if let Some(rates) = &raw.compress_rates
            && let Some(bad) = rates.keys().find(|k| parse_layer_type(k).is_none_or(|t| t == LayerType::Sliding))
        {
            return Err(format!("compress_rates has unknown layer type `{bad}`"));
        }
        csa_rate = raw.compress_rate_csa.or(csa_rate);
        hca_rate = raw.compress_rate_hca.or(hca_rate);
        let csa_rate = csa_rate.unwrap_or(4);
        let hca_rate = hca_rate.unwrap_or(128);

        let layer_types = match (raw.layer_types, raw.compress_ratios) {
            (Some(types), _) => types
                .iter()
                .map(|t| parse_layer_type(t).ok_or_else(|| format!("layer_types has unknown entry `{t}`")))
                .collect::<std::result::Result<Vec<_>, _>>()?,
            (None, Some(ratios)) => ratios
                .iter()
                .map(|r| match r {
                    0 => Ok(LayerType::Sliding),
                    4 => Ok(LayerType::Csa),
                    128 => Ok(LayerType::Hca),
                    other => Err(format!("compress_ratios entry {other} is not one of 0, 4, 128")),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            (None, None) => {
                let mut types = vec![LayerType::Hca; n.min(2)];
                types
                    .extend((0..n.saturating_sub(2)).map(|i| if i % 2 == 1 { LayerType::Csa } else { LayerType::Hca }));
                types
            }
        };
        let mlp_layer_types = match raw.mlp_layer_types {
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    "hash_moe" => Ok(MlpType::Hash),
                    "moe" => Ok(MlpType::TopK),
                    other => Err(format!("mlp_layer_types has unknown entry `{other}`")),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            None => {
                let hash = raw.num_hash_layers.unwrap_or(3).min(n);
                let mut types = vec![MlpType::Hash; hash];
                types.resize(n, MlpType::TopK);
                types
            }
        };
        // Like the reference, longer schedules are cut to the layer count; shorter ones are an error.
        let layer_types = fit_schedule(layer_types, n, "layer_types")?;
        let mlp_layer_types = fit_schedule(mlp_layer_types, n, "mlp_layer_types")?;

        let partial = match (raw.partial_rotary_factor, raw.qk_rope_head_dim) {
            (Some(p), Some(d)) if (p * head_dim as f64) as usize != d => {
                return Err(format!(
                    "partial_rotary_factor {p} gives a rope dim of {} but qk_rope_head_dim is {d}",
                    (p * head_dim as f64) as usize
                ));
            }
            (Some(p), _) => p,
            (None, Some(d)) => d as f64 / head_dim as f64,
            (None, None) => 64.0 / 512.0,
        };
        let rope_theta = raw.rope_theta.unwrap_or(10000.0);
        let compress_rope_theta = raw.compress_rope_theta.unwrap_or(160000.0);
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(1 << 20);
        let (rope_main, rope_compress) = crate::rope::from_config(
            raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()),
            rope_theta,
            compress_rope_theta,
            partial,
            head_dim,
        )?;

        let eos_token_ids = match raw.eos_token_id {
            None => vec![1],
            Some(Value::Null) => vec![],
            Some(Value::Number(id)) => vec![as_token_id(&id)?],
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| match v {
                    Value::Number(id) => as_token_id(id),
                    other => Err(format!("eos_token_id entry {other} is not a token id")),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(format!("eos_token_id {other} is not a token id or a list of them"));
            }
        };

        let scoring_func = match raw.scoring_func.as_deref().unwrap_or("sqrtsoftplus") {
            "sqrtsoftplus" => ScoringFunc::SqrtSoftplus,
            "sigmoid" => ScoringFunc::Sigmoid,
            "softmax" => ScoringFunc::Softmax,
            other => {
                return Err(format!("scoring_func `{other}` is not one of sqrtsoftplus, sigmoid, softmax"));
            }
        };

        let config = ModelConfig {
            vocab_size: raw.vocab_size.unwrap_or(129280),
            hidden_size: raw.hidden_size.unwrap_or(4096),
            moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(2048),
            num_hidden_layers: n,
            num_attention_heads: raw.num_attention_heads.unwrap_or(64),
            head_dim,
            q_lora_rank: raw.q_lora_rank.unwrap_or(1024),
            num_experts_per_tok: raw.num_experts_per_tok.unwrap_or(6),
            n_routed_experts: raw.n_routed_experts.unwrap_or(256),
            n_shared_experts: raw.n_shared_experts.unwrap_or(1),
            scoring_func,
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.5),
            max_position_embeddings,
            layer_types,
            mlp_layer_types,
            csa_rate,
            hca_rate,
            hc_mult: raw.hc_mult.unwrap_or(4),
            hc_sinkhorn_iters: raw.hc_sinkhorn_iters.unwrap_or(20),
            hc_eps: raw.hc_eps.unwrap_or(1e-6),
            swiglu_limit: raw.swiglu_limit.unwrap_or(10.0),
            sliding_window: raw.sliding_window.unwrap_or(128),
            o_groups: raw.o_groups.unwrap_or(8),
            o_lora_rank: raw.o_lora_rank.unwrap_or(1024),
            index_n_heads: raw.index_n_heads.unwrap_or(64),
            index_head_dim: raw.index_head_dim.unwrap_or(128),
            index_topk: raw.index_topk.unwrap_or(512),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            bos_token_id: raw.bos_token_id.or(Some(0)),
            eos_token_ids,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            rope_main,
            rope_compress,
        };
        config.validate(&RawFlags {
            num_key_value_heads: raw.num_key_value_heads,
            hidden_act: raw.hidden_act.as_deref(),
            norm_topk_prob: raw.norm_topk_prob,
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
        })?;
        Ok(config)
    }

    fn validate(&self, flags: &RawFlags) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("head_dim", self.head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("n_routed_experts", self.n_routed_experts),
            ("hc_mult", self.hc_mult),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
            ("sliding_window", self.sliding_window),
            ("o_groups", self.o_groups),
            ("o_lora_rank", self.o_lora_rank),
            ("compress rate of compressed_sparse_attention", self.csa_rate),
            ("compress rate of heavily_compressed_attention", self.hca_rate),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if flags.num_key_value_heads.is_some_and(|h| h != 1) {
            return Err("num_key_value_heads must be 1: DeepSeek-V4 attention is shared-KV MQA".into());
        }
        if flags.hidden_act.is_some_and(|a| a != "silu") {
            return Err(format!("hidden_act `{}` is not supported (only silu)", flags.hidden_act.unwrap_or("")));
        }
        if flags.norm_topk_prob == Some(false) {
            return Err(
                "norm_topk_prob=false is not supported: DeepSeek-V4 always renormalises the top-k weights".into()
            );
        }
        if flags.attention_bias == Some(true) || flags.mlp_bias == Some(true) {
            return Err("attention_bias / mlp_bias are not supported: DeepSeek-V4 projections have no bias".into());
        }
        if self.num_experts_per_tok > self.n_routed_experts {
            return Err(format!(
                "num_experts_per_tok ({}) exceeds n_routed_experts ({})",
                self.num_experts_per_tok, self.n_routed_experts
            ));
        }
        if !(self.num_attention_heads * self.head_dim).is_multiple_of(self.o_groups) {
            return Err(format!(
                "num_attention_heads * head_dim ({}) is not divisible by o_groups ({})",
                self.num_attention_heads * self.head_dim,
                self.o_groups
            ));
        }
        for (name, rope) in [("main", &self.rope_main), ("compress", &self.rope_compress)] {
            if rope.dim % 2 != 0 || rope.dim == 0 || rope.dim > self.head_dim {
                return Err(format!(
                    "rope `{name}` covers {} channels; it must be even, positive and at most head_dim ({})",
                    rope.dim, self.head_dim
                ));
            }
        }
        if self.layer_types.contains(&LayerType::Csa) {
            if self.index_n_heads == 0 || self.index_head_dim == 0 || self.index_topk == 0 {
                return Err("index_n_heads, index_head_dim and index_topk must be positive with CSA layers".into());
            }
            if self.rope_compress.dim > self.index_head_dim {
                return Err(format!(
                    "index_head_dim ({}) is smaller than the compress rope dim ({})",
                    self.index_head_dim, self.rope_compress.dim
                ));
            }
        }
        if let Some(bad) =
            self.eos_token_ids.iter().chain(&self.bos_token_id).find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(format!("special token id {bad} is outside the vocabulary ({})", self.vocab_size));
        }
        if !(self.hc_eps.is_finite() && self.rms_norm_eps.is_finite() && self.swiglu_limit > 0.0) {
            return Err("hc_eps and rms_norm_eps must be finite and swiglu_limit positive".into());
        }
        Ok(())
    }

    /// The RoPE a layer's attention uses: `main` for sliding-only layers,
    /// `compress` for layers with a compressor.
    pub fn attention_rope(&self, layer: usize) -> &RopeParams {
        match self.layer_types[layer] {
            LayerType::Sliding => &self.rope_main,
            LayerType::Csa | LayerType::Hca => &self.rope_compress,
        }
    }
}

/// Fields that are only checked, never used after parsing.
struct RawFlags<'a> {
    num_key_value_heads: Option<usize>,
    hidden_act: Option<&'a str>,
    norm_topk_prob: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

/// Accepts the quantization the loader understands (DeepSeek's release:
/// block-FP8 e4m3 with 128×128 blocks and UE8M0 or F32 scales; routed
/// experts in FP4 or FP8) and refuses anything else by name, rather than
/// load weights it would misread. Which tensors are quantized is read from
/// their dtypes in the checkpoint.
fn check_quantization(config: Option<&Value>, expert_dtype: Option<&str>) -> std::result::Result<(), String> {
    if let Some(dtype) = expert_dtype
        && !matches!(dtype, "fp4" | "fp8" | "bf16")
    {
        return Err(format!("expert_dtype `{dtype}` is not supported (fp4, fp8, bf16)"));
    }
    let Some(q) = config else { return Ok(()) };
    let field = |key: &str| q.get(key).filter(|v| !v.is_null());
    let text = |key: &str| field(key).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
    match text("quant_method").as_deref() {
        Some("fp8") => {}
        Some(other) => return Err(format!("quantization_config.quant_method `{other}` is not supported (fp8)")),
        None => return Err("quantization_config has no quant_method".into()),
    }
    for (key, allowed) in [("fmt", &["e4m3"][..]), ("scale_fmt", &["ue8m0"]), ("activation_scheme", &["dynamic"])] {
        if let Some(value) = text(key)
            && !allowed.contains(&value.as_str())
        {
            return Err(format!("quantization_config.{key} `{value}` is not supported ({})", allowed.join(", ")));
        }
    }
    if let Some(block) = field("weight_block_size")
        && block != &serde_json::json!([128, 128])
    {
        return Err(format!("quantization_config.weight_block_size {block} is not supported ([128, 128])"));
    }
    Ok(())
}

fn parse_layer_type(name: &str) -> Option<LayerType> {
    match name {
        "sliding_attention" => Some(LayerType::Sliding),
        "compressed_sparse_attention" => Some(LayerType::Csa),
        "heavily_compressed_attention" => Some(LayerType::Hca),
        _ => None,
    }
}

fn fit_schedule<T>(mut types: Vec<T>, n: usize, name: &str) -> std::result::Result<Vec<T>, String> {
    if types.len() < n {
        return Err(format!("{name} has {} entries but num_hidden_layers is {n}", types.len()));
    }
    types.truncate(n);
    Ok(types)
}

fn as_token_id(n: &serde_json::Number) -> std::result::Result<u32, String> {
    n.as_u64().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| format!("{n} is not a token id"))
}

#[cfg(test)]
mod tests;
