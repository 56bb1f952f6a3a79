//! `myriad worker`: serve routed experts to routers over gRPC, either a
//! fixed set (`--experts`) or whatever the cluster's placement assigns it
//! (`--etcd`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use myriad_proto::spec::ExpertSpec;
use myriad_store::schema::{NodeRecord, Role};
use myriad_worker::membership::Membership;
use myriad_worker::{Device, Node, Worker};
use tokio::net::TcpListener;

use crate::membership::{ClusterArgs, hostname, parse_bytes, require_one};
use crate::metrics_http::MetricsArgs;
use crate::tls::TlsArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free one (printed at start-up).
    #[arg(long, env = "MYRIAD_LISTEN", default_value = "127.0.0.1:7100")]
    listen: String,

    /// Address routers reach this worker at (default: the bound address).
    #[arg(long, env = "MYRIAD_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,

    /// Model folder (the worker maps only its experts' tensors).
    #[arg(long, env = "MYRIAD_MODEL", default_value = "models/tiny-v4")]
    model: PathBuf,

    /// Experts to host without a cluster: comma-separated LAYERS:EXPERTS,
    /// each `*`, `N` or `A-B`. Example: `0-3:0-15,4:7`; `*:*` hosts all.
    #[arg(long, env = "MYRIAD_EXPERTS")]
    experts: Option<ExpertSpec>,

    /// The machine it runs on, published for placement: copies of one
    /// expert go to workers on different machines where there are enough.
    /// Default: the hostname (the chart passes the Kubernetes node name).
    #[arg(long, env = "MYRIAD_NODE")]
    node: Option<String>,

    /// Its failure zone (a rack, a cloud zone): copies spread over zones
    /// before machines.
    #[arg(long, env = "MYRIAD_ZONE")]
    zone: Option<String>,

    /// On SIGTERM, how long a worker in a cluster keeps serving while its
    /// experts move to others (it leaves the cluster at once and stops as
    /// soon as no placement names it).
    #[arg(long, env = "MYRIAD_DRAIN_TIMEOUT", default_value = "20s")]
    drain_timeout: humantime::Duration,

    /// Where it computes its experts: `cpu`, or `cuda` / `cuda:N` (a build
    /// with the `cuda` feature on a machine with an NVIDIA GPU).
    #[arg(long, env = "MYRIAD_DEVICE", default_value = "cpu")]
    device: Device,

    /// Memory for experts, published for placement (e.g. `24GiB`). Default:
    /// no bound on the CPU, 90% of the GPU's memory with `--device cuda`.
    #[arg(long, env = "MYRIAD_CAPACITY", value_parser = parse_bytes)]
    capacity: Option<u64>,

    /// After its experts fail to load (the weights unreadable, the GPU out
    /// of memory), how long a worker in a cluster waits before trying them
    /// again; the wait doubles with each failure, up to 5 minutes. Placement
    /// leaves it out until they load.
    #[arg(long, env = "MYRIAD_LOAD_RETRY", default_value = "10s")]
    load_retry: humantime::Duration,

    #[command(flatten)]
    cluster: ClusterArgs,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(args: Args) -> Result<()> {
    require_one(args.experts.is_some(), &args.cluster, "--experts")?;
    // Zero would retry a failing load in a tight loop.
    anyhow::ensure!(!args.load_retry.is_zero(), "--load-retry must be above zero (e.g. 10s)");
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    crate::shutdown::run(runtime, async move {
        // Before the banner: a SIGTERM right after it must find the handler.
        let shutdown = crate::shutdown::signal();
        let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
        let bound = listener.local_addr().context("read the bound address")?.to_string();
        let tls = args.tls.server()?;
        let device = args.device;
        device.check().with_context(|| format!("--device {device}"))?;
        let (worker, membership) = match &args.experts {
            Some(spec) => {
                let backend = device
                    .load(&args.model, spec, &[])
                    .with_context(|| format!("load experts `{spec}` from {}", args.model.display()))?;
                // Tests and scripts read this line to find an ephemeral port.
                println!(
                    "worker listening on {bound} with {} experts ({} as stored) on {device}",
                    backend.hosted().experts.len(),
                    myriad_coordinator::placement::human(backend.bytes() as u64)
                );
                // Routers name it by this address.
                (Arc::new(Worker::new(&bound, backend)?), None)
            }
            None => {
                let shape = myriad_worker::backend::model_shape(&args.model)
                    .with_context(|| format!("read the model in {}", args.model.display()))?;
                let id = args.cluster.node_id(Role::Worker)?;
                let addr = args.advertise_addr.clone().unwrap_or_else(|| bound.clone());
                let worker = Worker::idle(id.as_str(), shape.clone(), device)?;
                let record = NodeRecord {
                    host: args.node.clone().or_else(hostname),
                    zone: args.zone.clone(),
                    ..NodeRecord::new(id.clone(), Role::Worker, addr, &shape.model_id)
                };
                let record = myriad_worker::membership::describe(record, &worker, args.capacity);
                let membership = Membership {
                    store: args.cluster.store()?,
                    keys: args.cluster.keys()?,
                    record,
                    model: args.model.clone(),
                    device,
                    lease_ttl: *args.cluster.lease_ttl,
                    load_retry: *args.load_retry,
                };
                println!("worker listening on {bound} as node {id} of cluster {}", args.cluster.cluster);
                (Arc::new(worker), Some(membership))
            }
        };
        args.metrics.start(Some(worker.readiness())).await?;
        tracing::info!(addr = %bound, "worker started");
        let node = Node { listener, tls, worker, membership, drain_timeout: *args.drain_timeout };
        node.run(shutdown).await.context("serve")
    })
}
