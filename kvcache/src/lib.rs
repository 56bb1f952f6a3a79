//! # myriad-kvcache
//!
//! The KV-cache service: DeepSeek-V4 sequence state stored by token prefix,
//! so any router can continue any conversation and no prefix is computed
//! twice. The service never interprets state bytes: routers split a state
//! into immutable blocks and a tail (`myriad_model::state::blocks`), the
//! service files them under keys it computes from the tokens.
//!
//! # Layout
//!
//! - [`key`]: content addresses (a SHA-256 chain over model, block size and
//!   tokens), from `myriad_proto::kvkey`: routers place conversations by
//!   them too.
//! - [`objects`]: immutable objects in a memory tier over a disk tier, LRU,
//!   checksummed.
//! - [`cache`]: states as blocks plus snapshots, and the longest-prefix
//!   lookup.
//! - [`service`]: the gRPC service (`myriad.kvcache.v1.KvCache`).
//! - [`metrics`]: Prometheus metrics.
//! - [`node`]: a running instance, with its registration in a cluster.

pub mod cache;
pub mod metrics;
pub mod node;
pub mod objects;
pub mod service;

pub use cache::Cache;
pub use myriad_proto::kvkey as key;
pub use node::Node;
pub use service::{KvCacheService, serve};
