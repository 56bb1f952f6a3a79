//! Rebalancing a cluster that is serving: the bytes each worker must load.
//!
//! A fresh plan ignores where the copies are now: adopting it whole can make
//! every worker reload most of its experts for a gain of a fraction of a
//! percent, or for none when a worker leaves and only its copies were lost.
//! [`rebalance`] starts from the current placement instead, repaired (each
//! copy that left with a worker placed again, on the least loaded worker
//! with room), then improves the layers where the fresh plan balances
//! better by more than `tolerance`, the largest gap first, while no worker
//! has to load more than the move bound: by a local search that keeps each
//! worker's copies in the layer; short of the target, after handing copies
//! to workers below the fresh plan's count (one that joined); still short,
//! by adopting the fresh plan's layer. Last, experts of equal load trade
//! holders wherever that loads fewer copies.
//!
//! The fresh plan's workers are first renumbered to match the current
//! placement where they can (equal memory only): which worker gets which
//! set of copies is arbitrary to the packing, but not to what moves.

use super::refine::{Budget, Layer, per_worker};
use super::{Domains, Load, Plan, PlanError, Problem, eplb, layer_balance};

/// What a new plan may change of the current one.
#[derive(Debug, Clone)]
pub struct Migration<'a> {
    /// The placement serving now, over the problem's workers (copies on
    /// workers that left already dropped).
    pub current: &'a Plan,
    /// The most bytes of experts any one worker may load, beyond what
    /// restoring lost copies needs; `None`: no bound.
    pub max_move: Option<u64>,
    /// Balancedness a plan that moves less may give up against the best.
    pub tolerance: f64,
}

/// The plan to switch to from `m.current` for `load` (see the module docs).
pub fn rebalance(p: &Problem, load: &Load, m: &Migration<'_>) -> Result<Plan, PlanError> {
    let fresh = renumber(eplb(p, load)?, m.current, &p.capacities);
    let current_fits = m.current.workers == fresh.workers && m.current.holders.len() == p.layers;
    let Some(mut plan) = current_fits.then(|| repair(p, load, m.current)).flatten() else {
        return Ok(fresh);
    };
    let (workers, domains) = (fresh.workers, Domains::of(p));
    // Copies each worker may still load: the bound less what the repair
    // already needs (a worker past it loads nothing more).
    let bound = m.max_move.map_or(UNBOUNDED, |b| (b / p.expert_bytes.max(1)) as usize);
    let mut left: Vec<usize> = plan.moved(m.current).iter().map(|&r| bound.saturating_sub(r)).collect();
    let mut copies = plan.copies_per_worker();
    let balance = |layer: &[Vec<usize>], l: usize| layer_balance(layer, load, l, workers).unwrap_or(1.0);
    // Layers where the fresh plan balances better, the largest gap first:
    // they get the move budget first.
    let mut gaps: Vec<(usize, f64, f64)> = (0..p.layers)
        .map(|l| (l, balance(&plan.holders[l], l), balance(&fresh.holders[l], l)))
        .filter(|&(_, now, best)| now < best - m.tolerance)
        .collect();
    gaps.sort_by(|a, b| (b.2 - b.1).total_cmp(&(a.2 - a.1)).then(a.0.cmp(&b.0)));
    for (l, _, best) in gaps {
        let (held, target) = (&m.current.holders[l], best - m.tolerance);
        let tokens = &load.tokens[l * p.experts..(l + 1) * p.experts];
        let search = |want: Option<&[usize]>, left: &mut [usize]| {
            let start = plan.holders[l].clone();
            let mut search =
                Layer::new(tokens, p.replicas, workers, &domains, start).bounded(target, Budget { held, left });
            if let Some(want) = want {
                search.hand_over(want);
            }
            search.refine();
            let mut holders = search.holders;
            holders.iter_mut().for_each(|h| h.sort_unstable());
            holders
        };
        let mut kept_left = left.clone();
        let mut refined = search(None, &mut kept_left);
        // Short of the target with every worker's copies kept (a worker
        // that joined holds none): workers below the fresh plan's count of
        // copies in this layer take copies from those above it, moving
        // those copies only, then search again.
        if balance(&refined, l) < target {
            let want = per_worker(&fresh.holders[l], workers);
            let mut handed_left = left.clone();
            let handed = search(Some(&want), &mut handed_left);
            let mut after = copies.clone();
            per_worker(&plan.holders[l], workers).iter().enumerate().for_each(|(w, &n)| after[w] -= n);
            per_worker(&handed, workers).iter().enumerate().for_each(|(w, &n)| after[w] += n);
            if balance(&handed, l) > balance(&refined, l) && fits(p, &after) {
                (refined, kept_left, copies) = (handed, handed_left, after);
            }
        }
        left = kept_left;
        // Short of the target, the fresh plan's layer, if affordable.
        let ours = balance(&refined, l);
        let (spent, needs) = (layer_moves(&refined, held, workers), layer_moves(&fresh.holders[l], held, workers));
        let affordable = (0..workers).all(|w| needs[w] <= left[w] + spent[w]);
        let mut after = copies.clone();
        refined.iter().flatten().for_each(|&w| after[w] -= 1);
        fresh.holders[l].iter().flatten().for_each(|&w| after[w] += 1);
        if ours < target && best > ours && affordable && fits(p, &after) {
            (0..workers).for_each(|w| left[w] = left[w] + spent[w] - needs[w]);
            copies = after;
            refined = fresh.holders[l].clone();
        }
        plan.holders[l] = refined;
    }
    for (l, layer) in plan.holders.iter_mut().enumerate() {
        fewer_moves(layer, &m.current.holders[l], &load.tokens[l * p.experts..(l + 1) * p.experts]);
    }
    Ok(plan)
}

/// Swaps the holders of experts with exactly equal load in `layer` while
/// that loads fewer copies than `held` has: every worker's load, copies
/// and machines stay as they are. Adopted layers of the fresh plan number
/// their copies by its packing order, so without this an idle (uniform)
/// layer moves copies between workers that stay, not only to a new one.
fn fewer_moves(layer: &mut [Vec<usize>], held: &[Vec<usize>], tokens: &[f64]) {
    let cost =
        |holders: &[usize], e: usize| holders.iter().filter(|w| held.get(e).is_none_or(|h| !h.contains(w))).count();
    let mut improved = true;
    while improved {
        improved = false;
        for a in 0..layer.len() {
            for b in a + 1..layer.len() {
                if tokens[a] != tokens[b] {
                    continue;
                }
                let now = cost(&layer[a], a) + cost(&layer[b], b);
                if cost(&layer[b], a) + cost(&layer[a], b) < now {
                    layer.swap(a, b);
                    improved = true;
                }
            }
        }
    }
}

/// Stands for no move bound: far more copies than any plan has.
const UNBOUNDED: usize = 1 << 40;

/// Whether workers holding `copies` experts each stay within their memory.
fn fits(p: &Problem, copies: &[usize]) -> bool {
    copies.iter().zip(&p.capacities).all(|(&n, c)| c.is_none_or(|c| n as u64 * p.expert_bytes <= c))
}

/// Copies each worker holds in `layer` that it does not in `before`.
fn layer_moves(layer: &[Vec<usize>], before: &[Vec<usize>], workers: usize) -> Vec<usize> {
    let mut moved = vec![0; workers];
    for (e, holders) in layer.iter().enumerate() {
        for &w in holders.iter().filter(|w| before.get(e).is_none_or(|b| !b.contains(w))) {
            moved[w] += 1;
        }
    }
    moved
}

impl Plan {
    /// Expert copies each worker holds in `self` but not in `before`: what
    /// a switch from `before` makes it load.
    pub fn moved(&self, before: &Plan) -> Vec<usize> {
        let mut moved = vec![0; self.workers];
        for (l, layer) in self.holders.iter().enumerate() {
            let old = before.holders.get(l).map_or(&[][..], |h| &h[..]);
            for (w, n) in layer_moves(layer, old, self.workers).into_iter().enumerate() {
                moved[w] += n;
            }
        }
        moved
    }

    fn copies_per_worker(&self) -> Vec<usize> {
        self.copies().into_iter().map(|c| c as usize).collect()
    }
}

/// `current` with every expert back at `p.replicas` copies at least: each
/// missing copy on the worker with the least load in its layer that does
/// not hold it and has memory left. `None` if one does not fit, or the
/// current placement already does not.
fn repair(p: &Problem, load: &Load, current: &Plan) -> Option<Plan> {
    let (workers, domains) = (current.workers, Domains::of(p));
    let mut plan = current.clone();
    let mut copies = plan.copies_per_worker();
    let room =
        |w: usize, copies: &[usize]| p.capacities[w].is_none_or(|c| (copies[w] as u64 + 1) * p.expert_bytes <= c);
    if !fits(p, &copies) {
        return None;
    }
    for l in 0..p.layers {
        let layer = &mut plan.holders[l];
        if layer.len() != p.experts {
            return None;
        }
        let mut per_worker = vec![0.0; workers];
        for (e, holders) in layer.iter().enumerate() {
            for &w in holders {
                per_worker[w] += load.get(l, e) / holders.len() as f64;
            }
        }
        for (e, holders) in layer.iter_mut().enumerate() {
            let tokens = load.get(l, e);
            while holders.len() < p.replicas {
                let open = (0..workers).filter(|&w| !holders.contains(&w) && room(w, &copies)).collect();
                let w = domains.widest(holders, open).into_iter().min_by(|&a, &b| {
                    per_worker[a].total_cmp(&per_worker[b]).then(copies[a].cmp(&copies[b])).then(a.cmp(&b))
                })?;
                // The expert's load spreads over one more copy.
                let (before, after) = (tokens / holders.len().max(1) as f64, tokens / (holders.len() + 1) as f64);
                for &h in holders.iter() {
                    per_worker[h] += after - before;
                }
                per_worker[w] += after;
                holders.push(w);
                holders.sort_unstable();
                copies[w] += 1;
            }
        }
    }
    Some(plan)
}

/// `fresh` with its workers renumbered to share the most copies with
/// `current`: pairs with the most copies in common first, a worker only
/// ever taking the place of one with the same memory.
fn renumber(fresh: Plan, current: &Plan, capacities: &[Option<u64>]) -> Plan {
    let workers = fresh.workers;
    if current.workers != workers {
        return fresh;
    }
    let mut common = vec![0usize; workers * workers];
    for (l, layer) in fresh.holders.iter().enumerate() {
        for (e, holders) in layer.iter().enumerate() {
            let now = current.holders.get(l).and_then(|c| c.get(e)).map_or(&[][..], |h| &h[..]);
            for &f in holders {
                for &c in now {
                    common[f * workers + c] += 1;
                }
            }
        }
    }
    let mut pairs: Vec<(usize, usize)> = (0..workers).flat_map(|f| (0..workers).map(move |c| (f, c))).collect();
    pairs.sort_by(|a, b| common[b.0 * workers + b.1].cmp(&common[a.0 * workers + a.1]).then(a.cmp(b)));
    let mut to: Vec<Option<usize>> = vec![None; workers];
    let mut taken = vec![false; workers];
    for (f, c) in pairs {
        if to[f].is_none() && !taken[c] && capacities[f] == capacities[c] {
            to[f] = Some(c);
            taken[c] = true;
        }
    }
    // Every capacity has as many places as workers, so all are matched.
    let Some(to) = to.into_iter().collect::<Option<Vec<usize>>>() else { return fresh };
    let holders = fresh
        .holders
        .into_iter()
        .map(|layer| {
            layer
                .into_iter()
                .map(|h| {
                    let mut h: Vec<usize> = h.into_iter().map(|w| to[w]).collect();
                    h.sort_unstable();
                    h
                })
                .collect()
        })
        .collect();
    Plan { workers, holders }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::problem;
    use proptest::prelude::*;

    /// Zipf-like tokens, the ranks of each layer's experts set by `seed`.
    fn skewed(layers: usize, experts: usize, seed: usize) -> Load {
        let tokens = (0..layers)
            .flat_map(|l| (0..experts).map(move |e| 1e4 / (((e * 37 + l * 11 + seed * 101) % experts + 1) as f64)))
            .collect();
        Load { layers, experts, tokens }
    }

    /// `plan` after worker `gone` left: its copies dropped, the workers
    /// after it renumbered down by one.
    fn without(plan: &Plan, gone: usize) -> Plan {
        let holders = plan
            .holders
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|h| h.iter().filter(|&&w| w != gone).map(|&w| if w > gone { w - 1 } else { w }).collect())
                    .collect()
            })
            .collect();
        Plan { workers: plan.workers - 1, holders }
    }

    fn check_valid(plan: &Plan, p: &Problem) {
        for h in plan.holders.iter().flatten() {
            assert!(h.len() >= p.replicas, "{h:?}");
            assert!(h.windows(2).all(|w| w[0] < w[1]), "{h:?}");
        }
    }

    #[test]
    fn an_unchanged_cluster_moves_nothing() {
        let (p, load) = (problem(4, 32, 8, 1, 8), skewed(4, 32, 0));
        let current = eplb(&p, &load).unwrap();
        let next = rebalance(&p, &load, &Migration { current: &current, max_move: None, tolerance: 0.0 }).unwrap();
        assert_eq!(next.moved(&current), vec![0; 8]);
    }

    /// A worker joins a cluster whose measured load is zero in one layer:
    /// that layer, counted as uniform, gives the new worker its share.
    #[test]
    fn a_joined_worker_gets_copies_of_unmeasured_layers() {
        let two = problem(2, 8, 2, 2, 0);
        let mut load = skewed(2, 8, 0);
        load.tokens[8..].fill(0.0);
        let current = eplb(&two, &load).unwrap();
        let joined = Plan { workers: 3, holders: current.holders.clone() };
        let p3 = problem(2, 8, 3, 2, 0);
        let m = Migration { current: &joined, max_move: None, tolerance: 0.01 };
        let next = rebalance(&p3, &load.idle_layers_uniform(), &m).unwrap();
        check_valid(&next, &p3);
        assert!(next.holders[1].iter().flatten().any(|&w| w == 2), "{:?}", next.holders[1]);
    }

    /// A worker joins an idle cluster (every expert's load equal): only
    /// its share of copies moves, all to it, at the fresh plan's balance.
    #[test]
    fn a_worker_joining_an_idle_cluster_loads_only_its_share() {
        let load = Load::uniform(5, 8);
        let current = eplb(&problem(5, 8, 2, 1, 0), &load).unwrap();
        let joined = Plan { workers: 3, holders: current.holders.clone() };
        let p3 = problem(5, 8, 3, 1, 0);
        let m = Migration { current: &joined, max_move: None, tolerance: 0.01 };
        let next = rebalance(&p3, &load, &m).unwrap();
        check_valid(&next, &p3);
        assert_eq!(next.moved(&joined), vec![0, 0, next.copies()[2] as usize]);
        assert_eq!(next.copies()[2], 13, "{:?}", next.copies());
        assert!((next.balancedness(&load) - eplb(&p3, &load).unwrap().balancedness(&load)).abs() < 1e-9);
    }

    /// A worker joins a serving cluster: the layers short of balance hand
    /// it copies from the others rather than adopting the fresh plan's
    /// layers, which renumber most copies.
    #[test]
    fn a_worker_joining_a_serving_cluster_moves_far_less_than_a_fresh_plan() {
        for seed in 0..4 {
            let load = skewed(4, 64, seed);
            let current = eplb(&problem(4, 64, 7, 1, 8), &load).unwrap();
            let joined = Plan { workers: 8, holders: current.holders.clone() };
            let p8 = problem(4, 64, 8, 1, 8);
            let fresh = eplb(&p8, &load).unwrap();
            let next = rebalance(&p8, &load, &Migration { current: &joined, max_move: None, tolerance: 0.01 }).unwrap();
            check_valid(&next, &p8);
            let (ours, theirs) =
                (next.moved(&joined).iter().sum::<usize>(), fresh.moved(&joined).iter().sum::<usize>());
            assert!(next.copies()[7] > 0, "the joined worker holds nothing");
            assert!(next.balancedness(&load) >= fresh.balancedness(&load) - 0.01 - 1e-9);
            assert!(2 * ours < theirs, "moved {ours}, a fresh plan {theirs}");
        }
    }

    #[test]
    fn a_departed_worker_costs_only_its_own_copies() {
        let (p, load) = (problem(4, 32, 8, 2, 0), skewed(4, 32, 0));
        let before = eplb(&p, &load).unwrap();
        let lost = before.copies()[3] as usize;
        let current = without(&before, 3);
        let p7 = problem(4, 32, 7, 2, 0);
        let fresh = eplb(&p7, &load).unwrap();
        let bounded = Migration { current: &current, max_move: Some(0), tolerance: 0.0 };
        let next = rebalance(&p7, &load, &bounded).unwrap();
        check_valid(&next, &p7);
        assert_eq!(next.moved(&current).iter().sum::<usize>(), lost);
        // Unbounded and with room for a percent of balance, it moves less
        // than the fresh plan and balances within that percent of it.
        let loose = Migration { current: &current, max_move: None, tolerance: 0.01 };
        let next = rebalance(&p7, &load, &loose).unwrap();
        check_valid(&next, &p7);
        assert!(next.balancedness(&load) >= fresh.balancedness(&load) - 0.01);
        let (ours, theirs) = (next.moved(&current).iter().sum::<usize>(), fresh.moved(&current).iter().sum::<usize>());
        assert!(ours < theirs, "moved {ours}, a fresh plan {theirs}");
    }

    /// Copies lost with a worker come back on machines the expert is not
    /// on yet.
    #[test]
    fn restored_copies_go_to_other_machines() {
        let load = skewed(2, 24, 0);
        let mut p = problem(2, 24, 6, 2, 0);
        p.nodes = vec![0, 0, 1, 1, 2, 2];
        let before = eplb(&p, &load).unwrap();
        let current = without(&before, 1);
        let mut p5 = problem(2, 24, 5, 2, 0);
        p5.nodes = vec![0, 1, 1, 2, 2];
        let next = rebalance(&p5, &load, &Migration { current: &current, max_move: Some(0), tolerance: 0.0 }).unwrap();
        let domains = Domains::of(&p5);
        for h in next.holders.iter().flatten() {
            assert_eq!(domains.crowding(h), vec![0], "copies on {h:?}");
        }
    }

    #[test]
    fn the_move_bound_holds_and_tolerance_trades_balance_for_moves() {
        let p = problem(8, 64, 8, 1, 8);
        let current = eplb(&p, &skewed(8, 64, 0)).unwrap();
        let load = skewed(8, 64, 1);
        let run = |max_move, tolerance| {
            let next = rebalance(&p, &load, &Migration { current: &current, max_move, tolerance }).unwrap();
            check_valid(&next, &p);
            (next.balancedness(&load), next.moved(&current))
        };
        let (stay, _) = (current.balancedness(&load), ());
        let (best, all) = run(None, 0.0);
        assert!(best > stay + 0.05, "a drifted load leaves room: {stay} -> {best}");
        let (bounded, moved) = run(Some(30), 0.0);
        assert!(moved.iter().all(|&n| n * 10 <= 30), "{moved:?}");
        assert!(bounded > stay && bounded <= best, "{stay} < {bounded} <= {best}");
        let (loose, fewer) = run(None, 0.02);
        assert!(loose >= best - 0.02);
        assert!(fewer.iter().sum::<usize>() <= all.iter().sum::<usize>());
        assert_eq!(run(None, 1.0).1, vec![0; 8], "any balance within tolerance: nothing moves");
    }

    proptest! {
        #[test]
        fn rebalancing_keeps_constraints_and_bounds(
            (experts, workers, replicas, seed, gone, bound, tolerance) in
                (2usize..24, 2usize..7, 1usize..3, 0usize..50, 0usize..7, 0usize..6, 0.0f64..0.05)
        ) {
            let replicas = replicas.min(workers - 1).max(1);
            let p = problem(2, experts, workers, replicas, workers / 2);
            let before = eplb(&p, &skewed(2, experts, seed)).unwrap();
            let current = without(&before, gone % workers);
            let p = problem(2, experts, workers - 1, replicas, workers / 2);
            let load = skewed(2, experts, seed + 1);
            let migration = Migration { current: &current, max_move: Some(bound as u64 * 10), tolerance };
            let next = rebalance(&p, &load, &migration).unwrap();
            let required = repair(&p, &load, &current).unwrap().moved(&current);
            for h in next.holders.iter().flatten() {
                prop_assert!(h.len() >= replicas && h.windows(2).all(|w| w[0] < w[1]), "{:?}", h);
            }
            for (n, r) in next.moved(&current).into_iter().zip(required) {
                prop_assert!(n <= r.max(bound), "moved {} copies, bound {} beyond {} required", n, bound, r);
            }
        }
    }
}
