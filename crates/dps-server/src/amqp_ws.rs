//! AMQP over WebSocket: the `AMQPWSB10` subprotocol's [`WsTransport`]. The server wires it into
//! [`crate::ws::WsRoutes`] when AMQP and `amqp.websocket` are on; a connection takes one of the
//! `amqp.max_connections` slots (shared with AMQP over TLS) before the upgrade is answered, and
//! runs [`crate::amqp::run_connection`] over the bridged byte stream.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::DuplexStream;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::amqp::run_connection;
use crate::amqp_context::AmqpContext;
use crate::reply::Refusal;
use crate::ws::{WsAdmission, WsTransport};

/// AMQP connections over WebSocket.
#[derive(Debug)]
pub struct AmqpOverWs {
    ctx: Arc<AmqpContext>,
}

impl AmqpOverWs {
    /// The transport for the connections of `ctx`.
    pub fn new(ctx: Arc<AmqpContext>) -> Self {
        Self { ctx }
    }
}

impl WsTransport for AmqpOverWs {
    fn admit(&self, peer: SocketAddr) -> Result<Box<dyn WsAdmission>, Refusal> {
        let Some(permit) = self.ctx.try_slot() else {
            tracing::warn!(%peer, max = self.ctx.config.max_connections(), "AMQP-WS connection refused: amqp.max_connections reached");
            return Err(Refusal::busy("too many AMQP connections; try again later", 5));
        };
        Ok(Box::new(Admitted { ctx: self.ctx.clone(), _permit: permit }))
    }
}

/// One AMQP-over-WebSocket connection's slot.
struct Admitted {
    ctx: Arc<AmqpContext>,
    _permit: OwnedSemaphorePermit,
}

impl WsAdmission for Admitted {
    fn protocol(&self) -> &'static str {
        "AMQP"
    }

    fn max_message_bytes(&self) -> usize {
        self.ctx.config.max_frame_bytes as usize + 1024
    }

    fn run<'a>(
        &'a self,
        stream: DuplexStream,
        peer: SocketAddr,
        client_chain: Option<Arc<Vec<Vec<u8>>>>,
        stop: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(run_connection(stream, &self.ctx, peer, client_chain, "amqp-ws", stop))
    }
}
