//! Errors that stop the server from starting or running.

use dps_core::store::StoreError;

/// Start-up and run-time failures of the server process.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory, TLS material or instance settings could not be prepared.
    #[error("{0}")]
    Bootstrap(String),
    /// The store could not be opened or read.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}{hint}; {flag} or the config file sets the address")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
        /// The command-line flag that sets this address.
        flag: &'static str,
    },
}
