//! A prefix of the store followed into a local snapshot.
//!
//! Routers, workers and the coordinator read cluster state from a
//! [`Mirror`], never from the store directly on a hot path. When the store
//! goes away, the mirror keeps its last snapshot (the data plane keeps
//! serving with the placement it has) and catches up by listing again when
//! the store returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{KeyValue, Revision, Store, StoreError};

/// Keys under the followed prefix and their values.
pub type Snapshot = Arc<BTreeMap<String, KeyValue>>;

/// Pause before listing again after the store connection broke.
const RETRY: Duration = Duration::from_millis(250);

pub struct Mirror {
    snapshots: watch::Receiver<Snapshot>,
    /// Follows the store until the mirror is dropped.
    task: JoinHandle<()>,
}

impl Mirror {
    /// Lists `prefix` (so the first snapshot is complete: an error here means
    /// the store is unreachable), then follows it in the background.
    pub async fn follow(store: Arc<dyn Store>, prefix: String) -> Result<Self, StoreError> {
        let listing = store.list(&prefix).await?;
        let first: BTreeMap<String, KeyValue> = listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        let (tx, snapshots) = watch::channel(Arc::new(first));
        let task = tokio::spawn(follow(store, prefix, listing.revision, tx));
        Ok(Mirror { snapshots, task })
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshots.borrow().clone()
    }

    /// A receiver that wakes on every change (for `select!` loops).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshots.clone()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(store: Arc<dyn Store>, prefix: String, mut revision: Revision, tx: watch::Sender<Snapshot>) {
    loop {
        match store.watch(&prefix, revision + 1).await {
            Ok(mut events) => {
                while let Some(event) = events.recv().await {
                    match event {
                        Ok(event) => {
                            tx.send_modify(|snapshot| {
                                let map = Arc::make_mut(snapshot);
                                match event {
                                    crate::Event::Put(kv) => {
                                        map.insert(kv.key.clone(), kv);
                                    }
                                    crate::Event::Delete { key, .. } => {
                                        map.remove(&key);
                                    }
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(prefix, error = %e, "store watch broke; keeping the last snapshot");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(prefix, error = %e, "cannot watch the store; keeping the last snapshot"),
        }
        if tx.is_closed() {
            return;
        }
        // Catch up on whatever happened while the watch was down.
        loop {
            tokio::time::sleep(RETRY).await;
            match store.list(&prefix).await {
                Ok(listing) => {
                    revision = listing.revision;
                    let map = listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
                    tx.send_if_modified(|snapshot| {
                        let changed = **snapshot != map;
                        *snapshot = Arc::new(map);
                        changed
                    });
                    break;
                }
                Err(e) => tracing::debug!(prefix, error = %e, "store still unreachable"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn follows_puts_deletes_and_lease_expiry() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        store.put("/a/1", b"one".to_vec(), None).await.unwrap();
        store.put("/b/1", b"other".to_vec(), None).await.unwrap();
        let mirror = Mirror::follow(store.clone(), "/a/".into()).await.unwrap();
        assert_eq!(mirror.snapshot().keys().collect::<Vec<_>>(), ["/a/1"]);
        let mut changes = mirror.subscribe();
        let lease = store.grant(Duration::from_secs(1)).await.unwrap();
        store.put("/a/2", b"two".to_vec(), Some(lease)).await.unwrap();
        store.delete("/a/1").await.unwrap();
        changes.wait_for(|s| s.len() == 1 && s.contains_key("/a/2")).await.unwrap();
        changes.wait_for(|s| s.is_empty()).await.unwrap();
    }
}
