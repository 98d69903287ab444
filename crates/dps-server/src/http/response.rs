//! Response builders: JSON bodies, DPS error bodies, common headers.

use bytes::Bytes;
use dps_proto::error::ErrorCode;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use super::status;
use crate::reply::{ErrorReply, Refusal, RequestError};

const JSON: &str = "application/json; charset=utf-8";

/// A JSON response with `x-ms-request-id`.
pub(crate) fn json<T: Serialize>(code: StatusCode, body: &T, request_id: &str) -> Response<Full<Bytes>> {
    match serde_json::to_vec(body) {
        Ok(bytes) => json_bytes(code, Bytes::from(bytes), request_id),
        Err(e) => {
            tracing::error!(request_id, error = %e, "cannot serialise a response");
            let message = format!("internal error; quote tracking ID {request_id} to the operator");
            error_response(&Refusal::new(ErrorCode::INTERNAL, message).into(), request_id)
        }
    }
}

/// A response whose body is JSON already, with `x-ms-request-id`.
pub(crate) fn json_bytes(code: StatusCode, body: Bytes, request_id: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = code;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    set_request_id(&mut resp, request_id);
    resp
}

/// An empty response (204).
pub(crate) fn empty(code: StatusCode, request_id: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = code;
    set_request_id(&mut resp, request_id);
    resp
}

fn set_request_id(resp: &mut Response<Full<Bytes>>, request_id: &str) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-ms-request-id", v);
    }
}

/// A DPS error response: status `code / 1000`, `ProvisioningServiceErrorDetails` body, the
/// `x-ms-error-code` header. Internal details of 5xx errors are logged, not sent.
pub fn error_response(err: &RequestError, request_id: &str) -> Response<Full<Bytes>> {
    let reply = ErrorReply::for_request(err, request_id);
    let bytes = serde_json::to_vec(&reply.body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status(reply.status);
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    if let Ok(v) = HeaderValue::from_str(&reply.body.error_code.0.to_string()) {
        resp.headers_mut().insert("x-ms-error-code", v);
    }
    if let Some(secs) = reply.retry_after {
        resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    set_request_id(&mut resp, request_id);
    resp
}
