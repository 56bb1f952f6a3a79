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
//! - `leader`: the leader's loop (rollout, release, cordons, rebalance).
//! - `load`: polling the workers' per-expert load windows.
//! - [`admin`]: the admin gRPC API `myriad ctl` talks to.
//! - [`health`]: the problems `ctl status` lists, derived from the records.
//! - [`run`]: campaigning and leading.
//! - [`node`]: a running coordinator: its admin API and its campaign.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use myriad_store::Store;
use myriad_store::lease::campaign;
use myriad_store::schema::{self, Keys, Leader, NodeId};
use tokio::sync::Notify;

pub mod admin;
pub mod health;
mod leader;
mod load;
pub mod metrics;
pub mod node;
pub mod placement;

/// What the leader's loop shares with the admin API.
#[derive(Default)]
pub struct Shared {
    state: Mutex<SharedState>,
    /// Wakes the leader's loop for a forced rebalance.
    wake: Notify,
}

#[derive(Default)]
struct SharedState {
    leading: bool,
    /// Decayed per-expert token counts from the workers' load windows.
    load: Option<placement::Load>,
    /// A rebalance was asked for: plan for the measured load even though
    /// membership did not change, with this move bound.
    rebalance: Option<Forced>,
    /// The version being rolled out and since when.
    rollout: Option<(schema::PlacementVersion, std::time::Instant)>,
    /// Rollouts abandoned in a row, and why the last one was.
    abandoned: Option<(usize, String)>,
    /// Why the last plan for the live workers failed, until one succeeds.
    unplaceable: Option<String>,
    /// The live workers (id, address) the current placement was last kept
    /// for although it does not name them all (nothing worth moving to a
    /// worker that joined, or the move bound let it load nothing), and that
    /// placement's version; until a placement is rolled out.
    kept_for: Option<(schema::PlacementVersion, Vec<(NodeId, String)>)>,
    /// Workers a rollout waited for in vain; left out of placement while
    /// their records stay as they were.
    stalled: Vec<schema::Stalled>,
}

/// A rebalance asked for through the admin API.
#[derive(Debug, Clone, Copy)]
struct Forced {
    /// Its move bound, in place of [`CoordinatorConfig::max_move`].
    max_move: Option<u64>,
}

impl SharedState {
    fn rollouts(&self) -> health::Rollouts {
        health::Rollouts {
            running: self.rollout.map(|(v, since)| (v, since.elapsed())),
            abandoned: self.abandoned.clone(),
            unplaceable: self.unplaceable.clone(),
            kept_for: self.kept_for.clone(),
            // Only those whose records have not changed: the caller's
            // `leader::stalled_now`.
            stalled: Vec::new(),
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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
    /// The most bytes of experts one worker may load in a rebalance,
    /// beyond restoring copies lost with departed workers; `None`: no bound.
    pub max_move: Option<u64>,
    /// Balancedness per layer a rebalance may leave unclaimed to move less.
    pub move_tolerance: f64,
    /// Balance across nodes first, then within each (EPLB's hierarchical step).
    pub hierarchical: bool,
    /// Live workers needed before the first placement.
    pub min_workers: usize,
    /// Membership must stay unchanged this long before a new placement, so
    /// a burst of joins (or a rolling restart) makes one version, not many.
    pub settle: Duration,
    /// The same pause when workers only left (none joined): their experts
    /// need a home now, and a draining worker waits for that placement
    /// before it exits.
    pub settle_departures: Duration,
    /// TTL of the leader lease: a dead leader is replaced within it.
    pub lease_ttl: Duration,
    /// Longest wait for workers to load a new version before it is abandoned.
    pub rollout_timeout: Duration,
    /// How often the leader collects the workers' load windows.
    pub load_interval: Duration,
    /// TLS of its calls to workers (None: plaintext).
    pub tls: Option<myriad_tls::ClientTls>,
}

/// Campaigns for leadership and leads until `shutdown` resolves; loses and
/// wins again as the store comes and goes.
pub async fn run(
    store: Arc<dyn Store>,
    keys: Keys,
    config: CoordinatorConfig,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let me = schema::encode(&Leader { id: config.id.clone(), addr: config.addr.clone() });
    let leader_key = keys.leader();
    loop {
        let mut leadership = tokio::select! {
            l = campaign(store.clone(), &leader_key, me.clone(), config.lease_ttl) => l,
            _ = &mut shutdown => return,
        };
        tracing::info!(id = %config.id, "leading the cluster");
        shared.lock().leading = true;
        metrics::LEADING.set(1);
        let result = tokio::select! {
            r = leader::lead(&store, &keys, &config, &shared) => r,
            _ = leadership.lost() => Ok(()),
            _ = &mut shutdown => {
                shared.lock().leading = false;
                metrics::LEADING.set(0);
                metrics::STALLED_WORKERS.set(0);
                leadership.resign().await;
                return;
            }
        };
        shared.lock().leading = false;
        metrics::LEADING.set(0);
        metrics::STALLED_WORKERS.set(0);
        if let Err(e) = result {
            tracing::warn!(error = %e, "leading failed; campaigning again");
        }
        leadership.resign().await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether `id` names a node (used by the admin API on user input).
fn parse_node(id: &str) -> Option<NodeId> {
    id.parse().ok()
}
