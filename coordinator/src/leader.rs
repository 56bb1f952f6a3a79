//! The leading coordinator's loop: moves the cluster from placement to
//! placement (see the crate docs), honours cordons and rebalance requests,
//! and releases old versions.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use myriad_store::mirror::{Mirror, Snapshot};
use myriad_store::schema::{
    self, Assignment, Current, Keys, NodeId, NodeRecord, Placement, PlacementVersion, PlacementView, Role, Stalled,
};
use myriad_store::{Store, StoreError};
use tokio::sync::watch;

use crate::{CoordinatorConfig, Shared, load, metrics, placement};

/// The live workers of this model, by id.
pub(crate) fn live_workers(snapshot: &Snapshot, model_id: &str) -> Vec<NodeRecord> {
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

/// Whether placement may use worker `w`: it is not cordoned and does not
/// report experts it cannot load (until they load).
pub(crate) fn placeable(w: &NodeRecord, cordoned: &HashSet<NodeId>) -> bool {
    !cordoned.contains(&w.id) && w.load_failure.is_none()
}

/// The workers of `live` placement may use (see [`placeable`]).
pub(crate) fn schedulable(live: Vec<NodeRecord>, cordoned: &HashSet<NodeId>) -> Vec<NodeRecord> {
    live.into_iter().filter(|w| placeable(w, cordoned)).collect()
}

/// Whether placement still leaves out `stalled`: its record in `workers` (a
/// snapshot of [`Keys::nodes`] of workers) is the one the rollout gave up on.
pub(crate) fn still_stalled(stalled: &Stalled, workers: &Snapshot, keys: &Keys) -> bool {
    workers.get(&keys.node(Role::Worker, &stalled.node)).is_some_and(|kv| kv.mod_revision == stalled.revision)
}

/// The stalled workers placement still leaves out (see [`still_stalled`]).
pub(crate) fn stalled_now(shared: &Shared, workers: &Snapshot, keys: &Keys) -> Vec<Stalled> {
    let stalled = shared.lock().stalled.clone();
    stalled.into_iter().filter(|s| still_stalled(s, workers, keys)).collect()
}

/// `live` without the workers of `stalled` (pass [`stalled_now`]).
pub(crate) fn without_stalled(live: Vec<NodeRecord>, stalled: &[Stalled]) -> Vec<NodeRecord> {
    live.into_iter().filter(|w| !stalled.iter().any(|s| s.node == w.id)).collect()
}

/// The stalled workers an earlier leader recorded, for this one to leave out too.
async fn recorded_stalled(store: &dyn Store, keys: &Keys) -> Result<Vec<Stalled>, StoreError> {
    let listing = store.list(&keys.stalled()).await?;
    let stalled = listing.kvs.iter().filter_map(|kv| {
        schema::decode::<Stalled>(&kv.key, &kv.value).inspect_err(|e| tracing::warn!(error = %e, "ignoring it")).ok()
    });
    Ok(stalled.collect())
}

/// Whether `placement` already places exactly these workers at these addresses.
fn matches(placement: &Placement, workers: &[NodeRecord]) -> bool {
    let placed: BTreeSet<(&NodeId, &str)> = placement.assignments.iter().map(|a| (&a.node, a.addr.as_str())).collect();
    let live: BTreeSet<(&NodeId, &str)> = workers.iter().map(|w| (&w.id, w.addr.as_str())).collect();
    placed == live
}

/// The placement problem for these workers.
pub(crate) fn problem(config: &CoordinatorConfig, workers: &[NodeRecord]) -> placement::Problem {
    placement::Problem {
        layers: config.layers,
        experts: config.experts,
        expert_bytes: config.expert_bytes,
        capacities: workers.iter().map(|w| w.capacity_bytes).collect(),
        replicas: config.replicas.clamp(1, workers.len().max(1)),
        redundant: config.redundant,
        nodes: placement::domain_indices(workers.iter().map(|w| w.host.as_deref())),
        zones: if workers.iter().any(|w| w.zone.is_some()) {
            placement::domain_indices(workers.iter().map(|w| w.zone.as_deref()))
        } else {
            Vec::new()
        },
        hierarchical: config.hierarchical,
    }
}

/// The measured load, or every expert equal before any report.
pub(crate) fn measured_load(config: &CoordinatorConfig, shared: &Shared) -> placement::Load {
    shared.lock().load.clone().unwrap_or_else(|| placement::Load::uniform(config.layers, config.experts))
}

/// The load placement plans for and its balancedness is measured on: the
/// measured load with each layer that saw no token counting every expert
/// equal (see [`placement::Load::idle_layers_uniform`]).
pub(crate) fn planning_load(config: &CoordinatorConfig, shared: &Shared) -> placement::Load {
    measured_load(config, shared).idle_layers_uniform()
}

/// The next placement for `workers` on `load` (a [`planning_load`]):
/// moved as little as the config allows from `current` (see
/// [`placement::rebalance`]), or fresh without one.
pub(crate) fn plan(
    config: &CoordinatorConfig,
    version: PlacementVersion,
    workers: &[NodeRecord],
    load: &placement::Load,
    current: Option<&Placement>,
    max_move: Option<u64>,
) -> Result<Placement, placement::PlanError> {
    let problem = problem(config, workers);
    let same_shape = |c: &&Placement| c.layers as usize == config.layers && c.experts as usize == config.experts;
    let planned = match current.filter(same_shape) {
        Some(current) => {
            let now = plan_over(current, workers);
            let migration = placement::Migration { current: &now, max_move, tolerance: config.move_tolerance };
            placement::rebalance(&problem, load, &migration)
        }
        None => placement::eplb(&problem, load),
    };
    let plan = planned?;
    let assignments = workers
        .iter()
        .zip(plan.specs())
        .filter(|(_, spec)| !spec.is_empty())
        .map(|(w, experts)| Assignment { node: w.id.clone(), addr: w.addr.clone(), experts })
        .collect();
    Ok(Placement {
        version,
        model_id: config.model_id.clone(),
        layers: config.layers as u32,
        experts: config.experts as u32,
        assignments,
    })
}

/// `placement` over `workers`, by index: a worker holds what the
/// placement assigns to its id at its address (one that came back at
/// another address restarted, and holds nothing).
pub(crate) fn plan_over(placement: &Placement, workers: &[NodeRecord]) -> placement::Plan {
    let assigned: Vec<Option<&Assignment>> =
        workers.iter().map(|w| placement.assignment(&w.id).filter(|a| a.addr == w.addr)).collect();
    let holders = (0..placement.layers)
        .map(|l| {
            (0..placement.experts)
                .map(|e| {
                    (0..workers.len()).filter(|&w| assigned[w].is_some_and(|a| a.experts.contains(l, e))).collect()
                })
                .collect()
        })
        .collect();
    placement::Plan { workers: workers.len(), holders }
}

pub(crate) async fn lead(
    store: &Arc<dyn Store>,
    keys: &Keys,
    config: &CoordinatorConfig,
    shared: &Arc<Shared>,
) -> Result<(), StoreError> {
    let workers = Mirror::follow(store.clone(), keys.nodes(Role::Worker)).await?;
    let routers = Mirror::follow(store.clone(), keys.nodes(Role::Router)).await?;
    let placements = Mirror::follow(store.clone(), keys.placements()).await?;
    let cordons = Mirror::follow(store.clone(), keys.cordons()).await?;
    let _load = load::collect(workers.subscribe(), config, shared.clone());
    let store = &**store;
    shared.lock().stalled = recorded_stalled(store, keys).await?;
    let (mut worker_changes, mut router_changes, mut placement_changes, mut cordon_changes) =
        (workers.subscribe(), routers.subscribe(), placements.subscribe(), cordons.subscribe());
    let read = || {
        let cordoned = cordoned(keys, &cordons.snapshot());
        let snapshot = workers.snapshot();
        let live = schedulable(live_workers(&snapshot, &config.model_id), &cordoned);
        // Stalled workers whose record changed are placed again.
        let stalled = stalled_now(shared, &snapshot, keys);
        metrics::STALLED_WORKERS.set(stalled.len() as i64);
        (without_stalled(live, &stalled), PlacementView::read(keys, &placements.snapshot()))
    };
    let membership = |live: &[NodeRecord]| -> Vec<(NodeId, String)> {
        live.iter().map(|w| (w.id.clone(), w.addr.clone())).collect()
    };
    // Planning again for the workers the current placement was kept for
    // decides the same, so only a change of them, or a rebalance request,
    // plans again.
    {
        let mut state = shared.lock();
        (state.unplaceable, state.kept_for) = (None, None);
    }
    loop {
        // After the settle pause, look again: the pause may have let the
        // mirrors catch up with what this leader wrote itself.
        let stale = |live: &[NodeRecord], view: &PlacementView| {
            // `min_workers` only gates the first placement; afterwards
            // survivors take over whatever is left.
            let enough = !live.is_empty() && (view.current.is_some() || live.len() >= config.min_workers);
            let forced = shared.lock().rebalance.is_some() && !live.is_empty();
            let kept = shared.lock().kept_for.as_ref().is_some_and(|(_, k)| *k == membership(live));
            forced || (enough && !kept && view.current().is_none_or(|p| !matches(p, live)))
        };
        let (live, view) = read();
        if stale(&live, &view) {
            // Membership moved during the pause: look again from the top.
            // `settled` consumed that change, so waiting for the next one
            // below would sleep through this one (a burst of two kills
            // stalled re-placement for minutes that way).
            // Only departures (every live worker already placed as it is):
            // the shorter pause; joins wait for the burst to end.
            let departures = view
                .current()
                .is_some_and(|p| live.iter().all(|w| p.assignment(&w.id).is_some_and(|a| a.addr == w.addr)));
            let settle = if departures { config.settle_departures } else { config.settle };
            if !settled(&mut worker_changes, settle).await {
                continue;
            }
            let (live, view) = read();
            if stale(&live, &view) {
                let forced = shared.lock().rebalance.take();
                let newest = view.versions.keys().copied().chain(view.current).max().unwrap_or(PlacementVersion(0));
                let load = planning_load(config, shared);
                let max_move = forced.map_or(config.max_move, |f| f.max_move);
                let version = PlacementVersion(newest.0 + 1);
                let next = match plan(config, version, &live, &load, view.current(), max_move) {
                    Ok(next) => {
                        shared.lock().unplaceable = None;
                        metrics::BALANCEDNESS.set(plan_over(&next, &live).balancedness(&load));
                        next
                    }
                    Err(e) => {
                        tracing::error!(workers = live.len(), error = %e, "cannot place the experts on the live workers");
                        shared.lock().unplaceable = Some(e.to_string());
                        // Wait for more workers or more memory: a worker
                        // that joins or comes back, an uncordon, a rebalance.
                        tokio::select! {
                            _ = worker_changes.changed() => {}
                            _ = cordon_changes.changed() => {}
                            _ = shared.wake.notified() => {}
                        }
                        continue;
                    }
                };
                if let Some(current) = view.current().filter(|c| c.assignments == next.assignments) {
                    metrics::PLANS_KEPT.inc();
                    let idle: Vec<&str> =
                        live.iter().filter(|w| next.assignment(&w.id).is_none()).map(|w| w.id.as_str()).collect();
                    let why = if forced.is_some() { "rebalance requested" } else { "membership changed" };
                    tracing::info!(?idle, "{why}; the current placement stays (nothing worth moving)");
                    shared.lock().kept_for = Some((current.version, membership(&live)));
                    continue;
                }
                shared.lock().kept_for = None;
                let registered = live_workers(&workers.snapshot(), &config.model_id);
                log_decision(&next, view.current(), &live, &registered, forced.is_some());
                let proposed = next.version;
                shared.lock().rollout = Some((proposed, std::time::Instant::now()));
                let timer = metrics::ROLLOUT_SECONDS.start_timer();
                let outcome = roll_out(store, keys, config, next, &mut worker_changes).await;
                // Recorded for the next leader before they take effect here.
                if let Ok(Err(abandoned)) = &outcome {
                    for s in &abandoned.stalled {
                        store.put(&keys.stalled_worker(&s.node), schema::encode(s), None).await?;
                    }
                }
                match &outcome {
                    Ok(Ok(version)) => {
                        timer.observe_duration();
                        metrics::ROLLOUTS.with_label_values(&["current"]).inc();
                        metrics::PLACEMENT_VERSION.set(version.0 as i64);
                    }
                    Ok(Err(_)) => metrics::ROLLOUTS.with_label_values(&["abandoned"]).inc(),
                    Err(_) => {}
                }
                let current = {
                    let mut state = shared.lock();
                    state.rollout = None;
                    match &outcome {
                        Ok(Ok(_)) => state.abandoned = None,
                        Ok(Err(abandoned)) => {
                            let count = state.abandoned.as_ref().map_or(0, |(n, _)| *n) + 1;
                            state.abandoned = Some((count, abandoned.why.clone()));
                            state.stalled.retain(|s| !abandoned.stalled.iter().any(|new| new.node == s.node));
                            state.stalled.extend(abandoned.stalled.iter().cloned());
                        }
                        Err(_) => {}
                    }
                    outcome?.ok()
                };
                // Decide next on a view that includes these writes.
                let caught_up = placement_changes.wait_for(|s| {
                    let view = PlacementView::read(keys, s);
                    view.versions.contains_key(&proposed) && (current.is_none() || view.current == current)
                });
                let _ = tokio::time::timeout(config.lease_ttl, caught_up).await;
            }
            continue;
        }
        // Nothing to place (any more): a failed plan no longer matters.
        shared.lock().unplaceable = None;
        forget_unstalled(store, keys, shared, &workers.snapshot()).await?;
        if let Some(current) = view.current {
            release_old(store, keys, &view, current, &routers.snapshot()).await?;
        }
        tokio::select! {
            _ = worker_changes.changed() => {}
            _ = router_changes.changed() => {}
            _ = placement_changes.changed() => {}
            _ = cordon_changes.changed() => {}
            _ = shared.wake.notified() => {}
        }
    }
}

/// Forgets (here and in the store) the stalled workers whose record changed
/// or that left.
async fn forget_unstalled(
    store: &dyn Store,
    keys: &Keys,
    shared: &Shared,
    workers: &Snapshot,
) -> Result<(), StoreError> {
    let stalled = shared.lock().stalled.clone();
    for s in stalled.iter().filter(|s| !still_stalled(s, workers, keys)) {
        store.delete(&keys.stalled_worker(&s.node)).await?;
        tracing::info!(node = %s.node, "a stalled worker's load ended, or it restarted: placement may use it again");
        shared.lock().stalled.retain(|kept| kept != s);
    }
    Ok(())
}

/// Logs a placement decision at info: the version, why, and how much moved;
/// `live` are the workers it places, `registered` every live one (the
/// others are cordoned, failed to load or stalled).
fn log_decision(
    next: &Placement,
    current: Option<&Placement>,
    live: &[NodeRecord],
    registered: &[NodeRecord],
    forced: bool,
) {
    let placed = |p: &Placement| -> BTreeSet<(NodeId, u32, u32)> {
        let mut copies = BTreeSet::new();
        for a in &p.assignments {
            for l in 0..p.layers {
                for e in 0..p.experts {
                    if a.experts.contains(l, e) {
                        copies.insert((a.node.clone(), l, e));
                    }
                }
            }
        }
        copies
    };
    let new = placed(next);
    let old = current.map(placed).unwrap_or_default();
    let (loaded, dropped) = (new.difference(&old).count(), old.difference(&new).count());
    let was: BTreeSet<&NodeId> = current.iter().flat_map(|p| p.assignments.iter().map(|a| &a.node)).collect();
    let now: BTreeSet<&NodeId> = live.iter().map(|w| &w.id).collect();
    let joined: Vec<&str> = now.difference(&was).map(|id| id.as_str()).collect();
    let (left, left_out): (Vec<&str>, Vec<&str>) =
        was.difference(&now).map(|id| id.as_str()).partition(|id| !registered.iter().any(|w| w.id.as_str() == *id));
    let reason = match (forced, current) {
        (true, _) => "rebalance requested",
        (false, None) => "first placement",
        (false, Some(_)) if !joined.is_empty() || !left.is_empty() || !left_out.is_empty() => "membership changed",
        (false, Some(_)) => "a worker moved",
    };
    tracing::info!(
        version = %next.version,
        reason,
        workers = live.len(),
        ?joined,
        ?left,
        ?left_out,
        copies_loaded = loaded,
        copies_dropped = dropped,
        "placing the experts"
    );
}

/// The cordoned node ids under a snapshot of [`Keys::cordons`].
pub(crate) fn cordoned(keys: &Keys, snapshot: &Snapshot) -> HashSet<NodeId> {
    snapshot.keys().filter_map(|k| k.strip_prefix(&keys.cordons())).filter_map(|id| id.parse().ok()).collect()
}

/// Waits until the worker set has not changed for `settle`; false if it
/// changed meanwhile (the caller looks again).
async fn settled(changes: &mut watch::Receiver<Snapshot>, settle: Duration) -> bool {
    changes.borrow_and_update();
    tokio::select! {
        _ = changes.changed() => false,
        _ = tokio::time::sleep(settle) => true,
    }
}

/// Why a rollout was abandoned, and the workers it waited for in vain.
struct Abandoned {
    why: String,
    stalled: Vec<Stalled>,
}

impl Abandoned {
    fn because(why: impl Into<String>) -> Self {
        Abandoned { why: why.into(), stalled: Vec::new() }
    }
}

/// Phase one (workers load `next`) and the switch of `current`; returns
/// the new current version, or why `next` was abandoned.
async fn roll_out(
    store: &dyn Store,
    keys: &Keys,
    config: &CoordinatorConfig,
    next: Placement,
    worker_changes: &mut watch::Receiver<Snapshot>,
) -> Result<Result<PlacementVersion, Abandoned>, StoreError> {
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
        let failed = next.assignments.iter().find_map(|a| {
            let w = live.iter().find(|w| w.id == a.node && w.addr == a.addr)?;
            w.load_failure.as_ref().filter(|f| f.version == version).map(|f| (&a.node, &f.error))
        });
        if let Some((node, error)) = failed {
            tracing::warn!(%version, %node, %error, "a worker cannot load its experts; abandoning this version");
            return Ok(Err(Abandoned::because(format!("worker {node} could not load its experts: {error}"))));
        }
        // An abandoned version is never reused; it is deleted with the
        // other old ones once a newer version is current.
        if gone {
            tracing::warn!(%version, "a worker left during the rollout; abandoning this version");
            return Ok(Err(Abandoned::because("a worker it names left during the rollout")));
        }
        tokio::select! {
            _ = worker_changes.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    %version, ?pending,
                    "workers did not load the placement in time; abandoning it and leaving them out of placement"
                );
                let snapshot = worker_changes.borrow();
                let stalled = pending
                    .iter()
                    .filter_map(|&node| {
                        let kv = snapshot.get(&keys.node(Role::Worker, node))?;
                        Some(Stalled { node: node.clone(), version, revision: kv.mod_revision })
                    })
                    .collect();
                let pending: Vec<&str> = pending.iter().map(|n| n.as_str()).collect();
                let why = format!("worker(s) {} did not load it in time", pending.join(", "));
                return Ok(Err(Abandoned { why, stalled }));
            }
        }
    }
    if !store.put_if(&keys.current(), schema::encode(&Current { version }), None, current_rev).await? {
        tracing::warn!(%version, "the current placement changed under this rollout; abandoning it");
        return Ok(Err(Abandoned::because("the current placement changed under it")));
    }
    tracing::info!(%version, "placement is current");
    Ok(Ok(version))
}

/// Deletes versions older than `current` once every router serves `current`.
async fn release_old(
    store: &dyn Store,
    keys: &Keys,
    view: &PlacementView,
    current: PlacementVersion,
    routers: &Snapshot,
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
