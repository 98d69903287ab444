//! The TLS server configuration devices meet (docs/protocol-notes.md §1.4), for dps and for the
//! bench's ceiling server, which must cost a device what dps costs it: TLS 1.3 and 1.2 on ring,
//! ALPN `http/1.1`, and a client certificate requested but not required, with any issuer
//! accepted at handshake time. The chain reaches the engine as the device's credential and is
//! judged there, against enrollments and the certificate store; the handshake still proves the
//! client holds the leaf's key.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

/// Key type of the server certificate dps generates (`tls.generated_key`; `dps bench
/// --server-key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum GeneratedKey {
    /// RSA 2048: the widest client support (embedded TLS stacks with RSA-only suites).
    #[default]
    Rsa2048,
    /// ECDSA P-256: a several times cheaper handshake for the server; clients need
    /// ECDHE-ECDSA suites (TLS 1.2) or ECDSA signatures (TLS 1.3).
    EcdsaP256,
}

impl GeneratedKey {
    /// Every key type.
    pub const ALL: [GeneratedKey; 2] = [GeneratedKey::Rsa2048, GeneratedKey::EcdsaP256];

    /// The setting's value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            GeneratedKey::Rsa2048 => "rsa-2048",
            GeneratedKey::EcdsaP256 => "ecdsa-p256",
        }
    }
}

impl std::str::FromStr for GeneratedKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown key type '{s}': expected {}", names.join(" or "))
        })
    }
}

impl TryFrom<String> for GeneratedKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a server configuration cannot be built; the message names the file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The certificate file cannot be read or parsed, or holds no certificate.
    #[error("{0}")]
    Certificate(String),
    /// The key file cannot be read or parsed.
    #[error("{0}")]
    Key(String),
    /// The certificate and the key do not belong together, or rustls refused the settings.
    #[error("{0}")]
    Config(String),
}

/// Loads a PEM certificate chain (leaf first) and a PEM private key into the device-facing
/// server configuration.
pub fn server_config_from_pem(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsConfigError::Certificate(format!("cannot read certificate {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsConfigError::Certificate(format!("cannot parse certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(TlsConfigError::Certificate(format!("{} holds no PEM certificate", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsConfigError::Key(format!("cannot read private key {}: {e}", key.display())))?;
    server_config(chain, key)
}

/// The device-facing server configuration for a DER chain (leaf first) and its key.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    if chain.is_empty() {
        return Err(TlsConfigError::Certificate("no certificate was given".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsConfigError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(DeviceCertificates { algorithms }))
        .with_single_cert(chain, key)
        .map_err(|e| TlsConfigError::Config(format!("certificate and key do not fit together: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Asks every client for a certificate, accepts none or any: a device's chain is judged by the
/// engine against its enrollment. Signatures are still checked.
#[derive(Debug)]
struct DeviceCertificates {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for DeviceCertificates {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::GeneratedKey;

    #[test]
    fn generated_key_names_parse_back() {
        for k in GeneratedKey::ALL {
            assert_eq!(k.as_str().parse::<GeneratedKey>(), Ok(k));
            assert_eq!(k.to_string(), k.as_str());
        }
        assert_eq!(GeneratedKey::default(), GeneratedKey::Rsa2048);
        let err = "ed25519".parse::<GeneratedKey>().unwrap_err();
        assert_eq!(err, "unknown key type 'ed25519': expected rsa-2048 or ecdsa-p256");
    }
}
