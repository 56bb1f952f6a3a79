//! `myriad ctl`: the admin CLI. Talks to the leading coordinator's admin
//! API, found through etcd (`--etcd`) or given (`--coordinator`). Tables for
//! people, `--json` for scripts.

use anyhow::{Context, Result, anyhow, bail};
use myriad_proto::admin::admin_client::AdminClient;
use myriad_proto::admin::{
    CordonRequest, DrainRequest, PlacementRequest, PlacementResponse, RebalanceRequest, StatusRequest,
    TopExpertsRequest,
};
use myriad_proto::spec::ExpertSpec;
use myriad_store::schema::{self, Leader};
use serde_json::json;
use tonic::transport::Channel;

use crate::membership::ClusterArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The coordinator's admin address (default: the leader, found through --etcd).
    #[arg(long, env = "MYRIAD_COORDINATOR")]
    coordinator: Option<String>,

    /// The admin token, when the coordinators require one.
    #[arg(long, env = "MYRIAD_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,

    #[command(flatten)]
    cluster: ClusterArgs,

    #[command(subcommand)]
    command: Ctl,
}

#[derive(clap::Subcommand)]
enum Ctl {
    /// Leader, placement version, health and nodes.
    Status,
    /// Every registered node.
    Nodes,
    /// The current placement per worker, and a load heat map (workers × layers).
    Placement,
    /// The hottest experts and how balanced the workers are.
    TopExperts {
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Place the experts for the measured load.
    Rebalance {
        /// Only predict: balancedness after, and how many expert copies would move.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move a worker's experts away, then leave it unschedulable.
    Drain { node: String },
    /// Mark a worker unschedulable (its experts move at the next placement).
    Cordon { node: String },
    /// Make a worker schedulable again.
    Uncordon { node: String },
    /// Usage, hits and evictions of a KV-cache service.
    Kvcache {
        /// The service's address (`myriad kvcache --listen`).
        #[arg(long, env = "MYRIAD_KVCACHE")]
        kvcache: String,
    },
}

async fn connect(args: &Args) -> Result<AdminClient<Channel>> {
    let addr = match (&args.coordinator, args.cluster.enabled()) {
        (Some(addr), _) => addr.clone(),
        (None, true) => {
            let store = args.cluster.store()?;
            let keys = args.cluster.keys()?;
            let kv = store.get(&keys.leader()).await.context("read the leader from etcd")?;
            let kv = kv.ok_or_else(|| anyhow!("cluster `{}` has no leading coordinator", args.cluster.cluster))?;
            let leader: Leader = schema::decode(&keys.leader(), &kv.value)?;
            leader.addr
        }
        (None, false) => bail!("give --coordinator ADDR or --etcd URLS"),
    };
    Ok(AdminClient::new(channel(&addr, "coordinator").await?))
}

/// A connection to `addr` (`host:port` or a URL) of the `what` service.
async fn channel(addr: &str, what: &str) -> Result<Channel> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    tonic::transport::Endpoint::from_shared(url)
        .with_context(|| format!("bad {what} address `{addr}`"))?
        .connect()
        .await
        .with_context(|| format!("connect to the {what} at {addr}"))
}

fn request<T>(args: &Args, message: T) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = &args.token {
        let value = format!("Bearer {token}").parse().context("the token is not a valid header value")?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

fn call_error(status: tonic::Status) -> anyhow::Error {
    anyhow!("{}", status.message())
}

pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: Args) -> Result<()> {
    if let Ctl::Kvcache { kvcache } = &args.command {
        return kvcache_stats(kvcache, args.json).await;
    }
    let mut client = connect(&args).await?;
    match &args.command {
        Ctl::Status | Ctl::Nodes => {
            let s = client.status(request(&args, StatusRequest {})?).await.map_err(call_error)?.into_inner();
            if args.json {
                let nodes: Vec<_> = s.nodes.iter().map(|n| json!({"id": n.id, "role": n.role, "addr": n.addr,
                    "capacity_bytes": n.capacity_bytes, "placement_version": n.placement_version, "cordoned": n.cordoned})).collect();
                let out = json!({"leader": s.leader, "placement_version": s.placement_version, "problems": s.problems, "nodes": nodes});
                println!("{out}");
                return Ok(());
            }
            if matches!(args.command, Ctl::Status) {
                println!("leader:     {}", s.leader);
                println!("placement:  v{}", s.placement_version);
                if s.problems.is_empty() {
                    println!("health:     ok\n");
                } else {
                    println!("health:     {} problem(s)", s.problems.len());
                    for p in &s.problems {
                        println!("  - {p}");
                    }
                    println!();
                }
            }
            println!("{:<24} {:<12} {:<22} {:>10} {:>8} CORDONED", "NODE", "ROLE", "ADDR", "CAPACITY", "VERSION");
            for n in &s.nodes {
                let capacity = if n.capacity_bytes == 0 {
                    "-".to_string()
                } else {
                    myriad_coordinator::placement::human(n.capacity_bytes)
                };
                let version =
                    if n.placement_version == 0 { "-".to_string() } else { format!("v{}", n.placement_version) };
                let cordoned = if n.cordoned { "yes" } else { "" };
                println!("{:<24} {:<12} {:<22} {:>10} {:>8} {cordoned}", n.id, n.role, n.addr, capacity, version);
            }
        }
        Ctl::Placement => {
            let p = client.placement(request(&args, PlacementRequest {})?).await.map_err(call_error)?.into_inner();
            print_placement(&p, args.json)?;
        }
        Ctl::TopExperts { limit } => {
            let t = client
                .top_experts(request(&args, TopExpertsRequest { limit: *limit })?)
                .await
                .map_err(call_error)?
                .into_inner();
            if args.json {
                let experts: Vec<_> = t
                    .experts
                    .iter()
                    .map(|e| {
                        json!({"layer": e.layer, "expert": e.expert,
                    "tokens": e.tokens, "replicas": e.replicas})
                    })
                    .collect();
                let workers: Vec<_> = t.workers.iter().map(|w| json!({"node": w.node, "tokens": w.tokens})).collect();
                println!("{}", json!({"experts": experts, "workers": workers, "balancedness": t.balancedness}));
                return Ok(());
            }
            println!("{:>5} {:>6} {:>12} {:>8}", "LAYER", "EXPERT", "TOKENS", "REPLICAS");
            for e in &t.experts {
                println!("{:>5} {:>6} {:>12.1} {:>8}", e.layer, e.expert, e.tokens, e.replicas);
            }
            println!("\n{:<24} {:>12}", "WORKER", "TOKENS");
            for w in &t.workers {
                println!("{:<24} {:>12.1}", w.node, w.tokens);
            }
            println!("\nbalancedness (mean/max load per worker): {:.3}", t.balancedness);
        }
        Ctl::Rebalance { dry_run } => {
            let r = client
                .rebalance(request(&args, RebalanceRequest { dry_run: *dry_run })?)
                .await
                .map_err(call_error)?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    json!({"current_balancedness": r.current_balancedness, "predicted_balancedness": r.predicted_balancedness,
                        "moves": r.moves, "started": r.started})
                );
                return Ok(());
            }
            println!(
                "balancedness {:.3} -> {:.3}; {} expert copies to load",
                r.current_balancedness, r.predicted_balancedness, r.moves
            );
            println!("{}", if r.started { "rollout started" } else { "dry run: nothing changed" });
        }
        Ctl::Drain { node } => {
            let d = client
                .drain(request(&args, DrainRequest { node: node.clone() })?)
                .await
                .map_err(call_error)?
                .into_inner();
            if args.json {
                println!("{}", json!({"node": node, "placement_version": d.version}));
            } else {
                println!("{node} drained: placement v{} does not use it; it stays cordoned", d.version);
            }
        }
        Ctl::Cordon { node } | Ctl::Uncordon { node } => {
            let cordon = matches!(args.command, Ctl::Cordon { .. });
            client.cordon(request(&args, CordonRequest { node: node.clone(), cordon })?).await.map_err(call_error)?;
            if args.json {
                println!("{}", json!({"node": node, "cordoned": cordon}));
            } else {
                println!("{node} {}", if cordon { "cordoned" } else { "uncordoned" });
            }
        }
        Ctl::Kvcache { .. } => unreachable!("answered before connecting to a coordinator"),
    }
    Ok(())
}

/// Per worker: its experts; then a heat map of each worker's share of each
/// layer's load (experts hosted when no load was reported yet).
fn print_placement(p: &PlacementResponse, json_out: bool) -> Result<()> {
    let specs: Vec<ExpertSpec> =
        p.assignments.iter().map(|a| a.experts.parse().map_err(|e: String| anyhow!(e))).collect::<Result<_>>()?;
    let (layers, experts) = (p.layers as usize, p.experts as usize);
    let weight = |l: usize, e: usize| if p.load.len() == layers * experts { p.load[l * experts + e] } else { 1.0 };
    // heat[w][l]: worker w's share of layer l, each expert's load split over its copies.
    let mut heat = vec![vec![0.0f64; layers]; specs.len()];
    for (l, e) in (0..layers).flat_map(|l| (0..experts).map(move |e| (l, e))) {
        let holders: Vec<usize> = (0..specs.len()).filter(|&w| specs[w].contains(l as u32, e as u32)).collect();
        for &w in &holders {
            heat[w][l] += weight(l, e) / holders.len() as f64;
        }
    }
    if json_out {
        let workers: Vec<_> = p
            .assignments
            .iter()
            .zip(&heat)
            .map(|(a, h)| {
                json!({"node": a.node, "addr": a.addr,
            "experts": a.experts, "layer_load": h})
            })
            .collect();
        println!("{}", json!({"version": p.version, "layers": p.layers, "experts": p.experts, "workers": workers}));
        return Ok(());
    }
    println!("placement v{}: {layers} layers x {experts} experts\n", p.version);
    println!("{:<24} {:>7}  EXPERTS (LAYERS:EXPERTS)", "WORKER", "COPIES");
    for (a, spec) in p.assignments.iter().zip(&specs) {
        let copies =
            (0..layers).map(|l| (0..experts).filter(|&e| spec.contains(l as u32, e as u32)).count()).sum::<usize>();
        println!("{:<24} {copies:>7}  {}", a.node, a.experts);
    }
    let what = if p.load.is_empty() { "experts hosted" } else { "load" };
    println!("\nheat map: each worker's share of each layer's {what} (columns are layers)");
    const SHADES: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = heat.iter().flatten().copied().fold(0.0, f64::max);
    for (a, row) in p.assignments.iter().zip(&heat) {
        let cells: String =
            row.iter().map(|&v| SHADES[if max > 0.0 { (v / max * 8.0).round() as usize } else { 0 }]).collect();
        println!("{:<24} |{cells}|", a.node);
    }
    Ok(())
}

async fn kvcache_stats(addr: &str, json: bool) -> Result<()> {
    use myriad_coordinator::placement::human;
    use myriad_proto::kvcache::StatsRequest;
    use myriad_proto::kvcache::kv_cache_client::KvCacheClient;

    let s = KvCacheClient::new(channel(addr, "KV-cache").await?)
        .stats(StatsRequest {})
        .await
        .map_err(call_error)?
        .into_inner();
    if json {
        let out = json!({
            "memory": {"bytes": s.memory_bytes, "capacity": s.memory_capacity, "hits": s.hits_memory, "evictions": s.evictions_memory},
            "disk": {"bytes": s.disk_bytes, "capacity": s.disk_capacity, "hits": s.hits_disk, "evictions": s.evictions_disk},
            "misses": s.misses, "blocks": s.blocks, "snapshots": s.snapshots, "corrupt": s.corrupt,
            "tokens_served": s.tokens_served,
        });
        println!("{out}");
        return Ok(());
    }
    let lookups = s.hits_memory + s.hits_disk + s.misses;
    let rate = if lookups == 0 { 0.0 } else { 100.0 * (s.hits_memory + s.hits_disk) as f64 / lookups as f64 };
    println!("{:<8} {:>10} {:>10} {:>6} {:>8} {:>10}", "TIER", "USED", "CAPACITY", "USE%", "HITS", "EVICTIONS");
    let pct = |used: u64, cap: u64| if cap == 0 { 0.0 } else { 100.0 * used as f64 / cap as f64 };
    let tiers = [
        ("memory", s.memory_bytes, s.memory_capacity, s.hits_memory, s.evictions_memory),
        ("disk", s.disk_bytes, s.disk_capacity, s.hits_disk, s.evictions_disk),
    ];
    for (name, used, cap, hits, evictions) in tiers {
        if cap == 0 {
            println!("{name:<8} {:>10}", "off");
            continue;
        }
        println!("{name:<8} {:>10} {:>10} {:>5.1}% {hits:>8} {evictions:>10}", human(used), human(cap), pct(used, cap));
    }
    println!();
    println!("lookups:        {lookups} ({rate:.1}% hit, {} miss)", s.misses);
    println!("tokens served:  {}", s.tokens_served);
    println!("objects:        {} blocks, {} snapshots", s.blocks, s.snapshots);
    println!("corrupt:        {}", s.corrupt);
    Ok(())
}
