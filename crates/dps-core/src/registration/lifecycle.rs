//! The lifecycle event a registration writes with its record ([`crate::events`]).

use dps_proto::device::{RegistrationStatus, RegistrationSubstatus};
use dps_proto::service::AttestationType;
use serde::Serialize;

use super::RegistrationRecord;
use crate::error::Error;
use crate::events::{event, outbox_write, EventKind};
use crate::store::Write;

/// The `data` of a registration's event (docs/events.md): members without a value are left
/// out.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationData<'a> {
    registration_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    enrollment_group_id: Option<&'a str>,
    attestation: AttestationType,
    status: RegistrationStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    substatus: Option<RegistrationSubstatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assigned_hub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_hub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
    operation_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<&'a str>,
}

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
    let data = RegistrationData {
        registration_id: &record.registration_id,
        enrollment_group_id: record.enrollment_group_id.as_deref(),
        attestation: record.attestation,
        status: record.status,
        substatus: record.substatus,
        device_id: record.device_id.as_deref(),
        assigned_hub: record.assigned_hub.as_deref(),
        previous_hub: previous_hub.as_deref(),
        error_code: record.error_code,
        error_message: record.error_message.as_deref(),
        operation_id,
        etag: Some(&record.etag),
    };
    let subject = format!("registrations/{}", record.registration_id);
    outbox_write(event(scope, kind, subject, &data, now_millis)?)
}

/// The event of a registration refused because its enrollment is disabled (no record is
/// written for it; the operation tells the device).
pub(super) fn disabled_event(
    scope: &str,
    registration_id: &str,
    enrollment_group_id: Option<&str>,
    attestation: AttestationType,
    operation_id: &str,
    now_millis: i64,
) -> Result<Write, Error> {
    let data = RegistrationData {
        registration_id,
        enrollment_group_id,
        attestation,
        status: RegistrationStatus::Disabled,
        substatus: None,
        device_id: None,
        assigned_hub: None,
        previous_hub: None,
        error_code: None,
        error_message: None,
        operation_id,
        etag: None,
    };
    let subject = format!("registrations/{registration_id}");
    outbox_write(event(scope, EventKind::RegistrationDisabled, subject, &data, now_millis)?)
}
