//! `myriad kvcache`: the KV-cache service (sequence state by token prefix),
//! in memory over an optional disk directory that survives restarts.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use myriad_kvcache::node::Presence;
use myriad_kvcache::{Cache, KvCacheService, Node};
use tokio::net::TcpListener;

use myriad_store::schema::{NodeRecord, Role};

use crate::membership::{ClusterArgs, hostname, parse_bytes};
use crate::metrics_http::MetricsArgs;
use crate::tls::TlsArgs;

/// Sizes of the cache's tiers, shared by `kvcache` and `up`.
#[derive(clap::Args, Clone)]
pub struct CacheArgs {
    /// Memory for sequence state (e.g. `8GiB`).
    #[arg(long = "memory", env = "MYRIAD_KVCACHE_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub memory: u64,

    /// Directory of the disk tier (kept across restarts); none keeps state in memory only.
    #[arg(long = "disk", env = "MYRIAD_KVCACHE_DISK")]
    pub disk: Option<PathBuf>,

    /// Most bytes the disk tier holds (e.g. `100GiB`).
    #[arg(long = "disk-capacity", env = "MYRIAD_KVCACHE_DISK_CAPACITY", default_value = "10GiB", value_parser = parse_bytes)]
    pub disk_capacity: u64,
}

impl CacheArgs {
    pub fn open(&self) -> Result<Cache> {
        if self.memory == 0 {
            bail!("--memory must be more than 0 bytes");
        }
        match &self.disk {
            None => Ok(Cache::in_memory(self.memory as usize)),
            Some(dir) => Cache::with_disk(self.memory as usize, dir, self.disk_capacity as usize)
                .with_context(|| format!("open the disk tier in {}", dir.display())),
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free one (printed at start-up).
    #[arg(long, env = "MYRIAD_LISTEN", default_value = "127.0.0.1:7300")]
    listen: String,

    /// Address routers reach this instance at (default: the bound address),
    /// registered in the cluster store with --etcd.
    #[arg(long, env = "MYRIAD_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,

    #[command(flatten)]
    cache: CacheArgs,

    /// With --etcd, the instance registers under a lease, and routers
    /// started with --kvcache-from-store spread conversations over every
    /// registered instance.
    #[command(flatten)]
    cluster: ClusterArgs,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(args: Args) -> Result<()> {
    let service = KvCacheService::new(args.cache.open()?);
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    crate::shutdown::run(runtime, async move {
        // Before the banner: a SIGTERM right after it must find the handler.
        let shutdown = crate::shutdown::signal();
        let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
        let bound = listener.local_addr().context("read the bound address")?;
        args.metrics.start(None).await?;
        let tls = args.tls.server()?;
        let presence = if args.cluster.enabled() { Some(presence(&args, &bound.to_string())?) } else { None };
        let stats = service.stats();
        // Tests and scripts read this line to find an ephemeral port.
        println!("kvcache listening on {bound} ({} snapshots, {} bytes on disk)", stats.snapshots, stats.disk_bytes);
        Node { listener, tls, service, presence }.run(shutdown).await.context("serve")
    })
}

/// This instance's registration, from its flags.
fn presence(args: &Args, bound: &str) -> Result<Presence> {
    let addr = args.advertise_addr.clone().unwrap_or_else(|| bound.to_string());
    // One instance serves every model (its keys name the model): no model id.
    let record = NodeRecord {
        capacity_bytes: Some(args.cache.memory),
        host: hostname(),
        ..NodeRecord::new(args.cluster.node_id(Role::Kvcache)?, Role::Kvcache, addr, "")
    };
    Ok(Presence {
        store: args.cluster.store()?,
        keys: args.cluster.keys()?,
        record,
        lease_ttl: *args.cluster.lease_ttl,
    })
}

/// Starts the service in this process on a free loopback port; returns its address.
pub async fn start_local(cache: &CacheArgs) -> Result<String> {
    let service = KvCacheService::new(cache.open()?);
    let listener = TcpListener::bind("127.0.0.1:0").await.context("listen for the KV-cache")?;
    let addr = listener.local_addr().context("read the bound address")?.to_string();
    tokio::spawn(async move {
        let node = Node { listener, tls: None, service, presence: None };
        if let Err(e) = node.run(std::future::pending()).await {
            tracing::error!(error = %e, "the in-process KV-cache stopped");
        }
    });
    Ok(addr)
}
