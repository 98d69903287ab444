//! The MQTT device transport (docs/protocol-notes.md §4): one session per connection, over TLS on
//! `listen.mqtt` or over WebSocket on the HTTPS port (both through [`crate::connection`]).
//!
//! A session authenticates once, at CONNECT (the SAS token in the password, or the client
//! certificate of the TLS session when there is no password), then answers
//! register and operation-status publishes with the same engine calls as HTTPS. Every
//! protocol violation closes the connection with a log line saying why; nothing a client
//! sends can make the server panic or wait forever (CONNECT deadline, keep-alive, write
//! deadline, packet size limit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dps_core::registration::{AuthenticatedDevice, Authentication, Credential, DeviceReply};
use dps_core::Engine;
use dps_proto::device::RegistrationStatus;
use dps_proto::mqtt::{ConnectReturnCode, DecodeError, Packet, Publish};
use dps_proto::mqtt_io::{FrameError, PacketStream};
use dps_proto::mqtt_topic::{self, DeviceRequest};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::auth_failures::AuthFailures;
use crate::config::MqttConfig;
use crate::metrics::Transport;
use tracing::Instrument;

pub use crate::config::MAX_PACKET_LIMIT;

/// What every MQTT session shares.
pub struct MqttContext {
    /// The engine.
    pub engine: Engine,
    /// Settings.
    pub config: MqttConfig,
    /// One permit per open MQTT connection (TCP and WebSocket).
    pub slots: Arc<Semaphore>,
    /// Failed authentications per source address (shared with HTTPS).
    pub auth_failures: Arc<AuthFailures>,
}

impl std::fmt::Debug for MqttContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttContext").field("config", &self.config).finish_non_exhaustive()
    }
}

impl MqttContext {
    /// A context with `config.max_connections` slots.
    pub fn new(engine: Engine, config: MqttConfig, auth_failures: Arc<AuthFailures>) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_connections()));
        Self { engine, config, slots, auth_failures }
    }
}

impl crate::connection::ConnectionTransport for MqttContext {
    const NAME: &'static str = "MQTT";
    const LISTENER: &'static str = "mqtt";
    const WS_LISTENER: &'static str = "mqtt-ws";

    fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    fn max_connections(&self) -> usize {
        self.config.max_connections()
    }

    fn max_ws_message_bytes(&self) -> usize {
        self.config.max_packet_bytes + 1024
    }

    fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        stream: S,
        peer: SocketAddr,
        client_chain: Option<Arc<Vec<Vec<u8>>>>,
        transport: &'static str,
        stop: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send {
        run_session(stream, self, peer, client_chain, transport, stop)
    }
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT or closed the connection.
    Closed,
    /// The server is stopping.
    Shutdown,
    /// The client broke the protocol or a limit; the text says how.
    Violation(String),
    /// Reading or writing failed.
    Io(std::io::Error),
}

impl From<FrameError> for End {
    fn from(e: FrameError) -> End {
        match e {
            FrameError::Decode(e @ DecodeError::TooLarge { .. }) => {
                End::Violation(format!("{e} (mqtt.max_packet_bytes)"))
            }
            FrameError::Decode(e) => End::Violation(e.to_string()),
            FrameError::Encode(e) => End::Violation(e.to_string()),
            FrameError::Truncated => End::Violation("the connection closed in the middle of a packet".into()),
            FrameError::Io(e) => End::Io(e),
        }
    }
}

struct Session<'a, S> {
    stream: PacketStream<S>,
    ctx: &'a MqttContext,
    peer: SocketAddr,
    next_packet_id: u16,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// Reads one packet; `Ok(None)` at a clean end of stream between packets.
    async fn read_packet(&mut self) -> Result<Option<Packet>, End> {
        self.stream.read().await.map_err(End::from)
    }

    async fn write(&mut self, packet: &Packet) -> Result<(), End> {
        let deadline = Duration::from_secs(self.ctx.config.write_timeout_secs);
        match tokio::time::timeout(deadline, self.stream.write(packet)).await {
            Ok(r) => r.map_err(End::from),
            Err(_) => Err(End::Violation(format!(
                "the client did not read a response within {} s (mqtt.write_timeout_secs)",
                deadline.as_secs()
            ))),
        }
    }

    async fn publish_response<T: Serialize>(
        &mut self,
        status: u16,
        rid: &str,
        retry_after: Option<u64>,
        body: &T,
    ) -> Result<(), End> {
        let payload = serde_json::to_vec(body).map_err(|e| End::Violation(format!("cannot serialise: {e}")))?;
        let packet_id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        let publish = Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: mqtt_topic::response_topic(status, rid, retry_after),
            packet_id: Some(packet_id),
            payload,
        };
        self.write(&Packet::Publish(publish)).await
    }
}

/// The device a session authenticated at CONNECT; every register and poll re-checks it only
/// as far as something changed since (`dps_core::registration::AuthenticatedDevice`).
type Identity = AuthenticatedDevice;

/// Runs one MQTT session over any byte stream (TLS, or a WebSocket bridged to bytes) until the
/// client leaves, breaks the protocol or `stop` turns true.
pub async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ctx: &MqttContext,
    peer: SocketAddr,
    client_chain: Option<Arc<Vec<Vec<u8>>>>,
    transport: &'static str,
    mut stop: watch::Receiver<bool>,
) {
    let stream = PacketStream::new(stream, ctx.config.max_packet_bytes);
    let mut session = Session { stream, ctx, peer, next_packet_id: 1 };
    let end = tokio::select! {
        end = session_body(&mut session, client_chain, transport) => end,
        _ = async { let _ = stop.wait_for(|s| *s).await; } => End::Shutdown,
    };
    match end {
        End::Closed | End::Shutdown => tracing::debug!(%peer, transport, "MQTT session ended"),
        End::Violation(why) => tracing::info!(%peer, transport, reason = %why, "MQTT connection closed"),
        End::Io(e) => tracing::debug!(%peer, transport, error = %e, "MQTT connection failed"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), session.stream.get_mut().shutdown()).await;
}

async fn session_body<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<'_, S>,
    client_chain: Option<Arc<Vec<Vec<u8>>>>,
    transport: &str,
) -> End {
    let connect_timeout = Duration::from_secs(session.ctx.config.connect_timeout_secs);
    let first = match tokio::time::timeout(connect_timeout, session.read_packet()).await {
        Err(_) => return End::Violation(format!("no CONNECT within {} s", connect_timeout.as_secs())),
        Ok(Err(end)) => return end,
        Ok(Ok(None)) => return End::Closed,
        Ok(Ok(Some(p))) => p,
    };
    let Packet::Connect(connect) = first else {
        return End::Violation(format!("the first packet must be CONNECT, not {}", first.name()));
    };
    let keep_alive = connect.keep_alive;
    let mut identity = match connect_identity(session.ctx, session.peer, connect, client_chain).await {
        Ok(identity) => identity,
        Err((code, why)) => {
            let _ = session.write(&Packet::ConnAck { session_present: false, code }).await;
            return End::Violation(format!("CONNECT refused ({code:?}): {why}"));
        }
    };
    if let Err(end) =
        session.write(&Packet::ConnAck { session_present: false, code: ConnectReturnCode::Accepted }).await
    {
        return end;
    }
    tracing::debug!(peer = %session.peer, transport, registration_id = identity.registration_id(), "MQTT connected");
    let idle = if keep_alive == 0 {
        Duration::from_secs(session.ctx.config.idle_timeout_secs)
    } else {
        Duration::from_millis(u64::from(keep_alive) * 1500)
    };
    let mut subscribed = false;
    loop {
        let packet = match tokio::time::timeout(idle, session.read_packet()).await {
            Err(_) => return End::Violation(format!("no packet for {} s (keep-alive {keep_alive} s)", idle.as_secs())),
            Ok(Err(end)) => return end,
            Ok(Ok(None)) => return End::Closed,
            Ok(Ok(Some(p))) => p,
        };
        let result = match packet {
            Packet::Publish(publish) => {
                if let Some(id) = publish.packet_id {
                    // PUBACK first, then the response (C# waits for it in that order).
                    if let Err(end) = session.write(&Packet::PubAck(id)).await {
                        return end;
                    }
                }
                if !subscribed {
                    return End::Violation(format!(
                        "PUBLISH to '{}' before SUBSCRIBE to {}: the response could not be delivered",
                        publish.topic,
                        mqtt_topic::RESPONSE_FILTER
                    ));
                }
                handle_request(session, &mut identity, publish).await
            }
            Packet::PubAck(_) => Ok(()),
            Packet::Subscribe { packet_id, filters } => {
                let codes: Vec<u8> = filters
                    .iter()
                    .map(|(f, _)| {
                        if f == mqtt_topic::RESPONSE_FILTER {
                            subscribed = true;
                            1
                        } else {
                            tracing::info!(peer = %session.peer, filter = %f, "MQTT subscription refused: DPS only serves $dps/registrations/res/#");
                            0x80
                        }
                    })
                    .collect();
                session.write(&Packet::SubAck { packet_id, return_codes: codes }).await
            }
            Packet::Unsubscribe { packet_id, filters } => {
                if filters.iter().any(|f| f == mqtt_topic::RESPONSE_FILTER) {
                    subscribed = false;
                }
                session.write(&Packet::UnsubAck(packet_id)).await
            }
            Packet::PingReq => session.write(&Packet::PingResp).await,
            Packet::Disconnect => return End::Closed,
            other => return End::Violation(format!("a client may not send {} here", other.name())),
        };
        if let Err(end) = result {
            return end;
        }
    }
}

/// Checks a CONNECT: protocol level, client ID, user name grammar, SAS token.
async fn connect_identity(
    ctx: &MqttContext,
    peer: SocketAddr,
    connect: dps_proto::mqtt::Connect,
    client_chain: Option<Arc<Vec<Vec<u8>>>>,
) -> Result<Identity, (ConnectReturnCode, String)> {
    if connect.protocol_level != dps_proto::mqtt::PROTOCOL_LEVEL_3_1_1 || connect.protocol_name != "MQTT" {
        return Err((
            ConnectReturnCode::UnacceptableProtocolVersion,
            format!(
                "protocol '{}' level {}; DPS speaks MQTT 3.1.1 (level 4)",
                connect.protocol_name.chars().take(16).collect::<String>(),
                connect.protocol_level
            ),
        ));
    }
    if connect.client_id.is_empty() {
        return Err((ConnectReturnCode::IdentifierRejected, "the client ID must be the registration ID".into()));
    }
    let Some(username) = connect.username.as_deref() else {
        return Err((
            ConnectReturnCode::BadUserNameOrPassword,
            "no user name; send {idScope}/registrations/{registrationId}/api-version=2019-03-31".into(),
        ));
    };
    let parsed =
        mqtt_topic::parse_username(username).map_err(|e| (ConnectReturnCode::BadUserNameOrPassword, e.to_string()))?;
    if !parsed.registration_id.eq_ignore_ascii_case(&connect.client_id) {
        return Err((
            ConnectReturnCode::IdentifierRejected,
            format!(
                "the client ID '{}' differs from the registration ID '{}' in the user name",
                connect.client_id.chars().take(128).collect::<String>(),
                parsed.registration_id
            ),
        ));
    }
    let credential = match connect.password {
        // No password: the client certificate of the TLS session (X.509 devices), if any.
        None => client_chain.map(Credential::X509).unwrap_or(Credential::None),
        Some(bytes) => Credential::Sas(
            String::from_utf8(bytes)
                .map_err(|_| (ConnectReturnCode::BadUserNameOrPassword, "the password is not UTF-8".to_string()))?,
        ),
    };
    // An address that used up its failed authentications is not checked again until its
    // allowance refills; "server unavailable" makes MQTT clients retry later.
    ctx.auth_failures.check(peer.ip()).map_err(|e| (ConnectReturnCode::ServerUnavailable, e.to_string()))?;
    let result =
        Box::pin(ctx.engine.devices().authenticate_device(&parsed.id_scope, &parsed.registration_id, &credential))
            .await;
    match ctx.auth_failures.observe(peer.ip(), Transport::Mqtt, result) {
        Ok(Authentication::Authenticated(device)) => Ok(device),
        // MQTT carries no TPM (docs/protocol-notes.md §4): nothing here asks for a challenge.
        Ok(Authentication::Challenge(_)) => {
            Err((ConnectReturnCode::NotAuthorized, "TPM attestation is not available over MQTT; use HTTPS".into()))
        }
        Err(e @ dps_core::Error::Unavailable(_)) | Err(e @ dps_core::Error::Internal(_)) => {
            Err((ConnectReturnCode::ServerUnavailable, e.to_string()))
        }
        Err(e @ dps_core::Error::BadRequest { .. }) => Err((ConnectReturnCode::IdentifierRejected, e.to_string())),
        Err(e) => Err((ConnectReturnCode::NotAuthorized, e.to_string())),
    }
}

/// Answers a register or operation-status publish with a response publish.
async fn handle_request<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<'_, S>,
    identity: &mut Identity,
    publish: Publish,
) -> Result<(), End> {
    let request = mqtt_topic::parse_request_topic(&publish.topic).map_err(|e| End::Violation(e.to_string()))?;
    let engine = &session.ctx.engine;
    let request_id = uuid::Uuid::new_v4().to_string();
    // Lines logged while the engine works carry the request's ID (the error body's trackingId).
    let span = tracing::info_span!("request", request_id = %request_id);
    let (rid, outcome) = async {
        match request {
            DeviceRequest::Register { rid } => {
                // Boxed: the engine's futures are large, and inline they would make every held
                // connection's task that large while it idles (BENCHMARKS.md).
                let attestation = crate::metrics::attestation_label(identity.enrollment().attestation_type());
                let started = std::time::Instant::now();
                let result = Box::pin(engine.devices().register_device(identity, &publish.payload)).await;
                crate::metrics::registration(Transport::Mqtt, attestation, result.as_ref(), started);
                (rid, result.map(|reply| (202, reply)))
            }
            DeviceRequest::Poll { rid, operation_id } => {
                let reply = Box::pin(engine.devices().operation_status_of(identity, &operation_id)).await;
                crate::metrics::poll(Transport::Mqtt, reply.as_ref());
                // Status 202 while the operation is still assigning, else 200, as over HTTPS.
                let status = |reply: &DeviceReply| {
                    if reply.operation.status == RegistrationStatus::Assigning {
                        202
                    } else {
                        200
                    }
                };
                (rid, reply.map(|reply| (status(&reply), reply)))
            }
        }
    }
    .instrument(span)
    .await;
    match outcome {
        Ok((status, reply)) => {
            session.publish_response(status, &rid, reply.retry_after.map(u64::from), &reply.operation).await
        }
        Err(err) => {
            tracing::debug!(registration_id = identity.registration_id(), request_id, status = err.code().http_status(), error = %err, "MQTT request failed");
            let reply = crate::reply::ErrorReply::new(&err, &request_id);
            session.publish_response(reply.status, &rid, reply.retry_after.map(u64::from), &reply.body).await
        }
    }
}
