//! The TPM challenge (docs/protocol-notes.md §3.9, §6): a TPM device's first register request
//! carries its endorsement and storage root keys and no token; if the endorsement key is the
//! one of the device's individual TPM enrollment, the engine draws a fresh HMAC key, wraps it
//! for that TPM only (`crate::tpm::build_authentication_key`) and remembers it in the store
//! ([`Collection::TpmChallenges`], one record per registration ID, so it holds across a restart
//! and is the same on every node). The device imports it and signs its SAS tokens with it; the
//! authentication stage checks those against the remembered key. The same key and blob come
//! back in the assigned answer (`registrationState.tpm.authenticationKey`) and are the
//! device's hub key. A new challenge replaces the remembered key, so the previous one stops
//! working for every request that starts after it (a register request already past its
//! authentication completes with the key it proved); a key is accepted for
//! `tpm_challenge_secs` after its issue.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::device::{DeviceRegistrationResult, RegistrationStatus};
use dps_proto::error::ErrorCode;
use dps_proto::sas::SasToken;
use dps_proto::service::{AttestationType, IndividualEnrollment, ProvisioningStatus};
use dps_proto::tpm::TpmPublic;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::authenticate::{tpm_not_accepted, unauthorized, Challenge, Credential, TpmEndorsement};
use super::records::{ResolvedEnrollment, TpmHubKey};
use crate::engine::{parse_stored, to_json, DeviceRuntime};
use crate::error::Error;
use crate::store::{Collection, Condition, Document, Write};
use crate::tpm::{build_authentication_key, parse_device_key, DeviceKey};

/// The name the device imports the key under; it signs with `skn=registration`.
pub const TPM_KEY_NAME: &str = "registration";

/// Bytes of the HMAC key a challenge delivers (the size of a generated symmetric key).
const TPM_KEY_BYTES: usize = 32;

/// The key a challenge delivered, as the engine remembers it until the device has proved it
/// holds it (and for the polls after).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IssuedTpmKey {
    /// The registration ID it was issued for.
    pub(super) registration_id: String,
    /// The endorsement key it was wrapped for (base64 TPM2B_PUBLIC, as the device sent it): a
    /// key stops counting when the enrollment's endorsement key is changed.
    pub(super) endorsement_key: String,
    /// The HMAC key (base64): the device's SAS key here and its hub key.
    pub(super) key: String,
    /// The blob that delivers it (base64), sent again in the assigned answer.
    pub(super) authentication_key: String,
    /// When it was issued (Unix ms).
    pub(super) issued_millis: i64,
}

impl std::fmt::Debug for IssuedTpmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IssuedTpmKey({}, issued {})", self.registration_id, self.issued_millis)
    }
}

impl IssuedTpmKey {
    /// Whether a SAS token is signed with this key.
    pub(super) fn signed(&self, token: &SasToken) -> bool {
        BASE64.decode(&self.key).is_ok_and(|key| token.is_signed_by(&key))
    }

    /// Whether it was issued for (a TPM with) this enrollment's endorsement key: the same
    /// text (both were checked when written: what the device sends is most often what was
    /// enrolled), else the same RSA key.
    pub(super) fn for_enrollment(&self, enrollment: &IndividualEnrollment) -> bool {
        enrollment
            .common
            .attestation
            .tpm
            .as_ref()
            .is_some_and(|t| same_endorsement_key(&t.endorsement_key, &self.endorsement_key))
    }

    /// The key as the registration keeps it: the device's hub key.
    pub(super) fn hub_key(self) -> TpmHubKey {
        TpmHubKey { authentication_key: Some(self.authentication_key), key: self.key }
    }
}

fn decode_public(text: &str) -> Option<TpmPublic> {
    BASE64.decode(text.trim()).ok().and_then(|bytes| TpmPublic::parse_tpm2b(&bytes).ok())
}

/// Whether two endorsement keys (base64 TPM2B_PUBLIC, both checked when they were written or
/// received) are the same key: the same text, else the same RSA modulus and exponent
/// (protocol.md §6.2).
fn same_endorsement_key(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    a == b || matches!((decode_public(a), decode_public(b)), (Some(a), Some(b)) if a.same_rsa_key(&b))
}

fn bad(message: impl Into<String>) -> Error {
    Error::bad_request(ErrorCode::INVALID_ARGUMENT, message)
}

impl DeviceRuntime {
    /// The challenge for a TPM device's first register request. Malformed keys are refused
    /// with 400 naming the field (that tells nothing about what is enrolled); an endorsement
    /// key that is not the one of the ID's individual TPM enrollment — or an ID without one —
    /// gets the same 401, no sooner than `auth_failure_delay_ms`.
    pub(super) async fn challenge(
        &self,
        registration_id: &str,
        endorsement: &TpmEndorsement,
    ) -> Result<Challenge, Error> {
        let ek = parse_device_key("tpm.endorsementKey", &endorsement.endorsement_key, DeviceKey::Endorsement)?;
        let Some(srk_text) = endorsement.storage_root_key.as_deref() else {
            return Err(bad(
                "tpm.storageRootKey is missing: the first register request of a TPM device carries both its endorsementKey and its storageRootKey (the challenge's key is imported under the SRK)",
            ));
        };
        let srk = parse_device_key("tpm.storageRootKey", srk_text, DeviceKey::StorageRoot)?;
        let started = tokio::time::Instant::now();
        if !self.tpm_enrolled(registration_id, &endorsement.endorsement_key).await? {
            crate::info_limited!(
                "device-auth",
                registration_id,
                "TPM challenge refused: no individual TPM enrollment with this endorsement key"
            );
            tokio::time::sleep_until(started + std::time::Duration::from_millis(self.settings.auth_failure_delay_ms))
                .await;
            return Err(unauthorized(tpm_not_accepted(registration_id)));
        }
        // A challenge replaces the key of the one before, so who knows a device's (public) EK
        // can make it start again: the per-device request limit bounds how often.
        self.admit(registration_id, false)?;
        let mut key = [0u8; TPM_KEY_BYTES];
        rand::thread_rng().fill_bytes(&mut key);
        let blob = build_authentication_key(&ek, &srk, &key, &mut rand::thread_rng())
            .map_err(|e| bad(format!("tpm: no authentication key can be built for these keys: {e}")))?;
        let now = self.clock.now_millis();
        let issued = IssuedTpmKey {
            registration_id: registration_id.to_string(),
            endorsement_key: endorsement.endorsement_key.trim().to_string(),
            key: BASE64.encode(key),
            authentication_key: BASE64.encode(&blob),
            issued_millis: now,
        };
        let lifetime = i64::try_from(self.settings.tpm_challenge_secs).unwrap_or(i64::MAX / 2000) * 1000;
        let document = Document {
            id: registration_id.to_string(),
            etag: String::new(),
            partition: None,
            body: to_json(&issued)?,
            expires_at: Some(now.saturating_add(lifetime)),
        };
        // Replaces the key issued before, if any: only the newest one counts.
        self.store
            .write(vec![Write::Put { collection: Collection::TpmChallenges, document, condition: Condition::Always }])
            .await?;
        tracing::debug!(registration_id, "TPM challenge issued");
        Ok(Challenge { registration_id: registration_id.to_string(), blob, key_name: TPM_KEY_NAME.to_string() })
    }

    /// Whether the ID has an individual TPM enrollment with this endorsement key (the same
    /// text, else compared as RSA keys: protocol.md §6.2). Disabled ones count: the device
    /// proves its key first and then learns that it is disabled, as with a symmetric key.
    async fn tpm_enrolled(&self, registration_id: &str, endorsement_key: &str) -> Result<bool, Error> {
        let Some(doc) = self.store.get(Collection::Enrollments, registration_id).await? else {
            return Ok(false);
        };
        let enrollment: IndividualEnrollment = parse_stored(&doc.body, "enrollment", registration_id)?;
        Ok(match (&enrollment.common.attestation.kind, &enrollment.common.attestation.tpm) {
            (AttestationType::Tpm, Some(tpm)) => same_endorsement_key(&tpm.endorsement_key, endorsement_key),
            _ => false,
        })
    }

    /// The key last issued to a registration ID, while it is accepted.
    pub(super) async fn issued_tpm_key(&self, registration_id: &str) -> Result<Option<IssuedTpmKey>, Error> {
        let Some(doc) = self.store.get(Collection::TpmChallenges, registration_id).await? else {
            return Ok(None);
        };
        if doc.expires_at.is_some_and(|t| t <= self.clock.now_millis()) {
            return Ok(None);
        }
        parse_stored(&doc.body, "TPM challenge", registration_id).map(Some)
    }

    /// Puts `registrationState.tpm.authenticationKey` into an assigned TPM answer whose stored
    /// form left it out (`TpmHubKey`): the blob of the device's challenge record, when that
    /// still holds the key `digest` names. A device that can ask has just proved that key
    /// (its token is checked against the same record), so the record is there unless it
    /// expired or a newer challenge replaced it since the device's registration; then the
    /// answer goes without the blob, and the device registers again. `proven` is the key the
    /// request's authentication already read from that record (HTTPS, and an AMQP poll's key
    /// check); without it (a device whose enrollment is disabled now, whose token no key
    /// check looks at) the record is read here.
    pub(super) async fn restore_tpm_blob(
        &self,
        registration_id: &str,
        state: &mut DeviceRegistrationResult,
        digest: &str,
        proven: Option<TpmHubKey>,
    ) -> Result<(), Error> {
        if state.tpm.is_some() || state.status != RegistrationStatus::Assigned {
            return Ok(());
        }
        let issued = match proven {
            Some(key) => Some(key),
            None => self.issued_tpm_key(registration_id).await?.map(IssuedTpmKey::hub_key),
        };
        match issued.filter(|key| key.digest() == digest) {
            Some(key) => state.tpm = key.answer(),
            None => tracing::info!(
                registration_id,
                "assigned TPM answer without its authenticationKey: the challenge of that key expired or was replaced; the device registers again"
            ),
        }
        Ok(())
    }

    /// The key a TPM device's token is signed with, for its enrollment: the one issued last,
    /// still accepted, for the enrollment's endorsement key. `None` when the token is not
    /// signed with it (an older key, a forged token).
    pub(super) async fn tpm_key_for(
        &self,
        registration_id: &str,
        enrollment: &IndividualEnrollment,
        token: &SasToken,
    ) -> Result<Option<IssuedTpmKey>, Error> {
        Ok(self
            .issued_tpm_key(registration_id)
            .await?
            .filter(|issued| issued.for_enrollment(enrollment) && issued.signed(token)))
    }

    /// A TPM device's hub key when its re-check did not read it (a connection's device whose
    /// token and enrollment are unchanged, [`DeviceRuntime::recheck`]): the key of the challenge
    /// its token is signed with; refused when a challenge issued since has replaced it, it
    /// expired, or the enrollment's endorsement key changed. A disabled enrollment needs none
    /// (its answer carries no key; a group member's token that a disabled individual TPM
    /// enrollment revokes is signed with no TPM key at all).
    pub(super) async fn tpm_hub_key(
        &self,
        registration_id: &str,
        credential: &Credential,
        enrollment: &ResolvedEnrollment,
    ) -> Result<Option<TpmHubKey>, Error> {
        let (ResolvedEnrollment::Individual(e), Credential::Sas(text)) = (enrollment, credential) else {
            return Ok(None);
        };
        if e.common.attestation.kind != AttestationType::Tpm
            || e.common.provisioning_status == Some(ProvisioningStatus::Disabled)
        {
            return Ok(None);
        }
        let token = SasToken::parse(text).map_err(|e| unauthorized(format!("invalid SAS token: {e}")))?;
        match self.tpm_key_for(registration_id, e, &token).await? {
            Some(issued) => Ok(Some(issued.hub_key())),
            None => Err(unauthorized(format!(
                "the TPM key this token is signed with is no longer accepted for registration ID '{registration_id}': a newer challenge replaced it, it expired (device.tpm_challenge_secs), or the enrollment's endorsement key changed; send the register request without a token to get a new challenge"
            ))),
        }
    }
}
