//! rustls server configuration of every listener: the device-facing settings of
//! [`dps_proto::tls`] (TLS 1.2 and 1.3, ALPN `http/1.1`, client certificates requested but not
//! required, any issuer accepted at handshake time; docs/protocol-notes.md §1.4), loaded from
//! the configured files. The chain reaches the engine as the device's credential and is checked
//! against enrollments and the certificate store there.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;

use crate::error::ServerError;

/// Loads a PEM chain and key into a rustls server configuration.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, ServerError> {
    dps_proto::tls::server_config_from_pem(cert, key).map_err(|e| ServerError::Tls(e.to_string()))
}

/// The client certificate chain of a TLS session (DER, leaf first), if the client sent one.
pub fn peer_chain(conn: &rustls::ServerConnection) -> Option<Arc<Vec<Vec<u8>>>> {
    conn.peer_certificates().filter(|c| !c.is_empty()).map(|c| Arc::new(c.iter().map(|d| d.to_vec()).collect()))
}
