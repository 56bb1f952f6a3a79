//! # myriad-router
//!
//! The data plane of a router. The dense part of every layer (mHC,
//! attention, gating, shared expert) runs here through the model crate; the
//! routed experts run on workers. Per MoE layer, [`RemoteExperts`] dispatches
//! each token's hidden state once to every worker hosting one of its experts,
//! concurrently, while the shared expert is computed, and hands back one
//! contribution per (token, expert) for the model crate's fixed-order combine.
//!
//! # Layout
//!
//! - [`pool`]: connections to workers and the experts each is used for.
//! - [`membership`]: registration in the cluster store; switching to each
//!   new current placement.
//! - [`dispatch`]: [`RemoteExperts`], the model's `ExpertExecutor` over gRPC,
//!   with replica retries.
//! - [`engine`]: continuous batching over `Model::forward_batch`; prompts
//!   continue from the state [`kvcache`] restores, and finished ones are stored there.
//! - [`kvcache`]: the KV-cache service's client.
//! - [`http`]: the OpenAI-compatible API; [`chat`]: chat template and reasoning modes.
//! - [`metrics`]: Prometheus metrics.
//! - [`node`]: a running router, assembled from a typed config, with its
//!   phased stop.

pub mod budget;
pub mod chat;
pub mod dispatch;
pub mod engine;
pub mod http;
pub mod kvcache;
pub mod logits;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod pool;
pub mod structured;

pub use dispatch::RemoteExperts;
pub use pool::{PoolError, Target, WorkerPool};
