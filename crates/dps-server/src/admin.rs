//! Offline administration on a data directory (`dps cert …`): opens the store directly, so it
//! works whether or not a server is running on the same data directory (SQLite WAL allows
//! both).

use std::sync::Arc;

use dps_core::etag::IfMatch;
use dps_core::{Engine, EngineSettings};
use dps_store::{SqliteStore, Synchronous};
use serde_json::{json, Value};

use crate::config::Config;

/// A certificate-store action.
#[derive(Debug, Clone)]
pub enum CertAction {
    /// Upload a CA certificate (PEM or base64 DER text), optionally as verified.
    Add {
        /// Name.
        name: String,
        /// Certificate text.
        certificate: String,
        /// Mark verified without proof of possession.
        verified: bool,
    },
    /// List the certificates.
    List,
    /// Show one certificate.
    Show {
        /// Name.
        name: String,
    },
    /// Issue a verification code.
    VerificationCode {
        /// Name.
        name: String,
    },
    /// Prove possession with a certificate whose CN is the code, signed by the CA.
    Verify {
        /// Name.
        name: String,
        /// Verification certificate text.
        certificate: String,
    },
    /// Remove a certificate.
    Remove {
        /// Name.
        name: String,
    },
}

/// Runs a certificate-store action on the configured data directory; the error says what
/// to fix.
pub async fn cert(config: &Config, action: CertAction) -> Result<Value, String> {
    let db = config.data_dir.join(&config.store.sqlite_file);
    if !db.exists() {
        return Err(format!(
            "no store at {}: start `dps serve` once with this data directory (or pass --data-dir)",
            db.display()
        ));
    }
    let store = SqliteStore::open(&db, Synchronous::Full).map_err(|e| format!("cannot open {}: {e}", db.display()))?;
    let engine = Engine::new(Arc::new(store), EngineSettings::default());
    let result = match action {
        CertAction::Add { name, certificate, verified } => {
            let body = serde_json::to_vec(&json!({"certificate": certificate, "isVerified": verified}))
                .map_err(|e| e.to_string())?;
            engine.put_certificate(&name, &body, &IfMatch::Any).await
        }
        CertAction::List => engine.list_certificates().await.map(Value::from),
        CertAction::Show { name } => engine.get_certificate(&name).await,
        CertAction::VerificationCode { name } => engine.generate_verification_code(&name, &IfMatch::Any).await,
        CertAction::Verify { name, certificate } => {
            let body = serde_json::to_vec(&json!({ "certificate": certificate })).map_err(|e| e.to_string())?;
            engine.verify_certificate(&name, &IfMatch::Any, &body).await
        }
        CertAction::Remove { name } => {
            engine.delete_certificate(&name, &IfMatch::Any).await.map(|()| json!({"removed": name}))
        }
    };
    result.map_err(|e| e.to_string())
}
