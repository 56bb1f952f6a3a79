//! `myriad coordinator`: campaigns for leadership of a cluster on etcd and,
//! while leading, places the model's experts on its workers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use myriad_coordinator::CoordinatorConfig;
use myriad_coordinator::node::{AdminApi, Node};
use myriad_store::schema::Role;

use crate::membership::{ClusterArgs, parse_bound};
use crate::metrics_http::MetricsArgs;
use crate::plan::model_expert_bytes;
use crate::tls::TlsArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder: the coordinator reads its config and shard index.
    #[arg(long, env = "MYRIAD_MODEL", default_value = "models/tiny-v4")]
    model: PathBuf,

    /// How many workers host each expert (capped by the live workers).
    #[arg(long, env = "MYRIAD_REPLICAS", default_value_t = 1)]
    replicas: usize,

    /// Extra copies per layer for the hottest experts.
    #[arg(long, env = "MYRIAD_REDUNDANT", default_value_t = 0)]
    redundant: usize,

    /// The most bytes of experts one worker may load in a rebalance (e.g.
    /// `20GiB`), beyond restoring copies lost with departed workers.
    /// Default: no bound.
    #[arg(long, env = "MYRIAD_MAX_MOVE", value_parser = parse_bound)]
    max_move: Option<u64>,

    /// Balancedness (0 to 1) a rebalance leaves unclaimed in each layer to
    /// move fewer experts: a layer within this of what a fresh plan reaches
    /// stays as it is.
    #[arg(long, env = "MYRIAD_MOVE_TOLERANCE", default_value_t = 0.01)]
    move_tolerance: f64,

    /// Balance each layer across nodes (workers' --node) first, then across
    /// the workers of each node: EPLB's hierarchical step, for clusters
    /// where traffic inside a node is cheaper than between nodes.
    #[arg(long, env = "MYRIAD_HIERARCHICAL")]
    hierarchical: bool,

    /// Live workers needed before the first placement.
    #[arg(long, env = "MYRIAD_MIN_WORKERS", default_value_t = 1)]
    min_workers: usize,

    /// Membership must stay unchanged this long before a new placement
    /// (a burst of joins, as in a rolling update, makes one version).
    #[arg(long, env = "MYRIAD_SETTLE", default_value = "2s")]
    settle: humantime::Duration,

    /// The pause when workers only left: their experts need a new home at
    /// once, and a worker stopped with SIGTERM serves until it has one.
    #[arg(long, env = "MYRIAD_SETTLE_DEPARTURES", default_value = "250ms")]
    settle_departures: humantime::Duration,

    /// Longest wait for workers to load a new placement before abandoning it.
    #[arg(long, env = "MYRIAD_ROLLOUT_TIMEOUT", default_value = "5m")]
    rollout_timeout: humantime::Duration,

    /// How often the leader collects the workers' per-expert load.
    #[arg(long, env = "MYRIAD_LOAD_INTERVAL", default_value = "10s")]
    load_interval: humantime::Duration,

    /// Where the admin API (`myriad ctl`) listens; port 0 picks a free one.
    #[arg(long, env = "MYRIAD_ADMIN_LISTEN", default_value = "127.0.0.1:7200")]
    admin_listen: String,

    /// Admin address published for `myriad ctl` discovery (default: the bound one).
    #[arg(long, env = "MYRIAD_ADMIN_ADVERTISE")]
    admin_advertise: Option<String>,

    /// Token `myriad ctl` must present; none means no authentication.
    #[arg(long, env = "MYRIAD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,

    #[command(flatten)]
    cluster: ClusterArgs,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(args: Args) -> Result<()> {
    if !args.cluster.enabled() {
        bail!("a coordinator needs a cluster store: give --etcd");
    }
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.move_tolerance) {
        bail!("--move-tolerance must be between 0 and 1, got {}", args.move_tolerance);
    }
    let shape = myriad_worker::backend::model_shape(&args.model)
        .with_context(|| format!("read the model in {}", args.model.display()))?;
    // Workers hold experts as the checkpoint stores them.
    let expert_bytes = model_expert_bytes(&args.model)?;
    let id = args.cluster.node_id(Role::Coordinator)?;
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&args.admin_listen))
        .with_context(|| format!("listen on {}", args.admin_listen))?;
    let bound = listener.local_addr().context("read the bound address")?.to_string();
    // On the runtime: TLS files are watched from a task of it.
    let _runtime = runtime.enter();
    let (server_tls, client_tls) = (args.tls.server()?, args.tls.client()?);
    let config = CoordinatorConfig {
        id: id.clone(),
        addr: args.admin_advertise.clone().unwrap_or_else(|| bound.clone()),
        model_id: shape.model_id,
        layers: shape.num_layers,
        experts: shape.num_experts,
        expert_bytes,
        replicas: args.replicas,
        redundant: args.redundant,
        max_move: args.max_move,
        move_tolerance: args.move_tolerance,
        hierarchical: args.hierarchical,
        min_workers: args.min_workers,
        settle: *args.settle,
        settle_departures: *args.settle_departures,
        lease_ttl: *args.cluster.lease_ttl,
        rollout_timeout: *args.rollout_timeout,
        load_interval: *args.load_interval,
        tls: client_tls,
    };
    runtime.block_on(async move {
        // Before the banner: a SIGTERM right after it must find the handler.
        let shutdown = crate::shutdown::signal();
        args.metrics.start(None).await?;
        let (store, keys) = (args.cluster.store()?, args.cluster.keys()?);
        let admin = AdminApi { listener, token: args.admin_token.clone(), tls: server_tls };
        println!("coordinator {id} of cluster {} campaigning; admin API on {bound}", args.cluster.cluster);
        tracing::info!(%id, replicas = args.replicas, min_workers = args.min_workers, "coordinator started");
        Node { store, keys, config, admin: Some(admin) }.run(shutdown).await;
        anyhow::Ok(())
    })?;
    // Give the resignation a moment to reach etcd before the process ends.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}
