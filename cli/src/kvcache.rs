//! `myriad kvcache`: the KV-cache service (sequence state by token prefix),
//! in memory over an optional disk directory that survives restarts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use myriad_kvcache::{Cache, KvCacheService};
use tokio::net::TcpListener;

use myriad_store::Store;
use myriad_store::lease::Registration;
use myriad_store::schema::{self, NodeRecord, Role};

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
    runtime.block_on(async move {
        // Before the banner: a SIGTERM right after it must find the handler.
        let shutdown = crate::shutdown::signal();
        let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
        let bound = listener.local_addr().context("read the bound address")?;
        args.metrics.start(None).await?;
        let tls = args.tls.server()?;
        let stats = service.stats();
        // Tests and scripts read this line to find an ephemeral port.
        println!("kvcache listening on {bound} ({} snapshots, {} bytes on disk)", stats.snapshots, stats.disk_bytes);
        if !args.cluster.enabled() {
            return myriad_kvcache::serve(listener, service, tls, shutdown).await.context("serve");
        }
        // Registers once the store answers; on SIGTERM, unregisters first,
        // so routers stop sending it conversations before it goes.
        let presence = Presence::of(&args, &bound.to_string())?;
        let registered = tokio::spawn(async move {
            myriad_store::retry::until_joined("register the KV-cache instance", || {
                Registration::start(presence.store.clone(), presence.key.clone(), presence.record.clone(), presence.ttl)
            })
            .await
        });
        let leave = async move {
            shutdown.await;
            registered.abort();
            if let Ok(registration) = registered.await {
                registration.close().await;
            }
        };
        myriad_kvcache::serve(listener, service, tls, leave).await.context("serve")
    })
}

/// This instance's registration: the store, its key, the record and the
/// lease TTL.
struct Presence {
    store: Arc<dyn Store>,
    key: String,
    record: Vec<u8>,
    ttl: Duration,
}

impl Presence {
    fn of(args: &Args, bound: &str) -> Result<Self> {
        let id = args.cluster.node_id(Role::Kvcache)?;
        let record = NodeRecord {
            id: id.clone(),
            role: Role::Kvcache,
            addr: args.advertise_addr.clone().unwrap_or_else(|| bound.to_string()),
            // One instance serves every model: its keys name the model.
            model_id: String::new(),
            capacity_bytes: Some(args.cache.memory),
            placement_version: None,
            dispatch: None,
            host: hostname(),
            zone: None,
        };
        let (store, keys) = (args.cluster.store()?, args.cluster.keys()?);
        let (key, ttl) = (keys.node(Role::Kvcache, &id), *args.cluster.lease_ttl);
        Ok(Presence { store, key, record: schema::encode(&record), ttl })
    }
}

/// Starts the service in this process on a free loopback port; returns its address.
pub async fn start_local(cache: &CacheArgs) -> Result<String> {
    let service = KvCacheService::new(cache.open()?);
    let listener = TcpListener::bind("127.0.0.1:0").await.context("listen for the KV-cache")?;
    let addr = listener.local_addr().context("read the bound address")?.to_string();
    tokio::spawn(async move {
        if let Err(e) = myriad_kvcache::serve(listener, service, None, std::future::pending()).await {
            tracing::error!(error = %e, "the in-process KV-cache stopped");
        }
    });
    Ok(addr)
}
