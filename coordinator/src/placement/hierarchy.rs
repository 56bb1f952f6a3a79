//! EPLB's hierarchical step: one layer balanced across machines first,
//! then across the workers of each machine. Where traffic inside a machine
//! is cheaper than between machines (NVLink inside, a NIC between), each
//! machine's share of the tokens is what its NIC carries, so it is the
//! first thing to even out; the workers of a machine then share what it
//! got. An expert's copies are spread as evenly as they go over machines,
//! so one machine lost never takes every copy while there are others.
//!
//! The machine stage packs copies heaviest first onto the least loaded
//! machine; the worker stage is the parent module's packing and swap
//! search over one machine's workers (copy counts stay as they are: the
//! machines' shares are settled).

use super::refine::Layer;
use super::{Domains, Problem, pack_by_load};

/// Workers grouped by machine, and each machine's zone.
pub(super) struct Machines {
    /// Each machine's workers, ascending.
    members: Vec<Vec<usize>>,
    /// Machines as domains for the machine stage: their zones, if any.
    zones: Domains,
}

impl Machines {
    /// `None` unless `p` labels workers with at least two machines.
    pub fn of(p: &Problem) -> Option<Self> {
        let workers = p.capacities.len();
        if p.nodes.len() != workers {
            return None;
        }
        let mut labels: Vec<usize> = p.nodes.clone();
        labels.sort_unstable();
        labels.dedup();
        if labels.len() < 2 {
            return None;
        }
        let members: Vec<Vec<usize>> =
            labels.iter().map(|&label| (0..workers).filter(|&w| p.nodes[w] == label).collect()).collect();
        let zones = if p.zones.len() == workers {
            let of_machine: Vec<usize> = members.iter().map(|m| p.zones[m[0]]).collect();
            let mut distinct = of_machine.clone();
            distinct.sort_unstable();
            distinct.dedup();
            let n = distinct.len();
            Domains(if n > 1 && n < members.len() { vec![(of_machine, n)] } else { Vec::new() })
        } else {
            Domains(Vec::new())
        };
        Some(Machines { members, zones })
    }

    /// One layer placed machine first: `count[e]` copies of expert `e`,
    /// workers' `quota` this layer and copies `held` so far. `None` when the
    /// quotas cannot be met this way: the caller places the layer flat.
    pub fn pack(
        &self,
        p: &Problem,
        tokens: &[f64],
        count: &[usize],
        quota: &[usize],
        held: &[usize],
    ) -> Option<Vec<Vec<usize>>> {
        let machines = self.members.len();
        let sum = |of: &[usize], m: &[usize]| m.iter().map(|&w| of[w]).sum::<usize>();
        let room: Vec<usize> = self.members.iter().map(|m| sum(quota, m)).collect();
        let machine_held: Vec<usize> = self.members.iter().map(|m| sum(held, m)).collect();
        let weight = |e: usize| tokens[e] / count[e] as f64;
        // Machines as bins, heaviest copy first onto the least loaded one
        // with room, an expert's copies spread evenly over machines (as
        // many on each, give or take one), zones first where they differ.
        let mut copies: Vec<usize> = (0..p.experts).flat_map(|e| std::iter::repeat_n(e, count[e])).collect();
        copies.sort_by(|&a, &b| weight(b).total_cmp(&weight(a)).then(a.cmp(&b)));
        let (mut load, mut taken) = (vec![0.0f64; machines], vec![0usize; machines]);
        let mut on = vec![vec![0usize; machines]; p.experts];
        for e in copies {
            let most = count[e].div_ceil(machines);
            let open: Vec<usize> = (0..machines).filter(|&m| taken[m] < room[m] && on[e][m] < most).collect();
            let fewest = open.iter().map(|&m| on[e][m]).min()?;
            let holders: Vec<usize> = (0..machines).filter(|&m| on[e][m] > 0).collect();
            let even = open.into_iter().filter(|&m| on[e][m] == fewest).collect();
            let m = self.zones.widest(&holders, even).into_iter().min_by(|&a, &b| {
                load[a].total_cmp(&load[b]).then(machine_held[a].cmp(&machine_held[b])).then(a.cmp(&b))
            })?;
            on[e][m] += 1;
            taken[m] += 1;
            load[m] += weight(e);
        }
        // Each machine's copies onto its own workers, then swapped among
        // them; every expert keeps its copies on the machine.
        let none = Domains(Vec::new());
        let mut layer: Vec<Vec<usize>> = vec![Vec::new(); p.experts];
        for (m, workers) in self.members.iter().enumerate() {
            let here: Vec<usize> = (0..p.experts).filter(|&e| on[e][m] > 0).collect();
            let local_count: Vec<usize> = here.iter().map(|&e| on[e][m]).collect();
            let per_copy: Vec<f64> = here.iter().map(|&e| weight(e)).collect();
            let local_quota: Vec<usize> = workers.iter().map(|&w| quota[w]).collect();
            let local_held: Vec<usize> = workers.iter().map(|&w| held[w]).collect();
            let sub = Problem { experts: here.len(), ..p.clone() };
            let placed = pack_by_load(&sub, &none, &local_count, &|i| per_copy[i], &local_quota, &local_held)?;
            let local_tokens: Vec<f64> = per_copy.iter().zip(&local_count).map(|(w, &c)| w * c as f64).collect();
            let keep = local_count.iter().copied().max().unwrap_or(1);
            let mut search = Layer::new(&local_tokens, keep, workers.len(), &none, placed);
            search.refine();
            for (i, h) in search.holders.into_iter().enumerate() {
                layer[here[i]].extend(h.into_iter().map(|local| workers[local]));
            }
        }
        Some(layer)
    }
}
