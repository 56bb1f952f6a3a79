//! The lightning indexer: which compressed entries each query of a CSA
//! layer attends to.
//!
//! A query's score for entry `s` is `Σ_h w_h · ReLU(q_h · k_s) / √d` over
//! the indexer's heads, which share the entry's one key; the top `index_topk`
//! visible entries are kept. Scores come from [`kernels::scores`] (all heads
//! of a query against sixteen entries at a time, each dot product with the
//! canonical bits) in chunks of entries, and the best are kept by a bounded
//! selection, so the work per query is linear in the entries it sees and
//! nothing grows with the square of the sequence.

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::compressor::visible_entries;
use crate::config::ModelConfig;
use crate::kernels::{self, KeyBlocks, Span};
use crate::profile::{self, Part};
use crate::rope::RopeParams;
use crate::state::CompressorState;

/// Entries scored per task: all heads' scores of a chunk stay in L1/L2.
const CHUNK: usize = 512;

/// The indexer's choice for each query, given their indexer
/// queries `q` (`wq_b` of the query residual) and head weights
/// (`weights_proj` of the block input): the indices of the (at most
/// `index_topk`) visible entries with the highest scores, ascending.
/// `state`'s entries must be laid out ([`CompressorState::lay_out`]).
///
/// Tie rule: a higher score wins; equal scores go to the lower entry index.
/// Only set membership matters downstream, so this fixes the result whenever
/// the reference's own choice is well defined.
pub fn select(
    cfg: &ModelConfig,
    state: &CompressorState,
    mut q: Vec<f32>,
    head_weights: &[f32],
    first_position: usize,
    rope: &RopeParams,
) -> Vec<Vec<usize>> {
    let heads = cfg.index_n_heads;
    let dim = cfg.index_head_dim;
    let rows = q.len() / (heads * dim);
    let weights_scale = (heads as f32).powf(-0.5);
    let entries = state.entry_count();
    let topk = cfg.index_topk.min(entries);
    let keys = state.laid_out();
    debug_assert_eq!(keys.len(), entries, "the caller lays the entries out");
    let scorer = Scorer { keys, heads, softmax_scale: (dim as f32).powf(-0.5) };
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
            let chunks = visible.div_ceil(CHUNK);
            let range = |c: usize| c * CHUNK..visible.min((c + 1) * CHUNK);
            let best = if rows >= rayon::current_num_threads() {
                // Enough queries to keep every thread busy: one query's
                // chunks in order, each raising the bar for the next.
                let mut best = Best::new(topk);
                (0..chunks).for_each(|c| scorer.chunk(qr, &hw, range(c), &mut best));
                best
            } else {
                // Few queries (decode): their chunks in parallel.
                (0..chunks)
                    .into_par_iter()
                    .map(|c| {
                        let mut best = Best::new(topk);
                        scorer.chunk(qr, &hw, range(c), &mut best);
                        best
                    })
                    .reduce(|| Best::new(topk), Best::merge)
            };
            best.indices()
        })
        .collect()
}

/// What scoring one query needs besides the query.
struct Scorer<'a> {
    keys: &'a KeyBlocks,
    heads: usize,
    softmax_scale: f32,
}

impl Scorer<'_> {
    /// Offers entries `range` to `best`, scored for the query `qr` (all
    /// heads) with head weights `hw`. Each score sums the heads in order.
    fn chunk(&self, qr: &[f32], hw: &[f32], range: std::ops::Range<usize>, best: &mut Best) {
        let _span = profile::span(Part::IndexerScores);
        let n = range.len();
        profile::flops(Part::IndexerScores, 2 * self.heads * n * self.keys.dim());
        let mut logits = vec![0.0f32; self.heads * n];
        kernels::scores(qr, self.keys, Span { first: range.start, n, stride: n }, &mut logits);
        let mut scores = vec![0.0f32; n];
        kernels::relu_weighted(&logits, self.softmax_scale, hw, &mut scores);
        // Most entries fall below the bar: sixteen plain comparisons at a
        // time first (NaN goes through to the full rule too).
        let _span = profile::span(Part::TopK);
        let bar = best.floor.map_or(f32::NEG_INFINITY, |f| f.0);
        let may_enter = |s: f32| s >= bar || s.is_nan();
        for (group, first) in scores.chunks(16).zip(range.clone().step_by(16)) {
            if group.iter().fold(false, |any, &s| any | may_enter(s)) {
                for (&s, e) in group.iter().zip(first..) {
                    if may_enter(s) {
                        best.offer(s, e);
                    }
                }
            }
        }
    }
}

/// The best `k` (score, entry) pairs offered so far, by the tie rule.
/// Candidates are collected up to `2k` and cut back to `k` by selection, so
/// most offers cost one comparison against the current `k`-th best.
struct Best {
    k: usize,
    kept: Vec<(f32, usize)>,
    /// The worst pair still kept after the last cut: anything not better
    /// can never enter.
    floor: Option<(f32, usize)>,
}

/// `Less` when `a` ranks before `b`: a higher score, then a lower entry.
fn rank(a: &(f32, usize), b: &(f32, usize)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl Best {
    fn new(k: usize) -> Self {
        Best { k, kept: Vec::with_capacity(2 * k), floor: None }
    }

    fn offer(&mut self, score: f32, entry: usize) {
        if self.floor.is_some_and(|f| rank(&(score, entry), &f) != Ordering::Less) {
            return;
        }
        self.kept.push((score, entry));
        if self.kept.len() >= 2 * self.k {
            self.cut();
        }
    }

    fn cut(&mut self) {
        if self.k == 0 {
            self.kept.clear();
            return;
        }
        if self.kept.len() > self.k {
            self.kept.select_nth_unstable_by(self.k - 1, rank);
            self.kept.truncate(self.k);
            self.floor = Some(self.kept[self.k - 1]);
        }
    }

    fn merge(mut self, other: Best) -> Best {
        let _span = profile::span(Part::TopK);
        for (s, e) in other.kept {
            self.offer(s, e);
        }
        self
    }

    /// The kept entries, ascending.
    fn indices(mut self) -> Vec<usize> {
        let _span = profile::span(Part::TopK);
        self.cut();
        let mut chosen: Vec<usize> = self.kept.iter().map(|&(_, e)| e).collect();
        chosen.sort_unstable();
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounded selection keeps what a full sort by the tie rule keeps,
    /// whatever the chunking, with many equal scores.
    #[test]
    fn best_matches_a_full_sort() {
        let mut s = 12345u32;
        for (n, k) in [(1000usize, 6), (50, 49), (300, 1), (64, 64), (2000, 100)] {
            let scores: Vec<f32> = (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    (s % 40) as f32 - 10.0
                })
                .collect();
            let mut sorted: Vec<(f32, usize)> = scores.iter().copied().zip(0..).collect();
            sorted.sort_by(rank);
            let mut want: Vec<usize> = sorted[..k].iter().map(|p| p.1).collect();
            want.sort_unstable();
            for chunk in [7, 64, n] {
                let best = (0..n.div_ceil(chunk))
                    .map(|c| {
                        let mut b = Best::new(k);
                        (c * chunk..n.min((c + 1) * chunk)).for_each(|e| b.offer(scores[e], e));
                        b
                    })
                    .fold(Best::new(k), Best::merge);
                assert_eq!(best.indices(), want, "n {n}, k {k}, chunk {chunk}");
            }
        }
    }
}
