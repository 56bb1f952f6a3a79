//! Logs to stderr and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, traces to an OpenTelemetry
//! collector over OTLP/gRPC.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Spans exported by default: requests, and the engine steps linked to them.
const DEFAULT_TRACE_FILTER: &str = "info,myriad_router::engine=debug";

/// Flushes and stops the trace exporter when dropped (at exit).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The exporter's gRPC channel lives on this runtime.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing traces failed: {e}");
        }
    }
}

fn endpoint() -> Option<String> {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|e| !e.is_empty()))
}

/// The roles that run until stopped: they log their lifecycle (effective
/// config, placement decisions, workers lost and revived) by default.
const SERVERS: [&str; 5] = ["coordinator", "worker", "router", "kvcache", "up"];

/// Installs the global subscriber. `RUST_LOG` sets what is logged (default
/// `info` for the server roles, `warn` for one-shot commands);
/// `MYRIAD_TRACE_FILTER` what is exported (default: requests and engine
/// steps).
pub fn init(service: &str) -> Result<Telemetry> {
    let default = if SERVERS.contains(&service) { "info" } else { "warn" };
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)));
    let Some(endpoint) = endpoint() else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None, _runtime: None });
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp")
        .enable_all()
        .build()
        .context("start the trace exporter's runtime")?;
    // tonic needs the runtime to build its channel.
    let _entered = runtime.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .with_context(|| format!("set up OTLP export to {endpoint}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(format!("myriad-{service}")).build())
        .build();
    let filter = std::env::var("MYRIAD_TRACE_FILTER").unwrap_or_else(|_| DEFAULT_TRACE_FILTER.into());
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("myriad"))
        .with_filter(EnvFilter::try_new(&filter).with_context(|| format!("parse MYRIAD_TRACE_FILTER `{filter}`"))?);
    tracing_subscriber::registry().with(logs).with(traces).init();
    tracing::info!(endpoint, "exporting traces over OTLP");
    Ok(Telemetry { provider: Some(provider), _runtime: Some(runtime) })
}
