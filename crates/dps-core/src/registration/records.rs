//! What the engine stores for a registration: the registration state and the operation,
//! and the enrollment a device resolved to.

use dps_proto::device::{
    DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus, RegistrationSubstatus,
};
use dps_proto::service::{
    AttestationType, DeviceRegistrationState, EnrollmentCommon, EnrollmentGroup, IndividualEnrollment,
};
use dps_proto::timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::reprovision::{self};

/// The enrollment a device resolved to.
#[derive(Debug, Clone)]
pub enum ResolvedEnrollment {
    /// Individual enrollment.
    Individual(IndividualEnrollment),
    /// Enrollment group.
    Group(EnrollmentGroup),
}

impl ResolvedEnrollment {
    pub(super) fn common(&self) -> &EnrollmentCommon {
        match self {
            ResolvedEnrollment::Individual(e) => &e.common,
            ResolvedEnrollment::Group(g) => &g.common,
        }
    }

    /// The enrollment's attestation mechanism.
    pub fn attestation_type(&self) -> dps_proto::service::AttestationType {
        self.common().attestation.kind
    }

    pub(super) fn group_id(&self) -> Option<&str> {
        match self {
            ResolvedEnrollment::Group(g) => Some(&g.enrollment_group_id),
            ResolvedEnrollment::Individual(_) => None,
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            ResolvedEnrollment::Individual(e) => {
                format!("individual enrollment '{}'", e.registration_id)
            }
            ResolvedEnrollment::Group(g) => format!("enrollment group '{}'", g.enrollment_group_id),
        }
    }
}

/// The stored registration state of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    /// Registration ID as the device first spelled it.
    pub registration_id: String,
    /// Group the device registered through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// Attestation used.
    pub attestation: AttestationType,
    /// First registration (Unix ms).
    pub created_millis: i64,
    /// Last change (Unix ms).
    pub updated_millis: i64,
    /// Status of the last registration.
    pub status: RegistrationStatus,
    /// Substatus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<RegistrationSubstatus>,
    /// Assigned hub (kept after a failed re-registration as the current hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Device ID in the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Error code of a failed registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message of a failed registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// ETag.
    pub etag: String,
    /// Payload returned to the device (custom allocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Initial twin applied at assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// The first hub the device was ever assigned to (for `reprovisionedToInitialAssignment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_hub: Option<String>,
    /// Last operation.
    pub last_operation_id: String,
    /// TPM devices: the key the device proved it holds, which is its hub key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmHubKey>,
}

/// A TPM device's key as its registration records it: the HMAC key its TPM imported from the
/// challenge (the device's hub key: an IoT hub identity with symmetric-key authentication
/// and this primary key), and, while it is at hand, the blob that delivers it, which the
/// assigned answer carries as `registrationState.tpm.authenticationKey`.
///
/// The blob (1 KB of base64) is stored once, in the device's TPM challenge record, and not
/// again in the registration and operation records: with it those records outgrow what a
/// 4 KiB SQLite page keeps in a B-tree leaf and each took an overflow page of its own
/// (BENCHMARKS.md). Records written before still carry it, and it is read from them.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmHubKey {
    /// The blob (base64), for the device to import again: present in memory during the
    /// request that proved the key (from the challenge record), and in records written
    /// before it was left out of them; never written.
    #[serde(default, skip_serializing)]
    pub authentication_key: Option<String>,
    /// The key (base64). A secret: never in a service API answer.
    pub key: String,
}

impl std::fmt::Debug for TpmHubKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TpmHubKey(<redacted>)")
    }
}

impl TpmHubKey {
    /// A name for the key that does not reveal it (base64 of the first 16 bytes of the
    /// SHA-256 of its base64 text): an operation record keeps it to find the blob again.
    pub fn digest(&self) -> String {
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(&sha2::Sha256::digest(self.key.as_bytes())[..16])
    }

    /// `registrationState.tpm` of an assigned answer, when the blob is at hand.
    pub(super) fn answer(&self) -> Option<Value> {
        self.authentication_key.as_ref().map(|blob| serde_json::json!({ "authenticationKey": blob }))
    }
}

impl RegistrationRecord {
    /// The assignment this record holds, for the reprovisioning plan (none when the device is
    /// not assigned to a hub).
    pub fn current_assignment(&self) -> Option<reprovision::Current<'_>> {
        self.assigned_hub.as_deref().map(|hub| reprovision::Current {
            hub,
            first_hub: self.initial_hub.as_deref(),
            substatus: self.substatus,
        })
    }

    /// The device's view.
    pub fn to_device_result(&self) -> DeviceRegistrationResult {
        let assigned = self.status == RegistrationStatus::Assigned;
        DeviceRegistrationResult {
            registration_id: self.registration_id.clone(),
            created_date_time_utc: Some(timestamp::format_millis(self.created_millis)),
            assigned_hub: self.assigned_hub.clone().filter(|_| assigned),
            device_id: self.device_id.clone().filter(|_| assigned),
            status: self.status,
            substatus: self.substatus.filter(|_| assigned),
            error_code: self.error_code,
            error_message: self.error_message.clone(),
            last_updated_date_time_utc: Some(timestamp::format_millis(self.updated_millis)),
            etag: Some(self.etag.clone()),
            payload: self.payload.clone(),
            // protocol.md §6.6: every TPM client needs it in the assigned answer.
            // Absent when the blob is not at hand: `DeviceRuntime::restore_tpm_blob`.
            tpm: self.tpm.as_ref().filter(|_| assigned).and_then(TpmHubKey::answer),
            // docs/protocol-notes.md §7: `{}` or only the group ID (Java validates certificate infos).
            x509: match (self.attestation, &self.enrollment_group_id) {
                (AttestationType::X509, Some(g)) => Some(serde_json::json!({ "enrollmentGroupId": g })),
                (AttestationType::X509, None) => Some(serde_json::json!({})),
                _ => None,
            },
            symmetric_key: match (self.attestation, &self.enrollment_group_id) {
                (AttestationType::SymmetricKey, Some(g)) => Some(serde_json::json!({ "enrollmentGroupId": g })),
                _ => None,
            },
        }
    }

    /// The service API's view.
    pub fn to_service_state(&self) -> DeviceRegistrationState {
        let d = self.to_device_result();
        DeviceRegistrationState {
            registration_id: d.registration_id,
            created_date_time_utc: d.created_date_time_utc,
            assigned_hub: d.assigned_hub,
            device_id: d.device_id,
            status: d.status,
            substatus: d.substatus,
            error_code: d.error_code,
            error_message: d.error_message,
            last_updated_date_time_utc: d.last_updated_date_time_utc,
            etag: d.etag,
            payload: d.payload,
            initial_twin: self.initial_twin.clone().filter(|_| self.status == RegistrationStatus::Assigned),
        }
    }
}

/// A stored operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationRecord {
    /// Registration ID it belongs to.
    pub registration_id: String,
    /// Created (Unix ms).
    pub created_millis: i64,
    /// The device's payload, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_payload: Option<Value>,
    /// The answer.
    pub result: RegistrationOperationStatus,
    /// While `assigning`: when the allocation must have finished (Unix ms); past it, a poll
    /// reports the registration failed (the server stopped during the webhook call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_millis: Option<i64>,
    /// A TPM device's assigned operation: the [`TpmHubKey::digest`] of the key it proved.
    /// The answer's `registrationState.tpm.authenticationKey` is left out of the stored
    /// `result` and put back from the device's challenge record while that holds this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_key_digest: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned_tpm_record(body_tpm: Value) -> RegistrationRecord {
        serde_json::from_value(serde_json::json!({
            "registrationId": "tpm-1", "attestation": "tpm", "createdMillis": 1, "updatedMillis": 2,
            "status": "assigned", "substatus": "initialAssignment", "assignedHub": "hub-a.test",
            "deviceId": "tpm-1", "etag": "e1", "lastOperationId": "op-1", "tpm": body_tpm,
        }))
        .unwrap()
    }

    #[test]
    fn a_registration_record_keeps_the_tpm_key_but_not_its_blob() {
        let mut record = assigned_tpm_record(serde_json::json!({"key": "a2V5"}));
        record.tpm = Some(TpmHubKey { authentication_key: Some("YmxvYg==".into()), key: "a2V5".into() });
        // In memory (the request that proved the key) the answer has the blob ...
        assert_eq!(record.to_device_result().tpm, Some(serde_json::json!({"authenticationKey": "YmxvYg=="})));
        // ... the stored form does not.
        let stored = serde_json::to_value(&record).unwrap();
        assert_eq!(stored["tpm"], serde_json::json!({"key": "a2V5"}));
        let read: RegistrationRecord = serde_json::from_value(stored).unwrap();
        assert_eq!(read.tpm.as_ref().map(|k| k.key.as_str()), Some("a2V5"));
        assert_eq!(read.to_device_result().tpm, None, "put back by DeviceRuntime::restore_tpm_blob");
    }

    #[test]
    fn a_record_written_with_the_blob_still_answers_with_it() {
        let record = assigned_tpm_record(serde_json::json!({"authenticationKey": "YmxvYg==", "key": "a2V5"}));
        assert_eq!(record.to_device_result().tpm, Some(serde_json::json!({"authenticationKey": "YmxvYg=="})));
    }

    #[test]
    fn the_key_digest_names_the_key_without_showing_it() {
        let key = |k: &str| TpmHubKey { authentication_key: None, key: k.into() };
        let digest = key("c2VjcmV0LWtleS1ieXRlcw==").digest();
        assert_eq!(digest, key("c2VjcmV0LWtleS1ieXRlcw==").digest());
        assert_ne!(digest, key("b3RoZXI=").digest());
        assert!(!digest.contains("c2VjcmV0") && digest.len() == 24, "{digest}");
    }
}
