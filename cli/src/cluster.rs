//! The in-process expert cluster of `myriad generate --workers N`: N worker
//! servers on loopback ports, reached over real gRPC, with a balanced
//! placement. (The coordinator takes placement over in a later milestone.)

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use myriad_proto::spec::ExpertSpec;
use myriad_worker::{CpuBackend, Worker};
use tokio::net::TcpListener;

/// Expert `e` of layer `l` goes to worker `(l·E + e) mod N` and, with
/// `replicas = R`, to the `R − 1` workers after it.
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

/// Starts `workers` servers on the current runtime; returns their addresses.
pub async fn start(
    model: &Path,
    layers: usize,
    experts: usize,
    workers: usize,
    replicas: usize,
) -> Result<Vec<String>> {
    if workers == 0 || replicas == 0 || replicas > workers {
        bail!("--replicas must be between 1 and --workers ({workers}), got {replicas}");
    }
    let mut addrs = Vec::with_capacity(workers);
    for (i, spec) in balanced(layers, experts, workers, replicas).into_iter().enumerate() {
        let backend = CpuBackend::load(model, &spec).with_context(|| format!("load worker {i}'s experts"))?;
        let worker = Arc::new(Worker::new(Arc::new(backend)));
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind a loopback port")?;
        addrs.push(listener.local_addr().context("read the bound address")?.to_string());
        tokio::spawn(async move {
            if let Err(e) = myriad_worker::serve(listener, worker, std::future::pending()).await {
                tracing::error!(worker = i, error = %e, "in-process worker stopped");
            }
        });
    }
    Ok(addrs)
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
