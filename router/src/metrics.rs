//! Router metrics: `myriad_router_{name}_{unit}`, `_total` for counters.
//! Labels are bounded (no request ids, no error text).

use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

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
