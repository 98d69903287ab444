//! `dps bench`: a fleet load generator for dps, and the baseline it is compared with.
//!
//! [`run`] simulates N devices registering with C in flight (HTTPS with keep-alive, HTTPS
//! with a new TLS connection per device, or MQTT or AMQP with a new connection per device),
//! after creating the enrollments they need through the service API. [`ceiling`] is a minimal
//! hyper + rustls server (and minimal MQTT and AMQP responders) that answers the same
//! requests with a fixed reply on the same TLS settings as dps, so a report can state dps's
//! throughput as a share of what the HTTP/TLS stack alone does on the machine. See BENCHMARKS.md.
#![forbid(unsafe_code)]

pub mod amqp_client;
pub mod ceiling;
pub mod ceiling_amqp;
pub mod ceiling_answer;
pub mod client;
pub mod fleet;
pub mod iot_hub;
pub mod mosquitto;
pub mod report;
pub mod setup;
pub mod target;
pub mod tls;
pub mod webhook;

pub use fleet::{run, Allocation, Attestation, FleetOptions, Transport};
pub use report::{BenchReport, PhaseReport};
pub use target::Target;

/// Everything that stops a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bad option or option combination; nothing was run.
    #[error("{0}")]
    Input(String),
    /// Preparing the run failed (server start, enrollments, certificates).
    #[error("setup: {0}")]
    Setup(String),
    /// Reading or writing a local file or socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl BenchError {
    /// A `map_err` adapter for I/O errors with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let context = context.into();
        move |source| BenchError::Io { context, source }
    }
}
