//! Worker metrics, `myriad_worker_*`, in Prometheus' default registry
//! (served by `myriad worker --metrics-listen`).

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

fn registered<C: prometheus::core::Collector + Clone + 'static>(built: prometheus::Result<C>) -> C {
    let c = built.unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

/// Expert batches run, by `result` (`ok`, `error`).
pub static BATCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(Opts::new("myriad_worker_batches_total", "expert batches run"), &["result"]))
});
/// Seconds one batch's experts take to compute.
pub static BATCH_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    let buckets = vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0];
    registered(Histogram::with_opts(
        HistogramOpts::new("myriad_worker_batch_seconds", "compute time of a batch").buckets(buckets),
    ))
});
/// Token × expert pairs computed.
pub static PAIRS: LazyLock<IntCounter> =
    LazyLock::new(|| registered(IntCounter::new("myriad_worker_pairs_total", "token-expert pairs computed")));
/// The newest placement version loaded (0: none).
pub static PLACEMENT_VERSION: LazyLock<IntGauge> =
    LazyLock::new(|| registered(IntGauge::new("myriad_worker_placement_version", "newest placement version loaded")));
/// 1 while the worker serves the current placement (its readiness).
pub static READY: LazyLock<IntGauge> =
    LazyLock::new(|| registered(IntGauge::new("myriad_worker_ready", "1 while serving the current placement")));
/// Bytes the newest loaded version's experts hold on the worker's device.
pub static EXPERT_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    registered(IntGauge::new("myriad_worker_expert_bytes", "bytes the newest version's experts hold on the device"))
});
/// The memory of the worker's GPU in bytes (0 on the CPU).
pub static DEVICE_MEMORY_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    registered(IntGauge::new("myriad_worker_device_memory_bytes", "memory of the worker's GPU (0: the CPU)"))
});
/// Failed attempts to load experts: a placement's, or a retry of them.
pub static LOAD_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    registered(IntCounter::new("myriad_worker_load_failures_total", "failed attempts to load experts"))
});
/// 1 while the worker reports experts it cannot load: placement leaves it out.
pub static LOAD_FAILED: LazyLock<IntGauge> = LazyLock::new(|| {
    registered(IntGauge::new("myriad_worker_load_failed", "1 while placement leaves the worker out for a failed load"))
});
