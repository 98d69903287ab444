//! The hub stage of a registration: after allocation and the reprovisioning plan, before the
//! registration state is written. The device's identity is created or updated in the hub it
//! gets (through the [`HubRegistrar`] port); a hub it left gets a removal, owed in the outbox
//! from the same write as the registration, so that a crash never leaves it in two hubs for
//! good nor missing from the one its registration names. A hub whose registrar only records
//! is never called.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::device::RegistrationStatus;
use dps_proto::error::ErrorCode;
use dps_proto::service::AttestationType;
use sha2::{Digest, Sha256};

use super::records::{RegistrationRecord, ResolvedEnrollment};
use super::register::{reprovision_policy, Pending};
use crate::custom::AllocationFailure;
use crate::engine::{to_json, DeviceRuntime};
use crate::error::Error;
use crate::registrar::{
    outbox_key, DeviceDataAction, HubAuthentication, HubDevice, HubWork, OnFailure, OutboxEntry, PreviousAssignment,
};
use crate::reprovision::{self, DeviceData};
use crate::store::{Collection, Condition, Document, Write};

/// What the hub stage came to.
pub(super) struct HubOutcome {
    /// The registration failed at the hub (and is not tolerated): it is recorded failed, the
    /// device keeps its previous assignment.
    pub(super) failure: Option<AllocationFailure>,
    /// Outbox writes to commit with the registration: work owed to hubs, and work on the new
    /// hub that this registration makes void.
    pub(super) writes: Vec<Write>,
}

impl HubOutcome {
    pub(super) fn nothing() -> Self {
        Self { failure: None, writes: Vec::new() }
    }
}

/// SHA-256 of a DER certificate, as IoT Hub takes a thumbprint (upper-case hex).
pub(super) fn thumbprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect()
}

impl DeviceRuntime {
    /// Runs the hub stage for `record` (built from `previous` and the allocation outcome).
    pub(super) async fn register_in_hub(
        &self,
        pending: &Pending,
        previous: Option<&RegistrationRecord>,
        record: &RegistrationRecord,
    ) -> Result<HubOutcome, Error> {
        let Some(registrar) = self.registrar.clone() else { return Ok(HubOutcome::nothing()) };
        let (RegistrationStatus::Assigned, Some(hub), Some(device_id)) =
            (record.status, record.assigned_hub.as_deref(), record.device_id.as_deref())
        else {
            return Ok(HubOutcome::nothing());
        };
        // The assignment the device's data starts from (none when forced)…
        let current = Self::current_hub(pending, previous);
        // …and the one it leaves, whatever `forceRegistration` says.
        let left = previous
            .and_then(|p| p.assigned_hub.as_deref().zip(p.device_id.as_deref()))
            .filter(|(h, d)| !h.eq_ignore_ascii_case(hub) || *d != device_id)
            .map(|(h, d)| PreviousAssignment { hub: h.to_string(), device_id: d.to_string() });
        let now = self.clock.now_millis();
        let removal = match left.as_ref().filter(|p| registrar.calls(&p.hub)) {
            Some(p) => vec![outbox_put(
                &pending.registration_id,
                HubWork::Remove { hub: p.hub.clone(), device_id: p.device_id.clone() },
                now,
            )?],
            None => Vec::new(),
        };
        if !registrar.calls(hub) {
            return Ok(HubOutcome { failure: None, writes: removal });
        }
        let device = self.hub_device(pending, current, record, hub, device_id, left)?;
        let owed = match self.store.get(Collection::HubOutbox, &outbox_key(hub, device_id)).await? {
            Some(doc) => serde_json::from_str::<OutboxEntry>(&doc.body).ok().map(|e| e.work),
            None => None,
        };
        match registrar.register(&device).await {
            Ok(()) => {
                tracing::info!(registration_id = %pending.registration_id, hub, device_id, "device registered in its hub");
                let mut writes = removal;
                // Work still owed on this device in this hub from an earlier registration must
                // not run after this one. A removal may be under way at this very moment: it
                // is replaced by a repair (this registration once more, after the registrar's
                // budget), so that the device is in its hub even if that removal lands last.
                match owed {
                    None => {}
                    Some(HubWork::Remove { .. }) => {
                        let mut repair = device.clone();
                        repair.previous = None;
                        let budget = i64::try_from(registrar.budget().as_millis()).unwrap_or(i64::MAX / 2);
                        let mut entry =
                            outbox_entry(&pending.registration_id, HubWork::Register { device: Box::new(repair) }, now);
                        entry.next_attempt_millis = now.saturating_add(budget);
                        writes.push(outbox_write(entry)?);
                    }
                    Some(_) => writes.push(outbox_put(
                        &pending.registration_id,
                        HubWork::Void { hub: hub.to_string(), device_id: device_id.to_string() },
                        now,
                    )?),
                }
                Ok(HubOutcome { failure: None, writes })
            }
            Err(e) => match registrar.on_failure(hub) {
                OnFailure::Fail => {
                    tracing::warn!(registration_id = %pending.registration_id, operation_id = %pending.operation_id,
                        hub, error = %e.detail(), "hub registration failed; the registration fails");
                    // The device stays where it was. A hub it was moving to may hold part of
                    // it (an identity whose twin could not be written): removed, unless that
                    // hub is where the device is now.
                    let stays_there = previous.is_some_and(|c| {
                        c.assigned_hub.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(hub))
                            && c.device_id.as_deref() == Some(device_id)
                    });
                    let writes = match stays_there {
                        true => Vec::new(),
                        false => vec![outbox_put(
                            &pending.registration_id,
                            HubWork::Remove { hub: hub.to_string(), device_id: device_id.to_string() },
                            now,
                        )?],
                    };
                    Ok(HubOutcome {
                        failure: Some(AllocationFailure {
                            code: ErrorCode::HUB_REGISTRATION_FAILED,
                            message: format!("the IoT hub '{hub}' did not register the device: {}", e.message),
                            detail: Some(format!("the IoT hub '{hub}' did not register the device: {}", e.detail())),
                        }),
                        writes,
                    })
                }
                OnFailure::Tolerate => {
                    tracing::warn!(registration_id = %pending.registration_id, hub, error = %e.detail(),
                        "hub registration failed; tolerated, retried from the outbox");
                    // The device leaves its old hub only once the new one has it (the drain
                    // queues that removal after this registration succeeds): a migration
                    // still finds its data there.
                    let mut entry =
                        outbox_entry(&pending.registration_id, HubWork::Register { device: Box::new(device) }, now);
                    entry.attempts = 1;
                    entry.next_attempt_millis = now.saturating_add(crate::registrar::retry_delay_millis(0));
                    entry.last_error = Some(e.detail().to_string());
                    Ok(HubOutcome { failure: None, writes: vec![outbox_write(entry)?] })
                }
            },
        }
    }

    /// When the registration state changed between the hub stage and the write (another
    /// registration of the device committed first): the removal from the hub that
    /// registration put the device in, unless it is where `record` puts it or where the hub
    /// stage started from (whose removal is already owed).
    pub(super) fn removal_after_race(
        &self,
        pending: &Pending,
        first: Option<&RegistrationRecord>,
        now: Option<&RegistrationRecord>,
        record: &RegistrationRecord,
    ) -> Result<Option<Write>, Error> {
        let Some(registrar) = self.registrar.as_ref() else { return Ok(None) };
        let place = |r: Option<&RegistrationRecord>| {
            r.and_then(|r| r.assigned_hub.as_deref().zip(r.device_id.as_deref()))
                .map(|(h, d)| (h.to_ascii_lowercase(), d.to_string()))
        };
        let Some((hub, device_id)) = place(now) else { return Ok(None) };
        let same = |p: Option<(String, String)>| p.is_some_and(|p| p == (hub.clone(), device_id.clone()));
        if same(place(first)) || same(place(Some(record))) || !registrar.calls(&hub) {
            return Ok(None);
        }
        let work = HubWork::Remove { hub, device_id };
        outbox_put(&pending.registration_id, work, self.clock.now_millis()).map(Some)
    }

    /// The identity `record` gives its hub.
    fn hub_device(
        &self,
        pending: &Pending,
        current: Option<&RegistrationRecord>,
        record: &RegistrationRecord,
        hub: &str,
        device_id: &str,
        previous: Option<PreviousAssignment>,
    ) -> Result<HubDevice, Error> {
        let common = pending.enrollment.common();
        let device_data = match current.and_then(RegistrationRecord::current_assignment) {
            None => DeviceDataAction::Initial,
            Some(c) => match reprovision::plan(Some(c), hub, &reprovision_policy(common)).device_data {
                DeviceData::Keep => DeviceDataAction::Keep,
                DeviceData::Fresh => DeviceDataAction::Reset,
            },
        };
        let attestation = match common.attestation.kind {
            AttestationType::SymmetricKey => "symmetricKey",
            AttestationType::X509 => "x509",
            AttestationType::Tpm => "tpm",
            AttestationType::None => "none",
        };
        Ok(HubDevice {
            hub: hub.to_string(),
            device_id: device_id.to_string(),
            registration_id: pending.registration_id.clone(),
            enrollment_group_id: pending.enrollment.group_id().map(str::to_string),
            attestation: attestation.to_string(),
            authentication: self.hub_authentication(pending)?,
            iot_edge: common.capabilities.as_ref().is_some_and(|c| c.iot_edge),
            initial_twin: record.initial_twin.clone(),
            substatus: record.substatus.unwrap_or(dps_proto::device::RegistrationSubstatus::InitialAssignment),
            device_data,
            previous,
        })
    }

    /// How the device authenticates to its hub: with what it proved here.
    fn hub_authentication(&self, pending: &Pending) -> Result<HubAuthentication, Error> {
        let common = pending.enrollment.common();
        let missing =
            |what: &str| Error::Internal(format!("{} has no {what} for its hub", pending.enrollment.describe()));
        match common.attestation.kind {
            AttestationType::Tpm => {
                let key = pending.tpm.as_ref().ok_or_else(|| missing("TPM key"))?;
                Ok(HubAuthentication::SymmetricKey { primary_key: key.key.clone(), secondary_key: None })
            }
            AttestationType::X509 => match &pending.enrollment {
                ResolvedEnrollment::Group(_) => Ok(HubAuthentication::CertificateAuthority),
                ResolvedEnrollment::Individual(_) => Ok(HubAuthentication::X509Thumbprint {
                    primary_thumbprint: pending.leaf_thumbprint.clone().ok_or_else(|| missing("certificate"))?,
                }),
            },
            AttestationType::SymmetricKey => {
                let keys = common.attestation.symmetric_key.as_ref().ok_or_else(|| missing("symmetric key"))?;
                let device_key = |k: &Option<String>| -> Option<String> {
                    let k = k.as_deref()?;
                    match &pending.enrollment {
                        ResolvedEnrollment::Individual(_) => Some(k.to_string()),
                        ResolvedEnrollment::Group(_) => BASE64.decode(k).ok().map(|group_key| {
                            BASE64.encode(dps_proto::sas::derive_device_key(&group_key, &pending.registration_id))
                        }),
                    }
                };
                Ok(HubAuthentication::SymmetricKey {
                    primary_key: device_key(&keys.primary_key).ok_or_else(|| missing("primary key"))?,
                    secondary_key: device_key(&keys.secondary_key),
                })
            }
            AttestationType::None => Err(missing("attestation")),
        }
    }
}

fn outbox_entry(registration_id: &str, work: HubWork, now: i64) -> OutboxEntry {
    OutboxEntry {
        registration_id: registration_id.to_string(),
        work,
        attempts: 0,
        next_attempt_millis: now,
        last_error: None,
    }
}

fn outbox_put(registration_id: &str, work: HubWork, now: i64) -> Result<Write, Error> {
    outbox_write(outbox_entry(registration_id, work, now))
}

/// The write that puts `entry` in the outbox, replacing work owed on the same device and hub.
pub(crate) fn outbox_write(entry: OutboxEntry) -> Result<Write, Error> {
    Ok(Write::Put {
        collection: Collection::HubOutbox,
        document: Document {
            id: outbox_key(entry.work.hub(), entry.work.device_id()),
            etag: crate::etag::new_registration_etag(),
            partition: None,
            body: to_json(&entry)?,
            expires_at: None,
        },
        condition: Condition::Always,
    })
}
