//! What the connection transports (MQTT, AMQP) have in common: a device holds one connection,
//! over TLS on the transport's own listener or over WebSocket on the HTTPS port, and each
//! connection takes one of the transport's slots (TCP and WebSocket together) for as long as it
//! lasts. [`ConnectionTransport`] is what a transport provides; [`serve_tls`] and
//! [`OverWs`] are the two ways its connections arrive.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::gate::Gate;
use crate::reply::Refusal;
use crate::ws::{WsAdmission, WsTransport};

/// A transport whose devices hold a connection.
pub trait ConnectionTransport: Send + Sync + 'static {
    /// Its name in log lines (`MQTT`).
    const NAME: &'static str;
    /// Its name as a TLS listener and in the `transport` log field (`mqtt`); over WebSocket
    /// `-ws` is added.
    const LISTENER: &'static str;
    /// The same with `-ws`.
    const WS_LISTENER: &'static str;

    /// Takes a connection slot, or `None` when all are taken.
    fn try_slot(&self) -> Option<OwnedSemaphorePermit>;
    /// How many slots there are.
    fn max_connections(&self) -> usize;
    /// The largest WebSocket message (and frame) to accept for it.
    fn max_ws_message_bytes(&self) -> usize;
    /// Runs one connection over any byte stream until the client leaves, breaks the protocol
    /// or `stop` turns true.
    fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        stream: S,
        peer: SocketAddr,
        client_chain: Option<Arc<Vec<Vec<u8>>>>,
        transport: &'static str,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send;
}

/// Serves a transport over TLS on `listener` until `shutdown` turns true; then closes the
/// listener and gives open connections up to 10 s to end. Connections are admitted by `gate`
/// (its cap and per-address limit), then need one of the transport's slots.
pub async fn serve_tls<T: ConnectionTransport>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    transport: Arc<T>,
    gate: Arc<Gate>,
    shutdown: watch::Receiver<bool>,
) {
    let stop = shutdown.clone();
    crate::accept::accept_tls(listener, tls, gate, shutdown, T::LISTENER, move |tls, peer, ticket| {
        let transport = transport.clone();
        let stop = stop.clone();
        async move {
            let _ticket = ticket;
            let Some(_permit) = transport.try_slot() else {
                tracing::warn!(%peer, max = transport.max_connections(), "{} connection refused: {}.max_connections reached", T::NAME, T::LISTENER);
                return;
            };
            let client_chain = crate::tls::peer_chain(tls.get_ref().1);
            transport.run(tls, peer, client_chain, T::LISTENER, stop).await;
        }
    })
    .await;
}

/// A transport's connections over WebSocket ([`WsTransport`]): a connection takes one of the
/// transport's slots before the upgrade is answered.
pub struct OverWs<T>(Arc<T>);

impl<T> OverWs<T> {
    /// The WebSocket side of `transport`.
    pub fn new(transport: Arc<T>) -> Self {
        Self(transport)
    }
}

impl<T: ConnectionTransport> WsTransport for OverWs<T> {
    fn admit(&self, peer: SocketAddr) -> Result<Box<dyn WsAdmission>, Refusal> {
        let Some(permit) = self.0.try_slot() else {
            tracing::warn!(%peer, max = self.0.max_connections(), "{}-WS connection refused: {}.max_connections reached", T::NAME, T::LISTENER);
            return Err(Refusal::busy(format!("too many {} connections; try again later", T::NAME), 5));
        };
        Ok(Box::new(Admitted { transport: self.0.clone(), _permit: permit }))
    }
}

/// One WebSocket connection's slot.
struct Admitted<T> {
    transport: Arc<T>,
    _permit: OwnedSemaphorePermit,
}

impl<T: ConnectionTransport> WsAdmission for Admitted<T> {
    fn protocol(&self) -> &'static str {
        T::NAME
    }

    fn max_message_bytes(&self) -> usize {
        self.transport.max_ws_message_bytes()
    }

    fn run<'a>(
        &'a self,
        stream: DuplexStream,
        peer: SocketAddr,
        client_chain: Option<Arc<Vec<Vec<u8>>>>,
        stop: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(self.transport.run(stream, peer, client_chain, T::WS_LISTENER, stop))
    }
}
