//! The certificate store (CA certificates verified by proof of possession) and X.509 device
//! authentication (docs/protocol-notes.md §7).
//!
//! A CA certificate is uploaded under a name, then verified: either by proof of possession
//! (the service issues a verification code, the owner uploads a certificate with that code as
//! its subject CN signed by the CA's key) or directly by an operator. X.509 group members must
//! present a chain that reaches a verified certificate (unless `require_verified_ca` is off);
//! groups name their CA in `signingCertificates` or by `caReferences` to this store.

use std::sync::Arc;

use dps_proto::error::ErrorCode;
use dps_proto::service::{AttestationType, EnrollmentGroup, IndividualEnrollment, X509Attestation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::{parse_body, parse_stored, Core, Management, VerifiedCas};
use crate::error::Error;
use crate::etag::IfMatch;
use crate::registration::ResolvedEnrollment;
use crate::store::{Collection, Condition, Document, StoreError, Write};
use crate::x509::{decode_certificate_text, facts, verify_chain, CertificateFacts, X509Error};

/// A CA certificate of the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    /// Name.
    pub name: String,
    /// DER, base64.
    pub certificate: String,
    /// Verified by proof of possession or by an operator.
    pub is_verified: bool,
    /// The code the verification certificate's subject CN must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
    /// Created, Unix milliseconds.
    pub created_millis: i64,
    /// Last changed, Unix milliseconds.
    pub updated_millis: i64,
}

/// Body of a certificate upload (`PUT /certificates/{name}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadBody {
    certificate: String,
    #[serde(default)]
    is_verified: bool,
}

/// Body of a verification (`POST /certificates/{name}/verify`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerifyBody {
    certificate: String,
}

fn b64(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der)
}

fn der_of(c: &CaCertificate) -> Result<Vec<u8>, Error> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(&c.certificate)
        .map_err(|e| Error::Internal(format!("stored certificate '{}' is not base64: {e}", c.name)))
}

fn validate_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(Error::bad_request(
            ErrorCode::INVALID_IDENTIFIER,
            format!("certificate name '{name}' must be 1-128 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(())
}

fn x509_bad_request(what: &str, e: X509Error) -> Error {
    Error::bad_request(ErrorCode::INVALID_ARGUMENT, format!("{what}: {e}"))
}

fn not_found(name: &str) -> Error {
    Error::not_found(ErrorCode::ROUTE_NOT_FOUND, format!("no certificate named '{name}' in the certificate store"))
}

fn rfc3339_millis(ms: i64) -> String {
    dps_proto::timestamp::format_millis(ms)
}

impl CaCertificate {
    /// The service API's view (the shape of DPS's management-plane certificate resource).
    pub fn view(&self, etag: &str) -> Value {
        let f = der_of(self).ok().and_then(|d| facts(&d).ok());
        json!({
            "name": self.name,
            "etag": etag,
            "properties": {
                "subject": f.as_ref().map(|f| f.subject_name.clone()),
                "expiry": f.as_ref().map(|f| f.info()["notAfterUtc"].clone()),
                "thumbprint": f.as_ref().map(|f| f.sha1_thumbprint.clone()),
                "thumbprintSha256": f.as_ref().map(|f| f.sha256_thumbprint.clone()),
                "isVerified": self.is_verified,
                "verificationCode": self.verification_code,
                "created": rfc3339_millis(self.created_millis),
                "updated": rfc3339_millis(self.updated_millis),
            }
        })
    }
}

fn map_store(e: StoreError, name: &str) -> Error {
    match e {
        StoreError::PreconditionFailed(_) => Error::PreconditionFailed(format!(
            "the certificate '{name}' has changed (or does not exist): read it again for its current etag"
        )),
        StoreError::NotFound(_) => not_found(name),
        other => other.into(),
    }
}

impl Management {
    async fn load_certificate(&self, name: &str) -> Result<(CaCertificate, String), Error> {
        validate_name(name)?;
        let doc = self.store.get(Collection::Certificates, name).await?.ok_or_else(|| not_found(name))?;
        Ok((parse_stored(&doc.body, "certificate", name)?, doc.etag))
    }

    async fn save_certificate(&self, cert: &CaCertificate, condition: Condition) -> Result<String, Error> {
        let etag = crate::etag::new_enrollment_etag();
        let body = serde_json::to_string(cert).map_err(|e| Error::Internal(e.to_string()))?;
        let document = Document { id: cert.name.clone(), etag: etag.clone(), partition: None, body, expires_at: None };
        self.store
            .write(vec![Write::Put { collection: Collection::Certificates, document, condition }])
            .await
            .map_err(|e| map_store(e, &cert.name))?;
        Ok(etag)
    }

    fn condition(if_match: &IfMatch, etag: Option<&str>) -> Result<Condition, Error> {
        if !if_match.allows(etag) {
            return Err(Error::PreconditionFailed("If-Match does not match the certificate's etag".into()));
        }
        Ok(match etag {
            Some(e) => Condition::IfMatch(e.to_string()),
            None => Condition::IfAbsent,
        })
    }

    /// Uploads (creates or replaces) a CA certificate. `isVerified: true` marks it verified
    /// without proof of possession (the caller holds the ServiceConfig right).
    pub async fn put_certificate(&self, name: &str, body: &[u8], if_match: &IfMatch) -> Result<Value, Error> {
        validate_name(name)?;
        let upload: UploadBody = parse_body(body, "certificate upload ({\"certificate\": \"<PEM>\"})")?;
        let der = decode_certificate_text(&upload.certificate).map_err(|e| x509_bad_request("certificate", e))?;
        let f = facts(&der).map_err(|e| x509_bad_request("certificate", e))?;
        if !f.is_ca {
            return Err(Error::bad_request(
                ErrorCode::INVALID_ARGUMENT,
                format!("'{}' is not a CA certificate (basicConstraints cA is not true)", f.subject_name),
            ));
        }
        let existing = self.store.get(Collection::Certificates, name).await?;
        let etag = existing.as_ref().map(|d| d.etag.clone());
        let condition = Self::condition(if_match, etag.as_deref())?;
        let now = self.clock.now_millis();
        let created = match &existing {
            Some(d) => parse_stored::<CaCertificate>(&d.body, "certificate", name)?.created_millis,
            None => now,
        };
        let cert = CaCertificate {
            name: name.to_string(),
            certificate: b64(&der),
            is_verified: upload.is_verified,
            verification_code: None,
            created_millis: created,
            updated_millis: now,
        };
        let etag = self.save_certificate(&cert, condition).await?;
        tracing::info!(name, subject = f.subject_name, verified = cert.is_verified, "CA certificate uploaded");
        Ok(cert.view(&etag))
    }

    /// Reads a CA certificate.
    pub async fn get_certificate(&self, name: &str) -> Result<Value, Error> {
        let (cert, etag) = self.load_certificate(name).await?;
        Ok(cert.view(&etag))
    }

    /// Lists every CA certificate.
    pub async fn list_certificates(&self) -> Result<Vec<Value>, Error> {
        Ok(self.all_certificates().await?.iter().map(|(c, etag)| c.view(etag)).collect())
    }

    /// Deletes a CA certificate.
    pub async fn delete_certificate(&self, name: &str, if_match: &IfMatch) -> Result<(), Error> {
        let (_, etag) = self.load_certificate(name).await?;
        let condition = Self::condition(if_match, Some(&etag))?;
        self.store
            .write(vec![Write::Delete { collection: Collection::Certificates, id: name.to_string(), condition }])
            .await
            .map_err(|e| map_store(e, name))?;
        tracing::info!(name, "CA certificate deleted");
        Ok(())
    }

    /// Issues a new verification code for proof of possession.
    pub async fn generate_verification_code(&self, name: &str, if_match: &IfMatch) -> Result<Value, Error> {
        let (mut cert, etag) = self.load_certificate(name).await?;
        let condition = Self::condition(if_match, Some(&etag))?;
        let code: String = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        cert.verification_code = Some(code);
        cert.updated_millis = self.clock.now_millis();
        let etag = self.save_certificate(&cert, condition).await?;
        Ok(cert.view(&etag))
    }

    /// Completes proof of possession: the uploaded certificate must have the verification
    /// code as its subject CN and be signed by the CA's key.
    pub async fn verify_certificate(&self, name: &str, if_match: &IfMatch, body: &[u8]) -> Result<Value, Error> {
        let (mut cert, etag) = self.load_certificate(name).await?;
        let condition = Self::condition(if_match, Some(&etag))?;
        let Some(code) = cert.verification_code.clone() else {
            return Err(Error::bad_request(
                ErrorCode::INVALID_ARGUMENT,
                format!("certificate '{name}' has no verification code yet: POST /certificates/{name}/generateVerificationCode first"),
            ));
        };
        let upload: VerifyBody = parse_body(body, "verification ({\"certificate\": \"<PEM>\"})")?;
        let der = decode_certificate_text(&upload.certificate)
            .map_err(|e| x509_bad_request("verification certificate", e))?;
        let f = facts(&der).map_err(|e| x509_bad_request("verification certificate", e))?;
        if f.common_name.as_deref() != Some(code.as_str()) {
            return Err(Error::bad_request(
                ErrorCode::INVALID_ARGUMENT,
                format!(
                    "the verification certificate's subject CN is {:?}; it must be the verification code {code}",
                    f.common_name.unwrap_or_default()
                ),
            ));
        }
        let ca = der_of(&cert)?;
        let now = self.clock.now_secs() as i64;
        crate::x509::verify_signed_by(&der, &ca, now).map_err(|e| {
            Error::bad_request(
                ErrorCode::INVALID_ARGUMENT,
                format!("the verification certificate is not signed by certificate '{name}', or is not valid now: {e}"),
            )
        })?;
        cert.is_verified = true;
        cert.verification_code = None;
        cert.updated_millis = self.clock.now_millis();
        let etag = self.save_certificate(&cert, condition).await?;
        tracing::info!(name, "CA certificate verified by proof of possession");
        Ok(cert.view(&etag))
    }
}

/// What the device plane needs of the certificate store (X.509 authentication), and the
/// listing both planes use.
impl Core {
    /// Every CA certificate of the store, parsed, with its etag (page after page).
    pub(crate) async fn all_certificates(&self) -> Result<Vec<(CaCertificate, String)>, Error> {
        let mut out = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let page = self.store.list(Collection::Certificates, None, continuation.as_deref(), 500).await?;
            for doc in page.documents {
                let c: CaCertificate = parse_stored(&doc.body, "certificate", &doc.id)?;
                out.push((c, doc.etag));
            }
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// The verified CA certificates of the store, parsed: from the cache when the store's
    /// version of the collection has not moved since it was filled.
    async fn verified_cas(&self) -> Result<Arc<VerifiedCas>, Error> {
        self.cached(&self.verified_cas, Collection::Certificates, || async {
            let mut out = Vec::new();
            for (c, _) in self.all_certificates().await?.into_iter().filter(|(c, _)| c.is_verified) {
                let der = der_of(&c)?;
                if let Ok(f) = facts(&der) {
                    out.push((c.name, der, f));
                }
            }
            Ok(out)
        })
        .await
    }

    /// X.509 device authentication: the leaf's CN must be the registration ID; an individual
    /// enrollment for the ID decides first (thumbprint match), else the enrollment group whose
    /// CA is nearest the leaf in the device's chain.
    pub(crate) async fn authenticate_x509(
        &self,
        registration_id: &str,
        chain: &Arc<Vec<Vec<u8>>>,
    ) -> Result<ResolvedEnrollment, Error> {
        // What the device presented is its own to know (CN, validity); whether and how it
        // matches an enrollment is not: those refusals get one message, the log the reason.
        let unauthorized = |m: String| {
            crate::info_limited!("device-auth", registration_id, reason = %m, "X.509 authentication refused");
            Error::Unauthorized(m)
        };
        let not_accepted = |m: String| {
            crate::info_limited!("device-auth", registration_id, reason = %m, "X.509 authentication refused");
            Error::Unauthorized(crate::registration::x509_not_accepted(registration_id))
        };
        let Some(leaf) = chain.first() else {
            return Err(unauthorized("no client certificate in the TLS handshake".into()));
        };
        let leaf_facts = facts(leaf).map_err(|e| unauthorized(format!("the device certificate: {e}")))?;
        match &leaf_facts.common_name {
            Some(cn) if cn.eq_ignore_ascii_case(registration_id) => {}
            Some(cn) => {
                return Err(unauthorized(format!(
                    "the device certificate's subject CN '{cn}' differs from the registration ID '{registration_id}'"
                )))
            }
            None => {
                return Err(unauthorized(
                    "the device certificate has no subject CN; it must be the registration ID".into(),
                ))
            }
        }
        let now = self.clock.now_secs() as i64;
        leaf_facts.check_time(now, "device certificate").map_err(|e| unauthorized(e.to_string()))?;

        if let Some(doc) = self.store.get(Collection::Enrollments, registration_id).await? {
            let e: IndividualEnrollment = parse_stored(&doc.body, "enrollment", registration_id)?;
            let disabled = e.common.provisioning_status == Some(dps_proto::service::ProvisioningStatus::Disabled);
            let pinned = e.common.attestation.kind == AttestationType::X509
                && e.common.attestation.x509.as_ref().is_some_and(|x| client_certificate_matches(x, &leaf_facts));
            if pinned {
                return Ok(ResolvedEnrollment::Individual(e));
            }
            // A disabled individual enrollment revokes a group member too (docs/protocol-notes.md §7).
            if disabled && self.find_x509_group(registration_id, chain, now).await?.is_ok() {
                return Ok(ResolvedEnrollment::Individual(e));
            }
            return Err(not_accepted(format!(
                "the device certificate (SHA-256 {}) is not a client certificate of the individual enrollment '{registration_id}'",
                leaf_facts.sha256_thumbprint
            )));
        }
        self.find_x509_group(registration_id, chain, now).await?.map(ResolvedEnrollment::Group).map_err(not_accepted)
    }

    /// The X.509 group for a chain, or the reason there is none; a store failure is an error
    /// of its own (503, not a refusal).
    async fn find_x509_group(
        &self,
        registration_id: &str,
        chain: &Arc<Vec<Vec<u8>>>,
        now: i64,
    ) -> Result<Result<EnrollmentGroup, String>, Error> {
        let verified = self.verified_cas().await?;
        let chain_facts: Vec<Option<CertificateFacts>> = chain.iter().map(|d| facts(d).ok()).collect();
        let intermediates: Vec<Vec<u8>> = chain.iter().skip(1).cloned().collect();
        let mut best: Option<(usize, EnrollmentGroup)> = None;
        let mut reasons: Vec<String> = Vec::new();
        let groups = self.enrollment_groups().await?;
        {
            for g in groups.iter() {
                let Some(x) =
                    g.common.attestation.x509.as_ref().filter(|_| g.common.attestation.kind == AttestationType::X509)
                else {
                    continue;
                };
                for (ca_der, from_store) in group_cas(x, &verified) {
                    let Ok(ca_facts) = facts(&ca_der) else { continue };
                    // Position of the CA in the device's chain: 1 = first intermediate; past the
                    // end = the issuer of the last certificate sent.
                    let position = chain_facts
                        .iter()
                        .enumerate()
                        .skip(1)
                        .find(|(_, f)| f.as_ref().is_some_and(|f| f.sha256_thumbprint == ca_facts.sha256_thumbprint))
                        .map(|(i, _)| i)
                        .unwrap_or(chain.len());
                    if best.as_ref().is_some_and(|(p, _)| *p <= position) {
                        continue;
                    }
                    if let Err(e) = verify_chain(&chain[0], &intermediates, &ca_der, now) {
                        if !matches!(&e, X509Error::Chain(m) if m.contains("does not lead")) {
                            reasons.push(format!("group '{}': {e}", g.enrollment_group_id));
                        }
                        continue;
                    }
                    if self.settings.require_verified_ca && !from_store {
                        // The group's CA is verified, or a validated path from the device
                        // certificate (through the group's CA, when it is not sent) ends at a
                        // verified CA. A verified certificate that is merely sent along counts
                        // for nothing: verified CAs are public.
                        let mut through_group_ca = intermediates.clone();
                        through_group_ca.push(ca_der.clone());
                        let reaches_verified = verified.iter().any(|(_, der, vf)| {
                            vf.sha256_thumbprint == ca_facts.sha256_thumbprint
                                || verify_chain(&chain[0], &through_group_ca, der, now).is_ok()
                        });
                        if !reaches_verified {
                            reasons.push(format!(
                                "group '{}': the chain reaches its signing certificate '{}', but no certificate in the chain is verified in the certificate store (upload the CA and verify it, or set x509.require_verified_ca = false)",
                                g.enrollment_group_id, ca_facts.subject_name
                            ));
                            continue;
                        }
                    }
                    best = Some((position, g.clone()));
                }
            }
        }
        Ok(match best {
            Some((_, g)) => Ok(g),
            None if reasons.is_empty() => Err(format!(
                "no individual enrollment for '{registration_id}' and no X.509 enrollment group whose CA the device's certificate chain leads to"
            )),
            None => Err(reasons.join("; ")),
        })
    }
}

fn client_certificate_matches(x: &X509Attestation, leaf: &CertificateFacts) -> bool {
    let Some(certs) = &x.client_certificates else { return false };
    [&certs.primary, &certs.secondary].into_iter().flatten().any(|c| {
        c.certificate
            .as_deref()
            .and_then(|t| decode_certificate_text(t).ok())
            .and_then(|der| facts(&der).ok())
            .is_some_and(|f| f.sha256_thumbprint == leaf.sha256_thumbprint)
    })
}

/// A group's CA certificates: its signing certificates, and the verified store certificates
/// its `caReferences` name (marked `true`).
fn group_cas(x: &X509Attestation, verified: &[(String, Vec<u8>, CertificateFacts)]) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    if let Some(s) = &x.signing_certificates {
        for c in [&s.primary, &s.secondary].into_iter().flatten() {
            if let Some(der) = c.certificate.as_deref().and_then(|t| decode_certificate_text(t).ok()) {
                out.push((der, false));
            }
        }
    }
    if let Some(r) = &x.ca_references {
        for name in [&r.primary, &r.secondary].into_iter().flatten() {
            if let Some((_, der, _)) = verified.iter().find(|(n, _, _)| n.eq_ignore_ascii_case(name)) {
                out.push((der.clone(), true));
            }
        }
    }
    out
}
