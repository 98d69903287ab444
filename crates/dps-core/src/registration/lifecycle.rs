//! The lifecycle event a registration writes with its record ([`crate::events`]).

use dps_proto::device::{RegistrationStatus, RegistrationSubstatus};
use serde_json::json;

use super::RegistrationRecord;
use crate::error::Error;
use crate::events::{event, outbox_write, EventKind};
use crate::store::Write;

/// The event of a registration whose record is `record`, `before` being the record it
/// replaces.
pub(super) fn registration_event(
    scope: &str,
    record: &RegistrationRecord,
    before: Option<&RegistrationRecord>,
    operation_id: &str,
    now_millis: i64,
) -> Result<Write, Error> {
    // The hub the device was on before: a failed registration keeps it as the current hub.
    let previous_hub = before.and_then(|b| b.current_assignment()).map(|c| c.hub.to_string());
    let kind = match record.status {
        RegistrationStatus::Failed => EventKind::RegistrationFailed,
        RegistrationStatus::Disabled => EventKind::RegistrationDisabled,
        _ => {
            let moved = previous_hub
                .as_deref()
                .is_some_and(|p| !record.assigned_hub.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(p)));
            // A substatus this registration set (one kept from an earlier move does not count).
            let data_changed = !matches!(record.substatus, None | Some(RegistrationSubstatus::InitialAssignment))
                && before.is_some_and(|b| b.status != RegistrationStatus::Assigned || b.substatus != record.substatus);
            if previous_hub.is_some() && (moved || data_changed) {
                EventKind::RegistrationReprovisioned
            } else {
                EventKind::RegistrationAssigned
            }
        }
    };
    let data = json!({
        "registrationId": record.registration_id,
        "enrollmentGroupId": record.enrollment_group_id,
        "attestation": record.attestation,
        "status": record.status,
        "substatus": record.substatus,
        "deviceId": record.device_id,
        "assignedHub": record.assigned_hub,
        "previousHub": previous_hub,
        "errorCode": record.error_code,
        "errorMessage": record.error_message,
        "operationId": operation_id,
        "etag": record.etag,
    });
    outbox_write(&event(scope, kind, format!("registrations/{}", record.registration_id), data, now_millis))
}

/// The event of a registration refused because its enrollment is disabled (no record is
/// written for it; the operation tells the device).
pub(super) fn disabled_event(
    scope: &str,
    registration_id: &str,
    enrollment_group_id: Option<&str>,
    attestation: dps_proto::service::AttestationType,
    operation_id: &str,
    now_millis: i64,
) -> Result<Write, Error> {
    let data = json!({
        "registrationId": registration_id,
        "enrollmentGroupId": enrollment_group_id,
        "attestation": attestation,
        "status": RegistrationStatus::Disabled,
        "operationId": operation_id,
    });
    let subject = format!("registrations/{registration_id}");
    outbox_write(&event(scope, EventKind::RegistrationDisabled, subject, data, now_millis))
}
