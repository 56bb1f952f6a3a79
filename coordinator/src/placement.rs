//! Which worker hosts which routed experts.

use myriad_proto::spec::ExpertSpec;

/// Expert `e` of layer `l` goes to worker `(l·E + e) mod N` and, with
/// `replicas = R`, to the `R − 1` workers after it: every worker hosts
/// within one expert of the same number, and replicas are distinct.
pub fn balanced(layers: usize, experts: usize, workers: usize, replicas: usize) -> Vec<ExpertSpec> {
    (0..workers)
        .map(|w| {
            ExpertSpec::from_pairs(
                (0..layers)
                    .flat_map(|l| (0..experts).map(move |e| (l, e)))
                    .filter(|&(l, e)| {
                        let primary = (l * experts + e) % workers;
                        (0..replicas).any(|r| (primary + r) % workers == w)
                    })
                    .map(|(l, e)| (l as u32, e as u32)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_expert_gets_its_replicas_on_distinct_workers() {
        for (workers, replicas) in [(1, 1), (3, 1), (3, 2), (5, 3), (4, 4)] {
            let specs = balanced(4, 16, workers, replicas);
            for l in 0..4 {
                for e in 0..16 {
                    let holders = specs.iter().filter(|s| s.contains(l, e)).count();
                    assert_eq!(holders, replicas, "{workers} workers, {replicas} replicas: ({l}, {e})");
                }
            }
            let loads: Vec<usize> =
                specs.iter().map(|s| (0..4).map(|l| (0..16).filter(|&e| s.contains(l, e)).count()).sum()).collect();
            assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1, "{loads:?}");
        }
    }
}
