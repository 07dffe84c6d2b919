//! Service errors and their one mapping to gRPC status codes.
//!
//! Messages name the reason (role, study state, malformed field) and never carry
//! patient data, keys or plaintext. Internal errors reach the caller only as an opaque
//! id; the detail goes to the server log under the same id.

use pre_kms::request_auth::AuthError;
use tonic::Status;

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

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Unauthenticated(a) => a.into(),
            ServiceError::PermissionDenied(m) => Status::permission_denied(m),
            ServiceError::InvalidArgument(m) => Status::invalid_argument(m),
            ServiceError::NotFound(m) => Status::not_found(m),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServiceError::Unavailable(m) => Status::unavailable(m),
            ServiceError::Exhausted(m) => Status::resource_exhausted(m),
            ServiceError::Internal(detail) => {
                let id = hex::encode(
                    &blake3::hash(format!("{detail}{:?}", std::time::SystemTime::now()).as_bytes())
                        .as_bytes()[..6],
                );
                tracing::error!(error_id = %id, %detail, "internal error");
                Status::internal(format!(
                    "internal error {id}; the operator can find it in the server log"
                ))
            }
        }
    }
}
