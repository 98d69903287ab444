//! The register path: parse and check the request, authenticate, allocate, apply the
//! reprovisioning plan, and persist the registration state and the operation in one write.

use dps_proto::device::{
    DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus,
    RegistrationSubstatus,
};
use dps_proto::error::ErrorCode;
use dps_proto::ids::id_key;
use dps_proto::service::{AllocationPolicy, EnrollmentCommon, ProvisioningStatus, ReprovisionPolicy};
use serde_json::Value;

use super::authenticate::{AuthenticatedDevice, Challenge, Credential, Proven, Resolved, TpmEndorsement};
use super::hub::HubOutcome;
use super::records::{OperationRecord, RegistrationRecord, ResolvedEnrollment, TpmHubKey};
use crate::custom::{AllocationFailure, Assignment};
use crate::engine::{parse_body, parse_stored, to_json, DeviceRuntime};
use crate::error::Error;
use crate::etag::new_registration_etag;
use crate::reprovision::{self, DeviceData};
use crate::store::{Collection, Condition, Document, StoreError, Write};

/// A register request, transport-independent.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    /// ID scope from the path / username / link.
    pub id_scope: String,
    /// Registration ID from the path / username / link (already percent-decoded).
    pub registration_id: String,
    /// Credential.
    pub credential: Credential,
    /// Raw JSON body (may be empty).
    pub body: Vec<u8>,
    /// `forceRegistration` was requested.
    pub force: bool,
}

/// What to send back to a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReply {
    /// Response body.
    pub operation: RegistrationOperationStatus,
    /// `retry-after` seconds when the device should poll.
    pub retry_after: Option<u32>,
    /// The attestation mechanism of the enrollment the device registered with (register
    /// answers; not sent, for metrics).
    pub attestation: Option<dps_proto::service::AttestationType>,
}

/// What a register request comes to when it is not refused.
#[derive(Debug, Clone)]
// Returned once per request and matched at once: boxing the common variant would cost an
// allocation per registration to save stack space for the rare one.
#[allow(clippy::large_enum_variant)]
pub enum Registered {
    /// The registration went ahead: the answer for the device.
    Reply(DeviceReply),
    /// The device must first answer a challenge (TPM); the transport sends it.
    Challenge(Challenge),
}

/// A registration between authentication and its final record.
pub(super) struct Pending {
    pub(super) registration_id: String,
    pub(super) force: bool,
    pub(super) enrollment: ResolvedEnrollment,
    pub(super) operation_id: String,
    pub(super) payload: Option<Value>,
    /// `deviceRuntimeContext.x509` for X.509 devices.
    pub(super) certificate: Option<Value>,
    /// TPM devices: the key they proved they hold (their hub key).
    pub(super) tpm: Option<TpmHubKey>,
    /// X.509 devices: the thumbprint of the certificate they presented (their hub
    /// authentication, for individual enrollments).
    pub(super) leaf_thumbprint: Option<String>,
    pub(super) started: i64,
}

/// The webhook's (and the rules') view of an X.509 device: the leaf's `X509CertificateInfo`
/// and the next certificate in the chain it presented, if any.
pub(super) fn x509_context(chain: &[Vec<u8>]) -> Value {
    let info =
        |der: Option<&Vec<u8>>| der.and_then(|d| crate::x509::facts(d).ok()).map(|f| f.info()).unwrap_or(Value::Null);
    serde_json::json!({
        "certificateInfo": info(chain.first()),
        "signingCertificateInfo": info(chain.get(1)),
    })
}

impl Pending {
    pub(super) fn operation(
        &self,
        result: RegistrationOperationStatus,
        deadline_millis: Option<i64>,
    ) -> OperationRecord {
        // The blob of an assigned TPM answer is kept once, in the challenge record
        // (`TpmHubKey`): the operation names the key instead.
        let mut result = result;
        let tpm_key_digest = match (result.registration_state.as_mut(), &self.tpm) {
            (Some(state), Some(key)) => state.tpm.take().map(|_| key.digest()),
            _ => None,
        };
        OperationRecord {
            registration_id: self.registration_id.clone(),
            created_millis: self.started,
            device_payload: self.payload.clone(),
            result,
            deadline_millis,
            tpm_key_digest,
        }
    }
}

/// The enrollment's reprovision policy; both flags default to true.
pub(super) fn reprovision_policy(common: &EnrollmentCommon) -> ReprovisionPolicy {
    common
        .reprovision_policy
        .clone()
        .unwrap_or(ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: true })
}

impl DeviceRuntime {
    /// The device payload: any JSON value (object, string, array, number, boolean), passed
    /// on unchanged; `null` or absent means none. Bounded by `max_payload_bytes`.
    pub(super) fn check_payload(&self, payload: Option<Value>) -> Result<Option<Value>, Error> {
        match payload {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let size = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(usize::MAX);
                if size > self.settings.max_payload_bytes {
                    return Err(Error::bad_request(
                        ErrorCode::INVALID_PAYLOAD,
                        format!("the payload is {size} bytes; the limit is {} bytes", self.settings.max_payload_bytes),
                    ));
                }
                Ok(Some(v))
            }
        }
    }

    pub(super) fn parse_registration_body(
        &self,
        registration_id: &str,
        body: &[u8],
    ) -> Result<DeviceRegistration, Error> {
        let trimmed = body.iter().copied().skip_while(u8::is_ascii_whitespace).count();
        if trimmed == 0 {
            return Ok(DeviceRegistration::default());
        }
        let reg: DeviceRegistration = parse_body(body, "device registration (JSON)")?;
        if let Some(id) = &reg.registration_id {
            if !id.eq_ignore_ascii_case(registration_id) {
                return Err(Error::bad_request(
                    ErrorCode::INVALID_ARGUMENT,
                    format!(
                        "registrationId in the body ('{id}') does not match the one in the path ('{registration_id}')"
                    ),
                ));
            }
        }
        if reg.csr.is_some() {
            return Err(Error::bad_request(
                ErrorCode::INVALID_ARGUMENT,
                "certificate signing requests (csr) are not supported by this server",
            ));
        }
        Ok(reg)
    }

    pub(super) fn new_operation_id(&self) -> String {
        // UUIDv7: time-ordered, so new operations land at the end of the store's index
        // instead of on a random page each (far fewer pages written per commit).
        format!("{}.{}", self.operation_prefix, uuid::Uuid::now_v7())
    }

    /// Registers a device. Always answers (the transport sends 202) unless the request is
    /// malformed or unauthenticated. Custom allocation runs in a task of its own: when the
    /// webhook answers within `webhook_inline_wait_ms` the device gets the final state, else
    /// `assigning`, and the task records the result for the device's polls.
    ///
    /// A TPM device's first request (its `tpm` keys in the body, no token) gets a
    /// [`Registered::Challenge`] instead.
    pub async fn register(&self, req: RegisterRequest) -> Result<Registered, Error> {
        self.check_scope_and_id(&req.id_scope, &req.registration_id)?;
        let body = self.parse_registration_body(&req.registration_id, &req.body)?;
        let payload = self.check_payload(body.payload)?;
        let credential = match (req.credential, body.tpm) {
            (Credential::None, Some(tpm)) => Credential::TpmEndorsement(TpmEndorsement {
                endorsement_key: tpm.endorsement_key,
                storage_root_key: tpm.storage_root_key,
            }),
            (credential, _) => credential,
        };
        // The authentication stage as `authenticate_device` runs it, without building the
        // `AuthenticatedDevice` a one-request transport would throw away.
        let proven = match self.authenticate_or_challenge(&req.id_scope, &req.registration_id, &credential).await? {
            Resolved::Enrollment(proven) => proven,
            Resolved::Challenge(challenge) => return Ok(Registered::Challenge(challenge)),
        };
        let attestation = proven.enrollment.attestation_type();
        let mut reply = self.register_enrollment(req.registration_id, &credential, proven, payload, req.force).await?;
        reply.attestation = Some(attestation);
        Ok(Registered::Reply(reply))
    }

    /// Registers a device that authenticated when it connected (MQTT, AMQP): as
    /// [`DeviceRuntime::register`], with the credential re-checked only as far as something changed
    /// (see [`AuthenticatedDevice`]). No `forceRegistration` (MQTT has none; AMQP: see
    /// [`DeviceRuntime::register_device_forced`]).
    pub async fn register_device(&self, device: &mut AuthenticatedDevice, body: &[u8]) -> Result<DeviceReply, Error> {
        self.register_device_forced(device, body, false).await
    }

    /// [`DeviceRuntime::register_device`] with `forceRegistration` (AMQP's
    /// `iotdps-forceRegistration`): reprovision even when nothing changed.
    pub async fn register_device_forced(
        &self,
        device: &mut AuthenticatedDevice,
        body: &[u8],
        force: bool,
    ) -> Result<DeviceReply, Error> {
        let registration_id = device.registration_id().to_string();
        let parsed = self.parse_registration_body(&registration_id, body)?;
        let payload = self.check_payload(parsed.payload)?;
        let proven = self.recheck(device).await?;
        let attestation = proven.enrollment.attestation_type();
        let mut reply = self.register_enrollment(registration_id, device.credential(), proven, payload, force).await?;
        reply.attestation = Some(attestation);
        Ok(reply)
    }

    /// The register path after authentication.
    async fn register_enrollment(
        &self,
        registration_id: String,
        credential: &Credential,
        proven: Proven,
        payload: Option<Value>,
        force: bool,
    ) -> Result<DeviceReply, Error> {
        let Proven { enrollment, tpm_key } = proven;
        self.admit(&registration_id, true)?;
        let operation_id = self.new_operation_id();
        let now = self.clock.now_millis();
        let (certificate, leaf_thumbprint) = match credential {
            Credential::X509(chain) => {
                (Some(x509_context(chain)), chain.first().map(|der| super::hub::thumbprint(der)))
            }
            _ => (None, None),
        };
        let pending = Pending {
            registration_id,
            force,
            enrollment,
            operation_id,
            payload,
            certificate,
            tpm: tpm_key,
            leaf_thumbprint,
            started: now,
        };

        if pending.enrollment.common().provisioning_status == Some(ProvisioningStatus::Disabled) {
            tracing::info!(registration_id = %pending.registration_id, enrollment = %pending.enrollment.describe(), "registration refused: enrollment disabled");
            let result = RegistrationOperationStatus {
                operation_id: pending.operation_id.clone(),
                status: RegistrationStatus::Disabled,
                registration_state: Some(DeviceRegistrationResult::bare(
                    &pending.registration_id,
                    RegistrationStatus::Disabled,
                )),
            };
            let op = pending.operation(result, None);
            let mut writes = vec![self.put_operation(&pending.operation_id, &op, Condition::IfAbsent)?];
            if self.settings.lifecycle_events {
                writes.push(super::lifecycle::disabled_event(
                    &self.settings.id_scope,
                    &pending.registration_id,
                    pending.enrollment.group_id(),
                    pending.enrollment.attestation_type(),
                    &pending.operation_id,
                    self.clock.now_millis(),
                )?);
            }
            self.store.write(writes).await?;
            return Ok(self.reply_for_register(op.result));
        }
        // Built-in policies and in-process rule sets finish here: one write.
        let inline = || {
            let definition = pending.enrollment.common().custom_allocation_definition.as_ref();
            self.hook.as_ref().zip(definition).is_some_and(|(hook, d)| hook.answers_inline(&d.webhook_url))
        };
        let hub_calls = self.registrar.as_ref().is_some_and(|r| r.calls_any());
        if (self.policy_of(&pending.enrollment) != AllocationPolicy::Custom || inline()) && !hub_calls {
            let result = self.complete(&pending, Condition::IfAbsent).await?;
            return Ok(self.reply_for_register(result));
        }

        // A webhook or a hub registrar: the slow step of this registration.
        let result = self
            .finish_slow_step(pending, now, |engine, pending| async move {
                engine.complete(&pending, Condition::Always).await
            })
            .await?;
        Ok(self.reply_for_register(result))
    }

    pub(super) fn policy_of(&self, enrollment: &ResolvedEnrollment) -> AllocationPolicy {
        enrollment.common().allocation_policy.unwrap_or(self.settings.default_allocation_policy)
    }

    /// Allocates, then writes the registration state and the final operation atomically
    /// (retrying the write, not the allocation, when another registration of the same
    /// device got in between).
    pub(super) async fn complete(
        &self,
        pending: &Pending,
        op_condition: Condition,
    ) -> Result<RegistrationOperationStatus, Error> {
        let previous = self.load_registration_doc(&pending.registration_id).await?;
        let mut outcome = self.choose(pending, previous.as_ref().map(|(_, r)| r)).await;
        if let Err(AllocationFailure { detail: Some(detail), .. }) = &outcome {
            // For the operator: what the webhook said, under the ID the device was given.
            tracing::warn!(registration_id = %pending.registration_id, operation_id = %pending.operation_id,
                detail = %detail, "custom allocation failed");
        }
        let hub = match self.registrar {
            // Without a registrar (every hub records only) there is no hub stage at all.
            None => HubOutcome::nothing(),
            Some(_) => {
                let planned = self.build_record(pending, previous.as_ref().map(|(_, r)| r), &outcome);
                self.register_in_hub(pending, previous.as_ref().map(|(_, r)| r), &planned).await?
            }
        };
        if let Some(failure) = hub.failure {
            outcome = Err(failure);
        }
        let first = previous.as_ref().map(|(_, r)| r.clone());
        let mut current = previous;
        for _ in 0..5 {
            let record = self.build_record(pending, current.as_ref().map(|(_, r)| r), &outcome);
            let result = RegistrationOperationStatus {
                operation_id: pending.operation_id.clone(),
                status: record.status,
                registration_state: Some(record.to_device_result()),
            };
            let op = pending.operation(result.clone(), None);
            let registration = Document {
                id: record.registration_id.clone(),
                etag: record.etag.clone(),
                partition: record.enrollment_group_id.as_deref().map(id_key),
                body: to_json(&record)?,
                expires_at: None,
            };
            let condition = match &current {
                Some((etag, _)) => Condition::IfMatch(etag.clone()),
                None => Condition::IfAbsent,
            };
            let mut writes = vec![
                Write::Put { collection: Collection::Registrations, document: registration, condition },
                self.put_operation(&pending.operation_id, &op, op_condition.clone())?,
            ];
            writes.extend(hub.writes.iter().cloned());
            if self.settings.lifecycle_events {
                writes.push(super::lifecycle::registration_event(
                    &self.settings.id_scope,
                    &record,
                    current.as_ref().map(|(_, r)| r),
                    &pending.operation_id,
                    self.clock.now_millis(),
                )?);
            }
            // Another registration of the device got in first and put it elsewhere: it leaves
            // that hub too.
            if let Some(w) =
                self.removal_after_race(pending, first.as_ref(), current.as_ref().map(|(_, r)| r), &record)?
            {
                writes.push(w);
            }
            match self.store.write(writes).await {
                Ok(()) => {
                    tracing::info!(registration_id = %pending.registration_id, enrollment = %pending.enrollment.describe(),
                        status = ?record.status, hub = record.assigned_hub.as_deref().unwrap_or("-"),
                        error_code = record.error_code.unwrap_or(0), "registration");
                    return Ok(result);
                }
                Err(StoreError::PreconditionFailed(_) | StoreError::AlreadyExists(_)) => {
                    current = self.load_registration_doc(&pending.registration_id).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable(format!(
            "registration ID '{}' is being registered by several requests at once; retry",
            pending.registration_id
        )))
    }

    pub(super) async fn load_registration_doc(
        &self,
        registration_id: &str,
    ) -> Result<Option<(String, RegistrationRecord)>, Error> {
        match self.store.get(Collection::Registrations, registration_id).await? {
            Some(doc) => Ok(Some((doc.etag.clone(), parse_stored(&doc.body, "registration", registration_id)?))),
            None => Ok(None),
        }
    }

    /// The hub the device is assigned to now, unless `forceRegistration` asked for a fresh
    /// (initial) assignment.
    /// The registration record of the assignment this registration starts from (none when
    /// the device was never assigned, or the registration is forced).
    pub(super) fn current_hub<'a>(
        pending: &Pending,
        previous: Option<&'a RegistrationRecord>,
    ) -> Option<&'a RegistrationRecord> {
        let current = previous.and_then(RegistrationRecord::current_assignment);
        reprovision::starting_point(current, pending.force).and(previous)
    }

    /// The new registration record. Re-registrations follow the enrollment's
    /// `reprovisionPolicy`: the plan is [`reprovision::plan`].
    pub(super) fn build_record(
        &self,
        pending: &Pending,
        previous: Option<&RegistrationRecord>,
        outcome: &Result<Assignment, AllocationFailure>,
    ) -> RegistrationRecord {
        let enrollment = &pending.enrollment;
        let common = enrollment.common();
        let fresh_device_id = match enrollment {
            ResolvedEnrollment::Individual(e) => e.device_id.clone().unwrap_or_else(|| pending.registration_id.clone()),
            ResolvedEnrollment::Group(_) => pending.registration_id.clone(),
        };
        let mut record = RegistrationRecord {
            registration_id: previous.map_or_else(|| pending.registration_id.clone(), |p| p.registration_id.clone()),
            enrollment_group_id: enrollment.group_id().map(str::to_string),
            attestation: common.attestation.kind,
            created_millis: previous.map_or(pending.started, |p| p.created_millis),
            updated_millis: self.clock.now_millis(),
            status: RegistrationStatus::Assigned,
            substatus: Some(RegistrationSubstatus::InitialAssignment),
            assigned_hub: None,
            device_id: Some(fresh_device_id.clone()),
            error_code: None,
            error_message: None,
            etag: new_registration_etag(),
            payload: None,
            initial_twin: None,
            initial_hub: None,
            last_operation_id: pending.operation_id.clone(),
            tpm: pending.tpm.clone(),
        };
        let a = match outcome {
            Ok(a) => a,
            Err(failure) => {
                record.status = RegistrationStatus::Failed;
                record.substatus = None;
                record.error_code = Some(failure.code.0);
                record.error_message = Some(match &failure.detail {
                    Some(detail) if self.settings.expose_webhook_errors => detail.clone(),
                    Some(_) => format!(
                        "{} (the server log has the details under operation {})",
                        failure.message, pending.operation_id
                    ),
                    None => failure.message.clone(),
                });
                // Keep the current assignment for later re-registrations.
                if let Some(p) = previous {
                    record.assigned_hub = p.assigned_hub.clone();
                    record.device_id = p.device_id.clone().or(record.device_id);
                    record.initial_twin = p.initial_twin.clone();
                    record.initial_hub = p.initial_hub.clone();
                    // The hub still knows the device by the key of its current assignment.
                    record.tpm = p.tpm.clone();
                }
                return record;
            }
        };
        record.assigned_hub = Some(a.hub.clone());
        record.payload = a.payload.clone();
        record.initial_twin = a.initial_twin.clone();
        let current = Self::current_hub(pending, previous);
        let plan = reprovision::plan(
            current.and_then(RegistrationRecord::current_assignment),
            &a.hub,
            &reprovision_policy(common),
        );
        record.substatus = Some(plan.substatus);
        record.initial_hub = Some(plan.first_hub);
        if let (DeviceData::Keep, Some(current)) = (plan.device_data, current) {
            record.initial_twin = current.initial_twin.clone();
            record.device_id = current.device_id.clone().or(Some(fresh_device_id));
        }
        record
    }

    pub(super) fn reply_for_register(&self, result: RegistrationOperationStatus) -> DeviceReply {
        if self.settings.assigning_first || result.status == RegistrationStatus::Assigning {
            return DeviceReply {
                operation: RegistrationOperationStatus {
                    operation_id: result.operation_id,
                    status: RegistrationStatus::Assigning,
                    registration_state: None,
                },
                retry_after: Some(self.settings.retry_after_secs),
                attestation: None,
            };
        }
        DeviceReply { operation: result, retry_after: None, attestation: None }
    }

    pub(super) fn put_operation(
        &self,
        operation_id: &str,
        op: &OperationRecord,
        condition: Condition,
    ) -> Result<Write, Error> {
        let retention = i64::try_from(self.settings.operation_retention_secs).unwrap_or(i64::MAX / 2000) * 1000;
        Ok(Write::Put {
            collection: Collection::Operations,
            document: Document {
                id: operation_id.to_string(),
                etag: String::new(),
                // Never listed by registration: no partition, no secondary index entry.
                partition: None,
                body: to_json(op)?,
                expires_at: Some(op.created_millis.saturating_add(retention)),
            },
            condition,
        })
    }
}
