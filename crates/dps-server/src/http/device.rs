//! Device runtime API over HTTPS (docs/protocol-notes.md §3).

use dps_core::registration::{Challenge, Credential, DeviceReply, RegisterRequest, Registered};
use dps_proto::device::RegistrationStatus;
use http::header::{HeaderValue, LOCATION, RETRY_AFTER};
use http::StatusCode;

use super::response::json;
use super::{AppState, Call, HttpResult};
use crate::metrics::Transport;

fn credential(call: &Call) -> Credential {
    match call.headers.get(http::header::AUTHORIZATION) {
        // A header that is not visible ASCII cannot be a SAS token; pass it on so the engine
        // answers 401 with its reason.
        Some(v) => Credential::Sas(v.to_str().map(str::to_string).unwrap_or_else(|_| "<not ASCII>".into())),
        // No token: the client certificate of the TLS session, if any (X.509 devices).
        None => match &call.client_chain {
            Some(chain) => Credential::X509(chain.clone()),
            None => Credential::None,
        },
    }
}

fn with_retry_after(
    mut resp: http::Response<http_body_util::Full<bytes::Bytes>>,
    reply: &DeviceReply,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    if let Some(secs) = reply.retry_after {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// The TPM challenge over HTTPS (docs/protocol-notes.md §3.9): `401` whose body carries the
/// key blob and the name to import it under, and no `status`.
fn challenge_response(challenge: &Challenge, request_id: &str) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    use base64::Engine as _;
    let body = serde_json::json!({
        "authenticationKey": base64::engine::general_purpose::STANDARD.encode(&challenge.blob),
        "keyName": challenge.key_name,
        "message": "import the authenticationKey into the TPM and send the request again with a SAS token signed by it",
    });
    json(StatusCode::UNAUTHORIZED, &body, request_id)
}

/// `PUT /{scope}/registrations/{id}/register` → 202.
pub(crate) async fn register(state: &AppState, call: &Call, scope: String, id: String) -> HttpResult {
    call.require_api_version()?;
    let force = call.query_param("forceRegistration").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let request = RegisterRequest {
        id_scope: scope.clone(),
        registration_id: id.clone(),
        credential: credential(call),
        body: call.body.to_vec(),
        force,
    };
    state.auth_failures.check(call.peer.ip())?;
    let attestation = crate::metrics::credential_label(&request.credential);
    let started = std::time::Instant::now();
    let result = state.engine.devices().register(request).await;
    crate::metrics::registration(Transport::Https, attestation, result.as_ref(), started);
    let reply = match state.auth_failures.observe(call.peer.ip(), Transport::Https, result)? {
        Registered::Reply(reply) => reply,
        Registered::Challenge(challenge) => return Ok(challenge_response(&challenge, &call.request_id)),
    };
    let mut resp = with_retry_after(json(StatusCode::ACCEPTED, &reply.operation, &call.request_id), &reply);
    set_location(&mut resp, call, &format!("{scope}/registrations/{id}/register"));
    Ok(resp)
}

/// `Location: https://{host}/{path}` (the register's 202, and a poll's 202 while assigning).
fn set_location(resp: &mut http::Response<http_body_util::Full<bytes::Bytes>>, call: &Call, path: &str) {
    let host = call.header("host").unwrap_or("localhost");
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}/{path}")) {
        resp.headers_mut().insert(LOCATION, v);
    }
}

/// `GET /{scope}/registrations/{id}/operations/{operationId}` → 202 while assigning, else 200.
pub(crate) async fn operation_status(
    state: &AppState,
    call: &Call,
    scope: String,
    id: String,
    operation: String,
) -> HttpResult {
    call.require_api_version()?;
    state.auth_failures.check(call.peer.ip())?;
    let result = state.engine.devices().operation_status(&scope, &id, &operation, &credential(call)).await;
    crate::metrics::poll(Transport::Https, result.as_ref());
    let reply = state.auth_failures.observe(call.peer.ip(), Transport::Https, result)?;
    // 202 with `Location` while the operation is still assigning, else 200 (docs/protocol-notes.md §3).
    if reply.operation.status == RegistrationStatus::Assigning {
        let mut resp = with_retry_after(json(StatusCode::ACCEPTED, &reply.operation, &call.request_id), &reply);
        set_location(&mut resp, call, &format!("{scope}/registrations/{id}/operations/{operation}"));
        return Ok(resp);
    }
    Ok(with_retry_after(json(StatusCode::OK, &reply.operation, &call.request_id), &reply))
}

/// `POST /{scope}/registrations/{id}` → 200 with the registration state.
pub(crate) async fn registration_status(state: &AppState, call: &Call, scope: String, id: String) -> HttpResult {
    call.require_api_version()?;
    state.auth_failures.check(call.peer.ip())?;
    let result = state.auth_failures.observe(
        call.peer.ip(),
        Transport::Https,
        state.engine.devices().registration_status(&scope, &id, &credential(call), &call.body).await,
    )?;
    Ok(json(StatusCode::OK, &result, &call.request_id))
}
