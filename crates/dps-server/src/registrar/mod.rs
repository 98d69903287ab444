//! Hub registrars (`[hubs.registrar]`): the engine's [`HubRegistrar`] port, dispatching per
//! hub. `record` calls nothing; `http` POSTs a signed description of the work to the
//! operator's endpoint ([`http`]); `azure-iot-hub` writes the identity and twin through IoT
//! Hub's service REST API ([`azure`]); `mosquitto` gives the device a client and a role in a
//! Mosquitto broker's dynamic-security plugin ([`mosquitto`]). All retry a connection failure, a timeout, a `429` or
//! a `5xx` with backoff ([`send`]).

pub mod azure;
pub mod http;
pub mod mosquitto;
pub mod send;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use dps_core::registrar::{DeviceDataAction, HubDevice, HubRegistrar, OnFailure, RegistrarError};

use crate::config::{HubConfig, OnRegistrarFailure, RegistrarConfig};
use crate::error::ServerError;

/// One hub's registrar (hubs without one only record).
enum Registrar {
    Http(http::HttpRegistrar),
    Azure(azure::AzureRegistrar),
    Mosquitto(mosquitto::MosquittoRegistrar),
}

impl Registrar {
    /// The `kind` label of its metrics, as `[hubs.registrar] kind` names it.
    fn kind(&self) -> &'static str {
        match self {
            Registrar::Http(_) => "http",
            Registrar::Azure(_) => "azure-iot-hub",
            Registrar::Mosquitto(_) => "mosquitto",
        }
    }

    fn on_failure(&self) -> OnFailure {
        match self {
            Registrar::Http(r) => r.on_failure,
            Registrar::Azure(r) => r.on_failure,
            Registrar::Mosquitto(r) => r.on_failure,
        }
    }

    fn budget(&self) -> Duration {
        match self {
            Registrar::Http(r) => r.budget(),
            Registrar::Azure(r) => r.budget(),
            Registrar::Mosquitto(r) => r.budget(),
        }
    }
}

/// The registrars of the linked hubs.
pub struct Registrars {
    /// Lower-cased host name → its registrar.
    hubs: HashMap<String, Registrar>,
    budget: Duration,
}

impl Registrars {
    /// Builds the registrars of `hubs`; reads each secret from its environment variable.
    pub fn new(hubs: &[HubConfig]) -> Result<Self, ServerError> {
        let mut built = HashMap::new();
        let mut budget = Duration::ZERO;
        for (i, hub) in hubs.iter().enumerate() {
            let at = format!("hubs[{i}].registrar");
            let registrar = match &hub.registrar {
                RegistrarConfig::Record => continue,
                RegistrarConfig::Http(config) => Registrar::Http(http::HttpRegistrar::new(&at, config)?),
                RegistrarConfig::AzureIotHub(config) => {
                    Registrar::Azure(azure::AzureRegistrar::new(&at, &hub.host_name, config)?)
                }
                RegistrarConfig::Mosquitto(config) => {
                    Registrar::Mosquitto(mosquitto::MosquittoRegistrar::new(&at, config)?)
                }
            };
            // A migration reads the twin from the old hub before writing the new one.
            budget = budget.max(registrar.budget() * 2);
            built.insert(hub.host_name.trim().to_ascii_lowercase(), registrar);
        }
        Ok(Self { hubs: built, budget })
    }

    /// Whether any hub calls out (else the engine needs no registrar at all).
    pub fn any(&self) -> bool {
        !self.hubs.is_empty()
    }

    fn of(&self, hub: &str) -> Option<&Registrar> {
        self.hubs.get(&hub.to_ascii_lowercase())
    }
}

#[async_trait]
impl HubRegistrar for Registrars {
    fn calls(&self, hub: &str) -> bool {
        self.of(hub).is_some()
    }

    fn calls_any(&self) -> bool {
        self.any()
    }

    fn on_failure(&self, hub: &str) -> OnFailure {
        self.of(hub).map_or(OnFailure::Fail, Registrar::on_failure)
    }

    fn budget(&self) -> Duration {
        self.budget
    }

    async fn register(&self, device: &HubDevice) -> Result<(), RegistrarError> {
        let Some(registrar) = self.of(&device.hub) else { return Ok(()) };
        let started = std::time::Instant::now();
        let result = self.register_with(registrar, device).await;
        crate::metrics::registrar_call(registrar.kind(), "register", result.is_ok(), started);
        result
    }

    async fn remove(&self, hub: &str, device_id: &str) -> Result<(), RegistrarError> {
        let Some(registrar) = self.of(hub) else { return Ok(()) };
        let started = std::time::Instant::now();
        let result = match registrar {
            Registrar::Http(r) => r.remove(hub, device_id).await,
            Registrar::Azure(r) => r.remove(device_id).await,
            Registrar::Mosquitto(r) => r.remove(device_id).await,
        };
        crate::metrics::registrar_call(registrar.kind(), "remove", result.is_ok(), started);
        result
    }
}

impl Registrars {
    /// Creates or updates the device in its hub with `registrar` (the hub's).
    async fn register_with(&self, registrar: &Registrar, device: &HubDevice) -> Result<(), RegistrarError> {
        match registrar {
            Registrar::Http(r) => r.register(device).await,
            Registrar::Azure(r) => {
                // Migrating from another IoT hub: the twin the device has there moves with it.
                let migrated = match (&device.previous, device.device_data) {
                    (Some(previous), DeviceDataAction::Keep) => match self.of(&previous.hub) {
                        Some(Registrar::Azure(old)) => old.twin(&previous.device_id).await.map_err(|e| {
                            let from = format!("cannot read the device's twin from hub '{}'", previous.hub);
                            RegistrarError::with_detail(format!("{from}: {e}"), format!("{from}: {}", e.detail()))
                        })?,
                        _ => None,
                    },
                    _ => None,
                };
                r.register(device, migrated).await
            }
            Registrar::Mosquitto(r) => r.register(device).await,
        }
    }
}

/// A secret set inline or through an environment variable (exactly one of them), at least
/// `min_len` characters; errors name the setting and never the value.
pub(crate) fn secret(
    at: &str,
    name: &str,
    inline: Option<&str>,
    env: Option<&str>,
    min_len: usize,
) -> Result<String, ServerError> {
    let bad = |message: String| ServerError::Bootstrap(format!("{at}: {message}"));
    match (inline, env) {
        (Some(s), None) if s.len() >= min_len => Ok(s.to_string()),
        (Some(_), None) => Err(bad(format!("{name} must have at least {min_len} characters"))),
        (None, Some(var)) => std::env::var(var).ok().filter(|s| s.len() >= min_len).ok_or_else(|| {
            bad(format!("{name}_env: the environment variable {var} is not set (to at least {min_len} characters)"))
        }),
        _ => Err(bad(format!("set exactly one of {name} and {name}_env"))),
    }
}

fn on_failure(config: OnRegistrarFailure) -> OnFailure {
    match config {
        OnRegistrarFailure::Fail => OnFailure::Fail,
        OnRegistrarFailure::Tolerate => OnFailure::Tolerate,
    }
}
