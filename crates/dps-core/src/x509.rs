//! X.509 certificates (docs/protocol-notes.md §7): parsing the text forms enrollments carry, the facts
//! DPS reports about a certificate, and chain validation of a device's certificates against a
//! CA (signatures, validity periods, basic constraints, path length, key usage) with
//! `rustls-webpki`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::{json, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    /// The text is neither PEM nor base64 DER.
    #[error("not a certificate in PEM or base64 DER form: {0}")]
    Encoding(String),
    /// The DER does not parse as an X.509 certificate.
    #[error("not a valid X.509 certificate: {0}")]
    Parse(String),
    /// Chain validation failed; the text says why.
    #[error("{0}")]
    Chain(String),
}

/// The largest certificate accepted, in DER bytes.
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// Decodes the certificate text of an enrollment or an upload: PEM (one `CERTIFICATE` block)
/// or base64 DER without armour (what the C# service SDK sends).
pub fn decode_certificate_text(text: &str) -> Result<Vec<u8>, X509Error> {
    let trimmed = text.trim();
    let der = if trimmed.starts_with("-----BEGIN") {
        let body: String = trimmed
            .lines()
            .map(str::trim)
            .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        if body.is_empty() {
            return Err(X509Error::Encoding("no BEGIN CERTIFICATE block".into()));
        }
        BASE64.decode(body).map_err(|e| X509Error::Encoding(format!("bad base64 in the PEM block: {e}")))?
    } else {
        let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
        BASE64.decode(compact).map_err(|e| X509Error::Encoding(format!("bad base64: {e}")))?
    };
    if der.len() > MAX_CERTIFICATE_BYTES {
        return Err(X509Error::Encoding(format!("{} bytes; the limit is {MAX_CERTIFICATE_BYTES}", der.len())));
    }
    facts(&der)?;
    Ok(der)
}

/// What DPS reports about a certificate (`X509CertificateInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Subject distinguished name.
    pub subject_name: String,
    /// Subject common name, when there is one.
    pub common_name: Option<String>,
    /// Issuer distinguished name.
    pub issuer_name: String,
    /// SHA-1 of the DER, upper-case hex.
    pub sha1_thumbprint: String,
    /// SHA-256 of the DER, upper-case hex.
    pub sha256_thumbprint: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Serial number, upper-case hex.
    pub serial_number: String,
    /// X.509 version (3 for v3).
    pub version: u32,
    /// Basic constraints say CA.
    pub is_ca: bool,
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Parses a DER certificate.
pub fn facts(der: &[u8]) -> Result<CertificateFacts, X509Error> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| X509Error::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(X509Error::Parse(format!("{} trailing bytes after the certificate", rest.len())));
    }
    let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
    let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca);
    Ok(CertificateFacts {
        subject_name: cert.subject().to_string(),
        common_name,
        issuer_name: cert.issuer().to_string(),
        sha1_thumbprint: hex_upper(&Sha1::digest(der)),
        sha256_thumbprint: hex_upper(&Sha256::digest(der)),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial_number: hex_upper(cert.raw_serial()),
        version: cert.version().0 + 1,
        is_ca,
    })
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

impl CertificateFacts {
    /// The `X509CertificateInfo` JSON (all eight fields).
    pub fn info(&self) -> Value {
        json!({
            "subjectName": self.subject_name,
            "sha1Thumbprint": self.sha1_thumbprint,
            "sha256Thumbprint": self.sha256_thumbprint,
            "issuerName": self.issuer_name,
            "notBeforeUtc": rfc3339(self.not_before),
            "notAfterUtc": rfc3339(self.not_after),
            "serialNumber": self.serial_number,
            "version": self.version,
        })
    }

    /// Checks the validity period; the error says which bound was missed.
    pub fn check_time(&self, now: i64, what: &str) -> Result<(), X509Error> {
        if now < self.not_before {
            return Err(X509Error::Chain(format!(
                "the {what} is not valid yet (valid from {})",
                rfc3339(self.not_before)
            )));
        }
        if now > self.not_after {
            return Err(X509Error::Chain(format!("the {what} expired at {}", rfc3339(self.not_after))));
        }
        Ok(())
    }

    /// True when this certificate's DER has the thumbprint (SHA-1 or SHA-256 hex, any case,
    /// colons and spaces ignored).
    pub fn has_thumbprint(&self, thumbprint: &str) -> bool {
        let t: String = thumbprint.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        t.eq_ignore_ascii_case(&self.sha1_thumbprint) || t.eq_ignore_ascii_case(&self.sha256_thumbprint)
    }
}

/// Checks that `cert` is signed by `issuer`'s key and valid at `now` (proof of possession:
/// any X.509 version, no path rules).
pub fn verify_signed_by(cert: &[u8], issuer: &[u8], now: i64) -> Result<(), X509Error> {
    let (_, c) = X509Certificate::from_der(cert).map_err(|e| X509Error::Parse(e.to_string()))?;
    let (_, i) = X509Certificate::from_der(issuer).map_err(|e| X509Error::Parse(e.to_string()))?;
    c.verify_signature(Some(i.public_key()))
        .map_err(|_| X509Error::Chain("its signature does not verify with the CA's public key".into()))?;
    facts(cert)?.check_time(now, "verification certificate")
}

/// Validates that `leaf` chains to `anchor` through any of `intermediates`, at `now`, for TLS
/// client authentication: signatures, validity periods, CA basic constraints and path length,
/// key usage (an extended key usage, when present, must allow client authentication). The
/// anchor is held to the same rules as a CA inside the chain: webpki only takes its name and
/// key, so its validity period, `cA` flag and `pathLenConstraint` are checked here.
pub fn verify_chain(leaf: &[u8], intermediates: &[Vec<u8>], anchor: &[u8], now: i64) -> Result<(), X509Error> {
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| X509Error::Chain(format!("the device certificate cannot be used: {e}")))?;
    let anchor_der = CertificateDer::from(anchor);
    let trust_anchor = webpki::anchor_from_trusted_cert(&anchor_der)
        .map_err(|e| X509Error::Chain(format!("the CA certificate cannot be a trust anchor: {e}")))?
        .to_owned();
    let anchors = [trust_anchor];
    let inter: Vec<CertificateDer<'_>> = intermediates.iter().map(|d| CertificateDer::from(d.as_slice())).collect();
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &inter,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| X509Error::Chain(describe(&e)))?;
    check_anchor(anchor, path.intermediate_certificates().count(), now)
}

/// The rules webpki leaves out for a trust anchor: valid at `now`, basicConstraints `cA`, and
/// a `pathLenConstraint` that allows the `sub_cas` CAs between it and the device certificate.
fn check_anchor(anchor: &[u8], sub_cas: usize, now: i64) -> Result<(), X509Error> {
    let (_, cert) = X509Certificate::from_der(anchor).map_err(|e| X509Error::Parse(e.to_string()))?;
    facts(anchor)?.check_time(now, "CA certificate")?;
    let constraints = cert.basic_constraints().ok().flatten().map(|bc| bc.value.clone());
    match constraints {
        Some(bc) if bc.ca => {
            if bc.path_len_constraint.is_some_and(|n| usize::try_from(n).unwrap_or(usize::MAX) < sub_cas) {
                return Err(X509Error::Chain(describe(&webpki::Error::PathLenConstraintViolated)));
            }
            Ok(())
        }
        _ => Err(X509Error::Chain("the CA certificate is not a CA (no basicConstraints cA=true)".into())),
    }
}

fn describe(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => "a certificate in the chain has expired".into(),
        E::CertNotValidYet { .. } => "a certificate in the chain is not valid yet".into(),
        E::UnknownIssuer => "the chain does not lead to this CA".into(),
        E::CaUsedAsEndEntity => "the device certificate is a CA certificate (basicConstraints cA=true)".into(),
        E::EndEntityUsedAsCa => "an end-entity certificate is used as a CA in the chain".into(),
        E::PathLenConstraintViolated => "the chain is longer than a CA's pathLenConstraint allows".into(),
        E::RequiredEkuNotFoundContext(_) => {
            "the device certificate's extended key usage does not allow client authentication".into()
        }
        E::InvalidSignatureForPublicKey | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "a signature in the chain does not verify".into()
        }
        other => format!("the chain is not valid: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(cn: &str, issuer: Option<&Ca>) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = match issuer {
            Some(i) => p.signed_by(&key, &i.cert, &i.key).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        Ca { cert, key }
    }

    fn leaf(cn: &str, issuer: &Ca, days: (i64, i64)) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &issuer.cert, &issuer.key).unwrap().der().to_vec()
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn text_forms_and_facts() {
        let root = ca("Test Root", None);
        let pem = root.cert.pem();
        let der = decode_certificate_text(&pem).unwrap();
        assert_eq!(der, root.cert.der().to_vec());
        assert_eq!(decode_certificate_text(&BASE64.encode(&der)).unwrap(), der);
        let f = facts(&der).unwrap();
        assert_eq!(f.common_name.as_deref(), Some("Test Root"));
        assert!(f.is_ca);
        assert_eq!(f.version, 3);
        assert!(f.has_thumbprint(&f.sha1_thumbprint.to_lowercase()));
        let info = f.info();
        for field in [
            "subjectName",
            "sha1Thumbprint",
            "sha256Thumbprint",
            "issuerName",
            "notBeforeUtc",
            "notAfterUtc",
            "serialNumber",
            "version",
        ] {
            assert!(!info[field].is_null(), "{field}");
        }
        assert!(matches!(decode_certificate_text("hello"), Err(X509Error::Encoding(_))));
        assert!(matches!(decode_certificate_text(&BASE64.encode(b"not der")), Err(X509Error::Parse(_))));
    }

    #[test]
    fn chains_are_checked() {
        let root = ca("Root", None);
        let inter = ca("Intermediate", Some(&root));
        let other = ca("Other Root", None);
        let inter_der = inter.cert.der().to_vec();
        let root_der = root.cert.der().to_vec();
        let good = leaf("dev-1", &inter, (-1, 30));
        verify_chain(&good, std::slice::from_ref(&inter_der), &root_der, now()).unwrap();
        verify_chain(&good, &[], &inter_der, now()).unwrap();
        let err = verify_chain(&good, std::slice::from_ref(&inter_der), other.cert.der(), now()).unwrap_err();
        assert!(err.to_string().contains("does not lead"), "{err}");
        let expired = leaf("dev-2", &inter, (-30, -1));
        let err = verify_chain(&expired, std::slice::from_ref(&inter_der), &root_der, now()).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        let future = leaf("dev-3", &inter, (1, 30));
        let err = verify_chain(&future, &[inter_der], &root_der, now()).unwrap_err();
        assert!(err.to_string().contains("not valid yet"), "{err}");
        let f = facts(&expired).unwrap();
        assert!(f.check_time(now(), "device certificate").unwrap_err().to_string().contains("expired at"));
    }
}
