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
use crate::indexer;
use crate::kernels::{self, KeyBlocks, Span, rms_norm};
use crate::profile::{self, Part};
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

    // Every projection of the block input runs as one parallel group, then
    // both of the query residual: decode's matrices are small, and each
    // group pays for one start and one join.
    let layer_type = cfg.layer_types[layer];
    let compressor = w.compressor.as_ref().filter(|_| state.compressor.is_some());
    let indexer = w.indexer.as_ref().filter(|_| state.indexer.is_some());
    let mut of_x = vec![w.wq_a.of(x, rows), w.wkv.of(x, rows)];
    of_x.extend(compressor.into_iter().flat_map(|cw| cw.projections(x, rows)));
    if let Some(iw) = indexer {
        of_x.extend(iw.compressor.projections(x, rows));
        of_x.push(iw.weights_proj.of(x, rows));
    }
    let mut of_x = kernels::linear_group(&of_x).into_iter();
    let mut next = || of_x.next().expect("one output per projection");
    let (mut q_residual, mut kv) = (next(), next());
    let compressor = compressor.map(|cw| (cw, next(), next()));
    let indexer = indexer.map(|iw| (iw, next(), next(), next()));

    rms_norm(&mut q_residual, cfg.q_lora_rank, Some(w.q_norm.data()), eps);
    let mut of_q = vec![w.wq_b.of(&q_residual, rows)];
    of_q.extend(indexer.as_ref().map(|(iw, ..)| iw.wq_b.of(&q_residual, rows)));
    let mut of_q = kernels::linear_group(&of_q).into_iter();
    let mut q = of_q.next().expect("the query projection");
    let index_q = of_q.next();
    rms_norm(&mut q, hd, None, eps);
    rms_norm(&mut kv, hd, Some(w.kv_norm.data()), eps);
    for r in 0..rows {
        rope.apply(&mut q[r * heads * hd..(r + 1) * heads * hd], hd, first_position + r, false);
        rope.apply(&mut kv[r * hd..(r + 1) * hd], hd, first_position + r, false);
    }

    // Compressed entries first (windows closed by this chunk's own tokens
    // are masked per query by the causality rule). The entries every query
    // scores (the indexer's, HCA's) stay laid out for scoring in the state.
    let mut selected: Option<Vec<Vec<usize>>> = None;
    if let (Some((cw, ckv, cgate)), Some(cs)) = (compressor, state.compressor.as_mut()) {
        compressor::compress(cw, cs, &ckv, &cgate, &cfg.rope_compress, eps);
        if layer_type == LayerType::Hca {
            cs.lay_out();
        }
    }
    if let (Some((iw, ikv, igate, head_weights)), Some(is), Some(iq)) = (indexer, state.indexer.as_mut(), index_q) {
        compressor::compress(&iw.compressor, is, &ikv, &igate, &cfg.rope_compress, eps);
        is.lay_out();
        selected = Some(indexer::select(cfg, is, iq, &head_weights, first_position, &cfg.rope_compress));
    }
    let compressed: &[f32] = state.compressor.as_ref().map_or(&[], |c| &c.entries);

    // Keys: the cached window (oldest first) followed by this chunk's tokens.
    let cached = state.window.len() / hd;
    let keys = [&state.window[..], &kv[..]].concat();
    // Consecutive tokens' windows overlap: all keys laid out once.
    let key_blocks = KeyBlocks::from_rows(&keys, hd);
    let hca = state.compressor.as_ref().filter(|_| layer_type == LayerType::Hca).map(|c| c.laid_out());
    let sight = Sight {
        keys: &keys,
        key_blocks: &key_blocks,
        cached,
        window: cfg.sliding_window,
        compressed,
        selected: selected.as_deref(),
        hca: hca.map(|entries| (entries, cfg.hca_rate)),
        hd,
    };
    let sinks = w.sinks.data();
    let scale = (hd as f32).powf(-0.5);
    // Fewer tokens than threads (decode): each token's heads split over
    // the threads instead of one thread taking them all.
    let threads = rayon::current_num_threads();
    let group = if rows < threads { heads.div_ceil(threads.div_ceil(rows)) } else { heads }.min(HEAD_GROUP);
    let groups = heads.div_ceil(group);
    let mut out = vec![0.0; rows * heads * hd];
    let task = |(i, o): (usize, &mut [f32])| {
        let (r, h0) = (i / groups, i % groups * group);
        let qs = &q[(r * heads + h0) * hd..(r * heads + h0) * hd + o.len()];
        sight.attend(qs, scale, r, first_position + r, &sinks[h0..h0 + o.len() / hd], o);
        for oh in o.chunks_exact_mut(hd) {
            rope.apply(oh, hd, first_position + r, true);
        }
    };
    // A task per token and group of its heads (which share its keys).
    let parts: Vec<&mut [f32]> = out.chunks_mut(heads * hd).flat_map(|row| row.chunks_mut(group * hd)).collect();
    if parts.len() > 1 {
        parts.into_par_iter().enumerate().for_each(task);
    } else {
        parts.into_iter().enumerate().for_each(task);
    }

    // Keep the last `window - 1` keys: the next token completes its window.
    let keep = (cached + rows).min(cfg.sliding_window.saturating_sub(1));
    state.window = keys[(cached + rows - keep) * hd..].to_vec();

    output_projection(w, cfg, &out, rows)
}

/// Heads scored together against a token's keys.
const HEAD_GROUP: usize = 16;

/// What the queries of one chunk may see.
struct Sight<'a> {
    /// The cached window's keys (`cached` of them, oldest first), then the
    /// chunk's own, `[_, hd]`; and the same laid out for scoring.
    keys: &'a [f32],
    key_blocks: &'a KeyBlocks,
    cached: usize,
    window: usize,
    /// Compressed entries `[_, hd]`.
    compressed: &'a [f32],
    /// CSA: each query's chosen entries.
    selected: Option<&'a [Vec<usize>]>,
    /// HCA: the entries laid out for scoring, and the compression rate.
    hca: Option<(&'a KeyBlocks, usize)>,
    hd: usize,
}

impl Sight<'_> {
    /// Attention of the query heads `qs: [g, hd]` of the chunk's token `r`
    /// (at `position`) into `o: [g, hd]`: its window keys, then its chosen
    /// or visible entries, and each head's sink in the denominator.
    fn attend(&self, qs: &[f32], scale: f32, r: usize, position: usize, sinks: &[f32], o: &mut [f32]) {
        let _span = profile::span(Part::Attention);
        let hd = self.hd;
        let g = sinks.len();
        // Window keys: positions max(0, position - window + 1) ..= position;
        // then CSA's chosen entries; then HCA's visible ones. Keys are also
        // the values.
        let last = self.cached + r;
        let first = (last + 1).saturating_sub(self.window);
        let windowed = last + 1 - first;
        let chosen_ids = self.selected.map_or(&[][..], |s| &s[r][..]);
        let mut chosen = Vec::with_capacity(chosen_ids.len() * hd);
        for &e in chosen_ids {
            chosen.extend_from_slice(&self.compressed[e * hd..(e + 1) * hd]);
        }
        let visible = self.hca.map_or(0, |(entries, rate)| visible_entries(position, rate, entries.len()));
        let n = windowed + chosen_ids.len() + visible;
        // Scores and weighted values: a multiply and an add each.
        profile::flops(Part::Attention, 4 * g * n * hd);

        let mut logits = vec![0.0; g * n];
        // The window's scores start at its block's first key: the keys
        // before `first` in that block are scored and dropped.
        let start = first / KeyBlocks::BLOCK * KeyBlocks::BLOCK;
        let lead = first - start;
        if lead == 0 {
            kernels::scores(qs, self.key_blocks, Span { first, n: windowed, stride: n }, &mut logits);
        } else {
            let m = lead + windowed;
            let mut block = vec![0.0; g * m];
            kernels::scores(qs, self.key_blocks, Span { first: start, n: m, stride: m }, &mut block);
            for (l, b) in logits.chunks_exact_mut(n).zip(block.chunks_exact(m)) {
                l[..windowed].copy_from_slice(&b[lead..]);
            }
        }
        if !chosen_ids.is_empty() {
            let span = Span { first: 0, n: chosen_ids.len(), stride: n };
            kernels::scores(qs, &KeyBlocks::from_rows(&chosen, hd), span, &mut logits[windowed..]);
        }
        if let Some((entries, _)) = self.hca.filter(|_| visible > 0) {
            let span = Span { first: 0, n: visible, stride: n };
            kernels::scores(qs, entries, span, &mut logits[windowed + chosen_ids.len()..]);
        }
        for (l, &sink) in logits.chunks_exact_mut(n).zip(sinks) {
            kernels::softmax_with_sink(l, scale, sink);
        }
        kernels::mix(o, &logits, n, &self.keys[first * hd..(last + 1) * hd]);
        kernels::mix(o, &logits[windowed..], n, &chosen);
        kernels::mix(o, &logits[windowed + chosen_ids.len()..], n, &self.compressed[..visible * hd]);
    }
}

/// Grouped low-rank output: heads split into `o_groups` groups, each projected
/// to `o_lora_rank` by its own block of `wo_a`, then mixed by `wo_b`.
fn output_projection(w: &AttentionWeights, cfg: &ModelConfig, attn: &[f32], rows: usize) -> Vec<f32> {
    let groups = cfg.o_groups;
    let rank = cfg.o_lora_rank;
    let group_in = cfg.num_attention_heads * cfg.head_dim / groups;
    let inputs: Vec<Vec<f32>> = (0..groups)
        .map(|g| {
            (0..rows).flat_map(|r| attn[r * groups * group_in + g * group_in..][..group_in].iter().copied()).collect()
        })
        .collect();
    let projections: Vec<_> =
        inputs.iter().enumerate().map(|(g, xg)| w.wo_a.rows_of(xg, rows, g * rank, rank)).collect();
    let outputs = kernels::linear_group(&projections);
    let mut mixed = vec![0.0; rows * groups * rank];
    for (g, yg) in outputs.iter().enumerate() {
        for r in 0..rows {
            mixed[r * groups * rank + g * rank..][..rank].copy_from_slice(&yg[r * rank..(r + 1) * rank]);
        }
    }
    w.wo_b.forward(&mixed, rows)
}
