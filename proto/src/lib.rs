//! # myriad-proto
//!
//! What Myriad's processes say to each other. Roles never import each other;
//! they share this crate.
//!
//! # Layout
//!
//! - [`pb`]: prost/tonic code generated from `myriad/expert.proto`;
//!   [`admin`]: from `myriad/admin.proto`; [`kvcache`]: from
//!   `myriad/kvcache.proto`.
//! - [`error`]: error kinds and their one mapping to gRPC codes.
//! - [`tensor`]: f32 tensors to and from little-endian `bytes` fields.
//! - [`expert`]: the domain types of the expert data plane, validated once on
//!   receipt (`TryFrom`): receivers expect all sorts of junk from senders.
//! - [`spec`]: the `--experts` grammar naming the (layer, expert) pairs a
//!   worker hosts.

pub mod error;
pub mod expert;
pub mod kvkey;
pub mod spec;
pub mod tensor;

/// Generated protobuf messages and gRPC services.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("myriad.expert.v1");
}

/// The coordinator's admin API (`myriad ctl`), generated.
#[allow(clippy::all, missing_docs)]
pub mod admin {
    tonic::include_proto!("myriad.admin.v1");
}

/// The KV-cache service (sequence state by token prefix), generated.
#[allow(clippy::all, missing_docs)]
pub mod kvcache {
    tonic::include_proto!("myriad.kvcache.v1");
}

/// Largest gRPC message either side accepts. Routers split batches so that
/// requests and responses stay under it.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A malformed message: a wrong size, shape, dtype or count. Maps to gRPC
/// `InvalidArgument`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct ProtocolError(pub String);

impl From<ProtocolError> for tonic::Status {
    fn from(e: ProtocolError) -> Self {
        error::ErrorKind::InvalidArgument.status(e.to_string())
    }
}
