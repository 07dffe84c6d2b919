//! The one mapping of service errors to gRPC status codes.

use broker_proto::signed;
use tonic::Status;

use crate::error::ServiceError;

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Unauthenticated(a) => signed::unauthenticated(&a),
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
