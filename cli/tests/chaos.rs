//! Correlated failures under load, on a real etcd with real processes: two
//! coordinators (`--replicas 2`), three workers on fixed addresses (so they
//! can come back in place), two routers, and clients streaming requests
//! through both routers the whole time. Router r1 runs with `--expert-wait
//! 0s`: it fails a request at once when no live worker it knows hosts an
//! expert, so its zero failures show that it uses a worker again after a
//! restart in place; r2 keeps the default wait, which turns even the double
//! kill into latency. Every answer must equal the
//! fault-free one; where some copy of every expert stays alive, no request
//! may fail.
//!
//! `MYRIAD_CHAOS_SOAK_MINUTES=N` also runs a randomised soak: random kills
//! and restarts of workers for N minutes, every answer checked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use myriad_store::Store;
use myriad_store::etcd_server::EtcdServer;
use myriad_store::schema::{self, Keys, PlacementVersion, PlacementView, Role};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

mod common;
use common::{Proc, ctl_json, free_port, leader, until};

const TTL: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_millis(300);
const LOAD: &str = r#""prompt": "Chaos in the cluster", "max_tokens": 12, "temperature": 0, "ignore_eos": true"#;
/// Clients per router.
const CLIENTS: usize = 2;

struct Cluster {
    etcd: EtcdServer,
    e: String,
    store: Arc<dyn Store>,
    keys: Keys,
    coordinators: BTreeMap<&'static str, Option<Proc>>,
    /// Workers by id: their fixed port and the process, when running.
    workers: BTreeMap<String, (u16, Option<Proc>)>,
    routers: Vec<Proc>,
    bases: Vec<String>,
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

impl Cluster {
    async fn start() -> Self {
        let etcd = EtcdServer::start().await;
        let e = etcd.endpoint.clone();
        let store: Arc<dyn Store> = Arc::new(etcd.store());
        let mut cluster = Cluster {
            etcd,
            e,
            store,
            keys: Keys::new("t"),
            coordinators: BTreeMap::new(),
            workers: BTreeMap::new(),
            routers: Vec::new(),
            bases: Vec::new(),
        };
        for id in ["c1", "c2"] {
            cluster.start_coordinator(id);
        }
        for id in ["w1", "w2", "w3"] {
            cluster.workers.insert(id.to_string(), (free_port(), None));
            cluster.start_worker(id);
        }
        for (id, wait) in [("r1", "0s"), ("r2", "10s")] {
            let router = cluster.node("router", id, &["--listen", "127.0.0.1:0", "--expert-wait", wait]);
            cluster.bases.push(router.word(3));
            cluster.routers.push(router);
        }
        cluster.healthy("the cluster starts").await;
        cluster
    }

    /// Starts `role` `id` of cluster `t` with `extra` flags.
    fn node(&self, role: &str, id: &str, extra: &[&str]) -> Proc {
        let ttl = format!("{}s", TTL.as_secs());
        let common = [role, "--etcd", &self.e, "--cluster", "t", "--node-id", id, "--lease-ttl", &ttl];
        Proc::start(&[&common[..], extra].concat())
    }

    fn start_coordinator(&mut self, id: &'static str) {
        let settle = format!("{}ms", SETTLE.as_millis());
        let flags = ["--replicas", "2", "--min-workers", "3", "--settle", &settle, "--admin-listen", "127.0.0.1:0"];
        let c = self.node("coordinator", id, &[&flags[..], &["--admin-token", "secret"]].concat());
        self.coordinators.insert(id, Some(c));
    }

    /// Starts worker `id` on its fixed address (a new id gets a new port).
    fn start_worker(&mut self, id: &str) {
        let port = self.workers.entry(id.to_string()).or_insert_with(|| (free_port(), None)).0;
        let w = self.node("worker", id, &["--listen", &format!("127.0.0.1:{port}")]);
        self.workers.get_mut(id).unwrap().1 = Some(w);
    }

    /// Waits until worker `id` is registered (a worker serves, and prints
    /// its banner, before the store has its record).
    async fn registered(&self, id: &str) {
        let key = self.keys.node(Role::Worker, &id.parse().unwrap());
        until(&format!("{id} registered"), Duration::from_secs(30), async || {
            self.store.get(&key).await.ok().flatten().map(|_| ())
        })
        .await;
    }

    fn worker(&mut self, id: &str) -> &mut Proc {
        self.workers.get_mut(id).and_then(|w| w.1.as_mut()).unwrap_or_else(|| panic!("{id} is not running"))
    }

    fn kill_worker(&mut self, id: &str) {
        self.worker(id).kill();
        self.workers.get_mut(id).unwrap().1 = None;
    }

    /// `ctl status` with no problems; returns how long that took.
    async fn healthy(&self, what: &str) -> Duration {
        let started = Instant::now();
        let e = self.e.clone();
        until(&format!("{what}: a healthy status"), Duration::from_secs(60), async || {
            let out = common::ctl(&e, "t", &["--token", "secret", "--json", "status"]).ok()?;
            let s: Value = serde_json::from_str(&out).ok()?;
            s["problems"].as_array().is_some_and(|p| p.is_empty()).then_some(())
        })
        .await;
        started.elapsed()
    }

    /// The worker addresses each router reports it has marked down.
    async fn marked_down(&self) -> Vec<Vec<String>> {
        let Ok(listing) = self.store.list(&self.keys.nodes(Role::Router)).await else { return Vec::new() };
        let snapshot = Arc::new(listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect());
        schema::read_nodes(&snapshot).into_iter().map(|r| r.dispatch.map(|d| d.down).unwrap_or_default()).collect()
    }

    fn addr(&self, id: &str) -> String {
        format!("127.0.0.1:{}", self.workers[id].0)
    }

    async fn view(&self) -> PlacementView {
        let listing = self.store.list(&self.keys.placements()).await.expect("list placements");
        let snapshot = Arc::new(listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect());
        PlacementView::read(&self.keys, &snapshot)
    }

    /// The current version, once every router dispatches with it and it
    /// places exactly `workers`.
    async fn served_with(&self, workers: &[&str]) -> Option<PlacementVersion> {
        let view = self.view().await;
        let p = view.current()?;
        let mut placed: Vec<&str> = p.assignments.iter().map(|a| a.node.as_str()).collect();
        placed.sort();
        let listing = self.store.list(&self.keys.nodes(Role::Router)).await.ok()?;
        let snapshot = Arc::new(listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect());
        let routers = schema::read_nodes(&snapshot);
        let served = routers.len() == 2 && routers.iter().all(|r| r.placement_version == Some(p.version));
        (placed == workers && served).then_some(p.version)
    }
}

/// One request of the background load.
struct Outcome {
    /// Index of the router it went through.
    router: usize,
    started: Instant,
    took: Duration,
    result: Result<String, String>,
}

/// Clients sending [`LOAD`] through every router until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(bases: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (router, base) in bases.iter().enumerate() {
            for _ in 0..CLIENTS {
                let (base, stop) = (base.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let result = common::complete(&base, LOAD).await;
                        let failed = result.is_err();
                        outcomes.push(Outcome { router, started, took: started.elapsed(), result });
                        if failed {
                            // As a client would: a short pause before trying again.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    outcomes
                }));
            }
        }
        Load { stop, tasks }
    }

    /// Stops the clients; every outcome, checked against `expected`: a
    /// completed request must have the fault-free answer.
    async fn finish(self, expected: &str, scenario: &str) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("a load task"));
        }
        for o in &all {
            if let Ok(text) = &o.result {
                assert_eq!(text, expected, "{scenario}: an answer differs from the fault-free one");
            }
        }
        let failed = |router: usize| all.iter().filter(|o| o.router == router && o.result.is_err()).count();
        let count = |router: usize| all.iter().filter(|o| o.router == router).count();
        let slowest = all.iter().filter(|o| o.result.is_ok()).map(|o| o.took).max().unwrap_or_default();
        let span = all.iter().map(|o| o.started + o.took).max().zip(all.iter().map(|o| o.started).min());
        eprintln!(
            "chaos: {scenario}: {} requests over {}, failed {} of {} through r1 (no wait), {} of {} through r2; \
             slowest answer {}",
            all.len(),
            secs(span.map_or(Duration::ZERO, |(end, start)| end - start)),
            failed(0),
            count(0),
            failed(1),
            count(1),
            secs(slowest)
        );
        all
    }
}

fn assert_none_failed(outcomes: &[Outcome], scenario: &str) {
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.result.as_ref().err()).collect();
    assert!(failed.is_empty(), "{scenario}: {} of {} requests failed: {:?}", failed.len(), outcomes.len(), failed);
    assert!(outcomes.len() >= 2 * CLIENTS, "{scenario}: the load hardly ran ({} requests)", outcomes.len());
}

/// Waits for a placement proposal newer than the current one.
async fn proposal(cluster: &Cluster) -> PlacementVersion {
    until("a placement proposal", Duration::from_secs(30), async || {
        let view = cluster.view().await;
        let newest = *view.versions.keys().next_back()?;
        (Some(newest) > view.current).then_some(newest)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn correlated_failures_cost_no_request_while_a_copy_lives() {
    let mut c = Cluster::start().await;
    let expected = common::complete(&c.bases[0], LOAD).await.expect("a fault-free answer");
    let all = ["w1", "w2", "w3"];

    // 1. One worker SIGKILLed under load, then back.
    let load = Load::start(&c.bases);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    c.kill_worker("w1");
    until("a placement without w1", Duration::from_secs(30), async || c.served_with(&["w2", "w3"]).await).await;
    eprintln!("chaos: one kill: new placement served {} after the SIGKILL", secs(killed.elapsed()));
    c.start_worker("w1");
    until("w1 placed again", Duration::from_secs(30), async || c.served_with(&all).await).await;
    assert_none_failed(&load.finish(&expected, "one worker killed").await, "one worker killed");
    c.healthy("after one kill").await;

    // 2. A worker killed and restarted at once on the same address, then a
    // second worker killed: the routers must use the first one again.
    let load = Load::start(&c.bases);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let version = c.view().await.current;
    c.kill_worker("w2");
    // Well within the lease TTL: the leader sees no change, but both
    // routers' calls to w2 fail and they mark it down.
    let w2 = c.addr("w2");
    let killed = Instant::now();
    until("both routers mark w2 down", Duration::from_secs(5), async || {
        let down = c.marked_down().await;
        (down.len() == 2 && down.iter().all(|d| d.contains(&w2))).then_some(())
    })
    .await;
    eprintln!("chaos: restart in place: both routers marked w2 down {} after the kill", secs(killed.elapsed()));
    let status = ctl_json(&c.e, "t", &["status"]);
    let problems = status["problems"].to_string();
    assert!(problems.contains("has marked worker(s) down: ") && problems.contains(&w2), "{status}");
    c.start_worker("w2");
    let back = Instant::now();
    until("both routers use w2 again", Duration::from_secs(10), async || {
        let down = c.marked_down().await;
        (down.len() == 2 && down.iter().all(|d| d.is_empty())).then_some(())
    })
    .await;
    eprintln!("chaos: restart in place: routers use w2 again {} after it came back", secs(back.elapsed()));
    assert_eq!(c.view().await.current, version, "a restart in place needs no new placement");
    c.kill_worker("w3");
    until("a placement without w3", Duration::from_secs(30), async || c.served_with(&["w1", "w2"]).await).await;
    let outcomes = load.finish(&expected, "restart in place, then a second kill").await;
    assert_none_failed(&outcomes, "restart in place, then a second kill");
    c.start_worker("w3");
    c.healthy("w3 back").await;

    // 3. Two workers killed at the same instant, restarted 10 s later. Some
    // experts lose every copy: requests may wait or fail until the
    // survivor hosts everything, within lease TTL + settle + 2 s.
    let load = Load::start(&c.bases);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    c.kill_worker("w1");
    c.kill_worker("w2");
    until("a placement on w3 alone", Duration::from_secs(30), async || c.served_with(&["w3"]).await).await;
    let recovered = killed.elapsed();
    eprintln!("chaos: double kill: placement on the survivor served {} after the SIGKILLs", secs(recovered));
    let bound = TTL + SETTLE + Duration::from_secs(2);
    assert!(recovered <= bound, "the double kill took {recovered:?} to recover (bound {bound:?})");
    let status = ctl_json(&c.e, "t", &["status"]);
    assert!(status["problems"].to_string().contains("1 live worker(s), fewer than the 2 copies"), "{status}");
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(killed.elapsed())).await;
    c.start_worker("w1");
    c.start_worker("w2");
    let back = Instant::now();
    until("w1 and w2 placed again", Duration::from_secs(30), async || c.served_with(&all).await).await;
    eprintln!("chaos: double kill: both workers placed again {} after their restart", secs(back.elapsed()));
    let outcomes = load.finish(&expected, "double kill").await;
    let after = killed + recovered;
    let late: Vec<&String> =
        outcomes.iter().filter(|o| o.started > after).filter_map(|o| o.result.as_ref().err()).collect();
    assert!(late.is_empty(), "requests started after recovery failed: {late:?}");
    // r2 waits for a live copy instead of failing: the burst cost it latency only.
    let waited: Vec<Outcome> = outcomes.into_iter().filter(|o| o.router == 1).collect();
    assert_none_failed(&waited, "double kill through the router that waits");
    c.healthy("after the double kill").await;
    // The returned workers serve: without w3, they hold every expert.
    let load = Load::start(&c.bases);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill_worker("w3");
    until("a placement without w3", Duration::from_secs(30), async || c.served_with(&["w1", "w2"]).await).await;
    assert_none_failed(&load.finish(&expected, "returned workers").await, "returned workers serve");
    c.start_worker("w3");
    c.healthy("w3 back again").await;

    // 4. A rolling restart of every worker, one by one, under load, each
    // next one stopped once the last reports SERVING on gRPC health (the
    // chart's readiness probe) and a moment has passed.
    let load = Load::start(&c.bases);
    for id in all {
        let status = c.worker(id).terminate(Duration::from_secs(15));
        assert!(status.success(), "{id} exited with {status} on SIGTERM");
        c.start_worker(id);
        let addr = c.addr(id);
        until(&format!("{id} serving again"), Duration::from_secs(30), async || {
            (common::health(&addr).await == Some(ServingStatus::Serving as i32)).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.healthy("after the rolling restart").await;
    assert_none_failed(&load.finish(&expected, "rolling restart").await, "rolling restart");

    // 5. The leader SIGKILLed during a rollout: a joining worker is held
    // (SIGSTOP) so the rollout cannot finish before the kill.
    let load = Load::start(&c.bases);
    c.start_worker("w4");
    c.registered("w4").await;
    c.worker("w4").signal("STOP");
    let proposed = proposal(&c).await;
    let led = leader(&*c.store, &c.keys).await.expect("a leader");
    let led: &'static str = if led == "c1" { "c1" } else { "c2" };
    let killed = Instant::now();
    c.coordinators.get_mut(led).unwrap().take().unwrap().kill();
    c.worker("w4").signal("CONT");
    let four = ["w1", "w2", "w3", "w4"];
    let v = until("w4 placed by the new leader", Duration::from_secs(30), async || c.served_with(&four).await).await;
    assert!(v >= proposed);
    eprintln!("chaos: leader killed mid-rollout: w4 placed {} after the kill", secs(killed.elapsed()));
    assert_none_failed(&load.finish(&expected, "leader killed during a rollout").await, "leader killed mid-rollout");
    c.start_coordinator(led);
    c.healthy("after the leader kill").await;

    // 6. etcd stopped during a rollout (a joining worker held as in 5),
    // and back after more than a lease TTL.
    let load = Load::start(&c.bases);
    c.start_worker("w5");
    c.registered("w5").await;
    c.worker("w5").signal("STOP");
    proposal(&c).await;
    c.etcd.kill();
    c.worker("w5").signal("CONT");
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    c.etcd.restart().await;
    let back = Instant::now();
    let five = ["w1", "w2", "w3", "w4", "w5"];
    until("w5 placed after etcd returned", Duration::from_secs(30), async || c.served_with(&five).await).await;
    eprintln!("chaos: etcd stopped mid-rollout: w5 placed {} after etcd returned", secs(back.elapsed()));
    assert_none_failed(&load.finish(&expected, "etcd stopped during a rollout").await, "etcd stopped mid-rollout");
    c.healthy("after etcd returned").await;

    // 7. A long prompt beside short streaming requests: the short one's
    // first token comes before the long prompt is done.
    let long: Vec<String> = (0..8000).map(|i| (3 + i % 250).to_string()).collect();
    let long_fields = format!(r#""prompt": [{}], "max_tokens": 1"#, long.join(","));
    let base = c.bases[0].clone();
    let long_started = Instant::now();
    let long_request = tokio::spawn(async move {
        common::complete(&base, &long_fields).await.expect("the long prompt");
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let short_started = Instant::now();
    let mut first = None;
    let text = common::stream(&c.bases[0], LOAD, 1, || first = Some(Instant::now())).await;
    assert_eq!(text, expected);
    let first = first.expect("the short request streamed");
    let long_done = long_request.await.expect("the long request task");
    eprintln!(
        "chaos: beside an 8000-token prompt ({} to answer), a short stream's first token came after {}",
        secs(long_done - long_started),
        secs(first - short_started)
    );
    assert!(first < long_done, "the short request waited for the whole long prompt");
}

/// Random kills, restarts in place and double kills of workers for
/// `MYRIAD_CHAOS_SOAK_MINUTES` minutes under load (skipped without it):
/// every answer must equal the fault-free one, and the cluster must be
/// healthy and serving once the faults stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_random_worker_faults() {
    let Some(minutes) = std::env::var("MYRIAD_CHAOS_SOAK_MINUTES").ok().and_then(|m| m.parse::<f64>().ok()) else {
        eprintln!("soak skipped: set MYRIAD_CHAOS_SOAK_MINUTES=N to run it");
        return;
    };
    let seed: u64 = std::env::var("MYRIAD_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("soak: {minutes} minutes, MYRIAD_CHAOS_SEED={seed}");
    // Reproducible from the printed seed.
    let mut rng = myriad_model::generate::Rng::new(seed);
    let mut next = move |n: u64| rng.next_u64() % n;
    let mut c = Cluster::start().await;
    let expected = common::complete(&c.bases[0], LOAD).await.expect("a fault-free answer");
    let ids = ["w1", "w2", "w3"];
    let load = Load::start(&c.bases);
    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut actions = 0;
    while Instant::now() < deadline {
        let running: Vec<&str> = ids.iter().copied().filter(|id| c.workers[*id].1.is_some()).collect();
        let stopped: Vec<&str> = ids.iter().copied().filter(|id| c.workers[*id].1.is_none()).collect();
        match next(4) {
            0 if running.len() > 1 => c.kill_worker(running[next(running.len() as u64) as usize]),
            1 if !stopped.is_empty() => c.start_worker(stopped[next(stopped.len() as u64) as usize]),
            2 if !running.is_empty() => {
                let id = running[next(running.len() as u64) as usize];
                c.kill_worker(id);
                c.start_worker(id);
            }
            3 if running.len() == 3 => {
                let spared = next(3) as usize;
                for (i, id) in ids.iter().enumerate() {
                    if i != spared {
                        c.kill_worker(id);
                    }
                }
            }
            _ => continue,
        }
        actions += 1;
        tokio::time::sleep(Duration::from_millis(500 + next(4500))).await;
    }
    for id in ids {
        if c.workers[id].1.is_none() {
            c.start_worker(id);
        }
    }
    c.healthy("after the soak").await;
    let outcomes = load.finish(&expected, &format!("soak of {actions} faults")).await;
    assert!(outcomes.iter().any(|o| o.result.is_ok()), "nothing succeeded during the soak");
    assert_eq!(common::complete(&c.bases[1], LOAD).await.as_deref(), Ok(expected.as_str()), "after the soak");
}
