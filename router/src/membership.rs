//! A router in a cluster: registered in the store, dispatching with the
//! current placement version and acknowledging each switch so the
//! coordinator can retire older versions.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use myriad_model::ModelConfig;
use myriad_store::lease::Registration;
use myriad_store::mirror::Mirror;
use myriad_store::schema::{self, DispatchHealth, Keys, NodeId, NodeRecord, Placement, PlacementView, Role};
use myriad_store::{Store, StoreError};
use tokio::sync::watch;

use crate::dispatch::RemoteExperts;
use crate::pool::{Target, WorkerPool};

/// Pause before trying again to connect to a placement's workers.
const RETRY: Duration = Duration::from_secs(1);
/// How often the router looks at its pool's health to publish changes.
const HEALTH_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Membership {
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    /// What it publishes; `placement_version` is kept up to date here.
    pub record: NodeRecord,
    pub lease_ttl: Duration,
    /// TLS of its calls to workers (None: plaintext).
    pub tls: Option<myriad_tls::ClientTls>,
}

/// A router's record in the cluster store: serving no placement yet.
pub fn record(id: NodeId, model_id: &str) -> NodeRecord {
    NodeRecord::new(id, Role::Router, String::new(), model_id)
}

/// Waits until `experts` dispatches with a complete placement.
pub async fn wait_serving(experts: &RemoteExperts, timeout: Duration) -> Result<(), String> {
    let waited = tokio::time::timeout(timeout, async {
        while !experts.pool().serving() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    waited.await.map_err(|_| format!("no placement was served within {timeout:?}"))
}

/// Registers the router and returns the loop that switches `experts` to
/// each new current placement; it runs until dropped, or until `leave`
/// turns true: then it unregisters (revoking its lease) and ends.
pub async fn join(
    m: Membership,
    experts: RemoteExperts,
    config: ModelConfig,
    leave: watch::Receiver<bool>,
) -> Result<impl Future<Output = ()>, StoreError> {
    let mirror = Mirror::follow(m.store.clone(), m.keys.placements()).await?;
    let key = m.keys.node(m.record.role, &m.record.id);
    let registration = Registration::start(m.store.clone(), key, schema::encode(&m.record), m.lease_ttl).await?;
    Ok(follow(m, experts, config, mirror, registration, leave))
}

/// A router's membership started by [`start`]: joins once the store
/// answers, follows placement, and leaves when asked.
pub struct Member {
    leave: watch::Sender<bool>,
    /// Whether it had joined when it ended.
    task: tokio::task::JoinHandle<bool>,
}

/// Starts `m`'s registration and placement-following on the current
/// runtime: it joins once the store answers, and the router serves
/// meanwhile, not ready.
pub fn start(m: Membership, experts: &RemoteExperts, config: &ModelConfig) -> Member {
    let (leave, leaving) = watch::channel(false);
    let (experts, config) = (experts.clone(), config.clone());
    let task = tokio::spawn(async move {
        let joined = myriad_store::retry::until_joined_unless_leaving("register the router", &leaving, || {
            join(m.clone(), experts.clone(), config.clone(), leaving.clone())
        });
        // Asked to leave before it ever joined: nothing to unregister.
        let Some(follow) = joined.await else { return false };
        follow.await;
        true
    });
    Member { leave, task }
}

impl Member {
    /// Leaves the cluster: its record goes with its lease, at once, so the
    /// coordinator need not wait a lease TTL to release old placement
    /// versions (and so to let workers drain). Waits at most `limit`.
    pub async fn leave(self, limit: Duration) {
        self.leave.send_replace(true);
        let Member { mut task, .. } = self;
        match tokio::time::timeout(limit, &mut task).await {
            Ok(Ok(true)) => tracing::info!("left the cluster"),
            Ok(Ok(false)) => tracing::info!("stopped before it had joined the cluster"),
            Ok(Err(e)) => tracing::warn!(error = %e, "membership failed; the record expires with its lease"),
            Err(_) => {
                task.abort();
                tracing::warn!("could not unregister; the record expires with its lease");
            }
        }
    }
}

async fn follow(
    m: Membership,
    experts: RemoteExperts,
    config: ModelConfig,
    mirror: Mirror,
    registration: Registration,
    mut leave: watch::Receiver<bool>,
) {
    let mut record = m.record;
    let mut changes = mirror.subscribe();
    let mut health = tokio::time::interval(HEALTH_EVERY);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let view = PlacementView::read(&m.keys, &changes.borrow_and_update());
        let wanted = view.current().filter(|p| Some(p.version) != record.placement_version);
        let mut pending = false;
        if let Some(placement) = wanted {
            match switch(placement, &experts, &config, &record.model_id, m.tls.as_ref()).await {
                Ok(()) => {
                    record.placement_version = Some(placement.version);
                    record.dispatch = Some(dispatch_health(&experts));
                    registration.update(schema::encode(&record));
                    tracing::info!(version = %placement.version, "dispatching with a new placement");
                }
                Err(e) => {
                    tracing::warn!(version = %placement.version, error = %e, "cannot switch placement yet");
                    pending = true;
                }
            }
        }
        tokio::select! {
            // A dropped sender never asks to leave.
            true = async { leave.wait_for(|leave| *leave).await.is_ok() } => {
                registration.close().await;
                return;
            }
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if pending => {}
            _ = health.tick() => {
                let now = Some(dispatch_health(&experts));
                if now != record.dispatch {
                    record.dispatch = now;
                    registration.update(schema::encode(&record));
                }
            }
        }
    }
}

fn dispatch_health(experts: &RemoteExperts) -> DispatchHealth {
    let pool = experts.pool();
    let health = DispatchHealth { ready: pool.serving(), down: pool.down() };
    crate::metrics::SERVING.set(i64::from(health.ready));
    crate::metrics::WORKERS_DOWN.set(health.down.len() as i64);
    health
}

async fn switch(
    placement: &Placement,
    experts: &RemoteExperts,
    config: &ModelConfig,
    model_id: &str,
    tls: Option<&myriad_tls::ClientTls>,
) -> Result<(), String> {
    if placement.model_id != model_id {
        return Err(format!("it places model {}, this router runs {model_id}", placement.model_id));
    }
    let targets: Vec<Target> = placement
        .assignments
        .iter()
        .map(|a| Target { addr: a.addr.clone(), experts: Some(a.experts.clone()) })
        .collect();
    let pool = WorkerPool::connect(&targets, config, model_id, tls).await.map_err(|e| e.to_string())?;
    experts.set_pool(Arc::new(pool));
    Ok(())
}
