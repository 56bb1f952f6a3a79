//! DeepSeek-V4 attention for a chunk of new tokens of one sequence.
//!
//! Shared-KV multi-query attention: one KV head that is both key and value,
//! low-rank query with an unweighted per-head RMSNorm, partial interleaved
//! RoPE, a learned per-head sink logit in the softmax denominator, inverse RoPE
//! on the output's rope slice and a grouped low-rank output projection. Every
//! query sees the last `sliding_window` tokens (itself included); CSA layers
//! add the indexer's top-k compressed entries, HCA layers all visible ones.

use rayon::prelude::*;

use crate::compressor::{self, visible_entries};
use crate::config::{LayerType, ModelConfig};
use crate::kernels::{self, rms_norm};
use crate::state::LayerState;
use crate::weights::AttentionWeights;

/// Attention over `rows` new tokens at positions `first_position..`, given
/// their normed block input `x: [rows, hidden]`; updates the layer's state.
pub fn forward(
    w: &AttentionWeights,
    cfg: &ModelConfig,
    layer: usize,
    x: &[f32],
    rows: usize,
    first_position: usize,
    state: &mut LayerState,
) -> Vec<f32> {
    let heads = cfg.num_attention_heads;
    let hd = cfg.head_dim;
    let rope = cfg.attention_rope(layer);
    let eps = cfg.rms_norm_eps;

    let mut q_residual = w.wq_a.forward(x, rows);
    rms_norm(&mut q_residual, cfg.q_lora_rank, Some(w.q_norm.data()), eps);
    let mut q = w.wq_b.forward(&q_residual, rows);
    rms_norm(&mut q, hd, None, eps);
    let mut kv = w.wkv.forward(x, rows);
    rms_norm(&mut kv, hd, Some(w.kv_norm.data()), eps);
    for r in 0..rows {
        rope.apply(&mut q[r * heads * hd..(r + 1) * heads * hd], hd, first_position + r, false);
        rope.apply(&mut kv[r * hd..(r + 1) * hd], hd, first_position + r, false);
    }

    // Compressed entries first: windows closed by this chunk's own tokens are
    // masked per query by the causality rule.
    let mut selected: Option<Vec<Vec<usize>>> = None;
    if let (Some(cw), Some(cs)) = (&w.compressor, state.compressor.as_mut()) {
        compressor::compress(cw, cs, x, rows, &cfg.rope_compress, eps);
    }
    if let (Some(iw), Some(is)) = (&w.indexer, state.indexer.as_mut()) {
        compressor::compress(&iw.compressor, is, x, rows, &cfg.rope_compress, eps);
        selected = Some(compressor::select(iw, cfg, is, x, &q_residual, rows, first_position, &cfg.rope_compress));
    }
    let compressed: &[f32] = state.compressor.as_ref().map_or(&[], |c| &c.entries);

    // Keys: the cached window (oldest first) followed by this chunk's tokens.
    let cached = state.window.len() / hd;
    let keys: Vec<f32> = state.window.iter().chain(&kv).copied().collect();
    let scale = (hd as f32).powf(-0.5);
    let sinks = w.sinks.data();
    let window = cfg.sliding_window;
    let layer_type = cfg.layer_types[layer];

    let mut out = vec![0.0; rows * heads * hd];
    let task = |(i, o): (usize, &mut [f32])| {
        let (r, h) = (i / heads, i % heads);
        let position = first_position + r;
        let qh = &q[(r * heads + h) * hd..(r * heads + h + 1) * hd];
        // Window keys: positions max(0, position - window + 1) ..= position.
        let last = cached + r;
        let first = (last + 1).saturating_sub(window);
        let mut ids: Vec<&[f32]> = (first..=last).map(|k| &keys[k * hd..(k + 1) * hd]).collect();
        let entry = |e: usize| &compressed[e * hd..(e + 1) * hd];
        match layer_type {
            LayerType::Csa => ids.extend(selected.as_ref().map_or(&[][..], |s| &s[r][..]).iter().map(|&e| entry(e))),
            LayerType::Hca => {
                ids.extend((0..visible_entries(position, cfg.hca_rate, compressed.len() / hd)).map(entry))
            }
            LayerType::Sliding => {}
        }
        let mut logits = vec![0.0; ids.len()];
        kernels::dots(qh, &ids, &mut logits);
        logits.iter_mut().for_each(|l| *l *= scale);
        let max = logits.iter().copied().fold(sinks[h], f32::max);
        let mut denom = 0.0;
        for l in logits.iter_mut() {
            *l = (*l - max).exp();
            denom += *l;
        }
        denom += (sinks[h] - max).exp();
        for (p, v) in logits.iter().zip(&ids) {
            let p = p / denom;
            for (o, v) in o.iter_mut().zip(v.iter()) {
                *o += p * v;
            }
        }
        rope.apply(o, hd, position, true);
    };
    if rows * heads > 1 {
        out.par_chunks_mut(hd).enumerate().for_each(task);
    } else {
        out.chunks_mut(hd).enumerate().for_each(task);
    }

    // Keep the last `window - 1` keys: the next token completes its window.
    let keep = (cached + rows).min(window.saturating_sub(1));
    state.window = keys[(cached + rows - keep) * hd..].to_vec();

    output_projection(w, cfg, &out, rows)
}

/// Grouped low-rank output: heads split into `o_groups` groups, each projected
/// to `o_lora_rank` by its own block of `wo_a`, then mixed by `wo_b`.
fn output_projection(w: &AttentionWeights, cfg: &ModelConfig, attn: &[f32], rows: usize) -> Vec<f32> {
    let groups = cfg.o_groups;
    let rank = cfg.o_lora_rank;
    let group_in = cfg.num_attention_heads * cfg.head_dim / groups;
    let mut mixed = vec![0.0; rows * groups * rank];
    for g in 0..groups {
        let xg: Vec<f32> = (0..rows)
            .flat_map(|r| {
                attn[r * groups * group_in + g * group_in..r * groups * group_in + (g + 1) * group_in].iter().copied()
            })
            .collect();
        let yg = w.wo_a.forward_rows(&xg, rows, g * rank, rank);
        for r in 0..rows {
            mixed[r * groups * rank + g * rank..r * groups * rank + (g + 1) * rank]
                .copy_from_slice(&yg[r * rank..(r + 1) * rank]);
        }
    }
    w.wo_b.forward(&mixed, rows)
}
