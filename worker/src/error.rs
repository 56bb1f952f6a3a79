//! Errors of the worker, each with an [`ErrorKind`] that decides its gRPC code.

use myriad_proto::ProtocolError;
use myriad_proto::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),

    /// A well-formed request this worker cannot serve: unknown layer, an
    /// expert it does not host, a hidden width that is not the model's.
    #[error("{0}")]
    InvalidArgument(String),

    /// An expert this worker does not (or no longer) host: the caller's
    /// placement is not this worker's. Another replica may serve it.
    #[error("{0}")]
    NotHosted(String),

    #[error("load experts: {0}")]
    Load(#[from] myriad_model::ModelError),

    #[error("compute task failed: {0}")]
    Internal(String),

    /// The device asked for cannot run experts here (no CUDA support in
    /// this build, no driver, no such GPU), or failed while running them.
    #[error("{0}")]
    Device(String),
}

impl WorkerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkerError::Protocol(_) | WorkerError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            WorkerError::NotHosted(_) => ErrorKind::Unavailable,
            WorkerError::Load(_) | WorkerError::Internal(_) | WorkerError::Device(_) => ErrorKind::Internal,
        }
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        e.kind().status(e.to_string())
    }
}
