//! Service (enrollment management) API JSON (docs/protocol-notes.md §9.2), field names exactly as on the
//! wire. Read-only fields sent by clients (dates, `registrationState`) are accepted and
//! ignored by the server, which sets them itself.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Allocation policy. Parsed case-insensitively (the CLI writes `geolatency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AllocationPolicy {
    /// Weighted hashing over the candidate hubs.
    Hashed,
    /// Lowest latency (configured regions on a self-hosted server).
    GeoLatency,
    /// The one hub the enrollment names.
    Static,
    /// A webhook or built-in rule set decides.
    Custom,
}

impl AllocationPolicy {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hashed => "hashed",
            Self::GeoLatency => "geoLatency",
            Self::Static => "static",
            Self::Custom => "custom",
        }
    }

    /// Parses a wire name case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Hashed, Self::GeoLatency, Self::Static, Self::Custom]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
}

impl Serialize for AllocationPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AllocationPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown allocationPolicy '{s}'; expected hashed, geoLatency, static or custom"
            ))
        })
    }
}

/// Whether an enrollment may provision devices. Parsed case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProvisioningStatus {
    /// Devices may register.
    #[default]
    Enabled,
    /// Devices get `disabled`.
    Disabled,
}

impl Serialize for ProvisioningStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        })
    }
}

impl<'de> Deserialize<'de> for ProvisioningStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.eq_ignore_ascii_case("enabled") {
            Ok(Self::Enabled)
        } else if s.eq_ignore_ascii_case("disabled") {
            Ok(Self::Disabled)
        } else {
            Err(serde::de::Error::custom(format!("unknown provisioningStatus '{s}'; expected enabled or disabled")))
        }
    }
}

/// Attestation type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttestationType {
    /// No attestation (not accepted for enrollments).
    None,
    /// TPM endorsement key.
    Tpm,
    /// X.509 certificates.
    X509,
    /// Symmetric keys.
    SymmetricKey,
}

/// `AttestationMechanism`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    /// Which mechanism.
    #[serde(rename = "type")]
    pub kind: AttestationType,
    /// TPM keys.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub tpm: Option<TpmAttestation>,
    /// X.509 certificates.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub x509: Option<X509Attestation>,
    /// Symmetric keys.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
}

pub use crate::device::TpmAttestation;

/// Symmetric-key attestation: base64 keys. Either may be omitted on create; the service
/// generates missing keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    /// Primary key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Secondary key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

/// X.509 attestation: exactly one of the three members is used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    /// Device (leaf) certificates, for individual enrollments.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub client_certificates: Option<X509Certificates>,
    /// Signing (intermediate or root) certificates, for groups.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub signing_certificates: Option<X509Certificates>,
    /// Names of verified service-level CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub ca_references: Option<X509CaReferences>,
}

/// Primary and secondary certificates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    /// Primary.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub primary: Option<X509CertificateWithInfo>,
    /// Secondary.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub secondary: Option<X509CertificateWithInfo>,
}

/// A certificate (PEM or base64 DER) with its parsed details (read-only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    /// The certificate; omitted in reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Parsed details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
}

/// Primary and secondary CA certificate names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CaReferences {
    /// Primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Secondary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

/// `capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    /// IoT Edge device.
    #[serde(default)]
    pub iot_edge: bool,
}

/// `reprovisionPolicy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    /// Re-run allocation on re-registration.
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    /// Move device data to the new hub.
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

/// `customAllocationDefinition`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    /// Webhook URL.
    pub webhook_url: String,
    /// Schema version for the enrollment objects sent to the webhook.
    pub api_version: String,
}

fn attestation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<AttestationMechanism, D::Error> {
    crate::json::object_named(d, "attestation")
}

/// The fields individual enrollments and groups share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentCommon {
    /// Attestation mechanism.
    #[serde(deserialize_with = "attestation")]
    pub attestation: AttestationMechanism,
    /// Capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Legacy single hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Initial device twin (`tags`, `properties.desired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    /// ETag (quoted string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Enabled or disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// Re-registration behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Created (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Last updated (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Allocation policy; the instance default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    /// Candidate hubs (subset of the linked hubs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Custom allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::json::optional_object")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
}

/// `IndividualEnrollment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    /// Registration ID.
    pub registration_id: String,
    /// Device ID in the hub; the registration ID when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Registration state (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<Value>,
    /// Free-form device information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: EnrollmentCommon,
}

/// `EnrollmentGroup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    /// Group ID.
    pub enrollment_group_id: String,
    /// Shared fields.
    #[serde(flatten)]
    pub common: EnrollmentCommon,
}

/// `DeviceRegistrationState` as the service API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationState {
    /// Registration ID.
    pub registration_id: String,
    /// Created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Assigned hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Device ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Status.
    pub status: crate::device::RegistrationStatus,
    /// Substatus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<crate::device::RegistrationSubstatus>,
    /// Error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Last updated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Payload returned to the device by custom allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// The initial twin applied at the last assignment (a dps-rs extension; clients ignore
    /// fields they do not know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
}

/// `QuerySpecification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuerySpecification {
    /// SQL-like query text, e.g. `SELECT * FROM enrollments`; not interpreted (Azure returns
    /// every enrollment or group whatever it says).
    #[serde(default)]
    pub query: String,
}

/// Bulk operation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BulkMode {
    /// Create; fails for records that exist.
    Create,
    /// Create or replace.
    Update,
    /// Replace only when the item's `etag` matches.
    UpdateIfMatchETag,
    /// Delete.
    Delete,
}

/// `BulkEnrollmentOperation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperation {
    /// Mode.
    pub mode: BulkMode,
    /// At most 10 enrollments.
    pub enrollments: Vec<Value>,
}

/// `BulkEnrollmentGroupOperation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperation {
    /// Mode.
    pub mode: BulkMode,
    /// At most 10 groups.
    pub enrollment_groups: Vec<Value>,
}

/// `BulkEnrollmentOperationResult` (also used for groups, with `enrollmentGroupId` errors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkOperationResult {
    /// True when every item succeeded.
    pub is_successful: bool,
    /// One entry per failed item.
    pub errors: Vec<BulkOperationError>,
}

/// One failed bulk item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkOperationError {
    /// The item's registration ID (enrollments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// The item's group ID (groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// DPS error code.
    pub error_code: u32,
    /// What went wrong.
    pub error_status: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn enrollment_round_trips_sdk_body() {
        let body = json!({"registrationId":"enr-sym-1","attestation":{"type":"symmetricKey","symmetricKey":{}},
            "deviceId":"dev-sym-1","provisioningStatus":"enabled",
            "initialTwin":{"tags":{"env":"test"},"properties":{"desired":{"x":1}}}});
        let e: IndividualEnrollment = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(e.common.attestation.kind, AttestationType::SymmetricKey);
        assert_eq!(e.common.provisioning_status, Some(ProvisioningStatus::Enabled));
        assert_eq!(serde_json::to_value(&e).unwrap(), body);
    }

    #[test]
    fn policies_parse_case_insensitively() {
        let p: AllocationPolicy = serde_json::from_value(json!("geolatency")).unwrap();
        assert_eq!(p, AllocationPolicy::GeoLatency);
        assert_eq!(serde_json::to_value(p).unwrap(), json!("geoLatency"));
        let s: ProvisioningStatus = serde_json::from_value(json!("Disabled")).unwrap();
        assert_eq!(s, ProvisioningStatus::Disabled);
        let err = serde_json::from_value::<AllocationPolicy>(json!("random")).unwrap_err().to_string();
        assert!(err.contains("hashed, geoLatency, static or custom"), "{err}");
    }

    #[test]
    fn group_and_bulk_shapes() {
        let g: EnrollmentGroup = serde_json::from_value(json!({"enrollmentGroupId":"g",
            "attestation":{"type":"symmetricKey"},"allocationPolicy":"hashed","iotHubs":["a","b"],
            "reprovisionPolicy":{"updateHubAssignment":false}}))
        .unwrap();
        assert_eq!(g.common.iot_hubs.as_deref(), Some(&["a".to_string(), "b".to_string()][..]));
        let rp = g.common.reprovision_policy.unwrap();
        assert!(!rp.update_hub_assignment && rp.migrate_device_data);
        let b: BulkEnrollmentOperation =
            serde_json::from_value(json!({"mode":"updateIfMatchETag","enrollments":[]})).unwrap();
        assert_eq!(b.mode, BulkMode::UpdateIfMatchETag);
    }
}
