//! Service errors: what the domain service answers when it refuses or fails. The one
//! mapping to gRPC status codes is `crate::grpc::status`.
//!
//! Messages name the reason (role, study state, malformed field) and never carry
//! patient data, keys or plaintext. Internal errors reach the caller only as an opaque
//! id; the detail goes to the server log under the same id.

use pre_kms::request_auth::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// A rate limit or budget is used up.
    #[error("{0}")]
    Exhausted(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl ServiceError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ServiceError::Internal(e.to_string())
    }
}

impl From<rusqlite::Error> for ServiceError {
    fn from(e: rusqlite::Error) -> Self {
        ServiceError::internal(format!("storage: {e}"))
    }
}

impl From<std::io::Error> for ServiceError {
    fn from(e: std::io::Error) -> Self {
        ServiceError::internal(format!("blob store: {e}"))
    }
}

impl From<broker_proto::convert::Malformed> for ServiceError {
    fn from(e: broker_proto::convert::Malformed) -> Self {
        ServiceError::InvalidArgument(e.0)
    }
}
