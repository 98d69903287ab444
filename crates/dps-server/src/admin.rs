//! Offline administration on a data directory (`dps cert …`): opens the configured store
//! directly ([`crate::store::open_store`]), so it works whether or not a server is running on
//! the same data directory (SQLite WAL allows both).

use dps_core::etag::IfMatch;
use dps_core::{Engine, EngineSettings};
use serde_json::{json, Value};

use crate::config::{Config, StoreConfig};
use crate::error::ServerError;
use crate::store::open_store;

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
    let where_ = match &config.store {
        StoreConfig::Sqlite(sqlite) => {
            let db = config.data_dir.join(&sqlite.sqlite_file);
            if !db.exists() {
                return Err(format!(
                    "no store at {}: start `dps serve` once with this data directory (or pass --data-dir)",
                    db.display()
                ));
            }
            db.display().to_string()
        }
        // A missing URL is refused by `open_store`, naming both places it may come from.
        StoreConfig::Postgres(pg) => {
            pg.url().map(|url| dps_store::PostgresOptions::new(url).describe()).unwrap_or_else(|| "the store".into())
        }
    };
    let store = open_store(&config.store, &config.data_dir).await.map_err(|e| match e {
        ServerError::Store(e) => format!("cannot open {where_}: {e}"),
        other => format!("cannot open {where_}: {other}"),
    })?;
    let engine = Engine::new(store, EngineSettings::default());
    let result = match action {
        CertAction::Add { name, certificate, verified } => {
            let body = serde_json::to_vec(&json!({"certificate": certificate, "isVerified": verified}))
                .map_err(|e| e.to_string())?;
            engine.management().put_certificate(&name, &body, &IfMatch::Any).await
        }
        CertAction::List => engine.management().list_certificates().await.map(Value::from),
        CertAction::Show { name } => engine.management().get_certificate(&name).await,
        CertAction::VerificationCode { name } => {
            engine.management().generate_verification_code(&name, &IfMatch::Any).await
        }
        CertAction::Verify { name, certificate } => {
            let body = serde_json::to_vec(&json!({ "certificate": certificate })).map_err(|e| e.to_string())?;
            engine.management().verify_certificate(&name, &IfMatch::Any, &body).await
        }
        CertAction::Remove { name } => {
            engine.management().delete_certificate(&name, &IfMatch::Any).await.map(|()| json!({"removed": name}))
        }
    };
    result.map_err(|e| e.to_string())
}
