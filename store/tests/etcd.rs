//! The etcd backend against a real `etcd` server: the same suite as the
//! in-memory store, and what happens when etcd goes away and comes back.

use std::sync::Arc;
use std::time::Duration;

use myriad_store::etcd_server::EtcdServer;
use myriad_store::lease::{Registration, campaign};
use myriad_store::mirror::Mirror;
use myriad_store::{Store, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_store_suite() {
    let etcd = EtcdServer::start().await;
    myriad_store::suite::run(&etcd.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_an_error_not_a_hang() {
    let mut etcd = EtcdServer::start().await;
    let store = etcd.store();
    etcd.kill();
    let started = std::time::Instant::now();
    assert!(matches!(store.get("/k").await, Err(StoreError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_keep_their_snapshot_and_nodes_register_again_after_an_outage() {
    let mut etcd = EtcdServer::start().await;
    let store: Arc<dyn Store> = Arc::new(etcd.store());
    let ttl = Duration::from_secs(2);
    store.put("/c/placement", b"v1".to_vec(), None).await.unwrap();
    let placement = Mirror::follow(store.clone(), "/c/placement".into()).await.unwrap();
    let nodes = Mirror::follow(store.clone(), "/c/nodes/".into()).await.unwrap();
    let _registration = Registration::start(store.clone(), "/c/nodes/w".into(), b"w".to_vec(), ttl).await.unwrap();
    let leader = campaign(store.clone(), "/c/leader", b"me".to_vec(), ttl).await;
    let mut changes = nodes.subscribe();
    changes.wait_for(|s| s.contains_key("/c/nodes/w")).await.unwrap();

    etcd.kill();
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(placement.snapshot()["/c/placement"].value, b"v1", "the last snapshot stays while etcd is away");
    assert!(nodes.snapshot().contains_key("/c/nodes/w"));

    // Back after longer than the TTL. The leader could not refresh its
    // lease for a whole TTL, so it must assume another took over; the
    // registration keeps its key (same lease if etcd restored it, a new
    // one if not).
    etcd.restart().await;
    let mut leader = leader;
    tokio::time::timeout(Duration::from_secs(20), leader.lost()).await.expect("the leader notices its lease is gone");
    tokio::time::sleep(ttl * 3).await;
    let again = store.get("/c/nodes/w").await.unwrap().expect("registered again");
    assert_eq!(again.value, b"w");
    tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|s| s.contains_key("/c/nodes/w")))
        .await
        .expect("the mirror follows again")
        .unwrap();
    store.put("/c/placement", b"v2".to_vec(), None).await.unwrap();
    let mut p = placement.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        p.wait_for(|s| s.get("/c/placement").is_some_and(|kv| kv.value == b"v2")),
    )
    .await
    .expect("the placement mirror catches up after the outage")
    .unwrap();
}
