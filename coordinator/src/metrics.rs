//! Coordinator metrics, `myriad_coordinator_*`, in Prometheus' default
//! registry (served by `myriad coordinator --metrics-listen`).

use std::sync::LazyLock;

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

fn registered<C: prometheus::core::Collector + Clone + 'static>(built: prometheus::Result<C>) -> C {
    let c = built.unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

/// 1 while this coordinator leads.
pub static LEADING: LazyLock<IntGauge> =
    LazyLock::new(|| registered(IntGauge::new("myriad_coordinator_leading", "1 while this coordinator leads")));
/// The current placement version this leader made current (0: none).
pub static PLACEMENT_VERSION: LazyLock<IntGauge> = LazyLock::new(|| {
    registered(IntGauge::new("myriad_coordinator_placement_version", "placement version made current"))
});
/// Rollouts, by `outcome` (`current`, `abandoned`).
pub static ROLLOUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(Opts::new("myriad_coordinator_rollouts_total", "placement rollouts"), &["outcome"]))
});
/// Workers placement leaves out because a rollout timed out on them
/// (see [`myriad_store::schema::Stalled`]); 0 on coordinators that do not lead.
pub static STALLED_WORKERS: LazyLock<IntGauge> = LazyLock::new(|| {
    registered(IntGauge::new(
        "myriad_coordinator_stalled_workers",
        "workers left out of placement because a rollout timed out on them",
    ))
});
/// Plans that kept the current placement: nothing was worth moving.
pub static PLANS_KEPT: LazyLock<IntCounter> = LazyLock::new(|| {
    registered(IntCounter::new("myriad_coordinator_plans_kept_total", "plans that kept the current placement"))
});
/// Seconds from proposing a version to making it current.
pub static ROLLOUT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    let buckets = vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
    registered(Histogram::with_opts(
        HistogramOpts::new("myriad_coordinator_rollout_seconds", "time for workers to load a placement")
            .buckets(buckets),
    ))
});
/// Balancedness (mean / most loaded worker) of the placement the leader
/// last decided on (rolled out or kept), on the measured load; what-if
/// plans (`ctl rebalance --dry-run`, `ctl drain`'s check) leave it alone.
pub static BALANCEDNESS: LazyLock<Gauge> = LazyLock::new(|| {
    registered(Gauge::new(
        "myriad_coordinator_balancedness",
        "balancedness of the placement the leader last decided on",
    ))
});
