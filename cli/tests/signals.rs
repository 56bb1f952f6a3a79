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
