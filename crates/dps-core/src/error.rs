//! The engine's error type. Every variant maps to a DPS error code (`status × 1000 + detail`)
//! and carries a message that says what to fix.

use dps_proto::error::ErrorCode;

use crate::store::StoreError;

/// An engine failure, as seen by a device or a service client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed (400).
    #[error("{message}")]
    BadRequest {
        /// Specific 400xxx code.
        code: ErrorCode,
        /// What is wrong.
        message: String,
    },
    /// Authentication failed (401002).
    #[error("{0}")]
    Unauthorized(String),
    /// Something does not exist (404xxx).
    #[error("{message}")]
    NotFound {
        /// Specific 404xxx code.
        code: ErrorCode,
        /// What was not found.
        message: String,
    },
    /// The record already exists (409001).
    #[error("{0}")]
    Conflict(String),
    /// `If-Match` did not match (412001).
    #[error("{0}")]
    PreconditionFailed(String),
    /// Too many requests (429001); retry after `retry_after` seconds.
    #[error("{message}")]
    Throttled {
        /// Seconds until a request would pass.
        retry_after: u32,
        /// Which limit.
        message: String,
    },
    /// The store is unavailable or the server is shutting down (503001); retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a corrupted record (500001).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The DPS error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::BadRequest { code, .. } | Error::NotFound { code, .. } => *code,
            Error::Unauthorized(_) => ErrorCode::UNAUTHORIZED,
            Error::Conflict(_) => ErrorCode::CONFLICT,
            Error::PreconditionFailed(_) => ErrorCode::PRECONDITION_FAILED,
            Error::Throttled { .. } => ErrorCode::THROTTLED,
            Error::Unavailable(_) => ErrorCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => ErrorCode::INTERNAL,
        }
    }

    /// Shorthand for a 400 with a code.
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::BadRequest { code, message: message.into() }
    }

    /// Seconds a client should wait before retrying, for errors that carry one (`Retry-After`).
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Error::Throttled { retry_after, .. } => Some(*retry_after),
            Error::Unavailable(_) => Some(5),
            _ => None,
        }
    }

    /// Shorthand for a 404 with a code.
    pub fn not_found(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::NotFound { code, message: message.into() }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::PreconditionFailed(m) => Error::PreconditionFailed(m),
            StoreError::AlreadyExists(m) => Error::Conflict(m),
            StoreError::NotFound(m) => Error::not_found(ErrorCode::ROUTE_NOT_FOUND, m),
            StoreError::Unavailable(m) => Error::Unavailable(format!("the store is unavailable: {m}")),
            StoreError::Corrupt(m) => Error::Internal(format!("corrupt record in the store: {m}")),
            StoreError::Other(m) => Error::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_map_to_dps_codes() {
        let cases = [
            (Error::bad_request(ErrorCode::INVALID_PAYLOAD, "x"), 400003),
            (Error::Unauthorized("x".into()), 401002),
            (Error::not_found(ErrorCode::OPERATION_NOT_FOUND, "x"), 404203),
            (Error::Conflict("x".into()), 409001),
            (Error::PreconditionFailed("x".into()), 412001),
            (Error::Throttled { retry_after: 1, message: "x".into() }, 429001),
            (Error::Unavailable("x".into()), 503001),
            (Error::Internal("x".into()), 500001),
        ];
        for (err, code) in cases {
            assert_eq!(err.code().0, code, "{err:?}");
            assert_eq!(u32::from(err.code().http_status()), code / 1000);
        }
    }

    #[test]
    fn store_errors_map_to_retryable_or_internal() {
        assert_eq!(Error::from(StoreError::Unavailable("disk full".into())).code(), ErrorCode::SERVICE_UNAVAILABLE);
        assert_eq!(Error::from(StoreError::Corrupt("x".into())).code(), ErrorCode::INTERNAL);
        assert_eq!(Error::from(StoreError::PreconditionFailed("x".into())).code(), ErrorCode::PRECONDITION_FAILED);
        assert_eq!(Error::from(StoreError::AlreadyExists("x".into())).code(), ErrorCode::CONFLICT);
        let msg = Error::from(StoreError::Unavailable("disk full".into())).to_string();
        assert!(msg.contains("disk full"), "{msg}");
    }
}
