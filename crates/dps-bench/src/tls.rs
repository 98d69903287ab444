//! The ceiling's TLS server configuration: the one dps uses ([`dps_proto::tls`]), so that a
//! device's handshake costs the ceiling what it costs dps, without depending on the server
//! crate.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;

use crate::BenchError;

/// Loads a PEM certificate chain and a PEM private key into a server configuration.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, BenchError> {
    dps_proto::tls::server_config_from_pem(cert, key).map_err(|e| BenchError::Setup(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_pem_pair_and_refuses_bad_input() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["bench.localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("server.pem"), dir.path().join("server-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let config = server_config(&cert_path, &key_path).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);

        // A key that is not the certificate's.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key_path, other.serialize_pem()).unwrap();
        let err = server_config(&cert_path, &key_path).unwrap_err().to_string();
        assert!(err.contains("do not fit together"), "{err}");
        // No certificate in the file.
        std::fs::write(&cert_path, "not a certificate").unwrap();
        let err = server_config(&cert_path, &key_path).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
