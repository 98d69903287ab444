//! The hub registrar port: what the engine asks of the hub a device is assigned to (create or
//! update its identity there with the right authentication and initial twin, remove it from
//! the hub it left), and the work the engine keeps in the store until a hub has done it (the
//! outbox, [`OutboxEntry`]). Implementations live outside the engine (`dps-server`: `record`,
//! an HTTP registrar); a hub whose registrar only records (`record`, the default) is never
//! called, so a registration to it costs nothing more.

use async_trait::async_trait;
use dps_proto::device::RegistrationSubstatus;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the device authenticates to its hub, as the hub must know it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "type")]
pub enum HubAuthentication {
    /// Symmetric key (a symmetric-key device's own key, a group member's derived key, or the
    /// key a TPM device imported: protocol.md §6.6, §11). Secret.
    SymmetricKey {
        /// Primary key (base64).
        primary_key: String,
        /// Secondary key (base64), when the enrollment has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secondary_key: Option<String>,
    },
    /// A self-signed or individually enrolled X.509 certificate, by thumbprint.
    X509Thumbprint {
        /// SHA-256 of the certificate the device presented (upper-case hex).
        primary_thumbprint: String,
    },
    /// An X.509 certificate signed by a CA the hub trusts (group members).
    CertificateAuthority,
}

impl HubAuthentication {
    /// The authentication's kind as IoT Hub names it (`sas`, `selfSigned`,
    /// `certificateAuthority`).
    pub fn kind(&self) -> &'static str {
        match self {
            HubAuthentication::SymmetricKey { .. } => "sas",
            HubAuthentication::X509Thumbprint { .. } => "selfSigned",
            HubAuthentication::CertificateAuthority => "certificateAuthority",
        }
    }
}

impl std::fmt::Debug for HubAuthentication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HubAuthentication::SymmetricKey { .. } => f.write_str("SymmetricKey(<redacted>)"),
            HubAuthentication::X509Thumbprint { primary_thumbprint } => {
                write!(f, "X509Thumbprint({primary_thumbprint})")
            }
            HubAuthentication::CertificateAuthority => f.write_str("CertificateAuthority"),
        }
    }
}

/// What happens to the device's data on its new hub (the reprovisioning plan,
/// [`crate::reprovision::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviceDataAction {
    /// A device never assigned before (or a forced registration): its twin is the initial
    /// twin.
    Initial,
    /// The device keeps its data: on the same hub, or moved from its previous hub
    /// (`migrateDeviceData`).
    Keep,
    /// The device's data is reset to the initial twin (`migrateDeviceData: false`).
    Reset,
}

/// The device identity a registration gives a hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubDevice {
    /// The hub's host name.
    pub hub: String,
    /// The device ID in the hub.
    pub device_id: String,
    /// The registration ID it registered with.
    pub registration_id: String,
    /// The enrollment group it registered through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// `attestation.type` of its enrollment (`symmetricKey`, `x509`, `tpm`).
    pub attestation: String,
    /// How it authenticates to the hub.
    pub authentication: HubAuthentication,
    /// `capabilities.iotEdge` of its enrollment.
    pub iot_edge: bool,
    /// The initial twin to apply (the webhook's, else the enrollment's), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// The substatus the device is told.
    pub substatus: RegistrationSubstatus,
    /// What happens to its data.
    pub device_data: DeviceDataAction,
    /// The hub and device ID it was assigned before, when this registration moves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousAssignment>,
}

/// Where a device was before a registration moved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviousAssignment {
    /// The hub.
    pub hub: String,
    /// The device ID there.
    pub device_id: String,
}

/// Why a hub did not do what it was asked. Never holds a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RegistrarError {
    /// What happened, as a device may be told: what failed and the hub's status (`HTTP 401`,
    /// `cannot be reached`).
    pub message: String,
    /// The same with the hub's own words (the start of its answer, the connection error), for
    /// the operator's log (and devices with `allocation.expose_webhook_errors`).
    pub detail: Option<String>,
}

impl RegistrarError {
    /// An error with this message and nothing more to tell the operator.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), detail: None }
    }

    /// An error with a message for devices and a detail for the operator.
    pub fn with_detail(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { message: message.into(), detail: Some(detail.into()) }
    }

    /// The operator's version.
    pub fn detail(&self) -> &str {
        self.detail.as_deref().unwrap_or(&self.message)
    }
}

/// What a registration does when its hub's registrar fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// The registration fails (the device keeps its previous assignment) and says why.
    #[default]
    Fail,
    /// The registration is assigned anyway; the hub call is retried from the outbox until it
    /// succeeds.
    Tolerate,
}

/// The hub registrar: one per server, dispatching per hub.
#[async_trait]
pub trait HubRegistrar: Send + Sync {
    /// Whether `hub`'s registrar calls the hub (every registrar but `record`). A registration
    /// to a hub that is not called is not delayed at all.
    fn calls(&self, hub: &str) -> bool;

    /// Whether any hub's registrar calls its hub.
    fn calls_any(&self) -> bool;

    /// What a registration does when `hub`'s registrar fails.
    fn on_failure(&self, hub: &str) -> OnFailure;

    /// How long one [`HubRegistrar::register`] or [`HubRegistrar::remove`] may take, with its
    /// retries, at most (the deadline of an operation waiting for it counts on it).
    fn budget(&self) -> std::time::Duration;

    /// Creates or updates the device in its hub: idempotent (the same call twice leaves the
    /// hub as one call does).
    async fn register(&self, device: &HubDevice) -> Result<(), RegistrarError>;

    /// Removes the device from `hub` (a device that is not there counts as removed).
    async fn remove(&self, hub: &str, device_id: &str) -> Result<(), RegistrarError>;
}

/// A hub call the engine still owes: kept in the store ([`crate::store::Collection::HubOutbox`],
/// keyed by [`OutboxEntry::key`]) from the write that decided it until a hub did it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxEntry {
    /// The registration it belongs to.
    pub registration_id: String,
    /// What to do.
    pub work: HubWork,
    /// Failed attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not before (Unix ms).
    pub next_attempt_millis: i64,
    /// The last failure, for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A hub call owed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "action")]
pub enum HubWork {
    /// Create or update the device (a registration whose hub call failed and was tolerated).
    Register {
        /// The identity.
        device: Box<HubDevice>,
    },
    /// Remove the device from a hub it left.
    Remove {
        /// The hub.
        hub: String,
        /// The device ID there.
        device_id: String,
    },
    /// Nothing: work owed on this device and hub that a later registration made void (the
    /// drain deletes the entry). Written unconditionally, so that a registration never fails
    /// on the outbox's ETag moving under it.
    Void {
        /// The hub.
        hub: String,
        /// The device ID there.
        device_id: String,
    },
}

impl HubWork {
    /// The hub it concerns.
    pub fn hub(&self) -> &str {
        match self {
            HubWork::Register { device } => &device.hub,
            HubWork::Remove { hub, .. } | HubWork::Void { hub, .. } => hub,
        }
    }

    /// The device ID in that hub.
    pub fn device_id(&self) -> &str {
        match self {
            HubWork::Register { device } => &device.device_id,
            HubWork::Remove { device_id, .. } | HubWork::Void { device_id, .. } => device_id,
        }
    }
}

/// The outbox key of work on `device_id` in `hub`: one entry per device and hub, so later work
/// on the same device in the same hub replaces earlier work (the last decision is what the
/// hub must end with).
pub fn outbox_key(hub: &str, device_id: &str) -> String {
    // Device IDs are case-sensitive in a hub, store keys are not: the ID goes in as hex.
    let hex: String = device_id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{}/{hex}", hub.to_ascii_lowercase())
}

/// The wait before attempt `attempts + 1` of outbox work: 1 s doubling to 5 minutes.
pub fn retry_delay_millis(attempts: u32) -> i64 {
    1000i64.saturating_mul(1i64 << attempts.min(9)).min(300_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_to_five_minutes() {
        assert_eq!(retry_delay_millis(0), 1000);
        assert_eq!(retry_delay_millis(1), 2000);
        assert_eq!(retry_delay_millis(8), 256_000);
        assert_eq!(retry_delay_millis(9), 300_000);
        assert_eq!(retry_delay_millis(u32::MAX), 300_000);
    }

    #[test]
    fn keys_are_redacted_and_the_work_keyed_per_device_and_hub() {
        let auth = HubAuthentication::SymmetricKey { primary_key: "c2VjcmV0".into(), secondary_key: None };
        assert!(!format!("{auth:?}").contains("c2VjcmV0"));
        assert_eq!(auth.kind(), "sas");
        assert_eq!(outbox_key("Hub-1.test", "Dev"), "hub-1.test/446576");
        assert_ne!(outbox_key("h", "Dev").to_ascii_lowercase(), outbox_key("h", "dev").to_ascii_lowercase());
        let work = HubWork::Remove { hub: "h".into(), device_id: "d".into() };
        let text = serde_json::to_string(&work).unwrap();
        assert_eq!(text, r#"{"action":"remove","hub":"h","deviceId":"d"}"#);
        assert_eq!(serde_json::from_str::<HubWork>(&text).unwrap(), work);
    }
}
