//! rustls server configuration: TLS 1.2 and 1.3, ALPN `http/1.1`, and client certificates
//! requested but not required, with any issuer accepted at handshake time (docs/protocol-notes.md §1.4):
//! the chain reaches the engine as the device's credential and is checked against enrollments
//! and the certificate store there.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::error::ServerError;

/// Loads a PEM chain and key into a rustls server configuration.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, ServerError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ServerError::Tls(format!("cannot read certificate {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ServerError::Tls(format!("cannot parse certificate {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!("{} holds no PEM certificate", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServerError::Tls(format!("cannot read private key {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(DeviceCertificates { algorithms }))
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("certificate and key do not fit together: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Asks every client for a certificate, accepts none or any: a device's chain is judged by the
/// engine against its enrollment. The handshake still proves the client holds the leaf's key.
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

/// The client certificate chain of a TLS session (DER, leaf first), if the client sent one.
pub fn peer_chain(conn: &rustls::ServerConnection) -> Option<Arc<Vec<Vec<u8>>>> {
    conn.peer_certificates().filter(|c| !c.is_empty()).map(|c| Arc::new(c.iter().map(|d| d.to_vec()).collect()))
}
