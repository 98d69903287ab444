//! Device-side client for the Device Provisioning Service — dps-rs or Azure IoT Hub DPS.
//!
//! A device registers with its registration ID and a credential (an individual symmetric key,
//! the key of its enrollment group from which the device key is derived, or an X.509
//! certificate chain and key), over HTTPS or MQTT, optionally sending a JSON payload. The
//! result carries the assigned hub, the device ID and the payload a custom allocation webhook
//! returned (`registrationState.payload`).
//!
//! With the cargo feature `tpm` (which needs the tpm2-tss libraries, Debian `libtss2-dev`), a
//! device can also attest with its TPM 2.0 over HTTPS ([`DeviceCredential::Tpm`]): it sends its
//! endorsement and storage root keys, imports the authentication key DPS answers the first
//! request with (`401` with `authenticationKey`), signs its SAS tokens in the TPM and, once
//! assigned, imports the key of the final answer (`registrationState.tpm.authenticationKey`,
//! its IoT Hub key) at the same persistent handle. See [`tpm`].
//!
//! ```no_run
//! use dps_device::{ClientConfig, DeviceClient, DeviceCredential, Transport};
//!
//! # async fn run() -> Result<(), dps_device::DeviceError> {
//! let config = ClientConfig {
//!     transport: Transport::Mqtt,
//!     trusted_ca_pem: Some(std::fs::read_to_string("dps-data/tls/ca.pem").unwrap()),
//!     payload: Some(serde_json::json!({"modelId": "dtmi:contoso:thermostat;1"})),
//!     ..ClientConfig::new("localhost", "0ne00000A0A", "dev-1", DeviceCredential::SymmetricKey("<base64 key>".into()))
//! };
//! let registration = DeviceClient::new(config)?.register().await?;
//! println!("{} on {:?}", registration.state.registration_id, registration.state.assigned_hub);
//! # Ok(()) }
//! ```
//!
//! Transient answers (429, 5xx, a refused or dropped connection, MQTT CONNACK 3) are retried
//! with exponential backoff and jitter, honouring `retry-after`, up to `max_attempts`; the whole
//! registration is bounded by `timeout`. Everything else is a typed [`DeviceError`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod https;
mod mqtt;
#[cfg(feature = "tpm")]
pub mod tpm;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::device::{DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus};
use dps_proto::error::ErrorDetails;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

pub use dps_proto::device::DeviceRegistrationResult as RegistrationState;

/// How the device proves its identity.
#[derive(Clone)]
pub enum DeviceCredential {
    /// The device's own key (individual enrollment), base64.
    SymmetricKey(String),
    /// The enrollment group's key, base64; the device key is derived from it and the
    /// registration ID.
    GroupKey(String),
    /// An X.509 certificate chain (leaf first) and the leaf's private key, PEM.
    X509 {
        /// Certificate chain, PEM.
        chain_pem: String,
        /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
        key_pem: String,
    },
    /// The device's TPM 2.0 (HTTPS only; needs the cargo feature `tpm`, see [`TPM_SUPPORTED`]).
    ///
    /// The registration ID is configured; the official SDKs derive it from the endorsement key
    /// instead (the C SDK: lower-case base32 of SHA-256 over the marshalled EK), which an
    /// enrollment may use as its registration ID too.
    Tpm(TpmConfig),
}

/// Whether this build has TPM support (the cargo feature `tpm`).
pub const TPM_SUPPORTED: bool = cfg!(feature = "tpm");

/// Where the imported DPS authentication key is kept unless configured otherwise: the
/// persistent handle the C, C# and Node SDKs use, and IoT Edge's `0x81000000 +
/// auth_key_index` with its default index `0x00_01_00`.
pub const DEFAULT_AUTH_KEY_HANDLE: u32 = 0x8100_0100;

/// Base of the persistent handles IoT Edge's `auth_key_index` is an offset from.
pub const PERSISTENT_HANDLE_BASE: u32 = 0x8100_0000;

/// How to reach the device's TPM and where to keep the key DPS hands it.
#[derive(Clone, PartialEq, Eq)]
pub struct TpmConfig {
    /// The TCTI: `device:/dev/tpmrm0` (`device` alone means that too), `swtpm:host=H,port=P`,
    /// `mssim:host=H,port=P` or `tabrmd`.
    pub tcti: String,
    /// The persistent handle the authentication key is imported to (and signed with),
    /// replacing what is there; [`DEFAULT_AUTH_KEY_HANDLE`] by default.
    pub auth_key_handle: u32,
    /// The endorsement hierarchy's authorization value, if it has one.
    pub endorsement_auth: Option<String>,
    /// The owner (storage) hierarchy's authorization value, if it has one.
    pub owner_auth: Option<String>,
}

impl TpmConfig {
    /// A TPM behind `tcti` with the default key handle and empty hierarchy authorizations.
    pub fn new(tcti: &str) -> Self {
        Self {
            tcti: tcti.to_string(),
            auth_key_handle: DEFAULT_AUTH_KEY_HANDLE,
            endorsement_auth: None,
            owner_auth: None,
        }
    }
}

impl std::fmt::Debug for TpmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmConfig")
            .field("tcti", &self.tcti)
            .field("auth_key_handle", &format_args!("0x{:08x}", self.auth_key_handle))
            .field("endorsement_auth", &self.endorsement_auth.as_ref().map(|_| "<redacted>"))
            .field("owner_auth", &self.owner_auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl std::fmt::Debug for DeviceCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceCredential::SymmetricKey(_) => "SymmetricKey(<redacted>)",
            DeviceCredential::GroupKey(_) => "GroupKey(<redacted>)",
            DeviceCredential::X509 { .. } => "X509(<chain and key>)",
            DeviceCredential::Tpm(_) => "Tpm(<TPM>)",
        })
    }
}

/// The device transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTPS REST.
    Https,
    /// MQTT 3.1.1 over TLS.
    Mqtt,
}

/// Everything a registration needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Host of the service (`global.azure-devices-provisioning.net`, `localhost`, …).
    pub host: String,
    /// HTTPS port (443).
    pub https_port: u16,
    /// MQTT port (8883).
    pub mqtt_port: u16,
    /// ID scope.
    pub id_scope: String,
    /// Registration ID.
    pub registration_id: String,
    /// Credential.
    pub credential: DeviceCredential,
    /// Transport.
    pub transport: Transport,
    /// PEM of a CA to trust instead of the system roots (a self-hosted server's test CA).
    pub trusted_ca_pem: Option<String>,
    /// Registration payload: any JSON value, sent unchanged (`None` or `null`: no payload).
    pub payload: Option<Value>,
    /// Bound on the whole registration, polls and retries included.
    pub timeout: Duration,
    /// Attempts for transient failures (at least 1).
    pub max_attempts: u32,
}

impl ClientConfig {
    /// A configuration with the defaults: HTTPS, ports 443 and 8883, system roots, no payload,
    /// a 60 s timeout, 5 attempts.
    pub fn new(host: &str, id_scope: &str, registration_id: &str, credential: DeviceCredential) -> Self {
        Self {
            host: host.to_string(),
            https_port: 443,
            mqtt_port: 8883,
            id_scope: id_scope.to_string(),
            registration_id: registration_id.to_string(),
            credential,
            transport: Transport::Https,
            trusted_ca_pem: None,
            payload: None,
            timeout: Duration::from_secs(60),
            max_attempts: 5,
        }
    }
}

/// Why a registration did not succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    /// The configuration cannot work (bad key, unreadable certificate).
    #[error("configuration: {0}")]
    Config(String),
    /// The service refused the credential (HTTP 401, MQTT CONNACK 4 or 5).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The enrollment is disabled.
    #[error("the enrollment is disabled")]
    Disabled,
    /// The registration ended `failed` (e.g. a custom allocation error).
    #[error("registration failed ({code}): {message}")]
    Failed {
        /// DPS error code.
        code: u32,
        /// The service's message.
        message: String,
    },
    /// The service answered an error other than 401.
    #[error("service error {status} ({code}): {message}")]
    Service {
        /// HTTP (or MQTT topic) status.
        status: u16,
        /// DPS error code.
        code: u32,
        /// The service's message.
        message: String,
    },
    /// The connection failed (DNS, TCP, TLS, closed) after every attempt.
    #[error("transport: {0}")]
    Transport(String),
    /// The service answered something that is not DPS.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The registration did not finish in time.
    #[error("no result within {0:?}")]
    Timeout(Duration),
    /// The TPM could not be used, or refused what it was given (an authentication key that was
    /// not made for it).
    #[error("TPM: {0}")]
    Tpm(String),
}

/// A finished registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The operation ID.
    pub operation_id: String,
    /// `assigned`.
    pub status: RegistrationStatus,
    /// The registration state: hub, device ID, substatus, payload.
    pub state: DeviceRegistrationResult,
}

/// An attempt's failure: retry or give up.
#[derive(Debug)]
pub(crate) enum AttemptError {
    Retry { reason: String, after: Option<Duration> },
    Fatal(DeviceError),
}

impl From<DeviceError> for AttemptError {
    fn from(e: DeviceError) -> Self {
        AttemptError::Fatal(e)
    }
}

/// What an answer means.
pub(crate) enum Outcome {
    /// Poll this operation after the delay.
    Poll { operation_id: String, after: Duration },
    /// Done.
    Done(Box<Registration>),
}

/// Interprets a register or poll answer.
pub(crate) fn interpret(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Result<Outcome, AttemptError> {
    if status == 429 || status >= 500 {
        return Err(AttemptError::Retry {
            reason: format!("the service answered {status}: {}", error_message(body)),
            after: retry_after,
        });
    }
    if status >= 300 {
        let (code, message) = match serde_json::from_slice::<ErrorDetails>(body) {
            Ok(e) => (e.error_code.0, e.message),
            Err(_) => (u32::from(status) * 1000, String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()),
        };
        return Err(AttemptError::Fatal(if status == 401 {
            DeviceError::Unauthorized(message)
        } else {
            DeviceError::Service { status, code, message }
        }));
    }
    let op: RegistrationOperationStatus = serde_json::from_slice(body).map_err(|e| {
        AttemptError::Fatal(DeviceError::Protocol(format!("the answer is not a registration operation: {e}")))
    })?;
    match op.status {
        RegistrationStatus::Assigning | RegistrationStatus::Unassigned => Ok(Outcome::Poll {
            operation_id: op.operation_id,
            after: retry_after.unwrap_or(Duration::from_secs(2)).min(Duration::from_secs(60)),
        }),
        RegistrationStatus::Assigned => {
            let state = op.registration_state.ok_or_else(|| {
                AttemptError::Fatal(DeviceError::Protocol("assigned without a registrationState".into()))
            })?;
            Ok(Outcome::Done(Box::new(Registration { operation_id: op.operation_id, status: op.status, state })))
        }
        RegistrationStatus::Disabled => Err(AttemptError::Fatal(DeviceError::Disabled)),
        RegistrationStatus::Failed => {
            let state = op.registration_state;
            Err(AttemptError::Fatal(DeviceError::Failed {
                code: state.as_ref().and_then(|s| s.error_code).unwrap_or(0),
                message: state.and_then(|s| s.error_message).unwrap_or_default(),
            }))
        }
    }
}

fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorDetails>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

/// Prepared connection material.
pub(crate) struct Prepared {
    pub(crate) config: ClientConfig,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// The device key, for key credentials (the SAS token is signed with it).
    pub(crate) device_key: Option<Vec<u8>>,
    pub(crate) body: Vec<u8>,
}

impl Prepared {
    /// The registration SAS token of a key credential (signed in software).
    pub(crate) fn sas_token(&self) -> Option<String> {
        let key = self.device_key.as_ref()?;
        let sas = self.sas_to_sign();
        Some(sas.token(&hmac_sha256(key, &sas.string_to_sign()), Some("registration")))
    }

    /// The registration SAS token's fields, valid for an hour, ready to be signed.
    pub(crate) fn sas_to_sign(&self) -> SasToSign {
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 3600;
        SasToSign::new(&dps_proto::sas::device_resource(&self.config.id_scope, &self.config.registration_id), expiry)
    }
}

/// A registration SAS token before its signature (protocol.md §2.1): `sr` (the URL-encoded
/// resource) and `se`; the signature is over `{sr}\n{se}`, by whatever holds the key — HMAC in
/// software for symmetric keys, `TPM2_HMAC` for a TPM.
pub(crate) struct SasToSign {
    sr: String,
    se: String,
}

impl SasToSign {
    pub(crate) fn new(resource: &str, expiry: u64) -> Self {
        Self { sr: dps_proto::sas::encode_component(resource), se: expiry.to_string() }
    }

    /// The bytes the key signs.
    pub(crate) fn string_to_sign(&self) -> Vec<u8> {
        format!("{}\n{}", self.sr, self.se).into_bytes()
    }

    /// The token with `signature` (raw HMAC bytes) and the key name `skn`.
    pub(crate) fn token(&self, signature: &[u8], key_name: Option<&str>) -> String {
        let sig = dps_proto::sas::encode_component(&BASE64.encode(signature));
        let mut token = format!("SharedAccessSignature sr={}&sig={sig}&se={}", self.sr, self.se);
        if let Some(name) = key_name {
            token.push_str("&skn=");
            token.push_str(&dps_proto::sas::encode_component(name));
        }
        token
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    use hmac::Mac as _;
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// A device client: validated configuration and TLS material, ready to register.
#[derive(Clone)]
pub struct DeviceClient {
    prepared: Arc<Prepared>,
}

impl std::fmt::Debug for DeviceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClient").field("config", &self.prepared.config).finish_non_exhaustive()
    }
}

fn decode_key(what: &str, b64: &str) -> Result<Vec<u8>, DeviceError> {
    let key = BASE64.decode(b64.trim()).map_err(|_| DeviceError::Config(format!("the {what} is not base64")))?;
    if key.is_empty() {
        return Err(DeviceError::Config(format!("the {what} is empty")));
    }
    Ok(key)
}

impl DeviceClient {
    /// Validates the configuration and prepares TLS; no network traffic yet.
    pub fn new(config: ClientConfig) -> Result<Self, DeviceError> {
        if config.registration_id.is_empty() || config.id_scope.is_empty() || config.host.is_empty() {
            return Err(DeviceError::Config("host, ID scope and registration ID are required".into()));
        }
        let mut roots = rustls::RootCertStore::empty();
        match &config.trusted_ca_pem {
            Some(pem) => {
                let mut n = 0;
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| DeviceError::Config(format!("trusted CA: {e}")))?;
                    roots.add(cert).map_err(|e| DeviceError::Config(format!("trusted CA: {e}")))?;
                    n += 1;
                }
                if n == 0 {
                    return Err(DeviceError::Config("the trusted CA holds no PEM certificate".into()));
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let (device_key, identity) = match &config.credential {
            DeviceCredential::SymmetricKey(k) => (Some(decode_key("symmetric key", k)?), None),
            DeviceCredential::GroupKey(k) => {
                let group = decode_key("group key", k)?;
                (Some(dps_proto::sas::derive_device_key(&group, &config.registration_id)), None)
            }
            DeviceCredential::X509 { chain_pem, key_pem } => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|e| DeviceError::Config(format!("certificate chain: {e}")))?;
                if chain.is_empty() {
                    return Err(DeviceError::Config("the certificate file holds no PEM certificate".into()));
                }
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|e| DeviceError::Config(format!("private key: {e}")))?;
                (None, Some((chain, Arc::new(key))))
            }
            DeviceCredential::Tpm(tpm) => {
                if !TPM_SUPPORTED {
                    return Err(DeviceError::Config(
                        "TPM attestation: this build has no TPM support (build with the cargo feature `tpm`, which needs libtss2-dev)"
                            .into(),
                    ));
                }
                if config.transport != Transport::Https {
                    return Err(DeviceError::Config(
                        "TPM attestation works over HTTPS only (DPS has no TPM over MQTT); use the https transport"
                            .into(),
                    ));
                }
                if !(PERSISTENT_HANDLE_BASE..=0x81ff_ffff).contains(&tpm.auth_key_handle) {
                    return Err(DeviceError::Config(format!(
                        "TPM key handle 0x{:08x} is not a persistent handle (0x81000000..0x81ffffff)",
                        tpm.auth_key_handle
                    )));
                }
                (None, None)
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| DeviceError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let tls = match &identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| DeviceError::Config(format!("certificate and key do not fit together: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        let mut body = serde_json::json!({ "registrationId": config.registration_id });
        if let Some(p) = config.payload.as_ref().filter(|p| !p.is_null()) {
            body["payload"] = p.clone();
        }
        let body = serde_json::to_vec(&body).map_err(|e| DeviceError::Config(e.to_string()))?;
        Ok(Self { prepared: Arc::new(Prepared { config, tls: Arc::new(tls), device_key, body }) })
    }

    /// Registers: the full exchange (register, polls), retried on transient failures, bounded
    /// by the configured timeout.
    pub async fn register(&self) -> Result<Registration, DeviceError> {
        let timeout = self.prepared.config.timeout;
        match tokio::time::timeout(timeout, self.attempts()).await {
            Ok(r) => r,
            Err(_) => Err(DeviceError::Timeout(timeout)),
        }
    }

    async fn attempts(&self) -> Result<Registration, DeviceError> {
        let max = self.prepared.config.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.prepared.config.transport {
                Transport::Https => https::register(&self.prepared).await,
                Transport::Mqtt => mqtt::register(&self.prepared).await,
            };
            match result {
                Ok(r) => return Ok(r),
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Retry { reason, after }) => {
                    if attempt >= max {
                        return Err(DeviceError::Transport(format!("{reason} (after {attempt} attempts)")));
                    }
                    let delay = after.unwrap_or_else(|| backoff(attempt));
                    tracing::debug!(attempt, ?delay, reason, "retrying registration");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Exponential backoff with ±25 % jitter: 0.5 s, 1 s, 2 s, … up to 30 s.
fn backoff(attempt: u32) -> Duration {
    let base = 500u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(6)).min(30_000);
    let jitter = rand::random::<f64>() * 0.5 + 0.75;
    Duration::from_millis((base as f64 * jitter) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_typed() {
        let ok = br#"{"operationId":"op","status":"assigned","registrationState":{"registrationId":"d","status":"assigned","assignedHub":"h","deviceId":"d"}}"#;
        assert!(
            matches!(interpret(202, None, ok), Ok(Outcome::Done(r)) if r.state.assigned_hub.as_deref() == Some("h"))
        );
        let assigning = br#"{"operationId":"op","status":"assigning"}"#;
        assert!(
            matches!(interpret(202, Some(Duration::from_secs(3)), assigning), Ok(Outcome::Poll { after, .. }) if after == Duration::from_secs(3))
        );
        let failed = br#"{"operationId":"op","status":"failed","registrationState":{"registrationId":"d","status":"failed","errorCode":400209,"errorMessage":"webhook said no"}}"#;
        assert!(matches!(
            interpret(200, None, failed),
            Err(AttemptError::Fatal(DeviceError::Failed { code: 400209, .. }))
        ));
        let disabled = br#"{"operationId":"op","status":"disabled","registrationState":{"registrationId":"d","status":"disabled"}}"#;
        assert!(matches!(interpret(200, None, disabled), Err(AttemptError::Fatal(DeviceError::Disabled))));
        let unauthorized = br#"{"errorCode":401002,"trackingId":"t","message":"bad key","timestampUtc":"x"}"#;
        assert!(
            matches!(interpret(401, None, unauthorized), Err(AttemptError::Fatal(DeviceError::Unauthorized(m))) if m == "bad key")
        );
        assert!(matches!(
            interpret(503, Some(Duration::from_secs(5)), b"{}"),
            Err(AttemptError::Retry { after: Some(_), .. })
        ));
        assert!(matches!(interpret(429, None, b""), Err(AttemptError::Retry { after: None, .. })));
        assert!(matches!(
            interpret(404, None, b"<html>"),
            Err(AttemptError::Fatal(DeviceError::Service { status: 404, code: 404000, .. }))
        ));
        assert!(matches!(interpret(200, None, b"[]"), Err(AttemptError::Fatal(DeviceError::Protocol(_)))));
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(1) <= Duration::from_millis(625) && backoff(1) >= Duration::from_millis(375));
        assert!(backoff(20) <= Duration::from_millis(37_500));
    }

    #[test]
    fn bad_configurations_are_refused_before_any_traffic() {
        let cfg = |c| ClientConfig::new("localhost", "0ne00000001", "d", c);
        assert!(matches!(
            DeviceClient::new(cfg(DeviceCredential::SymmetricKey("not base64!".into()))),
            Err(DeviceError::Config(_))
        ));
        let c = cfg(DeviceCredential::X509 { chain_pem: "nothing".into(), key_pem: "nothing".into() });
        assert!(matches!(DeviceClient::new(c), Err(DeviceError::Config(_))));
    }

    #[test]
    fn tpm_needs_the_feature_and_https() {
        let tpm =
            || ClientConfig::new("localhost", "0ne00000001", "d", DeviceCredential::Tpm(TpmConfig::new("device")));
        if TPM_SUPPORTED {
            assert!(DeviceClient::new(tpm()).is_ok());
            let mqtt = ClientConfig { transport: Transport::Mqtt, ..tpm() };
            assert!(matches!(DeviceClient::new(mqtt), Err(DeviceError::Config(m)) if m.contains("HTTPS only")));
            let bad = ClientConfig {
                credential: DeviceCredential::Tpm(TpmConfig {
                    auth_key_handle: 0x8000_0001,
                    ..TpmConfig::new("device")
                }),
                ..tpm()
            };
            assert!(matches!(DeviceClient::new(bad), Err(DeviceError::Config(m)) if m.contains("0x80000001")));
        } else {
            assert!(matches!(DeviceClient::new(tpm()), Err(DeviceError::Config(m)) if m.contains("feature `tpm`")));
        }
    }

    #[test]
    fn the_sas_string_to_sign_is_the_symmetric_key_one() {
        let key = [7u8; 32];
        let resource = dps_proto::sas::device_resource("0ne00000001", "dev:1/ü");
        let sas = SasToSign::new(&resource, 1_800_000_000);
        assert_eq!(sas.string_to_sign(), b"0ne00000001%2Fregistrations%2Fdev%3A1%2F%C3%BC\n1800000000");
        assert_eq!(
            sas.token(&hmac_sha256(&key, &sas.string_to_sign()), Some("registration")),
            dps_proto::sas::build_token(&resource, &key, 1_800_000_000, Some("registration"))
        );
    }
}
