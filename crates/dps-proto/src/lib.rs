//! Wire types and grammars of the Azure IoT Hub Device Provisioning Service (DPS).
//!
//! Everything in this crate is pure: no I/O, no clocks, no randomness. It holds the JSON
//! shapes of the device runtime API ([`device`]) and the service API ([`service`]), the
//! error-code catalogue ([`error`]), SAS token parsing and signing ([`sas`]) and the
//! identifier grammars ([`ids`]), and the MQTT codec and topic naming ([`mqtt`], [`mqtt_topic`]). The wire facts relied on, with their sources: `docs/protocol-notes.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod connection_string;
pub mod device;
pub mod error;
pub mod ids;
pub mod json;
pub mod mqtt;
pub mod mqtt_topic;
pub mod sas;
pub mod service;
pub mod timestamp;
pub mod webhook;
