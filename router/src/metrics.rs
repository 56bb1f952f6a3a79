//! Router metrics: `myriad_router_{name}_{unit}`, `_total` for counters.
//! Labels are bounded (no request ids, no error text).

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
