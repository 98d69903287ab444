//! What every AMQP connection shares ([`AmqpContext`]), why one ends ([`End`]) and how its
//! frames are written ([`write_frames`]): the pieces the connection ([`crate::amqp`]), its
//! SASL layer ([`crate::amqp_sasl`]) and its requests ([`crate::amqp_request`]) have in common.

use std::sync::Arc;
use std::time::Duration;

use dps_core::Engine;
use dps_proto::amqp_frame::{AmqpError, Frame, FrameError};
use dps_proto::amqp_io::{FrameIoError, FrameStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::auth_failures::AuthFailures;
use crate::config::AmqpConfig;

/// What every AMQP connection shares.
pub struct AmqpContext {
    /// The engine.
    pub engine: Engine,
    /// Settings.
    pub config: AmqpConfig,
    /// One permit per open AMQP connection (TCP and WebSocket).
    pub slots: Arc<Semaphore>,
    /// Failed authentications per source address (shared with HTTPS and MQTT).
    pub auth_failures: Arc<AuthFailures>,
}

impl std::fmt::Debug for AmqpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpContext").field("config", &self.config).finish_non_exhaustive()
    }
}

impl AmqpContext {
    /// A context with `config.max_connections` slots.
    pub fn new(engine: Engine, config: AmqpConfig, auth_failures: Arc<AuthFailures>) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_connections()));
        Self { engine, config, slots, auth_failures }
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The client closed the connection (or sent `close`).
    Closed,
    /// The server is stopping.
    Shutdown,
    /// Authentication failed; the SASL outcome (or the link refusal) said so.
    Refused(String),
    /// The client broke the protocol or a limit; the condition and text say how.
    Violation(String),
    /// A limit of `[amqp]` was exceeded.
    Limit(String),
    /// Reading or writing failed.
    Io(std::io::Error),
}

impl From<FrameIoError> for End {
    fn from(e: FrameIoError) -> End {
        match e {
            FrameIoError::Frame(e @ FrameError::TooLarge { .. }) => End::Limit(format!("{e} (amqp.max_frame_bytes)")),
            FrameIoError::Frame(e) => End::Violation(e.to_string()),
            FrameIoError::Truncated => End::Violation("the connection closed in the middle of a frame".into()),
            FrameIoError::Io(e) => End::Io(e),
        }
    }
}

impl End {
    /// The `close` error the client gets, if any.
    pub(crate) fn close_error(&self) -> Option<AmqpError> {
        let (condition, description) = match self {
            End::Closed | End::Io(_) | End::Refused(_) => return None,
            End::Shutdown => ("amqp:connection:forced", "the server is shutting down; connect again".to_string()),
            End::Violation(why) => ("amqp:not-allowed", why.clone()),
            End::Limit(why) => ("amqp:resource-limit-exceeded", why.clone()),
        };
        Some(AmqpError { condition: condition.into(), description: Some(description), info: Vec::new() })
    }
}

/// Writes `frames` in one write, within `deadline`.
pub(crate) async fn write_frames<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FrameStream<S>,
    frames: &[Frame],
    deadline: Duration,
) -> Result<(), End> {
    match tokio::time::timeout(deadline, stream.write_all(frames)).await {
        Ok(r) => r.map_err(End::from),
        Err(_) => Err(End::Limit(format!(
            "the client did not read within {} s (amqp.write_timeout_secs)",
            deadline.as_secs()
        ))),
    }
}
