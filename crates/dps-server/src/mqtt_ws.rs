//! MQTT over WebSocket: the `mqtt` subprotocol's [`WsTransport`]. The server wires it into
//! [`crate::ws::WsRoutes`] when MQTT and `mqtt.websocket` are on; a session takes one of the
//! `mqtt.max_connections` slots (shared with MQTT over TLS) before the upgrade is answered, and
//! runs [`crate::mqtt::run_session`] over the bridged byte stream.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::DuplexStream;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::mqtt::{run_session, MqttContext};
use crate::reply::Refusal;
use crate::ws::{WsAdmission, WsTransport};

/// MQTT sessions over WebSocket.
#[derive(Debug)]
pub struct MqttOverWs {
    ctx: Arc<MqttContext>,
}

impl MqttOverWs {
    /// The transport for the sessions of `ctx`.
    pub fn new(ctx: Arc<MqttContext>) -> Self {
        Self { ctx }
    }
}

impl WsTransport for MqttOverWs {
    fn admit(&self, peer: SocketAddr) -> Result<Box<dyn WsAdmission>, Refusal> {
        let Some(permit) = self.ctx.try_slot() else {
            tracing::warn!(%peer, max = self.ctx.config.max_connections(), "MQTT-WS connection refused: mqtt.max_connections reached");
            return Err(Refusal::busy("too many MQTT connections; try again later", 5));
        };
        Ok(Box::new(Admitted { ctx: self.ctx.clone(), _permit: permit }))
    }
}

/// One MQTT-over-WebSocket session's slot.
struct Admitted {
    ctx: Arc<MqttContext>,
    _permit: OwnedSemaphorePermit,
}

impl WsAdmission for Admitted {
    fn protocol(&self) -> &'static str {
        "MQTT"
    }

    fn max_message_bytes(&self) -> usize {
        self.ctx.config.max_packet_bytes + 1024
    }

    fn run<'a>(
        &'a self,
        stream: DuplexStream,
        peer: SocketAddr,
        client_chain: Option<Arc<Vec<Vec<u8>>>>,
        stop: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(run_session(stream, &self.ctx, peer, client_chain, "mqtt-ws", stop))
    }
}
