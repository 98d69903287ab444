//! The dps-rs server: configuration, bootstrap, TLS listeners, the device runtime API over
//! HTTPS, MQTT and AMQP (each over TLS and WebSocket), and the service API over HTTPS. The binary (`dps serve`) is a thin wrapper around [`Server`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod address_policy;
pub mod admin;
pub mod amqp;
pub mod amqp_address;
pub mod amqp_context;
mod amqp_request;
mod amqp_sasl;
pub mod auth_failures;
pub mod bootstrap;
pub mod config;
pub mod config_check;
pub mod connection;
pub mod descriptors;
pub mod error;
pub mod events;
pub mod gate;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod mqtt;
pub mod policy;
pub mod registrar;
pub mod reply;
pub mod rules;
pub mod server;
pub mod source;
pub mod store;
pub mod tls;
pub mod webhook;
pub mod ws;

pub use config::{Config, DEFAULT_CONFIG};
pub use error::ServerError;
pub use server::Server;
