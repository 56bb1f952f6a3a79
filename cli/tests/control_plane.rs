//! The control plane in one process, over the in-memory store: a
//! coordinator, expert workers on real loopback gRPC and a router. A worker
//! that dies leaves the placement when its lease expires; the survivors
//! load the new version, the router switches, the old version is released,
//! and generation gives the same tokens throughout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use myriad_coordinator::CoordinatorConfig;
use myriad_model::{Model, Sampling};
use myriad_router::RemoteExperts;
use myriad_router::WorkerPool;
use myriad_store::mirror::Mirror;
use myriad_store::schema::{Keys, NodeRecord, PlacementVersion, PlacementView, Role};
use myriad_store::{MemoryStore, Store};
use myriad_worker::Worker;
use tokio::task::JoinHandle;

const TTL: Duration = Duration::from_secs(1);

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")
}

fn record(id: &str, role: Role, addr: String, model_id: &str) -> NodeRecord {
    NodeRecord::new(id.parse().unwrap(), role, addr, model_id)
}

/// An in-process worker: its gRPC server and its membership loop.
struct TestWorker {
    worker: Arc<Worker>,
    tasks: Vec<JoinHandle<()>>,
}

impl TestWorker {
    async fn start(id: &str, host: Option<&str>, store: &Arc<dyn Store>, keys: &Keys, model: &Path) -> Self {
        let shape = myriad_worker::backend::model_shape(model).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let worker = Arc::new(Worker::idle(id, shape.clone(), myriad_worker::Device::Cpu).unwrap());
        let membership = myriad_worker::membership::Membership {
            store: store.clone(),
            keys: keys.clone(),
            record: NodeRecord { host: host.map(String::from), ..record(id, Role::Worker, addr, &shape.model_id) },
            model: model.to_path_buf(),
            device: myriad_worker::Device::Cpu,
            lease_ttl: TTL,
            load_retry: myriad_worker::membership::LOAD_RETRY,
        };
        let follow = myriad_worker::membership::join(membership, worker.clone()).await.unwrap();
        let served = worker.clone();
        let tasks = vec![
            tokio::spawn(follow),
            tokio::spawn(async move {
                let _ = myriad_worker::serve(listener, served, None, std::future::pending()).await;
            }),
        ];
        TestWorker { worker, tasks }
    }

    /// As a crash: the server stops answering and the lease is no longer
    /// kept alive (it expires after the TTL).
    fn kill(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// A coordinator of the model in `model`: one replica, no redundancy or
/// move bound, quick to settle.
fn coordinator_config(model: &Path) -> CoordinatorConfig {
    let shape = myriad_worker::backend::model_shape(model).unwrap();
    CoordinatorConfig {
        id: "coordinator-0".parse().unwrap(),
        addr: String::new(),
        model_id: shape.model_id,
        layers: shape.num_layers,
        experts: shape.num_experts,
        expert_bytes: 1,
        replicas: 1,
        redundant: 0,
        max_move: None,
        move_tolerance: 0.01,
        hierarchical: false,
        min_workers: 1,
        settle: Duration::from_millis(50),
        settle_departures: Duration::from_millis(50),
        lease_ttl: TTL,
        rollout_timeout: Duration::from_secs(30),
        load_interval: Duration::from_secs(10),
        tls: None,
    }
}

/// An in-memory store, a coordinator with `config` and a worker per entry
/// of `hosts` (`worker-0`, … on that machine).
async fn start(
    config: CoordinatorConfig,
    hosts: &[Option<&str>],
    model: &Path,
) -> (Arc<dyn Store>, Keys, Vec<TestWorker>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let keys = Keys::new("test");
    let run = myriad_coordinator::run(store.clone(), keys.clone(), config, Default::default(), std::future::pending());
    tokio::spawn(run);
    let mut started = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        started.push(TestWorker::start(&format!("worker-{i}"), *host, &store, &keys, model).await);
    }
    (store, keys, started)
}

async fn wait_for_current(placements: &Mirror, keys: &Keys, want: impl Fn(&PlacementView) -> bool) -> PlacementView {
    let mut changes = placements.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view = PlacementView::read(keys, &changes.borrow_and_update());
        if want(&view) {
            return view;
        }
        tokio::time::timeout_at(deadline, changes.changed()).await.expect("placement did not converge").unwrap();
    }
}

/// Waits until the worker reports ready, as Kubernetes' probe would see it.
async fn wait_ready(w: &TestWorker) {
    let mut ready = w.worker.readiness();
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
        .await
        .expect("a worker of the current placement did not become ready")
        .unwrap();
}

async fn generate(model: &Arc<Model>, experts: &RemoteExperts) -> Vec<u32> {
    let (model, experts) = (model.clone(), experts.clone());
    tokio::task::spawn_blocking(move || {
        let run = myriad_model::generate_with(&model, &[5, 17, 42, 300, 7], 10, &Sampling::greedy(), true, &experts);
        run.expect("generate through the cluster").generated
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_worker_is_replaced_by_a_new_version_without_changing_outputs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let model_dir = tiny();
    let model = Arc::new(Model::load_dense(&model_dir).unwrap());
    let solo =
        myriad_model::generate(&Model::load(&model_dir).unwrap(), &[5, 17, 42, 300, 7], 10, &Sampling::greedy(), true)
            .unwrap()
            .generated;
    let config = CoordinatorConfig { replicas: 2, min_workers: 3, ..coordinator_config(&model_dir) };
    let (store, keys, mut workers) = start(config, &[None; 3], &model_dir).await;

    let experts = RemoteExperts::new(
        Arc::new(WorkerPool::empty()),
        tokio::runtime::Handle::current(),
        model.config.hidden_size,
        Duration::from_secs(10),
        Duration::from_secs(10),
    );
    let membership = myriad_router::membership::Membership {
        store: store.clone(),
        keys: keys.clone(),
        record: record("router-0", Role::Router, String::new(), &model.fingerprint),
        lease_ttl: TTL,
        tls: None,
    };
    let (_stay, stay) = tokio::sync::watch::channel(false);
    let follow = myriad_router::membership::join(membership, experts.clone(), model.config.clone(), stay);
    tokio::spawn(follow.await.unwrap());

    let placements = Mirror::follow(store.clone(), keys.placements()).await.unwrap();
    let view = wait_for_current(&placements, &keys, |v| v.current.is_some()).await;
    let first = view.current().unwrap().clone();
    assert_eq!(first.version, PlacementVersion(1), "one version for the initial burst of joins");
    assert_eq!(first.assignments.len(), 3);
    while !experts.pool().serving() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for w in &workers {
        wait_ready(w).await;
    }
    assert_eq!(generate(&model, &experts).await, solo, "3 workers, 2 replicas");

    // worker-1 dies.
    let killed = Instant::now();
    workers.remove(1).kill();
    let view = wait_for_current(&placements, &keys, |v| {
        v.current().is_some_and(|p| p.assignments.len() == 2) && v.versions.len() == 1
    })
    .await;
    let second = view.current().unwrap();
    assert!(second.version > first.version);
    assert!(second.assignment(&"worker-1".parse().unwrap()).is_none());
    // Read the store itself: the routers' mirror is a second watch and may
    // trail the placements one by a moment.
    let listing = store.list(&keys.nodes(Role::Router)).await.unwrap();
    let acked: Vec<NodeRecord> =
        listing.kvs.iter().map(|kv| myriad_store::schema::decode(&kv.key, &kv.value).unwrap()).collect();
    assert_eq!(acked.len(), 1);
    assert_eq!(acked[0].placement_version, Some(second.version), "the router acknowledged before the release");
    eprintln!("worker killed -> new placement current and the old one released: {:?}", killed.elapsed());
    // Workers follow the release through their own mirrors, a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.iter().any(|w| w.worker.versions() != [Some(second.version.0)]) {
        assert!(Instant::now() < deadline, "survivors did not release the old version");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(generate(&model, &experts).await, solo, "2 survivors");

    // A new worker joins: a version with all three.
    workers.push(TestWorker::start("worker-3", None, &store, &keys, &model_dir).await);
    let view = wait_for_current(&placements, &keys, |v| v.current().is_some_and(|p| p.assignments.len() == 3)).await;
    assert!(view.current().unwrap().assignment(&"worker-3".parse().unwrap()).is_some());
    // Ready (its gRPC health) once it serves the current version.
    wait_ready(&workers[2]).await;
    while experts.pool().workers.len() != 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(generate(&model, &experts).await, solo, "after the join");
}

/// With a move bound of zero, a worker's death costs only its own experts:
/// every survivor keeps every copy it held, and only the dead worker's
/// copies are loaded again, spread over the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_experts_are_all_that_moves() {
    let model_dir = tiny();
    let config = CoordinatorConfig { max_move: Some(0), min_workers: 4, ..coordinator_config(&model_dir) };
    let (store, keys, mut workers) = start(config, &[None; 4], &model_dir).await;
    let placements = Mirror::follow(store.clone(), keys.placements()).await.unwrap();
    let view = wait_for_current(&placements, &keys, |v| v.current().is_some_and(|p| p.assignments.len() == 4)).await;
    let first = view.current().unwrap().clone();
    workers.remove(2).kill();
    let view = wait_for_current(&placements, &keys, |v| v.current().is_some_and(|p| p.assignments.len() == 3)).await;
    let second = view.current().unwrap();
    let copies = |p: &myriad_store::schema::Placement, node: &str| -> Vec<(u32, u32)> {
        let a = p.assignment(&node.parse().unwrap()).expect("placed");
        (0..p.layers)
            .flat_map(|l| (0..p.experts).map(move |e| (l, e)))
            .filter(|&(l, e)| a.experts.contains(l, e))
            .collect()
    };
    let mut loaded = 0;
    for node in ["worker-0", "worker-1", "worker-3"] {
        let (before, after) = (copies(&first, node), copies(second, node));
        assert!(before.iter().all(|c| after.contains(c)), "{node} lost experts it held");
        loaded += after.len() - before.len();
    }
    assert_eq!(loaded, copies(&first, "worker-2").len(), "loaded exactly the dead worker's experts");
}

/// Four workers on two machines, two copies of every expert: the copies
/// are on different machines, so losing a machine loses no expert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experts_copies_are_on_different_machines() {
    let model_dir = tiny();
    let config = CoordinatorConfig { replicas: 2, min_workers: 4, ..coordinator_config(&model_dir) };
    let hosts = [Some("m1"), Some("m1"), Some("m2"), Some("m2")];
    let (store, keys, _workers) = start(config, &hosts, &model_dir).await;
    let placements = Mirror::follow(store.clone(), keys.placements()).await.unwrap();
    let view = wait_for_current(&placements, &keys, |v| v.current().is_some_and(|p| p.assignments.len() == 4)).await;
    let p = view.current().unwrap();
    let machine = |node: &str| if node < "worker-2" { "m1" } else { "m2" };
    for (l, e) in (0..p.layers).flat_map(|l| (0..p.experts).map(move |e| (l, e))) {
        let on: Vec<&str> =
            p.assignments.iter().filter(|a| a.experts.contains(l, e)).map(|a| machine(a.node.as_str())).collect();
        assert_eq!(on.len(), 2);
        assert_ne!(on[0], on[1], "layer {l} expert {e}: both copies on {}", on[0]);
    }
}

/// An idle cluster's measured load is zero everywhere (no request since
/// the leader started, or the load decayed away): a worker that joins it
/// is still given experts, as it would be before any load was measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_an_idle_cluster_is_placed() {
    let model_dir = tiny();
    let config = CoordinatorConfig {
        replicas: 2,
        min_workers: 2,
        load_interval: Duration::from_millis(20),
        ..coordinator_config(&model_dir)
    };
    let (store, keys, mut workers) = start(config, &[None; 2], &model_dir).await;
    let placements = Mirror::follow(store.clone(), keys.placements()).await.unwrap();
    wait_for_current(&placements, &keys, |v| v.current().is_some_and(|p| p.assignments.len() == 2)).await;
    // Several load collections, all of them empty.
    tokio::time::sleep(Duration::from_millis(200)).await;
    workers.push(TestWorker::start("worker-2", None, &store, &keys, &model_dir).await);
    let view = wait_for_current(&placements, &keys, |v| v.current().is_some_and(|p| p.assignments.len() == 3)).await;
    assert!(view.current().unwrap().assignment(&"worker-2".parse().unwrap()).is_some());
}
