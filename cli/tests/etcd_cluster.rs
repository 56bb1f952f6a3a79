//! The control plane as separate processes on a real etcd: two
//! coordinators, three workers with two replicas per expert, one router.
//! Workers and the leading coordinator are SIGKILLed and etcd is stopped
//! and restarted; every answer must equal the fault-free one.

use std::time::{Duration, Instant};

use myriad_store::Store;
use myriad_store::etcd_server::EtcdServer;
use myriad_store::mirror::Mirror;
use myriad_store::schema::{self, Keys, PlacementView, Role};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

mod common;
use common::{Proc, health, leader, until};

const TTL: &str = "2s";

/// Where node `id` serves its metrics: a port of its own (so tests that
/// run at once need distinct node ids).
fn metrics_addr(id: &str) -> String {
    use std::sync::{LazyLock, Mutex};
    static PORTS: LazyLock<Mutex<Vec<(String, u16)>>> = LazyLock::new(|| Mutex::new(Vec::new()));
    let mut ports = PORTS.lock().unwrap();
    let port = match ports.iter().find(|(i, _)| i == id) {
        Some(&(_, p)) => p,
        None => {
            let p = common::free_port();
            ports.push((id.to_string(), p));
            p
        }
    };
    format!("127.0.0.1:{port}")
}

fn coordinator(etcd: &str, id: &str) -> Proc {
    coordinator_with(etcd, id, &["--replicas", "2", "--min-workers", "3", "--settle", "300ms"])
}

/// A coordinator with an admin API and metrics, placing by `placing`.
fn coordinator_with(etcd: &str, id: &str, placing: &[&str]) -> Proc {
    let args = ["coordinator", "--etcd", etcd, "--cluster", "t", "--node-id", id, "--lease-ttl", TTL];
    let admin = ["--admin-listen", "127.0.0.1:0", "--admin-token", "secret", "--load-interval", "300ms"];
    let metrics = ["--metrics-listen", &metrics_addr(id)];
    Proc::start(&[&args[..], placing, &admin[..], &metrics].concat())
}

/// Router `id` once ready, and its API's base URL.
async fn router(etcd: &str, id: &str) -> (Proc, String) {
    let args = ["router", "--etcd", etcd, "--cluster", "t", "--node-id", id, "--lease-ttl", TTL];
    let router = Proc::start(&[&args[..], &["--listen", "127.0.0.1:0"]].concat());
    let base = router.word(3);
    let ready = format!("{}/ready", base.trim_end_matches("/v1"));
    until("router ready", Duration::from_secs(60), async || {
        let r = reqwest::get(&ready).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    (router, base)
}

/// A worker on machine `host(id)`, which `ctl status` reports.
fn worker(etcd: &str, id: &str) -> Proc {
    worker_with(etcd, id, &[])
}

/// [`worker`] with more flags.
fn worker_with(etcd: &str, id: &str, more: &[&str]) -> Proc {
    let args = ["worker", "--etcd", etcd, "--cluster", "t", "--node-id", id, "--lease-ttl", TTL];
    let metrics = ["--metrics-listen", &metrics_addr(id)];
    Proc::start(&[&args[..], &["--listen", "127.0.0.1:0", "--node", host(id)], &metrics, more].concat())
}

/// A sample's value from node `id`'s /metrics (`None`: not there).
async fn metric(id: &str, sample: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", metrics_addr(id))).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

/// Each node's `load_failure` in `ctl status --json`.
fn load_failures(etcd: &str) -> std::collections::BTreeMap<String, Value> {
    let nodes = ctl_json(etcd, &["status"])["nodes"].as_array().cloned().unwrap_or_default();
    nodes.into_iter().map(|n| (n["id"].as_str().unwrap_or_default().to_string(), n["load_failure"].clone())).collect()
}

fn tiny() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")
}

/// A copy of the tiny model that a test may break.
fn model_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in std::fs::read_dir(tiny()).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, dir.path().join(file.file_name().unwrap())).unwrap();
    }
    dir
}

/// Replaces the file at `path` by a FIFO: opening it blocks, as on a
/// volume that hangs.
fn hang(path: &std::path::Path) {
    std::fs::remove_file(path).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(path).status().unwrap().success());
}

/// A `myriad_worker_*` sample of worker `id`: its series carry its id.
async fn worker_metric(id: &str, name: &str) -> Option<f64> {
    metric(id, &format!("{name}{{worker=\"{id}\"}}")).await
}

fn host(worker: &str) -> &'static str {
    if worker == "w1" || worker == "w2" { "m1" } else { "m2" }
}

const PROMPT: &str =
    r#""prompt": "The expert-parallel cluster", "max_tokens": 160, "temperature": 0, "ignore_eos": true"#;

async fn complete(base: &str) -> String {
    common::complete(base, PROMPT).await.unwrap_or_else(|e| panic!("{e}"))
}

async fn stream(base: &str, during: impl FnOnce()) -> String {
    common::stream(base, PROMPT, 4, during).await
}

/// Every placement version in `etcd` now.
async fn current_view(etcd: &EtcdServer) -> PlacementView {
    let keys = Keys::new("t");
    let listing = etcd.store().list(&keys.placements()).await.unwrap();
    PlacementView::read(&keys, &std::sync::Arc::new(listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect()))
}

/// The cluster's current placement as it stands in `etcd`, followed.
async fn current_placement(etcd: &EtcdServer) -> impl Fn() -> Option<schema::Placement> {
    let keys = Keys::new("t");
    let placements = Mirror::follow(std::sync::Arc::new(etcd.store()), keys.placements()).await.unwrap();
    move || PlacementView::read(&keys, &placements.snapshot()).current().cloned()
}

fn ctl(etcd: &str, args: &[&str]) -> Result<String, String> {
    common::ctl(etcd, "t", args)
}

fn ctl_json(etcd: &str, args: &[&str]) -> Value {
    common::ctl_json(etcd, "t", args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_of_workers_coordinators_and_etcd_cost_no_request() {
    let mut etcd = EtcdServer::start().await;
    let e = etcd.endpoint.clone();
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(etcd.store());
    let keys = Keys::new("t");
    let mut coordinators = [coordinator(&e, "c1"), coordinator(&e, "c2")];
    let mut workers: Vec<Proc> = ["w1", "w2", "w3"].iter().map(|id| worker(&e, id)).collect();
    let (_router, base) = router(&e, "r1").await;
    let expected = complete(&base).await;
    assert!(!expected.is_empty());
    // Each worker serves the current placement, so its gRPC health (the
    // chart's readiness probe) says SERVING.
    for w in &workers {
        let addr = w.word(3);
        until("a placed worker reports SERVING", Duration::from_secs(30), async || {
            (health(&addr).await == Some(ServingStatus::Serving as i32)).then_some(())
        })
        .await;
    }

    let placements = Mirror::follow(store.clone(), keys.placements()).await.unwrap();
    let routers = Mirror::follow(store.clone(), keys.nodes(Role::Router)).await.unwrap();
    let first = PlacementView::read(&keys, &placements.snapshot()).current.expect("a current placement");

    // SIGKILL a worker in the middle of a streamed answer.
    let mut killed_at = None;
    let text = stream(&base, || {
        workers[1].kill();
        killed_at = Some(Instant::now());
    })
    .await;
    assert_eq!(text, expected, "a worker killed mid-stream changed the answer");
    let killed_at = killed_at.unwrap();
    let second = until("a placement without w2 served by the router", Duration::from_secs(30), async || {
        let view = PlacementView::read(&keys, &placements.snapshot());
        let p = view.current()?;
        let served = schema::read_nodes(&routers.snapshot()).iter().any(|r| r.placement_version == Some(p.version));
        (p.version > first && p.assignment(&"w2".parse().unwrap()).is_none() && served).then_some(p.version)
    })
    .await;
    eprintln!("SIGKILL of a worker -> router serving the new placement: {:?} (lease TTL {TTL})", killed_at.elapsed());
    assert_eq!(complete(&base).await, expected, "after re-placement on two workers");

    // SIGKILL the leading coordinator: the other leads within the TTL and
    // still rolls out a placement change (a new worker joins).
    let index = if leader(&*store, &keys).await.expect("a leader") == "c1" { 0 } else { 1 };
    let killed_at = Instant::now();
    coordinators[index].kill();
    let other = if index == 0 { "c2" } else { "c1" };
    until("the other coordinator leads", Duration::from_secs(15), async || {
        (leader(&*store, &keys).await? == other).then_some(())
    })
    .await;
    eprintln!("SIGKILL of the leading coordinator -> the other leads: {:?}", killed_at.elapsed());
    workers.push(worker(&e, "w4"));
    until("a placement with w4, from the new leader", Duration::from_secs(30), async || {
        let view = PlacementView::read(&keys, &placements.snapshot());
        let p = view.current()?;
        (p.version > second && p.assignment(&"w4".parse().unwrap()).is_some()).then_some(())
    })
    .await;
    assert_eq!(complete(&base).await, expected, "after the new leader's placement");

    // etcd goes away: serving goes on with the placement in hand.
    etcd.kill();
    assert_eq!(complete(&base).await, expected, "while etcd is down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(complete(&base).await, expected, "longer than a lease TTL without etcd");
    etcd.restart().await;
    until("nodes registered again", Duration::from_secs(30), async || {
        let workers = store.list(&keys.nodes(Role::Worker)).await.ok()?;
        let routers = store.list(&keys.nodes(Role::Router)).await.ok()?;
        (workers.kvs.len() == 3 && routers.kvs.len() == 1).then_some(())
    })
    .await;
    assert_eq!(complete(&base).await, expected, "after etcd came back");

    // The admin CLI, through the leader found in etcd.
    assert!(ctl(&e, &["--token", "wrong", "status"]).unwrap_err().contains("admin token"));
    let status = until("a healthy status", Duration::from_secs(30), async || {
        let out = ctl(&e, &["--token", "secret", "--json", "status"]).ok()?;
        let s: Value = serde_json::from_str(&out).ok()?;
        s["problems"].as_array().is_some_and(|p| p.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(status["leader"], other);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 4, "{status}");
    let w4 = status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "w4").expect("w4 listed");
    assert_eq!(w4["host"], "m2", "{status}");
    assert_eq!(w4["device"], "cpu", "{status}");
    let top = until("load reports", Duration::from_secs(30), async || {
        let t = ctl_json(&e, &["top-experts", "--limit", "3"]);
        (t["experts"][0]["tokens"].as_f64().unwrap_or(0.0) > 0.0).then_some(t)
    })
    .await;
    let balance = top["balancedness"].as_f64().unwrap();
    // Workers and the leader serve their own metrics.
    assert!(metric("w1", "myriad_worker_batches_total{result=\"ok\",worker=\"w1\"}").await.unwrap() > 0.0);
    assert!(worker_metric("w1", "myriad_worker_pairs_total").await.unwrap() > 0.0);
    assert!(worker_metric("w1", "myriad_worker_expert_bytes").await.unwrap() > 0.0);
    assert_eq!(worker_metric("w1", "myriad_worker_device_memory_bytes").await, Some(0.0));
    assert_eq!(worker_metric("w1", "myriad_worker_ready").await, Some(1.0));
    assert_eq!(metric(other, "myriad_coordinator_leading").await, Some(1.0));
    assert!(metric(other, "myriad_coordinator_rollouts_total{outcome=\"current\"}").await.unwrap() >= 1.0);
    let version = metric(other, "myriad_coordinator_placement_version").await.unwrap();
    assert_eq!(worker_metric("w1", "myriad_worker_placement_version").await, Some(version));
    let router_metrics =
        reqwest::get(format!("{}/metrics", base.trim_end_matches("/v1"))).await.unwrap().text().await.unwrap();
    assert!(router_metrics.lines().any(|l| l == "myriad_router_serving 1"), "{router_metrics}");
    assert!(balance > 0.0 && balance <= 1.0, "{top}");
    let dry = ctl_json(&e, &["rebalance", "--dry-run"]);
    assert_eq!(dry["started"], false, "{dry}");
    // Every live worker, what it would load, adding up to the totals.
    let moves = dry["workers"].as_array().unwrap();
    assert_eq!(moves.len(), 3, "{dry}");
    let sum = |key: &str| moves.iter().map(|w| w[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("loads"), sum("bytes")), (dry["moves"].as_u64().unwrap(), dry["bytes"].as_u64().unwrap()));
    // No copy is missing, so a bound of zero moves nothing.
    let bounded = ctl_json(&e, &["rebalance", "--dry-run", "--max-move", "0"]);
    assert_eq!(bounded["moves"], 0, "{bounded}");
    let table = ctl(&e, &["--token", "secret", "placement"]).unwrap();
    assert!(table.contains("heat map") && table.contains("w4"), "{table}");

    let drained = ctl_json(&e, &["drain", "w4"]);
    let version = drained["placement_version"].as_u64().unwrap();
    let placement = ctl_json(&e, &["placement"]);
    assert!(placement["version"].as_u64().unwrap() >= version);
    assert!(!placement["workers"].as_array().unwrap().iter().any(|w| w["node"] == "w4"), "{placement}");
    assert_eq!(complete(&base).await, expected, "after draining w4");
    ctl_json(&e, &["uncordon", "w4"]);
    until("w4 placed again after uncordon", Duration::from_secs(30), async || {
        let p = ctl_json(&e, &["placement"]);
        p["workers"].as_array().unwrap().iter().any(|w| w["node"] == "w4").then_some(())
    })
    .await;
}

/// With a move bound of zero, a worker that joins loads nothing: the
/// leader decides that once, keeps the placement (no replanning every
/// settle), `ctl status` shows the idle worker, and a rebalance with a
/// bound gives it experts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_the_move_bound_leaves_idle_waits_for_a_rebalance() {
    let etcd = EtcdServer::start().await;
    let e = etcd.endpoint.clone();
    let bounded = ["--max-move", "0", "--min-workers", "2", "--settle", "100ms", "--replicas", "2"];
    let _coordinator = coordinator_with(&e, "k1", &bounded);
    let mut workers: Vec<Proc> = ["x1", "x2"].iter().map(|id| worker(&e, id)).collect();
    let current = current_placement(&etcd).await;
    let first = until("a placement of x1 and x2", Duration::from_secs(30), async || {
        current().filter(|p| p.assignments.len() == 2)
    })
    .await;
    workers.push(worker(&e, "x3"));
    let kept = "myriad_coordinator_plans_kept_total";
    until("the leader keeps the placement", Duration::from_secs(30), async || {
        (metric("k1", kept).await? >= 1.0).then_some(())
    })
    .await;
    // Ten settle periods: a leader that planned again for the same workers
    // would have counted more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(metric("k1", kept).await, Some(1.0), "the leader planned again for the same workers");
    assert_eq!(current().map(|p| p.version), Some(first.version));
    let status = ctl_json(&e, &["status"]);
    let problems = status["problems"].to_string();
    // Says why x3 holds nothing, and what gives it experts.
    assert!(problems.contains("worker x3") && problems.contains("the leader kept placement"), "{status}");
    assert!(problems.contains("ctl rebalance --max-move"), "{status}");
    // A dry run predicts better balance but leaves the gauge of the kept
    // placement alone: x1 and x2 hold every expert, x3 nothing.
    let balancedness = "myriad_coordinator_balancedness";
    let kept = metric("k1", balancedness).await.unwrap();
    assert!((kept - 2.0 / 3.0).abs() < 1e-3, "{kept}");
    let dry = ctl_json(&e, &["rebalance", "--dry-run", "--max-move", "1GiB"]);
    assert!(dry["predicted_balancedness"].as_f64().unwrap() > kept + 0.1, "{dry}");
    // The dry run and `ctl top-experts` measure today's balance as the gauge does
    // (no traffic yet: every expert counts equal), not as a perfect 1.
    assert_eq!(dry["current_balancedness"].as_f64(), Some(kept), "{dry}");
    assert_eq!(ctl_json(&e, &["top-experts"])["balancedness"].as_f64(), Some(kept));
    assert_eq!(metric("k1", balancedness).await, Some(kept));

    ctl_json(&e, &["rebalance", "--max-move", "1GiB"]);
    until("x3 placed by the rebalance", Duration::from_secs(30), async || {
        current()?.assignment(&"x3".parse().unwrap()).map(|_| ())
    })
    .await;
}

/// A worker dies and the survivors cannot hold every expert: `ctl status`
/// says why the leader cannot place them, `ctl drain` refuses to take a
/// worker the experts need, and uncordoning a spare lets the leader place
/// them at once (not only when some worker's record next changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncordoning_a_spare_places_what_the_survivors_cannot_hold() {
    let etcd = EtcdServer::start().await;
    let e = etcd.endpoint.clone();
    let _coordinator = coordinator_with(&e, "k2", &["--min-workers", "4", "--settle", "100ms"]);
    // The tiny model's 40 experts of 24 KiB: three of these workers hold
    // them (16 each), two do not.
    let small = ["--capacity", "400KiB"];
    let mut workers: Vec<Proc> = ["y1", "y2", "y3"].iter().map(|id| worker_with(&e, id, &small)).collect();
    until("status says the first placement waits for a fourth worker", Duration::from_secs(30), async || {
        ctl_json(&e, &["status"])["problems"].to_string().contains("(--min-workers); 3 are").then_some(())
    })
    .await;
    workers.push(worker_with(&e, "y4", &small));
    let current = current_placement(&etcd).await;
    let placed = |p: &schema::Placement, id: &str| p.assignment(&id.parse().unwrap()).is_some();
    until("a placement of four workers", Duration::from_secs(30), async || {
        current().filter(|p| p.assignments.len() == 4)
    })
    .await;
    ctl_json(&e, &["drain", "y4"]);
    assert!(current().is_some_and(|p| !placed(&p, "y4") && p.assignments.len() == 3));

    workers[2].kill();
    let status = until("the leader says why it cannot place the experts", Duration::from_secs(30), async || {
        let status = ctl_json(&e, &["status"]);
        status["problems"].to_string().contains("cannot place").then_some(status)
    })
    .await;
    assert!(status["problems"].to_string().contains("does not fit"), "{status}");
    let refused = ctl(&e, &["--token", "secret", "drain", "y1"]).expect_err("draining a worker the experts need");
    assert!(refused.contains("does not fit"), "{refused}");
    let status = ctl_json(&e, &["status"]);
    let y1 = status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "y1").expect("y1 listed");
    assert_eq!(y1["cordoned"], false, "a refused drain cordoned y1: {status}");

    ctl_json(&e, &["uncordon", "y4"]);
    until("a placement of y1, y2 and y4", Duration::from_secs(10), async || {
        current().filter(|p| placed(p, "y4") && !placed(p, "y3"))
    })
    .await;

    // A plain cordon is not checked; undoing it clears the problem, though
    // the placement never changed.
    let cannot_place = || ctl_json(&e, &["status"])["problems"].to_string().contains("cannot place");
    ctl_json(&e, &["cordon", "y2"]);
    until("no placement without y2", Duration::from_secs(10), async || cannot_place().then_some(())).await;
    ctl_json(&e, &["uncordon", "y2"]);
    until("the problem cleared", Duration::from_secs(10), async || (!cannot_place()).then_some(())).await;
}

/// Two workers that cannot load the experts they are given (their weights
/// went away after they started) report it: the leader abandons that
/// version at once instead of after the rollout timeout, places the experts
/// without them, and `ctl status` names each and why. They try again,
/// backing off, and once their weights are back they are placed again
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_cannot_load_their_experts_are_left_out_until_they_load() {
    let etcd = EtcdServer::start().await;
    let e = etcd.endpoint.clone();
    let _coordinator = coordinator_with(&e, "k3", &["--min-workers", "2", "--settle", "100ms"]);
    let (tiny, dir) = (tiny(), model_copy());
    let model = dir.path().to_str().unwrap().to_string();
    let broken = ["z3", "z4"];
    let _broken: Vec<Proc> =
        broken.iter().map(|id| worker_with(&e, id, &["--model", &model, "--load-retry", "1s"])).collect();
    let weights = dir.path().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let _workers: Vec<Proc> = ["z1", "z2"].iter().map(|id| worker(&e, id)).collect();
    let current = current_placement(&etcd).await;
    let placed =
        |p: &schema::Placement| broken.iter().filter(|id| p.assignment(&id.parse().unwrap()).is_some()).count();
    // Well inside the 5 minute rollout timeout.
    let first = until("a current placement without z3 and z4", Duration::from_secs(20), async || {
        current().filter(|p| placed(p) == 0)
    })
    .await;
    assert!(first.version > schema::PlacementVersion(1), "v1 named them and was abandoned: {first:?}");
    let problems = ctl_json(&e, &["status"])["problems"].to_string();
    for id in broken {
        assert!(problems.contains(&format!("worker {id} could not load the experts of placement v")), "{problems}");
    }
    assert!(problems.contains("model.safetensors"), "the reason names the missing file: {problems}");

    // Their retries (after 1 s, then 2 s, 4 s, ...) fail while the file is
    // missing: they stay out.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(placed(&current().unwrap()), 0, "placed although they still cannot load their experts");
    let problems = ctl_json(&e, &["status"])["problems"].to_string();
    assert!(problems.contains("worker z3 could not load") && problems.contains("worker z4 could not load"));
    // `ctl nodes` and its JSON mark them.
    let failures = load_failures(&e);
    for id in broken {
        let failure = &failures[id];
        assert!(failure["error"].as_str().unwrap().contains("model.safetensors"), "{id}: {failure}");
        assert!(failure["placement_version"].as_u64().unwrap() >= 1, "{id}: {failure}");
    }
    let table = ctl(&e, &["--token", "secret", "nodes"]).unwrap();
    let row = |id: &str| table.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap().to_string();
    assert!(row("z3").contains("load of v") && row("z3").ends_with(" failed"), "{table}");
    assert!(!row("z1").contains("failed"), "{table}");
    // Each says so on its /metrics, for alerting.
    for id in broken {
        assert_eq!(worker_metric(id, "myriad_worker_load_failed").await, Some(1.0), "{id}");
        let failures = worker_metric(id, "myriad_worker_load_failures_total").await.unwrap();
        assert!(failures >= 2.0, "{id}: its first load and a retry failed: {failures}");
    }

    // The volume is back: retries load them and both are placed again, the
    // same processes.
    std::fs::copy(tiny.join("model.safetensors"), &weights).unwrap();
    until("z3 and z4 placed again without a restart", Duration::from_secs(30), async || {
        current().filter(|p| placed(p) == 2).map(|_| ())
    })
    .await;
    let problems = ctl_json(&e, &["status"])["problems"].to_string();
    assert!(!problems.contains("could not load"), "{problems}");
    assert!(load_failures(&e).values().all(Value::is_null), "{:?}", load_failures(&e));
    for id in broken {
        assert_eq!(worker_metric(id, "myriad_worker_load_failed").await, Some(0.0), "{id}");
        // The retry that loaded v1's share of the 40 experts (10) is kept,
        // and the placement that names the worker again (10 as well) takes
        // what the two share from it instead of reading it again.
        let loaded = async |source: &str| {
            let sample = format!("myriad_worker_experts_loaded_total{{source=\"{source}\",worker=\"{id}\"}}");
            metric(id, &sample).await.unwrap()
        };
        let (read, shared) = (loaded("checkpoint").await, loaded("shared").await);
        assert!(read + shared == 20.0 && shared > 0.0, "{id}: read {read}, shared {shared}");
    }
}

/// A worker whose weights volume hangs is stuck loading its experts; on
/// SIGTERM it still leaves the cluster at once and exits well before its
/// drain timeout, and the worker that replaces it is placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_its_experts_load_leaves_at_once() {
    let etcd = EtcdServer::start().await;
    let e = etcd.endpoint.clone();
    let _coordinator = coordinator_with(&e, "k4", &["--min-workers", "3", "--settle", "100ms"]);
    let dir = model_copy();
    let model = dir.path().to_str().unwrap().to_string();
    let mut stuck = worker_with(&e, "h3", &["--model", &model, "--drain-timeout", "60s"]);
    // Its weights now block on open, as a volume that stops answering does.
    let weights = dir.path().join("model.safetensors");
    hang(&weights);
    let _workers: Vec<Proc> = ["h1", "h2"].iter().map(|id| worker(&e, id)).collect();
    let store = etcd.store();
    let (keys, h3) = (Keys::new("t"), "h3".parse().unwrap());
    let mirror = Mirror::follow(std::sync::Arc::new(store), keys.placements()).await.unwrap();
    let names_h3 = |view: &PlacementView| view.versions.values().any(|p| p.assignment(&h3).is_some());
    until("a placement naming h3", Duration::from_secs(20), async || {
        names_h3(&PlacementView::read(&keys, &mirror.snapshot())).then_some(())
    })
    .await;
    // It is loading (the open blocks), not serving.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(health(&stuck.word(3)).await, Some(ServingStatus::NotServing as i32));

    let stopped = Instant::now();
    let status = stuck.terminate(Duration::from_secs(30));
    assert!(status.success(), "h3 ended with {status} on SIGTERM");
    eprintln!("SIGTERM of a worker stuck loading -> exit: {:?}", stopped.elapsed());
    // Its replacement (as Kubernetes starts one) completes the placement.
    let _h4 = worker(&e, "h4");
    let current = current_placement(&etcd).await;
    let placed = until("a current placement of h1, h2 and h4", Duration::from_secs(20), async || current()).await;
    assert!(placed.assignment(&h3).is_none(), "{placed:?}");
    assert!(["h1", "h2", "h4"].iter().all(|id| placed.assignment(&id.parse().unwrap()).is_some()), "{placed:?}");
}

/// Failures at once: a worker dies while the weights volume of two others
/// hangs. The plan that gives the dead worker's experts to the hung ones
/// can never roll out; the leader leaves them out after the rollout
/// timeout instead of planning them in again, so the experts are served
/// (one copy each: nothing else would serve them). Once the volume answers,
/// one whose load then ends and one restarted in place are placed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_whose_loads_hang_are_left_out_after_the_rollout_timeout() {
    let etcd = EtcdServer::start().await;
    let e = etcd.endpoint.clone();
    let placing = ["--min-workers", "4", "--settle", "100ms", "--rollout-timeout", "3s"];
    let mut k5 = coordinator_with(&e, "k5", &placing);
    let dir = model_copy();
    let model = dir.path().to_str().unwrap().to_string();
    let hung_args = ["--model", model.as_str(), "--load-retry", "1s"];
    let mut hung: Vec<Proc> = ["g3", "g4"].iter().map(|id| worker_with(&e, id, &hung_args)).collect();
    let mut workers: Vec<Proc> = ["g1", "g2"].iter().map(|id| worker(&e, id)).collect();
    let (_router, base) = router(&e, "r5").await;
    let expected = complete(&base).await;
    let current = current_placement(&etcd).await;
    let first = current().unwrap();
    let (g2, g3, g4) = ("g2".parse().unwrap(), "g3".parse().unwrap(), "g4".parse().unwrap());
    assert_eq!(first.assignments.len(), 4, "{first:?}");

    // The weights of g3 and g4 block on open from now on; g1 dies.
    let weights = dir.path().join("model.safetensors");
    hang(&weights);
    workers[0].kill();
    let without = until("a current placement of g2 alone", Duration::from_secs(30), async || {
        current().filter(|p| p.assignments.len() == 1 && p.assignment(&g2).is_some())
    })
    .await;
    assert_eq!(complete(&base).await, expected, "served by g2 alone");
    // Their loads still hang, but they no longer report ready: the current
    // version does not name them.
    for (id, w) in ["g3", "g4"].iter().zip(&hung) {
        let addr = w.word(3);
        until("a hung worker left out reports NOT_SERVING", Duration::from_secs(10), async || {
            (health(&addr).await == Some(ServingStatus::NotServing as i32)).then_some(())
        })
        .await;
        assert_eq!(worker_metric(id, "myriad_worker_ready").await, Some(0.0), "{id}");
    }
    let status = ctl_json(&e, &["status"]);
    let problems = status["problems"].to_string();
    for id in ["g3", "g4"] {
        assert!(problems.contains(&format!("worker {id} did not load placement v")), "{problems}");
    }
    assert!(problems.contains("within the rollout timeout (3s)"), "{problems}");
    let g3_node = status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "g3").cloned().unwrap();
    let stalled = g3_node["stalled_version"].as_u64().unwrap();
    assert!(stalled > first.version.0 && stalled < without.version.0, "{g3_node} {without:?}");
    let table = ctl(&e, &["--token", "secret", "nodes"]).unwrap();
    let row = table.lines().find(|l| l.starts_with("g3 ")).unwrap();
    assert!(row.ends_with(&format!("load of v{stalled} timed out")), "{table}");
    assert_eq!(metric("k5", "myriad_coordinator_stalled_workers").await, Some(2.0));

    // The leader dies: its successor leaves them out too, rather than wait
    // a rollout timeout for them again.
    k5.kill();
    let _k6 = coordinator_with(&e, "k6", &placing);
    let store = etcd.store();
    let keys = Keys::new("t");
    until("k6 leads", Duration::from_secs(20), async || (leader(&store, &keys).await? == "k6").then_some(())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let view = current_view(&etcd).await;
    assert_eq!(view.versions.keys().max(), Some(&without.version), "k6 planned again: {view:?}");
    let problems = ctl_json(&e, &["status"])["problems"].to_string();
    assert!(problems.contains("worker g3 did not load") && problems.contains("worker g4 did not load"), "{problems}");
    assert_eq!(metric("k6", "myriad_coordinator_stalled_workers").await, Some(2.0));

    // g3 is restarted in place; then the volume answers: g4's blocked read
    // ends (empty: its load fails) and the weights are back for its retry.
    hung[0].kill();
    let back = dir.path().join("weights.tmp");
    std::fs::copy(tiny().join("model.safetensors"), &back).unwrap();
    drop(std::fs::OpenOptions::new().write(true).open(&weights).unwrap());
    std::fs::rename(&back, &weights).unwrap();
    hung[0] = worker_with(&e, "g3", &hung_args);
    until("a current placement of g2, g3 and g4", Duration::from_secs(30), async || {
        current().filter(|p| p.assignments.len() == 3 && p.assignment(&g3).is_some() && p.assignment(&g4).is_some())
    })
    .await;
    assert_eq!(complete(&base).await, expected);
    let problems = ctl_json(&e, &["status"])["problems"].to_string();
    assert!(!problems.contains("did not load placement"), "{problems}");
    assert_eq!(metric("k6", "myriad_coordinator_stalled_workers").await, Some(0.0));
}
