//! A worker in a cluster: registered in the store under a lease, loading
//! the experts each placement version assigns it, acknowledging versions it
//! has loaded and releasing those the coordinator has retired.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use myriad_proto::spec::ExpertSpec;
use myriad_store::lease::Registration;
use myriad_store::mirror::{Mirror, Snapshot};
use myriad_store::schema::{self, Keys, LoadFailure, NodeRecord, Placement, PlacementVersion, PlacementView};
use myriad_store::{Store, StoreError};
use tokio::sync::watch;

use crate::backend::ExpertBackend;
use crate::device::Device;
use crate::metrics::Metrics;
use crate::worker::Worker;

/// How a worker joins the cluster.
#[derive(Clone)]
pub struct Membership {
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    /// What it publishes; `placement_version` is kept up to date here.
    pub record: NodeRecord,
    /// The model folder it loads experts from.
    pub model: PathBuf,
    /// Where it runs them.
    pub device: Device,
    /// Its registration's lease TTL: it leaves the placement this long after dying.
    pub lease_ttl: Duration,
    /// After experts fail to load, how long before it tries them again;
    /// doubling with each failure up to [`LOAD_RETRY_MAX`].
    pub load_retry: Duration,
}

/// The first wait before a worker tries again experts it could not load.
pub const LOAD_RETRY: Duration = Duration::from_secs(10);

/// The longest wait between two tries.
pub const LOAD_RETRY_MAX: Duration = Duration::from_secs(300);

/// What a cluster worker publishes: `record` with where `worker`'s experts
/// live and that device's memory, and its capacity for placement:
/// `capacity` where given, else on a GPU [`gpu_capacity`] of its memory.
pub fn describe(record: NodeRecord, worker: &Worker, capacity: Option<u64>) -> NodeRecord {
    let (device, memory) = worker.device();
    let capacity = match device {
        Device::Cuda(_) => capacity.or(Some(gpu_capacity(memory))),
        Device::Cpu => capacity,
    };
    NodeRecord {
        capacity_bytes: capacity,
        device: Some(device.to_string()),
        device_memory_bytes: (memory > 0).then_some(memory),
        ..record
    }
}

/// Bytes of a GPU's memory a worker offers placement when it is given no
/// capacity: 90%. The rest holds the CUDA context, the kernels and the
/// buffers of the batches in flight.
pub fn gpu_capacity(memory: u64) -> u64 {
    memory / 10 * 9
}

/// Registers the worker (failing if the store is unreachable) and returns
/// the loop that applies placements; it runs until dropped.
pub async fn join(m: Membership, worker: Arc<Worker>) -> Result<impl Future<Output = ()>, StoreError> {
    let (mirror, registration) = register(&m).await?;
    Ok(apply_placements(m, worker, mirror, registration, None))
}

/// Follows the placements and writes the worker's record under a lease.
async fn register(m: &Membership) -> Result<(Mirror, Registration), StoreError> {
    let mirror = Mirror::follow(m.store.clone(), m.keys.placements()).await?;
    let key = m.keys.node(m.record.role, &m.record.id);
    let registration = Registration::start(m.store.clone(), key, schema::encode(&m.record), m.lease_ttl).await?;
    Ok((mirror, registration))
}

/// A worker's whole membership: registers once the store answers (the
/// worker serves meanwhile, unready), applies placements, and when `leave`
/// fires (a load in progress is given up) revokes its registration (so the
/// coordinator moves its experts at once instead of after the lease TTL)
/// and returns once no placement version it loaded names it: from then on
/// no router sends it work.
pub async fn run(m: Membership, worker: Arc<Worker>, leave: watch::Receiver<bool>) {
    let joined = myriad_store::retry::until_joined_unless_leaving("register the worker", &leave, || register(&m));
    // Asked to leave before it ever joined: nothing to hand over.
    let Some((mirror, registration)) = joined.await else { return };
    apply_placements(m, worker, mirror, registration, Some(leave)).await
}

async fn apply_placements(
    m: Membership,
    worker: Arc<Worker>,
    mirror: Mirror,
    registration: Registration,
    mut leave: Option<watch::Receiver<bool>>,
) {
    let mut record = m.record;
    let mut registration = Some(registration);
    let mut changes = mirror.subscribe();
    // Backends by version, for sharing experts between versions.
    let mut loaded: Vec<(PlacementVersion, Arc<dyn ExpertBackend>)> = Vec::new();
    // The newest version it failed to load: never loaded again, the leader
    // abandons it.
    let mut failed: Option<PlacementVersion> = None;
    let mut retry = Retry::new(m.load_retry);
    // What a retry loaded, shared by the next placement's load: once the
    // worker loads again the leader places it, most likely with the
    // experts that failed, which are then not read twice.
    let mut retried: Option<Arc<dyn ExpertBackend>> = None;
    loop {
        if leave.as_ref().is_some_and(|l| *l.borrow()) {
            if let Some(r) = registration.take() {
                r.close().await;
                tracing::info!(node = %record.id, "left the cluster; serving until the placement moves on");
            }
            // Done once no version it loaded names it: the coordinator
            // releases old versions only when every router dispatches with
            // a newer one. One it never loaded cannot become current (that
            // waits for its acknowledgement): nothing to hand over.
            let view = PlacementView::read(&m.keys, &changes.borrow_and_update());
            let loaded = |p: &Placement| Some(p.version) <= record.placement_version;
            let named = |p: &Placement| loaded(p) && p.assignment(&record.id).is_some_and(|a| a.addr == record.addr);
            if !view.versions.values().any(named) {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        // Experts it could not load, tried again once due: the leader plans
        // without this worker while its record reports the failure.
        if let Some((version, spec)) = retry.due() {
            tracing::info!(%version, experts = %spec, "trying again to load the experts that failed");
            let loading = load(&m.model, m.device, spec.clone(), reusable(&loaded, &retried), worker.metrics());
            let follow = Following { worker: &worker, record: &record, keys: &m.keys, changes: changes.clone() };
            let Some(outcome) = follow.load_unless_leaving(&mut leave, loading).await else { continue };
            let failure = match outcome {
                Ok(backend) => {
                    tracing::info!(%version, "the experts load now; offering the worker to placement again");
                    // Not served: the next placement decides what this
                    // worker holds, and shares these.
                    retried = Some(backend);
                    None
                }
                Err(error) => {
                    tracing::warn!(%version, %error, after = ?retry.delay, "cannot load them yet; trying again later");
                    retry.schedule(version, spec);
                    Some(LoadFailure { version, error })
                }
            };
            // Unchanged (the same error again): nothing to tell.
            if failure != record.load_failure {
                record.load_failure = failure;
                worker.metrics().load_failed.set(i64::from(record.load_failure.is_some()));
                if let Some(r) = &registration {
                    r.update(schema::encode(&record));
                }
            }
            continue;
        }
        let view = PlacementView::read(&m.keys, &changes.borrow_and_update());
        let mine = view.versions.values().rev().find_map(|p| {
            let a = p.assignment(&record.id)?;
            (p.model_id == record.model_id && a.addr == record.addr).then(|| (p.version, a.experts.clone()))
        });
        let newest = record.placement_version.max(failed);
        if let Some((version, spec)) = mine.filter(|(v, _)| Some(*v) > newest) {
            tracing::info!(%version, experts = %spec, "loading the experts of a new placement");
            let loading = load(&m.model, m.device, spec.clone(), reusable(&loaded, &retried), worker.metrics());
            // Asked to leave meanwhile: it leaves at once rather than when
            // the load ends (a volume that hangs may never end it).
            let follow = Following { worker: &worker, record: &record, keys: &m.keys, changes: changes.clone() };
            let Some(outcome) = follow.load_unless_leaving(&mut leave, loading).await else { continue };
            let failure = match outcome {
                Ok(backend) => {
                    worker.install(Some(version.0), backend.clone());
                    loaded.push((version, backend));
                    retried = None;
                    record.placement_version = Some(version);
                    retry = Retry::new(m.load_retry);
                    tracing::info!(%version, "placement loaded");
                    None
                }
                Err(error) => {
                    // Published, so the leader abandons the version at once
                    // and places the experts without this worker.
                    let after = retry.delay;
                    tracing::error!(%version, %error, ?after, "cannot load this placement's experts; reporting it");
                    failed = Some(version);
                    retry.schedule(version, spec);
                    Some(LoadFailure { version, error })
                }
            };
            record.load_failure = failure;
            worker.metrics().load_failed.set(i64::from(record.load_failure.is_some()));
            if let Some(r) = &registration {
                r.update(schema::encode(&record));
            }
        }
        // Keep what a live version still needs and the newest loaded one
        // (the store may be away; never drop the experts being served).
        let newest = record.placement_version;
        let keep = |v: PlacementVersion| view.versions.contains_key(&v) || Some(v) == newest;
        worker.retain(|v| v.is_none_or(|v| keep(PlacementVersion(v))));
        loaded.retain(|(v, _)| keep(*v));
        // Ready once routers dispatch to it: the current version names it
        // (at this address) and it serves that version.
        set_readiness(&worker, &record, &view);
        let due = retry.at();
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = asked(&mut leave) => {}
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
        }
    }
}

/// Resolves once the worker is asked to leave (never when it cannot be).
async fn asked(leave: &mut Option<watch::Receiver<bool>>) {
    match leave.as_mut() {
        Some(l) => drop(l.wait_for(|leave| *leave).await),
        None => std::future::pending().await,
    }
}

/// Ready once routers dispatch to it: the current version names it (at
/// this address) and it serves that version.
fn set_readiness(worker: &Worker, record: &NodeRecord, view: &PlacementView) {
    let current = view.current().filter(|p| p.assignment(&record.id).is_some_and(|a| a.addr == record.addr));
    worker.set_ready(current.is_some_and(|p| worker.versions().contains(&Some(p.version.0))));
}

/// What a worker follows while a load runs.
struct Following<'a> {
    worker: &'a Worker,
    record: &'a NodeRecord,
    keys: &'a Keys,
    /// A clone: placements seen here are seen again once the load ends.
    changes: watch::Receiver<Snapshot>,
}

impl Following<'_> {
    /// `load`'s result, or none when the worker is asked to leave first (the
    /// load is dropped: on the blocking pool it runs on, unused). Meanwhile
    /// its readiness follows the placements, so a worker whose load hangs
    /// is not reported ready once the current version leaves it out.
    async fn load_unless_leaving<T>(
        mut self,
        leave: &mut Option<watch::Receiver<bool>>,
        load: impl Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(load);
        let mut following = true;
        loop {
            tokio::select! {
                done = &mut load => return Some(done),
                _ = asked(leave) => return None,
                changed = self.changes.changed(), if following => match changed {
                    Ok(()) => {
                        let view = PlacementView::read(self.keys, &self.changes.borrow_and_update());
                        set_readiness(self.worker, self.record, &view);
                    }
                    Err(_) => following = false,
                },
            }
        }
    }
}

/// The backends a new load takes experts from: each version the worker
/// still holds, and a successful retry's that no placement serves yet.
fn reusable(
    loaded: &[(PlacementVersion, Arc<dyn ExpertBackend>)],
    retried: &Option<Arc<dyn ExpertBackend>>,
) -> Vec<Arc<dyn ExpertBackend>> {
    loaded.iter().map(|(_, b)| b.clone()).chain(retried.clone()).collect()
}

/// Loads `spec` on the worker's device off the async threads.
async fn load(
    dir: &std::path::Path,
    device: Device,
    spec: ExpertSpec,
    reuse: Vec<Arc<dyn ExpertBackend>>,
    metrics: &Metrics,
) -> Result<Arc<dyn ExpertBackend>, String> {
    let dir = dir.to_path_buf();
    let held: HashSet<_> = reuse.iter().flat_map(|b| b.hosted().experts.iter().copied()).collect();
    let loaded = match tokio::task::spawn_blocking(move || device.load(&dir, &spec, &reuse)).await {
        Ok(Ok(backend)) => Ok(backend),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("the loading task failed: {e}")),
    };
    match &loaded {
        Ok(backend) => {
            let experts = &backend.hosted().experts;
            let shared = experts.iter().filter(|id| held.contains(id)).count();
            metrics.experts_shared.inc_by(shared as u64);
            metrics.experts_read.inc_by((experts.len() - shared) as u64);
        }
        Err(_) => metrics.load_failures.inc(),
    }
    loaded
}

/// When to try again experts that failed to load: after `delay`, doubling
/// with each failure up to [`LOAD_RETRY_MAX`], back to the first delay once
/// a placement loads.
struct Retry {
    delay: Duration,
    /// The version that failed, its experts and when to try them again.
    wait: Option<(PlacementVersion, ExpertSpec, tokio::time::Instant)>,
}

impl Retry {
    fn new(first: Duration) -> Self {
        Retry { delay: first, wait: None }
    }

    fn schedule(&mut self, version: PlacementVersion, spec: ExpertSpec) {
        self.wait = Some((version, spec, tokio::time::Instant::now() + self.delay));
        self.delay = self.delay.saturating_mul(2).min(LOAD_RETRY_MAX);
    }

    fn at(&self) -> Option<tokio::time::Instant> {
        self.wait.as_ref().map(|(_, _, at)| *at)
    }

    /// The experts to try now, if it is time.
    fn due(&mut self) -> Option<(PlacementVersion, ExpertSpec)> {
        let (_, _, at) = self.wait.as_ref()?;
        if *at > tokio::time::Instant::now() {
            return None;
        }
        self.wait.take().map(|(version, spec, _)| (version, spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_back_off_doubling_up_to_the_cap() {
        let spec: ExpertSpec = "0:1".parse().unwrap();
        let mut retry = Retry::new(Duration::from_secs(10));
        assert!(retry.due().is_none(), "nothing failed yet");
        let mut waits = Vec::new();
        for _ in 0..7 {
            waits.push(retry.delay.as_secs());
            retry.schedule(PlacementVersion(3), spec.clone());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300]);
        assert!(retry.at().is_some_and(|at| at > tokio::time::Instant::now()));
        assert!(retry.due().is_none(), "not before its time");

        // Due at once with no wait, and handed out once.
        let mut now = Retry::new(Duration::ZERO);
        now.schedule(PlacementVersion(5), spec.clone());
        assert_eq!(now.due(), Some((PlacementVersion(5), spec)));
        assert!(now.due().is_none() && now.at().is_none());
    }
}
