//! The one table from error kinds to gRPC status codes. Services classify
//! their errors into an [`ErrorKind`]; retries decide on the code, never on
//! message text.

/// The closed set of failure classes every service reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller sent something wrong; retrying the same request is pointless.
    InvalidArgument,
    /// The service cannot do it now (not ready, shutting down); another
    /// replica may.
    Unavailable,
    /// A bug or an unexpected failure inside the service.
    Internal,
}

impl ErrorKind {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }

    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        tonic::Status::new(self.grpc_code(), message)
    }
}

/// Whether a failed call may succeed on another replica: the worker or the
/// path to it failed, not the request.
pub fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Aborted
            | tonic::Code::ResourceExhausted
            | tonic::Code::Internal
    )
}
