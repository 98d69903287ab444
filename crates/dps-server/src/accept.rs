//! The one TLS accept loop of every listener (HTTPS, MQTT): accept, admit through the
//! listener's [`Gate`] (refused connections are closed at once), TLS handshake within the
//! gate's budget, then hand the stream to the listener's connection handler. Running out of
//! file descriptors does not stop the loop: a spare descriptor is given up to accept and close
//! the waiting connection (so the client learns at once instead of hanging in the backlog), and
//! the loop goes on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::gate::{Gate, HandshakeError, Ticket};

/// Whether an accept error means this process (or the system) has no descriptor left.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux and the BSDs.
    matches!(e.raw_os_error(), Some(23 | 24))
}

fn spare_descriptor() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Accepts on `listener` until `shutdown` turns true, then closes it and gives open
/// connections up to 10 s to end. `serve` runs each connection after its handshake, with the
/// connection's [`Ticket`] (dropping it frees the connection's place).
pub async fn accept_tls<F, Fut>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    gate: Arc<Gate>,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
    serve: F,
) where
    F: Fn(TlsStream<TcpStream>, SocketAddr, Ticket) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(tls);
    let serve = Arc::new(serve);
    let mut spare = spare_descriptor();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if out_of_descriptors(&e) => {
                dps_core::warn_limited!("accept-emfile", listener = what, error = %e,
                    "out of file descriptors: closing a waiting connection (lower the connection caps or raise RLIMIT_NOFILE)");
                // Give up the spare so that one waiting connection can be accepted and closed.
                drop(spare.take());
                if let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await {
                    drop(s);
                }
                spare = spare_descriptor();
                if spare.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
            Err(e) => {
                // A connection reset before accept, and the like.
                dps_core::warn_limited!("accept-error", listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let ticket = match gate.admit(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                dps_core::info_limited!("connection-refused", listener = what, %peer, reason = %why,
                    "connection refused at accept");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let serve = serve.clone();
        tokio::spawn(async move {
            match ticket.handshake(acceptor.accept(stream)).await {
                Ok(tls) => serve(tls, peer, ticket).await,
                Err(HandshakeError::Failed(e)) => {
                    crate::metrics::tls_handshake_failed(what, "failed");
                    tracing::debug!(%peer, listener = what, error = %e, "TLS handshake failed")
                }
                Err(HandshakeError::TimedOut(d)) => {
                    crate::metrics::tls_handshake_failed(what, "timeout");
                    tracing::debug!(%peer, listener = what, ms = d.as_millis() as u64, "TLS handshake timed out")
                }
                Err(HandshakeError::Shed) => tracing::debug!(%peer, listener = what,
                    "TLS handshake cut short: the listener is full and newer connections wait"),
            }
        });
    }
    drop(listener);
    if gate.wait_idle(Duration::from_secs(10)).await {
        tracing::info!(listener = what, "all connections closed");
    } else {
        tracing::warn!(listener = what, open = gate.open(), "closing connections still open after 10 s");
    }
}
