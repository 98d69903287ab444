//! Custom allocation webhook JSON (docs/protocol-notes.md §8.2, §8.3).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What DPS posts to a custom allocation webhook (`AllocationRequest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRequest {
    /// The individual enrollment the device registered through, without secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub individual_enrollment: Option<Value>,
    /// The enrollment group the device registered through, without secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group: Option<Value>,
    /// Facts about the device and this registration.
    pub device_runtime_context: DeviceRuntimeContext,
    /// Hubs the webhook may choose from.
    pub linked_hubs: Vec<String>,
}

/// `deviceRuntimeContext`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRuntimeContext {
    /// Registration ID.
    pub registration_id: String,
    /// Hub the device is currently assigned to (re-registrations only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_iot_hub_host_name: Option<String>,
    /// Device ID in the current hub (re-registrations only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_device_id: Option<String>,
    /// Present (`{}`) for symmetric-key attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<Value>,
    /// X.509 details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<Value>,
    /// TPM keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    /// The device's registration payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// What a webhook answers (`AllocationResponse`). `returnData` and `data` are accepted as old
/// names of `payload`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationResponse {
    /// The chosen hub; must be one of `linkedHubs`.
    #[serde(default)]
    pub iot_hub_host_name: Option<String>,
    /// Initial twin; the enrollment's when absent.
    #[serde(default)]
    pub initial_twin: Option<Value>,
    /// Returned to the device as `registrationState.payload`.
    #[serde(default, alias = "returnData", alias = "data")]
    pub payload: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn response_aliases() {
        for field in ["payload", "returnData", "data"] {
            let r: AllocationResponse =
                serde_json::from_value(json!({"iotHubHostName": "h", field: {"a": 1}})).unwrap();
            assert_eq!(r.payload, Some(json!({"a": 1})), "{field}");
        }
        let r: AllocationResponse = serde_json::from_value(json!({})).unwrap();
        assert_eq!(r, AllocationResponse::default());
    }

    #[test]
    fn request_shape() {
        let req = AllocationRequest {
            individual_enrollment: None,
            enrollment_group: Some(json!({"enrollmentGroupId": "g"})),
            device_runtime_context: DeviceRuntimeContext {
                registration_id: "d".into(),
                current_iot_hub_host_name: None,
                current_device_id: None,
                symmetric_key: Some(json!({})),
                x509: None,
                tpm: None,
                payload: Some(json!({"m": 1})),
            },
            linked_hubs: vec!["a".into()],
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({"enrollmentGroup": {"enrollmentGroupId": "g"},
                   "deviceRuntimeContext": {"registrationId": "d", "symmetricKey": {}, "payload": {"m": 1}},
                   "linkedHubs": ["a"]})
        );
    }
}
