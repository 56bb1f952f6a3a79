//! `--metrics-listen`: the process's metrics as Prometheus text on `GET
//! /metrics`, for the roles whose own port speaks gRPC (worker,
//! coordinator, KV-cache) and for routers whose API port faces clients;
//! and `GET /ready`, for probes that cannot ask
//! the gRPC health service (the kubelet's gRPC probe speaks no TLS).

use anyhow::{Context, Result};
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(clap::Args)]
pub struct MetricsArgs {
    /// Where to serve Prometheus metrics on `/metrics` (e.g. `0.0.0.0:9400`);
    /// none: not served.
    #[arg(long, env = "MYRIAD_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

impl MetricsArgs {
    /// Whether a metrics port is asked for.
    pub fn enabled(&self) -> bool {
        self.metrics_listen.is_some()
    }

    /// Starts the endpoint, when one is asked for; `/ready` follows
    /// `ready` (none: ready while the process runs).
    pub async fn start(&self, ready: Option<watch::Receiver<bool>>) -> Result<()> {
        if let Some(addr) = &self.metrics_listen {
            serve(addr, ready).await?;
        }
        Ok(())
    }
}

/// Starts serving on `addr`; returns the bound address.
async fn serve(addr: &str, ready: Option<watch::Receiver<bool>>) -> Result<String> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("listen for metrics on {addr}"))?;
    let bound = listener.local_addr().context("read the metrics address")?.to_string();
    let readiness = move || {
        let ready = ready.as_ref().is_none_or(|r| *r.borrow());
        async move { if ready { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") } }
    };
    let app = Router::new()
        .route("/metrics", get(|| async { myriad_router::metrics::render() }))
        .route("/ready", get(readiness));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "metrics on /metrics");
    Ok(bound)
}
