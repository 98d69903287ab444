//! Prometheus metrics (`[metrics] listen`, off by default): what the transports, the
//! webhook client, the hub registrars and the store record, and the listener that serves
//! them as Prometheus text at `GET /metrics`.
//!
//! Recording goes through the `metrics` facade: with no `[metrics] listen` no recorder is
//! installed and every record is a no-op. Labels never carry a registration ID, a hub name or
//! anything a device chooses, so their number stays bounded. The names and labels are listed
//! in docs/operations.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dps_core::registration::{Credential, DeviceReply, Registered};
use dps_proto::device::RegistrationStatus;
use dps_proto::service::AttestationType;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::error::ServerError;
use crate::gate::Gate;

/// Whether a recorder is installed: without one, the record functions return at once (no
/// label strings built on the hot path).
static ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn on() -> bool {
    ON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Seconds buckets of the latency histograms: 1 ms to 30 s.
const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Buckets of the store's commit batch sizes.
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The device transport a request came on (WebSocket sessions count as their protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTPS (REST).
    Https,
    /// MQTT, over TLS or WebSocket.
    Mqtt,
    /// AMQP, over TLS or WebSocket.
    Amqp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Https => "https",
            Transport::Mqtt => "mqtt",
            Transport::Amqp => "amqp",
        }
    }
}

/// The `attestation` label of an enrollment's mechanism.
pub fn attestation_label(kind: AttestationType) -> &'static str {
    match kind {
        AttestationType::SymmetricKey => "symmetricKey",
        AttestationType::X509 => "x509",
        AttestationType::Tpm => "tpm",
        AttestationType::None => "none",
    }
}

/// The `attestation` label of a request whose enrollment is not known (it was refused): what
/// the credential shows, else `unknown`.
pub fn credential_label(credential: &Credential) -> &'static str {
    match credential {
        Credential::X509(_) => "x509",
        Credential::TpmEndorsement(_) => "tpm",
        Credential::Sas(_) | Credential::None => "unknown",
    }
}

fn reply_attestation(reply: &DeviceReply) -> Option<&'static str> {
    if let Some(kind) = reply.attestation {
        return Some(attestation_label(kind));
    }
    let state = reply.operation.registration_state.as_ref()?;
    if state.tpm.is_some() {
        Some("tpm")
    } else if state.x509.is_some() {
        Some("x509")
    } else if state.symmetric_key.is_some() {
        Some("symmetricKey")
    } else {
        None
    }
}

fn status_label(status: RegistrationStatus) -> &'static str {
    match status {
        RegistrationStatus::Unassigned => "unassigned",
        RegistrationStatus::Assigning => "assigning",
        RegistrationStatus::Assigned => "assigned",
        RegistrationStatus::Failed => "failed",
        RegistrationStatus::Disabled => "disabled",
    }
}

/// What a register request came to.
pub enum Outcome<'a> {
    /// An answer with a registration status.
    Reply(&'a DeviceReply),
    /// A TPM challenge.
    Challenge,
    /// An error answer.
    Refused(&'a dps_core::Error),
}

impl<'a> From<Result<&'a Registered, &'a dps_core::Error>> for Outcome<'a> {
    fn from(r: Result<&'a Registered, &'a dps_core::Error>) -> Self {
        match r {
            Ok(Registered::Reply(reply)) => Outcome::Reply(reply),
            Ok(Registered::Challenge(_)) => Outcome::Challenge,
            Err(e) => Outcome::Refused(e),
        }
    }
}

impl<'a> From<Result<&'a DeviceReply, &'a dps_core::Error>> for Outcome<'a> {
    fn from(r: Result<&'a DeviceReply, &'a dps_core::Error>) -> Self {
        match r {
            Ok(reply) => Outcome::Reply(reply),
            Err(e) => Outcome::Refused(e),
        }
    }
}

/// Records one register request: `dps_registrations_total` by transport, attestation, outcome
/// (the status answered, `challenge`, or `refused`) and DPS error code, and its latency.
/// `attestation` is the label to use when the answer does not show it.
pub fn registration<'a>(
    transport: Transport,
    attestation: &'static str,
    outcome: impl Into<Outcome<'a>>,
    started: Instant,
) {
    if !on() {
        return;
    }
    let (attestation, outcome, code) = match outcome.into() {
        Outcome::Reply(reply) => {
            let code = reply.operation.registration_state.as_ref().and_then(|s| s.error_code);
            (reply_attestation(reply).unwrap_or(attestation), status_label(reply.operation.status), code)
        }
        Outcome::Challenge => ("tpm", "challenge", None),
        Outcome::Refused(e) => (attestation, "refused", Some(e.code().0)),
    };
    let code = code.map(|c| c.to_string()).unwrap_or_default();
    let transport = transport.as_str();
    metrics::counter!("dps_registrations_total", "transport" => transport, "attestation" => attestation,
        "outcome" => outcome, "error_code" => code)
    .increment(1);
    metrics::histogram!("dps_registration_duration_seconds", "transport" => transport, "attestation" => attestation,
        "outcome" => outcome)
    .record(started.elapsed().as_secs_f64());
}

/// Records one operation status poll and what it answered.
pub fn poll(transport: Transport, result: Result<&DeviceReply, &dps_core::Error>) {
    if !on() {
        return;
    }
    let outcome = match result {
        Ok(reply) => status_label(reply.operation.status),
        Err(_) => "refused",
    };
    metrics::counter!("dps_operation_polls_total", "transport" => transport.as_str(), "outcome" => outcome)
        .increment(1);
}

/// Records a refused authentication (device or service API).
pub fn auth_rejected(transport: Transport, api: &'static str) {
    if !on() {
        return;
    }
    metrics::counter!("dps_auth_rejections_total", "transport" => transport.as_str(), "api" => api).increment(1);
}

/// Records a TLS handshake that failed or timed out on a listener.
pub fn tls_handshake_failed(listener: &'static str, cause: &'static str) {
    if !on() {
        return;
    }
    metrics::counter!("dps_tls_handshake_failures_total", "listener" => listener, "cause" => cause).increment(1);
}

/// Records one HTTP request by route and status class.
pub fn http_request(route: &'static str, status: StatusCode) {
    if !on() {
        return;
    }
    let class = match status.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("dps_http_requests_total", "route" => route, "status" => class).increment(1);
}

/// Records one call to a custom allocation webhook: `outcome` is `ok` or the cause of the
/// failure (`timeout`, `connect`, `status`, `answer`, …).
pub fn webhook_call(outcome: &'static str, started: Instant) {
    if !on() {
        return;
    }
    metrics::counter!("dps_webhook_calls_total", "outcome" => outcome).increment(1);
    metrics::histogram!("dps_webhook_call_duration_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// Records one call of a hub registrar (`kind`: http, azure-iot-hub, mosquitto; `operation`:
/// register or remove), retries included.
pub fn registrar_call(kind: &'static str, operation: &'static str, ok: bool, started: Instant) {
    if !on() {
        return;
    }
    let outcome = if ok { "ok" } else { "failed" };
    metrics::counter!("dps_hub_registrar_calls_total", "kind" => kind, "operation" => operation, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("dps_hub_registrar_call_duration_seconds", "kind" => kind, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
}

/// Records events delivered to every sink (and dropped after a permanent refusal) by one
/// drain of the event outbox.
pub fn events_delivered(count: usize, dropped: usize, started: Instant) {
    if !on() {
        return;
    }
    metrics::counter!("dps_events_delivered_total").increment(count as u64);
    if dropped > 0 {
        metrics::counter!("dps_events_dropped_total").increment(dropped as u64);
    }
    metrics::histogram!("dps_event_drain_duration_seconds").record(started.elapsed().as_secs_f64());
}

/// Sets how many events wait in the outbox (counted up to a cap).
pub fn events_pending(count: usize) {
    if !on() {
        return;
    }
    metrics::gauge!("dps_events_pending").set(count as f64);
}

/// Records a drain of the event outbox that stopped because a sink refused an event.
pub fn event_delivery_failed() {
    if !on() {
        return;
    }
    metrics::counter!("dps_event_delivery_failures_total").increment(1);
}

/// The installed recorder and what the scrape reads at each request.
pub struct Exporter {
    handle: PrometheusHandle,
    gates: Vec<(&'static str, Arc<Gate>)>,
    slots: Arc<tokio::sync::Semaphore>,
}

/// Connections the metrics listener serves at once.
const METRICS_CONNECTIONS: usize = 8;

/// Installs the process-wide recorder. Call once, before anything is recorded.
pub fn install() -> Result<PrometheusHandle, ServerError> {
    let fail = |e: &dyn std::fmt::Display| ServerError::Bootstrap(format!("cannot set up metrics: {e}"));
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .map_err(|e| fail(&e))?
        .set_buckets_for_metric(Matcher::Full("dps_store_commit_batch_size".into()), BATCH)
        .map_err(|e| fail(&e))?
        .install_recorder()
        .map_err(|e| fail(&e))
        .inspect(|_| ON.store(true, std::sync::atomic::Ordering::Relaxed))
}

impl Exporter {
    /// An exporter over an installed recorder and the listeners' gates (open connections).
    pub fn new(handle: PrometheusHandle, gates: Vec<(&'static str, Arc<Gate>)>) -> Self {
        Self { handle, gates, slots: Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS)) }
    }

    /// The Prometheus text of every metric, with the gauges read now.
    pub fn render(&self) -> String {
        for (listener, gate) in &self.gates {
            metrics::gauge!("dps_connections_open", "listener" => *listener).set(gate.open() as f64);
        }
        self.handle.render()
    }

    /// Serves `GET /metrics` (plain HTTP/1.1) on `listener` until `stop` turns true.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        dps_core::warn_limited!("metrics-accept", error = %e, "metrics listener: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            // A few scrapers at once; more wait (or time out) instead of taking descriptors.
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let exporter = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let exporter = exporter.clone();
                    async move { Ok::<_, std::convert::Infallible>(exporter.answer(&req)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(io, service);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(15), conn).await;
            });
        }
    }

    fn answer<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", self.render()),
            (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "GET only\n".into()),
            _ => (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "metrics are at /metrics\n".into()),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = http::HeaderValue::from_str(content_type) {
            resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        resp
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| ServerError::Bootstrap(format!("cannot listen for metrics on {addr} ([metrics] listen): {e}")))
}
