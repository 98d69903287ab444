//! The allocation stage: a built-in policy, or the custom allocation hook (webhook or rule
//! set), for a device that is not staying on its hub.

use dps_proto::error::ErrorCode;
use dps_proto::service::{AllocationPolicy, AttestationType};
use dps_proto::webhook::{AllocationRequest, DeviceRuntimeContext};
use serde_json::Value;

use super::records::{RegistrationRecord, ResolvedEnrollment};
use super::register::{reprovision_policy, Pending};
use crate::allocation::{allocate, candidates, AllocationError};
use crate::custom::{check_answer, AllocationFailure, Assignment};
use crate::engine::DeviceRuntime;
use crate::enrollment::EnrollmentKind;
use crate::reprovision::{self};

/// An enrollment as a webhook sees it: the service JSON with the attestation reduced to its
/// type (no keys).
pub(super) fn webhook_view<R: EnrollmentKind>(record: &R) -> Value {
    let mut r = record.clone();
    let kind = r.common().attestation.kind;
    let common = r.common_mut();
    common.attestation.symmetric_key = None;
    common.attestation.tpm = None;
    common.attestation.x509 = None;
    common.attestation.kind = kind;
    serde_json::to_value(&r).unwrap_or(Value::Null)
}

impl DeviceRuntime {
    /// Chooses the hub: a built-in policy, or the custom allocation webhook. A device that is
    /// assigned already and whose enrollment says "never reprovision"
    /// (`updateHubAssignment: false`) stays on its hub; a webhook is then offered only that hub.
    pub(super) async fn choose(
        &self,
        pending: &Pending,
        previous: Option<&RegistrationRecord>,
    ) -> Result<Assignment, AllocationFailure> {
        let common = pending.enrollment.common();
        let policy = self.policy_of(&pending.enrollment);
        let current = Self::current_hub(pending, previous);
        let starting = current.and_then(RegistrationRecord::current_assignment);
        let stay = current.filter(|_| reprovision::stays(starting, &reprovision_policy(common)));
        let linked_hubs: Vec<String> = match stay.and_then(|p| p.assigned_hub.clone()) {
            Some(hub) if policy != AllocationPolicy::Custom => {
                return Ok(Assignment { hub, initial_twin: stay.and_then(|p| p.initial_twin.clone()), payload: None })
            }
            Some(hub) => vec![hub],
            None => {
                let (candidates, named) = candidates(
                    &self.settings.linked_hubs,
                    common.iot_hubs.as_deref(),
                    common.iot_hub_host_name.as_deref(),
                )
                .map_err(|e| {
                    AllocationFailure::no_hub(format!("allocation failed for {}: {e}", pending.enrollment.describe()))
                })?;
                if policy != AllocationPolicy::Custom {
                    let region = self.settings.region.as_deref();
                    let hub = allocate(policy, &candidates, named, &pending.registration_id, region).map_err(|e| {
                        AllocationFailure {
                            code: match e {
                                AllocationError::Unsupported(_) => ErrorCode::ALLOCATION_FAILED,
                                _ => ErrorCode::HUB_NOT_SPECIFIED,
                            },
                            message: format!("allocation failed for {}: {e}", pending.enrollment.describe()),
                            detail: None,
                        }
                    })?;
                    return Ok(Assignment {
                        hub: hub.host_name.clone(),
                        initial_twin: common.initial_twin.clone(),
                        payload: None,
                    });
                }
                candidates.iter().map(|h| h.host_name.clone()).collect()
            }
        };
        let definition = common.custom_allocation_definition.as_ref().ok_or_else(|| {
            AllocationFailure::failed(format!(
                "{} uses custom allocation but has no customAllocationDefinition",
                pending.enrollment.describe()
            ))
        })?;
        let hook = self
            .hook
            .as_ref()
            .ok_or_else(|| AllocationFailure::failed("custom allocation is not configured on this server"))?;
        let request = AllocationRequest {
            individual_enrollment: match &pending.enrollment {
                ResolvedEnrollment::Individual(e) => serde_json::to_value(webhook_view(e)).ok(),
                ResolvedEnrollment::Group(_) => None,
            },
            enrollment_group: match &pending.enrollment {
                ResolvedEnrollment::Group(g) => serde_json::to_value(webhook_view(g)).ok(),
                ResolvedEnrollment::Individual(_) => None,
            },
            device_runtime_context: DeviceRuntimeContext {
                registration_id: pending.registration_id.clone(),
                current_iot_hub_host_name: current.and_then(|p| p.assigned_hub.clone()),
                current_device_id: current.and_then(|p| p.device_id.clone()),
                symmetric_key: (common.attestation.kind == AttestationType::SymmetricKey)
                    .then(|| serde_json::json!({})),
                x509: pending.certificate.clone(),
                tpm: (common.attestation.kind == AttestationType::Tpm).then(|| serde_json::json!({})),
                payload: pending.payload.clone(),
            },
            linked_hubs: linked_hubs.clone(),
        };
        // A built-in rule set is the operator's own config, not a remote party: its answers and
        // errors are shown to the device as they are.
        let in_process = hook.answers_inline(&definition.webhook_url);
        let answer = hook
            .call(&definition.webhook_url, &request)
            .await
            .map_err(|e| AllocationFailure::from_hook(e, &pending.enrollment.describe(), in_process))?;
        check_answer(answer, &linked_hubs, common.initial_twin.as_ref()).map_err(|f| match f.detail {
            Some(detail) if in_process => AllocationFailure { code: f.code, message: detail, detail: None },
            _ => f,
        })
    }
}
