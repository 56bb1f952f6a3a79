//! A whole cluster in this process, for `myriad up` and `myriad generate
//! --workers N`: an in-memory store, a coordinator (with its admin API for
//! `myriad ctl`, when asked), N expert workers on loopback gRPC ports, and
//! routers that join it. Everything but the store talks exactly as
//! separate processes do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use myriad_coordinator::CoordinatorConfig;
use myriad_coordinator::node::AdminApi;
use myriad_model::ModelConfig;
use myriad_router::RemoteExperts;
use myriad_store::schema::{Keys, NodeRecord, Role};

use myriad_router::membership::{Membership, record, wait_serving};
use myriad_router::node::Experts;
use myriad_store::{MemoryStore, Store};
use myriad_worker::{Device, Node, Worker};
use tokio::net::TcpListener;

/// Node lease TTL inside one process: only a crash of the whole process
/// ends it, so it only bounds how long a dropped node lingers.
const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the coordinator collects the workers' per-expert load: often,
/// since in one process it costs a loopback call per worker.
const LOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for the first placement to be loaded and served.
pub const FIRST_PLACEMENT: Duration = Duration::from_secs(300);

pub struct LocalCluster {
    store: Arc<dyn Store>,
    keys: Keys,
    model_id: String,
    /// Where the coordinator's admin API (`myriad ctl`) listens, if served.
    pub admin: Option<String>,
}

/// The coordinator's admin API for a local cluster: its listener and token.
pub struct Admin {
    pub listener: TcpListener,
    pub token: Option<String>,
}

impl LocalCluster {
    /// Starts the store, the coordinator and `workers` workers computing on
    /// `device` on the current runtime. The coordinator places every expert on `replicas`
    /// workers once all have registered.
    pub async fn start(
        model: &Path,
        workers: usize,
        replicas: usize,
        device: Device,
        admin: Option<Admin>,
    ) -> Result<Self> {
        if workers == 0 || replicas == 0 || replicas > workers {
            bail!("--replicas must be between 1 and --workers ({workers}), got {replicas}");
        }
        device.check().with_context(|| format!("--device {device}"))?;
        let shape = myriad_worker::backend::model_shape(model)
            .with_context(|| format!("read the model in {}", model.display()))?;
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let keys = Keys::new("local");
        let admin_addr = match &admin {
            Some(a) => Some(a.listener.local_addr().context("read the admin address")?.to_string()),
            None => None,
        };
        let config = CoordinatorConfig {
            id: node_id("coordinator-0")?,
            addr: admin_addr.clone().unwrap_or_default(),
            model_id: shape.model_id.clone(),
            layers: shape.num_layers,
            experts: shape.num_experts,
            expert_bytes: crate::plan::model_expert_bytes(model)?,
            replicas,
            redundant: 0,
            max_move: None,
            move_tolerance: 0.01,
            hierarchical: false,
            min_workers: workers,
            settle: Duration::from_millis(100),
            settle_departures: Duration::from_millis(100),
            lease_ttl: LEASE_TTL,
            rollout_timeout: FIRST_PLACEMENT,
            load_interval: LOAD_INTERVAL,
            tls: None,
        };
        let admin = admin.map(|Admin { listener, token }| AdminApi { listener, token, tls: None });
        let coordinator = myriad_coordinator::node::Node { store: store.clone(), keys: keys.clone(), config, admin };
        tokio::spawn(coordinator.run(std::future::pending()));
        for i in 0..workers {
            let listener = TcpListener::bind("127.0.0.1:0").await.context("bind a loopback port")?;
            let addr = listener.local_addr().context("read the bound address")?.to_string();
            let id = node_id(&format!("worker-{i}"))?;
            let worker = Arc::new(Worker::idle(id.as_str(), shape.clone(), device)?);
            let record = NodeRecord::new(id, Role::Worker, addr, &shape.model_id);
            let record = myriad_worker::membership::describe(record, &worker, None);
            let membership = myriad_worker::membership::Membership {
                store: store.clone(),
                keys: keys.clone(),
                record,
                model: model.to_path_buf(),
                device,
                lease_ttl: LEASE_TTL,
                load_retry: myriad_worker::membership::LOAD_RETRY,
            };
            let node =
                Node { listener, tls: None, worker, membership: Some(membership), drain_timeout: Duration::ZERO };
            tokio::spawn(async move {
                if let Err(e) = node.run(std::future::pending()).await {
                    tracing::error!(worker = i, error = %e, "in-process worker stopped");
                }
            });
        }
        Ok(LocalCluster { store, keys, model_id: shape.model_id, admin: admin_addr })
    }

    /// Where a router node that joins this cluster as `id` learns placement.
    pub fn router(&self, id: &str) -> Result<Experts> {
        Ok(Experts::Cluster {
            store: self.store.clone(),
            keys: self.keys.clone(),
            id: node_id(id)?,
            lease_ttl: LEASE_TTL,
        })
    }

    /// Joins `experts` to the cluster as router `id` and waits until it
    /// dispatches with the first placement.
    pub async fn attach_router(&self, id: &str, experts: &RemoteExperts, config: &ModelConfig) -> Result<()> {
        let (store, keys, record) = (self.store.clone(), self.keys.clone(), record(node_id(id)?, &self.model_id));
        // The handle is dropped: the router stays a member for the life of
        // the process (a dropped handle neither stops nor unregisters it).
        let membership = Membership { store, keys, record, lease_ttl: LEASE_TTL, tls: None };
        let _ = myriad_router::membership::start(membership, experts, config);
        wait_serving(experts, FIRST_PLACEMENT).await.map_err(anyhow::Error::msg)
    }
}

fn node_id(id: &str) -> Result<myriad_store::schema::NodeId> {
    id.parse().map_err(anyhow::Error::msg)
}
