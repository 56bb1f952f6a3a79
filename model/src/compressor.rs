//! Compressors (CSA, HCA and the indexer's own) and the lightning indexer.
//!
//! A compressor turns every `rate` tokens into one entry: per channel, a
//! softmax over the window's gate logits (plus a learned position bias) weighs
//! the tokens' kv projections; the sum is RMS-normed and rotated to the
//! window's first position with the `compress` RoPE. CSA uses two series per
//! token: entry `w` mixes window `w-1`'s Ca half with window `w`'s Cb half
//! (width `2·rate`, stride `rate`); before the first window closes the Ca slots
//! have weight zero. A query at position `t` may see entry `w` only if
//! `w < (t + 1) / rate`.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::kernels::{self, rms_norm};
use crate::rope::RopeParams;
use crate::state::CompressorState;
use crate::weights::{CompressorWeights, IndexerWeights};

/// Projects `rows` new tokens (`x: [rows, hidden]`), closes every window that
/// is now full and appends its entry to `state.entries`.
pub fn compress(
    w: &CompressorWeights,
    state: &mut CompressorState,
    x: &[f32],
    rows: usize,
    rope: &RopeParams,
    eps: f32,
) {
    let width = state.width;
    state.pending_kv.extend(w.wkv.forward(x, rows));
    state.pending_gate.extend(w.wgate.forward(x, rows));
    let rate = w.rate;
    let dim = w.dim;
    let ape = w.ape.data();
    let mut consumed = 0;
    while state.pending_count() - consumed >= rate {
        let kv = &state.pending_kv[consumed * width..(consumed + rate) * width];
        let gate: Vec<f32> = state.pending_gate[consumed * width..(consumed + rate) * width]
            .iter()
            .zip(ape)
            .map(|(g, b)| g + b)
            .collect();
        let mut entry = vec![0.0; dim];
        let has_prior = !state.overlap_kv.is_empty();
        let mut slot_kv = Vec::with_capacity(2 * rate);
        let mut slot_gate = Vec::with_capacity(2 * rate);
        for (c, out) in entry.iter_mut().enumerate() {
            slot_kv.clear();
            slot_gate.clear();
            if w.overlap {
                // Slots 0..rate: previous window's Ca; rate..2·rate: this window's Cb.
                if has_prior {
                    slot_kv.extend((0..rate).map(|j| state.overlap_kv[j * dim + c]));
                    slot_gate.extend((0..rate).map(|j| state.overlap_gate[j * dim + c]));
                }
                slot_kv.extend((0..rate).map(|j| kv[j * width + dim + c]));
                slot_gate.extend((0..rate).map(|j| gate[j * width + dim + c]));
            } else {
                slot_kv.extend((0..rate).map(|j| kv[j * width + c]));
                slot_gate.extend((0..rate).map(|j| gate[j * width + c]));
            }
            kernels::softmax(&mut slot_gate);
            *out = slot_kv.iter().zip(&slot_gate).fold(0.0, |acc, (v, p)| acc + v * p);
        }
        if w.overlap {
            state.overlap_kv = (0..rate).flat_map(|j| kv[j * width..j * width + dim].to_vec()).collect();
            state.overlap_gate = (0..rate).flat_map(|j| gate[j * width..j * width + dim].to_vec()).collect();
        }
        rms_norm(&mut entry, dim, Some(w.norm.data()), eps);
        rope.apply(&mut entry, dim, state.entry_count() * rate, false);
        state.entries.extend(entry);
        consumed += rate;
    }
    state.pending_kv.drain(..consumed * width);
    state.pending_gate.drain(..consumed * width);
}

/// Entries a query at `position` may see: `w < (position + 1) / rate`.
pub fn visible_entries(position: usize, rate: usize, entries: usize) -> usize {
    ((position + 1) / rate).min(entries)
}

/// The lightning indexer's choice for each of `rows` queries: the indices of
/// the (at most `index_topk`) visible compressed entries with the highest
/// scores `Σ_h w_h · ReLU(q_h · k_s) / √d`, ascending.
///
/// Tie rule: a higher score wins; equal scores go to the lower entry index.
/// Only set membership matters downstream, so this fixes the result whenever
/// the reference's own choice is well defined.
#[allow(clippy::too_many_arguments)]
pub fn select(
    w: &IndexerWeights,
    cfg: &ModelConfig,
    state: &CompressorState,
    x: &[f32],
    q_residual: &[f32],
    rows: usize,
    first_position: usize,
    rope: &RopeParams,
) -> Vec<Vec<usize>> {
    let heads = cfg.index_n_heads;
    let dim = cfg.index_head_dim;
    let mut q = w.wq_b.forward(q_residual, rows);
    let head_weights = w.weights_proj.forward(x, rows);
    let softmax_scale = (dim as f32).powf(-0.5);
    let weights_scale = (heads as f32).powf(-0.5);
    let entries = state.entry_count();
    let topk = cfg.index_topk.min(entries);
    // Rows are independent: scored in parallel, each score summed over the
    // heads in order, as one row at a time would.
    q.par_chunks_mut(heads * dim)
        .enumerate()
        .map(|(r, qr)| {
            let position = first_position + r;
            rope.apply(qr, dim, position, false);
            let visible = visible_entries(position, cfg.csa_rate, entries);
            if visible <= topk {
                return (0..visible).collect();
            }
            let hw: Vec<f32> = (0..heads).map(|h| head_weights[r * heads + h] * weights_scale).collect();
            let keys: Vec<&[f32]> = state.entries[..visible * dim].chunks_exact(dim).collect();
            let mut scores = vec![0.0f32; visible];
            let mut logits = vec![0.0f32; visible];
            for h in 0..heads {
                kernels::dots(&qr[h * dim..(h + 1) * dim], &keys, &mut logits);
                for (score, logit) in scores.iter_mut().zip(&logits) {
                    *score += logit.max(0.0) * softmax_scale * hw[h];
                }
            }
            let mut scored: Vec<(f32, usize)> = scores.into_iter().zip(0..).collect();
            scored.select_nth_unstable_by(topk - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut chosen: Vec<usize> = scored[..topk].iter().map(|&(_, s)| s).collect();
            chosen.sort_unstable();
            chosen
        })
        .collect()
}
