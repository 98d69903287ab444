//! WebSocket on the HTTPS port (docs/protocol-notes.md §1.3): an `Upgrade: websocket` request
//! goes to the transport its `Sec-WebSocket-Protocol` names ([`WsRoutes`], wired by the server):
//! `mqtt` (any case) becomes an MQTT session, `AMQPWSB10` an AMQP connection (both through
//! `connection.rs`); others are refused with a DPS error naming the ones served. Plain requests never get
//! here. Any path is accepted (`/$iothub/websocket` from C, Node and Python; `/` from C#), query
//! strings are ignored. This file owns the upgrade and the bridge from binary messages to a
//! byte stream; it knows no transport, and answers refusals as a [`Refusal`] that the HTTP
//! layer renders.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use dps_proto::error::ErrorCode;
use futures_util::{SinkExt, StreamExt};
use http::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::gate::Ticket;
use crate::reply::Refusal;

/// True for a WebSocket upgrade request.
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
}

fn refusal(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::INVALID_ARGUMENT, message)
}

/// The HTTPS connection a WebSocket session takes over.
pub struct Session {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The client certificate chain of the TLS session, if any.
    pub client_chain: Option<Arc<Vec<Vec<u8>>>>,
    /// The connection's place under the HTTPS listener's caps, held until the session ends.
    pub ticket: Arc<Ticket>,
}

/// A transport served over WebSocket on the HTTPS port, reached by its subprotocol.
pub trait WsTransport: Send + Sync + 'static {
    /// Takes a place for one more session before the upgrade is answered; `Err` is the DPS
    /// error the upgrade request gets instead of `101`.
    fn admit(&self, peer: SocketAddr) -> Result<Box<dyn WsAdmission>, Refusal>;
}

/// A session admitted by a [`WsTransport`]: it holds the session's place until it is dropped,
/// after the session and the bridge have ended.
pub trait WsAdmission: Send + Sync + 'static {
    /// The protocol's name in log lines (`MQTT`).
    fn protocol(&self) -> &'static str;
    /// The largest WebSocket message and frame accepted.
    fn max_message_bytes(&self) -> usize;
    /// Runs the session over the byte stream the WebSocket's binary messages carry, until the
    /// client leaves or `stop` turns true.
    fn run<'a>(
        &'a self,
        stream: DuplexStream,
        peer: SocketAddr,
        client_chain: Option<Arc<Vec<Vec<u8>>>>,
        stop: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// The subprotocols this server knows, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subprotocol {
    /// `mqtt`: MQTT 3.1.1 over WebSocket.
    Mqtt,
    /// `AMQPWSB10`: AMQP 1.0 over WebSocket.
    Amqp,
}

impl Subprotocol {
    /// The one to serve among those offered (any case, any position): `mqtt` before
    /// `AMQPWSB10`; the offered spelling is echoed in the answer.
    fn choose(offered: &[String]) -> Option<(Subprotocol, &str)> {
        [(Subprotocol::Mqtt, "mqtt"), (Subprotocol::Amqp, "AMQPWSB10")]
            .into_iter()
            .find_map(|(sub, name)| offered.iter().find(|p| p.eq_ignore_ascii_case(name)).map(|p| (sub, p.as_str())))
    }

    /// Why an upgrade to it is refused when its transport is not on.
    fn disabled(self) -> &'static str {
        match self {
            Subprotocol::Mqtt => "MQTT over WebSocket is disabled on this server (mqtt.websocket)",
            Subprotocol::Amqp => "AMQP over WebSocket is disabled on this server (amqp.websocket)",
        }
    }
}

/// Where WebSocket upgrades go, by subprotocol: wired by the server with the transports that
/// are on.
#[derive(Clone, Default)]
pub struct WsRoutes {
    /// `mqtt` (`None` when MQTT or `mqtt.websocket` is off).
    pub mqtt: Option<Arc<dyn WsTransport>>,
    /// `AMQPWSB10` (`None` when AMQP or `amqp.websocket` is off).
    pub amqp: Option<Arc<dyn WsTransport>>,
}

impl std::fmt::Debug for WsRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsRoutes").field("mqtt", &self.mqtt.is_some()).field("amqp", &self.amqp.is_some()).finish()
    }
}

impl WsRoutes {
    /// Answers a WebSocket upgrade: `101` and a session of the transport its subprotocol
    /// names, or the DPS error to answer instead.
    pub fn accept(
        &self,
        mut req: Request<Incoming>,
        session: Session,
        stop: watch::Receiver<bool>,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let Session { peer, client_chain, ticket } = session;
        let headers = req.headers();
        let offered: Vec<String> = headers
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .filter(|p| !p.is_empty())
            .collect();
        let Some((subprotocol, protocol)) = Subprotocol::choose(&offered) else {
            return Err(refusal(format!(
                "unsupported WebSocket subprotocol {offered:?}; this server speaks 'mqtt' and 'AMQPWSB10'"
            )));
        };
        let protocol = protocol.to_string();
        let transport = match subprotocol {
            // `None` (off) is refused below, after the handshake headers are checked.
            Subprotocol::Mqtt => self.mqtt.as_ref(),
            Subprotocol::Amqp => self.amqp.as_ref(),
        };
        if headers.get("sec-websocket-version").and_then(|v| v.to_str().ok()) != Some("13") {
            return Err(refusal("Sec-WebSocket-Version must be 13"));
        }
        let Some(key) = headers.get("sec-websocket-key").map(|k| k.as_bytes().to_vec()) else {
            return Err(refusal("the Sec-WebSocket-Key header is missing"));
        };
        let Some(transport) = transport else {
            return Err(refusal(subprotocol.disabled()));
        };
        let admission = transport.admit(peer)?;
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let _ticket = ticket;
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            let limit = admission.max_message_bytes();
            let config = WebSocketConfig::default().max_message_size(Some(limit)).max_frame_size(Some(limit));
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
            bridge(ws, admission.as_ref(), peer, client_chain, stop).await;
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(&derive_accept_key(&key)) {
            h.insert(SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Ok(v) = HeaderValue::from_str(&protocol) {
            h.insert(SEC_WEBSOCKET_PROTOCOL, v);
        }
        Ok(resp)
    }
}

/// Runs an admitted session over the byte stream carried by the WebSocket's binary messages.
async fn bridge<S>(
    ws: WebSocketStream<S>,
    admission: &dyn WsAdmission,
    peer: SocketAddr,
    client_chain: Option<Arc<Vec<Vec<u8>>>>,
    stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (app, pipe) = tokio::io::duplex(64 * 1024);
    let protocol = admission.protocol();
    let session = admission.run(app, peer, client_chain, stop);
    let pump = async move {
        let (mut sink, mut messages) = ws.split();
        let (mut from_session, mut to_session) = tokio::io::split(pipe);
        let mut out = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        if to_session.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Text(_))) => {
                        tracing::info!(%peer, "{protocol}-WS connection closed: text frame ({protocol} travels in binary frames)");
                        break;
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => {} // ping, pong: answered by tungstenite
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "WebSocket read failed");
                        break;
                    }
                },
                n = from_session.read(&mut out) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink.send(Message::Binary(out[..n].to_vec().into())).await.is_err() {
                            break;
                        }
                    }
                },
            }
        }
        let _ = sink.close().await;
    };
    tokio::join!(session, pump);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_is_chosen_before_amqp_in_any_case_and_position() {
        let offer = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Subprotocol::choose(&offer(&["AMQPWSB10", "MQTT"])), Some((Subprotocol::Mqtt, "MQTT")));
        assert_eq!(Subprotocol::choose(&offer(&["amqpwsb10"])), Some((Subprotocol::Amqp, "amqpwsb10")));
        assert_eq!(Subprotocol::choose(&offer(&["mqttv5", "chat"])), None);
        assert_eq!(Subprotocol::choose(&[]), None);
    }
}
