//! The HTTPS listener: connections admitted by its [`Gate`] through the shared TLS accept
//! loop ([`crate::accept`]), then HTTP/1.1 with header-size and header-time limits,
//! WebSocket upgrades and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::LimitsConfig;
use crate::gate::Gate;
use crate::http::{handle, AppState, Connection};

/// Serves HTTPS on `listener` until `shutdown` turns true, then lets open requests finish
/// (up to 10 s).
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<AppState>,
    limits: LimitsConfig,
    gate: Arc<Gate>,
    shutdown: watch::Receiver<bool>,
) {
    let header_timeout = Duration::from_secs(limits.header_read_timeout_secs);
    let max_buf = limits.max_header_bytes;
    let stop = shutdown.clone();
    crate::accept::accept_tls(listener, tls, gate, shutdown, "https", move |tls, peer, ticket| {
        let state = state.clone();
        let mut stop = stop.clone();
        async move {
            // Held by this task and by any WebSocket session the connection turns into, so
            // that the session still counts against the caps after hyper lets go of it.
            let ticket = Arc::new(ticket);
            let client_chain = crate::tls::peer_chain(tls.get_ref().1);
            let service = service_fn(move |req| {
                let connection = Connection { peer, client_chain: client_chain.clone(), ticket: ticket.clone() };
                handle(state.clone(), connection, req)
            });
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
        }
    })
    .await;
}
