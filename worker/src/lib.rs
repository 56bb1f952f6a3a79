//! # myriad-worker
//!
//! An expert worker hosts some routed experts of a model and runs them for
//! routers: given a layer, tokens' hidden states and each token's
//! `(expert, weight)` pairs, it returns one weighted output per pair.
//!
//! # Layout
//!
//! - [`backend`]: the compute seam ([`ExpertBackend`]) and the CPU backend,
//!   which loads only the tensors of the experts it hosts.
//! - [`device`]: where experts compute ([`Device`]: the CPU, or a CUDA GPU
//!   with the `cuda` feature, in `cuda`).
//! - [`worker`]: transport-independent state: backend plus the load window.
//! - [`service`]: the thin tonic adapter and [`serve`].
//! - [`membership`]: registering in the cluster store and following its
//!   placement versions.
//! - [`node`]: a running node, from start to its phased stop (leave,
//!   drain, stop).
//! - [`error`]: [`WorkerError`] and its kind.

pub mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod service;
pub mod worker;

pub use backend::{CpuBackend, ExpertBackend};
pub use device::Device;
pub use error::WorkerError;
pub use node::Node;
pub use service::serve;
pub use worker::Worker;
