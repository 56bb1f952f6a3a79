//! Compressors (CSA, HCA and the indexer's own).
//!
//! A compressor turns every `rate` tokens into one entry: per channel, a
//! softmax over the window's gate logits (plus a learned position bias) weighs
//! the tokens' kv projections; the sum is RMS-normed and rotated to the
//! window's first position with the `compress` RoPE. CSA uses two series per
//! token: entry `w` mixes window `w-1`'s Ca half with window `w`'s Cb half
//! (width `2·rate`, stride `rate`); before the first window closes the Ca slots
//! have weight zero. A query at position `t` may see entry `w` only if
//! `w < (t + 1) / rate`.

use crate::kernels::{self, rms_norm};
use crate::profile::{self, Part};
use crate::rope::RopeParams;
use crate::state::CompressorState;
use crate::weights::CompressorWeights;

/// Takes `rows` new tokens' kv and gate projections
/// ([`CompressorWeights::projections`]), closes every window that is now
/// full and appends its entry to `state.entries`.
pub fn compress(
    w: &CompressorWeights,
    state: &mut CompressorState,
    kv: &[f32],
    gate: &[f32],
    rope: &RopeParams,
    eps: f32,
) {
    let _span = profile::span(Part::Compressor);
    let width = state.width;
    state.pending_kv.extend_from_slice(kv);
    state.pending_gate.extend_from_slice(gate);
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
