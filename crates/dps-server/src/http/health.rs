//! `/healthz` and `/readyz` for load balancers and orchestrators, on the HTTPS listener,
//! without authentication and without `api-version`. They tell nothing about devices or
//! enrollments: `/healthz` answers `200` while the process serves requests; `/readyz` answers
//! `200` when the store is reachable and its schema is the one this build expects, else `503`
//! with `Retry-After` (the reason is logged, not sent).

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::response::json;
use super::{AppState, Call};

/// How long `/readyz` waits for the store before it answers "not ready".
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /healthz`.
pub(crate) fn healthz(call: &Call) -> Response<Full<Bytes>> {
    json(StatusCode::OK, &json!({"status": "ok"}), &call.request_id)
}

/// `GET /readyz`.
pub(crate) async fn readyz(state: &AppState, call: &Call) -> Response<Full<Bytes>> {
    let stopping = *state.stop.borrow();
    let reason = if stopping {
        Some("stopping".to_string())
    } else {
        match tokio::time::timeout(READY_WITHIN, state.engine.ready()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("the store did not answer within {} s", READY_WITHIN.as_secs())),
        }
    };
    match reason {
        None => json(StatusCode::OK, &json!({"status": "ready"}), &call.request_id),
        Some(reason) => {
            dps_core::warn_limited!("readyz", reason = %reason, "not ready");
            let mut resp = json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "unavailable"}), &call.request_id);
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("5"));
            resp
        }
    }
}
