//! `kind = "http"`: a signed POST of the work to the operator's endpoint
//! (docs/hub-registrars.md). A device's keys never leave dps this way: the endpoint gets the
//! attestation kind and public facts only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dps_core::registrar::{HubAuthentication, HubDevice, OnFailure, RegistrarError};
use serde_json::{json, Value};

use super::send::{self, MAX_BACKOFF};
use crate::config::HttpRegistrarConfig;
use crate::error::ServerError;
use crate::webhook::SIGNATURE_HEADER;

/// One hub's HTTP registrar.
pub struct HttpRegistrar {
    url: reqwest::Url,
    secret: Vec<u8>,
    client: reqwest::Client,
    attempts: u32,
    timeout: Duration,
    pub(super) on_failure: OnFailure,
}

impl HttpRegistrar {
    /// Builds it from `[hubs.registrar]` (`at` names the setting in errors).
    pub fn new(at: &str, config: &HttpRegistrarConfig) -> Result<Self, ServerError> {
        let bad = |what: &str, message: String| ServerError::Bootstrap(format!("{at}.{what}: {message}"));
        let secret = super::secret(at, "secret", config.secret.as_deref(), config.secret_env.as_deref(), 16)?;
        let timeout = Duration::from_secs(config.timeout_secs);
        Ok(Self {
            url: reqwest::Url::parse(&config.url).map_err(|e| bad("url", e.to_string()))?,
            secret: secret.into_bytes(),
            client: send::client(timeout, config.ca_file.as_deref()).map_err(|e| bad("ca_file", e))?,
            attempts: config.attempts,
            timeout,
            on_failure: super::on_failure(config.on_failure),
        })
    }

    /// The longest a call with its retries can take.
    pub fn budget(&self) -> Duration {
        (self.timeout + MAX_BACKOFF) * self.attempts
    }

    /// Registers the device.
    pub async fn register(&self, device: &HubDevice) -> Result<(), RegistrarError> {
        self.call(&register_body(device), false).await
    }

    /// Removes the device.
    pub async fn remove(&self, hub: &str, device_id: &str) -> Result<(), RegistrarError> {
        self.call(&json!({"action": "remove", "hub": hub, "deviceId": device_id}), true).await
    }

    /// POSTs `body`; `gone_is_done`: a `404` counts as success (a removal of what is not there).
    async fn call(&self, body: &Value, gone_is_done: bool) -> Result<(), RegistrarError> {
        let bytes = serde_json::to_vec(body).map_err(|e| RegistrarError::new(format!("cannot write the call: {e}")))?;
        let answer = send::send_retried(self.attempts, self.timeout, || {
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            self.client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, crate::webhook::sign(&self.secret, t, &bytes))
                .body(bytes.clone())
        })
        .await
        .map_err(|e| {
            RegistrarError::with_detail(format!("its registrar {}", e.public), format!("its registrar {}", e.detail))
        })?;
        if answer.status.is_success() || (gone_is_done && answer.status == reqwest::StatusCode::NOT_FOUND) {
            return Ok(());
        }
        Err(RegistrarError::with_detail(
            format!("its registrar answered {}", answer.status_text()),
            format!("its registrar answered {}", answer.describe()),
        ))
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
}
