//! [`MemoryStore`]: the [`Store`] in one process, for `myriad up` and tests.
//!
//! Time is tokio's, so tests can pause it. Leases end lazily: every call and
//! a background sweep (while a runtime is alive) delete the keys of leases
//! whose deadline has passed, emitting delete events like etcd does.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{Event, KeyValue, LeaseId, Listing, Revision, Store, StoreError, Watch};

/// Events kept for watches that start in the past.
const HISTORY: usize = 100_000;
/// How often the background sweep ends expired leases.
const SWEEP: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    events: mpsc::UnboundedSender<Result<Event, StoreError>>,
}

#[derive(Default)]
struct State {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: i64,
    /// Recent events, oldest first, for watches from a past revision.
    history: VecDeque<Event>,
    watchers: Vec<Watcher>,
}

impl MemoryStore {
    /// A new, empty store. Inside a tokio runtime it also starts the sweep
    /// that ends expired leases without waiting for the next call.
    pub fn new() -> Self {
        let store = MemoryStore { state: Arc::new(Mutex::new(State::default())) };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Mutex<State>> = Arc::downgrade(&store.state);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(SWEEP);
                loop {
                    tick.tick().await;
                    let Some(state) = weak.upgrade() else { return };
                    drop(MemoryStore { state }.lock());
                }
            });
        }
        store
    }

    /// The state with expired leases already ended.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every
        // mutation is a single insert/remove), so poisoning is ignored.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let expired: Vec<LeaseId> = state.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(&id, _)| id).collect();
        for id in expired {
            state.end_lease(id);
        }
        state
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    fn emit(&mut self, event: Event) {
        self.watchers.retain(|w| !event.key().starts_with(&w.prefix) || w.events.send(Ok(event.clone())).is_ok());
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(event);
    }

    fn write(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        if let Some(id) = lease {
            let lease = self.leases.get_mut(&id).ok_or(StoreError::LeaseExpired(id))?;
            lease.keys.insert(key.to_string());
        }
        let old = self.kvs.get(key).and_then(|kv| kv.lease).filter(|&old| Some(old) != lease);
        if let Some(l) = old.and_then(|old| self.leases.get_mut(&old)) {
            l.keys.remove(key);
        }
        self.revision += 1;
        let kv = KeyValue { key: key.to_string(), value, mod_revision: self.revision, lease };
        self.kvs.insert(key.to_string(), kv.clone());
        self.emit(Event::Put(kv));
        Ok(self.revision)
    }

    fn remove(&mut self, key: &str) -> bool {
        let Some(kv) = self.kvs.remove(key) else { return false };
        if let Some(l) = kv.lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.remove(key);
        }
        self.revision += 1;
        self.emit(Event::Delete { key: key.to_string(), mod_revision: self.revision });
        true
    }

    fn end_lease(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else { return false };
        for key in lease.keys {
            self.remove(&key);
        }
        true
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".into()));
    }
    Ok(())
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let state = self.lock();
        let kvs = state.kvs.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix));
        Ok(Listing { kvs: kvs.map(|(_, kv)| kv.clone()).collect(), revision: state.revision })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        check_key(key)?;
        self.lock().write(key, value, lease)
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: Revision,
    ) -> Result<bool, StoreError> {
        check_key(key)?;
        let mut state = self.lock();
        let current = state.kvs.get(key).map_or(0, |kv| kv.mod_revision);
        if current != expected {
            return Ok(false);
        }
        state.write(key, value, lease)?;
        Ok(true)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock().remove(key))
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("a lease needs a TTL above zero".into()));
        }
        let mut state = self.lock();
        state.next_lease += 1;
        let id = LeaseId(state.next_lease);
        state.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut state = self.lock();
        let l = state.leases.get_mut(&lease).ok_or(StoreError::LeaseExpired(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self.lock().end_lease(lease) { Ok(()) } else { Err(StoreError::LeaseExpired(lease)) }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let mut state = self.lock();
        let (tx, rx) = mpsc::unbounded_channel();
        if from != 0 && from <= state.revision {
            let oldest = state.history.front().map_or(state.revision + 1, Event::revision);
            if from < oldest {
                return Err(StoreError::Compacted { requested: from, oldest });
            }
            for event in state.history.iter().filter(|e| e.revision() >= from && e.key().starts_with(prefix)) {
                // The receiver is still in hand: sending cannot fail.
                let _ = tx.send(Ok(event.clone()));
            }
        }
        state.watchers.push(Watcher { prefix: prefix.to_string(), events: tx });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn passes_the_store_suite() {
        crate::suite::run(&MemoryStore::new()).await;
    }
}
