//! A test PKI generated with rcgen: roots, intermediates and device certificates.

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// A certificate with its key.
pub struct Issued {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Issued {
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }
}

fn params(cn: &str, days: (i64, i64)) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(days.0);
    p.not_after = now + time::Duration::days(days.1);
    p
}

/// A CA (self-signed when `issuer` is `None`).
pub fn ca(cn: &str, issuer: Option<&Issued>) -> Issued {
    let mut p = params(cn, (-1, 365));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = ca_key_usages();
    issue(p, issuer)
}

fn ca_key_usages() -> Vec<KeyUsagePurpose> {
    vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature]
}

/// Signs `p` with a new key: by `issuer`, or self-signed when it is `None`.
fn issue(p: CertificateParams, issuer: Option<&Issued>) -> Issued {
    let key = KeyPair::generate().unwrap();
    let cert = match issuer {
        Some(i) => p.signed_by(&key, &i.cert, &i.key).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    Issued { cert, key }
}

/// A CA valid from `days.0` to `days.1` days from now (self-signed when `issuer` is `None`).
pub fn ca_valid(cn: &str, issuer: Option<&Issued>, days: (i64, i64)) -> Issued {
    let mut p = params(cn, days);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = ca_key_usages();
    issue(p, issuer)
}

/// A CA whose basicConstraints carry `pathLenConstraint = path_len` (self-signed when
/// `issuer` is `None`).
pub fn ca_with_path_len(cn: &str, issuer: Option<&Issued>, path_len: u8) -> Issued {
    let mut p = params(cn, (-1, 365));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = ca_key_usages();
    issue(p, issuer)
}

/// An end-entity certificate with a CA's key usages (keyCertSign), to be misused as an
/// issuer: basicConstraints `cA=false` when `explicit`, else no basicConstraints at all.
pub fn end_entity_issuer(cn: &str, issuer: &Issued, explicit: bool) -> Issued {
    let mut p = params(cn, (-1, 365));
    p.is_ca = if explicit { IsCa::ExplicitNoCa } else { IsCa::NoCa };
    p.key_usages = ca_key_usages();
    issue(p, Some(issuer))
}

/// A device certificate (valid from a day ago for 30 days) whose extendedKeyUsage is `ekus`
/// (none: no extendedKeyUsage extension).
pub fn device_with_ekus(cn: &str, issuer: &Issued, ekus: Vec<ExtendedKeyUsagePurpose>) -> Issued {
    let mut p = params(cn, (-1, 30));
    p.extended_key_usages = ekus;
    issue(p, Some(issuer))
}

/// A device certificate valid from `days.0` to `days.1` days from now (self-signed when
/// `issuer` is `None`).
pub fn device(cn: &str, issuer: Option<&Issued>, days: (i64, i64)) -> Issued {
    let mut p = params(cn, days);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(p, issuer)
}

/// A proof-of-possession certificate: subject CN = the verification code, signed by the CA.
pub fn verification(code: &str, ca: &Issued) -> Issued {
    device(code, Some(ca), (-1, 2))
}
