//! Hub registrars (`[hubs.registrar]`): the engine's [`HubRegistrar`] port, dispatching per
//! hub. `record` calls nothing; `http` POSTs a signed JSON description of the work to the
//! operator's endpoint (docs/hub-registrars.md), retrying a connection failure, a timeout, a
//! `429` or a `5xx` with backoff (honouring `Retry-After`, capped) up to `attempts` times.
//! A device's keys never leave dps through this registrar: it gets the attestation kind and
//! public facts only.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dps_core::registrar::{HubAuthentication, HubDevice, HubRegistrar, OnFailure, RegistrarError};
use serde_json::{json, Value};

use crate::config::{HttpRegistrarConfig, HubConfig, OnRegistrarFailure, RegistrarConfig};
use crate::error::ServerError;

/// The header carrying the call's signature (as the webhooks': `t=<unix s>,v1=<hex>`).
pub use crate::webhook::SIGNATURE_HEADER;

/// The start of an answer kept for an error message.
const ANSWER_START: usize = 200;
/// The longest wait between two attempts (also caps `Retry-After`).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The registrars of the linked hubs.
pub struct Registrars {
    /// Lower-cased host name → its HTTP registrar (hubs not here only record).
    http: HashMap<String, HttpRegistrar>,
    budget: Duration,
}

impl Registrars {
    /// Builds the registrars of `hubs`; reads each secret from its environment variable.
    pub fn new(hubs: &[HubConfig]) -> Result<Self, ServerError> {
        let mut http = HashMap::new();
        let mut budget = Duration::ZERO;
        for (i, hub) in hubs.iter().enumerate() {
            let RegistrarConfig::Http(config) = &hub.registrar else { continue };
            let registrar = HttpRegistrar::new(&format!("hubs[{i}].registrar"), config)?;
            budget = budget.max(registrar.budget());
            http.insert(hub.host_name.trim().to_ascii_lowercase(), registrar);
        }
        Ok(Self { http, budget })
    }

    /// Whether any hub calls out (else the engine needs no registrar at all).
    pub fn any(&self) -> bool {
        !self.http.is_empty()
    }

    fn of(&self, hub: &str) -> Option<&HttpRegistrar> {
        self.http.get(&hub.to_ascii_lowercase())
    }
}

#[async_trait]
impl HubRegistrar for Registrars {
    fn calls(&self, hub: &str) -> bool {
        self.of(hub).is_some()
    }

    fn calls_any(&self) -> bool {
        self.any()
    }

    fn on_failure(&self, hub: &str) -> OnFailure {
        self.of(hub).map_or(OnFailure::Fail, |r| r.on_failure)
    }

    fn budget(&self) -> Duration {
        self.budget
    }

    async fn register(&self, device: &HubDevice) -> Result<(), RegistrarError> {
        match self.of(&device.hub) {
            Some(r) => r.call(&register_body(device), false).await,
            None => Ok(()),
        }
    }

    async fn remove(&self, hub: &str, device_id: &str) -> Result<(), RegistrarError> {
        match self.of(hub) {
            Some(r) => r.call(&json!({"action": "remove", "hub": hub, "deviceId": device_id}), true).await,
            None => Ok(()),
        }
    }
}

/// What the endpoint is told of a registration: everything but the device's keys.
pub fn register_body(device: &HubDevice) -> Value {
    let authentication = match &device.authentication {
        HubAuthentication::SymmetricKey { .. } => json!({"type": "sas"}),
        HubAuthentication::X509Thumbprint { primary_thumbprint } => {
            json!({"type": "selfSigned", "primaryThumbprint": primary_thumbprint})
        }
        HubAuthentication::CertificateAuthority => json!({"type": "certificateAuthority"}),
    };
    let mut body = json!({
        "action": "register",
        "hub": device.hub,
        "deviceId": device.device_id,
        "registrationId": device.registration_id,
        "attestation": device.attestation,
        "authentication": authentication,
        "iotEdge": device.iot_edge,
        "substatus": device.substatus,
        "deviceData": device.device_data,
    });
    if let Some(group) = &device.enrollment_group_id {
        body["enrollmentGroupId"] = json!(group);
    }
    if let Some(twin) = &device.initial_twin {
        body["initialTwin"] = twin.clone();
    }
    if let Some(previous) = &device.previous {
        body["previous"] = json!({"hub": previous.hub, "deviceId": previous.device_id});
    }
    body
}

/// One hub's HTTP registrar.
struct HttpRegistrar {
    url: reqwest::Url,
    secret: Vec<u8>,
    client: reqwest::Client,
    attempts: u32,
    timeout: Duration,
    on_failure: OnFailure,
}

impl HttpRegistrar {
    fn new(at: &str, config: &HttpRegistrarConfig) -> Result<Self, ServerError> {
        let bad = |what: &str, message: String| ServerError::Bootstrap(format!("{at}.{what}: {message}"));
        let secret = match (&config.secret, &config.secret_env) {
            (Some(s), _) => s.clone(),
            (None, Some(name)) => std::env::var(name).ok().filter(|s| s.len() >= 16).ok_or_else(|| {
                bad(
                    "secret_env",
                    format!("the environment variable {name} is not set to a secret of at least 16 characters"),
                )
            })?,
            (None, None) => return Err(bad("secret", "set secret or secret_env".into())),
        };
        let timeout = Duration::from_secs(config.timeout_secs);
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dps-rs/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| bad("ca_file", format!("{}: {e}", ca.display())))?;
            for c in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad("ca_file", e.to_string()))? {
                builder = builder.add_root_certificate(c);
            }
        }
        Ok(Self {
            url: reqwest::Url::parse(&config.url).map_err(|e| bad("url", e.to_string()))?,
            secret: secret.into_bytes(),
            client: builder.build().map_err(|e| bad("url", e.to_string()))?,
            attempts: config.attempts,
            timeout,
            on_failure: match config.on_failure {
                OnRegistrarFailure::Fail => OnFailure::Fail,
                OnRegistrarFailure::Tolerate => OnFailure::Tolerate,
            },
        })
    }

    /// The longest a call with its retries can take.
    fn budget(&self) -> Duration {
        (self.timeout + MAX_BACKOFF) * self.attempts
    }

    /// POSTs `body`; `gone_is_done`: a `404` counts as success (a removal of what is not there).
    async fn call(&self, body: &Value, gone_is_done: bool) -> Result<(), RegistrarError> {
        let bytes = serde_json::to_vec(body).map_err(|e| RegistrarError::new(format!("cannot write the call: {e}")))?;
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let sent = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, crate::webhook::sign(&self.secret, t, &bytes))
                .body(bytes.clone())
                .send()
                .await;
            let wait = match sent {
                Ok(answer) => {
                    let status = answer.status();
                    if status.is_success() || (gone_is_done && status == reqwest::StatusCode::NOT_FOUND) {
                        return Ok(());
                    }
                    let retry_after = answer
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = answer.text().await.unwrap_or_default();
                    last = format!("its registrar answered HTTP {}: {}", status.as_u16(), answer_start(&text));
                    if !(status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error()) {
                        break;
                    }
                    retry_after
                }
                Err(e) if e.is_timeout() => {
                    last = format!("its registrar did not answer within {} s", self.timeout.as_secs());
                    None
                }
                Err(e) => {
                    last = format!("its registrar cannot be reached ({})", without_url(&e));
                    None
                }
            };
            if attempt < self.attempts {
                let backoff = Duration::from_millis(200u64 << attempt.min(5));
                tokio::time::sleep(wait.unwrap_or(backoff).min(MAX_BACKOFF)).await;
            }
        }
        Err(RegistrarError::new(last))
    }
}

/// The start of an answer, on one line.
fn answer_start(text: &str) -> String {
    let one_line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let trimmed = one_line.trim();
    match trimmed.char_indices().nth(ANSWER_START) {
        Some((i, _)) => format!("{}…", &trimmed[..i]),
        None => trimmed.to_string(),
    }
}

/// A connection error's text without the URL (its query may hold a key): the error's kind and
/// the causes under it.
fn without_url(e: &reqwest::Error) -> String {
    let mut text = String::from(if e.is_connect() { "connection failed" } else { "request failed" });
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::registrar::{DeviceDataAction, PreviousAssignment};
    use dps_proto::device::RegistrationSubstatus;

    #[test]
    fn the_call_carries_public_facts_and_never_the_key() {
        let device = HubDevice {
            hub: "hub-1.test".into(),
            device_id: "dev".into(),
            registration_id: "dev".into(),
            enrollment_group_id: Some("g".into()),
            attestation: "symmetricKey".into(),
            authentication: HubAuthentication::SymmetricKey {
                primary_key: "c2VjcmV0LWtleS0x".into(),
                secondary_key: Some("c2VjcmV0LWtleS0y".into()),
            },
            iot_edge: true,
            initial_twin: Some(json!({"tags": {"a": 1}})),
            substatus: RegistrationSubstatus::DeviceDataMigrated,
            device_data: DeviceDataAction::Keep,
            previous: Some(PreviousAssignment { hub: "hub-0.test".into(), device_id: "dev".into() }),
        };
        let body = register_body(&device);
        let text = body.to_string();
        assert!(!text.contains("c2VjcmV0"), "{text}");
        assert_eq!(body["authentication"], json!({"type": "sas"}));
        assert_eq!(body["substatus"], "deviceDataMigrated");
        assert_eq!(body["deviceData"], "keep");
        assert_eq!(body["previous"]["hub"], "hub-0.test");
        assert_eq!(body["enrollmentGroupId"], "g");
        assert_eq!(body["iotEdge"], true);
    }

    #[test]
    fn long_answers_are_cut_to_one_line() {
        assert_eq!(answer_start("a\nb"), "a b");
        assert_eq!(answer_start(&"x".repeat(500)).chars().count(), ANSWER_START + 1);
    }
}
