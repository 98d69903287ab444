//! The dps-rs provisioning engine.
//!
//! Transports (HTTPS, MQTT, AMQP) parse the wire into a [`registration::RegisterRequest`] (or
//! authenticate a connection once, [`DeviceRuntime::authenticate_device`]) and call the device
//! plane, [`Engine::devices`]; the service API calls the management plane,
//! [`Engine::management`]. Nothing here knows about sockets, databases or HTTP statuses:
//! storage is the [`store::Store`] port, time the [`clock::Clock`] port, custom allocation the
//! [`custom::AllocationHook`] port.
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
pub mod event_outbox;
pub mod events;
pub mod hub_outbox;
pub mod lease;
pub mod log_limit;
pub mod registrar;
pub mod registration;
pub mod reprovision;
pub mod store;
pub mod throttle;
pub mod tpm;
pub mod x509;

pub use engine::{Core, DeviceRuntime, Engine, EngineSettings, Management};
pub use error::Error;
