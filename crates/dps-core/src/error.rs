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
    /// Authenticated, but the policy lacks a right (403001).
    #[error("{0}")]
    Forbidden(String),
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
            Error::Forbidden(_) => ErrorCode::FORBIDDEN,
            Error::Conflict(_) => ErrorCode::CONFLICT,
            Error::PreconditionFailed(_) => ErrorCode::PRECONDITION_FAILED,
            Error::Unavailable(_) => ErrorCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => ErrorCode::INTERNAL,
        }
    }

    /// Shorthand for a 400 with a code.
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::BadRequest { code, message: message.into() }
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
