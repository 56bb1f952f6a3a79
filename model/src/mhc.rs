//! Manifold-constrained hyper-connections (mHC): the residual is `hc_mult`
//! parallel streams per token. Before a block, a projection of the normed
//! streams gives `pre` (collapse weights), `post` (expand weights) and `comb`
//! (stream mixing, projected onto doubly-stochastic matrices by Sinkhorn-Knopp).
//! After it, `streams'_i = post_i · out + Σ_j comb[j][i] · streams_j`.

use crate::config::ModelConfig;
use crate::kernels::{rms_norm, sigmoid, softmax};
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

/// The mixing weights `[rows, n]` of the normed, flattened streams.
fn mixes(w: &HcWeights, cfg: &ModelConfig, streams: &[f32], rows: usize) -> Vec<f32> {
    let mut flat = streams.to_vec();
    rms_norm(&mut flat, cfg.hc_mult * cfg.hidden_size, None, cfg.rms_norm_eps);
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
    let eps = cfg.hc_eps;
    let n = (2 + hc) * hc;
    let mix = mixes(w, cfg, streams, rows);
    let (base, scale) = (w.base.data(), w.scale.data());
    let mut collapsed = vec![0.0; rows * hidden];
    let mut post = vec![0.0; rows * hc];
    let mut comb = vec![0.0; rows * hc * hc];
    for r in 0..rows {
        let m = &mix[r * n..(r + 1) * n];
        let pre: Vec<f32> = (0..hc).map(|i| sigmoid(m[i] * scale[0] + base[i]) + eps).collect();
        for i in 0..hc {
            post[r * hc + i] = 2.0 * sigmoid(m[hc + i] * scale[1] + base[hc + i]);
        }
        let c = &mut comb[r * hc * hc..(r + 1) * hc * hc];
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
        let s = &streams[r * hc * hidden..(r + 1) * hc * hidden];
        collapse(&pre, s, hidden, &mut collapsed[r * hidden..(r + 1) * hidden]);
    }
    Mix { collapsed, post, comb }
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
    let mut next = vec![0.0; hc * hidden];
    for r in 0..rows {
        let s = &mut streams[r * hc * hidden..(r + 1) * hc * hidden];
        let o = &out[r * hidden..(r + 1) * hidden];
        let c = &mix.comb[r * hc * hc..(r + 1) * hc * hc];
        for i in 0..hc {
            let p = mix.post[r * hc + i];
            let dst = &mut next[i * hidden..(i + 1) * hidden];
            for d in 0..hidden {
                let mut acc = 0.0;
                for j in 0..hc {
                    acc += c[j * hc + i] * s[j * hidden + d];
                }
                dst[d] = p * o[d] + acc;
            }
        }
        s.copy_from_slice(&next);
    }
}

/// The final collapse of the streams before the last norm (`hc_head`).
pub fn head(w: &HcWeights, cfg: &ModelConfig, streams: &[f32], rows: usize) -> Vec<f32> {
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
