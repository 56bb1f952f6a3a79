//! `myriad worker`: serve some routed experts to routers over gRPC.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use myriad_proto::spec::ExpertSpec;
use myriad_worker::{CpuBackend, Worker};
use tokio::net::TcpListener;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free one (printed at start-up).
    #[arg(long, env = "MYRIAD_LISTEN", default_value = "127.0.0.1:7100")]
    listen: String,

    /// Model folder (the worker maps only its experts' tensors).
    #[arg(long, env = "MYRIAD_MODEL", default_value = "models/tiny-v4")]
    model: PathBuf,

    /// Experts to host: comma-separated LAYERS:EXPERTS, each `*`, `N` or `A-B`.
    /// Example: `0-3:0-15,4:7`; `*:*` hosts all.
    #[arg(long, env = "MYRIAD_EXPERTS", default_value = "*:*")]
    experts: ExpertSpec,
}

pub fn run(args: Args) -> Result<()> {
    let backend = CpuBackend::load(&args.model, &args.experts)
        .with_context(|| format!("load experts `{}` from {}", args.experts, args.model.display()))?;
    let hosted = backend.hosted_count();
    let worker = Arc::new(Worker::new(Arc::new(backend)));
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
        let addr = listener.local_addr().context("read the bound address")?;
        // Tests and scripts read this line to find an ephemeral port.
        println!("worker listening on {addr} with {hosted} experts");
        tracing::info!(%addr, hosted, "worker started");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        myriad_worker::serve(listener, worker, shutdown).await.context("serve")
    })
}
