//! The MoE block: gating (hash or top-k), routed SwiGLU experts, shared expert.
//!
//! Routing is separate from expert execution: a router computes the choices,
//! an [`ExpertExecutor`] runs the routed experts wherever they live (in this
//! process, or on workers over the network) and returns one weighted
//! *contribution* per (token, chosen expert). [`combine`] then adds each
//! token's contributions in increasing expert id, starting from zero, and the
//! shared expert's output last. Every path uses that one order, so the result
//! is the same bits whatever the placement of experts (ADR 0002).

use crate::config::{MlpType, ModelConfig, ScoringFunc};
use crate::error::Result;
use crate::kernels::{Projection, linear_group, sigmoid, silu, softmax, softplus};
use crate::profile::{self, Part};
use crate::weights::{ExpertWeights, MoeWeights};
use rayon::prelude::*;

/// One token's routing: `(expert id, weight)` pairs, `num_experts_per_tok` of them.
pub type Route = Vec<(usize, f32)>;

/// Weighted expert outputs, one `hidden`-wide row per (token, route entry),
/// tokens in order and each token's entries in its route's order.
pub type Contributions = Vec<f32>;

/// Runs the routed experts of one MoE layer.
pub trait ExpertExecutor: Sync {
    type Pending: PendingExperts;

    /// Starts the experts for `rows` tokens `x: [rows, hidden]` routed by
    /// `routes`; the caller computes the shared expert meanwhile.
    fn start(&self, layer: usize, x: &[f32], routes: &[Route]) -> Result<Self::Pending>;
}

/// Expert work in flight.
pub trait PendingExperts {
    fn finish(self) -> Result<Contributions>;
}

/// The experts of this process's own weights.
pub struct LocalExperts<'a> {
    pub config: &'a ModelConfig,
    pub layers: &'a [crate::weights::LayerWeights],
}

/// The experts of a shared model in this process; owns its `Arc`, so it can
/// live on another thread (the batching engine's).
pub struct SharedLocalExperts(pub std::sync::Arc<crate::Model>);

impl ExpertExecutor for SharedLocalExperts {
    type Pending = Ready;

    fn start(&self, layer: usize, x: &[f32], routes: &[Route]) -> Result<Ready> {
        self.0.local_experts().start(layer, x, routes)
    }
}

/// Expert work that is already done.
pub struct Ready(pub Contributions);

impl PendingExperts for Ready {
    fn finish(self) -> Result<Contributions> {
        Ok(self.0)
    }
}

impl ExpertExecutor for LocalExperts<'_> {
    type Pending = Ready;

    fn start(&self, layer: usize, x: &[f32], routes: &[Route]) -> Result<Ready> {
        let experts = &self.layers[layer].moe.experts;
        Ok(Ready(contributions(|e| experts.get(e), self.config, x, routes)?))
    }
}

/// The experts and weights each of `rows` tokens is sent to.
pub fn route(w: &MoeWeights, cfg: &ModelConfig, layer: usize, x: &[f32], tokens: &[u32], rows: usize) -> Vec<Route> {
    let _span = profile::span(Part::Moe);
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
    experts_ffn(&[(w, x, rows)], limit).pop().unwrap_or_default()
}

/// [`expert_ffn`] for several experts, each on its own tokens `(weights,
/// x, rows)`: every gate and up projection runs as one parallel group, then
/// every down projection, so a decode step's small expert matrices keep the
/// threads streaming instead of waiting on each other's joins.
pub fn experts_ffn(work: &[(&ExpertWeights, &[f32], usize)], limit: f32) -> Vec<Vec<f32>> {
    let gate_up: Vec<Projection<'_>> =
        work.iter().flat_map(|&(w, x, rows)| [w.w1.of(x, rows), w.w3.of(x, rows)]).collect();
    let gate_up = linear_group(&gate_up);
    let acts: Vec<Vec<f32>> = gate_up
        .par_chunks_exact(2)
        .map(|pair| {
            let _span = profile::span(Part::Moe);
            pair[0].iter().zip(&pair[1]).map(|(g, u)| silu(g.min(limit)) * u.clamp(-limit, limit)).collect()
        })
        .collect();
    let down: Vec<Projection<'_>> = work.iter().zip(&acts).map(|(&(w, _, rows), act)| w.w2.of(act, rows)).collect();
    linear_group(&down)
}

/// Up to this many (token, expert) pairs, a step's experts run as one
/// group of projections ([`experts_ffn`]).
const GROUPED_ROWS: usize = 64;

/// One token routed to an expert: its row, its contribution's slot, its weight.
type Member = (usize, usize, f32);

/// Computes the weighted contribution of every (token, route entry): each
/// expert runs once on all of its tokens (a batched GEMM), `expert(e)` gives
/// its weights (`None`: not hosted here, an error naming the expert).
/// Experts run in parallel on the compute pool; each one's result is the
/// same bits however they are scheduled.
pub fn contributions<'a>(
    expert: impl Fn(usize) -> Option<&'a ExpertWeights> + Sync,
    cfg: &ModelConfig,
    x: &[f32],
    routes: &[Route],
) -> Result<Contributions> {
    let hidden = cfg.hidden_size;
    let mut offsets = Vec::with_capacity(routes.len());
    let mut slots = 0;
    for route in routes {
        offsets.push(slots);
        slots += route.len();
    }
    let mut by_expert: std::collections::BTreeMap<usize, Vec<Member>> = Default::default();
    for (r, route) in routes.iter().enumerate() {
        for (j, &(e, weight)) in route.iter().enumerate() {
            by_expert.entry(e).or_default().push((r, offsets[r] + j, weight));
        }
    }
    let work: Vec<(usize, Vec<Member>)> = by_expert.into_iter().collect();
    let weights: Vec<&ExpertWeights> = work
        .iter()
        .map(|(e, _)| {
            expert(*e).ok_or_else(|| crate::ModelError::InvalidInput(format!("expert {e} is not hosted here")))
        })
        .collect::<Result<_>>()?;
    let gather = |members: &[Member]| -> Vec<f32> {
        members.iter().flat_map(|&(r, _, _)| x[r * hidden..(r + 1) * hidden].iter().copied()).collect()
    };
    let limit = cfg.swiglu_limit;
    // Few tokens (decode): the experts' matrices are too small to keep the
    // threads streaming one at a time, so they run as one group. Many
    // (prefill): each expert on its own, in parallel, so that its inputs
    // and intermediates stay in cache instead of all experts' at once.
    let results: Vec<Vec<f32>> = if routes.iter().map(Vec::len).sum::<usize>() <= GROUPED_ROWS {
        let inputs: Vec<Vec<f32>> = work.iter().map(|(_, members)| gather(members)).collect();
        let calls: Vec<_> =
            weights.iter().zip(&work).zip(&inputs).map(|((&w, (_, m)), x)| (w, &x[..], m.len())).collect();
        experts_ffn(&calls, limit)
    } else {
        weights.par_iter().zip(&work).map(|(w, (_, m))| expert_ffn(w, &gather(m), m.len(), limit)).collect()
    };
    let mut out = vec![0.0; slots * hidden];
    for ((_, members), y) in work.iter().zip(results) {
        for (i, &(_, slot, weight)) in members.iter().enumerate() {
            for (o, v) in out[slot * hidden..(slot + 1) * hidden].iter_mut().zip(&y[i * hidden..(i + 1) * hidden]) {
                *o = v * weight;
            }
        }
    }
    Ok(out)
}

/// Adds each token's contributions in increasing expert id, starting from
/// zero: the one combine order of every execution path.
pub fn combine(routes: &[Route], contributions: &[f32], hidden: usize) -> Vec<f32> {
    let _span = profile::span(Part::Moe);
    let mut out = vec![0.0; routes.len() * hidden];
    let mut slot = 0;
    for (r, route) in routes.iter().enumerate() {
        let mut order: Vec<usize> = (0..route.len()).collect();
        order.sort_by_key(|&j| route[j].0);
        let acc = &mut out[r * hidden..(r + 1) * hidden];
        for j in order {
            let c = &contributions[(slot + j) * hidden..(slot + j + 1) * hidden];
            acc.iter_mut().zip(c).for_each(|(a, v)| *a += v);
        }
        slot += route.len();
    }
    out
}

/// The whole block: routed experts through `experts`, with the shared expert
/// computed while they run, combined in the canonical order.
pub fn forward(
    w: &MoeWeights,
    cfg: &ModelConfig,
    layer: usize,
    x: &[f32],
    tokens: &[u32],
    rows: usize,
    experts: &impl ExpertExecutor,
) -> Result<Vec<f32>> {
    let routes = route(w, cfg, layer, x, tokens, rows);
    let pending = experts.start(layer, x, &routes)?;
    let shared = expert_ffn(&w.shared, x, rows, cfg.swiglu_limit);
    let contributions = pending.finish()?;
    let mut out = combine(&routes, &contributions, cfg.hidden_size);
    out.iter_mut().zip(&shared).for_each(|(o, s)| *o += s);
    Ok(out)
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
    fn combine_adds_in_expert_id_order_whatever_the_route_order() {
        // Values chosen so that float addition order changes the result.
        let (big, small) = (1.0e8f32, 3.0f32);
        let routes = vec![vec![(7, 1.0), (2, 1.0), (5, 1.0)]];
        let contributions = vec![-big, big, small];
        // Expert order 2, 5, 7: ((0 + big) + small) + (-big) = 0 (small is lost).
        assert_eq!(combine(&routes, &contributions, 1), vec![((0.0 + big) + small) + -big]);
        let reordered = vec![vec![(2, 1.0), (5, 1.0), (7, 1.0)]];
        assert_eq!(combine(&reordered, &[big, small, -big], 1), combine(&routes, &contributions, 1));
    }

    #[test]
    fn swiglu_clamps_gate_above_and_up_both_ways() {
        let lin = |v: f32| crate::weights::Linear::from_f32(vec![v], 1, 1);
        let w = ExpertWeights { w1: lin(100.0), w2: lin(1.0), w3: lin(-100.0) };
        // gate = min(100, 2) = 2, up = clamp(-100, ±2) = -2.
        let y = expert_ffn(&w, &[1.0], 1, 2.0);
        assert!((y[0] - silu(2.0) * -2.0).abs() < 1e-6);
        // Negative gate logits are not clamped from below.
        let w = ExpertWeights { w1: lin(-100.0), w2: lin(1.0), w3: lin(1.0) };
        assert!((expert_ffn(&w, &[1.0], 1, 2.0)[0] - silu(-100.0)).abs() < 1e-6);
    }
}
