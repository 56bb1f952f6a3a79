//! `myriad up`: the whole cluster in one process (coordinator with its
//! admin API, expert workers, KV-cache, router with the OpenAI API), and how
//! `myriad ctl` finds it without flags: `myriad up` records its addresses
//! in a small state file (`$MYRIAD_UP_STATE`, default
//! `$TMPDIR/myriad-up.json`) while it runs and removes it when it stops;
//! `ctl` reads it, and falls back to the default admin address.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use myriad_router::node::Node;
use myriad_worker::Device;

use crate::cluster::{Admin, FIRST_PLACEMENT, LocalCluster};
use crate::kvcache::CacheArgs;
use crate::membership::parse_bytes;
use crate::serve::{HttpArgs, UP_MAX_MODEL_LEN, UpAddresses, fixed_caches, serve};

/// The admin address `myriad up` takes when given none, and where `myriad
/// ctl` looks when nothing else says where to.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7200";

#[derive(clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    http: HttpArgs,

    /// Expert workers to start in this process (reached over loopback gRPC).
    #[arg(long, env = "MYRIAD_WORKERS", default_value_t = 2)]
    workers: usize,

    /// How many workers host each expert.
    #[arg(long, env = "MYRIAD_REPLICAS", default_value_t = 1)]
    replicas: usize,

    /// Where the workers compute their experts: `cpu`, or `cuda` / `cuda:N`
    /// (a build with the `cuda` feature on a machine with an NVIDIA GPU).
    #[arg(long, env = "MYRIAD_DEVICE", default_value = "cpu")]
    device: Device,

    /// Run without the in-process KV-cache (every prompt is computed in full).
    #[arg(long)]
    no_kvcache: bool,

    /// Memory of the in-process KV-cache.
    #[arg(long, env = "MYRIAD_KVCACHE_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    kvcache_memory: u64,

    /// Disk directory of the in-process KV-cache (none: memory only).
    #[arg(long, env = "MYRIAD_KVCACHE_DISK")]
    kvcache_disk: Option<PathBuf>,

    /// Capacity of that directory.
    #[arg(long, env = "MYRIAD_KVCACHE_DISK_CAPACITY", default_value = "10GiB", value_parser = parse_bytes)]
    kvcache_disk_capacity: u64,

    /// Where the coordinator's admin API (`myriad ctl`) listens. Default:
    /// 127.0.0.1:7200, or a free port when another process holds that one;
    /// port 0 picks a free one. The banner says which.
    #[arg(long, env = "MYRIAD_ADMIN_LISTEN")]
    admin_listen: Option<String>,

    /// Token `myriad ctl` must present; none means no authentication.
    #[arg(long, env = "MYRIAD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

pub fn up(mut args: UpArgs) -> Result<()> {
    args.http.max_model_len.get_or_insert(UP_MAX_MODEL_LEN);
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    crate::shutdown::run(runtime, async move {
        // Before anything slow: a SIGTERM during start-up must find the handler.
        let shutdown = crate::shutdown::signal();
        let listener = bind_admin(args.admin_listen.as_deref()).await?;
        let admin = Admin { listener, token: args.admin_token.clone() };
        let cluster =
            LocalCluster::start(&args.http.model, args.workers, args.replicas, args.device, Some(admin)).await?;
        let kvcache = if args.no_kvcache {
            None
        } else {
            let cache = CacheArgs {
                memory: args.kvcache_memory,
                disk: args.kvcache_disk.clone(),
                disk_capacity: args.kvcache_disk_capacity,
            };
            Some(crate::kvcache::start_local(&cache).await?)
        };
        let what = format!(
            "coordinator, {} expert workers{} in this process",
            args.workers,
            if kvcache.is_some() { " and a KV-cache" } else { "" }
        );
        let caches = fixed_caches(kvcache.as_slice(), 1);
        let node = Node::start(args.http.config(cluster.router("router-0")?, caches, None))
            .await
            .map_err(anyhow::Error::msg)?;
        // Serve only once the first placement is loaded.
        node.wait_serving(FIRST_PLACEMENT).await.map_err(anyhow::Error::msg)?;
        let addresses = cluster.admin.clone().map(|admin| UpAddresses { admin, kvcache });
        serve(node, &args.http, &what, addresses, shutdown).await
    })
}

/// The admin API's listener: the address given, or [`DEFAULT_ADMIN`] and,
/// when another process holds it, a free loopback port.
async fn bind_admin(given: Option<&str>) -> Result<TcpListener> {
    if let Some(addr) = given {
        return TcpListener::bind(addr).await.with_context(|| format!("listen for the admin API on {addr}"));
    }
    match TcpListener::bind(DEFAULT_ADMIN).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::info!(addr = DEFAULT_ADMIN, "the default admin address is taken; using a free port");
            TcpListener::bind("127.0.0.1:0").await.context("listen for the admin API on a free loopback port")
        }
        Err(e) => Err(e).with_context(|| format!("listen for the admin API on {DEFAULT_ADMIN}")),
    }
}

/// Where `myriad up` records its addresses for `myriad ctl`.
pub fn state_path() -> PathBuf {
    std::env::var_os("MYRIAD_UP_STATE").map_or_else(|| std::env::temp_dir().join("myriad-up.json"), PathBuf::from)
}

/// The state file of a running `myriad up`, removed when dropped (if it
/// still is this process's: a later `myriad up` may have replaced it).
pub struct StateFile(PathBuf);

impl StateFile {
    pub fn write(admin: &str, api: &str, kvcache: Option<&str>) -> Option<StateFile> {
        let path = state_path();
        let state = json!({"pid": std::process::id(), "admin": admin, "api": api, "kvcache": kvcache});
        match std::fs::write(&path, format!("{state:#}\n")) {
            Ok(()) => Some(StateFile(path)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the addresses for myriad ctl");
                None
            }
        }
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let ours = read_state(&self.0).is_some_and(|s| s["pid"].as_u64() == Some(u64::from(std::process::id())));
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn read_state(path: &std::path::Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// What a running `myriad up` recorded, if one is running: its state
/// file's contents, ignored when the process that wrote it is gone.
pub fn running() -> Option<Value> {
    let state = read_state(&state_path())?;
    let pid = state["pid"].as_u64()?;
    std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(state)
}
