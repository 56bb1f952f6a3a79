//! Keys that live as long as their owner: node registrations and the
//! coordinator election.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{Event, LeaseId, Store, StoreError};

/// Refreshes of a registration's lease that failed (the store away or slow),
/// in Prometheus' default registry.
static RENEWAL_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    let c = IntCounter::new("myriad_lease_renewal_failures_total", "failed refreshes of a registration's lease")
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

/// Pause between attempts when the store is unreachable.
const RETRY: Duration = Duration::from_millis(250);

/// A key kept in the store under a lease, refreshed at a third of the TTL.
/// When the lease is lost (the store was away longer than the TTL), the key
/// is written again under a new lease as soon as the store answers: a node
/// re-registers by itself after an outage.
pub struct Registration {
    value: watch::Sender<Vec<u8>>,
    lease: watch::Receiver<LeaseId>,
    store: Arc<dyn Store>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Writes `key` under a new lease; fails if the store is unreachable.
    pub async fn start(store: Arc<dyn Store>, key: String, value: Vec<u8>, ttl: Duration) -> Result<Self, StoreError> {
        let lease = store.grant(ttl).await?;
        store.put(&key, value.clone(), Some(lease)).await?;
        let (value_tx, value_rx) = watch::channel(value);
        let (lease_tx, lease_rx) = watch::channel(lease);
        let task = tokio::spawn(keep(store.clone(), key, ttl, value_rx, lease_tx));
        Ok(Registration { value: value_tx, lease: lease_rx, store, task })
    }

    /// Replaces the registered value (written in the background).
    pub fn update(&self, value: Vec<u8>) {
        self.value.send_replace(value);
    }

    /// Deletes the key now instead of waiting for the lease to expire.
    pub async fn close(self) {
        self.task.abort();
        let lease = *self.lease.borrow();
        if let Err(e) = self.store.revoke(lease).await {
            tracing::debug!(error = %e, "revoking the registration's lease failed; it will expire");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep(
    store: Arc<dyn Store>,
    key: String,
    ttl: Duration,
    mut value: watch::Receiver<Vec<u8>>,
    lease_tx: watch::Sender<LeaseId>,
) {
    let mut lease = *lease_tx.borrow();
    let mut written = value.borrow().clone();
    // Warn once when refreshing starts failing, not on every retry.
    let mut failing = false;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = value.changed() => if changed.is_err() { return },
        }
        let current = value.borrow_and_update().clone();
        // Write the value only when it changed: a put per tick would make
        // every watcher of the prefix see a change every ttl/3 per node, and
        // a coordinator waiting for membership to settle would never see it.
        let result = match store.keep_alive(lease).await {
            Ok(()) if current != written => store.put(&key, current.clone(), Some(lease)).await.map(|_| ()),
            other => other,
        };
        if result.is_ok() {
            written = current.clone();
        }
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(key, "registration refreshed again");
            }
            Ok(()) => {}
            Err(StoreError::LeaseExpired(_)) => {
                tracing::warn!(key, "registration lease expired; registering again");
                lease = register_again(&*store, &key, &current, ttl).await;
                lease_tx.send_replace(lease);
                written = current.clone();
                failing = false;
            }
            Err(e) if !failing => {
                RENEWAL_FAILURES.inc();
                failing = true;
                tracing::warn!(key, error = %e, "cannot refresh the registration; retrying quietly");
            }
            Err(e) => {
                RENEWAL_FAILURES.inc();
                tracing::debug!(key, error = %e, "cannot refresh the registration");
            }
        }
    }
}

async fn register_again(store: &dyn Store, key: &str, value: &[u8], ttl: Duration) -> LeaseId {
    loop {
        match store.grant(ttl).await {
            Ok(lease) => match store.put(key, value.to_vec(), Some(lease)).await {
                Ok(_) => return lease,
                Err(e) => tracing::debug!(key, error = %e, "re-registering failed"),
            },
            Err(e) => tracing::debug!(key, error = %e, "re-registering failed"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Held by the elected leader. [`Leadership::lost`] resolves when the
/// leader key's lease could not be kept (the store was away for a TTL, or
/// the key was deleted): stop acting as leader then.
pub struct Leadership {
    lost: watch::Receiver<bool>,
    lease: LeaseId,
    store: Arc<dyn Store>,
    task: JoinHandle<()>,
}

impl Leadership {
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Steps down: deletes the leader key so another candidate wins now.
    pub async fn resign(self) {
        self.task.abort();
        let _ = self.store.revoke(self.lease).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until this candidate holds `key` (created with `value` under a
/// lease of `ttl`). Candidates that lose watch the key and try again when
/// it is deleted or expires.
pub async fn campaign(store: Arc<dyn Store>, key: &str, value: Vec<u8>, ttl: Duration) -> Leadership {
    let mut failing = false;
    loop {
        match try_lead(&store, key, &value, ttl).await {
            Ok(Some(lease)) => {
                let (tx, lost) = watch::channel(false);
                let task = tokio::spawn(hold(store.clone(), key.to_string(), lease, ttl, tx));
                return Leadership { lost, lease, store, task };
            }
            Ok(None) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(key, error = %e, "campaign failed; retrying quietly");
                }
                failing = true;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// One attempt: `Some(lease)` when this candidate now leads; `None` after
/// the current leader's key went away.
async fn try_lead(
    store: &Arc<dyn Store>,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<Option<LeaseId>, StoreError> {
    let lease = store.grant(ttl).await?;
    if store.put_if(key, value.to_vec(), Some(lease), 0).await? {
        return Ok(Some(lease));
    }
    let Some(current) = store.get(key).await? else {
        let _ = store.revoke(lease).await;
        return Ok(None);
    };
    // Our own key under a lease we lost (e.g. etcd came back with it):
    // take it over instead of waiting for that lease to expire.
    if current.value == value && store.put_if(key, value.to_vec(), Some(lease), current.mod_revision).await? {
        return Ok(Some(lease));
    }
    let _ = store.revoke(lease).await;
    let mut events = store.watch(key, current.mod_revision + 1).await?;
    while let Some(event) = events.recv().await {
        if matches!(event?, Event::Delete { key: ref k, .. } if k == key) {
            return Ok(None);
        }
    }
    Err(StoreError::Unavailable("the watch on the leader key ended".into()))
}

async fn hold(store: Arc<dyn Store>, key: String, lease: LeaseId, ttl: Duration, lost: watch::Sender<bool>) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match store.keep_alive(lease).await {
            Ok(()) => last_ok = tokio::time::Instant::now(),
            Err(StoreError::LeaseExpired(_)) => break,
            // Unreachable for a whole TTL: the store will have expired the
            // lease, and another candidate may lead already.
            Err(_) if last_ok.elapsed() >= ttl => break,
            Err(e) => tracing::debug!(key, error = %e, "cannot refresh the leader lease"),
        }
    }
    tracing::warn!(key, "leadership lost");
    lost.send_replace(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn one_leader_at_a_time_and_the_next_takes_over() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let ttl = Duration::from_secs(2);
        let first = campaign(store.clone(), "/leader", b"a".to_vec(), ttl).await;
        let second = tokio::spawn(campaign(store.clone(), "/leader", b"b".to_vec(), ttl));
        tokio::time::sleep(ttl * 3).await;
        assert!(!second.is_finished(), "a second leader while the first holds its lease");
        assert_eq!(store.get("/leader").await.unwrap().unwrap().value, b"a");
        first.resign().await;
        let second = second.await.unwrap();
        assert_eq!(store.get("/leader").await.unwrap().unwrap().value, b"b");
        // Losing the key ends leadership.
        let mut second = second;
        store.delete("/leader").await.unwrap();
        store.revoke(second.lease).await.unwrap();
        tokio::time::timeout(ttl * 2, second.lost()).await.expect("the leader notices it lost the lease");
    }

    #[tokio::test(start_paused = true)]
    async fn a_registration_outlives_its_ttl_and_comes_back_after_loss() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let ttl = Duration::from_secs(1);
        let reg = Registration::start(store.clone(), "/nodes/w".into(), b"v1".to_vec(), ttl).await.unwrap();
        tokio::time::sleep(ttl * 5).await;
        assert_eq!(store.get("/nodes/w").await.unwrap().unwrap().value, b"v1");
        reg.update(b"v2".to_vec());
        tokio::time::sleep(ttl).await;
        assert_eq!(store.get("/nodes/w").await.unwrap().unwrap().value, b"v2");
        // As if the store had forgotten the lease during an outage.
        let lease = store.get("/nodes/w").await.unwrap().unwrap().lease.unwrap();
        store.revoke(lease).await.unwrap();
        tokio::time::sleep(ttl).await;
        assert_eq!(store.get("/nodes/w").await.unwrap().unwrap().value, b"v2", "registered again");
        reg.close().await;
        assert!(store.get("/nodes/w").await.unwrap().is_none());
    }
}
