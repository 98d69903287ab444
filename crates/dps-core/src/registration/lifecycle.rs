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
    let previous_hub = before.filter(|b| b.status == RegistrationStatus::Assigned).and_then(|b| b.assigned_hub.clone());
    let kind = match record.status {
        RegistrationStatus::Failed => EventKind::RegistrationFailed,
        RegistrationStatus::Disabled => EventKind::RegistrationDisabled,
        _ => {
            let moved = previous_hub.is_some() && previous_hub != record.assigned_hub;
            let data_changed = !matches!(record.substatus, None | Some(RegistrationSubstatus::InitialAssignment));
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
