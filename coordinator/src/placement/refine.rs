//! Local search on one layer's placement, after the greedy packing.
//!
//! EPLB decides how many copies each expert gets before it packs them (the
//! next copy to the expert with the highest load per copy), and packs
//! heaviest first. With the same number of slots on every worker, both
//! steps leave the most loaded worker well above the mean on skewed loads:
//! the copies come in sizes no packing can even out. This search improves
//! both, keeping every worker's number of copies (so its memory) and every
//! copy of an expert on a distinct worker:
//!
//! - **swaps**: a copy on the most loaded worker trades places with a
//!   lighter copy elsewhere when that lowers the larger of the two loads;
//! - **copy moves**: when no swap helps, an expert on the most loaded worker
//!   takes one copy from an expert that can spare it (above the minimum
//!   replicas, the least load per copy after losing it), in the slot that
//!   copy leaves; kept only if the layer then balances better.
//!
//! Only improvements are kept, so the result is never less balanced than
//! the packing it starts from.
//!
//! Rebalancing a serving cluster may first **hand over** copies
//! ([`Layer::hand_over`]): the one step that changes workers' numbers of
//! copies, moving copies from workers above a count to those below it (a
//! worker that joined), so that the search can then even the layer out.

use super::Domains;

/// Copy moves tried per layer (kept or not) before the search stops: the
/// bound on its time (the V4-Pro shape, 61 layers, places in under a
/// second).
const MOVE_TRIES: usize = 64;
/// Balancedness (mean / largest worker load) at which a layer's search stops.
const GOOD_ENOUGH: f64 = 0.9999;
/// Swaps one search step makes at most, per worker.
const SWAPS_PER_WORKER: usize = 4;
/// Donors tried for one expert in need of a copy.
const DONORS: usize = 16;

/// One layer's copies: `holders[e]` the workers holding expert `e`.
pub(super) struct Layer<'a> {
    /// Tokens routed to each expert.
    tokens: &'a [f64],
    /// Least copies an expert may have.
    replicas: usize,
    pub holders: Vec<Vec<usize>>,
    worker_load: Vec<f64>,
    /// Where the workers run: no step crowds an expert's copies onto
    /// fewer zones or nodes ([`Domains::crowding`]).
    domains: &'a Domains,
    /// Balancedness at which the search stops.
    good_enough: f64,
    budget: Option<Budget<'a>>,
}

/// What a search on a serving layer may load: `held[e]` the workers that
/// hold expert `e` now (a copy placed back there is free), `left[w]` the
/// copies worker `w` may still load.
pub(super) struct Budget<'a> {
    pub held: &'a [Vec<usize>],
    pub left: &'a mut [usize],
}

impl Budget<'_> {
    /// Copies worker `w` loads to hold one of expert `e`: none if it holds
    /// one now.
    fn loads(&self, w: usize, e: usize) -> isize {
        isize::from(!self.held.get(e).is_some_and(|h| h.contains(&w)))
    }

    /// Copies worker `w` loads when it takes a copy of `gains` in place of
    /// one of `loses` (negative: a load it no longer needs).
    fn cost(&self, w: usize, gains: usize, loses: usize) -> isize {
        self.loads(w, gains) - self.loads(w, loses)
    }

    fn affords(&self, changes: &[(usize, isize)]) -> bool {
        changes.iter().all(|&(w, c)| c <= 0 || self.left[w] as isize >= c)
    }

    fn spend(&mut self, changes: &[(usize, isize)]) {
        for &(w, c) in changes {
            self.left[w] = (self.left[w] as isize - c) as usize;
        }
    }
}

impl<'a> Layer<'a> {
    /// A layer over `workers` workers in `domains`.
    pub fn new(
        tokens: &'a [f64],
        replicas: usize,
        workers: usize,
        domains: &'a Domains,
        holders: Vec<Vec<usize>>,
    ) -> Self {
        let worker_load = vec![0.0; workers];
        let good_enough = GOOD_ENOUGH;
        let mut layer = Layer { tokens, replicas, holders, worker_load, domains, good_enough, budget: None };
        layer.recount();
        layer
    }

    /// Whether expert `e`, its copy on worker `from` moved to `to` (none:
    /// dropped or added), is crowded no more than now at any level.
    fn spread_kept(&self, e: usize, from: Option<usize>, to: Option<usize>) -> bool {
        if self.domains.0.is_empty() {
            return true;
        }
        let now = &self.holders[e];
        let after: Vec<usize> = now.iter().copied().filter(|&w| Some(w) != from).chain(to).collect();
        self.domains.crowding(&after).iter().zip(self.domains.crowding(now)).all(|(a, b)| *a <= b)
    }

    /// A search that stops at balancedness `good_enough` and loads only
    /// what `budget` allows.
    pub fn bounded(mut self, good_enough: f64, budget: Budget<'a>) -> Self {
        self.good_enough = good_enough.min(GOOD_ENOUGH);
        self.budget = Some(budget);
        self
    }

    /// Whether the budget (if any) allows worker changes `changes`.
    fn affords(&self, changes: &[(usize, isize)]) -> bool {
        self.budget.as_ref().is_none_or(|b| b.affords(changes))
    }

    /// The budget changes of a copy of `gains` taking the place of one of
    /// `loses` on worker `w`.
    fn cost(&self, w: usize, gains: usize, loses: usize) -> (usize, isize) {
        (w, self.budget.as_ref().map_or(0, |b| b.cost(w, gains, loses)))
    }

    fn spend(&mut self, changes: &[(usize, isize)]) {
        if let Some(b) = self.budget.as_mut() {
            b.spend(changes);
        }
    }

    fn weight(&self, e: usize) -> f64 {
        self.tokens[e] / self.holders[e].len() as f64
    }

    fn recount(&mut self) {
        self.worker_load.iter_mut().for_each(|l| *l = 0.0);
        for e in 0..self.holders.len() {
            let w = self.weight(e);
            for &h in &self.holders[e] {
                self.worker_load[h] += w;
            }
        }
    }

    /// The most loaded worker and its load.
    fn heaviest(&self) -> (usize, f64) {
        self.worker_load.iter().copied().enumerate().fold((0, f64::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a })
    }

    /// What the search lowers: the largest worker load, then the sum of
    /// squares (progress while several workers share the largest).
    fn score(&self) -> (f64, f64) {
        (self.heaviest().1, self.worker_load.iter().map(|l| l * l).sum())
    }

    /// Runs the search to a local optimum, its move budget, or a layer
    /// within [`GOOD_ENOUGH`] (or the bound's target) of perfect balance.
    pub fn refine(&mut self) {
        let workers = self.worker_load.len();
        let mean = self.worker_load.iter().sum::<f64>() / workers as f64;
        if self.heaviest().1 <= mean / self.good_enough {
            return;
        }
        let mut tries = MOVE_TRIES;
        self.swap_down();
        while tries > 0 && self.heaviest().1 > mean / self.good_enough && self.move_a_copy(workers, &mut tries) {}
    }

    /// Swaps copies off the most loaded worker while one lowers it without
    /// raising another to its load. Swaps keep every expert's count, so
    /// every copy's weight stays as it is.
    fn swap_down(&mut self) {
        let weights: Vec<f64> = (0..self.holders.len()).map(|e| self.weight(e)).collect();
        // Every copy as (expert, worker).
        let mut copies: Vec<(usize, usize)> =
            self.holders.iter().enumerate().flat_map(|(e, h)| h.iter().map(move |&w| (e, w))).collect();
        let mut on_a = vec![false; self.holders.len()];
        let mut holds_e = vec![false; self.worker_load.len()];
        let mean = self.worker_load.iter().sum::<f64>() / self.worker_load.len() as f64;
        for _ in 0..SWAPS_PER_WORKER * self.worker_load.len() {
            let (a, load_a) = self.heaviest();
            if load_a <= mean / self.good_enough {
                return;
            }
            on_a.iter_mut().for_each(|o| *o = false);
            copies.iter().filter(|c| c.1 == a).for_each(|c| on_a[c.0] = true);
            // (new larger load, index of the copy on a, index of the other)
            let mut best: Option<(f64, usize, usize)> = None;
            for (i, &(e, _)) in copies.iter().enumerate().filter(|(_, c)| c.1 == a) {
                let we = weights[e];
                holds_e.iter_mut().for_each(|h| *h = false);
                self.holders[e].iter().for_each(|&w| holds_e[w] = true);
                for (j, &(f, b)) in copies.iter().enumerate() {
                    let wf = weights[f];
                    if wf >= we || on_a[f] || holds_e[b] {
                        continue;
                    }
                    let peak = (load_a - we + wf).max(self.worker_load[b] - wf + we);
                    if peak < load_a * (1.0 - 1e-12)
                        && best.is_none_or(|x| peak < x.0)
                        && self.affords(&[self.cost(a, f, e), self.cost(b, e, f)])
                        && self.spread_kept(e, Some(a), Some(b))
                        && self.spread_kept(f, Some(b), Some(a))
                    {
                        best = Some((peak, i, j));
                    }
                }
            }
            let Some((_, i, j)) = best else { return };
            let ((e, a), (f, b)) = (copies[i], copies[j]);
            self.spend(&[self.cost(a, f, e), self.cost(b, e, f)]);
            replace(&mut self.holders[e], a, b);
            replace(&mut self.holders[f], b, a);
            (copies[i].1, copies[j].1) = (b, a);
            self.worker_load[a] += weights[f] - weights[e];
            self.worker_load[b] += weights[e] - weights[f];
        }
    }

    /// Moves copies from workers holding more than `want[w]` copies of this
    /// layer to those holding fewer (a worker that joined holds none): the
    /// lightest short worker takes, from the most loaded donor with a copy
    /// it can take (spread kept, within the budget), the heaviest such copy
    /// that leaves it no heavier than the donor, else the lightest. Stops
    /// when no short worker can take a copy. Expert copy counts, so copy
    /// weights, stay as they are.
    pub fn hand_over(&mut self, want: &[usize]) {
        let workers = self.worker_load.len();
        let mut count = per_worker(&self.holders, workers);
        let mut stuck = vec![false; workers];
        loop {
            let short = (0..workers)
                .filter(|&w| count[w] < want[w] && !stuck[w])
                .min_by(|&x, &y| self.worker_load[x].total_cmp(&self.worker_load[y]).then(x.cmp(&y)));
            let Some(r) = short else { return };
            let mut donors: Vec<usize> = (0..workers).filter(|&w| count[w] > want[w]).collect();
            donors.sort_by(|&x, &y| self.worker_load[y].total_cmp(&self.worker_load[x]).then(x.cmp(&y)));
            let takes = |layer: &Self, e: usize, d: usize| {
                !layer.holders[e].contains(&r)
                    && layer.affords(&[layer.gain(r, e)])
                    && layer.spread_kept(e, Some(d), Some(r))
            };
            let pick = donors.iter().find_map(|&d| {
                let room = self.worker_load[d] - self.worker_load[r];
                let copies = (0..self.holders.len()).filter(|&e| self.holders[e].contains(&d) && takes(self, e, d));
                let fitting = copies.clone().filter(|&e| self.weight(e) <= room);
                let e = fitting.max_by(|&x, &y| self.weight(x).total_cmp(&self.weight(y)).then(y.cmp(&x)));
                let e = e.or_else(|| copies.min_by(|&x, &y| self.weight(x).total_cmp(&self.weight(y)).then(x.cmp(&y))));
                e.map(|e| (e, d))
            });
            let Some((e, d)) = pick else {
                stuck[r] = true;
                continue;
            };
            self.spend(&[self.gain(r, e)]);
            replace(&mut self.holders[e], d, r);
            let w = self.weight(e);
            (self.worker_load[d], self.worker_load[r]) = (self.worker_load[d] - w, self.worker_load[r] + w);
            (count[d], count[r]) = (count[d] - 1, count[r] + 1);
        }
    }

    /// The budget change of worker `w` taking a copy of `e` (nothing given up).
    fn gain(&self, w: usize, e: usize) -> (usize, isize) {
        (w, self.budget.as_ref().map_or(0, |b| b.loads(w, e)))
    }

    /// Gives an expert on the most loaded worker one more copy, taken from
    /// a donor; true if the layer then (after swaps) balances better.
    fn move_a_copy(&mut self, workers: usize, tries: &mut usize) -> bool {
        let before = self.score();
        let (a, _) = self.heaviest();
        let mut needy: Vec<usize> = (0..self.holders.len())
            .filter(|&e| self.holders[e].contains(&a) && self.holders[e].len() < workers)
            .collect();
        needy.sort_by(|&x, &y| self.weight(y).total_cmp(&self.weight(x)).then(x.cmp(&y)));
        let mut donors: Vec<usize> =
            (0..self.holders.len()).filter(|&d| self.holders[d].len() > self.replicas).collect();
        // Least load per copy once it has given one up.
        let after = |d: usize| self.tokens[d] / (self.holders[d].len() - 1) as f64;
        donors.sort_by(|&x, &y| after(x).total_cmp(&after(y)).then(x.cmp(&y)));
        for &e in &needy {
            for &d in donors.iter().filter(|&&d| d != e).take(DONORS) {
                // The donor's copy whose worker is the most loaded one
                // that does not hold `e` yet.
                let Some(slot) = self.holders[d]
                    .iter()
                    .copied()
                    .filter(|&w| {
                        !self.holders[e].contains(&w)
                            && self.affords(&[self.cost(w, e, d)])
                            && self.spread_kept(e, None, Some(w))
                            && self.spread_kept(d, Some(w), None)
                    })
                    .max_by(|&x, &y| self.worker_load[x].total_cmp(&self.worker_load[y]))
                else {
                    continue;
                };
                if *tries == 0 {
                    return false;
                }
                *tries -= 1;
                let saved = (self.holders.clone(), self.budget.as_ref().map(|b| b.left.to_vec()));
                self.spend(&[self.cost(slot, e, d)]);
                self.holders[d].retain(|&w| w != slot);
                self.holders[e].push(slot);
                self.recount();
                self.swap_down();
                if lexically_less(self.score(), before) {
                    return true;
                }
                self.holders = saved.0;
                if let (Some(b), Some(left)) = (self.budget.as_mut(), saved.1) {
                    b.left.copy_from_slice(&left);
                }
                self.recount();
            }
        }
        false
    }
}

/// Copies each of `workers` workers holds in `layer`.
pub(super) fn per_worker(layer: &[Vec<usize>], workers: usize) -> Vec<usize> {
    let mut count = vec![0; workers];
    layer.iter().flatten().for_each(|&w| count[w] += 1);
    count
}

fn replace(holders: &mut [usize], from: usize, to: usize) {
    if let Some(h) = holders.iter_mut().find(|h| **h == from) {
        *h = to;
    }
}

fn lexically_less(a: (f64, f64), b: (f64, f64)) -> bool {
    a.0 < b.0 * (1.0 - 1e-12) || (a.0 <= b.0 && a.1 < b.1 * (1.0 - 1e-12))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The search keeps what memory and correctness need (each
        /// worker's number of copies, distinct holders, the minimum
        /// replicas) and never raises the largest worker load.
        #[test]
        fn refining_keeps_the_constraints_and_never_worsens(
            per_node in 1usize..4,
            (workers, tokens, start) in (2usize..9, 2usize..40).prop_flat_map(|(workers, experts)| {
                let tokens = prop::collection::vec(prop_oneof![Just(0.0), 0.0f64..10.0, 10.0f64..1000.0], experts);
                // One copy each on a worker of its own, plus extra copies.
                let extra = prop::collection::vec((0..experts, 0..workers), 0..2 * workers);
                (Just(workers), tokens, extra)
            }).prop_map(|(workers, tokens, extra)| {
                let mut holders: Vec<Vec<usize>> = (0..tokens.len()).map(|e| vec![e % workers]).collect();
                for (e, w) in extra {
                    if !holders[e].contains(&w) {
                        holders[e].push(w);
                    }
                }
                (workers, tokens, holders)
            })
        ) {
            // Workers `per_node` to a machine.
            let node: Vec<usize> = (0..workers).map(|w| w / per_node).collect();
            let domains = Domains(vec![(node, workers.div_ceil(per_node))]);
            let before = Layer::new(&tokens, 1, workers, &domains, start.clone());
            let mut layer = Layer::new(&tokens, 1, workers, &domains, start.clone());
            layer.refine();
            for (now, was) in layer.holders.iter().zip(&start) {
                if now.len() == was.len() {
                    prop_assert!(domains.crowding(now) <= domains.crowding(was), "{:?} crowded from {:?}", now, was);
                }
            }
            prop_assert_eq!(per_worker(&layer.holders, workers), per_worker(&start, workers));
            for h in &layer.holders {
                prop_assert!(!h.is_empty());
                let mut sorted = h.clone();
                sorted.sort_unstable();
                sorted.dedup();
                prop_assert_eq!(sorted.len(), h.len(), "an expert twice on one worker: {:?}", h);
            }
            prop_assert!(layer.heaviest().1 <= before.heaviest().1 * (1.0 + 1e-9));
        }

        /// Handing copies over to the workers short of `want` (here: a
        /// worker with none, as one that joined) moves copies only from
        /// workers above their count to workers below it, keeps every
        /// expert's number of copies on distinct workers and its spread,
        /// and fills the short workers when the copies allow it.
        #[test]
        fn handing_over_moves_copies_from_surplus_to_short_workers(
            (workers, tokens, start) in (2usize..9, 2usize..40).prop_flat_map(|(workers, experts)| {
                let tokens = prop::collection::vec(prop_oneof![Just(0.0), 0.0f64..10.0, 10.0f64..1000.0], experts);
                let extra = prop::collection::vec((0..experts, 0..workers - 1), 0..2 * workers);
                (Just(workers), tokens, extra)
            }).prop_map(|(workers, tokens, extra)| {
                // The last worker holds nothing yet.
                let mut holders: Vec<Vec<usize>> = (0..tokens.len()).map(|e| vec![e % (workers - 1)]).collect();
                for (e, w) in extra {
                    if !holders[e].contains(&w) {
                        holders[e].push(w);
                    }
                }
                (workers, tokens, holders)
            })
        ) {
            let domains = Domains(vec![((0..workers).map(|w| w / 2).collect(), workers.div_ceil(2))]);
            let before = per_worker(&start, workers);
            let total: usize = before.iter().sum();
            let want: Vec<usize> = (0..workers).map(|w| total / workers + usize::from(w < total % workers)).collect();
            let mut layer = Layer::new(&tokens, 1, workers, &domains, start.clone());
            layer.hand_over(&want);
            let after = per_worker(&layer.holders, workers);
            for w in 0..workers {
                prop_assert!(after[w] >= before[w].min(want[w]) && after[w] <= before[w].max(want[w]), "{before:?} -> {after:?}, want {want:?}");
            }
            for (now, was) in layer.holders.iter().zip(&start) {
                prop_assert_eq!(now.len(), was.len());
                prop_assert!(domains.crowding(now) <= domains.crowding(was), "{:?} crowded from {:?}", now, was);
                let mut sorted = now.clone();
                sorted.sort_unstable();
                sorted.dedup();
                prop_assert_eq!(sorted.len(), now.len(), "an expert twice on one worker: {:?}", now);
            }
            // Without machines to crowd, a worker holding nothing can take
            // any copy: the one that joined reaches its count.
            let flat = Domains(Vec::new());
            let mut layer = Layer::new(&tokens, 1, workers, &flat, start.clone());
            layer.hand_over(&want);
            prop_assert_eq!(per_worker(&layer.holders, workers)[workers - 1], want[workers - 1]);
        }
    }
}
