//! KV-cache metrics, `myriad_kvcache_*`, in Prometheus's default registry (so
//! a process that embeds the service, like `myriad up`, can serve them with
//! its own).

use std::sync::LazyLock;

use myriad_proto::kvcache::StatsReply;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};

fn registered<C: prometheus::core::Collector + Clone + 'static>(built: prometheus::Result<C>) -> C {
    let c = built.unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

/// Bytes held, by `tier` (`memory`, `disk`).
pub static BYTES: LazyLock<IntGaugeVec> =
    LazyLock::new(|| registered(IntGaugeVec::new(Opts::new("myriad_kvcache_bytes", "bytes of state held"), &["tier"])));
/// Capacity, by `tier`.
pub static CAPACITY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    registered(IntGaugeVec::new(Opts::new("myriad_kvcache_capacity_bytes", "capacity of each tier"), &["tier"]))
});
/// Lookups, by `result` (`hit_memory`, `hit_disk`, `miss`).
pub static LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(Opts::new("myriad_kvcache_lookups_total", "prefix lookups"), &["result"]))
});
/// Objects evicted, by `tier`.
pub static EVICTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(Opts::new("myriad_kvcache_evictions_total", "objects evicted"), &["tier"]))
});
/// Objects found corrupt and dropped.
pub static CORRUPT: LazyLock<IntGauge> =
    LazyLock::new(|| registered(IntGauge::new("myriad_kvcache_corrupt_objects", "objects found corrupt and dropped")));
/// Tokens of state served (prefill work saved).
pub static TOKENS_SERVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    registered(IntCounterVec::new(Opts::new("myriad_kvcache_tokens_served_total", "tokens of state served"), &[]))
});
/// Blocks and snapshots held, by `kind`.
pub static OBJECTS: LazyLock<IntGaugeVec> =
    LazyLock::new(|| registered(IntGaugeVec::new(Opts::new("myriad_kvcache_objects", "objects held"), &["kind"])));

/// Moves the metrics from `last` to `now` (counters by their increase).
pub fn publish(last: &StatsReply, now: &StatsReply) {
    BYTES.with_label_values(&["memory"]).set(now.memory_bytes as i64);
    BYTES.with_label_values(&["disk"]).set(now.disk_bytes as i64);
    CAPACITY.with_label_values(&["memory"]).set(now.memory_capacity as i64);
    CAPACITY.with_label_values(&["disk"]).set(now.disk_capacity as i64);
    OBJECTS.with_label_values(&["block"]).set(now.blocks as i64);
    OBJECTS.with_label_values(&["snapshot"]).set(now.snapshots as i64);
    CORRUPT.set(now.corrupt as i64);
    let inc =
        |c: &IntCounterVec, label: &[&str], a: u64, b: u64| c.with_label_values(label).inc_by(b.saturating_sub(a));
    inc(&LOOKUPS, &["hit_memory"], last.hits_memory, now.hits_memory);
    inc(&LOOKUPS, &["hit_disk"], last.hits_disk, now.hits_disk);
    inc(&LOOKUPS, &["miss"], last.misses, now.misses);
    inc(&EVICTIONS, &["memory"], last.evictions_memory, now.evictions_memory);
    inc(&EVICTIONS, &["disk"], last.evictions_disk, now.evictions_disk);
    inc(&TOKENS_SERVED, &[], last.tokens_served, now.tokens_served);
}
