//! A node's life at the edges, as separate processes on a real etcd:
//! nodes started while etcd is down wait for it (serving, unready) instead
//! of exiting; a worker SIGTERMed under load leaves the cluster at once,
//! keeps serving until no placement names it, then exits, and no request
//! fails; a SIGTERMed router turns unready, keeps answering for its
//! shutdown delay, finishes what is in flight and leaves.

use std::time::{Duration, Instant};

use myriad_store::etcd_server::EtcdServer;
use myriad_store::mirror::Mirror;
use myriad_store::schema::{Keys, PlacementView};
use tonic_health::pb::health_check_response::ServingStatus;

mod common;
use common::{Proc, health, until};

/// Far longer than the test's patience: a worker that only left when its
/// lease expired would fail the timing below.
const TTL: &str = "15s";

fn member(etcd: &str, role: &str, id: &str) -> Vec<String> {
    [role, "--etcd", etcd, "--cluster", "life", "--node-id", id, "--lease-ttl", TTL]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn start(args: Vec<String>, extra: &[&str]) -> Proc {
    let all: Vec<&str> = args.iter().map(String::as_str).chain(extra.iter().copied()).collect();
    Proc::start(&all)
}

const PROMPT: &str = r#""prompt": "A node's life", "max_tokens": 200, "temperature": 0, "ignore_eos": true"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_wait_for_etcd_and_a_sigtermed_worker_hands_over_at_once() {
    let mut etcd = EtcdServer::start().await;
    let e = etcd.endpoint.clone();
    etcd.kill();
    // Everything starts while etcd is down: banners, no exits.
    let listen = ["--listen", "127.0.0.1:0"];
    // w1's readiness also on HTTP, for probes that cannot speak gRPC.
    let w1_ready = format!("http://127.0.0.1:{}/ready", common::free_port());
    let w1_metrics = format!("--metrics-listen={}", w1_ready.trim_start_matches("http://").trim_end_matches("/ready"));
    let mut workers = [
        start(member(&e, "worker", "w1"), &["--listen", "127.0.0.1:0", &w1_metrics]),
        start(member(&e, "worker", "w2"), &listen),
    ];
    // Unready but answering for a second after SIGTERM (see the end); its
    // KV-cache instances come from the store too.
    let router_flags = ["--listen", "127.0.0.1:0", "--shutdown-delay", "1s", "--kvcache-from-store"];
    let router = start(member(&e, "router", "r1"), &router_flags);
    let kvcache = start(member(&e, "kvcache", "kv1"), &listen);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for w in &mut workers {
        assert!(w.running(), "a worker exited while etcd was down");
        assert_eq!(health(&w.word(3)).await, Some(ServingStatus::NotServing as i32), "unplaced yet ready");
    }
    assert_eq!(reqwest::get(&w1_ready).await.unwrap().status(), 503, "unplaced yet ready on HTTP");
    let mut router = router;
    assert!(
        router.running() && {
            let mut k = kvcache;
            k.running()
        },
        "a router or KV-cache exited"
    );
    let base = router.word(3);
    let ready = format!("{}/ready", base.trim_end_matches("/v1"));
    assert!(!reqwest::get(&ready).await.unwrap().status().is_success(), "ready without a placement");

    // etcd comes up, then a coordinator: the cluster forms by itself.
    etcd.restart().await;
    let _coordinator = start(
        member(&e, "coordinator", "c1"),
        // Default settle times: a departure re-places within the second.
        &["--admin-listen", "127.0.0.1:0", "--min-workers", "2"],
    );
    until("router ready", Duration::from_secs(60), async || {
        reqwest::get(&ready).await.ok()?.status().is_success().then_some(())
    })
    .await;
    let expected = common::complete(&base, PROMPT).await.unwrap();
    assert_eq!(reqwest::get(&w1_ready).await.unwrap().status(), 200, "placed, serving, yet not ready on HTTP");

    // SIGTERM w1 in the middle of a stream: the stream's answer is the
    // same, and a placement without w1 is current long before its lease
    // would have expired.
    let store: std::sync::Arc<dyn myriad_store::Store> = std::sync::Arc::new(etcd.store());
    let keys = Keys::new("life");
    let placements = Mirror::follow(store, keys.placements()).await.unwrap();
    // Watched while the stream runs: the stream may outlast the handover.
    let watched = keys.clone();
    let handed_over = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let view = PlacementView::read(&watched, &placements.snapshot());
            if view.current().is_some_and(|p| p.assignment(&"w1".parse().unwrap()).is_none()) {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "no current placement without w1 within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut sent = None;
    let text = common::stream(&base, PROMPT, 4, || {
        workers[0].signal("TERM");
        sent = Some(Instant::now());
    })
    .await;
    assert_eq!(text, expected, "a SIGTERMed worker changed or broke the answer");
    let sent = sent.unwrap();
    let moved = handed_over.await.unwrap().duration_since(sent);
    eprintln!("SIGTERM of a worker -> placement without it current: {moved:?} (lease TTL {TTL})");
    assert!(moved < Duration::from_secs(1), "a departure took {moved:?} to re-place");
    let status = workers[0].wait(Duration::from_secs(20));
    eprintln!("SIGTERM of a worker -> it exited: {:?} ({status})", sent.elapsed());
    assert!(status.success(), "the worker did not stop cleanly: {status}");
    assert_eq!(common::complete(&base, PROMPT).await.unwrap(), expected, "after w1 left");

    // A SIGTERMed router reports not ready at once but answers through its
    // shutdown delay (load balancers take it out meanwhile), finishes what
    // is in flight, and leaves the cluster, not a lease TTL later.
    let (signalled, on_signal) = tokio::sync::oneshot::channel();
    let during = async {
        on_signal.await.unwrap();
        // The signal takes a moment to arrive.
        let unready = async || (reqwest::get(&ready).await.ok()?.status() == 503).then_some(Instant::now());
        let unready = until("the router unready", Duration::from_secs(1), unready).await;
        (unready, common::complete(&base, PROMPT).await)
    };
    let mut stopped = None;
    let streamed = common::stream(&base, PROMPT, 4, || {
        router.signal("TERM");
        stopped = Some(Instant::now());
        signalled.send(()).unwrap();
    });
    let (text, (unready, answer)) = tokio::join!(streamed, during);
    assert_eq!(text, expected, "a stream in flight through a SIGTERMed router changed or broke");
    let stopped = stopped.unwrap();
    eprintln!("SIGTERM of a router -> not ready: {:?}", unready.duration_since(stopped));
    assert_eq!(answer.as_deref(), Ok(expected.as_str()), "a request in the shutdown delay failed");
    let status = router.wait(Duration::from_secs(20));
    eprintln!("SIGTERM of a router -> it exited: {:?} ({status})", stopped.elapsed());
    assert!(status.success(), "the router did not stop cleanly: {status}");
    let store = etcd.store();
    let key = keys.node(myriad_store::schema::Role::Router, &"r1".parse().unwrap());
    until("the router's record gone", Duration::from_secs(5), async || {
        use myriad_store::Store;
        store.get(&key).await.ok().filter(Option::is_none).map(|_| ())
    })
    .await;
    eprintln!("SIGTERM of a router -> its record gone: {:?} (lease TTL {TTL})", stopped.elapsed());
}
