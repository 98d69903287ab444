//! DPS error codes and the error body (`ProvisioningServiceErrorDetails`).
//!
//! A DPS error code is `HTTP status × 1000 + detail`. Clients such as Embedded C and the C#
//! AMQP transport derive the transport status as `errorCode / 1000`, so every code here keeps
//! that relation. The catalogue is documented in `docs/errors.md`.

use serde::{Deserialize, Serialize};

/// A six-digit DPS error code (`status × 1000 + detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// The request body is not valid JSON or does not have the expected shape.
    pub const INVALID_REQUEST_BODY: ErrorCode = ErrorCode(400001);
    /// A registration ID, enrollment group ID or other identifier breaks its grammar.
    pub const INVALID_IDENTIFIER: ErrorCode = ErrorCode(400002);
    /// The device `payload` is not a JSON object or is larger than allowed.
    pub const INVALID_PAYLOAD: ErrorCode = ErrorCode(400003);
    /// A field of the request has a value the service cannot accept.
    pub const INVALID_ARGUMENT: ErrorCode = ErrorCode(400004);
    /// The `api-version` query parameter is missing or malformed.
    pub const INVALID_API_VERSION: ErrorCode = ErrorCode(400005);
    /// Assignment failed: no IoT hub could be chosen (C SDK: hub not specified).
    pub const HUB_NOT_SPECIFIED: ErrorCode = ErrorCode(400208);
    /// Allocation failed (custom allocation or policy error).
    pub const ALLOCATION_FAILED: ErrorCode = ErrorCode(400209);
    /// Authentication failed: bad, expired or mismatched SAS token, unknown key or certificate.
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(401002);
    /// The enrollment (or the device's registration) does not exist.
    pub const ENROLLMENT_NOT_FOUND: ErrorCode = ErrorCode(404201);
    /// The device registration state does not exist.
    pub const REGISTRATION_NOT_FOUND: ErrorCode = ErrorCode(404202);
    /// The operation ID is unknown (never issued, expired, or issued to another device).
    pub const OPERATION_NOT_FOUND: ErrorCode = ErrorCode(404203);
    /// The enrollment group does not exist.
    pub const ENROLLMENT_GROUP_NOT_FOUND: ErrorCode = ErrorCode(404204);
    /// No resource at this path.
    pub const ROUTE_NOT_FOUND: ErrorCode = ErrorCode(404001);
    /// The HTTP method is not allowed on this path.
    pub const METHOD_NOT_ALLOWED: ErrorCode = ErrorCode(405001);
    /// The resource already exists (bulk `create`).
    pub const CONFLICT: ErrorCode = ErrorCode(409001);
    /// The `If-Match` ETag does not match the stored record.
    pub const PRECONDITION_FAILED: ErrorCode = ErrorCode(412001);
    /// The request body exceeds the configured size limit.
    pub const PAYLOAD_TOO_LARGE: ErrorCode = ErrorCode(413001);
    /// The request body is not JSON.
    pub const UNSUPPORTED_MEDIA_TYPE: ErrorCode = ErrorCode(415001);
    /// Too many requests; retry after the indicated delay.
    pub const THROTTLED: ErrorCode = ErrorCode(429001);
    /// An internal error; the request may be retried.
    pub const INTERNAL: ErrorCode = ErrorCode(500001);
    /// The service is shutting down or its store is unavailable; retry later.
    pub const SERVICE_UNAVAILABLE: ErrorCode = ErrorCode(503001);
    /// A failed registration's code when the assigned hub did not register the device (its
    /// hub registrar failed); dps-rs's own choice (protocol.md §10.8: sub-codes unknown).
    pub const HUB_REGISTRATION_FAILED: ErrorCode = ErrorCode(500210);

    /// The HTTP status this code belongs to (`code / 1000`).
    pub fn http_status(self) -> u16 {
        u16::try_from(self.0 / 1000).unwrap_or(500)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The JSON error body DPS returns (`ProvisioningServiceErrorDetails`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetails {
    /// Six-digit error code.
    pub error_code: ErrorCode,
    /// Correlation ID, also returned as `x-ms-request-id`.
    pub tracking_id: String,
    /// What went wrong and what to fix.
    pub message: String,
    /// When the error happened (ISO 8601, UTC).
    pub timestamp_utc: String,
    /// Extra key/value detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Map<String, serde_json::Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_its_http_status() {
        let cases = [
            (ErrorCode::INVALID_REQUEST_BODY, 400),
            (ErrorCode::HUB_NOT_SPECIFIED, 400),
            (ErrorCode::ALLOCATION_FAILED, 400),
            (ErrorCode::UNAUTHORIZED, 401),
            (ErrorCode::ENROLLMENT_NOT_FOUND, 404),
            (ErrorCode::REGISTRATION_NOT_FOUND, 404),
            (ErrorCode::OPERATION_NOT_FOUND, 404),
            (ErrorCode::METHOD_NOT_ALLOWED, 405),
            (ErrorCode::CONFLICT, 409),
            (ErrorCode::PRECONDITION_FAILED, 412),
            (ErrorCode::PAYLOAD_TOO_LARGE, 413),
            (ErrorCode::UNSUPPORTED_MEDIA_TYPE, 415),
            (ErrorCode::THROTTLED, 429),
            (ErrorCode::INTERNAL, 500),
            (ErrorCode::SERVICE_UNAVAILABLE, 503),
        ];
        for (code, status) in cases {
            assert_eq!(code.http_status(), status, "{code}");
        }
    }

    #[test]
    fn error_body_uses_dps_field_names() {
        let body = ErrorDetails {
            error_code: ErrorCode::UNAUTHORIZED,
            tracking_id: "t".into(),
            message: "m".into(),
            timestamp_utc: "2026-01-01T00:00:00.0000000Z".into(),
            info: None,
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["errorCode"], 401002);
        assert_eq!(json["trackingId"], "t");
        assert_eq!(json["timestampUtc"], "2026-01-01T00:00:00.0000000Z");
        assert!(json.get("info").is_none());
    }
}
