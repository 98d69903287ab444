//! Service operations on individual enrollments and enrollment groups (docs/protocol-notes.md §9):
//! create-or-update with ETags, get (keys hidden), delete, attestation mechanism (keys
//! shown), query with paging, and bulk operations.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::error::ErrorCode;
use dps_proto::ids::{validate_enrollment_group_id, validate_registration_id};
use dps_proto::service::{
    AllocationPolicy, AttestationMechanism, AttestationType, BulkEnrollmentGroupOperation, BulkEnrollmentOperation,
    BulkMode, BulkOperationError, BulkOperationResult, EnrollmentCommon, EnrollmentGroup, IndividualEnrollment,
    SymmetricKeyAttestation,
};
use dps_proto::timestamp;
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::allocation::{find_linked, linked_names};
use crate::engine::{body_error, parse_body, parse_stored, to_json, Management};
use crate::error::Error;
use crate::etag::{new_enrollment_etag, IfMatch};
use crate::events::{enrollment_event, EventKind};
use crate::store::{Collection, Condition, Document, Page, StoreError, Write};

/// Most items in one bulk operation (docs/protocol-notes.md §10.7).
pub const MAX_BULK_ITEMS: usize = 10;
/// Largest page a query returns.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Symmetric keys must decode to this many bytes.
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 16..=64;
/// Bytes of a generated symmetric key (as real DPS: 64 bytes, 88 base64 characters).
pub const GENERATED_KEY_BYTES: usize = 64;

/// What distinguishes individual enrollments from groups in the shared code.
pub trait EnrollmentKind: Serialize + DeserializeOwned + Clone + Send + Sync {
    /// Where records live.
    const COLLECTION: Collection;
    /// Name in messages.
    const NOUN: &'static str;
    /// JSON field of the identifier.
    const ID_FIELD: &'static str;
    /// Code for "does not exist".
    const NOT_FOUND: ErrorCode;
    /// The identifier.
    fn id(&self) -> &str;
    /// Sets the identifier.
    fn set_id(&mut self, id: String);
    /// Shared fields.
    fn common(&self) -> &EnrollmentCommon;
    /// Shared fields, mutable.
    fn common_mut(&mut self) -> &mut EnrollmentCommon;
    /// Checks the identifier grammar.
    fn validate_id(id: &str) -> Result<(), Error>;
    /// Kind-specific validation; clears read-only fields.
    fn validate_and_normalise(&mut self) -> Result<(), Error>;
    /// A bulk error entry for this kind.
    fn bulk_error(id: String, code: u32, status: String) -> BulkOperationError;
}

fn id_error(e: dps_proto::ids::IdError) -> Error {
    Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string())
}

impl EnrollmentKind for IndividualEnrollment {
    const COLLECTION: Collection = Collection::Enrollments;
    const NOUN: &'static str = "enrollment";
    const ID_FIELD: &'static str = "registrationId";
    const NOT_FOUND: ErrorCode = ErrorCode::ENROLLMENT_NOT_FOUND;
    fn id(&self) -> &str {
        &self.registration_id
    }
    fn set_id(&mut self, id: String) {
        self.registration_id = id;
    }
    fn common(&self) -> &EnrollmentCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut EnrollmentCommon {
        &mut self.common
    }
    fn validate_id(id: &str) -> Result<(), Error> {
        validate_registration_id(id).map_err(id_error)
    }
    fn validate_and_normalise(&mut self) -> Result<(), Error> {
        self.registration_state = None;
        if let Some(device_id) = &self.device_id {
            validate_device_id(device_id)?;
        }
        if self.common.attestation.kind == AttestationType::X509 {
            let has = self.common.attestation.x509.as_ref().is_some_and(|x| x.client_certificates.is_some());
            if !has {
                return Err(invalid("an individual X.509 enrollment needs attestation.x509.clientCertificates"));
            }
        }
        Ok(())
    }
    fn bulk_error(id: String, code: u32, status: String) -> BulkOperationError {
        BulkOperationError {
            registration_id: Some(id),
            enrollment_group_id: None,
            error_code: code,
            error_status: status,
        }
    }
}

impl EnrollmentKind for EnrollmentGroup {
    const COLLECTION: Collection = Collection::EnrollmentGroups;
    const NOUN: &'static str = "enrollment group";
    const ID_FIELD: &'static str = "enrollmentGroupId";
    const NOT_FOUND: ErrorCode = ErrorCode::ENROLLMENT_GROUP_NOT_FOUND;
    fn id(&self) -> &str {
        &self.enrollment_group_id
    }
    fn set_id(&mut self, id: String) {
        self.enrollment_group_id = id;
    }
    fn common(&self) -> &EnrollmentCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut EnrollmentCommon {
        &mut self.common
    }
    fn validate_id(id: &str) -> Result<(), Error> {
        validate_enrollment_group_id(id).map_err(id_error)
    }
    fn validate_and_normalise(&mut self) -> Result<(), Error> {
        match self.common.attestation.kind {
            AttestationType::Tpm => Err(invalid(
                "enrollment groups support symmetricKey and x509 attestation only; use individual enrollments for TPM",
            )),
            AttestationType::X509 => {
                let has = self
                    .common
                    .attestation
                    .x509
                    .as_ref()
                    .is_some_and(|x| x.signing_certificates.is_some() || x.ca_references.is_some());
                if has {
                    Ok(())
                } else {
                    Err(invalid("an X.509 enrollment group needs attestation.x509.signingCertificates or caReferences"))
                }
            }
            _ => Ok(()),
        }
    }
    fn bulk_error(id: String, code: u32, status: String) -> BulkOperationError {
        BulkOperationError {
            registration_id: None,
            enrollment_group_id: Some(id),
            error_code: code,
            error_status: status,
        }
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::bad_request(ErrorCode::INVALID_ARGUMENT, message)
}

/// Device IDs follow IoT Hub's grammar: up to 128 ASCII letters, digits and `-.%_*?!(),:=@$'`.
pub fn validate_device_id(id: &str) -> Result<(), Error> {
    const PUNCT: &str = "-.%_*?!(),:=@$'";
    if id.is_empty() || id.len() > 128 {
        return Err(invalid(format!("deviceId must be 1 to 128 characters; it has {}", id.chars().count())));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || PUNCT.contains(*c))) {
        return Err(invalid(format!("deviceId contains {c:?}; only letters, digits and {PUNCT} are allowed")));
    }
    Ok(())
}

/// A new symmetric key as the service generates one: random bytes, base64.
pub fn generate_key() -> String {
    let mut key = [0u8; GENERATED_KEY_BYTES];
    rand::thread_rng().fill_bytes(&mut key);
    BASE64.encode(key)
}

fn check_key(field: &str, key: &str) -> Result<(), Error> {
    match BASE64.decode(key.trim()) {
        Ok(k) if KEY_BYTES.contains(&k.len()) => Ok(()),
        Ok(k) => Err(invalid(format!(
            "attestation.symmetricKey.{field} decodes to {} bytes; keys must be {} to {} bytes",
            k.len(),
            KEY_BYTES.start(),
            KEY_BYTES.end()
        ))),
        Err(_) => Err(invalid(format!("attestation.symmetricKey.{field} is not valid base64"))),
    }
}

/// Returns a copy of an attestation mechanism with secrets removed, for reads.
pub fn without_secrets(a: &AttestationMechanism) -> AttestationMechanism {
    let mut a = a.clone();
    if a.symmetric_key.is_some() {
        a.symmetric_key = Some(SymmetricKeyAttestation::default());
    }
    a
}

/// A page of query results.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPage<T> {
    /// Items.
    pub items: Vec<T>,
    /// Continuation token for the next page.
    pub continuation: Option<String>,
}

impl Management {
    fn validate_common(&self, common: &mut EnrollmentCommon, existing: Option<&EnrollmentCommon>) -> Result<(), Error> {
        let att = &mut common.attestation;
        match att.kind {
            AttestationType::None => {
                return Err(invalid("attestation.type 'none' cannot be enrolled; use symmetricKey, x509 or tpm"))
            }
            AttestationType::SymmetricKey => {
                let mut sk = att.symmetric_key.take().unwrap_or_default();
                // Keys omitted on update keep their stored values (reads hide keys, so a
                // get-modify-put must not rotate them); otherwise they are generated.
                let old = existing
                    .filter(|e| e.attestation.kind == AttestationType::SymmetricKey)
                    .and_then(|e| e.attestation.symmetric_key.clone())
                    .unwrap_or_default();
                for (field, key, old) in [
                    ("primaryKey", &mut sk.primary_key, old.primary_key),
                    ("secondaryKey", &mut sk.secondary_key, old.secondary_key),
                ] {
                    match key.as_deref().map(str::trim) {
                        Some(k) if !k.is_empty() => check_key(field, k)?,
                        _ => *key = Some(old.unwrap_or_else(generate_key)),
                    }
                }
                att.symmetric_key = Some(sk);
                att.tpm = None;
                att.x509 = None;
            }
            AttestationType::Tpm => {
                if att.symmetric_key.is_some() || att.x509.is_some() {
                    return Err(invalid(
                        "a TPM enrollment carries attestation.tpm only; remove attestation.symmetricKey and attestation.x509",
                    ));
                }
                // Keys omitted on update keep their stored values, as symmetric keys do (the
                // endorsement key is public, but a get-modify-put must not lose it).
                if att.tpm.is_none() {
                    att.tpm = existing
                        .filter(|e| e.attestation.kind == AttestationType::Tpm)
                        .and_then(|e| e.attestation.tpm.clone());
                }
                let Some(tpm) = att.tpm.as_mut() else {
                    return Err(invalid("TPM attestation needs attestation.tpm.endorsementKey (base64 of the TPM2B_PUBLIC of the device's EK)"));
                };
                tpm.endorsement_key = tpm.endorsement_key.trim().to_string();
                if tpm.endorsement_key.is_empty() {
                    return Err(invalid(
                        "attestation.tpm.endorsementKey is empty: give base64 of the TPM2B_PUBLIC of the device's EK",
                    ));
                }
                crate::tpm::parse_device_key(
                    "attestation.tpm.endorsementKey",
                    &tpm.endorsement_key,
                    crate::tpm::DeviceKey::Endorsement,
                )?;
                if let Some(srk) = tpm.storage_root_key.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                    crate::tpm::parse_device_key(
                        "attestation.tpm.storageRootKey",
                        srk,
                        crate::tpm::DeviceKey::StorageRoot,
                    )?;
                } else {
                    tpm.storage_root_key = None;
                }
            }
            AttestationType::X509 => {
                let Some(x) = att.x509.as_mut() else {
                    return Err(invalid("X.509 attestation needs attestation.x509"));
                };
                for (field, certs) in [
                    ("clientCertificates", &mut x.client_certificates),
                    ("signingCertificates", &mut x.signing_certificates),
                ] {
                    let Some(certs) = certs.as_mut() else { continue };
                    for (slot, c) in [("primary", &mut certs.primary), ("secondary", &mut certs.secondary)] {
                        let Some(c) = c.as_mut() else { continue };
                        let Some(text) = c.certificate.as_deref() else {
                            return Err(invalid(format!("attestation.x509.{field}.{slot}.certificate is missing")));
                        };
                        let der = crate::x509::decode_certificate_text(text)
                            .map_err(|e| invalid(format!("attestation.x509.{field}.{slot}.certificate: {e}")))?;
                        let facts = crate::x509::facts(&der)
                            .map_err(|e| invalid(format!("attestation.x509.{field}.{slot}.certificate: {e}")))?;
                        c.info = Some(facts.info());
                    }
                }
                att.symmetric_key = None;
                att.tpm = None;
            }
        }
        let linked = &self.settings.linked_hubs;
        for hub in common.iot_hubs.iter().flatten().chain(common.iot_hub_host_name.iter()) {
            if find_linked(linked, hub).is_none() {
                return Err(invalid(format!(
                    "IoT hub '{hub}' is not a linked hub; linked hubs: {}",
                    linked_names(linked)
                )));
            }
        }
        if let Some(twin) = &common.initial_twin {
            if !twin.is_object() {
                return Err(invalid("initialTwin must be a JSON object with optional 'tags' and 'properties'"));
            }
        }
        match common.allocation_policy {
            Some(AllocationPolicy::Custom) if common.custom_allocation_definition.is_none() => {
                return Err(invalid(
                    "allocationPolicy 'custom' needs customAllocationDefinition {webhookUrl, apiVersion}",
                ))
            }
            Some(AllocationPolicy::Static) => {
                let named = common.iot_hubs.as_ref().map_or(0, Vec::len)
                    + usize::from(
                        common.iot_hubs.as_ref().is_none_or(Vec::is_empty) && common.iot_hub_host_name.is_some(),
                    );
                if named != 1 {
                    return Err(invalid(format!(
                        "allocationPolicy 'static' needs exactly one hub in iotHubs (or iotHubHostName); {named} given"
                    )));
                }
            }
            _ => {}
        }
        if let Some(def) = &common.custom_allocation_definition {
            if def.webhook_url.trim().is_empty() || def.api_version.trim().is_empty() {
                return Err(invalid("customAllocationDefinition needs a webhookUrl and an apiVersion"));
            }
            if let Some(hook) = &self.hook {
                hook.check_url(&def.webhook_url)
                    .map_err(|why| invalid(format!("customAllocationDefinition.webhookUrl: {why}")))?;
            }
        }
        common.created_date_time_utc = None;
        common.last_updated_date_time_utc = None;
        Ok(())
    }

    async fn load<R: EnrollmentKind>(&self, id: &str) -> Result<Option<R>, Error> {
        match self.store.get(R::COLLECTION, id).await? {
            Some(doc) => Ok(Some(parse_stored(&doc.body, R::NOUN, id)?)),
            None => Ok(None),
        }
    }

    /// Creates or replaces a record. `path_id` comes from the URL; the body's ID must match
    /// it. Returns the stored record, secrets included (as DPS does for the PUT).
    pub async fn put_enrollment_record<R: EnrollmentKind>(
        &self,
        path_id: &str,
        body: &[u8],
        if_match: &IfMatch,
    ) -> Result<R, Error> {
        let value = dps_proto::json::parse_object(body).map_err(|e| body_error(&format!("{} (JSON)", R::NOUN), e))?;
        self.put_enrollment_value::<R>(path_id, Value::Object(value), if_match, false).await
    }

    async fn put_enrollment_value<R: EnrollmentKind>(
        &self,
        path_id: &str,
        mut value: Value,
        if_match: &IfMatch,
        create_only: bool,
    ) -> Result<R, Error> {
        R::validate_id(path_id)?;
        let obj = value.as_object_mut().ok_or_else(|| {
            Error::bad_request(ErrorCode::INVALID_REQUEST_BODY, format!("the {} must be a JSON object", R::NOUN))
        })?;
        match obj.get(R::ID_FIELD) {
            None | Some(Value::Null) => {
                obj.insert(R::ID_FIELD.into(), Value::String(path_id.into()));
            }
            Some(Value::String(s)) if s.eq_ignore_ascii_case(path_id) => {}
            Some(other) => {
                return Err(invalid(format!(
                    "{} in the body ({other}) does not match the {} in the path ('{path_id}')",
                    R::ID_FIELD,
                    R::NOUN
                )))
            }
        }
        let parsed: R = dps_proto::json::from_value(value).map_err(|e| body_error(R::NOUN, e))?;
        // Optimistic concurrency: retry a few times if another writer got in between, unless
        // the client asked for a specific version.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let current = self.store.get(R::COLLECTION, path_id).await?;
            let existing: Option<R> = match &current {
                Some(doc) => Some(parse_stored(&doc.body, R::NOUN, path_id)?),
                None => None,
            };
            if create_only && existing.is_some() {
                return Err(Error::Conflict(format!("{} '{path_id}' already exists", R::NOUN)));
            }
            let stored_etag = existing.as_ref().and_then(|e| e.common().etag.clone());
            if !if_match.allows(stored_etag.as_deref()) {
                return Err(precondition_failed::<R>(path_id, existing.is_some()));
            }
            let mut record = parsed.clone();
            if let Some(e) = &existing {
                // Keep the stored spelling of the ID.
                record.set_id(e.id().to_string());
            }
            record.validate_and_normalise()?;
            self.validate_common(record.common_mut(), existing.as_ref().map(|e| e.common()))?;
            let now = timestamp::format_millis(self.clock.now_millis());
            let created = existing.as_ref().and_then(|e| e.common().created_date_time_utc.clone());
            let common = record.common_mut();
            common.created_date_time_utc = Some(created.unwrap_or_else(|| now.clone()));
            common.last_updated_date_time_utc = Some(now);
            let etag = new_enrollment_etag();
            common.etag = Some(etag.clone());
            let condition = match &current {
                Some(doc) => Condition::IfMatch(doc.etag.clone()),
                None => Condition::IfAbsent,
            };
            let document = Document {
                id: record.id().to_string(),
                etag,
                partition: None,
                body: to_json(&record)?,
                expires_at: None,
            };
            let mut writes = vec![Write::Put { collection: R::COLLECTION, document, condition }];
            if self.settings.lifecycle_events {
                let kind = match (R::COLLECTION, existing.is_some()) {
                    (Collection::Enrollments, false) => EventKind::EnrollmentCreated,
                    (Collection::Enrollments, true) => EventKind::EnrollmentUpdated,
                    (_, false) => EventKind::GroupCreated,
                    (_, true) => EventKind::GroupUpdated,
                };
                writes.push(enrollment_event(
                    &self.settings.id_scope,
                    kind,
                    event_path::<R>(),
                    record.id(),
                    record.common().etag.as_deref(),
                    self.clock.now_millis(),
                )?);
            }
            match self.store.write(writes).await {
                Ok(()) => return Ok(record),
                Err(StoreError::PreconditionFailed(_) | StoreError::AlreadyExists(_))
                    if *if_match == IfMatch::Any && attempts < 5 && !create_only => {}
                Err(StoreError::AlreadyExists(_)) if create_only => {
                    return Err(Error::Conflict(format!("{} '{path_id}' already exists", R::NOUN)))
                }
                Err(StoreError::PreconditionFailed(_) | StoreError::AlreadyExists(_)) => {
                    return Err(Error::PreconditionFailed(format!(
                        "{} '{path_id}' was changed by another request; read it again and retry",
                        R::NOUN
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads a record with secrets hidden.
    pub async fn get_enrollment_record<R: EnrollmentKind>(&self, id: &str) -> Result<R, Error> {
        R::validate_id(id)?;
        let mut r: R = self.load(id).await?.ok_or_else(|| not_found::<R>(id))?;
        let hidden = without_secrets(&r.common().attestation);
        r.common_mut().attestation = hidden;
        Ok(r)
    }

    /// The attestation mechanism with secrets (the CLI's `--show-keys`).
    pub async fn get_attestation_mechanism<R: EnrollmentKind>(&self, id: &str) -> Result<AttestationMechanism, Error> {
        R::validate_id(id)?;
        let r: R = self.load(id).await?.ok_or_else(|| not_found::<R>(id))?;
        Ok(r.common().attestation.clone())
    }

    /// Deletes a record. Registration states of a deleted group are kept (docs/protocol-notes.md §10.5).
    pub async fn delete_enrollment_record<R: EnrollmentKind>(&self, id: &str, if_match: &IfMatch) -> Result<(), Error> {
        R::validate_id(id)?;
        let current = self.store.get(R::COLLECTION, id).await?.ok_or_else(|| not_found::<R>(id))?;
        // The document's etag is the record's: a record that no longer parses can still be
        // deleted (the way to clear one that was damaged outside dps).
        if !if_match.allows(Some(&current.etag)) {
            return Err(precondition_failed::<R>(id, true));
        }
        let mut writes = vec![Write::Delete {
            collection: R::COLLECTION,
            id: id.to_string(),
            condition: Condition::IfMatch(current.etag.clone()),
        }];
        if self.settings.lifecycle_events {
            let kind = if R::COLLECTION == Collection::Enrollments {
                EventKind::EnrollmentDeleted
            } else {
                EventKind::GroupDeleted
            };
            writes.push(enrollment_event(
                &self.settings.id_scope,
                kind,
                event_path::<R>(),
                &current.id,
                Some(&current.etag),
                self.clock.now_millis(),
            )?);
        }
        match self.store.write(writes).await {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound(_)) => Err(not_found::<R>(id)),
            Err(StoreError::PreconditionFailed(_)) => Err(Error::PreconditionFailed(format!(
                "{} '{id}' was changed by another request; read it again and retry",
                R::NOUN
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// One page of records (secrets hidden). As Azure does, the query text is not
    /// interpreted: every record comes back, in ID order, paged (`docs/compatibility.md`).
    pub async fn query_enrollment_records<R: EnrollmentKind>(
        &self,
        page_size: usize,
        continuation: Option<&str>,
    ) -> Result<QueryPage<R>, Error> {
        let page = self.list_page(R::COLLECTION, None, page_size, continuation).await?;
        let items = page
            .documents
            .iter()
            .map(|d| {
                let mut r: R = parse_stored(&d.body, R::NOUN, &d.id)?;
                let hidden = without_secrets(&r.common().attestation);
                r.common_mut().attestation = hidden;
                Ok(r)
            })
            .collect::<Result<Vec<R>, Error>>()?;
        Ok(QueryPage { items, continuation: page.continuation })
    }

    pub(crate) async fn list_page(
        &self,
        collection: Collection,
        partition: Option<&str>,
        page_size: usize,
        continuation: Option<&str>,
    ) -> Result<Page, Error> {
        let limit = page_size.clamp(1, MAX_PAGE_SIZE);
        self.store.list(collection, partition, continuation, limit).await.map_err(|e| match e {
            StoreError::Corrupt(m) => {
                Error::bad_request(ErrorCode::INVALID_ARGUMENT, format!("invalid x-ms-continuation token: {m}"))
            }
            other => other.into(),
        })
    }

    async fn bulk<R: EnrollmentKind>(&self, mode: BulkMode, items: Vec<Value>) -> Result<BulkOperationResult, Error> {
        if items.len() > MAX_BULK_ITEMS {
            return Err(invalid(format!(
                "a bulk operation takes at most {MAX_BULK_ITEMS} items; {} given",
                items.len()
            )));
        }
        let mut errors = Vec::new();
        for item in items {
            let id = item.get(R::ID_FIELD).and_then(Value::as_str).unwrap_or_default().to_string();
            let etag = item.get("etag").and_then(Value::as_str).map(str::to_string);
            let result = match mode {
                BulkMode::Create => self.put_enrollment_value::<R>(&id, item, &IfMatch::Any, true).await.map(drop),
                BulkMode::Update => self.put_enrollment_value::<R>(&id, item, &IfMatch::Any, false).await.map(drop),
                BulkMode::UpdateIfMatchETag => {
                    let cond = IfMatch::parse(Some(etag.as_deref().unwrap_or("\"\"")));
                    self.put_enrollment_value::<R>(&id, item, &cond, false).await.map(drop)
                }
                BulkMode::Delete => self.delete_enrollment_record::<R>(&id, &IfMatch::parse(etag.as_deref())).await,
            };
            if let Err(e) = result {
                if matches!(e, Error::Internal(_) | Error::Unavailable(_)) {
                    return Err(e);
                }
                errors.push(R::bulk_error(id, e.code().0, e.to_string()));
            }
        }
        Ok(BulkOperationResult { is_successful: errors.is_empty(), errors })
    }

    /// Runs a bulk operation on individual enrollments (at most 10 items; each item
    /// succeeds or fails on its own).
    pub async fn bulk_enrollments(&self, body: &[u8]) -> Result<BulkOperationResult, Error> {
        let op: BulkEnrollmentOperation = parse_body(body, "bulk enrollment operation")?;
        self.bulk::<IndividualEnrollment>(op.mode, op.enrollments).await
    }

    /// Runs a bulk operation on enrollment groups.
    pub async fn bulk_enrollment_groups(&self, body: &[u8]) -> Result<BulkOperationResult, Error> {
        let op: BulkEnrollmentGroupOperation = parse_body(body, "bulk enrollment group operation")?;
        self.bulk::<EnrollmentGroup>(op.mode, op.enrollment_groups).await
    }
}

fn not_found<R: EnrollmentKind>(id: &str) -> Error {
    Error::not_found(R::NOT_FOUND, format!("{} '{id}' does not exist", R::NOUN))
}

fn precondition_failed<R: EnrollmentKind>(id: &str, exists: bool) -> Error {
    if exists {
        Error::PreconditionFailed(format!(
            "the If-Match ETag does not match {} '{id}'; read it again to get its current etag",
            R::NOUN
        ))
    } else {
        Error::PreconditionFailed(format!("{} '{id}' does not exist, so If-Match cannot match", R::NOUN))
    }
}

/// The service API path of a record kind, as events name it.
fn event_path<R: EnrollmentKind>() -> &'static str {
    if R::COLLECTION == Collection::Enrollments {
        "enrollments"
    } else {
        "enrollmentGroups"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(validate_device_id("dev-1.a_b:c@d").is_ok());
        assert!(validate_device_id("").is_err());
        assert!(validate_device_id("a b").is_err());
        assert!(validate_device_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn secrets_are_hidden() {
        let a = AttestationMechanism {
            kind: AttestationType::SymmetricKey,
            tpm: None,
            x509: None,
            symmetric_key: Some(SymmetricKeyAttestation {
                primary_key: Some("p".into()),
                secondary_key: Some("s".into()),
            }),
        };
        let json = serde_json::to_value(without_secrets(&a)).unwrap();
        assert_eq!(json, serde_json::json!({"type":"symmetricKey","symmetricKey":{}}));
    }
}
