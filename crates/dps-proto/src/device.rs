//! Device runtime API JSON (docs/protocol-notes.md §3.4, §3.5): what a device sends to register and
//! what it gets back, over every transport.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The register request body (`DeviceRegistration`). Every field is optional on the wire:
/// C# MQTT/AMQP send an empty body and take the registration ID from the connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    /// Registration ID; when present it must equal the one in the path (case-insensitively).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// TPM keys (TPM attestation only).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub tpm: Option<TpmAttestation>,
    /// Device payload for custom allocation: any JSON value, passed on unchanged. `null`
    /// means absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Certificate signing request (2025-07-01-preview); not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// TPM endorsement and storage root keys as sent by a device (base64 TPM2B_PUBLIC); the same
/// shape as an enrollment's TPM attestation.
/// A TPM's public keys: in an enrollment's attestation, and in a TPM device's register
/// request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    /// Endorsement key (base64 TPM2B_PUBLIC).
    pub endorsement_key: String,
    /// Storage root key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

/// Registration status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationStatus {
    /// Not assigned (TPM challenge pending).
    Unassigned,
    /// Allocation in progress; poll the operation.
    Assigning,
    /// Assigned to a hub.
    Assigned,
    /// Allocation failed; see `errorCode` and `errorMessage`.
    Failed,
    /// The enrollment is disabled.
    Disabled,
}

impl RegistrationStatus {
    /// True for a final state (`assigned`, `failed`, `disabled`).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Assigned | Self::Failed | Self::Disabled)
    }
}

/// Substatus of an `assigned` registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationSubstatus {
    /// First assignment (or re-registration that changed nothing).
    InitialAssignment,
    /// Moved to a new hub with its data.
    DeviceDataMigrated,
    /// Moved or reset to the enrollment's initial configuration.
    DeviceDataReset,
    /// Moved back to a hub it was assigned to before.
    ReprovisionedToInitialAssignment,
}

/// `registrationState` (`DeviceRegistrationResult`): the device's view of its registration.
/// `registrationId` and `status` are always present (Java requires them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationResult {
    /// Registration ID as the device sent it.
    pub registration_id: String,
    /// When the registration record was first created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Assigned IoT hub host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Device ID in the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Status.
    pub status: RegistrationStatus,
    /// Substatus (with `assigned`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<RegistrationSubstatus>,
    /// Error code (with `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message (with `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// When the record last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// ETag of the registration record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Data returned by custom allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// TPM result (`authenticationKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    /// X.509 result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<Value>,
    /// Symmetric-key result (`enrollmentGroupId` for group members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<Value>,
}

impl DeviceRegistrationResult {
    /// A bare state with only the mandatory fields.
    pub fn bare(registration_id: &str, status: RegistrationStatus) -> Self {
        Self {
            registration_id: registration_id.to_string(),
            created_date_time_utc: None,
            assigned_hub: None,
            device_id: None,
            status,
            substatus: None,
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: None,
            etag: None,
            payload: None,
            tpm: None,
            x509: None,
            symmetric_key: None,
        }
    }
}

/// The register / poll response (`RegistrationOperationStatus`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationOperationStatus {
    /// Operation ID to poll.
    pub operation_id: String,
    /// Status.
    pub status: RegistrationStatus,
    /// Registration state; absent on the first `assigning` answer, as real DPS does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationResult>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_null_payload_is_absent() {
        let r: DeviceRegistration = serde_json::from_str(r#"{"payload": null, "registrationId": "d"}"#).unwrap();
        assert_eq!(r.payload, None);
        assert_eq!(r.registration_id.as_deref(), Some("d"));
        let empty: DeviceRegistration = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, DeviceRegistration::default());
    }

    #[test]
    fn assigned_state_shape() {
        let mut s = DeviceRegistrationResult::bare("d", RegistrationStatus::Assigned);
        s.assigned_hub = Some("h".into());
        s.device_id = Some("d".into());
        s.substatus = Some(RegistrationSubstatus::InitialAssignment);
        let op = RegistrationOperationStatus {
            operation_id: "5.a.b".into(),
            status: RegistrationStatus::Assigned,
            registration_state: Some(s),
        };
        assert_eq!(
            serde_json::to_value(&op).unwrap(),
            json!({"operationId":"5.a.b","status":"assigned","registrationState":{
                "registrationId":"d","assignedHub":"h","deviceId":"d","status":"assigned",
                "substatus":"initialAssignment"}})
        );
    }
}
