//! # myriad-coordinator
//!
//! The control plane. One coordinator leads (elected through the store);
//! it watches which workers are alive and moves the cluster from one
//! numbered placement to the next:
//!
//! 1. membership changes and then stays unchanged for `settle`;
//! 2. it writes placement `v+1` (every routed expert on at least one live
//!    worker);
//! 3. workers named in it load their experts and acknowledge by publishing
//!    `placement_version = v+1` in their node record, still serving `v`;
//! 4. it points `placement/current` at `v+1`; routers switch and acknowledge
//!    the same way;
//! 5. once every router runs `v+1`, it deletes the older versions and
//!    workers release experts only those needed.
//!
//! A request therefore never sees a half-applied placement: a router only
//! dispatches with a version every worker of which has loaded it.
//!
//! # Layout
//!
//! - [`placement`]: the assignment of experts to workers.
//! - [`run`] and the leader's loop below.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use myriad_store::lease::campaign;
use myriad_store::mirror::Mirror;
use myriad_store::schema::{
    self, Assignment, Current, Keys, Leader, NodeId, NodeRecord, Placement, PlacementVersion, PlacementView, Role,
};
use myriad_store::{Store, StoreError};
use tokio::sync::watch;

pub mod placement;

/// What the coordinator places and how patiently.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub id: NodeId,
    /// Its admin API address, published with the leader key.
    pub addr: String,
    /// Fingerprint of the model: workers of another model are not placed.
    pub model_id: String,
    pub layers: usize,
    pub experts: usize,
    /// Bytes one expert takes in a worker's memory (for `--capacity`).
    pub expert_bytes: u64,
    /// Workers hosting each expert (capped by the number of live workers).
    pub replicas: usize,
    /// Extra copies per layer for the hottest experts.
    pub redundant: usize,
    /// Live workers needed before the first placement.
    pub min_workers: usize,
    /// Membership must stay unchanged this long before a new placement, so
    /// a burst of joins (or a rolling restart) makes one version, not many.
    pub settle: Duration,
    /// TTL of the leader lease: a dead leader is replaced within it.
    pub lease_ttl: Duration,
    /// Longest wait for workers to load a new version before it is abandoned.
    pub rollout_timeout: Duration,
}

/// Campaigns for leadership and leads until `shutdown` resolves; loses and
/// wins again as the store comes and goes.
pub async fn run(store: Arc<dyn Store>, keys: Keys, config: CoordinatorConfig, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let me = schema::encode(&Leader { id: config.id.clone(), addr: config.addr.clone() });
    let leader_key = keys.leader();
    loop {
        let mut leadership = tokio::select! {
            l = campaign(store.clone(), &leader_key, me.clone(), config.lease_ttl) => l,
            _ = &mut shutdown => return,
        };
        tracing::info!(id = %config.id, "leading the cluster");
        let result = tokio::select! {
            r = lead(&store, &keys, &config) => r,
            _ = leadership.lost() => Ok(()),
            _ = &mut shutdown => {
                leadership.resign().await;
                return;
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "leading failed; campaigning again");
        }
        leadership.resign().await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The live workers of this model, by id.
fn live_workers(snapshot: &myriad_store::mirror::Snapshot, model_id: &str) -> Vec<NodeRecord> {
    let mut nodes: Vec<NodeRecord> = schema::read_nodes(snapshot)
        .into_iter()
        .filter(|n| {
            let ours = n.model_id == model_id;
            if !ours {
                tracing::warn!(node = %n.id, model = n.model_id, "ignoring a worker of another model");
            }
            ours && n.role == Role::Worker
        })
        .collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    nodes
}

/// Whether `placement` already places exactly these workers at these addresses.
fn matches(placement: &Placement, workers: &[NodeRecord]) -> bool {
    let placed: BTreeSet<(&NodeId, &str)> = placement.assignments.iter().map(|a| (&a.node, a.addr.as_str())).collect();
    let live: BTreeSet<(&NodeId, &str)> = workers.iter().map(|w| (&w.id, w.addr.as_str())).collect();
    placed == live
}

fn plan(config: &CoordinatorConfig, version: PlacementVersion, workers: &[NodeRecord]) -> Option<Placement> {
    let problem = placement::Problem {
        layers: config.layers,
        experts: config.experts,
        expert_bytes: config.expert_bytes,
        capacities: workers.iter().map(|w| w.capacity_bytes).collect(),
        replicas: config.replicas.clamp(1, workers.len()),
        redundant: config.redundant,
    };
    // Load reports are not collected yet: every expert counts the same.
    let plan = match placement::eplb(&problem, &placement::Load::uniform(config.layers, config.experts)) {
        Ok(plan) => plan,
        Err(e) => {
            tracing::error!(workers = workers.len(), error = %e, "cannot place the experts on the live workers");
            return None;
        }
    };
    let assignments = workers
        .iter()
        .zip(plan.specs())
        .filter(|(_, spec)| !spec.is_empty())
        .map(|(w, experts)| Assignment { node: w.id.clone(), addr: w.addr.clone(), experts })
        .collect();
    Some(Placement {
        version,
        model_id: config.model_id.clone(),
        layers: config.layers as u32,
        experts: config.experts as u32,
        assignments,
    })
}

async fn lead(store: &Arc<dyn Store>, keys: &Keys, config: &CoordinatorConfig) -> Result<(), StoreError> {
    let workers = Mirror::follow(store.clone(), keys.nodes(Role::Worker)).await?;
    let routers = Mirror::follow(store.clone(), keys.nodes(Role::Router)).await?;
    let placements = Mirror::follow(store.clone(), keys.placements()).await?;
    let store = &**store;
    let (mut worker_changes, mut router_changes, mut placement_changes) =
        (workers.subscribe(), routers.subscribe(), placements.subscribe());
    loop {
        // After the settle pause, look again: the pause may have let the
        // mirrors catch up with what this leader wrote itself.
        let stale = |live: &[NodeRecord], view: &PlacementView| {
            // `min_workers` only gates the first placement; afterwards
            // survivors take over whatever is left.
            let enough = !live.is_empty() && (view.current.is_some() || live.len() >= config.min_workers);
            enough && view.current().is_none_or(|p| !matches(p, live))
        };
        let (live, view) = read(&workers, &placements, keys, config);
        if stale(&live, &view) && settled(&mut worker_changes, config.settle).await {
            let (live, view) = read(&workers, &placements, keys, config);
            if stale(&live, &view) {
                let newest = view.versions.keys().copied().chain(view.current).max().unwrap_or(PlacementVersion(0));
                let Some(next) = plan(config, PlacementVersion(newest.0 + 1), &live) else {
                    // Wait for membership to change (more workers, more memory).
                    worker_changes.changed().await.ok();
                    continue;
                };
                let proposed = next.version;
                let current = roll_out(store, keys, config, next, &mut worker_changes).await?;
                // Decide next on a view that includes these writes.
                let caught_up = placement_changes.wait_for(|s| {
                    let view = PlacementView::read(keys, s);
                    view.versions.contains_key(&proposed) && (current.is_none() || view.current == current)
                });
                let _ = tokio::time::timeout(config.lease_ttl, caught_up).await;
            }
            continue;
        }
        if let Some(current) = view.current {
            release_old(store, keys, &view, current, &routers.snapshot()).await?;
        }
        tokio::select! {
            _ = worker_changes.changed() => {}
            _ = router_changes.changed() => {}
            _ = placement_changes.changed() => {}
        }
    }
}

fn read(
    workers: &Mirror,
    placements: &Mirror,
    keys: &Keys,
    config: &CoordinatorConfig,
) -> (Vec<NodeRecord>, PlacementView) {
    (live_workers(&workers.snapshot(), &config.model_id), PlacementView::read(keys, &placements.snapshot()))
}

/// Waits until the worker set has not changed for `settle`; false if it
/// changed meanwhile (the caller looks again).
async fn settled(changes: &mut watch::Receiver<myriad_store::mirror::Snapshot>, settle: Duration) -> bool {
    changes.borrow_and_update();
    tokio::select! {
        _ = changes.changed() => false,
        _ = tokio::time::sleep(settle) => true,
    }
}

/// Phase one (workers load `next`) and the switch of `current`; returns
/// the new current version, or `None` if `next` was abandoned.
async fn roll_out(
    store: &dyn Store,
    keys: &Keys,
    config: &CoordinatorConfig,
    next: Placement,
    worker_changes: &mut watch::Receiver<myriad_store::mirror::Snapshot>,
) -> Result<Option<PlacementVersion>, StoreError> {
    let version = next.version;
    // The switch below only happens if nobody moved `current` meanwhile (a
    // leader that stalled past its lease must not undo its successor's work).
    let current_rev = store.get(&keys.current()).await?.map_or(0, |kv| kv.mod_revision);
    store.put(&keys.placement(version), schema::encode(&next), None).await?;
    tracing::info!(%version, workers = next.assignments.len(), "proposed placement; waiting for workers to load it");
    let deadline = tokio::time::Instant::now() + config.rollout_timeout;
    loop {
        let live = live_workers(&worker_changes.borrow_and_update(), &config.model_id);
        let pending: Vec<&NodeId> = next
            .assignments
            .iter()
            .filter(|a| {
                !live.iter().any(|w| w.id == a.node && w.addr == a.addr && w.placement_version >= Some(version))
            })
            .map(|a| &a.node)
            .collect();
        let gone = next.assignments.iter().any(|a| !live.iter().any(|w| w.id == a.node && w.addr == a.addr));
        if pending.is_empty() {
            break;
        }
        // An abandoned version is never reused; it is deleted with the
        // other old ones once a newer version is current.
        if gone {
            tracing::warn!(%version, "a worker left during the rollout; abandoning this version");
            return Ok(None);
        }
        tokio::select! {
            _ = worker_changes.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(%version, ?pending, "workers did not load the placement in time; abandoning it");
                return Ok(None);
            }
        }
    }
    if !store.put_if(&keys.current(), schema::encode(&Current { version }), None, current_rev).await? {
        tracing::warn!(%version, "the current placement changed under this rollout; abandoning it");
        return Ok(None);
    }
    tracing::info!(%version, "placement is current");
    Ok(Some(version))
}

/// Deletes versions older than `current` once every router serves `current`.
async fn release_old(
    store: &dyn Store,
    keys: &Keys,
    view: &PlacementView,
    current: PlacementVersion,
    routers: &myriad_store::mirror::Snapshot,
) -> Result<(), StoreError> {
    let old: Vec<PlacementVersion> = view.versions.keys().copied().filter(|&v| v < current).collect();
    if old.is_empty() {
        return Ok(());
    }
    let behind = schema::read_nodes(routers).into_iter().filter(|r| r.placement_version < Some(current)).count();
    if behind > 0 {
        return Ok(());
    }
    for v in old {
        store.delete(&keys.placement(v)).await?;
        tracing::info!(version = %v, "released placement");
    }
    Ok(())
}
