//! `kind = "mosquitto"`: an MQTT broker as the hub. dps administers Mosquitto's
//! dynamic-security plugin over its control topic (`$CONTROL/dynamic-security/v1`) as an admin
//! client: a registered device gets a broker client (user name = its device ID) with a role that
//! allows it to publish and subscribe under `{topic_prefix}/{deviceId}/#` only; a device that
//! left the hub loses both (docs/hub-registrars.md). The password of a symmetric-key or TPM
//! device is derived from its key ([`device_password`]), so the device computes it and the
//! broker never learns the key; an X.509 device gets no password (the broker's TLS listener
//! identifies it by its certificate, `use_identity_as_username`).

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_core::registrar::{HubAuthentication, HubDevice, OnFailure, RegistrarError};
use dps_proto::mqtt::{Connect, ConnectReturnCode, Packet, Publish};
use dps_proto::mqtt_io::PacketStream;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::send::MAX_BACKOFF;
use crate::config::MosquittoRegistrarConfig;
use crate::error::ServerError;

/// The plugin's command topic.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where the plugin answers.
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// How a client dps made describes itself (`textdescription`): dps updates and deletes only
/// such clients.
const MARK: &str = "provisioned by dps";
/// The largest packet read from the broker.
const MAX_PACKET_BYTES: usize = 256 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The password a device with the key `key` uses at the broker of `hub`: base64 of
/// HMAC-SHA256(key, "<hub host name, lower case>/<device ID>").
pub fn device_password(key: &[u8], hub: &str, device_id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(format!("{}/{device_id}", hub.to_ascii_lowercase()).as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// The name of a device's role.
pub fn role_name(device_id: &str) -> String {
    format!("dps-device-{device_id}")
}

/// One hub's Mosquitto registrar.
pub struct MosquittoRegistrar {
    address: String,
    tls: Option<(tokio_rustls::TlsConnector, rustls_pki_types::ServerName<'static>)>,
    username: String,
    password: String,
    topic_prefix: String,
    attempts: u32,
    timeout: Duration,
    pub(super) on_failure: OnFailure,
}

impl MosquittoRegistrar {
    /// Builds it from `[hubs.registrar]` (`at` names the setting in errors).
    pub fn new(at: &str, config: &MosquittoRegistrarConfig) -> Result<Self, ServerError> {
        let bad = |what: &str, message: String| ServerError::Bootstrap(format!("{at}.{what}: {message}"));
        let password = super::secret(at, "password", config.password.as_deref(), config.password_env.as_deref(), 1)?;
        let tls = match (config.tls, &config.ca_file) {
            (false, _) => None,
            (true, None) => return Err(bad("ca_file", "set the broker's CA (tls = true)".into())),
            (true, Some(ca)) => {
                let pem = std::fs::read(ca).map_err(|e| bad("ca_file", format!("{}: {e}", ca.display())))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                    let cert: rustls_pki_types::CertificateDer<'static> =
                        cert.map_err(|e| bad("ca_file", format!("{}: {e}", ca.display())))?;
                    roots.add(cert).map_err(|e| bad("ca_file", e.to_string()))?;
                }
                let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
                let host = config
                    .server_name
                    .clone()
                    .unwrap_or_else(|| config.address.rsplit_once(':').map_or("", |(h, _)| h).to_string());
                let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .map_err(|e| bad("server_name", e.to_string()))?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(client)), name))
            }
        };
        Ok(Self {
            address: config.address.clone(),
            tls,
            username: config.username.clone(),
            password,
            topic_prefix: config.topic_prefix.trim_matches('/').to_string(),
            attempts: config.attempts,
            timeout: Duration::from_secs(config.timeout_secs),
            on_failure: super::on_failure(config.on_failure),
        })
    }

    /// The longest a call with its retries can take (two sessions for a registration).
    pub fn budget(&self) -> Duration {
        (self.timeout + MAX_BACKOFF) * self.attempts * 2
    }

    /// Creates or updates the device's client and role.
    pub async fn register(&self, device: &HubDevice) -> Result<(), RegistrarError> {
        self.check_id(&device.device_id)?;
        let role = role_name(&device.device_id);
        let topic = format!("{}/{}/#", self.topic_prefix, device.device_id);
        let acls: Vec<Value> = ["publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern"]
            .iter()
            .map(|t| json!({"acltype": t, "topic": topic, "priority": 0, "allow": true}))
            .collect();
        let mut client = json!({"username": device.device_id, "roles": [{"rolename": role}],
            "textdescription": format!("{MARK} ({})", device.registration_id)});
        match &device.authentication {
            HubAuthentication::SymmetricKey { primary_key, .. } => {
                let key = BASE64
                    .decode(primary_key)
                    .map_err(|_| RegistrarError::new("the device's key is not base64 (a corrupt record)"))?;
                client["password"] = json!(device_password(&key, &device.hub, &device.device_id));
            }
            HubAuthentication::X509Thumbprint { .. } | HubAuthentication::CertificateAuthority => {}
        }
        let mut create_client = client.clone();
        create_client["command"] = json!("createClient");
        let create_role = json!({"command": "createRole", "rolename": role, "acls": acls});
        let answers = self.run(vec![create_role, create_client]).await?;
        tolerate(&answers[0], "already exists", "creating the device's role")?;
        if answers[1].error.as_deref().is_some_and(|e| e.contains("already exists")) {
            // Only a client dps made is updated: never one the operator made by that name.
            if self.made_by_dps(&device.device_id).await? != Some(true) {
                return Err(RegistrarError::new(format!(
                    "the broker has a client named '{}' that dps did not create; dps does not take it over",
                    device.device_id
                )));
            }
            let mut modify = client;
            modify["command"] = json!("modifyClient");
            let answers = self.run(vec![modify]).await?;
            tolerate(&answers[0], "", "updating the device's client")?;
        } else {
            tolerate(&answers[1], "", "creating the device's client")?;
        }
        Ok(())
    }

    /// Deletes the device's client and role, when dps made them (a missing client counts as
    /// deleted; one dps did not make is left alone).
    pub async fn remove(&self, device_id: &str) -> Result<(), RegistrarError> {
        self.check_id(device_id)?;
        if self.made_by_dps(device_id).await? != Some(true) {
            return Ok(());
        }
        let answers = self
            .run(vec![
                json!({"command": "deleteClient", "username": device_id}),
                json!({"command": "deleteRole", "rolename": role_name(device_id)}),
            ])
            .await?;
        tolerate(&answers[0], "not found", "deleting the device's client")?;
        tolerate(&answers[1], "not found", "deleting the device's role")
    }

    /// Whether the client `username` was made by dps (its text description says so); `None`
    /// when there is no such client.
    async fn made_by_dps(&self, username: &str) -> Result<Option<bool>, RegistrarError> {
        let answers = self.run(vec![json!({"command": "getClient", "username": username})]).await?;
        let reply = &answers[0];
        match &reply.error {
            Some(e) if e.contains("not found") => Ok(None),
            Some(e) => Err(RegistrarError::new(format!("reading the device's client, the broker answered: {e}"))),
            None => Ok(Some(reply.data["client"]["textdescription"].as_str().is_some_and(|t| t.starts_with(MARK)))),
        }
    }

    /// A device ID that can name a broker client and sit in a topic filter, and is not dps's
    /// own admin.
    fn check_id(&self, device_id: &str) -> Result<(), RegistrarError> {
        if device_id.is_empty()
            || device_id.contains(['/', '+', '#', '%'])
            || device_id.chars().any(char::is_control)
            || device_id == self.username
        {
            return Err(RegistrarError::new(format!(
                "device ID '{device_id}' cannot be a broker client (no '/', '+', '#', '%', nor dps's admin name)"
            )));
        }
        Ok(())
    }

    /// Sends `commands` in one message and returns each one's error (`None`: done), retrying
    /// a session that fails (connection, timeout) with backoff.
    async fn run(&self, commands: Vec<Value>) -> Result<Vec<Reply>, RegistrarError> {
        let mut last = RegistrarError::new("");
        for attempt in 1..=self.attempts.max(1) {
            match tokio::time::timeout(self.timeout, self.session(&commands)).await {
                Ok(Ok(answers)) => return Ok(answers),
                Ok(Err(Session::Refused(e))) => return Err(RegistrarError::new(e)),
                Ok(Err(Session::Failed(e))) => last = e,
                Err(_) => {
                    last = RegistrarError::new(format!("the broker did not answer within {} s", self.timeout.as_secs()))
                }
            }
            if attempt < self.attempts {
                tokio::time::sleep(Duration::from_millis(200u64 << attempt.min(5)).min(MAX_BACKOFF)).await;
            }
        }
        Err(last)
    }

    async fn session(&self, commands: &[Value]) -> Result<Vec<Reply>, Session> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            Session::Failed(RegistrarError::with_detail(what, format!("{what} ({}): {e}", self.address)))
        };
        let tcp = TcpStream::connect(&self.address).await.map_err(|e| failed("the broker cannot be reached", &e))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(
                connector.connect(name.clone(), tcp).await.map_err(|e| failed("TLS with the broker failed", &e))?,
            ),
        };
        let mut stream = PacketStream::new(io, MAX_PACKET_BYTES);
        let io_err = |e: dps_proto::mqtt_io::FrameError| failed("the broker connection failed", &e);
        stream
            .write(&Packet::Connect(Connect {
                protocol_name: "MQTT".into(),
                protocol_level: 4,
                clean_session: true,
                keep_alive: 30,
                client_id: format!("dps-registrar-{:016x}", rand::random::<u64>()),
                will: None,
                username: Some(self.username.clone()),
                password: Some(self.password.clone().into_bytes()),
            }))
            .await
            .map_err(io_err)?;
        match stream.read().await.map_err(io_err)? {
            Some(Packet::ConnAck { code: ConnectReturnCode::Accepted, .. }) => {}
            Some(Packet::ConnAck { code, .. }) => {
                return Err(Session::Refused(format!(
                    "the broker refused dps's admin client '{}' ({code:?})",
                    self.username
                )))
            }
            other => {
                return Err(Session::Failed(RegistrarError::new(format!(
                    "the broker answered CONNECT with {}",
                    other.as_ref().map_or("nothing", Packet::name)
                ))))
            }
        }
        stream
            .write(&Packet::Subscribe { packet_id: 1, filters: vec![(RESPONSE_TOPIC.into(), 1)] })
            .await
            .map_err(io_err)?;
        let correlation = format!("{:016x}", rand::random::<u64>());
        let tagged: Vec<Value> = commands
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                c["correlationData"] = json!(format!("{correlation}-{i}"));
                c
            })
            .collect();
        let mut subscribed = false;
        let mut published = false;
        loop {
            match stream.read().await.map_err(io_err)? {
                Some(Packet::SubAck { return_codes, .. }) => {
                    if return_codes.first().is_none_or(|c| *c == 0x80) {
                        return Err(Session::Refused(format!(
                            "the broker does not let dps's admin client '{}' read {RESPONSE_TOPIC} (is it a dynamic-security admin?)",
                            self.username
                        )));
                    }
                    subscribed = true;
                }
                Some(Packet::Publish(p)) => {
                    if let Some(id) = p.packet_id {
                        stream.write(&Packet::PubAck(id)).await.map_err(io_err)?;
                    }
                    if p.topic == RESPONSE_TOPIC {
                        if let Some(answers) = answers_for(&p.payload, &correlation, commands.len()) {
                            let _ = stream.write(&Packet::Disconnect).await;
                            return Ok(answers);
                        }
                    }
                }
                Some(Packet::PubAck(_) | Packet::PingResp) => {}
                Some(other) => {
                    return Err(Session::Failed(RegistrarError::new(format!(
                        "unexpected {} from the broker",
                        other.name()
                    ))))
                }
                None => {
                    return Err(Session::Failed(RegistrarError::new(
                        "the broker closed the connection (is the dynamic-security plugin loaded?)",
                    )))
                }
            }
            if subscribed && !published {
                let payload = serde_json::to_vec(&json!({"commands": tagged})).unwrap_or_default();
                stream
                    .write(&Packet::Publish(Publish {
                        dup: false,
                        qos: 1,
                        retain: false,
                        topic: CONTROL_TOPIC.into(),
                        packet_id: Some(2),
                        payload,
                    }))
                    .await
                    .map_err(io_err)?;
                published = true;
            }
        }
    }
}

/// How a session ended without answers.
enum Session {
    /// Worth another attempt (connection, protocol).
    Failed(RegistrarError),
    /// Not (the broker refused the admin).
    Refused(String),
}

/// The plugin's answer to one command.
#[derive(Debug, Clone, Default, PartialEq)]
struct Reply {
    /// Its error, if it failed.
    error: Option<String>,
    /// Its `data` (`null` when none).
    data: Value,
}

/// The answers to the commands tagged `{correlation}-{i}` in a response payload, when it holds
/// all of them.
fn answers_for(payload: &[u8], correlation: &str, count: usize) -> Option<Vec<Reply>> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let mut answers = vec![Reply::default(); count];
    let mut seen = 0;
    for r in v.get("responses")?.as_array()? {
        let tag = r.get("correlationData").and_then(Value::as_str)?;
        let i: usize = tag.strip_prefix(correlation)?.strip_prefix('-')?.parse().ok()?;
        let slot = answers.get_mut(i)?;
        slot.error = r.get("error").and_then(Value::as_str).map(str::to_string);
        slot.data = r.get("data").cloned().unwrap_or(Value::Null);
        seen += 1;
    }
    (seen == count).then_some(answers)
}

/// Ok unless `answer` is an error other than one containing `harmless` (empty: none is).
fn tolerate(answer: &Reply, harmless: &str, what: &str) -> Result<(), RegistrarError> {
    match &answer.error {
        None => Ok(()),
        Some(e) if !harmless.is_empty() && e.contains(harmless) => Ok(()),
        Some(e) => Err(RegistrarError::new(format!("{what}, the broker answered: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_an_hmac_of_hub_and_device_id() {
        // echo -n 'mqtt-1.test/dev-1' | openssl dgst -sha256 -mac HMAC -macopt key:0123456789abcdef -binary | base64
        assert_eq!(
            device_password(b"0123456789abcdef", "MQTT-1.test", "dev-1"),
            "bJIYNNjIhsQMagpXKOgacNdVyrUnXY44NhmplLxQdVE="
        );
        assert_ne!(
            device_password(b"0123456789abcdef", "mqtt-1.test", "dev-2"),
            "bJIYNNjIhsQMagpXKOgacNdVyrUnXY44NhmplLxQdVE="
        );
    }

    #[test]
    fn answers_are_matched_by_correlation_data() {
        let payload = br#"{"responses":[{"command":"createClient","correlationData":"c-1","error":"Client already exists"},{"command":"createRole","correlationData":"c-0"}]}"#;
        let answers = answers_for(payload, "c", 2).unwrap();
        assert_eq!(answers[0], Reply::default());
        assert_eq!(answers[1].error.as_deref(), Some("Client already exists"));
        assert_eq!(answers_for(payload, "other", 2), None);
        assert_eq!(answers_for(payload, "c", 3), None);
    }
}
