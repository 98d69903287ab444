//! The dps-rs provisioning engine.
//!
//! Transports (HTTPS, MQTT, AMQP) parse the wire into a [`registration::RegisterRequest`] and
//! call [`Engine::register`]; the service API calls the enrollment and registration-state
//! operations. Nothing here knows about sockets or databases: storage is the [`store::Store`]
//! port, time is the [`clock::Clock`] port.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod allocation;
pub mod attestation;
pub mod certificates;
pub mod clock;
pub mod custom;
pub mod engine;
pub mod enrollment;
pub mod error;
pub mod etag;
pub mod log_limit;
pub mod registration;
pub mod reprovision;
pub mod store;
pub mod throttle;
pub mod x509;

pub use engine::{Engine, EngineSettings};
pub use error::Error;
