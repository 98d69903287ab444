//! `kind = "azure-iot-hub"`: the device identity and twin through IoT Hub's service REST API
//! (identity registry and twins, `api-version=2021-04-12`), authenticated with a shared access
//! policy of the hub's connection string (docs/hub-registrars.md). Create or update by ETag
//! (`If-Match` with the identity's ETag; a create or update that loses a race is read and
//! tried again), twin replaced for an initial assignment or a reset and carried over on a
//! migration, identity deleted from the hub a device left (`If-Match: *`, `404` counts as
//! done).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dps_core::registrar::{DeviceDataAction, HubAuthentication, HubDevice, OnFailure, RegistrarError};
use dps_proto::connection_string::ServiceConnectionString;
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::send::{self, Answer, MAX_BACKOFF};
use crate::config::AzureRegistrarConfig;
use crate::error::ServerError;

/// The IoT Hub service API version used.
pub const API_VERSION: &str = "2021-04-12";
/// Lifetime of the SAS tokens signed for each request.
const TOKEN_SECS: u64 = 3600;
/// Rounds of read-then-write when another writer changes the identity in between.
const ROUNDS: usize = 3;

/// One hub's IoT Hub registrar.
pub struct AzureRegistrar {
    /// `HostName` of the connection string: the token's audience.
    host_name: String,
    /// Where the requests go (`https://{HostName}`, or `endpoint`).
    base: reqwest::Url,
    key_name: String,
    key: Vec<u8>,
    client: reqwest::Client,
    attempts: u32,
    timeout: Duration,
    pub(super) on_failure: OnFailure,
}

impl AzureRegistrar {
    /// Builds it from `[hubs.registrar]` for the hub `hub` (`at` names the setting in errors).
    pub fn new(at: &str, hub: &str, config: &AzureRegistrarConfig) -> Result<Self, ServerError> {
        let bad = |what: &str, message: String| ServerError::Bootstrap(format!("{at}.{what}: {message}"));
        let text = super::secret(
            at,
            "connection_string",
            config.connection_string.as_deref(),
            config.connection_string_env.as_deref(),
            1,
        )?;
        let parsed = ServiceConnectionString::parse(&text).map_err(|e| bad("connection_string", e.to_string()))?;
        let host = parsed.host_name.split(':').next().unwrap_or_default().to_string();
        if !host.eq_ignore_ascii_case(hub.trim()) {
            return Err(bad(
                "connection_string",
                format!("its HostName '{host}' is not this hub's host_name '{}'", hub.trim()),
            ));
        }
        let endpoint = config.endpoint.clone().unwrap_or_else(|| format!("https://{}", parsed.host_name));
        let base = reqwest::Url::parse(&endpoint).map_err(|e| bad("endpoint", e.to_string()))?;
        let timeout = Duration::from_secs(config.timeout_secs);
        Ok(Self {
            host_name: host.to_ascii_lowercase(),
            base,
            key_name: parsed.key_name,
            key: parsed.key,
            client: send::client(timeout, config.ca_file.as_deref()).map_err(|e| bad("ca_file", e))?,
            attempts: config.attempts,
            timeout,
            on_failure: super::on_failure(config.on_failure),
        })
    }

    /// The longest a call with its retries can take (up to five requests for a registration).
    pub fn budget(&self) -> Duration {
        (self.timeout + MAX_BACKOFF) * self.attempts * 5
    }

    fn token(&self) -> String {
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) + TOKEN_SECS;
        dps_proto::sas::build_token(&self.host_name, &self.key, expiry, Some(&self.key_name))
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Answer, RegistrarError> {
        let mut url = self.base.clone();
        url.set_path(path);
        url.set_query(Some(&format!("api-version={API_VERSION}")));
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        send::send_retried(self.attempts, self.timeout, || {
            let mut r =
                self.client.request(method.clone(), url.clone()).header(reqwest::header::AUTHORIZATION, self.token());
            if let Some(m) = if_match {
                r = r.header(reqwest::header::IF_MATCH, m);
            }
            if let Some(b) = &bytes {
                r = r.header(reqwest::header::CONTENT_TYPE, "application/json").body(b.clone());
            }
            r
        })
        .await
        .map_err(|e| RegistrarError::with_detail(format!("it {}", e.public), format!("it {}", e.detail)))
    }

    /// Creates or updates the device's identity, then its twin: replaced by the initial twin
    /// for an initial assignment or a reset, by `migrated` (its twin on the hub it left) on a
    /// migration; left alone when it stays.
    pub async fn register(&self, device: &HubDevice, migrated: Option<Value>) -> Result<(), RegistrarError> {
        let path = format!("/devices/{}", dps_proto::sas::encode_component(&device.device_id));
        let identity = identity(device);
        let mut existed = false;
        let mut done = false;
        for _ in 0..ROUNDS {
            let current = self.request(Method::GET, &path, None, None).await?;
            let etag = match current.status {
                StatusCode::OK => {
                    existed = true;
                    Some(current.etag.clone().or_else(|| etag_of(&current.body)).unwrap_or_else(|| "*".into()))
                }
                StatusCode::NOT_FOUND => None,
                _ => return Err(answered("reading the device", &current)),
            };
            let written = self.request(Method::PUT, &path, etag.as_deref(), Some(&identity)).await?;
            match written.status {
                s if s.is_success() => {
                    done = true;
                    break;
                }
                // Created, changed or deleted by someone else in between: read it again.
                StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED | StatusCode::NOT_FOUND => continue,
                _ => return Err(answered("writing the device", &written)),
            }
        }
        if !done {
            return Err(RegistrarError::new("the device's identity kept changing while it was written; try again"));
        }
        let twin = match device.device_data {
            DeviceDataAction::Reset => Some(twin_of(device.initial_twin.as_ref())),
            DeviceDataAction::Initial if existed || device.initial_twin.is_some() => {
                Some(twin_of(device.initial_twin.as_ref()))
            }
            DeviceDataAction::Initial => None,
            DeviceDataAction::Keep if device.previous.is_some() => {
                migrated.map(|t| twin_of(Some(&t))).or_else(|| device.initial_twin.as_ref().map(|t| twin_of(Some(t))))
            }
            DeviceDataAction::Keep => None,
        };
        if let Some(twin) = twin {
            let path = format!("/twins/{}", dps_proto::sas::encode_component(&device.device_id));
            let written = self.request(Method::PUT, &path, Some("*"), Some(&twin)).await?;
            if !written.status.is_success() {
                return Err(answered("writing the device's twin", &written));
            }
        }
        Ok(())
    }

    /// The device's twin (for a migration to another hub).
    pub async fn twin(&self, device_id: &str) -> Result<Option<Value>, RegistrarError> {
        let path = format!("/twins/{}", dps_proto::sas::encode_component(device_id));
        let answer = self.request(Method::GET, &path, None, None).await?;
        match answer.status {
            StatusCode::OK => serde_json::from_str(&answer.body)
                .map(Some)
                .map_err(|e| RegistrarError::new(format!("its twin of the device is not JSON: {e}"))),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(answered("reading the device's twin", &answer)),
        }
    }

    /// Deletes the device's identity (`404`: already gone).
    pub async fn remove(&self, device_id: &str) -> Result<(), RegistrarError> {
        let path = format!("/devices/{}", dps_proto::sas::encode_component(device_id));
        let answer = self.request(Method::DELETE, &path, Some("*"), None).await?;
        if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(answered("deleting the device", &answer))
    }
}

fn answered(what: &str, answer: &Answer) -> RegistrarError {
    RegistrarError::with_detail(
        format!("{what}, it answered {}", answer.status_text()),
        format!("{what}, it answered {}", answer.describe()),
    )
}

/// The `etag` of a Device body (quoted, as `If-Match` wants it).
fn etag_of(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v.get("etag").and_then(Value::as_str).map(|e| if e.starts_with('"') { e.to_string() } else { format!("\"{e}\"") })
}

/// The Device body for the identity registry.
pub fn identity(device: &HubDevice) -> Value {
    let authentication = match &device.authentication {
        HubAuthentication::SymmetricKey { primary_key, secondary_key } => json!({
            "type": "sas",
            // IoT Hub keeps two keys; a device with one (TPM) gets it as both.
            "symmetricKey": {"primaryKey": primary_key, "secondaryKey": secondary_key.as_deref().unwrap_or(primary_key)},
        }),
        HubAuthentication::X509Thumbprint { primary_thumbprint } => json!({
            "type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": primary_thumbprint, "secondaryThumbprint": null},
        }),
        HubAuthentication::CertificateAuthority => json!({"type": "certificateAuthority"}),
    };
    json!({
        "deviceId": device.device_id,
        "status": "enabled",
        "authentication": authentication,
        "capabilities": {"iotEdge": device.iot_edge},
    })
}

/// A twin to write: `tags` and `properties.desired` of `from` (an enrollment's or webhook's
/// initial twin, or a twin read from a hub, whose `$`-prefixed metadata is left out); empty
/// ones when there is none.
pub fn twin_of(from: Option<&Value>) -> Value {
    let object = |v: Option<&Value>| -> Value {
        let map: Map<String, Value> = v
            .and_then(Value::as_object)
            .map(|m| m.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Value::Object(map)
    };
    let tags = object(from.and_then(|t| t.get("tags")));
    let desired = object(from.and_then(|t| t.get("properties")).and_then(|p| p.get("desired")));
    json!({"tags": tags, "properties": {"desired": desired}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_twin_read_from_a_hub_is_written_without_its_metadata() {
        let read = json!({"deviceId": "d", "etag": "AAA", "version": 4, "tags": {"site": "n"},
            "properties": {"desired": {"fw": "1.2", "$metadata": {}, "$version": 3}, "reported": {"x": 1}}});
        assert_eq!(twin_of(Some(&read)), json!({"tags": {"site": "n"}, "properties": {"desired": {"fw": "1.2"}}}));
        assert_eq!(twin_of(None), json!({"tags": {}, "properties": {"desired": {}}}));
    }

    #[test]
    fn etags_are_quoted_for_if_match() {
        assert_eq!(etag_of(r#"{"etag":"MTIz"}"#).as_deref(), Some("\"MTIz\""));
        assert_eq!(etag_of(r#"{"etag":"\"MTIz\""}"#).as_deref(), Some("\"MTIz\""));
        assert_eq!(etag_of("{}"), None);
    }
}
