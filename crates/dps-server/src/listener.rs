//! The HTTPS listener: accept, TLS handshake with a deadline, HTTP/1.1 with header-size and
//! header-time limits, a cap on open connections, WebSocket upgrades, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::LimitsConfig;
use crate::http::{handle, AppState};

/// Serves HTTPS on `listener` until `shutdown` turns true, then lets open requests finish
/// (up to 10 s).
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<AppState>,
    limits: LimitsConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshake_timeout = Duration::from_secs(limits.tls_handshake_timeout_secs);
    let header_timeout = Duration::from_secs(limits.header_read_timeout_secs);
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: back off.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        let max_buf = limits.max_header_bytes;
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let client_chain = crate::tls::peer_chain(tls.get_ref().1);
            let service = service_fn(move |req| handle(state.clone(), peer, client_chain.clone(), req));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(max_buf.max(8192))
                .keep_alive(true);
            // With upgrades: a WebSocket takes the connection over (see crate::ws).
            let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(tls), service).with_upgrades());
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    // Finish the request in progress, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(all)).await.is_ok();
    if drained {
        tracing::info!("all HTTPS connections closed");
    } else {
        tracing::warn!("closing HTTPS connections still open after 10 s");
    }
}
