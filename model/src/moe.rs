//! The MoE block: gating (hash or top-k), routed SwiGLU experts, shared expert.
//!
//! Routing is separate from expert execution so that a router can compute the
//! choices locally and send the expert work elsewhere. The combine order is
//! fixed: each token's expert contributions are added in increasing expert id,
//! starting from zero, then the shared expert's output is added. Every path
//! (single process, any placement of experts on workers) must use this order.

use crate::config::{MlpType, ModelConfig, ScoringFunc};
use crate::kernels::{sigmoid, silu, softmax, softplus};
use crate::weights::{ExpertWeights, MoeWeights};

/// One token's routing: `(expert id, weight)` pairs, `num_experts_per_tok` of them.
pub type Route = Vec<(usize, f32)>;

/// The experts and weights each of `rows` tokens is sent to.
pub fn route(w: &MoeWeights, cfg: &ModelConfig, layer: usize, x: &[f32], tokens: &[u32], rows: usize) -> Vec<Route> {
    let e = cfg.n_routed_experts;
    let k = cfg.num_experts_per_tok;
    let mut scores = w.gate.forward(x, rows);
    for row in scores.chunks_exact_mut(e) {
        match cfg.scoring_func {
            ScoringFunc::SqrtSoftplus => row.iter_mut().for_each(|v| *v = softplus(*v).sqrt()),
            ScoringFunc::Sigmoid => row.iter_mut().for_each(|v| *v = sigmoid(*v)),
            ScoringFunc::Softmax => softmax(row),
        }
    }
    (0..rows)
        .map(|r| {
            let s = &scores[r * e..(r + 1) * e];
            let chosen: Vec<usize> = match cfg.mlp_layer_types[layer] {
                MlpType::Hash => {
                    let table = w.tid2eid.as_deref().unwrap_or(&[]);
                    let t = tokens[r] as usize;
                    table[t * k..(t + 1) * k].iter().map(|&x| x as usize).collect()
                }
                MlpType::TopK => {
                    let bias = w.bias.as_ref().map(|b| b.data());
                    top_k(s, bias, k)
                }
            };
            let total: f32 = chosen.iter().map(|&x| s[x]).sum();
            chosen.into_iter().map(|x| (x, s[x] / (total + 1e-20) * cfg.routed_scaling_factor)).collect()
        })
        .collect()
}

/// The `k` experts with the highest `score + bias`; ties go to the lower id.
pub fn top_k(scores: &[f32], bias: Option<&[f32]>, k: usize) -> Vec<usize> {
    let mut ranked: Vec<(f32, usize)> =
        scores.iter().enumerate().map(|(i, &s)| (s + bias.map_or(0.0, |b| b[i]), i)).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().take(k).map(|(_, i)| i).collect()
}

/// Clamped SwiGLU expert over `rows` tokens: `w2 · (silu(min(w1·x, L)) ⊙ clamp(w3·x, ±L))`.
pub fn expert_ffn(w: &ExpertWeights, x: &[f32], rows: usize, limit: f32) -> Vec<f32> {
    let gate = w.w1.forward(x, rows);
    let up = w.w3.forward(x, rows);
    let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(g.min(limit)) * u.clamp(-limit, limit)).collect();
    w.w2.forward(&act, rows)
}

/// Runs every routed expert on its tokens and combines the weighted outputs
/// per token in increasing expert id. `expert(e)` returns expert `e`'s weights.
pub fn routed<'a>(
    expert: impl Fn(usize) -> &'a ExpertWeights,
    cfg: &ModelConfig,
    x: &[f32],
    routes: &[Route],
    rows: usize,
) -> Vec<f32> {
    let hidden = cfg.hidden_size;
    let mut out = vec![0.0; rows * hidden];
    for (e, members) in tokens_by_expert(routes, cfg.n_routed_experts).into_iter().enumerate() {
        if members.is_empty() {
            continue;
        }
        let gathered: Vec<f32> =
            members.iter().flat_map(|&(r, _)| x[r * hidden..(r + 1) * hidden].iter().copied()).collect();
        let y = expert_ffn(expert(e), &gathered, members.len(), cfg.swiglu_limit);
        for (i, &(r, weight)) in members.iter().enumerate() {
            for (o, v) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(&y[i * hidden..(i + 1) * hidden]) {
                *o += v * weight;
            }
        }
    }
    out
}

/// For each expert id, its `(token row, weight)` pairs in row order.
pub fn tokens_by_expert(routes: &[Route], n_experts: usize) -> Vec<Vec<(usize, f32)>> {
    let mut by_expert = vec![Vec::new(); n_experts];
    for (r, route) in routes.iter().enumerate() {
        for &(e, weight) in route {
            by_expert[e].push((r, weight));
        }
    }
    by_expert
}

/// The whole block in one process: routed experts plus the shared expert.
pub fn forward(w: &MoeWeights, cfg: &ModelConfig, layer: usize, x: &[f32], tokens: &[u32], rows: usize) -> Vec<f32> {
    let routes = route(w, cfg, layer, x, tokens, rows);
    let mut out = routed(|e| &w.experts[e], cfg, x, &routes, rows);
    let shared = expert_ffn(&w.shared, x, rows, cfg.swiglu_limit);
    out.iter_mut().zip(&shared).for_each(|(o, s)| *o += s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_prefers_score_then_lower_id() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], None, 2), vec![1, 3]);
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], Some(&[0.0, 0.0, 0.5, 0.0]), 2), vec![2, 1]);
        assert_eq!(top_k(&[0.3; 5], None, 3), vec![0, 1, 2]);
    }

    #[test]
    fn softmax_scores_sum_to_one_and_rank_like_logits() {
        let mut s = vec![1.0, 3.0, 2.0, -1.0];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(top_k(&s, None, 2), vec![1, 2]);
    }

    #[test]
    fn swiglu_clamps_gate_above_and_up_both_ways() {
        let lin =
            |v: f32| crate::weights::Linear { w: crate::tensor::Tensor::owned(vec![v], vec![1, 1]), out: 1, inp: 1 };
        let w = ExpertWeights { w1: lin(100.0), w2: lin(1.0), w3: lin(-100.0) };
        // gate = min(100, 2) = 2, up = clamp(-100, ±2) = -2.
        let y = expert_ffn(&w, &[1.0], 1, 2.0);
        assert!((y[0] - silu(2.0) * -2.0).abs() < 1e-6);
        // Negative gate logits are not clamped from below.
        let w = ExpertWeights { w1: lin(-100.0), w2: lin(1.0), w3: lin(1.0) };
        assert!((expert_ffn(&w, &[1.0], 1, 2.0)[0] - silu(-100.0)).abs() < 1e-6);
    }
}
