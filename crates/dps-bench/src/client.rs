//! The device side: one registration over HTTPS (on a kept-alive or a fresh connection) or
//! over a fresh MQTT connection, reduced to an outcome the report can count (AMQP is in
//! [`crate::amqp_client`]). A TPM device over HTTPS first asks for its authentication key
//! (the `401` challenge), imports it in its software TPM and then registers with a SAS token
//! signed by that key.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use dps_core::tpm::software::SoftwareTpm;
use dps_proto::mqtt::{Connect, ConnectReturnCode, Packet, Publish};
use dps_proto::mqtt_io::{FrameError, PacketStream};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::target::Target;

/// API version the bench devices speak.
pub const API_VERSION: &str = "2021-06-01";
/// Most status polls per registration.
pub(crate) const MAX_POLLS: usize = 60;

/// Why one device did not end up assigned. `key` groups failures in the report (a DPS
/// error code, an HTTP status, an I/O error kind); `detail` is the first message of its kind.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Grouping key.
    pub key: String,
    /// Human-readable detail.
    pub detail: String,
}

impl Failure {
    pub(crate) fn new(key: impl Into<String>, detail: impl Into<String>) -> Failure {
        Failure { key: key.into(), detail: detail.into() }
    }

    pub(crate) fn io(stage: &str, e: &std::io::Error) -> Failure {
        Failure::new(format!("{stage}: {:?}", e.kind()), format!("{stage}: {e}"))
    }
}

/// How a device proves who it is.
#[derive(Clone)]
pub enum DeviceAuth {
    /// A SAS token (symmetric key).
    Sas(String),
    /// A TLS client configuration that presents the device certificate.
    X509(Arc<rustls::ClientConfig>),
    /// A (software) TPM: the SAS key comes from the server's challenge (HTTPS: the `401`;
    /// AMQP: SASL `TPM`, in [`crate::amqp_client`]).
    Tpm(Arc<TpmIdentity>),
}

/// A device's TPM, in software, with the public keys it sends in its first request.
pub struct TpmIdentity {
    /// The TPM that imports the authentication-key blob.
    pub tpm: SoftwareTpm,
    /// `tpm.endorsementKey`: base64 of the EK's marshalled TPM2B_PUBLIC.
    pub endorsement_key: String,
    /// `tpm.storageRootKey`: base64 of the SRK's marshalled TPM2B_PUBLIC.
    pub storage_root_key: String,
}

impl TpmIdentity {
    /// The identity of `tpm` (its public areas marshalled and base64-encoded).
    pub fn new(tpm: SoftwareTpm) -> Result<TpmIdentity, String> {
        let b64 = |p: &dps_proto::tpm::TpmPublic| {
            p.marshal_tpm2b().map(|b| BASE64.encode(b)).map_err(|e| format!("marshalling a TPM key: {e}"))
        };
        let endorsement_key = b64(tpm.endorsement_key())?;
        let storage_root_key = b64(tpm.storage_root_key())?;
        Ok(TpmIdentity { tpm, endorsement_key, storage_root_key })
    }
}

impl std::fmt::Debug for TpmIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmIdentity").field("endorsement_key", &self.endorsement_key).finish_non_exhaustive()
    }
}

/// One simulated device.
#[derive(Clone)]
pub struct Device {
    /// Registration ID.
    pub registration_id: String,
    /// Credential.
    pub auth: DeviceAuth,
    /// Registration payload.
    pub payload: Option<Value>,
}

impl Device {
    pub(crate) fn body(&self) -> Vec<u8> {
        let mut body = serde_json::json!({"registrationId": self.registration_id});
        if let Some(p) = &self.payload {
            body["payload"] = p.clone();
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The body of a TPM device's first request: its ID and both public keys.
    fn tpm_first_leg(&self, id: &TpmIdentity) -> Vec<u8> {
        let body = serde_json::json!({"registrationId": self.registration_id,
            "tpm": {"endorsementKey": id.endorsement_key, "storageRootKey": id.storage_root_key}});
        serde_json::to_vec(&body).unwrap_or_default()
    }

    pub(crate) fn tls<'a>(&'a self, plain: &'a Arc<rustls::ClientConfig>) -> &'a Arc<rustls::ClientConfig> {
        match &self.auth {
            DeviceAuth::X509(c) => c,
            DeviceAuth::Sas(_) | DeviceAuth::Tpm(_) => plain,
        }
    }
}

/// A TLS client configuration trusting `roots`, without session resumption (every device
/// of a fleet handshakes in full) unless `resume`.
pub fn client_tls(
    roots: Arc<rustls::RootCertStore>,
    identity: Option<(Vec<rustls_pki_types::CertificateDer<'static>>, rustls_pki_types::PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
    resume: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

pub(crate) async fn tls_connect(
    addr: std::net::SocketAddr,
    host: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, Failure> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| Failure::io("connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| Failure::new("tls: bad host name", e.to_string()))?;
    tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|e| Failure::io("tls", &e))
}

/// An HTTP/1.1 connection to the device API.
pub struct HttpsConn {
    sender: SendRequest<Full<Bytes>>,
}

impl HttpsConn {
    /// Opens a connection (TCP, TLS with `tls`, HTTP/1.1).
    pub async fn open(target: &Target, tls: &Arc<rustls::ClientConfig>) -> Result<HttpsConn, Failure> {
        let stream = tls_connect(target.https_addr, &target.host, tls).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::new("http handshake", e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpsConn { sender })
    }

    /// Whether the connection can take another request.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    async fn call(
        &mut self,
        method: hyper::Method,
        target: &Target,
        path: String,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(u16, Option<u64>, Value), Failure> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{}:{}", target.host, target.https_addr.port()))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .header("user-agent", "dps-bench");
        if let Some(token) = token {
            req = req.header("authorization", token);
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|e| Failure::new("http request", e.to_string()))?;
        self.sender.ready().await.map_err(|e| Failure::new("http: connection closed", e.to_string()))?;
        let resp =
            self.sender.send_request(req).await.map_err(|e| Failure::new("http: request failed", e.to_string()))?;
        let status = resp.status().as_u16();
        let retry_after =
            resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = resp.into_body().collect().await.map_err(|e| Failure::new("http: body", e.to_string()))?.to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, retry_after, json))
    }

    /// A TPM device's first request: sends its keys without a token and returns the
    /// authentication-key blob of the `401` challenge.
    pub(crate) async fn tpm_challenge_blob(
        &mut self,
        target: &Target,
        device: &Device,
        id: &TpmIdentity,
    ) -> Result<Vec<u8>, Failure> {
        let path =
            format!("/{}/registrations/{}/register?api-version={API_VERSION}", target.id_scope, device.registration_id);
        let (status, _, answer) = self.call(hyper::Method::PUT, target, path, None, device.tpm_first_leg(id)).await?;
        let blob = match (status, answer["authenticationKey"].as_str()) {
            (401, Some(blob)) => blob,
            (s, _) if s >= 300 && answer["errorCode"].is_u64() => return Err(dps_failure(s, &answer)),
            (s, _) => {
                return Err(Failure::new(
                    format!("tpm: no challenge (http {s})"),
                    format!("{s}: expected a 401 with authenticationKey, got {answer}"),
                ))
            }
        };
        BASE64.decode(blob).map_err(|e| Failure::new("tpm: authenticationKey not base64", e.to_string()))
    }

    /// A TPM device's first request and the import of its challenge (on a blocking thread:
    /// two RSA private-key operations); returns a SAS token signed with the imported key.
    async fn tpm_challenge(
        &mut self,
        target: &Target,
        device: &Device,
        id: &Arc<TpmIdentity>,
    ) -> Result<String, Failure> {
        let blob = self.tpm_challenge_blob(target, device, id).await?;
        tpm_token_blocking(id, &target.id_scope, &device.registration_id, blob).await
    }

    /// Registers `device` and polls until the operation ends; the final registration state.
    /// A TPM device answers the server's challenge first.
    pub async fn register(&mut self, target: &Target, device: &Device) -> Result<Value, Failure> {
        let tpm_token;
        let token = match &device.auth {
            DeviceAuth::Sas(token) => Some(token.as_str()),
            DeviceAuth::X509(_) => None,
            DeviceAuth::Tpm(id) => {
                tpm_token = self.tpm_challenge(target, device, id).await?;
                Some(tpm_token.as_str())
            }
        };
        let base = format!("/{}/registrations/{}", target.id_scope, device.registration_id);
        let (mut status, mut retry_after, mut op) = self
            .call(
                hyper::Method::PUT,
                target,
                format!("{base}/register?api-version={API_VERSION}"),
                token,
                device.body(),
            )
            .await?;
        for _ in 0..MAX_POLLS {
            if status >= 300 {
                return Err(dps_failure(status, &op));
            }
            if op["status"] != "assigning" {
                return finished(&op);
            }
            poll_pause(retry_after).await;
            let op_id = op["operationId"].as_str().unwrap_or_default().to_string();
            (status, retry_after, op) = self
                .call(
                    hyper::Method::GET,
                    target,
                    format!("{base}/operations/{op_id}?api-version={API_VERSION}"),
                    token,
                    Vec::new(),
                )
                .await?;
        }
        Err(Failure::new("still assigning", format!("still assigning after {MAX_POLLS} polls")))
    }
}

/// What a TPM device does with its challenge: imports the blob in its (software) TPM, two
/// RSA-2048 private-key operations, and signs a SAS token (valid for an hour) with the key.
pub(crate) fn tpm_token(
    id: &TpmIdentity,
    id_scope: &str,
    registration_id: &str,
    blob: &[u8],
) -> Result<String, Failure> {
    let key = id.tpm.import(blob).map_err(|e| Failure::new("tpm: import failed", e.to_string()))?;
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 3600;
    let resource = dps_proto::sas::device_resource(id_scope, registration_id);
    Ok(dps_proto::sas::build_token(&resource, &key, expiry, Some("registration")))
}

/// [`tpm_token`] on a blocking thread (the two RSA private-key operations take milliseconds).
pub(crate) async fn tpm_token_blocking(
    id: &Arc<TpmIdentity>,
    id_scope: &str,
    registration_id: &str,
    blob: Vec<u8>,
) -> Result<String, Failure> {
    let (id, scope, registration_id) = (id.clone(), id_scope.to_string(), registration_id.to_string());
    tokio::task::spawn_blocking(move || tpm_token(&id, &scope, &registration_id, &blob))
        .await
        .map_err(|e| Failure::new("tpm: import task", e.to_string()))?
}

pub(crate) async fn poll_pause(retry_after: Option<u64>) {
    // Real devices wait Retry-After (3 s by default); the bench caps it at 1 s.
    let secs = retry_after.unwrap_or(1).clamp(0, 1);
    tokio::time::sleep(Duration::from_millis(secs * 1000).max(Duration::from_millis(50))).await;
}

pub(crate) fn dps_failure(status: u16, body: &Value) -> Failure {
    match body["errorCode"].as_u64() {
        Some(code) => Failure::new(format!("dps {code}"), format!("{status}: {}", body["message"])),
        None => Failure::new(format!("http {status}"), format!("{status}: {body}")),
    }
}

pub(crate) fn finished(op: &Value) -> Result<Value, Failure> {
    let state = &op["registrationState"];
    match op["status"].as_str() {
        Some("assigned") => Ok(state.clone()),
        Some(s) => Err(Failure::new(
            format!("status {s} (error {})", state["errorCode"]),
            format!("{s}: {}", state["errorMessage"]),
        )),
        None => Err(Failure::new("bad reply", format!("no status in {op}"))),
    }
}

/// An MQTT connection of one device.
struct MqttConn {
    stream: PacketStream<TlsStream<TcpStream>>,
}

impl MqttConn {
    async fn send(&mut self, packet: &Packet) -> Result<(), Failure> {
        self.stream.write(packet).await.map_err(|e| match e {
            FrameError::Io(e) => Failure::io("mqtt write", &e),
            other => Failure::new("mqtt encode", other.to_string()),
        })
    }

    async fn recv(&mut self) -> Result<Packet, Failure> {
        match self.stream.read().await {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(Failure::new("mqtt: closed by server", "the server closed the connection")),
            Err(FrameError::Truncated) => Err(Failure::new(
                "mqtt: closed by server",
                "the server closed the connection in the middle of a packet",
            )),
            Err(FrameError::Io(e)) => Err(Failure::io("mqtt read", &e)),
            Err(e) => Err(Failure::new("mqtt decode", e.to_string())),
        }
    }

    /// Publishes a request and waits for its response: (status, retry-after, body).
    async fn request(
        &mut self,
        topic: String,
        packet_id: u16,
        body: Vec<u8>,
    ) -> Result<(u16, Option<u64>, Value), Failure> {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic,
            packet_id: Some(packet_id),
            payload: body,
        }))
        .await?;
        loop {
            match self.recv().await? {
                Packet::PubAck(_) => {}
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        self.send(&Packet::PubAck(id)).await?;
                    }
                    let rest = p.topic.strip_prefix("$dps/registrations/res/").unwrap_or("");
                    let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
                    let status = status.parse::<u16>().map_err(|_| Failure::new("mqtt: bad topic", p.topic.clone()))?;
                    let retry_after = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("retry-after="))
                        .and_then(|v| v.parse::<u64>().ok());
                    return Ok((status, retry_after, serde_json::from_slice(&p.payload).unwrap_or(Value::Null)));
                }
                other => return Err(Failure::new("mqtt: unexpected packet", other.name())),
            }
        }
    }
}

/// Registers `device` over a fresh MQTT connection (TLS, CONNECT, SUBSCRIBE, PUBLISH, polls,
/// DISCONNECT); the final registration state.
pub async fn mqtt_register(
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
    device: &Device,
) -> Result<Value, Failure> {
    let addr = target.mqtt_addr.ok_or_else(|| Failure::new("mqtt disabled", "the server has no MQTT listener"))?;
    let password = match &device.auth {
        DeviceAuth::Sas(token) => Some(token.clone().into_bytes()),
        DeviceAuth::X509(_) => None,
        DeviceAuth::Tpm(_) => {
            return Err(Failure::new("tpm over mqtt", "the bench's TPM devices register over HTTPS or AMQP"))
        }
    };
    let stream = tls_connect(addr, &target.host, device.tls(tls)).await?;
    let mut c = MqttConn { stream: PacketStream::new(stream, 1 << 20) };
    let id = &device.registration_id;
    c.send(&Packet::Connect(Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: true,
        keep_alive: 60,
        client_id: id.clone(),
        will: None,
        username: Some(format!(
            "{}/registrations/{id}/api-version={API_VERSION}&ClientVersion=dps-bench",
            target.id_scope
        )),
        password,
    }))
    .await?;
    match c.recv().await? {
        Packet::ConnAck { code: ConnectReturnCode::Accepted, .. } => {}
        Packet::ConnAck { code, .. } => {
            return Err(Failure::new(format!("mqtt CONNACK {code:?}"), format!("{code:?}")))
        }
        other => return Err(Failure::new("mqtt: unexpected packet", other.name())),
    }
    c.send(&Packet::Subscribe { packet_id: 1, filters: vec![("$dps/registrations/res/#".into(), 1)] }).await?;
    match c.recv().await? {
        Packet::SubAck { .. } => {}
        other => return Err(Failure::new("mqtt: unexpected packet", other.name())),
    }
    let (mut status, mut retry_after, mut op) =
        c.request("$dps/registrations/PUT/iotdps-register/?$rid=1".into(), 2, device.body()).await?;
    let mut result = Err(Failure::new("still assigning", format!("still assigning after {MAX_POLLS} polls")));
    for poll in 0..MAX_POLLS {
        if status >= 300 {
            result = Err(dps_failure(status, &op));
            break;
        }
        if op["status"] != "assigning" {
            result = finished(&op);
            break;
        }
        poll_pause(retry_after).await;
        let op_id = op["operationId"].as_str().unwrap_or_default().to_string();
        let rid = poll + 2;
        (status, retry_after, op) = c
            .request(
                format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op_id}"),
                u16::try_from(rid + 1).unwrap_or(1),
                Vec::new(),
            )
            .await?;
    }
    let _ = c.send(&Packet::Disconnect).await;
    let _ = c.stream.get_mut().shutdown().await;
    result
}

/// Registers `device` over a fresh HTTPS connection, closed afterwards.
pub async fn https_register_fresh(
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
    device: &Device,
) -> Result<Value, Failure> {
    let mut conn = HttpsConn::open(target, device.tls(tls)).await?;
    conn.register(target, device).await
}
