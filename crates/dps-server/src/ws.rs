//! WebSocket on the HTTPS port (docs/protocol-notes.md §1.3): an `Upgrade: websocket` request with the
//! subprotocol `mqtt` (any case) becomes an MQTT session; `AMQPWSB10` is refused with a DPS
//! error saying AMQP is not served; plain requests never get here. Any path is accepted
//! (`/$iothub/websocket` from C, Node and Python; `/` from C#), query strings are ignored.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use dps_proto::error::ErrorCode;
use futures_util::{SinkExt, StreamExt};
use http::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::http::error_response;
use crate::mqtt::{run_session, MqttContext};

/// True for a WebSocket upgrade request.
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
}

fn refuse(message: impl Into<String>, request_id: &str) -> Response<Full<Bytes>> {
    error_response(&dps_core::Error::bad_request(ErrorCode::INVALID_ARGUMENT, message), request_id)
}

/// The HTTPS connection a WebSocket session takes over.
pub struct Session {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The client certificate chain of the TLS session, if any.
    pub client_chain: Option<Arc<Vec<Vec<u8>>>>,
    /// The connection's place under the HTTPS listener's caps, held until the session ends.
    pub ticket: Arc<crate::gate::Ticket>,
}

/// Answers a WebSocket upgrade: `101` and an MQTT session, or a DPS error.
pub fn accept(
    mqtt: Option<&Arc<MqttContext>>,
    mut req: Request<Incoming>,
    session: Session,
    stop: watch::Receiver<bool>,
    request_id: &str,
) -> Response<Full<Bytes>> {
    let Session { peer, client_chain, ticket } = session;
    let headers = req.headers();
    let offered: Vec<String> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect();
    let Some(protocol) = offered.iter().find(|p| p.eq_ignore_ascii_case("mqtt")).cloned() else {
        if offered.iter().any(|p| p.eq_ignore_ascii_case("AMQPWSB10")) {
            return refuse(
                "AMQP over WebSocket is not served by this server yet; use MQTT over WebSocket (subprotocol mqtt) or HTTPS",
                request_id,
            );
        }
        return refuse(format!("unsupported WebSocket subprotocol {offered:?}; this server speaks 'mqtt'"), request_id);
    };
    if headers.get("sec-websocket-version").and_then(|v| v.to_str().ok()) != Some("13") {
        return refuse("Sec-WebSocket-Version must be 13", request_id);
    }
    let Some(key) = headers.get("sec-websocket-key").map(|k| k.as_bytes().to_vec()) else {
        return refuse("the Sec-WebSocket-Key header is missing", request_id);
    };
    let Some(ctx) = mqtt.filter(|c| c.config.websocket).cloned() else {
        return refuse("MQTT over WebSocket is disabled on this server (mqtt.websocket)", request_id);
    };
    let Some(permit) = ctx.try_slot() else {
        tracing::warn!(%peer, max = ctx.config.max_connections(), "MQTT-WS connection refused: mqtt.max_connections reached");
        return error_response(
            &dps_core::Error::Unavailable("too many MQTT connections; try again later".into()),
            request_id,
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _permit = permit;
        let _ticket = ticket;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let limit = ctx.config.max_packet_bytes + 1024;
        let config = WebSocketConfig::default().max_message_size(Some(limit)).max_frame_size(Some(limit));
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        bridge(ws, &ctx, peer, client_chain, stop).await;
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
    resp
}

/// Runs an MQTT session over the byte stream carried by the WebSocket's binary messages.
async fn bridge<S>(
    ws: WebSocketStream<S>,
    ctx: &MqttContext,
    peer: SocketAddr,
    client_chain: Option<Arc<Vec<Vec<u8>>>>,
    stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (app, pipe) = tokio::io::duplex(64 * 1024);
    let session = run_session(app, ctx, peer, client_chain, "mqtt-ws", stop);
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
                        tracing::info!(%peer, "MQTT-WS connection closed: text frame (MQTT travels in binary frames)");
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
