//! Custom allocation over HTTPS: the per-webhook CA (`ca_file`) and client certificate
//! (`client_cert_file`, `client_key_file`), against a TLS webhook that requires a client
//! certificate.

mod common;

use std::sync::Arc;

use common::{key, webhook, Dps};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::json;

struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Pki { ca: p.self_signed(&ca_key).unwrap(), ca_key }
    }

    fn issue(&self, names: Vec<String>) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert, key)
    }
}

#[tokio::test]
async fn https_webhook_with_private_ca_and_client_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server_pki = Pki::new("webhook server CA");
    let client_pki = Pki::new("dps client CA");
    let (server_cert, server_key) = server_pki.issue(vec!["127.0.0.1".into()]);
    let (client_cert, client_key) = client_pki.issue(vec!["dps-client".into()]);

    // The webhook requires a client certificate issued by the client CA.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_pki.ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap();
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    let hook = webhook::start_with_tls(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca_file = write("webhook-ca.pem", server_pki.ca.pem());
    let cert_file = write("client.pem", client_cert.pem());
    let key_file = write("client-key.pem", client_key.serialize_pem());
    // Only the /secure/ prefix gets the CA and the client certificate.
    let config = format!(
        "[allocation]\nwebhook_timeout_secs = 3\n[[webhooks]]\nurl_prefix = \"https://{}/secure/\"\n\
         ca_file = {ca_file:?}\nclient_cert_file = {cert_file:?}\nclient_key_file = {key_file:?}\n\
         [[webhooks]]\nurl_prefix = \"https://{}/secure/nocert/\"\nca_file = {ca_file:?}\n",
        hook.addr, hook.addr
    );
    let dps = Dps::start(&config).await;
    let enroll = |id: &str, url: String| {
        let k = key(3);
        let dps = &dps;
        let id = id.to_string();
        async move {
            dps.put_enrollment(json!({"registrationId": id, "allocationPolicy": "custom",
                "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
                "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
                .await;
            dps.device_token(&id, &k)
        }
    };
    let token = enroll("tls-ok", hook.https_url("/secure/ok")).await;
    let (_, _, body) = dps.register("tls-ok", Some(&token), json!({"payload": {"a": 1}})).await;
    assert_eq!(body["status"], "assigned", "{body}\n{}", dps.log());
    assert_eq!(body["registrationState"]["payload"]["echo"], json!({"a": 1}));

    // The longest prefix wins: trusted CA but no client certificate → the webhook refuses.
    let token = enroll("tls-nocert", hook.https_url("/secure/nocert/ok")).await;
    let (_, _, body) = dps.register("tls-nocert", Some(&token), json!({})).await;
    assert_eq!(body["status"], "failed", "{body}");
    let msg = body["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(msg.contains("the webhook could not be reached"), "{msg}");
    let nocert = detail(&dps, &body);
    assert!(nocert.contains("CertificateRequired"), "the webhook asked for a client certificate: {nocert}");

    // Without the CA (another prefix) the server certificate is not trusted.
    let token = enroll("tls-untrusted", hook.https_url("/ok")).await;
    let (_, _, body) = dps.register("tls-untrusted", Some(&token), json!({})).await;
    assert_eq!(body["status"], "failed", "{body}");
    let msg = body["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(msg.contains("the webhook could not be reached"), "{msg}");
    let untrusted = detail(&dps, &body);
    assert!(untrusted.contains("invalid peer certificate: UnknownIssuer"), "{untrusted}");
}

/// The operator's log line for a failed registration: what the webhook client saw.
fn detail(dps: &Dps, body: &serde_json::Value) -> String {
    let operation = body["operationId"].as_str().unwrap();
    let log = dps.log();
    log.lines()
        .find(|l| l.contains("custom allocation failed") && l.contains(operation))
        .unwrap_or_else(|| panic!("no log line for {operation}: {log}"))
        .to_string()
}
