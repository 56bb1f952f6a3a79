//! Which worker hosts which routed experts.
//!
//! [`eplb`] follows the approach of DeepSeek's EPLB, made memory-aware:
//! per layer, the hottest experts get the redundant replicas (each time the
//! expert with the highest load per replica), then the replicas are packed
//! heaviest first onto the worker with the least load so far in that layer,
//! among those that do not hold the expert yet, have not reached their
//! share of the layer's replicas and still have memory. A local search
//! (`refine`) then swaps copies between workers and moves redundant copies
//! between experts while that lowers the most loaded worker: EPLB's greedy
//! copy counts leave copies in sizes that equal slot counts cannot balance
//! (0.82 against 0.999 on a skewed V4-Pro-like trace, `benches/placement.rs`).
//! [`round_robin`] is the load-blind baseline; [`eplb`] keeps whichever
//! candidate balances best.

use myriad_proto::spec::ExpertSpec;

mod hierarchy;
mod migrate;
mod refine;

pub use migrate::{Migration, rebalance};

/// Tokens routed to each `(layer, expert)` over some window.
#[derive(Debug, Clone)]
pub struct Load {
    pub layers: usize,
    pub experts: usize,
    /// Row-major `[layers × experts]`.
    pub tokens: Vec<f64>,
}

impl Load {
    /// Every expert equally loaded (no reports yet).
    pub fn uniform(layers: usize, experts: usize) -> Self {
        Load { layers, experts, tokens: vec![1.0; layers * experts] }
    }

    /// `self` with each layer that saw no token at all counted as uniform.
    /// Such a layer was not measured (an idle cluster, or a load that
    /// decayed away); read as zero, every placement of it balances alike,
    /// and a worker that joins is never given its experts.
    pub fn idle_layers_uniform(mut self) -> Self {
        for layer in self.tokens.chunks_mut(self.experts.max(1)) {
            if layer.iter().all(|&t| t <= 0.0) {
                layer.fill(1.0);
            }
        }
        self
    }

    fn get(&self, layer: usize, expert: usize) -> f64 {
        self.tokens[layer * self.experts + expert]
    }
}

/// What to place and where it may go.
#[derive(Debug, Clone)]
pub struct Problem {
    pub layers: usize,
    pub experts: usize,
    /// Bytes one expert takes in a worker's memory.
    pub expert_bytes: u64,
    /// Each worker's memory for experts; `None`: no limit given.
    pub capacities: Vec<Option<u64>>,
    /// Copies of every expert, on distinct workers.
    pub replicas: usize,
    /// Extra copies per layer, given to the hottest experts.
    pub redundant: usize,
    /// The machine each worker runs on, as an index (workers on one node
    /// share it); copies of one expert go to distinct nodes where there
    /// are enough. Empty: every worker on a node of its own.
    pub nodes: Vec<usize>,
    /// The same for failure zones (a rack, a datacenter zone), spread
    /// before nodes. Empty: one zone.
    pub zones: Vec<usize>,
    /// Balance each layer across nodes first, then across the workers of
    /// each node (EPLB's hierarchical step), for clusters where traffic
    /// inside a node is cheaper than between nodes.
    pub hierarchical: bool,
}

/// Where the workers run, for spreading copies: levels of failure domains,
/// widest first (zones, then nodes), each a domain index per worker and
/// the number of domains.
#[derive(Debug, Clone)]
pub(crate) struct Domains(Vec<(Vec<usize>, usize)>);

impl Domains {
    fn of(p: &Problem) -> Self {
        let workers = p.capacities.len();
        let levels = [&p.zones, &p.nodes]
            .into_iter()
            .filter(|level| level.len() == workers)
            .map(|level| {
                let mut distinct = level.clone();
                distinct.sort_unstable();
                distinct.dedup();
                (level.clone(), distinct.len())
            })
            // A level where every worker is alone, or all share one domain,
            // constrains nothing beyond distinct workers.
            .filter(|&(_, n)| n > 1 && n < workers)
            .collect();
        Domains(levels)
    }

    /// Per level, copies of an expert on `holders` that share a domain with
    /// another of its copies beyond what too few domains force.
    pub(crate) fn crowding(&self, holders: &[usize]) -> Vec<usize> {
        self.0
            .iter()
            .map(|(domain, count)| {
                let distinct = holders
                    .iter()
                    .enumerate()
                    .filter(|&(i, &w)| holders[..i].iter().all(|&v| domain[v] != domain[w]))
                    .count();
                holders.len().min(*count) - distinct
            })
            .collect()
    }

    /// Among `candidates` for another copy of an expert on `holders`, those
    /// on the widest new domains: a new zone if any candidate offers one,
    /// then among those a new node likewise.
    fn widest(&self, holders: &[usize], mut candidates: Vec<usize>) -> Vec<usize> {
        for (domain, _) in &self.0 {
            let new_domain = |w: usize| holders.iter().all(|&h| domain[h] != domain[w]);
            let fresh: Vec<usize> = candidates.iter().copied().filter(|&w| new_domain(w)).collect();
            if !fresh.is_empty() {
                candidates = fresh;
            }
        }
        candidates
    }
}

/// Domain indices (for [`Problem::nodes`] and [`Problem::zones`]) of
/// workers labelled `labels`: equal labels share one, and a worker without
/// a label is alone in its own.
pub fn domain_indices<'a>(labels: impl IntoIterator<Item = Option<&'a str>>) -> Vec<usize> {
    let mut seen: Vec<Option<&str>> = Vec::new();
    labels
        .into_iter()
        .map(|label| match seen.iter().position(|s| s.is_some() && *s == label) {
            Some(i) => i,
            None => {
                seen.push(label);
                seen.len() - 1
            }
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("no workers to place experts on")]
    NoWorkers,
    #[error("{replicas} replicas per expert need at least {replicas} workers, there are {workers}")]
    TooFewWorkers { replicas: usize, workers: usize },
    #[error(
        "the plan does not fit: {copies} expert copies of {} need {}, the workers have {}",
        human(*expert_bytes), human(*needed), human(*available)
    )]
    DoesNotFit { copies: u64, expert_bytes: u64, needed: u64, available: u64 },
    #[error("layer {layer}: no worker has room for another copy of expert {expert}")]
    NoRoom { layer: usize, expert: usize },
    #[error("worker {worker} would hold {} of experts, its capacity is {}", human(*needed), human(*capacity))]
    WorkerFull { worker: usize, needed: u64, capacity: u64 },
}

/// `bytes` in binary units, one decimal (`80.0 GiB`).
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

/// A placement: for every layer and expert, the workers (indices) holding it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub workers: usize,
    /// `holders[layer][expert]`, ascending.
    pub holders: Vec<Vec<Vec<usize>>>,
}

impl Plan {
    /// Each worker's experts.
    pub fn specs(&self) -> Vec<ExpertSpec> {
        (0..self.workers)
            .map(|w| {
                ExpertSpec::from_pairs(self.holders.iter().enumerate().flat_map(|(l, layer)| {
                    layer
                        .iter()
                        .enumerate()
                        .filter(move |(_, h)| h.contains(&w))
                        .map(move |(e, _)| (l as u32, e as u32))
                }))
            })
            .collect()
    }

    /// Expert copies each worker holds.
    pub fn copies(&self) -> Vec<u64> {
        let mut copies = vec![0u64; self.workers];
        for w in self.holders.iter().flatten().flatten() {
            copies[*w] += 1;
        }
        copies
    }

    /// Mean over layers of (mean worker load / max worker load), an expert's
    /// load split evenly over its copies: 1 is perfect balance.
    pub fn balancedness(&self, load: &Load) -> f64 {
        let per_layer: Vec<f64> =
            self.holders.iter().enumerate().filter_map(|(l, h)| layer_balance(h, load, l, self.workers)).collect();
        if per_layer.is_empty() { 1.0 } else { per_layer.iter().sum::<f64>() / per_layer.len() as f64 }
    }
}

impl Plan {
    /// Copies sharing a zone or node with another copy of their expert,
    /// beyond what too few domains force, summed over levels.
    fn crowding(&self, domains: &Domains) -> usize {
        self.holders.iter().flatten().flat_map(|h| domains.crowding(h)).sum()
    }

    /// Experts whose copies share a zone or node that they need not share.
    pub fn crowded_experts(&self, p: &Problem) -> usize {
        let domains = Domains::of(p);
        self.holders.iter().flatten().filter(|h| domains.crowding(h).iter().any(|&c| c > 0)).count()
    }
}

/// One layer's mean worker load over its largest; `None` for a layer
/// without load.
fn layer_balance(layer: &[Vec<usize>], load: &Load, l: usize, workers: usize) -> Option<f64> {
    let mut per_worker = vec![0.0; workers];
    for (e, holders) in layer.iter().enumerate() {
        for &w in holders {
            per_worker[w] += load.get(l, e) / holders.len() as f64;
        }
    }
    let max = per_worker.iter().copied().fold(0.0, f64::max);
    (max > 0.0).then(|| per_worker.iter().sum::<f64>() / workers as f64 / max)
}

fn check(p: &Problem) -> Result<(), PlanError> {
    let workers = p.capacities.len();
    if workers == 0 {
        return Err(PlanError::NoWorkers);
    }
    if p.replicas == 0 || p.replicas > workers {
        return Err(PlanError::TooFewWorkers { replicas: p.replicas.max(1), workers });
    }
    if p.capacities.iter().all(Option::is_some) {
        let copies = (p.layers * (p.experts * p.replicas + p.redundant.min(p.experts * (workers - p.replicas)))) as u64;
        let needed = copies.saturating_mul(p.expert_bytes);
        let available = p.capacities.iter().map(|c| c.unwrap_or(0)).fold(0u64, u64::saturating_add);
        if needed > available {
            return Err(PlanError::DoesNotFit { copies, expert_bytes: p.expert_bytes, needed, available });
        }
    }
    Ok(())
}

/// Expert `e` of layer `l` on worker `(l·E + e) mod N` and the `R − 1`
/// after it: load-blind, even in counts.
pub fn round_robin(p: &Problem) -> Result<Plan, PlanError> {
    check(p)?;
    let workers = p.capacities.len();
    let holders = (0..p.layers)
        .map(|l| {
            (0..p.experts)
                .map(|e| {
                    let mut h: Vec<usize> = (0..p.replicas).map(|r| (l * p.experts + e + r) % workers).collect();
                    h.sort_unstable();
                    h
                })
                .collect()
        })
        .collect();
    let plan = Plan { workers, holders };
    for (w, copies) in plan.copies().into_iter().enumerate() {
        let needed = copies.saturating_mul(p.expert_bytes);
        if let Some(capacity) = p.capacities[w].filter(|&c| needed > c) {
            return Err(PlanError::WorkerFull { worker: w, needed, capacity });
        }
    }
    Ok(plan)
}

/// How many of a layer's `copies` each worker takes: as even as possible,
/// the extra ones to the workers holding the fewest so far (so totals stay
/// within one of each other), never beyond a worker's memory.
fn quotas(p: &Problem, copies: usize, free: &[Option<u64>], held: &[usize]) -> Vec<usize> {
    let workers = free.len();
    let room = |w: usize| free[w].map_or(usize::MAX, |f| (f / p.expert_bytes.max(1)) as usize);
    let mut order: Vec<usize> = (0..workers).collect();
    order.sort_by_key(|&w| (held[w], w));
    let mut quota = vec![0usize; workers];
    let mut left = copies;
    // Deal one copy at a time in `order`, skipping workers that are full.
    while left > 0 {
        let before = left;
        for &w in &order {
            if left > 0 && quota[w] < room(w) {
                quota[w] += 1;
                left -= 1;
            }
        }
        if left == before {
            break;
        }
    }
    quota
}

/// One layer, heaviest copy first onto the least-loaded worker that still
/// has quota and does not hold the expert; `None` if that order gets stuck.
fn pack_by_load(
    p: &Problem,
    domains: &Domains,
    count: &[usize],
    weight: &dyn Fn(usize) -> f64,
    quota: &[usize],
    held: &[usize],
) -> Option<Vec<Vec<usize>>> {
    let workers = quota.len();
    let mut items: Vec<usize> = (0..p.experts).flat_map(|e| std::iter::repeat_n(e, count[e])).collect();
    items.sort_by(|&a, &b| weight(b).total_cmp(&weight(a)).then(a.cmp(&b)));
    let mut layer_load = vec![0.0f64; workers];
    let mut layer_count = vec![0usize; workers];
    let mut layer: Vec<Vec<usize>> = vec![Vec::new(); p.experts];
    for e in items {
        // A zone, then a node, without a copy of `e` yet first.
        let open = (0..workers).filter(|&w| layer_count[w] < quota[w] && !layer[e].contains(&w)).collect();
        let w = domains.widest(&layer[e], open).into_iter().min_by(|&a, &b| {
            layer_load[a]
                .total_cmp(&layer_load[b])
                .then(layer_count[a].cmp(&layer_count[b]))
                .then(held[a].cmp(&held[b]))
                .then(a.cmp(&b))
        })?;
        layer[e].push(w);
        layer_load[w] += weight(e);
        layer_count[w] += 1;
    }
    Some(layer)
}

/// One layer, experts with the most copies first, each on the workers
/// with the most quota left (then the least load): the Gale–Ryser order,
/// which fills the quotas whenever any assignment can.
fn pack_by_memory(
    p: &Problem,
    domains: &Domains,
    l: usize,
    count: &[usize],
    weight: &dyn Fn(usize) -> f64,
    quota: &[usize],
    held: &[usize],
) -> Result<Vec<Vec<usize>>, PlanError> {
    let workers = quota.len();
    let mut left = quota.to_vec();
    let mut order: Vec<usize> = (0..p.experts).collect();
    order.sort_by(|&a, &b| count[b].cmp(&count[a]).then(weight(b).total_cmp(&weight(a))).then(a.cmp(&b)));
    let mut layer_load = vec![0.0f64; workers];
    let mut layer: Vec<Vec<usize>> = vec![Vec::new(); p.experts];
    for e in order {
        let mut candidates: Vec<usize> = (0..workers).filter(|&w| left[w] > 0).collect();
        candidates.sort_by(|&a, &b| {
            left[b]
                .cmp(&left[a])
                .then(layer_load[a].total_cmp(&layer_load[b]))
                .then(held[a].cmp(&held[b]))
                .then(a.cmp(&b))
        });
        if candidates.len() < count[e] {
            return Err(PlanError::NoRoom { layer: l, expert: e });
        }
        // In that order, but among workers with as much room, one on a
        // zone or node `e` is not on yet first.
        for _ in 0..count[e] {
            let most = left[candidates[0]];
            let roomiest = candidates.iter().copied().take_while(|&w| left[w] == most).collect();
            let pick = domains.widest(&layer[e], roomiest)[0];
            let w = candidates.remove(candidates.iter().position(|&c| c == pick).unwrap_or(0));
            layer[e].push(w);
            layer_load[w] += weight(e);
            left[w] -= 1;
        }
    }
    Ok(layer)
}

/// Load-aware, memory-aware placement: the most balanced of the packed
/// plan with the redundant copies, without them (spreading a hot expert's
/// load evenly over copies can hurt when few workers share many copies),
/// and the round-robin baseline. So it is never less balanced than round
/// robin on the load it is given.
pub fn eplb(p: &Problem, load: &Load) -> Result<Plan, PlanError> {
    let mut best = pack(p, load)?;
    let plain = Problem { redundant: 0, ..p.clone() };
    let others = [pack(&plain, load), round_robin(&plain)];
    // Spread over zones and nodes comes first, then balance.
    let domains = Domains::of(p);
    for candidate in others.into_iter().flatten() {
        let (ours, theirs) = (candidate.crowding(&domains), best.crowding(&domains));
        if ours < theirs || (ours == theirs && candidate.balancedness(load) > best.balancedness(load) + 1e-12) {
            best = candidate;
        }
    }
    Ok(best)
}

fn pack(p: &Problem, load: &Load) -> Result<Plan, PlanError> {
    check(p)?;
    let workers = p.capacities.len();
    let domains = Domains::of(p);
    let machines = if p.hierarchical { hierarchy::Machines::of(p) } else { None };
    let mut free: Vec<Option<u64>> = p.capacities.clone();
    let mut held = vec![0usize; workers];
    let mut holders = Vec::with_capacity(p.layers);
    for l in 0..p.layers {
        // Replica counts: R each, then the redundant ones to the hottest.
        let mut count = vec![p.replicas; p.experts];
        for _ in 0..p.redundant {
            let hottest = (0..p.experts).filter(|&e| count[e] < workers).max_by(|&a, &b| {
                let (la, lb) = (load.get(l, a) / count[a] as f64, load.get(l, b) / count[b] as f64);
                la.total_cmp(&lb).then(b.cmp(&a))
            });
            match hottest {
                Some(e) => count[e] += 1,
                None => break,
            }
        }
        let quota = quotas(p, count.iter().sum(), &free, &held);
        let tokens = &load.tokens[l * p.experts..(l + 1) * p.experts];
        let stepwise = machines.as_ref().and_then(|m| m.pack(p, tokens, &count, &quota, &held));
        let mut layer = match stepwise {
            Some(layer) => layer,
            None => {
                let weight = |e: usize| load.get(l, e) / count[e] as f64;
                let layer = match pack_by_load(p, &domains, &count, &weight, &quota, &held) {
                    Some(layer) => layer,
                    // Memory is too tight for the load-first order: place
                    // the experts with the most copies first, each on the
                    // workers with the most memory left (the order that
                    // finds a fit whenever one exists for this layer).
                    None => pack_by_memory(p, &domains, l, &count, &weight, &quota, &held)?,
                };
                // Then rebalance the copies and their counts by local search.
                let mut search = refine::Layer::new(tokens, p.replicas, workers, &domains, layer);
                search.refine();
                search.holders
            }
        };
        for &w in layer.iter().flatten() {
            held[w] += 1;
            if let Some(f) = free[w].as_mut() {
                *f -= p.expert_bytes;
            }
        }
        for h in &mut layer {
            h.sort_unstable();
        }
        holders.push(layer);
    }
    Ok(Plan { workers, holders })
}

#[cfg(test)]
mod tests;
