//! The device error reply, for every transport: the DPS error body
//! (`ProvisioningServiceErrorDetails`, with the request's tracking ID), the status it maps to
//! (`code / 1000`) and the retry-after a client should wait. HTTPS renders it as a status,
//! headers and a JSON body ([`crate::http::error_response`]); MQTT as a response topic
//! carrying the status and retry-after, and the same JSON body.

use dps_proto::error::{ErrorCode, ErrorDetails};

/// A request a transport refuses before the engine sees it (no `api-version`, a body over the
/// limit, a method a route does not take, a WebSocket subprotocol nobody serves, no free
/// connection slot): the transport's own verdict, with the DPS code it answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The DPS error code (its status is `code / 1000`).
    pub code: ErrorCode,
    /// What to fix.
    pub message: String,
    /// Seconds to wait before trying again, when trying again can help.
    pub retry_after: Option<u32>,
}

impl Refusal {
    /// A refusal with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after: None }
    }

    /// `503001` with a retry-after: the transport has no room now.
    pub fn busy(message: impl Into<String>, retry_after: u32) -> Self {
        Self { code: ErrorCode::SERVICE_UNAVAILABLE, message: message.into(), retry_after: Some(retry_after) }
    }
}

/// Why a request failed: the transport refused it, or the engine answered with an error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// The engine's answer.
    #[error(transparent)]
    Engine(#[from] dps_core::Error),
    /// The transport's own refusal.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// What a transport tells a device about a failed request.
#[derive(Debug, Clone)]
pub struct ErrorReply {
    /// Status: HTTP status, and the status in an MQTT response topic.
    pub status: u16,
    /// Seconds the client should wait before trying again, if it should.
    pub retry_after: Option<u32>,
    /// The DPS error body.
    pub body: ErrorDetails,
}

impl ErrorReply {
    /// The reply for `err` to the request `request_id` (also its tracking ID). Internal
    /// details are logged, not sent.
    pub fn new(err: &dps_core::Error, request_id: &str) -> Self {
        Self { status: err.code().http_status(), retry_after: err.retry_after(), body: error_details(err, request_id) }
    }

    /// The reply for any failure of a request.
    pub fn for_request(err: &RequestError, request_id: &str) -> Self {
        match err {
            RequestError::Engine(e) => Self::new(e, request_id),
            RequestError::Refused(r) => Self {
                status: r.code.http_status(),
                retry_after: r.retry_after,
                body: details(r.code, r.message.clone(), request_id),
            },
        }
    }
}

/// The DPS error body for an error, for any transport. Internal details are logged, not sent.
pub fn error_details(err: &dps_core::Error, request_id: &str) -> ErrorDetails {
    let message = match err {
        dps_core::Error::Internal(detail) => {
            tracing::error!(request_id, detail, "internal error");
            format!("internal error; quote tracking ID {request_id} to the operator")
        }
        other => other.to_string(),
    };
    details(err.code(), message, request_id)
}

fn details(code: ErrorCode, message: String, request_id: &str) -> ErrorDetails {
    ErrorDetails {
        error_code: code,
        tracking_id: request_id.to_string(),
        message,
        timestamp_utc: dps_proto::timestamp::format(time::OffsetDateTime::now_utc()),
        info: None,
    }
}
