//! Manifold-constrained hyper-connections (mHC): the residual is `hc_mult`
//! parallel streams per token. Before a block, a projection of the normed
//! streams gives `pre` (collapse weights), `post` (expand weights) and `comb`
//! (stream mixing, projected onto doubly-stochastic matrices by Sinkhorn-Knopp).
//! After it, `streams'_i = post_i · out + Σ_j comb[j][i] · streams_j`.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::kernels::{rms_norm, sigmoid, softmax};
use crate::profile::{self, Part};
use crate::weights::HcWeights;

/// What [`pre`] computes for each token.
pub struct Mix {
    /// `[rows, hidden]` block input: the `pre`-weighted sum of the streams.
    pub collapsed: Vec<f32>,
    /// `[rows, hc]`
    pub post: Vec<f32>,
    /// `[rows, hc, hc]`, doubly stochastic per token.
    pub comb: Vec<f32>,
}

/// Tokens per parallel task: each token's work is small and independent.
const ROWS_PER_TASK: usize = 64;

/// The mixing weights `[rows, n]` of the normed, flattened streams.
fn mixes(w: &HcWeights, cfg: &ModelConfig, streams: &[f32], rows: usize) -> Vec<f32> {
    let width = cfg.hc_mult * cfg.hidden_size;
    let mut flat = streams.to_vec();
    flat.par_chunks_mut(ROWS_PER_TASK * width).for_each(|block| {
        let _span = profile::span(Part::Mhc);
        rms_norm(block, width, None, cfg.rms_norm_eps)
    });
    w.fn_.forward(&flat, rows)
}

/// Weighted sum of one token's streams `[hc, hidden]` with weights `pre`.
fn collapse(pre: &[f32], streams: &[f32], hidden: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (i, p) in pre.iter().enumerate() {
        for (o, s) in out.iter_mut().zip(&streams[i * hidden..(i + 1) * hidden]) {
            *o += p * s;
        }
    }
}

pub fn pre(w: &HcWeights, cfg: &ModelConfig, streams: &[f32], rows: usize) -> Mix {
    let hc = cfg.hc_mult;
    let hidden = cfg.hidden_size;
    let n = (2 + hc) * hc;
    let mix = mixes(w, cfg, streams, rows);
    let mut collapsed = vec![0.0; rows * hidden];
    let mut post = vec![0.0; rows * hc];
    let mut comb = vec![0.0; rows * hc * hc];
    let b = ROWS_PER_TASK;
    (collapsed.par_chunks_mut(b * hidden).zip(post.par_chunks_mut(b * hc)).zip(comb.par_chunks_mut(b * hc * hc)))
        .enumerate()
        .for_each(|(t, ((collapsed, post), comb))| {
            let _span = profile::span(Part::Mhc);
            for (i, ((collapsed, post), comb)) in collapsed
                .chunks_exact_mut(hidden)
                .zip(post.chunks_exact_mut(hc))
                .zip(comb.chunks_exact_mut(hc * hc))
                .enumerate()
            {
                let r = t * b + i;
                let s = &streams[r * hc * hidden..(r + 1) * hc * hidden];
                pre_row(w, cfg, &mix[r * n..(r + 1) * n], s, collapsed, post, comb);
            }
        });
    Mix { collapsed, post, comb }
}

/// [`pre`] for one token: its mixing weights `m` and streams `s`.
fn pre_row(
    w: &HcWeights,
    cfg: &ModelConfig,
    m: &[f32],
    s: &[f32],
    collapsed: &mut [f32],
    post: &mut [f32],
    c: &mut [f32],
) {
    let (hc, eps) = (cfg.hc_mult, cfg.hc_eps);
    let (base, scale) = (w.base.data(), w.scale.data());
    let pre: Vec<f32> = (0..hc).map(|i| sigmoid(m[i] * scale[0] + base[i]) + eps).collect();
    for (i, p) in post.iter_mut().enumerate() {
        *p = 2.0 * sigmoid(m[hc + i] * scale[1] + base[hc + i]);
    }
    for i in 0..hc {
        let row = &mut c[i * hc..(i + 1) * hc];
        for (j, v) in row.iter_mut().enumerate() {
            *v = m[2 * hc + i * hc + j] * scale[2] + base[2 * hc + i * hc + j];
        }
        softmax(row);
        row.iter_mut().for_each(|v| *v += eps);
    }
    normalize_columns(c, hc, eps);
    for _ in 1..cfg.hc_sinkhorn_iters {
        for row in c.chunks_exact_mut(hc) {
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum + eps);
        }
        normalize_columns(c, hc, eps);
    }
    collapse(&pre, s, cfg.hidden_size, collapsed);
}

fn normalize_columns(c: &mut [f32], hc: usize, eps: f32) {
    for j in 0..hc {
        let sum: f32 = (0..hc).map(|i| c[i * hc + j]).sum();
        (0..hc).for_each(|i| c[i * hc + j] /= sum + eps);
    }
}

/// `streams'_i = post_i · out + Σ_j comb[j][i] · streams_j`, in place.
pub fn post(mix: &Mix, cfg: &ModelConfig, streams: &mut [f32], out: &[f32], rows: usize) {
    let hc = cfg.hc_mult;
    let hidden = cfg.hidden_size;
    debug_assert_eq!(streams.len(), rows * hc * hidden);
    streams.par_chunks_mut(ROWS_PER_TASK * hc * hidden).enumerate().for_each(|(t, block)| {
        let _span = profile::span(Part::Mhc);
        let mut next = vec![0.0; hc * hidden];
        for (i, s) in block.chunks_exact_mut(hc * hidden).enumerate() {
            let r = t * ROWS_PER_TASK + i;
            let o = &out[r * hidden..(r + 1) * hidden];
            let c = &mix.comb[r * hc * hc..(r + 1) * hc * hc];
            // Per element: `acc = Σ_j comb[j][i] · s_j` in increasing j,
            // then `acc + post_i · out` (the same sum either way round),
            // one stream at a time so that it vectorises over the hidden
            // dimension.
            for (i, dst) in next.chunks_exact_mut(hidden).enumerate() {
                dst.fill(0.0);
                for (j, sj) in s.chunks_exact(hidden).enumerate() {
                    let cji = c[j * hc + i];
                    dst.iter_mut().zip(sj).for_each(|(acc, v)| *acc += cji * v);
                }
                let p = mix.post[r * hc + i];
                dst.iter_mut().zip(o).for_each(|(acc, v)| *acc += p * v);
            }
            s.copy_from_slice(&next);
        }
    });
}

/// The final collapse of the streams before the last norm (`hc_head`).
pub fn head(w: &HcWeights, cfg: &ModelConfig, streams: &[f32], rows: usize) -> Vec<f32> {
    let _span = profile::span(Part::Mhc);
    let hc = cfg.hc_mult;
    let hidden = cfg.hidden_size;
    let mix = mixes(w, cfg, streams, rows);
    let (base, scale) = (w.base.data(), w.scale.data()[0]);
    let mut out = vec![0.0; rows * hidden];
    for r in 0..rows {
        let pre: Vec<f32> = (0..hc).map(|i| sigmoid(mix[r * hc + i] * scale + base[i]) + cfg.hc_eps).collect();
        collapse(
            &pre,
            &streams[r * hc * hidden..(r + 1) * hc * hidden],
            hidden,
            &mut out[r * hidden..(r + 1) * hidden],
        );
    }
    out
}
