//! Device registration: the spine every transport calls (register, operation status,
//! registration status), and the service API's registration-state operations.
//!
//! One registration: resolve the enrollment (individual first, then groups), verify the
//! attestation, allocate a hub, persist the registration state and the operation in one
//! atomic write, and answer. Allocation is synchronous here, so the register answer already
//! carries the final state unless `assigning_first` is set (protocol.md §12).

use dps_proto::device::{
    DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus,
    RegistrationSubstatus,
};
use dps_proto::error::ErrorCode;
use dps_proto::ids::{
    id_key, validate_enrollment_group_id, validate_id_scope, validate_operation_id, validate_registration_id,
};
use dps_proto::sas::{device_resource, SasToken};
use dps_proto::service::{
    AllocationPolicy, AttestationType, DeviceRegistrationState, EnrollmentCommon, EnrollmentGroup,
    IndividualEnrollment, ProvisioningStatus, ReprovisionPolicy,
};
use dps_proto::timestamp;
use dps_proto::webhook::{AllocationRequest, DeviceRuntimeContext};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::allocation::{allocate, candidates, AllocationError};
use crate::attestation::{verify_group, verify_individual};
use crate::custom::{check_response, AllocationFailure, Assignment, HookError};
use crate::engine::{parse_body, parse_stored, to_json, Engine};
use crate::enrollment::EnrollmentKind;
use crate::enrollment::QueryPage;
use crate::error::Error;
use crate::etag::{new_registration_etag, IfMatch};
use crate::store::{Collection, Condition, Document, StoreError, Write};

/// How the device proved its identity, as the transport saw it.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A SAS token (HTTP `Authorization`, MQTT password, SASL PLAIN password).
    Sas(String),
    /// The certificate chain the device presented in the TLS handshake (DER, leaf first).
    X509(std::sync::Arc<Vec<Vec<u8>>>),
    /// Nothing.
    None,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Sas(_) => f.write_str("Sas(<redacted>)"),
            Credential::X509(chain) => write!(f, "X509({} certificates)", chain.len()),
            Credential::None => f.write_str("None"),
        }
    }
}

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
}

impl DeviceReply {
    /// The HTTP-like status of a poll answer: 202 while assigning, else 200.
    pub fn poll_status(&self) -> u16 {
        if self.operation.status == RegistrationStatus::Assigning {
            202
        } else {
            200
        }
    }
}

/// The enrollment a device resolved to.
#[derive(Debug, Clone)]
pub enum ResolvedEnrollment {
    /// Individual enrollment.
    Individual(IndividualEnrollment),
    /// Enrollment group.
    Group(EnrollmentGroup),
}

impl ResolvedEnrollment {
    fn common(&self) -> &EnrollmentCommon {
        match self {
            ResolvedEnrollment::Individual(e) => &e.common,
            ResolvedEnrollment::Group(g) => &g.common,
        }
    }

    fn group_id(&self) -> Option<&str> {
        match self {
            ResolvedEnrollment::Group(g) => Some(&g.enrollment_group_id),
            ResolvedEnrollment::Individual(_) => None,
        }
    }

    fn describe(&self) -> String {
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
}

impl RegistrationRecord {
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
            tpm: None,
            // protocol.md §7: `{}` or only the group ID (Java validates certificate infos).
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
}

fn unauthorized(message: impl Into<String>) -> Error {
    Error::Unauthorized(message.into())
}

/// The one answer to an unauthenticated caller whose SAS token fails for a reason that
/// depends on what is enrolled (wrong key, unknown registration ID, a group key that derives
/// another key, a disabled enrollment): it does not tell which, so it cannot be used to find
/// out which IDs exist. The log has the reason.
pub(crate) fn sas_not_accepted(registration_id: &str) -> String {
    format!(
        "the SAS token is not accepted for registration ID '{registration_id}': check the key (or the group key it is derived from) and the registration ID"
    )
}

/// The same for X.509: the certificate's CN and validity were fine, but it matches no
/// enrollment (not pinned, no group's CA, no verified CA in the chain).
pub(crate) fn x509_not_accepted(registration_id: &str) -> String {
    format!(
        "the device certificate is not accepted for registration ID '{registration_id}': it must be an individual enrollment's client certificate, or chain to an enrollment group's CA that is verified in the certificate store"
    )
}

impl Engine {
    fn check_scope_and_id(&self, id_scope: &str, registration_id: &str) -> Result<(), Error> {
        validate_id_scope(id_scope).map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        validate_registration_id(registration_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        if !id_scope.eq_ignore_ascii_case(&self.settings.id_scope) {
            return Err(unauthorized(format!("ID scope '{id_scope}' is not served by this instance")));
        }
        Ok(())
    }

    /// Checks the ID scope and registration ID grammar, then authenticates the device, as a
    /// connection-oriented transport does once at connect time (MQTT CONNECT, AMQP SASL).
    pub async fn authenticate_device(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<ResolvedEnrollment, Error> {
        self.check_scope_and_id(id_scope, registration_id)?;
        self.authenticate(id_scope, registration_id, credential).await
    }

    /// Authenticates a device and resolves its enrollment: the individual enrollment when
    /// one exists (a disabled one blocks the device even if a group would accept it), else
    /// the first symmetric-key group (by ID) whose derived key validates the token. A refusal
    /// is answered no sooner than `auth_failure_delay_ms` after the call began, so that the
    /// answer time does not tell an unknown ID from a wrong key either.
    pub async fn authenticate(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<ResolvedEnrollment, Error> {
        let started = tokio::time::Instant::now();
        let result = self.resolve_credential(id_scope, registration_id, credential).await;
        if matches!(result, Err(Error::Unauthorized(_))) {
            tokio::time::sleep_until(started + std::time::Duration::from_millis(self.settings.auth_failure_delay_ms))
                .await;
        }
        result
    }

    async fn resolve_credential(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<ResolvedEnrollment, Error> {
        let text = match credential {
            Credential::Sas(t) => t,
            Credential::X509(chain) => return self.authenticate_x509(registration_id, chain).await,
            Credential::None => {
                return Err(unauthorized(
                    "no credential: send a SAS token signed with the enrollment's symmetric key (HTTP Authorization header, MQTT password), or a client certificate in the TLS handshake",
                ))
            }
        };
        let token = SasToken::parse(text).map_err(|e| unauthorized(format!("invalid SAS token: {e}")))?;
        let now = self.clock.now_secs();
        if token.is_expired(now, self.settings.sas_clock_skew_secs) {
            return Err(unauthorized(format!(
                "the SAS token expired at {} (now {}); sign a new token",
                token.expiry, now
            )));
        }
        let expected = device_resource(id_scope, registration_id);
        if !token.resource.eq_ignore_ascii_case(&expected) {
            return Err(unauthorized(format!(
                "the SAS token is for resource '{}', but this request is for '{expected}'",
                token.resource
            )));
        }
        let individual: Option<IndividualEnrollment> =
            match self.store.get(Collection::Enrollments, registration_id).await? {
                Some(doc) => Some(parse_stored(&doc.body, "enrollment", registration_id)?),
                None => None,
            };
        if let Some(e) = individual {
            let signed = match (e.common.attestation.kind, &e.common.attestation.symmetric_key) {
                (AttestationType::SymmetricKey, Some(sk)) => verify_individual(&token, sk).is_some(),
                _ => false,
            };
            // A disabled individual enrollment also answers for a group member's key, so
            // that it revokes that member (protocol.md §10.1).
            let disabled = e.common.provisioning_status == Some(ProvisioningStatus::Disabled);
            if signed || (disabled && self.find_group_for(&token, registration_id).await?.is_some()) {
                return Ok(ResolvedEnrollment::Individual(e));
            }
            crate::info_limited!("device-auth", registration_id, attestation = ?e.common.attestation.kind, disabled,
                "SAS rejected: signature does not match the individual enrollment's keys");
            return Err(unauthorized(sas_not_accepted(registration_id)));
        }
        match self.find_group_for(&token, registration_id).await? {
            Some(g) => Ok(ResolvedEnrollment::Group(g)),
            None => {
                crate::info_limited!(
                    "device-auth",
                    registration_id,
                    "SAS rejected: no individual enrollment and no group key matches"
                );
                Err(unauthorized(sas_not_accepted(registration_id)))
            }
        }
    }

    async fn find_group_for(&self, token: &SasToken, registration_id: &str) -> Result<Option<EnrollmentGroup>, Error> {
        let groups = self.enrollment_groups().await?;
        Ok(groups
            .iter()
            .filter(|g| g.common.attestation.kind == AttestationType::SymmetricKey)
            .find(|g| {
                g.common
                    .attestation
                    .symmetric_key
                    .as_ref()
                    .is_some_and(|sk| verify_group(token, sk, registration_id).is_some())
            })
            .cloned())
    }

    /// The device payload: any JSON value (object, string, array, number, boolean), passed
    /// on unchanged; `null` or absent means none. Bounded by `max_payload_bytes`.
    fn check_payload(&self, payload: Option<Value>) -> Result<Option<Value>, Error> {
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

    fn parse_registration_body(&self, registration_id: &str, body: &[u8]) -> Result<DeviceRegistration, Error> {
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

    fn new_operation_id(&self) -> String {
        // UUIDv7: time-ordered, so new operations land at the end of the store's index
        // instead of on a random page each (far fewer pages written per commit).
        format!("{}.{}", self.operation_prefix, uuid::Uuid::now_v7())
    }

    /// Registers a device. Always answers (the transport sends 202) unless the request is
    /// malformed or unauthenticated. Custom allocation runs in a task of its own: when the
    /// webhook answers within `webhook_inline_wait_ms` the device gets the final state, else
    /// `assigning`, and the task records the result for the device's polls.
    pub async fn register(&self, req: RegisterRequest) -> Result<DeviceReply, Error> {
        self.check_scope_and_id(&req.id_scope, &req.registration_id)?;
        let body = self.parse_registration_body(&req.registration_id, &req.body)?;
        let payload = self.check_payload(body.payload)?;
        let enrollment = self.authenticate(&req.id_scope, &req.registration_id, &req.credential).await?;
        self.admit(&req.registration_id, true)?;
        let operation_id = self.new_operation_id();
        let now = self.clock.now_millis();
        let certificate = match &req.credential {
            Credential::X509(chain) => Some(x509_context(chain)),
            _ => None,
        };
        let pending = Pending {
            registration_id: req.registration_id,
            force: req.force,
            enrollment,
            operation_id,
            payload,
            certificate,
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
            self.store.write(vec![self.put_operation(&pending.operation_id, &op, Condition::IfAbsent)?]).await?;
            return Ok(self.reply_for_register(op.result));
        }
        // Built-in policies and in-process rule sets finish here: one write.
        let inline = || {
            let definition = pending.enrollment.common().custom_allocation_definition.as_ref();
            self.hook.as_ref().zip(definition).is_some_and(|(hook, d)| hook.answers_inline(&d.webhook_url))
        };
        if self.policy_of(&pending.enrollment) != AllocationPolicy::Custom || inline() {
            let result = self.complete(&pending, Condition::IfAbsent).await?;
            return Ok(self.reply_for_register(result));
        }

        // A webhook: call it in a task that outlives this request if the webhook is slow. A
        // webhook that answers within `webhook_inline_wait_ms` costs one write (the final
        // state); a slower one makes the operation queryable as `assigning` first, and the task
        // overwrites it when the webhook answers. Nothing is answered before it is written.
        let assigning = RegistrationOperationStatus {
            operation_id: pending.operation_id.clone(),
            status: RegistrationStatus::Assigning,
            registration_state: Some(DeviceRegistrationResult::bare(
                &pending.registration_id,
                RegistrationStatus::Assigning,
            )),
        };
        let grace = i64::try_from(self.settings.webhook_timeout_secs).unwrap_or(3600).saturating_add(30) * 1000;
        let assigning_op = pending.operation(assigning.clone(), Some(now.saturating_add(grace)));
        let assigning_write = self.put_operation(&pending.operation_id, &assigning_op, Condition::IfAbsent)?;
        let engine = self.clone();
        let mut task = tokio::spawn(async move {
            let result = engine.complete(&pending, Condition::Always).await;
            if let Err(e) = &result {
                crate::warn_limited!("allocation-record", registration_id = %pending.registration_id, error = %e,
                    "custom allocation could not be recorded");
            }
            result
        });
        let wait = std::time::Duration::from_millis(self.settings.webhook_inline_wait_ms);
        let joined = match tokio::time::timeout(wait, &mut task).await {
            Ok(joined) => joined,
            Err(_) => match self.store.write(vec![assigning_write]).await {
                Ok(()) => return Ok(self.reply_for_register(assigning)),
                // The task recorded the final state in the meantime: answer with it.
                Err(StoreError::AlreadyExists(_)) => task.await,
                Err(e) => return Err(e.into()),
            },
        };
        match joined {
            Ok(Ok(result)) => Ok(self.reply_for_register(result)),
            Ok(Err(e)) => Err(e),
            Err(join) => Err(Error::Internal(format!("custom allocation task failed: {join}"))),
        }
    }

    fn policy_of(&self, enrollment: &ResolvedEnrollment) -> AllocationPolicy {
        enrollment.common().allocation_policy.unwrap_or(self.settings.default_allocation_policy)
    }

    /// Allocates, then writes the registration state and the final operation atomically
    /// (retrying the write, not the allocation, when another registration of the same
    /// device got in between).
    async fn complete(&self, pending: &Pending, op_condition: Condition) -> Result<RegistrationOperationStatus, Error> {
        let previous = self.load_registration_doc(&pending.registration_id).await?;
        let outcome = self.choose(pending, previous.as_ref().map(|(_, r)| r)).await;
        if let Err(AllocationFailure { detail: Some(detail), .. }) = &outcome {
            // For the operator: what the webhook said, under the ID the device was given.
            tracing::warn!(registration_id = %pending.registration_id, operation_id = %pending.operation_id,
                detail = %detail, "custom allocation failed");
        }
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
            let writes = vec![
                Write::Put { collection: Collection::Registrations, document: registration, condition },
                self.put_operation(&pending.operation_id, &op, op_condition.clone())?,
            ];
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

    async fn load_registration_doc(
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
    fn current_hub<'a>(pending: &Pending, previous: Option<&'a RegistrationRecord>) -> Option<&'a RegistrationRecord> {
        previous.filter(|p| !pending.force && p.assigned_hub.is_some())
    }

    /// Chooses the hub: a built-in policy, or the custom allocation webhook. A device that is
    /// assigned already and whose enrollment says "never reprovision"
    /// (`updateHubAssignment: false`) stays on its hub; a webhook is then offered only that hub.
    async fn choose(
        &self,
        pending: &Pending,
        previous: Option<&RegistrationRecord>,
    ) -> Result<Assignment, AllocationFailure> {
        let common = pending.enrollment.common();
        let policy = self.policy_of(&pending.enrollment);
        let current = Self::current_hub(pending, previous);
        let stay = current.filter(|_| !reprovision_policy(common).update_hub_assignment);
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
                tpm: None,
                payload: pending.payload.clone(),
            },
            linked_hubs: linked_hubs.clone(),
        };
        // A built-in rule set is the operator's own config, not a remote party: its answers and
        // errors are shown to the device as they are.
        let in_process = hook.answers_inline(&definition.webhook_url);
        let answer = hook.call(&definition.webhook_url, &request).await.map_err(|e| match e {
            HookError::PayloadRejected(m) => {
                AllocationFailure { code: ErrorCode::INVALID_PAYLOAD, message: m, detail: None }
            }
            e => {
                let what = pending.enrollment.describe();
                let full = e.to_string();
                let public = if in_process { full.clone() } else { e.public_message() };
                AllocationFailure {
                    code: ErrorCode::ALLOCATION_FAILED,
                    message: format!("custom allocation failed for {what}: {public}"),
                    detail: (public != full).then(|| format!("custom allocation failed for {what}: {full}")),
                }
            }
        })?;
        check_response(&answer, &linked_hubs, common.initial_twin.as_ref()).map_err(|f| match f.detail {
            Some(detail) if in_process => AllocationFailure { code: f.code, message: detail, detail: None },
            _ => f,
        })
    }

    /// The new registration record. Re-registrations follow the enrollment's
    /// `reprovisionPolicy` (protocol.md §10.3):
    ///
    /// | current hub | new hub | migrateDeviceData | substatus | twin and device ID |
    /// |---|---|---|---|---|
    /// | none | any | – | initialAssignment | from the enrollment / webhook |
    /// | A | A | true (or never reprovision) | unchanged | kept |
    /// | A | A | false | deviceDataReset | from the enrollment / webhook |
    /// | A | B = first hub ever | – | reprovisionedToInitialAssignment | kept if migrating, else reset |
    /// | A | B | true | deviceDataMigrated | kept |
    /// | A | B | false | deviceDataReset | from the enrollment / webhook |
    fn build_record(
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
                }
                return record;
            }
        };
        record.assigned_hub = Some(a.hub.clone());
        record.payload = a.payload.clone();
        record.initial_twin = a.initial_twin.clone();
        let Some(current) = Self::current_hub(pending, previous) else {
            record.initial_hub = Some(a.hub.clone());
            return record;
        };
        let current_hub = current.assigned_hub.clone().unwrap_or_default();
        record.initial_hub = current.initial_hub.clone().or_else(|| Some(current_hub.clone()));
        let rp = reprovision_policy(common);
        let keep = |record: &mut RegistrationRecord| {
            record.initial_twin = current.initial_twin.clone();
            record.device_id = current.device_id.clone().or_else(|| Some(fresh_device_id.clone()));
        };
        if a.hub.eq_ignore_ascii_case(&current_hub) {
            if rp.update_hub_assignment && !rp.migrate_device_data {
                record.substatus = Some(RegistrationSubstatus::DeviceDataReset);
            } else {
                record.substatus = current.substatus.or(Some(RegistrationSubstatus::InitialAssignment));
                keep(&mut record);
            }
        } else {
            let back_home = record.initial_hub.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(&a.hub));
            record.substatus = Some(if back_home {
                RegistrationSubstatus::ReprovisionedToInitialAssignment
            } else if rp.migrate_device_data {
                RegistrationSubstatus::DeviceDataMigrated
            } else {
                RegistrationSubstatus::DeviceDataReset
            });
            if rp.migrate_device_data {
                keep(&mut record);
            }
        }
        record
    }

    fn reply_for_register(&self, result: RegistrationOperationStatus) -> DeviceReply {
        if self.settings.assigning_first || result.status == RegistrationStatus::Assigning {
            return DeviceReply {
                operation: RegistrationOperationStatus {
                    operation_id: result.operation_id,
                    status: RegistrationStatus::Assigning,
                    registration_state: None,
                },
                retry_after: Some(self.settings.retry_after_secs),
            };
        }
        DeviceReply { operation: result, retry_after: None }
    }

    /// Answers an operation-status poll.
    pub async fn operation_status(
        &self,
        id_scope: &str,
        registration_id: &str,
        operation_id: &str,
        credential: &Credential,
    ) -> Result<DeviceReply, Error> {
        self.check_scope_and_id(id_scope, registration_id)?;
        validate_operation_id(operation_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        self.authenticate(id_scope, registration_id, credential).await?;
        self.admit(registration_id, false)?;
        let not_found = || {
            Error::not_found(
                ErrorCode::OPERATION_NOT_FOUND,
                format!("operation '{operation_id}' does not exist for registration ID '{registration_id}' (unknown or expired)"),
            )
        };
        let doc = self.store.get(Collection::Operations, operation_id).await?.ok_or_else(not_found)?;
        // Past its retention an operation is gone, whether or not the purge has removed it yet.
        if doc.expires_at.is_some_and(|t| t <= self.clock.now_millis()) {
            return Err(not_found());
        }
        let op: OperationRecord = parse_stored(&doc.body, "operation", operation_id)?;
        if !op.registration_id.eq_ignore_ascii_case(registration_id) {
            return Err(not_found());
        }
        let mut op = op;
        if op.result.status == RegistrationStatus::Assigning
            && op.deadline_millis.is_some_and(|d| d < self.clock.now_millis())
        {
            let mut state = DeviceRegistrationResult::bare(&op.registration_id, RegistrationStatus::Failed);
            state.error_code = Some(ErrorCode::ALLOCATION_FAILED.0);
            state.error_message = Some(
                "custom allocation did not finish (the server stopped while calling the webhook); register again"
                    .into(),
            );
            op.result = RegistrationOperationStatus {
                operation_id: op.result.operation_id,
                status: RegistrationStatus::Failed,
                registration_state: Some(state),
            };
        }
        let retry_after = (op.result.status == RegistrationStatus::Assigning).then_some(self.settings.retry_after_secs);
        tracing::debug!(registration_id, operation_id, status = ?op.result.status, "operation polled");
        Ok(DeviceReply { operation: op.result, retry_after })
    }

    /// Answers a device registration status lookup (`POST /{scope}/registrations/{id}`).
    pub async fn registration_status(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
        body: &[u8],
    ) -> Result<DeviceRegistrationResult, Error> {
        self.check_scope_and_id(id_scope, registration_id)?;
        self.parse_registration_body(registration_id, body)?;
        self.authenticate(id_scope, registration_id, credential).await?;
        self.admit(registration_id, false)?;
        let record = self.load_registration(registration_id).await?;
        Ok(record.to_device_result())
    }

    async fn load_registration(&self, registration_id: &str) -> Result<RegistrationRecord, Error> {
        let doc = self.store.get(Collection::Registrations, registration_id).await?.ok_or_else(|| {
            Error::not_found(
                ErrorCode::REGISTRATION_NOT_FOUND,
                format!("no registration state for registration ID '{registration_id}'"),
            )
        })?;
        parse_stored(&doc.body, "registration", registration_id)
    }

    /// Service API: reads a registration state.
    pub async fn get_registration_state(&self, registration_id: &str) -> Result<DeviceRegistrationState, Error> {
        validate_registration_id(registration_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        Ok(self.load_registration(registration_id).await?.to_service_state())
    }

    /// Service API: deletes a registration state; the device's next registration is an
    /// initial assignment.
    pub async fn delete_registration_state(&self, registration_id: &str, if_match: &IfMatch) -> Result<(), Error> {
        validate_registration_id(registration_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        let doc = self.store.get(Collection::Registrations, registration_id).await?.ok_or_else(|| {
            Error::not_found(
                ErrorCode::REGISTRATION_NOT_FOUND,
                format!("no registration state for registration ID '{registration_id}'"),
            )
        })?;
        if !if_match.allows(Some(&doc.etag)) {
            return Err(Error::PreconditionFailed(format!(
                "the If-Match ETag does not match the registration state of '{registration_id}'; read it again to get its current etag"
            )));
        }
        let write = Write::Delete {
            collection: Collection::Registrations,
            id: registration_id.into(),
            condition: Condition::IfMatch(doc.etag),
        };
        match self.store.write(vec![write]).await {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound(_)) => Err(Error::not_found(
                ErrorCode::REGISTRATION_NOT_FOUND,
                format!("no registration state for registration ID '{registration_id}'"),
            )),
            Err(StoreError::PreconditionFailed(_)) => Err(Error::PreconditionFailed(format!(
                "the registration state of '{registration_id}' changed while deleting it; retry"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Service API: one page of the registration states of an enrollment group.
    pub async fn query_group_registrations(
        &self,
        enrollment_group_id: &str,
        page_size: usize,
        continuation: Option<&str>,
    ) -> Result<QueryPage<DeviceRegistrationState>, Error> {
        validate_enrollment_group_id(enrollment_group_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        let key = id_key(enrollment_group_id);
        let page = self.list_page(Collection::Registrations, Some(&key), page_size, continuation).await?;
        let items = page
            .documents
            .iter()
            .map(|d| parse_stored::<RegistrationRecord>(&d.body, "registration", &d.id).map(|r| r.to_service_state()))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(QueryPage { items, continuation: page.continuation })
    }
}

/// A registration between authentication and its final record.
struct Pending {
    registration_id: String,
    force: bool,
    enrollment: ResolvedEnrollment,
    operation_id: String,
    payload: Option<Value>,
    /// `deviceRuntimeContext.x509` for X.509 devices.
    certificate: Option<Value>,
    started: i64,
}

/// The webhook's (and the rules') view of an X.509 device: the leaf's `X509CertificateInfo`
/// and the next certificate in the chain it presented, if any.
fn x509_context(chain: &[Vec<u8>]) -> Value {
    let info =
        |der: Option<&Vec<u8>>| der.and_then(|d| crate::x509::facts(d).ok()).map(|f| f.info()).unwrap_or(Value::Null);
    serde_json::json!({
        "certificateInfo": info(chain.first()),
        "signingCertificateInfo": info(chain.get(1)),
    })
}

impl Pending {
    fn operation(&self, result: RegistrationOperationStatus, deadline_millis: Option<i64>) -> OperationRecord {
        OperationRecord {
            registration_id: self.registration_id.clone(),
            created_millis: self.started,
            device_payload: self.payload.clone(),
            result,
            deadline_millis,
        }
    }
}

/// An enrollment as a webhook sees it: the service JSON with the attestation reduced to its
/// type (no keys).
/// The enrollment's reprovision policy; both flags default to true.
fn reprovision_policy(common: &EnrollmentCommon) -> ReprovisionPolicy {
    common
        .reprovision_policy
        .clone()
        .unwrap_or(ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: true })
}

fn webhook_view<R: EnrollmentKind>(record: &R) -> Value {
    let mut r = record.clone();
    let kind = r.common().attestation.kind;
    let common = r.common_mut();
    common.attestation.symmetric_key = None;
    common.attestation.tpm = None;
    common.attestation.x509 = None;
    common.attestation.kind = kind;
    serde_json::to_value(&r).unwrap_or(Value::Null)
}

impl Engine {
    fn put_operation(&self, operation_id: &str, op: &OperationRecord, condition: Condition) -> Result<Write, Error> {
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
