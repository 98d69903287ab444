//! The MQTT transport (docs/protocol-notes.md §4): CONNECT, SUBSCRIBE, publish register, then publish
//! operation-status polls on the same connection until the registration ends.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dps_proto::mqtt::{decode, Connect, ConnectReturnCode, Packet, Publish};
use dps_proto::mqtt_topic::RESPONSE_FILTER;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::{interpret, AttemptError, DeviceError, Outcome, Prepared, Registration};

struct Conn {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    next_id: u16,
}

fn dropped(e: impl std::fmt::Display) -> AttemptError {
    AttemptError::Retry { reason: format!("MQTT: {e}"), after: None }
}

impl Conn {
    async fn send(&mut self, packet: &Packet) -> Result<(), AttemptError> {
        let bytes = packet.encode().map_err(|e| AttemptError::Fatal(DeviceError::Protocol(e.to_string())))?;
        self.stream.write_all(&bytes).await.map_err(dropped)?;
        self.stream.flush().await.map_err(dropped)
    }

    async fn recv(&mut self) -> Result<Packet, AttemptError> {
        loop {
            match decode(&self.buf, 1 << 20) {
                Ok(Some((p, n))) => {
                    let _ = self.buf.split_to(n);
                    return Ok(p);
                }
                Ok(None) => {}
                Err(e) => return Err(AttemptError::Fatal(DeviceError::Protocol(format!("the server sent {e}")))),
            }
            let n = tokio::time::timeout(Duration::from_secs(60), self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| dropped("no answer within 60 s"))?
                .map_err(dropped)?;
            if n == 0 {
                return Err(dropped("the server closed the connection"));
            }
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
    let mut c = Conn { stream, buf: BytesMut::new(), next_id: 1 };
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
