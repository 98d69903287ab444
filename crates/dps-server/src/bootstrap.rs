//! First-start bootstrap: the data directory, a test CA and server certificate, the ID scope,
//! the `provisioningserviceowner` policy, and `dev-credentials.json` for scripts.
//!
//! Everything is created once and reused on later starts. Files are written atomically
//! (temporary file, fsync, rename), private keys with mode 0600.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_core::store::Store;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rsa::pkcs8::EncodePrivateKey;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::config::{Config, GeneratedKey, RIGHTS};
use crate::error::ServerError;
use crate::policy::Policy;

/// Name of the generated owner policy.
pub const OWNER_POLICY: &str = "provisioningserviceowner";
/// File name of the credentials summary in the data directory.
pub const DEV_CREDENTIALS_FILE: &str = "dev-credentials.json";

/// Paths of the TLS material in use.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// The generated test CA certificate, when dps generated the server certificate.
    pub ca: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredKeys {
    primary_key: String,
    secondary_key: String,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |e| ServerError::Bootstrap(format!("{what}: {e}"))
}

/// Creates the data directory (owner-only, 0700) if needed, checks an existing one, and
/// returns its absolute path. The directory holds every key: one that others may write to is
/// refused (they could replace the store or the TLS key); one that others may read or list is
/// used with a warning that says how to fix it.
pub fn prepare_data_dir(dir: &Path) -> Result<PathBuf, ServerError> {
    let existed = dir.exists();
    create_private_dir(dir).map_err(io_err(format!("cannot create data directory {}", dir.display())))?;
    let dir = std::fs::canonicalize(dir).map_err(io_err(format!("cannot resolve data directory {}", dir.display())))?;
    #[cfg(unix)]
    if existed {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&dir).map_err(io_err(format!("cannot read {}", dir.display())))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(ServerError::Bootstrap(format!(
                "data directory {} is writable by group or others (mode {mode:04o}): they could replace the store or the TLS key; run `chmod 700 {}`",
                dir.display(),
                dir.display()
            )));
        }
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{mode:04o}"), "the data directory can be read by group or others; it holds every key: run `chmod 700` on it");
        }
    }
    #[cfg(not(unix))]
    let _ = existed;
    Ok(dir)
}

/// `create_dir_all`, with mode 0700 for the directories it creates.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Writes a file atomically: temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<(), ServerError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp).map_err(io_err(format!("cannot write {}", tmp.display())))?;
    f.write_all(contents).map_err(io_err(format!("cannot write {}", tmp.display())))?;
    f.sync_all().map_err(io_err(format!("cannot sync {}", tmp.display())))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(format!("cannot rename into {}", path.display())))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn rsa_key_pair() -> Result<(KeyPair, String), ServerError> {
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)
        .map_err(|e| ServerError::Bootstrap(format!("cannot generate an RSA key: {e}")))?;
    let der = key.to_pkcs8_der().map_err(|e| ServerError::Bootstrap(format!("cannot encode an RSA key: {e}")))?;
    let der = PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
    let pair = KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| ServerError::Bootstrap(format!("cannot load an RSA key: {e}")))?;
    let pem = pair.serialize_pem();
    Ok((pair, pem))
}

/// A new server key, its PEM, and the key usages its certificate needs.
fn new_server_key(kind: GeneratedKey) -> Result<(KeyPair, String, Vec<KeyUsagePurpose>), ServerError> {
    match kind {
        GeneratedKey::Rsa2048 => {
            let (pair, pem) = rsa_key_pair()?;
            // RSA key exchange (TLS 1.2 RSA suites) encrypts to the key.
            Ok((pair, pem, vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment]))
        }
        GeneratedKey::EcdsaP256 => {
            let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc_err)?;
            let pem = pair.serialize_pem();
            Ok((pair, pem, vec![KeyUsagePurpose::DigitalSignature]))
        }
    }
}

/// The key type of the stored server key; `None` when it is missing, unreadable or of a
/// type dps does not generate.
fn stored_key_type(key_path: &Path) -> Option<GeneratedKey> {
    let pem = std::fs::read_to_string(key_path).ok()?;
    let pair = KeyPair::from_pem(&pem).ok()?;
    let algorithm = pair.algorithm();
    if algorithm == &rcgen::PKCS_ECDSA_P256_SHA256 {
        Some(GeneratedKey::EcdsaP256)
    } else if algorithm == &rcgen::PKCS_RSA_SHA256 {
        Some(GeneratedKey::Rsa2048)
    } else {
        None
    }
}

fn load_key_pair(pem: &str) -> Result<KeyPair, ServerError> {
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map_err(|e| ServerError::Bootstrap(format!("cannot read the test CA key: {e}")))?;
    KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| ServerError::Bootstrap(format!("cannot load the test CA key: {e}")))
}

/// Test CA parameters. The name carries a fingerprint of the CA key, so that CAs of different
/// dps instances have different names (TLS stacks pick a trust anchor by name), and so that
/// re-creating the parameters from the stored key gives the same issuer name.
fn ca_params(key: &KeyPair) -> Result<CertificateParams, ServerError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc_err)?;
    let digest = sha2::Sha256::digest(key.public_key_der());
    let tag: String = digest.iter().take(4).map(|b| format!("{b:02X}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("dps-rs test CA {tag}"));
    dn.push(DnType::OrganizationName, "dps-rs (local development only)");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    Ok(params)
}

fn rc_err(e: rcgen::Error) -> ServerError {
    ServerError::Bootstrap(format!("certificate generation failed: {e}"))
}

/// The setting that holds the test CA (certificate and key, PEM) when nodes share the store.
const SHARED_TEST_CA: &str = "tls.test_ca";

#[derive(Serialize, Deserialize)]
struct SharedCa {
    certificate: String,
    key: String,
}

/// Nodes sharing one store share one test CA: the first node to start keeps its CA (the one in
/// its data directory, else a new one) in the store, and every node writes that CA to its own
/// `<data_dir>/tls` before [`ensure_tls`] issues its server certificate from it. So one CA file
/// is trusted for every node behind one address. Does nothing when `tls.cert`/`tls.key` are
/// configured (then every node must be given the same certificate, or ones from one CA).
pub async fn share_test_ca(config: &Config, data_dir: &Path, store: &dyn Store) -> Result<(), ServerError> {
    if config.tls.cert.is_some() && config.tls.key.is_some() {
        return Ok(());
    }
    let dir = data_dir.join("tls");
    create_private_dir(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let (ca_cert_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let stored = match store.get_setting(SHARED_TEST_CA).await? {
        Some(stored) => stored,
        None => {
            let local = (std::fs::read_to_string(&ca_cert_path), std::fs::read_to_string(&ca_key_path));
            let candidate = match local {
                (Ok(certificate), Ok(key)) if load_key_pair(&key).is_ok() => SharedCa { certificate, key },
                _ => {
                    let (key, key_pem) = rsa_key_pair()?;
                    let cert = ca_params(&key)?.self_signed(&key).map_err(rc_err)?;
                    SharedCa { certificate: cert.pem(), key: key_pem }
                }
            };
            let text = serde_json::to_string(&candidate).map_err(|e| ServerError::Bootstrap(e.to_string()))?;
            store.init_setting(SHARED_TEST_CA, &text).await?
        }
    };
    let shared: SharedCa = serde_json::from_str(&stored)
        .map_err(|e| ServerError::Bootstrap(format!("the shared test CA in the store cannot be read: {e}")))?;
    if std::fs::read_to_string(&ca_cert_path).ok().as_deref() != Some(shared.certificate.as_str()) {
        tracing::info!(path = %ca_cert_path.display(), "using the test CA shared by the nodes on this store");
        write_atomic(&ca_key_path, shared.key.as_bytes(), true)?;
        write_atomic(&ca_cert_path, shared.certificate.as_bytes(), false)?;
        // Issued by another CA: issue it again from the shared one.
        let _ = std::fs::remove_file(dir.join("server.pem"));
    }
    Ok(())
}

/// Makes sure a server certificate exists: the configured one, or a generated one signed by
/// a test CA in `<data_dir>/tls`. The generated certificate is re-issued (by the same CA)
/// when `tls.host_names` or `tls.generated_key` changes.
pub fn ensure_tls(config: &Config, data_dir: &Path) -> Result<TlsFiles, ServerError> {
    if let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) {
        return Ok(TlsFiles { cert: cert.clone(), key: key.clone(), ca: None });
    }
    let dir = data_dir.join("tls");
    create_private_dir(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server-key.pem");
    let hosts_path = dir.join("server-hosts.txt");
    let hosts = config.tls.host_names.join("\n");
    let key_type = config.tls.generated_key;

    let (ca_key, ca_pem) = if ca_cert_path.exists() && ca_key_path.exists() {
        let key_pem =
            std::fs::read_to_string(&ca_key_path).map_err(io_err(format!("cannot read {}", ca_key_path.display())))?;
        let ca_pem = std::fs::read_to_string(&ca_cert_path)
            .map_err(io_err(format!("cannot read {}", ca_cert_path.display())))?;
        (load_key_pair(&key_pem)?, ca_pem)
    } else {
        tracing::info!(path = %ca_cert_path.display(), "creating a test CA");
        let (key, key_pem) = rsa_key_pair()?;
        let cert = ca_params(&key)?.self_signed(&key).map_err(rc_err)?;
        write_atomic(&ca_key_path, key_pem.as_bytes(), true)?;
        write_atomic(&ca_cert_path, cert.pem().as_bytes(), false)?;
        let _ = std::fs::remove_file(&cert_path);
        (key, cert.pem())
    };
    let current_hosts = std::fs::read_to_string(&hosts_path).unwrap_or_default();
    if !(cert_path.exists() && stored_key_type(&key_path) == Some(key_type) && current_hosts == hosts) {
        tracing::info!(path = %cert_path.display(), hosts = ?config.tls.host_names, key = key_type.as_str(), "issuing a server certificate from the test CA");
        // Same DN and key as the stored CA: certificates it signs chain to the stored CA file.
        let issuer = ca_params(&ca_key)?.self_signed(&ca_key).map_err(rc_err)?;
        let (server_key, server_key_pem, key_usages) = new_server_key(key_type)?;
        let mut params = CertificateParams::new(config.tls.host_names.clone()).map_err(rc_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, config.tls.host_names[0].clone());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = key_usages;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
        let cert = params.signed_by(&server_key, &issuer, &ca_key).map_err(rc_err)?;
        let chain = format!("{}{}", cert.pem(), ca_pem);
        write_atomic(&key_path, server_key_pem.as_bytes(), true)?;
        write_atomic(&cert_path, chain.as_bytes(), false)?;
        write_atomic(&hosts_path, hosts.as_bytes(), false)?;
    }
    Ok(TlsFiles { cert: cert_path, key: key_path, ca: Some(ca_cert_path) })
}

fn random_key() -> String {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    BASE64.encode(k)
}

/// Generates an ID scope: `0ne` + 8 upper-case hex digits.
pub fn generate_id_scope() -> String {
    let mut b = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut b);
    format!("0ne{:08X}", u32::from_be_bytes(b))
}

/// The ID scope: from the config, else generated once and kept in the store.
pub async fn ensure_id_scope(config: &Config, store: &dyn Store) -> Result<String, ServerError> {
    if let Some(scope) = &config.id_scope {
        return Ok(scope.clone());
    }
    Ok(store.init_setting("id_scope", &generate_id_scope()).await?)
}

/// The policies in force: configured ones plus the generated owner policy (kept in the store),
/// and whether the owner policy's keys were created just now (first start).
pub async fn ensure_policies(config: &Config, store: &dyn Store) -> Result<(Vec<Policy>, bool), ServerError> {
    let mut created = false;
    let mut policies: Vec<Policy> = config
        .service
        .policies
        .iter()
        .map(|p| Policy {
            name: p.name.clone(),
            primary_key: p.primary_key.clone(),
            secondary_key: p.secondary_key.clone(),
            rights: p.rights.clone(),
        })
        .collect();
    if !policies.iter().any(|p| p.name == OWNER_POLICY) {
        let fresh = serde_json::to_string(&StoredKeys { primary_key: random_key(), secondary_key: random_key() })
            .map_err(|e| ServerError::Bootstrap(e.to_string()))?;
        let stored = store.init_setting(&format!("policy.{OWNER_POLICY}"), &fresh).await?;
        created = stored == fresh;
        let keys: StoredKeys = serde_json::from_str(&stored)
            .map_err(|e| ServerError::Bootstrap(format!("stored policy {OWNER_POLICY} cannot be read: {e}")))?;
        policies.push(Policy {
            name: OWNER_POLICY.into(),
            primary_key: keys.primary_key,
            secondary_key: Some(keys.secondary_key),
            rights: RIGHTS.iter().map(|r| r.to_string()).collect(),
        });
    }
    Ok((policies, created))
}

/// What `dev-credentials.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevCredentials {
    /// ID scope.
    pub id_scope: String,
    /// Host name devices and service clients should use.
    pub host_name: String,
    /// Address the HTTPS listener is bound to.
    pub https_address: String,
    /// Port of the HTTPS listener.
    pub https_port: u16,
    /// Address the MQTT listener is bound to, when MQTT is enabled.
    pub mqtt_address: Option<String>,
    /// Port of the MQTT listener, when MQTT is enabled.
    pub mqtt_port: Option<u16>,
    /// Address the AMQP listener is bound to, when AMQP is enabled.
    #[serde(default)]
    pub amqp_address: Option<String>,
    /// Port of the AMQP listener, when AMQP is enabled.
    #[serde(default)]
    pub amqp_port: Option<u16>,
    /// Address of the Prometheus metrics listener, when `[metrics] listen` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
    /// Service connection string for the owner policy (HostName carries the port when it is
    /// not 443).
    pub service_connection_string: Option<String>,
    /// Test CA to trust, when dps generated its certificate.
    pub ca_certificate_path: Option<PathBuf>,
    /// Linked hubs.
    pub linked_hubs: Vec<String>,
    /// Process ID of the server that wrote the file.
    pub pid: u32,
}

/// Builds the credentials summary for a bound listener.
pub fn dev_credentials(
    config: &Config,
    id_scope: &str,
    policies: &[Policy],
    tls: &TlsFiles,
    https: SocketAddr,
    mqtt: Option<SocketAddr>,
    amqp: Option<SocketAddr>,
) -> DevCredentials {
    let host = config.tls.host_names[0].clone();
    let host_port = if https.port() == 443 { host.clone() } else { format!("{host}:{}", https.port()) };
    let owner = policies.iter().find(|p| p.name == OWNER_POLICY);
    DevCredentials {
        id_scope: id_scope.to_string(),
        host_name: host,
        https_address: https.to_string(),
        https_port: https.port(),
        mqtt_address: mqtt.map(|a| a.to_string()),
        mqtt_port: mqtt.map(|a| a.port()),
        amqp_address: amqp.map(|a| a.to_string()),
        amqp_port: amqp.map(|a| a.port()),
        metrics_address: None,
        service_connection_string: owner
            .map(|p| format!("HostName={host_port};SharedAccessKeyName={};SharedAccessKey={}", p.name, p.primary_key)),
        ca_certificate_path: tls.ca.clone(),
        linked_hubs: config.linked_hubs().into_iter().map(|h| h.host_name).collect(),
        pid: std::process::id(),
    }
}
