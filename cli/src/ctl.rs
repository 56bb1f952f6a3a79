//! `myriad ctl`: the admin CLI. Talks to the leading coordinator's admin
//! API: given (`--coordinator`), found through etcd (`--etcd`), or the
//! running `myriad up`'s. Tables for people, `--json` for scripts. Every
//! error names the address tried, how it was found, and what went wrong.

use anyhow::{Context, Result, anyhow, bail};
use myriad_proto::admin::admin_client::AdminClient;
use myriad_proto::admin::{
    CordonRequest, DrainRequest, PlacementRequest, PlacementResponse, RebalanceRequest, StatusRequest,
    TopExpertsRequest,
};
use myriad_proto::spec::ExpertSpec;
use myriad_store::schema::{self, Leader};
use myriad_tls::ClientTls;
use serde_json::json;
use tonic::transport::Channel;

use crate::membership::ClusterArgs;
use crate::tls::TlsArgs;
use crate::up::DEFAULT_ADMIN;

#[derive(clap::Args)]
pub struct Args {
    /// The coordinator's admin address. Default: the leader found through
    /// --etcd; without it, the running `myriad up` (or 127.0.0.1:7200).
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

    #[command(flatten)]
    tls: TlsArgs,

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
        /// How many experts to list (0: every expert of every layer).
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Tokens routed to every expert of every layer, as the coordinator
    /// measures them: JSON `{"layers", "experts", "tokens": [[per expert] per
    /// layer]}`, the file `myriad plan --load` reads.
    Load,
    /// Place the experts for the measured load.
    Rebalance {
        /// Only predict: balancedness after, and the expert copies and bytes
        /// each worker would load.
        #[arg(long)]
        dry_run: bool,
        /// The most bytes of experts one worker may load (e.g. `2GiB`),
        /// beyond restoring lost copies. Default: the coordinator's --max-move.
        #[arg(long, value_parser = crate::membership::parse_bound)]
        max_move: Option<u64>,
    },
    /// Move a worker's experts away, then leave it unschedulable.
    Drain { node: String },
    /// Mark a worker unschedulable (its experts move at the next placement).
    Cordon { node: String },
    /// Make a worker schedulable again.
    Uncordon { node: String },
    /// Usage, hits and evictions of a KV-cache service; with --etcd and no
    /// --kvcache, of every instance registered in the cluster.
    Kvcache {
        /// The service's address (`myriad kvcache --listen`; default: the
        /// registered instances with --etcd, else the running `myriad up`'s).
        #[arg(long, env = "MYRIAD_KVCACHE")]
        kvcache: Option<String>,
    },
}

/// A service `ctl` talks to, for errors that say what was tried.
struct Peer {
    /// `coordinator` or `KV-cache`.
    what: &'static str,
    addr: String,
    /// How the address was found.
    source: String,
    token_given: bool,
}

/// How long `ctl` waits to connect, and for an answer.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Peer {
    /// An error for a failed call, never empty: what answered wrongly, how.
    fn error(&self, status: tonic::Status) -> anyhow::Error {
        use tonic::Code;
        let Peer { what, addr, .. } = self;
        let message = status.message().trim();
        let detail = if message.is_empty() { format!("{:?}", status.code()) } else { message.to_string() };
        let not_ours = || {
            anyhow!(
                "{addr} ({}) did not answer as a Myriad {what} API ({detail}); is it another service's port?",
                self.source
            )
        };
        match status.code() {
            Code::Unauthenticated if self.token_given => {
                anyhow!("the {what} at {addr} refused the token ({detail}); check --token or MYRIAD_ADMIN_TOKEN")
            }
            Code::Unauthenticated => {
                anyhow!("the {what} at {addr} wants a token ({detail}): give --token or set MYRIAD_ADMIN_TOKEN")
            }
            Code::DeadlineExceeded | Code::Cancelled => {
                anyhow!("the {what} at {addr} did not answer within {} s ({detail})", CALL_TIMEOUT.as_secs())
            }
            // Our services implement every call and always say why they
            // fail: a bare error comes from something else on that port.
            Code::Unimplemented => not_ours(),
            Code::Unknown | Code::Internal
                if message.is_empty()
                    || ["protocol error", "content-type", "while receiving response with status"]
                        .iter()
                        .any(|m| message.contains(m)) =>
            {
                not_ours()
            }
            _ => anyhow!("the {what} at {addr} failed the request: {detail}"),
        }
    }
}

async fn connect(args: &Args) -> Result<(AdminClient<Channel>, Peer)> {
    let (addr, source) = match (&args.coordinator, args.cluster.enabled()) {
        (Some(addr), _) => (addr.clone(), "from --coordinator".to_string()),
        (None, true) => {
            let store = args.cluster.store()?;
            let keys = args.cluster.keys()?;
            let kv = store.get(&keys.leader()).await.context("read the leader from etcd")?;
            let kv = kv.ok_or_else(|| anyhow!("cluster `{}` has no leading coordinator", args.cluster.cluster))?;
            let leader: Leader = schema::decode(&keys.leader(), &kv.value)?;
            (leader.addr, format!("the leader of cluster `{}`", args.cluster.cluster))
        }
        (None, false) => match crate::up::running() {
            Some(state) => (
                state["admin"].as_str().unwrap_or(DEFAULT_ADMIN).to_string(),
                format!("the running `myriad up`, pid {}, from {}", state["pid"], crate::up::state_path().display()),
            ),
            None => (
                DEFAULT_ADMIN.to_string(),
                "the default of `myriad up`; for another cluster give --coordinator ADDR or --etcd URLS".to_string(),
            ),
        },
    };
    let peer = Peer { what: "coordinator", addr, source, token_given: args.token.is_some() };
    Ok((AdminClient::new(channel(&peer, args.tls.client()?.as_ref()).await?), peer))
}

/// A connection to `peer`'s address (`host:port` or a URL), over TLS
/// through `tls` when set.
async fn channel(peer: &Peer, tls: Option<&ClientTls>) -> Result<Channel> {
    let Peer { what, addr, source, .. } = peer;
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .with_context(|| format!("bad {what} address `{addr}` ({source})"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    myriad_tls::connect(endpoint, tls).await.with_context(|| format!("cannot reach the {what} at {addr} ({source})"))
}

fn request<T>(args: &Args, message: T) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = &args.token {
        let value = format!("Bearer {token}").parse().context("the token is not a valid header value")?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: Args) -> Result<()> {
    if let Ctl::Kvcache { kvcache } = &args.command {
        if kvcache.is_none() && args.cluster.enabled() {
            return kvcache_instances(&args).await;
        }
        return kvcache_stats(kvcache.as_deref(), args.json, args.tls.client()?.as_ref()).await;
    }
    let (mut client, peer) = connect(&args).await?;
    match &args.command {
        Ctl::Status | Ctl::Nodes => {
            let s = client.status(request(&args, StatusRequest {})?).await.map_err(|s| peer.error(s))?.into_inner();
            if args.json {
                let nodes: Vec<_> = s.nodes.iter().map(|n| json!({"id": n.id, "role": n.role, "addr": n.addr,
                    "capacity_bytes": n.capacity_bytes, "placement_version": n.placement_version, "cordoned": n.cordoned,
                    "host": n.host, "zone": n.zone, "device": n.device, "device_memory_bytes": n.device_memory_bytes,
                    "load_failure": n.load_failure.as_ref().map(|f| json!({"placement_version": f.placement_version, "error": f.error})),
                    "stalled_version": (n.stalled_version > 0).then_some(n.stalled_version)})).collect();
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
            println!(
                "{:<24} {:<12} {:<22} {:<16} {:<18} {:>10} {:>8} STATUS",
                "NODE", "ROLE", "ADDR", "HOST/ZONE", "DEVICE", "CAPACITY", "VERSION"
            );
            for n in &s.nodes {
                let capacity = if n.capacity_bytes == 0 {
                    "-".to_string()
                } else {
                    myriad_coordinator::placement::human(n.capacity_bytes)
                };
                let version =
                    if n.placement_version == 0 { "-".to_string() } else { format!("v{}", n.placement_version) };
                // What keeps it out of placement (the reasons: `ctl status`).
                let status: Vec<String> = [
                    n.cordoned.then(|| "cordoned".to_string()),
                    n.load_failure.as_ref().map(|f| format!("load of v{} failed", f.placement_version)),
                    (n.stalled_version > 0).then(|| format!("load of v{} timed out", n.stalled_version)),
                ]
                .into_iter()
                .flatten()
                .collect();
                let device = match (n.device.as_str(), n.device_memory_bytes) {
                    ("", _) => "-".to_string(),
                    (device, 0) => device.to_string(),
                    (device, memory) => format!("{device} {}", myriad_coordinator::placement::human(memory)),
                };
                let place = match (n.host.as_str(), n.zone.as_str()) {
                    ("", "") => "-".to_string(),
                    (host, "") => host.to_string(),
                    (host, zone) => format!("{host}/{zone}"),
                };
                println!(
                    "{:<24} {:<12} {:<22} {:<16} {:<18} {:>10} {:>8} {}",
                    n.id,
                    n.role,
                    n.addr,
                    place,
                    device,
                    capacity,
                    version,
                    status.join(",")
                );
            }
        }
        Ctl::Placement => {
            let p =
                client.placement(request(&args, PlacementRequest {})?).await.map_err(|s| peer.error(s))?.into_inner();
            print_placement(&p, args.json)?;
        }
        Ctl::TopExperts { limit } => {
            let t = client
                .top_experts(request(&args, TopExpertsRequest { limit: *limit })?)
                .await
                .map_err(|s| peer.error(s))?
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
        Ctl::Load => {
            let t = client
                .top_experts(request(&args, TopExpertsRequest { limit: 0 })?)
                .await
                .map_err(|s| peer.error(s))?
                .into_inner();
            let layers = t.experts.iter().map(|e| e.layer as usize + 1).max().unwrap_or(0);
            let experts = t.experts.iter().map(|e| e.expert as usize + 1).max().unwrap_or(0);
            let mut tokens = vec![vec![0.0f64; experts]; layers];
            for e in &t.experts {
                tokens[e.layer as usize][e.expert as usize] = e.tokens;
            }
            println!("{}", json!({"layers": layers, "experts": experts, "tokens": tokens}));
        }
        Ctl::Rebalance { dry_run, max_move } => {
            let r = client
                .rebalance(request(&args, RebalanceRequest { dry_run: *dry_run, max_move_bytes: *max_move })?)
                .await
                .map_err(|s| peer.error(s))?
                .into_inner();
            if args.json {
                let workers: Vec<_> = r
                    .workers
                    .iter()
                    .map(|w| {
                        json!({"node": w.node, "copies_before": w.copies_before, "copies_after": w.copies_after,
                            "loads": w.loads, "bytes": w.bytes})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"current_balancedness": r.current_balancedness, "predicted_balancedness": r.predicted_balancedness,
                        "moves": r.moves, "bytes": r.bytes, "workers": workers, "started": r.started})
                );
                return Ok(());
            }
            use myriad_coordinator::placement::human;
            println!(
                "balancedness {:.3} -> {:.3}; {} expert copies to load ({})",
                r.current_balancedness,
                r.predicted_balancedness,
                r.moves,
                human(r.bytes)
            );
            println!("{:<24} {:>7} {:>7} {:>6} {:>10}", "WORKER", "COPIES", "AFTER", "LOADS", "BYTES");
            for w in &r.workers {
                println!(
                    "{:<24} {:>7} {:>7} {:>6} {:>10}",
                    w.node,
                    w.copies_before,
                    w.copies_after,
                    w.loads,
                    human(w.bytes)
                );
            }
            println!(
                "{}",
                match (r.started, dry_run) {
                    (true, _) => "rollout started",
                    (false, true) => "dry run: nothing changed",
                    (false, false) => "nothing worth moving: the current placement stays",
                }
            );
        }
        Ctl::Drain { node } => {
            let d = client
                .drain(request(&args, DrainRequest { node: node.clone() })?)
                .await
                .map_err(|s| peer.error(s))?
                .into_inner();
            if args.json {
                println!("{}", json!({"node": node, "placement_version": d.version}));
            } else {
                println!("{node} drained: placement v{} does not use it; it stays cordoned", d.version);
            }
        }
        Ctl::Cordon { node } | Ctl::Uncordon { node } => {
            let cordon = matches!(args.command, Ctl::Cordon { .. });
            let c = client
                .cordon(request(&args, CordonRequest { node: node.clone(), cordon })?)
                .await
                .map_err(|s| peer.error(s))?
                .into_inner();
            if args.json {
                let answer =
                    json!({"node": node, "cordoned": cordon, "changed": c.changed, "registered": c.registered});
                println!("{answer}");
            } else {
                let done = match (cordon, c.changed) {
                    (true, true) => "cordoned",
                    (true, false) => "was already cordoned",
                    (false, true) => "uncordoned",
                    (false, false) => "was not cordoned",
                };
                let unknown = if c.registered {
                    ""
                } else if cordon {
                    " (no worker of that id is registered now; one that registers will not be placed)"
                } else {
                    " (no worker of that id is registered now)"
                };
                println!("{node} {done}{unknown}");
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

/// Every KV-cache instance registered in the cluster store, a line each.
async fn kvcache_instances(args: &Args) -> Result<()> {
    use myriad_coordinator::placement::human;
    use myriad_proto::kvcache::StatsRequest;
    use myriad_proto::kvcache::kv_cache_client::KvCacheClient;

    let (store, keys) = (args.cluster.store()?, args.cluster.keys()?);
    let tls = args.tls.client()?;
    let listing =
        store.list(&keys.nodes(schema::Role::Kvcache)).await.context("list the KV-cache instances in etcd")?;
    let mut rows = Vec::new();
    for kv in listing.kvs {
        let record: schema::NodeRecord = schema::decode(&kv.key, &kv.value).context("read a KV-cache record")?;
        let peer = Peer {
            what: "KV-cache",
            addr: record.addr.clone(),
            source: format!("registered as {}", record.id),
            token_given: false,
        };
        let stats = match channel(&peer, tls.as_ref()).await {
            Ok(channel) => KvCacheClient::new(channel).stats(StatsRequest {}).await.map_err(|s| peer.error(s)),
            Err(e) => Err(e),
        };
        rows.push((record, stats.map(|s| s.into_inner())));
    }
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(r, s)| match s {
                Ok(s) => json!({"id": r.id.as_str(), "addr": r.addr, "memory_bytes": s.memory_bytes, "disk_bytes": s.disk_bytes,
                    "hits": s.hits_memory + s.hits_disk, "misses": s.misses, "snapshots": s.snapshots,
                    "tokens_served": s.tokens_served}),
                Err(e) => json!({"id": r.id.as_str(), "addr": r.addr, "error": format!("{e:#}")}),
            })
            .collect();
        println!("{}", json!({"instances": out}));
        return Ok(());
    }
    println!(
        "{:<24} {:<22} {:>10} {:>10} {:>8} {:>8} {:>10}",
        "INSTANCE", "ADDR", "MEMORY", "DISK", "HITS", "MISSES", "SNAPSHOTS"
    );
    for (r, s) in &rows {
        match s {
            Ok(s) => println!(
                "{:<24} {:<22} {:>10} {:>10} {:>8} {:>8} {:>10}",
                r.id.as_str(),
                r.addr,
                human(s.memory_bytes),
                human(s.disk_bytes),
                s.hits_memory + s.hits_disk,
                s.misses,
                s.snapshots
            ),
            Err(e) => println!("{:<24} {:<22} unreachable: {e:#}", r.id.as_str(), r.addr),
        }
    }
    if rows.is_empty() {
        println!("no KV-cache instance is registered (run `myriad kvcache --etcd ...`)");
    }
    Ok(())
}

async fn kvcache_stats(addr: Option<&str>, json: bool, tls: Option<&ClientTls>) -> Result<()> {
    use myriad_coordinator::placement::human;
    use myriad_proto::kvcache::StatsRequest;
    use myriad_proto::kvcache::kv_cache_client::KvCacheClient;

    let recorded = crate::up::running();
    let peer = match (addr, recorded.as_ref().and_then(|s| s["kvcache"].as_str())) {
        (Some(addr), _) => {
            Peer { what: "KV-cache", addr: addr.into(), source: "from --kvcache".into(), token_given: false }
        }
        (None, Some(addr)) => Peer {
            what: "KV-cache",
            addr: addr.into(),
            source: format!("the running `myriad up`, from {}", crate::up::state_path().display()),
            token_given: false,
        },
        (None, None) => bail!("give --kvcache ADDR: no running `myriad up` recorded a KV-cache"),
    };
    let s = KvCacheClient::new(channel(&peer, tls).await?)
        .stats(StatsRequest {})
        .await
        .map_err(|s| peer.error(s))?
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
