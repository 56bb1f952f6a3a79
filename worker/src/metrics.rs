//! Worker metrics, `myriad_worker_*`, in Prometheus' default registry
//! (served by `myriad worker --metrics-listen`). Every series carries the
//! `worker` label, the worker's node id (a static `--experts` worker: its
//! listen address), so that the workers `myriad up` runs in one process
//! export one series each.

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

fn registered<C: prometheus::core::Collector + Clone + 'static>(built: prometheus::Result<C>) -> C {
    let c = built.unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

fn gauge(name: &str, help: &str) -> IntGaugeVec {
    registered(IntGaugeVec::new(Opts::new(name, help), &["worker"]))
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(IntCounterVec::new(Opts::new(name, help), labels))
}

static BATCHES: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("myriad_worker_batches_total", "expert batches run", &["worker", "result"]));
static BATCH_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0];
    let opts = HistogramOpts::new("myriad_worker_batch_seconds", "compute time of a batch").buckets(buckets);
    registered(HistogramVec::new(opts, &["worker"]))
});
static PAIRS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("myriad_worker_pairs_total", "token-expert pairs computed", &["worker"]));
static PLACEMENT_VERSION: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("myriad_worker_placement_version", "newest placement version loaded"));
static READY: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("myriad_worker_ready", "1 while serving the current placement"));
static EXPERT_BYTES: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("myriad_worker_expert_bytes", "bytes the newest version's experts hold on the device"));
static DEVICE_MEMORY_BYTES: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("myriad_worker_device_memory_bytes", "memory of the worker's GPU (0: the CPU)"));
static LOAD_FAILURES: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("myriad_worker_load_failures_total", "failed attempts to load experts", &["worker"]));
static EXPERTS_LOADED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let help = "experts placement loads took from the checkpoint, or shared from experts already loaded";
    counter("myriad_worker_experts_loaded_total", help, &["worker", "source"])
});
static LOAD_FAILED: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("myriad_worker_load_failed", "1 while placement leaves the worker out for a failed load"));

/// One worker's series, each exported from the start (at zero).
pub struct Metrics {
    /// Expert batches run that succeeded, and that failed.
    pub batches_ok: IntCounter,
    pub batches_failed: IntCounter,
    /// Seconds one batch's experts take to compute.
    pub batch_seconds: Histogram,
    /// Token × expert pairs computed.
    pub pairs: IntCounter,
    /// The newest placement version loaded (0: none).
    pub placement_version: IntGauge,
    /// 1 while the worker serves the current placement (its readiness).
    pub ready: IntGauge,
    /// Bytes the newest loaded version's experts hold on the worker's device.
    pub expert_bytes: IntGauge,
    /// The memory of the worker's GPU in bytes (0 on the CPU).
    pub device_memory_bytes: IntGauge,
    /// Failed attempts to load experts: a placement's, or a retry of them.
    pub load_failures: IntCounter,
    /// 1 while the worker reports experts it cannot load: placement leaves it out.
    pub load_failed: IntGauge,
    /// Experts successful loads read from the checkpoint, and those they
    /// shared from experts the worker already held (no read).
    pub experts_read: IntCounter,
    pub experts_shared: IntCounter,
}

impl Metrics {
    /// The series labelled `worker`.
    pub fn new(worker: &str) -> Self {
        let one = [worker];
        Metrics {
            batches_ok: BATCHES.with_label_values(&[worker, "ok"]),
            batches_failed: BATCHES.with_label_values(&[worker, "error"]),
            batch_seconds: BATCH_SECONDS.with_label_values(&one),
            pairs: PAIRS.with_label_values(&one),
            placement_version: PLACEMENT_VERSION.with_label_values(&one),
            ready: READY.with_label_values(&one),
            expert_bytes: EXPERT_BYTES.with_label_values(&one),
            device_memory_bytes: DEVICE_MEMORY_BYTES.with_label_values(&one),
            load_failures: LOAD_FAILURES.with_label_values(&one),
            load_failed: LOAD_FAILED.with_label_values(&one),
            experts_read: EXPERTS_LOADED.with_label_values(&[worker, "checkpoint"]),
            experts_shared: EXPERTS_LOADED.with_label_values(&[worker, "shared"]),
        }
    }
}
