//! The MQTT transport (docs/protocol-notes.md §4): CONNECT, SUBSCRIBE, publish register, then publish
//! operation-status polls on the same connection until the registration ends.

use std::sync::Arc;
use std::time::Duration;

use dps_proto::mqtt::{Connect, ConnectReturnCode, Packet, Publish};
use dps_proto::mqtt_io::{FrameError, PacketStream};
use dps_proto::mqtt_topic::RESPONSE_FILTER;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::{interpret, AttemptError, DeviceError, Outcome, Prepared, Registration};

/// Largest packet accepted from the server.
const MAX_PACKET_BYTES: usize = 1 << 20;
/// How long the server may take to send the next packet.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

struct Conn {
    stream: PacketStream<TlsStream<TcpStream>>,
    next_id: u16,
}

fn dropped(e: impl std::fmt::Display) -> AttemptError {
    AttemptError::Retry { reason: format!("MQTT: {e}"), after: None }
}

impl Conn {
    async fn send(&mut self, packet: &Packet) -> Result<(), AttemptError> {
        self.stream.write(packet).await.map_err(|e| match e {
            FrameError::Encode(e) => AttemptError::Fatal(DeviceError::Protocol(e.to_string())),
            other => dropped(other),
        })
    }

    async fn recv(&mut self) -> Result<Packet, AttemptError> {
        match tokio::time::timeout(READ_TIMEOUT, self.stream.read()).await {
            Err(_) => Err(dropped("no answer within 60 s")),
            Ok(Ok(Some(p))) => Ok(p),
            Ok(Ok(None)) | Ok(Err(FrameError::Truncated)) => Err(dropped("the server closed the connection")),
            Ok(Err(FrameError::Decode(e))) => {
                Err(AttemptError::Fatal(DeviceError::Protocol(format!("the server sent {e}"))))
            }
            Ok(Err(e)) => Err(dropped(e)),
        }
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    /// Publishes a request and returns the matching response (status, retry-after, body).
    async fn request(&mut self, topic: String, payload: Vec<u8>) -> Result<Outcome, AttemptError> {
        let id = self.packet_id();
        self.send(&Packet::Publish(Publish { dup: false, qos: 1, retain: false, topic, packet_id: Some(id), payload }))
            .await?;
        loop {
            match self.recv().await? {
                Packet::PubAck(_) | Packet::PingResp => {}
                Packet::Publish(p) => {
                    if let Some(pid) = p.packet_id {
                        self.send(&Packet::PubAck(pid)).await?;
                    }
                    let (status, retry_after) = parse_response_topic(&p.topic).ok_or_else(|| {
                        AttemptError::Fatal(DeviceError::Protocol(format!("unexpected topic {}", p.topic)))
                    })?;
                    return interpret(status, retry_after, &p.payload);
                }
                other => {
                    return Err(AttemptError::Fatal(DeviceError::Protocol(format!("unexpected {}", other.name()))))
                }
            }
        }
    }
}

/// `$dps/registrations/res/{status}/?$rid=…[&retry-after=…]` → (status, retry-after).
fn parse_response_topic(topic: &str) -> Option<(u16, Option<Duration>)> {
    let rest = topic.strip_prefix("$dps/registrations/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let retry_after = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    Some((status.parse().ok()?, retry_after))
}

/// One attempt over MQTT.
pub(crate) async fn register(p: &Prepared) -> Result<Registration, AttemptError> {
    let cfg = &p.config;
    let tcp = TcpStream::connect((cfg.host.as_str(), cfg.mqtt_port)).await.map_err(dropped)?;
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::try_from(cfg.host.clone())
        .map_err(|e| AttemptError::Fatal(DeviceError::Config(format!("host name: {e}"))))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(&p.tls)).connect(name, tcp).await.map_err(dropped)?;
    let mut c = Conn { stream: PacketStream::new(stream, MAX_PACKET_BYTES), next_id: 1 };
    c.send(&Packet::Connect(Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: true,
        keep_alive: 120,
        client_id: cfg.registration_id.clone(),
        will: None,
        username: Some(format!(
            "{}/registrations/{}/api-version=2019-03-31&ClientVersion=dps-device%2F{}",
            cfg.id_scope,
            cfg.registration_id,
            env!("CARGO_PKG_VERSION")
        )),
        password: p.sas_token().map(String::into_bytes),
    }))
    .await?;
    match c.recv().await? {
        Packet::ConnAck { code: ConnectReturnCode::Accepted, .. } => {}
        Packet::ConnAck { code: ConnectReturnCode::ServerUnavailable, .. } => {
            return Err(AttemptError::Retry { reason: "MQTT CONNACK 3 (server unavailable)".into(), after: None })
        }
        Packet::ConnAck { code, .. } => {
            return Err(AttemptError::Fatal(DeviceError::Unauthorized(format!(
                "the server refused the MQTT connection ({code:?})"
            ))))
        }
        other => {
            return Err(AttemptError::Fatal(DeviceError::Protocol(format!("expected CONNACK, got {}", other.name()))))
        }
    }
    let sub_id = c.packet_id();
    c.send(&Packet::Subscribe { packet_id: sub_id, filters: vec![(RESPONSE_FILTER.into(), 1)] }).await?;
    match c.recv().await? {
        Packet::SubAck { return_codes, .. } if return_codes.first().is_some_and(|&q| q <= 2) => {}
        other => return Err(AttemptError::Fatal(DeviceError::Protocol(format!("SUBSCRIBE refused: {other:?}")))),
    }
    let rid = c.next_id;
    let mut outcome = c.request(format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"), p.body.clone()).await?;
    let result = loop {
        match outcome {
            Outcome::Done(r) => break *r,
            Outcome::Poll { operation_id, after } => {
                tokio::time::sleep(after).await;
                let rid = c.next_id;
                let topic =
                    format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}");
                outcome = c.request(topic, Vec::new()).await?;
            }
        }
    };
    let _ = c.send(&Packet::Disconnect).await;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics() {
        assert_eq!(
            parse_response_topic("$dps/registrations/res/202/?$rid=1&retry-after=3"),
            Some((202, Some(Duration::from_secs(3))))
        );
        assert_eq!(parse_response_topic("$dps/registrations/res/200/?$rid=1"), Some((200, None)));
        assert_eq!(parse_response_topic("devices/x"), None);
    }
}
