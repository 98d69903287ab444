//! The authentication stage: the credential a transport saw (SAS token, certificate chain, a
//! TPM's endorsement key) checked against the enrollments. The answer is an
//! [`Authentication`]: the device is authenticated (its resolved enrollment), or it must first
//! answer a [`Challenge`] (TPM, docs/protocol-notes.md §3.9 and §6) — or a refusal that does
//! not tell which IDs exist.

use dps_proto::error::ErrorCode;
use dps_proto::ids::{validate_id_scope, validate_registration_id};
use dps_proto::sas::{device_resource, SasToken};
use dps_proto::service::{AttestationType, EnrollmentGroup, IndividualEnrollment, ProvisioningStatus};

use super::records::{ResolvedEnrollment, TpmHubKey};
use crate::attestation::{verify_group, verify_individual};
use crate::engine::{parse_stored, DeviceRuntime};
use crate::error::Error;
use crate::store::Collection;

/// How the device proved its identity, as the transport saw it.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A SAS token (HTTP `Authorization`, MQTT password, SASL PLAIN password).
    Sas(String),
    /// The certificate chain the device presented in the TLS handshake (DER, leaf first).
    X509(std::sync::Arc<Vec<Vec<u8>>>),
    /// A TPM's public keys, sent in the register body without a token: the device asks for the
    /// challenge it then answers with a SAS signed by the key the challenge delivers.
    TpmEndorsement(TpmEndorsement),
    /// Nothing.
    None,
}

/// The public keys a TPM device sends with its first register request (base64 TPM2B_PUBLIC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmEndorsement {
    /// The endorsement key.
    pub endorsement_key: String,
    /// The storage root key, under which the challenge's key is to be imported.
    pub storage_root_key: Option<String>,
}

/// A device the authentication stage accepted: the enrollment it resolved to and, for a TPM
/// device, the key its token is signed with (the last challenge's key, its hub key), so that
/// the register path need not look the challenge up again.
#[derive(Debug)]
pub(super) struct Proven {
    /// The enrollment.
    pub(super) enrollment: ResolvedEnrollment,
    /// TPM devices: the key the token was checked against.
    pub(super) tpm_key: Option<TpmHubKey>,
}

/// The authentication stage's outcome for one request: the enrollment the device resolved to,
/// or the challenge it must answer first.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(super) enum Resolved {
    /// Authenticated, with this enrollment.
    Enrollment(Proven),
    /// A challenge to send.
    Challenge(Challenge),
}

/// What the authentication stage concludes about a device that is not refused.
#[derive(Debug, Clone)]
// Returned once per request and matched at once: boxing the common variant would cost an
// allocation per registration to save stack space for the rare one.
#[allow(clippy::large_enum_variant)]
pub enum Authentication {
    /// The device proved who it is.
    Authenticated(AuthenticatedDevice),
    /// The device must first prove that it holds a key: the transport sends the challenge and
    /// the device comes back with the proof (TPM over HTTPS: a `401` carrying the challenge, then
    /// a SAS signed with the key it delivers; AMQP: the SASL `TPM` exchange).
    Challenge(Challenge),
}

/// A challenge for a device (TPM, docs/protocol-notes.md §3.9 and §6): what the transport must
/// send. What the engine needs to check the answer stays in the engine.
#[derive(Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The registration ID it was issued for.
    pub registration_id: String,
    /// The bytes to send (TPM: the `authenticationKey` blob the device imports into its TPM).
    pub blob: Vec<u8>,
    /// The name the device imports the key under (TPM over HTTPS: `keyName`).
    pub key_name: String,
}

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The blob wraps a key for one TPM only, but there is no reason to log it.
        write!(f, "Challenge({}, {} bytes, key {})", self.registration_id, self.blob.len(), self.key_name)
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Sas(_) => f.write_str("Sas(<redacted>)"),
            Credential::X509(chain) => write!(f, "X509({} certificates)", chain.len()),
            Credential::TpmEndorsement(_) => f.write_str("TpmEndorsement"),
            Credential::None => f.write_str("None"),
        }
    }
}

/// A device that proved who it is: what a connection-oriented transport (MQTT at CONNECT,
/// AMQP after SASL) keeps for the rest of the connection and hands to every register and poll
/// ([`DeviceRuntime::register_device`], [`DeviceRuntime::operation_status_of`]). Those re-check only what can
/// have changed since: the credential's validity, and whether the enrollment (or, for an X.509
/// group member, the certificate store) was written since; a change means a full check again.
#[derive(Debug, Clone)]
pub struct AuthenticatedDevice {
    id_scope: String,
    registration_id: String,
    credential: Credential,
    /// The enrollment it resolved to, as it was when checked (its etag included).
    enrollment: ResolvedEnrollment,
    /// The certificate store's version when an X.509 device was checked (whether its CA is
    /// verified can change there).
    certificates_version: Option<u64>,
    /// Unix seconds past which the credential no longer holds as checked: the token's expiry
    /// plus the allowed clock skew, or the earliest `notAfter` of the certificates presented.
    valid_until: Option<u64>,
}

impl AuthenticatedDevice {
    /// The ID scope it authenticated for.
    pub fn id_scope(&self) -> &str {
        &self.id_scope
    }

    /// Its registration ID, as the device spelled it.
    pub fn registration_id(&self) -> &str {
        &self.registration_id
    }

    /// The credential it proved its identity with.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The enrollment it resolved to when last checked.
    pub fn enrollment(&self) -> &ResolvedEnrollment {
        &self.enrollment
    }
}

pub(super) fn unauthorized(message: impl Into<String>) -> Error {
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

/// The same for TPM: no TPM enrollment with this endorsement key answers for the ID.
pub(crate) fn tpm_not_accepted(registration_id: &str) -> String {
    format!(
        "the TPM endorsement key is not accepted for registration ID '{registration_id}': it must be the endorsementKey of the device's individual enrollment"
    )
}

/// The same for X.509: the certificate's CN and validity were fine, but it matches no
/// enrollment (not pinned, no group's CA, no verified CA in the chain).
pub(crate) fn x509_not_accepted(registration_id: &str) -> String {
    format!(
        "the device certificate is not accepted for registration ID '{registration_id}': it must be an individual enrollment's client certificate, or chain to an enrollment group's CA that is verified in the certificate store"
    )
}

impl DeviceRuntime {
    pub(super) fn check_scope_and_id(&self, id_scope: &str, registration_id: &str) -> Result<(), Error> {
        validate_id_scope(id_scope).map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        validate_registration_id(registration_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        if !id_scope.eq_ignore_ascii_case(&self.settings.id_scope) {
            return Err(unauthorized(format!("ID scope '{id_scope}' is not served by this instance")));
        }
        Ok(())
    }

    /// Checks the ID scope and registration ID grammar, then authenticates the device, as a
    /// connection-oriented transport does once at connect time (MQTT CONNECT, AMQP SASL) and
    /// the HTTPS register does per request: the device is authenticated, or it gets a
    /// challenge (a TPM's endorsement key without a token).
    pub async fn authenticate_device(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<Authentication, Error> {
        self.check_scope_and_id(id_scope, registration_id)?;
        let certificates_version = self.certificates_version_for(credential).await?;
        Ok(match self.authenticate_or_challenge(id_scope, registration_id, credential).await? {
            Resolved::Enrollment(proven) => Authentication::Authenticated(self.device(
                id_scope,
                registration_id,
                credential,
                proven.enrollment,
                certificates_version,
            )),
            Resolved::Challenge(challenge) => Authentication::Challenge(challenge),
        })
    }

    /// The certificate store's version for an X.509 device, read before what it guards: a
    /// write in between only makes the next check a full one.
    async fn certificates_version_for(&self, credential: &Credential) -> Result<Option<u64>, Error> {
        Ok(match credential {
            Credential::X509(_) => Some(self.store.version(Collection::Certificates).await?),
            _ => None,
        })
    }

    /// The device as a connection keeps it after it authenticated.
    fn device(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
        enrollment: ResolvedEnrollment,
        certificates_version: Option<u64>,
    ) -> AuthenticatedDevice {
        AuthenticatedDevice {
            id_scope: id_scope.to_string(),
            registration_id: registration_id.to_string(),
            credential: credential.clone(),
            enrollment,
            certificates_version,
            valid_until: self.valid_until(credential),
        }
    }

    /// The authentication stage itself: a TPM's endorsement key without a token goes to the
    /// challenge, every other credential is checked against the enrollments.
    pub(super) async fn authenticate_or_challenge(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<Resolved, Error> {
        match credential {
            Credential::TpmEndorsement(endorsement) => {
                self.challenge(registration_id, endorsement).await.map(Resolved::Challenge)
            }
            _ => self.authenticate(id_scope, registration_id, credential).await.map(Resolved::Enrollment),
        }
    }

    /// The enrollment of an authenticated device for its next request: the one it was checked
    /// against when neither it (nor the certificate store, for X.509) has been written since
    /// and the credential is still valid; otherwise the device is checked again in full (and
    /// `device` updated), which gives a refusal exactly as a new connection would get. A TPM
    /// device's key is checked either way: a new challenge replaces it without changing the
    /// token or the enrollment.
    pub(super) async fn recheck(&self, device: &mut AuthenticatedDevice) -> Result<Proven, Error> {
        let now = self.clock.now_secs();
        if device.valid_until.is_some_and(|t| now <= t) {
            if let Some(enrollment) = self.unchanged_enrollment(device).await? {
                let tpm_key = self.tpm_hub_key(&device.registration_id, &device.credential, &enrollment).await?;
                return Ok(Proven { enrollment, tpm_key });
            }
        }
        let certificates_version = self.certificates_version_for(&device.credential).await?;
        let proven = self.authenticate(&device.id_scope, &device.registration_id, &device.credential).await?;
        *device = self.device(
            &device.id_scope,
            &device.registration_id,
            &device.credential,
            proven.enrollment.clone(),
            certificates_version,
        );
        Ok(proven)
    }

    /// The device's enrollment as stored now, if it is the very version it was checked against
    /// (and no individual enrollment has appeared for a group member: that one decides first).
    async fn unchanged_enrollment(&self, device: &AuthenticatedDevice) -> Result<Option<ResolvedEnrollment>, Error> {
        if let Some(checked) = device.certificates_version {
            if self.store.version(Collection::Certificates).await? != checked {
                return Ok(None);
            }
        }
        let individual = self.store.get(Collection::Enrollments, &device.registration_id).await?;
        Ok(match (&device.enrollment, individual) {
            (ResolvedEnrollment::Individual(e), Some(doc)) if e.common.etag.as_deref() == Some(doc.etag.as_str()) => {
                Some(device.enrollment.clone())
            }
            (ResolvedEnrollment::Group(g), None) => self
                .enrollment_groups()
                .await?
                .iter()
                .find(|now| {
                    now.enrollment_group_id.eq_ignore_ascii_case(&g.enrollment_group_id)
                        && now.common.etag.is_some()
                        && now.common.etag == g.common.etag
                })
                .map(|now| ResolvedEnrollment::Group(now.clone())),
            _ => None,
        })
    }

    /// Until when a credential holds as checked (Unix seconds).
    fn valid_until(&self, credential: &Credential) -> Option<u64> {
        match credential {
            Credential::Sas(text) => {
                SasToken::parse(text).ok().map(|t| t.expiry.saturating_add(self.settings.sas_clock_skew_secs))
            }
            Credential::X509(chain) => chain
                .iter()
                .map(|der| crate::x509::facts(der).ok().and_then(|f| u64::try_from(f.not_after).ok()))
                .try_fold(u64::MAX, |earliest, t| t.map(|t| earliest.min(t))),
            Credential::TpmEndorsement(_) | Credential::None => None,
        }
    }

    /// Authenticates a device and resolves its enrollment: the individual enrollment when
    /// one exists (a disabled one blocks the device even if a group would accept it), else
    /// the first symmetric-key group (by ID) whose derived key validates the token. A refusal
    /// is answered no sooner than `auth_failure_delay_ms` after the call began, so that the
    /// answer time does not tell an unknown ID from a wrong key either.
    pub(super) async fn authenticate(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<Proven, Error> {
        let started = tokio::time::Instant::now();
        let result = self.resolve_credential(id_scope, registration_id, credential).await;
        if matches!(result, Err(Error::Unauthorized(_))) {
            tokio::time::sleep_until(started + std::time::Duration::from_millis(self.settings.auth_failure_delay_ms))
                .await;
        }
        result
    }

    pub(super) async fn resolve_credential(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<Proven, Error> {
        let text = match credential {
            Credential::Sas(t) => t,
            Credential::X509(chain) => {
                let enrollment = self.authenticate_x509(registration_id, chain).await?;
                return Ok(Proven { enrollment, tpm_key: None });
            }
            // Only a register request can start the challenge (`authenticate_device`); a TPM
            // device's other requests carry the SAS signed with the key it was given.
            Credential::TpmEndorsement(_) => return Err(unauthorized(tpm_not_accepted(registration_id))),
            Credential::None => {
                return Err(unauthorized(
                    "no credential: send a SAS token signed with the enrollment's symmetric key (HTTP Authorization header, MQTT password), a client certificate in the TLS handshake, or (TPM) the register request with tpm.endorsementKey and tpm.storageRootKey to get the key to sign it with",
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
            let (signed, tpm_key) = match (e.common.attestation.kind, &e.common.attestation.symmetric_key) {
                (AttestationType::SymmetricKey, Some(sk)) => (verify_individual(&token, sk).is_some(), None),
                // Signed with the key the TPM imported from the last challenge.
                (AttestationType::Tpm, _) => {
                    let issued = self.tpm_key_for(registration_id, &e, &token).await?;
                    (issued.is_some(), issued.map(|k| k.hub_key()))
                }
                _ => (false, None),
            };
            // A disabled individual enrollment also answers for a group member's key, so
            // that it revokes that member (docs/protocol-notes.md §10.1).
            let disabled = e.common.provisioning_status == Some(ProvisioningStatus::Disabled);
            if signed || (disabled && self.find_group_for(&token, registration_id).await?.is_some()) {
                return Ok(Proven { enrollment: ResolvedEnrollment::Individual(e), tpm_key });
            }
            crate::info_limited!("device-auth", registration_id, attestation = ?e.common.attestation.kind, disabled,
                "SAS rejected: signature does not match the individual enrollment's keys");
            return Err(unauthorized(sas_not_accepted(registration_id)));
        }
        match self.find_group_for(&token, registration_id).await? {
            Some(g) => Ok(Proven { enrollment: ResolvedEnrollment::Group(g), tpm_key: None }),
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

    pub(super) async fn find_group_for(
        &self,
        token: &SasToken,
        registration_id: &str,
    ) -> Result<Option<EnrollmentGroup>, Error> {
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
}
