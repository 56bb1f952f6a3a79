//! Every serving role stops cleanly on SIGTERM, the signal Kubernetes,
//! systemd and `docker stop` send before they kill a process: it exits with
//! status 0, and a leading coordinator gives up its leadership on the way
//! out, so its standby leads at once instead of when the lease expires.

use std::time::{Duration, Instant};

use myriad_store::etcd_server::EtcdServer;
use myriad_store::schema::Keys;

mod common;
use common::{Proc, leader, until};

const EXIT_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn serving_roles_exit_cleanly_on_sigterm() {
    for args in [
        &["kvcache", "--listen", "127.0.0.1:0"][..],
        &["worker", "--listen", "127.0.0.1:0", "--experts", "*:*"],
        &["up", "--listen", "127.0.0.1:0", "--workers", "2"],
    ] {
        let mut process = Proc::start(args);
        let status = process.terminate(EXIT_LIMIT);
        assert!(status.success(), "`myriad {}` ended with {status} on SIGTERM", args.join(" "));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_stopped_with_sigterm_hands_over_leadership_at_once() {
    let etcd = EtcdServer::start().await;
    let store = etcd.store();
    let keys = Keys::new("s");
    // With a 20 s lease, a standby that waited for the lease to expire would
    // take 20 s; one that sees the resignation takes a moment.
    let coordinator = |id: &str| {
        let cluster = ["coordinator", "--etcd", &etcd.endpoint, "--cluster", "s", "--node-id", id];
        Proc::start(&[&cluster[..], &["--lease-ttl", "20s", "--admin-listen", "127.0.0.1:0"]].concat())
    };
    let mut first = coordinator("c1");
    until("c1 leads", Duration::from_secs(15), async || (leader(&store, &keys).await? == "c1").then_some(())).await;
    let _standby = coordinator("c2");

    let stopped = Instant::now();
    let status = first.terminate(EXIT_LIMIT);
    assert!(status.success(), "the leader ended with {status} on SIGTERM");
    until(
        "the standby leads within half the lease TTL (the leader resigned)",
        Duration::from_secs(10).saturating_sub(stopped.elapsed()),
        async || (leader(&store, &keys).await? == "c2").then_some(()),
    )
    .await;
    eprintln!("SIGTERM of the leading coordinator -> the standby leads: {:?}", stopped.elapsed());
}

/// A router that never reached the store (etcd down since it started) has
/// nothing to unregister: it stops at once on SIGTERM, without waiting the
/// 2 s a registered router gives its departure.
#[test]
fn a_router_that_never_joined_stops_at_once() {
    let etcd = format!("127.0.0.1:{}", common::free_port()); // nothing listens there
    let mut router =
        Proc::start(&["router", "--etcd", &etcd, "--cluster", "s", "--node-id", "r1", "--listen", "127.0.0.1:0"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(router.running(), "the router exited while etcd was down");
    let stopped = Instant::now();
    let status = router.terminate(EXIT_LIMIT);
    let took = stopped.elapsed();
    eprintln!("SIGTERM of a router that never joined -> it exited: {took:?}");
    assert!(status.success(), "the router ended with {status} on SIGTERM");
    assert!(took < Duration::from_millis(1500), "took {took:?}: it waited to unregister a record it never wrote");
}

/// A router lets the responses in flight finish within its drain timeout,
/// and cuts the rest then: a generation far longer than that cannot hold
/// the process past it (and so past the pod's grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_cuts_what_is_still_open_at_its_drain_timeout() {
    let args = ["up", "--listen", "127.0.0.1:0", "--workers", "1", "--no-kvcache", "--drain-timeout", "500ms"];
    let mut up = Proc::start(&args);
    let base = up.word(3);
    // Minutes of tokens on this model: it cannot finish within the test.
    let body = r#"{"model": "tiny-v4", "prompt": "Long", "max_tokens": 30000, "ignore_eos": true, "stream": true}"#;
    let client = reqwest::Client::new();
    let request = client.post(format!("{base}/completions")).header("content-type", "application/json").body(body);
    let mut response = request.send().await.expect("send");
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\n\n") {
        seen.push_str(&String::from_utf8_lossy(&response.chunk().await.expect("read").expect("a first event")));
    }
    let sent = Instant::now();
    up.signal("TERM");
    // The process exits while the stream is still open, then the stream ends unfinished.
    let status = tokio::task::spawn_blocking(move || up.wait(EXIT_LIMIT)).await.unwrap();
    assert!(status.success(), "`myriad up` ended with {status} on SIGTERM");
    eprintln!("SIGTERM with a long stream open, drain timeout 500ms -> exited: {:?}", sent.elapsed());
    while let Ok(Some(bytes)) = response.chunk().await {
        seen.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert!(!seen.contains("[DONE]"), "the stream finished: {} bytes", seen.len());
}
