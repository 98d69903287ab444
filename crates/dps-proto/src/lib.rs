//! Wire types and grammars of the Azure IoT Hub Device Provisioning Service (DPS).
//!
//! Everything in this crate is pure: no I/O, no clocks, no randomness, except three optional
//! modules: `mqtt_io` and `amqp_io` (feature `tokio`), which frame MQTT packets and AMQP
//! frames over an async byte stream, and `tls` (feature `tls`), the TLS server configuration
//! devices meet. It holds the JSON shapes of the device runtime API ([`device`]) and the
//! service API ([`service`]), the error-code catalogue ([`error`]), SAS token parsing and
//! signing ([`sas`]) and the identifier grammars ([`ids`]), the MQTT codec and topic naming
//! ([`mqtt`], [`mqtt_topic`]), and the AMQP 1.0 codec: types ([`amqp`]), frames and
//! performatives ([`amqp_frame`]) and messages ([`amqp_message`]). The wire facts relied on,
//! with their sources: `docs/protocol-notes.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod amqp;
pub mod amqp_frame;
#[cfg(feature = "tokio")]
pub mod amqp_io;
pub mod amqp_message;
pub mod connection_string;
pub mod device;
pub mod error;
pub mod ids;
pub mod json;
pub mod mqtt;
#[cfg(feature = "tokio")]
pub mod mqtt_io;
pub mod mqtt_topic;
pub mod sas;
pub mod service;
pub mod timestamp;
#[cfg(feature = "tls")]
pub mod tls;
pub mod tpm;
pub mod webhook;
