//! Router metrics: `myriad_router_{name}_{unit}`, `_total` for counters.
//! Labels are bounded (no request ids, no error text).

use std::sync::LazyLock;

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// Registers a metric built from a static definition. Building fails only on
/// malformed names or labels and registering only on duplicates; neither can
/// come from input, so both are programming errors.
fn register<C: Collector + Clone + 'static>(built: prometheus::Result<C>) -> C {
    let c = built.unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
    let _ = REGISTRY.register(Box::new(c.clone()));
    c
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels))
}

fn histogram_vec(name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
    register(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels))
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)))
}

fn latency_buckets() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
}

/// Expert calls re-sent to another replica after a worker failed.
pub static DISPATCH_RETRIES: LazyLock<IntCounter> =
    LazyLock::new(|| counter("myriad_router_dispatch_retries_total", "expert calls retried on another replica"));

/// Workers marked down that a probe put back into service.
pub static WORKER_REVIVALS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter("myriad_router_worker_revivals_total", "workers marked down that answered a probe and were used again")
});

/// Expert calls sent to workers.
pub static DISPATCH_CALLS: LazyLock<IntCounter> =
    LazyLock::new(|| counter("myriad_router_dispatch_calls_total", "expert calls sent to workers"));

/// Encoded message bytes of expert calls, by `direction` (`sent`, `received`).
pub static DISPATCH_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec("myriad_router_dispatch_bytes_total", "encoded bytes of expert calls", &["direction"])
});

/// Expert call latency, by `outcome` (`ok`, `failed`).
pub static DISPATCH_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec("myriad_router_dispatch_latency_seconds", "expert call latency", latency_buckets(), &["outcome"])
});

/// Tokens routed to each expert, by `layer` and `expert` (bounded by the
/// model's shape): the load the coordinator balances.
pub static EXPERT_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec("myriad_router_expert_tokens_total", "tokens routed per expert", &["layer", "expert"])
});

/// Requests waiting for a place in the batch.
pub static QUEUE_DEPTH: LazyLock<IntGauge> =
    LazyLock::new(|| register(IntGauge::new("myriad_router_queue_depth", "requests waiting for a place in the batch")));

/// Sequences per engine step.
pub static BATCH_SIZE: LazyLock<Histogram> = LazyLock::new(|| {
    let buckets = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    histogram("myriad_router_batch_size", "sequences per engine step", buckets)
});

/// Tokens, by `kind`: `prompt` (prefilled here), `prompt_cached` (restored
/// from the KV-cache instead), `completion`.
pub static TOKENS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter_vec("myriad_router_tokens_total", "tokens processed", &["kind"]));

/// HTTP requests by `endpoint` and `outcome` (`ok`, `client_error`, `server_error`, `cancelled`).
pub static REQUESTS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter_vec("myriad_router_requests_total", "inference requests", &["endpoint", "outcome"]));

/// Time from admission to the first generated token.
pub static TIME_TO_FIRST_TOKEN: LazyLock<Histogram> = LazyLock::new(|| {
    histogram("myriad_router_time_to_first_token_seconds", "admission to first token", latency_buckets())
});

/// Time between consecutive generated tokens of one request.
pub static INTER_TOKEN_LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
    histogram("myriad_router_inter_token_latency_seconds", "time between generated tokens", latency_buckets())
});

/// KV-cache lookups, by `result` (`hit`, `miss`, `error`).
pub static KVCACHE_LOOKUPS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter_vec("myriad_router_kvcache_lookups_total", "KV-cache prefix lookups", &["result"]));

/// States sent to the KV-cache, by `result` (`ok`, `error`, `dropped`).
pub static KVCACHE_SAVES: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter_vec("myriad_router_kvcache_saves_total", "states stored in the KV-cache", &["result"]));

/// State bytes moved, by `direction` (`stored`, `restored`).
pub static KVCACHE_BYTES: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter_vec("myriad_router_kvcache_bytes_total", "state bytes moved", &["direction"]));

/// 1 while every routed expert has a live copy in the pool dispatched with
/// (routers in a cluster).
pub static SERVING: LazyLock<IntGauge> =
    LazyLock::new(|| register(IntGauge::new("myriad_router_serving", "1 while every routed expert has a live copy")));

/// Workers of that pool marked down after a failed call.
pub static WORKERS_DOWN: LazyLock<IntGauge> =
    LazyLock::new(|| register(IntGauge::new("myriad_router_workers_down", "workers marked down")));

/// The registry in Prometheus' text format, followed by Prometheus' default
/// registry: components embedded in this process (the KV-cache in `myriad
/// up`) register there.
pub fn render() -> String {
    let mut out = String::new();
    let mut families = REGISTRY.gather();
    families.extend(prometheus::gather());
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        out = format!("# encoding metrics failed: {e}\n");
    }
    out
}
