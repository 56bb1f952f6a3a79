//! # myriad-store
//!
//! Where the cluster keeps its shared state: who is alive, which placement
//! version is current, who leads. The [`Store`] trait is a small subset of
//! etcd's API (revisioned keys, leases, compare-and-put, prefix watches), so
//! that etcd implements it directly and [`MemoryStore`] can stand in for it
//! inside `myriad up` and in tests.
//!
//! # Layout
//!
//! - [`MemoryStore`] ([`memory`]): the in-process backend.
//! - [`EtcdStore`] ([`etcd`]): etcd v3 over its gRPC API.
//! - [`mirror`]: a prefix followed into a local snapshot that survives store
//!   outages (the data plane keeps its last placement when etcd is away).
//! - [`lease`]: a key kept alive under a lease ([`lease::Registration`]) and
//!   leader election ([`lease::campaign`]).
//! - [`schema`]: the key layout under `/myriad/<cluster>/` and the versioned,
//!   schema-checked records stored there.
//! - `suite` (feature `testing`): the behaviour every backend must show;
//!   `etcd_server`: a real etcd started for tests.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub mod etcd;
#[cfg(feature = "testing")]
pub mod etcd_server;
pub mod lease;
pub mod memory;
pub mod mirror;
pub mod retry;
pub mod schema;
#[cfg(any(test, feature = "testing"))]
pub mod suite;

pub use etcd::EtcdStore;
pub use memory::MemoryStore;

/// A store-wide, strictly increasing write counter (etcd's revision). A key's
/// `mod_revision` is the revision of its last write; 0 means "absent".
pub type Revision = u64;

/// A lease: keys attached to it disappear when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: Revision,
    /// The lease the key lives under, if any.
    pub lease: Option<LeaseId>,
}

/// A listing and the revision it was taken at: watch from `revision + 1` to
/// miss nothing.
#[derive(Debug, Clone)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// A key was deleted (explicitly, or because its lease ended).
    Delete {
        key: String,
        mod_revision: Revision,
    },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Events of one watch, in revision order. The stream ends (or yields an
/// error) when the store connection is lost: re-list and watch again.
pub type Watch = mpsc::UnboundedReceiver<Result<Event, StoreError>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The lease ended (expired or revoked); keys under it are gone.
    #[error("lease {0:?} has expired")]
    LeaseExpired(LeaseId),
    /// A watch asked for history the store no longer keeps.
    #[error("revision {requested} is compacted (oldest kept: {oldest})")]
    Compacted { requested: Revision, oldest: Revision },
    /// A value failed its schema check.
    #[error("bad value at {key}: {why}")]
    Corrupt { key: String, why: String },
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// The membership store. Every method is one round trip to the backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key starting with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;

    /// Writes `key`, attached to `lease` if given; returns the write's revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError>;

    /// Writes only if `key`'s `mod_revision` is `expected` (0: the key is
    /// absent). Returns whether it wrote. This is what elections and version
    /// counters are built on.
    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: Revision,
    ) -> Result<bool, StoreError>;

    /// Deletes `key`; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// A new lease that ends `ttl` after its last keep-alive.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Restarts the lease's TTL; `LeaseExpired` if it already ended.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Ends the lease now, deleting its keys.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Changes under `prefix` from revision `from` on (history first); `from`
    /// 0 means only changes after this call.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError>;
}
