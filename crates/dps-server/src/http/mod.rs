//! HTTPS request handling: one dispatcher for the device runtime API and the service API.
//!
//! Paths are matched segment by segment after percent-decoding, case-insensitively for the
//! literal segments (Node's service SDK writes `/enrollmentgroups/…`). Unknown paths answer
//! 404 and wrong methods 405, both with a DPS error body.

mod device;
mod health;
mod openapi;
mod response;
mod service;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dps_core::Engine;
use dps_proto::error::ErrorCode;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use tracing::Instrument;

use crate::policy::Policy;
use crate::reply::{Refusal, RequestError};
pub use response::error_response;

/// What a request knows of the connection it came on.
pub struct Connection {
    /// The peer's address.
    pub peer: std::net::SocketAddr,
    /// The client certificate chain of the TLS session, if the client sent one.
    pub client_chain: Option<Arc<Vec<Vec<u8>>>>,
    /// The connection's place under the listener's caps; a WebSocket session keeps it.
    pub ticket: Arc<crate::gate::Ticket>,
}

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// The engine.
    pub engine: Engine,
    /// Service API policies.
    pub policies: Vec<Policy>,
    /// Host names service SAS audiences may name.
    pub host_names: Vec<String>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Time allowed to receive a body.
    pub body_read_timeout: Duration,
    /// Page size when a query sends none.
    pub default_page_size: usize,
    /// Failed authentications per source address (shared with MQTT).
    pub auth_failures: Arc<crate::auth_failures::AuthFailures>,
    /// Where WebSocket upgrades go, by subprotocol (MQTT over WebSocket, when on).
    pub websocket: crate::ws::WsRoutes,
    /// Turns true when the server stops (ends WebSocket sessions).
    pub stop: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("host_names", &self.host_names).finish_non_exhaustive()
    }
}

/// A parsed request, as the route handlers see it.
pub(crate) struct Call {
    pub method: Method,
    pub path: String,
    pub segments: Vec<String>,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub request_id: String,
    /// The client certificate chain of the TLS session (DER, leaf first).
    pub client_chain: Option<Arc<Vec<Vec<u8>>>>,
    /// The client's address.
    pub peer: std::net::SocketAddr,
}

impl Call {
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Requires a syntactically valid `api-version`.
    pub fn require_api_version(&self) -> Result<(), Refusal> {
        match self.query_param("api-version") {
            Some(v) if dps_proto::ids::is_valid_api_version(v) => Ok(()),
            Some(v) => Err(Refusal::new(
                ErrorCode::INVALID_API_VERSION,
                format!("api-version '{v}' is not of the form YYYY-MM-DD[-preview] (e.g. 2021-10-01)"),
            )),
            None => Err(Refusal::new(
                ErrorCode::INVALID_API_VERSION,
                "the query parameter api-version is missing (e.g. ?api-version=2021-10-01)",
            )),
        }
    }
}

fn decode_segments(path: &str) -> Option<Vec<String>> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned()))
        .collect()
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
            (dec(k), dec(v))
        })
        .collect()
}

/// Handles one HTTP request. Never fails: every error becomes a DPS error response.
/// WebSocket upgrades go to [`crate::ws`].
pub async fn handle(
    state: Arc<AppState>,
    connection: Connection,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Connection { peer, client_chain, ticket } = connection;
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if crate::ws::is_upgrade(&req) {
        let session = crate::ws::Session { peer, client_chain, ticket };
        let response = state
            .websocket
            .accept(req, session, state.stop.clone())
            .unwrap_or_else(|err| error_response(&err.into(), &request_id));
        tracing::debug!(%path, status = response.status().as_u16(), request_id, "WebSocket upgrade");
        return Ok(response);
    }
    // Every line logged while serving the request carries its ID: the `trackingId` of an
    // error body, and `x-ms-request-id`.
    let span = tracing::info_span!("request", request_id = %request_id);
    let response = async {
        match read_call(&state, req, &request_id, peer).await {
            Ok(mut call) => {
                call.client_chain = client_chain;
                route(&state, call).await
            }
            Err(err) => {
                let response = error_response(&err.into(), &request_id);
                crate::metrics::http_request("unread", response.status());
                response
            }
        }
    }
    .instrument(span.clone())
    .await;
    let _entered = span.enter();
    let status = response.status();
    if status.is_server_error() {
        dps_core::warn_limited!("request-5xx", %method, %path, status = status.as_u16(), request_id, "request failed");
    } else {
        tracing::debug!(%method, %path, status = status.as_u16(), ms = started.elapsed().as_millis() as u64, request_id, "request");
    }
    Ok(response)
}

async fn read_call(
    state: &AppState,
    req: Request<Incoming>,
    request_id: &str,
    peer: std::net::SocketAddr,
) -> Result<Call, Refusal> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let segments = decode_segments(&path).ok_or_else(|| {
        Refusal::new(ErrorCode::INVALID_IDENTIFIER, "the request path is not valid percent-encoded UTF-8")
    })?;
    // One credential per request: a proxy in front may check another header than we do.
    let authorizations = parts.headers.get_all(http::header::AUTHORIZATION).iter().count();
    if authorizations > 1 {
        return Err(Refusal::new(
            ErrorCode::INVALID_ARGUMENT,
            format!("the request carries {authorizations} Authorization headers; send exactly one"),
        ));
    }
    // A declared length over the limit is refused at once, before waiting for the body.
    let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(too_large(state.max_body_bytes));
    }
    let collected =
        tokio::time::timeout(state.body_read_timeout, Limited::new(body, state.max_body_bytes).collect()).await;
    let body = match collected {
        Err(_) => {
            return Err(Refusal::new(
                ErrorCode::INVALID_REQUEST_BODY,
                format!("the request body did not arrive within {} s", state.body_read_timeout.as_secs()),
            ))
        }
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(too_large(state.max_body_bytes))
        }
        Ok(Err(e)) => {
            return Err(Refusal::new(ErrorCode::INVALID_REQUEST_BODY, format!("cannot read the request body: {e}")))
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    Ok(Call {
        method: parts.method,
        query: parse_query(parts.uri.query()),
        path,
        segments,
        headers: parts.headers,
        body,
        request_id: request_id.to_string(),
        client_chain: None,
        peer,
    })
}

fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        ErrorCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {limit} bytes (limits.max_body_bytes)"),
    )
}

/// Where a request would go: the route's name and whether `method` is allowed on it, or `None`
/// for a path nothing serves (404), after the same percent-decoding and matching as a real
/// request. For tests and fuzzing.
pub fn route_of(method: &Method, path: &str) -> Option<(&'static str, bool)> {
    let segments = decode_segments(path)?;
    let route = match_route(method, &segments)?;
    Some((route.name(), route.allowed().contains(method)))
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Which handler a path belongs to, and the methods it allows.
enum Route {
    EnrollmentBulk,
    EnrollmentQuery,
    Enrollment(String),
    EnrollmentAttestation(String),
    GroupBulk,
    GroupQuery,
    Group(String),
    GroupAttestation(String),
    Registration(String),
    RegistrationQuery(String),
    Certificates,
    Certificate(String),
    CertificateVerificationCode(String),
    CertificateVerify(String),
    DeviceRegister { scope: String, id: String },
    DeviceOperation { scope: String, id: String, operation: String },
    DeviceStatus { scope: String, id: String },
    Health,
    Ready,
    OpenApi,
}

impl Route {
    fn name(&self) -> &'static str {
        match self {
            Route::EnrollmentBulk => "enrollment bulk",
            Route::EnrollmentQuery => "enrollment query",
            Route::Enrollment(_) => "enrollment",
            Route::EnrollmentAttestation(_) => "enrollment attestation mechanism",
            Route::GroupBulk => "group bulk",
            Route::GroupQuery => "group query",
            Route::Group(_) => "group",
            Route::GroupAttestation(_) => "group attestation mechanism",
            Route::Registration(_) => "registration state",
            Route::RegistrationQuery(_) => "registration query",
            Route::Certificates => "certificates",
            Route::Certificate(_) => "certificate",
            Route::CertificateVerificationCode(_) => "certificate verification code",
            Route::CertificateVerify(_) => "certificate verify",
            Route::DeviceRegister { .. } => "device register",
            Route::DeviceOperation { .. } => "device operation status",
            Route::DeviceStatus { .. } => "device registration status",
            Route::Health => "health",
            Route::Ready => "readiness",
            Route::OpenApi => "openapi document",
        }
    }

    fn allowed(&self) -> &'static [Method] {
        match self {
            Route::EnrollmentBulk | Route::GroupBulk => &[Method::POST],
            Route::EnrollmentQuery | Route::GroupQuery => &[Method::POST],
            Route::Enrollment(_) | Route::Group(_) => &[Method::PUT, Method::GET, Method::DELETE],
            Route::EnrollmentAttestation(_) | Route::GroupAttestation(_) => &[Method::POST],
            Route::Registration(_) => &[Method::GET, Method::DELETE],
            Route::RegistrationQuery(_) => &[Method::POST],
            Route::Certificates => &[Method::GET],
            Route::Certificate(_) => &[Method::PUT, Method::GET, Method::DELETE],
            Route::CertificateVerificationCode(_) | Route::CertificateVerify(_) => &[Method::POST],
            Route::DeviceRegister { .. } => &[Method::PUT],
            Route::DeviceOperation { .. } => &[Method::GET],
            Route::DeviceStatus { .. } => &[Method::POST],
            Route::Health | Route::Ready | Route::OpenApi => &[Method::GET],
        }
    }
}

fn match_route(method: &Method, s: &[String]) -> Option<Route> {
    let s: Vec<&str> = s.iter().map(String::as_str).collect();
    let route = match s.as_slice() {
        [h] if eq(h, "healthz") => Route::Health,
        [r] if eq(r, "readyz") => Route::Ready,
        [o] if eq(o, "openapi.json") => Route::OpenApi,
        [e] if eq(e, "enrollments") => Route::EnrollmentBulk,
        [e, q] if eq(e, "enrollments") && eq(q, "query") && method == Method::POST => Route::EnrollmentQuery,
        [e, id] if eq(e, "enrollments") => Route::Enrollment(id.to_string()),
        [e, id, a] if eq(e, "enrollments") && eq(a, "attestationmechanism") => {
            Route::EnrollmentAttestation(id.to_string())
        }
        [g] if eq(g, "enrollmentgroups") => Route::GroupBulk,
        [g, q] if eq(g, "enrollmentgroups") && eq(q, "query") && method == Method::POST => Route::GroupQuery,
        [g, id] if eq(g, "enrollmentgroups") => Route::Group(id.to_string()),
        [g, id, a] if eq(g, "enrollmentgroups") && eq(a, "attestationmechanism") => {
            Route::GroupAttestation(id.to_string())
        }
        [r, id] if eq(r, "registrations") => Route::Registration(id.to_string()),
        [r, id, q] if eq(r, "registrations") && eq(q, "query") => Route::RegistrationQuery(id.to_string()),
        [c] if eq(c, "certificates") => Route::Certificates,
        [c, name] if eq(c, "certificates") => Route::Certificate(name.to_string()),
        [c, name, v] if eq(c, "certificates") && eq(v, "generateverificationcode") => {
            Route::CertificateVerificationCode(name.to_string())
        }
        [c, name, v] if eq(c, "certificates") && eq(v, "verify") => Route::CertificateVerify(name.to_string()),
        [scope, r, id, reg] if eq(r, "registrations") && eq(reg, "register") => {
            Route::DeviceRegister { scope: scope.to_string(), id: id.to_string() }
        }
        [scope, r, id, ops, op] if eq(r, "registrations") && eq(ops, "operations") => {
            Route::DeviceOperation { scope: scope.to_string(), id: id.to_string(), operation: op.to_string() }
        }
        [scope, r, id] if eq(r, "registrations") => {
            Route::DeviceStatus { scope: scope.to_string(), id: id.to_string() }
        }
        _ => return None,
    };
    Some(route)
}

async fn route(state: &AppState, call: Call) -> Response<Full<Bytes>> {
    let Some(route) = match_route(&call.method, &call.segments) else {
        let err = Refusal::new(ErrorCode::ROUTE_NOT_FOUND, format!("no resource at {}", call.path));
        let response = error_response(&err.into(), &call.request_id);
        crate::metrics::http_request("none", response.status());
        return response;
    };
    let name = route.name();
    let response = serve_route(state, route, &call).await;
    crate::metrics::http_request(name, response.status());
    response
}

async fn serve_route(state: &AppState, route: Route, call: &Call) -> Response<Full<Bytes>> {
    if !route.allowed().contains(&call.method) {
        let allowed: Vec<&str> = route.allowed().iter().map(Method::as_str).collect();
        let err = Refusal::new(
            ErrorCode::METHOD_NOT_ALLOWED,
            format!("{} is not allowed on {}; allowed: {}", call.method, call.path, allowed.join(", ")),
        );
        let mut resp = error_response(&err.into(), &call.request_id);
        if let Ok(v) = http::HeaderValue::from_str(&allowed.join(", ")) {
            resp.headers_mut().insert(http::header::ALLOW, v);
        }
        return resp;
    }
    let result = match route {
        Route::DeviceRegister { scope, id } => device::register(state, call, scope, id).await,
        Route::DeviceOperation { scope, id, operation } => {
            device::operation_status(state, call, scope, id, operation).await
        }
        Route::DeviceStatus { scope, id } => device::registration_status(state, call, scope, id).await,
        Route::EnrollmentBulk => service::bulk_enrollments(state, call).await,
        Route::EnrollmentQuery => service::query_enrollments(state, call).await,
        Route::Enrollment(id) => service::enrollment(state, call, &id).await,
        Route::EnrollmentAttestation(id) => service::enrollment_attestation(state, call, &id).await,
        Route::GroupBulk => service::bulk_groups(state, call).await,
        Route::GroupQuery => service::query_groups(state, call).await,
        Route::Group(id) => service::group(state, call, &id).await,
        Route::GroupAttestation(id) => service::group_attestation(state, call, &id).await,
        Route::Registration(id) => service::registration(state, call, &id).await,
        Route::RegistrationQuery(id) => service::query_registrations(state, call, &id).await,
        Route::Certificates => service::list_certificates(state, call).await,
        Route::Certificate(name) => service::certificate(state, call, &name).await,
        Route::CertificateVerificationCode(name) => service::certificate_verification_code(state, call, &name).await,
        Route::CertificateVerify(name) => service::certificate_verify(state, call, &name).await,
        Route::Health => Ok(health::healthz(call)),
        Route::Ready => Ok(health::readyz(state, call).await),
        Route::OpenApi => Ok(openapi::document(call)),
    };
    result.unwrap_or_else(|err| error_response(&err, &call.request_id))
}

pub(crate) type HttpResult = Result<Response<Full<Bytes>>, RequestError>;

pub(crate) fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<String> {
        decode_segments(p).unwrap()
    }

    #[test]
    fn routes_are_case_insensitive_and_decoded() {
        assert!(
            matches!(match_route(&Method::POST, &segs("/enrollmentgroups/g1/attestationmechanism")), Some(Route::GroupAttestation(g)) if g == "g1")
        );
        assert!(matches!(match_route(&Method::PUT, &segs("/enrollmentGroups/g1")), Some(Route::Group(_))));
        assert!(matches!(match_route(&Method::POST, &segs("/enrollments/query")), Some(Route::EnrollmentQuery)));
        assert!(
            matches!(match_route(&Method::PUT, &segs("/enrollments/query")), Some(Route::Enrollment(id)) if id == "query")
        );
        assert!(matches!(
            match_route(&Method::PUT, &segs("/0ne00000A0A/registrations/dev%2D1/register")),
            Some(Route::DeviceRegister { scope, id }) if scope == "0ne00000A0A" && id == "dev-1"
        ));
        assert!(matches!(
            match_route(&Method::GET, &segs("/s/registrations/d/operations/5.a.b")),
            Some(Route::DeviceOperation { .. })
        ));
        assert!(matches!(match_route(&Method::POST, &segs("/s/registrations/d")), Some(Route::DeviceStatus { .. })));
        assert!(matches!(
            match_route(&Method::POST, &segs("/registrations/g/query")),
            Some(Route::RegistrationQuery(_))
        ));
        assert!(match_route(&Method::GET, &segs("/nothing/here")).is_none());
        assert!(decode_segments("/a/%FF").is_none());
    }

    #[test]
    fn query_strings() {
        let q = parse_query(Some("api-version=2021-10-01&forceRegistration=true&x"));
        assert_eq!(q[0], ("api-version".into(), "2021-10-01".into()));
        assert_eq!(q[1].1, "true");
        assert_eq!(q[2], ("x".into(), String::new()));
    }
}
