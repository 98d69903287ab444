//! Service API over HTTPS (docs/protocol-notes.md §9): SAS policies and rights, enrollments, groups,
//! registration states, queries with paging, bulk operations.

use dps_core::enrollment::{without_secrets, EnrollmentKind, QueryPage};
use dps_core::etag::IfMatch;
use dps_proto::error::ErrorCode;
use dps_proto::sas::{decode_key, service_audience_matches, SasToken};
use dps_proto::service::{EnrollmentGroup, IndividualEnrollment, QuerySpecification};
use http::header::HeaderValue;
use http::{Method, StatusCode};
use serde::Serialize;

use super::response::{empty, json};
use super::{AppState, Call, HttpResult};
use crate::policy::Policy;
use crate::reply::Refusal;

const ENROLLMENT_READ: &str = "EnrollmentRead";
const ENROLLMENT_WRITE: &str = "EnrollmentWrite";
const REGISTRATION_READ: &str = "RegistrationStatusRead";
const REGISTRATION_WRITE: &str = "RegistrationStatusWrite";
const SERVICE_CONFIG: &str = "ServiceConfig";

/// Checks the service SAS token and that its policy grants every right in `rights`; returns
/// the policy, so that a handler can leave out what the caller may not read. Failures are
/// logged (rate-limited) with the policy the token names and the source address, never the
/// token; authentication failures count against the address's `throttling.failed_auth_*`.
fn authorize<'s>(state: &'s AppState, call: &Call, rights: &[&str]) -> Result<&'s Policy, Refusal> {
    state.auth_failures.check(call.peer.ip())?;
    let log = |reason: &str| {
        let policy = call
            .header("authorization")
            .and_then(|h| SasToken::parse(h).ok())
            .and_then(|t| t.key_name)
            .map(|n| n.chars().take(64).collect::<String>())
            .unwrap_or_default();
        dps_core::warn_limited!("service-auth", source = %call.peer.ip(), policy, method = %call.method,
            path = %call.path, request_id = call.request_id, reason, "service API authentication failed");
    };
    let policy = check_service_token(state, call).map_err(|(e, reason)| {
        state.auth_failures.record(call.peer.ip(), crate::metrics::Transport::Https, "service");
        log(&reason);
        e
    })?;
    if let Some(missing) = rights.iter().find(|r| !policy.rights.iter().any(|have| have == *r)) {
        let e = unauthorized(format!("shared access policy '{}' lacks the {missing} right", policy.name));
        log(&e.to_string());
        return Err(e);
    }
    Ok(policy)
}

/// The policy whose key signed the service SAS token; on failure, the answer and the reason
/// for the log (an unknown policy and a wrong key get the same answer).
fn check_service_token<'s>(state: &'s AppState, call: &Call) -> Result<&'s Policy, (Refusal, String)> {
    let refuse = |m: String| (unauthorized(m.clone()), m);
    let header = call.header("authorization").ok_or_else(|| {
        refuse("no Authorization header: send a SharedAccessSignature built from a service connection string".into())
    })?;
    let token = SasToken::parse(header).map_err(|e| refuse(format!("invalid SAS token: {e}")))?;
    let now = state.engine.clock().now_secs();
    if token.is_expired(now, state.engine.settings().sas_clock_skew_secs) {
        return Err(refuse(format!("the SAS token expired at {} (now {now})", token.expiry)));
    }
    let name = token.key_name.as_deref().filter(|n| !n.is_empty()).ok_or_else(|| {
        refuse("the SAS token names no policy (skn); use SharedAccessKeyName from the connection string".into())
    })?;
    let not_signed = |reason: String| {
        let answer = "the SAS token is not signed by a shared access policy of this service; check SharedAccessKeyName and SharedAccessKey in the connection string";
        (unauthorized(answer), reason)
    };
    let policy = state
        .policies
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| not_signed(format!("unknown shared access policy '{name}'")))?;
    let signed = std::iter::once(&policy.primary_key)
        .chain(policy.secondary_key.iter())
        .filter_map(|k| decode_key(k).ok())
        .any(|k| token.is_signed_by(&k));
    if !signed {
        return Err(not_signed(format!("the SAS token signature does not match policy '{name}'")));
    }
    let path = call.path.as_str();
    if !state.host_names.iter().any(|h| service_audience_matches(&token.resource, h, path)) {
        return Err(refuse(format!(
            "the SAS token audience '{}' is not this service; HostName must be one of: {}",
            token.resource,
            state.host_names.join(", ")
        )));
    }
    Ok(policy)
}

/// `401002` to a service API caller.
fn unauthorized(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::UNAUTHORIZED, message)
}

fn grants(policy: &Policy, right: &str) -> bool {
    policy.rights.iter().any(|r| r == right)
}

fn if_match(call: &Call) -> IfMatch {
    IfMatch::parse(call.header("if-match"))
}

/// PUT / GET / DELETE on one record of an enrollment kind.
async fn record<R: EnrollmentKind>(state: &AppState, call: &Call, id: &str) -> HttpResult {
    call.require_api_version()?;
    let engine = &state.engine;
    match call.method {
        Method::PUT => {
            let policy = authorize(state, call, &[ENROLLMENT_WRITE])?;
            let mut saved: R = engine.management().put_enrollment_record(id, &call.body, &if_match(call)).await?;
            tracing::info!(kind = R::NOUN, id, "saved");
            // The stored record carries the keys (generated or kept); a caller that may not
            // read enrollments does not get them back (a group key derives every member's key).
            if !grants(policy, ENROLLMENT_READ) {
                let hidden = without_secrets(&saved.common().attestation);
                saved.common_mut().attestation = hidden;
            }
            Ok(json(StatusCode::OK, &saved, &call.request_id))
        }
        Method::GET => {
            authorize(state, call, &[ENROLLMENT_READ])?;
            let r: R = engine.management().get_enrollment_record(id).await?;
            Ok(json(StatusCode::OK, &r, &call.request_id))
        }
        _ => {
            authorize(state, call, &[ENROLLMENT_WRITE])?;
            engine.management().delete_enrollment_record::<R>(id, &if_match(call)).await?;
            tracing::info!(kind = R::NOUN, id, "deleted");
            Ok(empty(StatusCode::NO_CONTENT, &call.request_id))
        }
    }
}

/// `/enrollments/{id}`.
pub(crate) async fn enrollment(state: &AppState, call: &Call, id: &str) -> HttpResult {
    record::<IndividualEnrollment>(state, call, id).await
}

/// `/enrollmentGroups/{id}`.
pub(crate) async fn group(state: &AppState, call: &Call, id: &str) -> HttpResult {
    record::<EnrollmentGroup>(state, call, id).await
}

async fn attestation<R: EnrollmentKind>(state: &AppState, call: &Call, id: &str) -> HttpResult {
    call.require_api_version()?;
    // It reveals keys: reading alone is not enough.
    authorize(state, call, &[ENROLLMENT_READ, ENROLLMENT_WRITE])?;
    let a = state.engine.management().get_attestation_mechanism::<R>(id).await?;
    Ok(json(StatusCode::OK, &a, &call.request_id))
}

/// `POST /enrollments/{id}/attestationmechanism`.
pub(crate) async fn enrollment_attestation(state: &AppState, call: &Call, id: &str) -> HttpResult {
    attestation::<IndividualEnrollment>(state, call, id).await
}

/// `POST /enrollmentGroups/{id}/attestationmechanism`.
pub(crate) async fn group_attestation(state: &AppState, call: &Call, id: &str) -> HttpResult {
    attestation::<EnrollmentGroup>(state, call, id).await
}

/// Page size and continuation from the paging headers.
fn paging(state: &AppState, call: &Call) -> Result<(usize, Option<String>), Refusal> {
    let size = match call.header("x-ms-max-item-count").map(str::trim) {
        None | Some("") | Some("0") => state.default_page_size,
        Some(v) => v.parse::<usize>().map_err(|_| {
            Refusal::new(ErrorCode::INVALID_ARGUMENT, format!("x-ms-max-item-count '{v}' is not a whole number"))
        })?,
    };
    let continuation = call.header("x-ms-continuation").map(str::trim).filter(|c| !c.is_empty()).map(str::to_string);
    Ok((size, continuation))
}

fn page_response<T: Serialize>(
    page: QueryPage<T>,
    item_type: &'static str,
    request_id: &str,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let mut resp = json(StatusCode::OK, &page.items, request_id);
    resp.headers_mut().insert("x-ms-item-type", HeaderValue::from_static(item_type));
    if let Some(c) = page.continuation.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert("x-ms-continuation", c);
    }
    resp
}

/// Checks that the body is a query specification (`{"query": "…"}`, or empty). The query
/// text itself is not interpreted: Azure answers enrollment and group queries with every
/// record whatever the text says, and `az iot dps enrollment list` sends the text wrapped twice.
fn check_query_body(call: &Call) -> Result<(), Refusal> {
    if call.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    dps_proto::json::parse::<QuerySpecification>(&call.body).map(drop).map_err(|e| {
        Refusal::new(
            ErrorCode::INVALID_REQUEST_BODY,
            format!("the body must be a query specification {{\"query\": \"SELECT * ...\"}}: {e}"),
        )
    })
}

async fn query<R: EnrollmentKind>(state: &AppState, call: &Call, item_type: &'static str) -> HttpResult {
    call.require_api_version()?;
    authorize(state, call, &[ENROLLMENT_READ])?;
    let (size, continuation) = paging(state, call)?;
    check_query_body(call)?;
    let page = state.engine.management().query_enrollment_records::<R>(size, continuation.as_deref()).await?;
    Ok(page_response(page, item_type, &call.request_id))
}

/// `POST /enrollments/query`.
pub(crate) async fn query_enrollments(state: &AppState, call: &Call) -> HttpResult {
    query::<IndividualEnrollment>(state, call, "enrollment").await
}

/// `POST /enrollmentGroups/query`.
pub(crate) async fn query_groups(state: &AppState, call: &Call) -> HttpResult {
    query::<EnrollmentGroup>(state, call, "enrollmentGroup").await
}

/// `POST /enrollments` (bulk).
pub(crate) async fn bulk_enrollments(state: &AppState, call: &Call) -> HttpResult {
    call.require_api_version()?;
    authorize(state, call, &[ENROLLMENT_WRITE])?;
    let result = state.engine.management().bulk_enrollments(&call.body).await?;
    Ok(json(StatusCode::OK, &result, &call.request_id))
}

/// `POST /enrollmentGroups` (bulk).
pub(crate) async fn bulk_groups(state: &AppState, call: &Call) -> HttpResult {
    call.require_api_version()?;
    authorize(state, call, &[ENROLLMENT_WRITE])?;
    let result = state.engine.management().bulk_enrollment_groups(&call.body).await?;
    Ok(json(StatusCode::OK, &result, &call.request_id))
}

/// `GET` / `DELETE /registrations/{id}`.
pub(crate) async fn registration(state: &AppState, call: &Call, id: &str) -> HttpResult {
    call.require_api_version()?;
    if call.method == Method::GET {
        authorize(state, call, &[REGISTRATION_READ])?;
        let r = state.engine.management().get_registration_state(id).await?;
        Ok(json(StatusCode::OK, &r, &call.request_id))
    } else {
        authorize(state, call, &[REGISTRATION_WRITE])?;
        state.engine.management().delete_registration_state(id, &if_match(call)).await?;
        tracing::info!(registration_id = id, "registration state deleted");
        Ok(empty(StatusCode::NO_CONTENT, &call.request_id))
    }
}

/// `POST /registrations/{groupId}/query`.
pub(crate) async fn query_registrations(state: &AppState, call: &Call, group_id: &str) -> HttpResult {
    call.require_api_version()?;
    authorize(state, call, &[REGISTRATION_READ])?;
    let (size, continuation) = paging(state, call)?;
    let page = state.engine.management().query_group_registrations(group_id, size, continuation.as_deref()).await?;
    Ok(page_response(page, "deviceRegistration", &call.request_id))
}

/// `GET /certificates` (our extension: DPS keeps CA certificates in its management plane).
pub(crate) async fn list_certificates(state: &AppState, call: &Call) -> HttpResult {
    call.require_api_version()?;
    authorize(state, call, &[SERVICE_CONFIG])?;
    let list = state.engine.management().list_certificates().await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "value": list }), &call.request_id))
}

/// `PUT|GET|DELETE /certificates/{name}`.
pub(crate) async fn certificate(state: &AppState, call: &Call, name: &str) -> HttpResult {
    call.require_api_version()?;
    authorize(state, call, &[SERVICE_CONFIG])?;
    match call.method {
        Method::GET => {
            Ok(json(StatusCode::OK, &state.engine.management().get_certificate(name).await?, &call.request_id))
        }
        Method::PUT => {
            let c = state.engine.management().put_certificate(name, &call.body, &if_match(call)).await?;
            Ok(json(StatusCode::OK, &c, &call.request_id))
        }
        _ => {
            state.engine.management().delete_certificate(name, &if_match(call)).await?;
            Ok(empty(StatusCode::NO_CONTENT, &call.request_id))
        }
    }
}

/// `POST /certificates/{name}/generateVerificationCode`.
pub(crate) async fn certificate_verification_code(state: &AppState, call: &Call, name: &str) -> HttpResult {
    call.require_api_version()?;
    authorize(state, call, &[SERVICE_CONFIG])?;
    let c = state.engine.management().generate_verification_code(name, &if_match(call)).await?;
    Ok(json(StatusCode::OK, &c, &call.request_id))
}

/// `POST /certificates/{name}/verify` with `{"certificate": "<PEM>"}`.
pub(crate) async fn certificate_verify(state: &AppState, call: &Call, name: &str) -> HttpResult {
    call.require_api_version()?;
    authorize(state, call, &[SERVICE_CONFIG])?;
    let c = state.engine.management().verify_certificate(name, &if_match(call), &call.body).await?;
    Ok(json(StatusCode::OK, &c, &call.request_id))
}
