//! Router metrics: `myriad_router_{name}_{unit}`, `_total` for counters.
//! Labels are bounded (no request ids, no error text).

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    // Registration only fails on duplicate names, which a static cannot have.
    let _ = REGISTRY.register(Box::new(c.clone()));
    c
}

/// Expert calls re-sent to another replica after a worker failed.
pub static DISPATCH_RETRIES: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new("myriad_router_dispatch_retries_total", "expert calls retried on another replica")
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// Expert calls sent to workers.
pub static DISPATCH_CALLS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new("myriad_router_dispatch_calls_total", "expert calls sent to workers")
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// Encoded message bytes of expert calls, by `direction` (`sent`, `received`).
pub static DISPATCH_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("myriad_router_dispatch_bytes_total", "encoded bytes of expert calls"),
            &["direction"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// Tokens routed to each expert, by `layer` and `expert` (bounded by the
/// model's shape), the load the coordinator balances.
pub static EXPERT_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("myriad_router_expert_tokens_total", "tokens routed per expert"),
            &["layer", "expert"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// Requests waiting for a place in the batch.
pub static QUEUE_DEPTH: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new("myriad_router_queue_depth", "requests waiting for a place in the batch")
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// Sequences per engine step.
pub static BATCH_SIZE: LazyLock<Histogram> = LazyLock::new(|| {
    let buckets = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    register(
        Histogram::with_opts(
            HistogramOpts::new("myriad_router_batch_size", "sequences per engine step").buckets(buckets),
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// Tokens processed, by `kind` (`prompt`, `completion`).
pub static TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(Opts::new("myriad_router_tokens_total", "tokens processed"), &["kind"])
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// HTTP requests by `endpoint` and `outcome` (`ok`, `client_error`, `server_error`, `cancelled`).
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(Opts::new("myriad_router_requests_total", "inference requests"), &["endpoint", "outcome"])
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

fn latency_buckets() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
}

/// Time from admission to the first generated token.
pub static TIME_TO_FIRST_TOKEN: LazyLock<Histogram> = LazyLock::new(|| {
    let opts = HistogramOpts::new("myriad_router_time_to_first_token_seconds", "admission to first token");
    register(
        Histogram::with_opts(opts.buckets(latency_buckets()))
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// Time between consecutive generated tokens of one request.
pub static INTER_TOKEN_LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
    let opts = HistogramOpts::new("myriad_router_inter_token_latency_seconds", "time between generated tokens");
    register(
        Histogram::with_opts(opts.buckets(latency_buckets()))
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// Expert call latency, by `outcome` (`ok`, `failed`).
pub static DISPATCH_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    let opts = HistogramOpts::new("myriad_router_dispatch_latency_seconds", "expert call latency");
    register(
        HistogramVec::new(opts.buckets(latency_buckets()), &["outcome"])
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
    )
});

/// The registry in Prometheus' text format.
pub fn render() -> String {
    let mut out = String::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode_utf8(&REGISTRY.gather(), &mut out) {
        out = format!("# encoding metrics failed: {e}\n");
    }
    out
}
