//! The embedded SQLite store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use dps_core::store::{Collection, Condition, Document, Page, Store, StoreError, Write};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// SQLite `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync on every commit: survives power loss (default).
    #[default]
    Full,
    /// fsync at checkpoints: survives a process crash (`kill -9`), may lose the last
    /// commits on power loss. Faster.
    Normal,
}

/// Migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: documents and settings.
    "CREATE TABLE documents (
        collection INTEGER NOT NULL,
        key        TEXT    NOT NULL,
        id         TEXT    NOT NULL,
        etag       TEXT    NOT NULL,
        partition  TEXT,
        body       TEXT    NOT NULL,
        expires_at INTEGER,
        PRIMARY KEY (collection, key)
     ) WITHOUT ROWID;
     CREATE INDEX documents_by_partition ON documents (collection, partition, key) WHERE partition IS NOT NULL;
     CREATE INDEX documents_by_expiry ON documents (expires_at) WHERE expires_at IS NOT NULL;
     CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;",
];

/// The embedded SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn sql_err(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, ref m)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) =>
        {
            StoreError::Unavailable(format!("database busy: {}", m.as_deref().unwrap_or("locked")))
        }
        rusqlite::Error::SqliteFailure(f, ref m) if f.code == rusqlite::ErrorCode::DiskFull => {
            StoreError::Unavailable(format!("disk full: {}", m.as_deref().unwrap_or("")))
        }
        other => StoreError::Other(format!("sqlite: {other}")),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sql_err)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(sql_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!("{} cannot use WAL journaling (got {mode})", path.display())));
        }
        let sync = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.execute_batch(&format!("PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;")).map_err(sql_err)?;
        let mut store = SqliteStore { conn: Arc::new(Mutex::new(conn)), path: path.to_path_buf() };
        store.migrate()?;
        Ok(store)
    }

    /// The current schema version.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let conn = self.lock();
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
        Ok(usize::try_from(v).unwrap_or(0))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
        let current = usize::try_from(current).unwrap_or(usize::MAX);
        if current > MIGRATIONS.len() {
            return Err(StoreError::Unavailable(format!(
                "{} has schema version {current}, newer than this dps understands ({}); upgrade dps",
                self.path.display(),
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            tx.execute_batch(sql).map_err(sql_err)?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1)).map_err(sql_err)?;
            tracing::info!(version = i + 1, "store schema migrated");
        }
        tx.commit().map_err(sql_err)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock left no open transaction behind (rusqlite rolls
        // back on drop), so the connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = this.lock();
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Other(format!("store task failed: {e}")))?
    }
}

fn key_of(id: &str) -> String {
    id.to_ascii_lowercase()
}

fn read_doc(row: &rusqlite::Row<'_>) -> rusqlite::Result<Document> {
    Ok(Document {
        id: row.get(0)?,
        etag: row.get(1)?,
        partition: row.get(2)?,
        body: row.get(3)?,
        expires_at: row.get(4)?,
    })
}

fn check(collection: Collection, id: &str, current: Option<&str>, condition: &Condition) -> Result<(), StoreError> {
    let what = || format!("{collection:?} '{id}'");
    match (condition, current) {
        (Condition::Always, _) => Ok(()),
        (Condition::IfAbsent, None) => Ok(()),
        (Condition::IfAbsent, Some(_)) => Err(StoreError::AlreadyExists(format!("{} already exists", what()))),
        (Condition::IfExists, Some(_)) => Ok(()),
        (Condition::IfExists | Condition::IfMatch(_), None) => {
            Err(StoreError::PreconditionFailed(format!("{} does not exist", what())))
        }
        (Condition::IfMatch(want), Some(have)) if want == have => Ok(()),
        (Condition::IfMatch(_), Some(_)) => Err(StoreError::PreconditionFailed(format!("{} has another etag", what()))),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, collection: Collection, id: &str) -> Result<Option<Document>, StoreError> {
        let key = key_of(id);
        self.blocking(move |conn| {
            conn.prepare_cached(
                "SELECT id, etag, partition, body, expires_at FROM documents WHERE collection = ?1 AND key = ?2",
            )
            .and_then(|mut st| st.query_row(params![collection.tag(), key], read_doc).optional())
            .map_err(sql_err)
        })
        .await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.blocking(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
            for w in &writes {
                let (collection, id, condition) = match w {
                    Write::Put { collection, document, condition } => (*collection, document.id.as_str(), condition),
                    Write::Delete { collection, id, condition } => (*collection, id.as_str(), condition),
                };
                let key = key_of(id);
                let current: Option<String> = tx
                    .prepare_cached("SELECT etag FROM documents WHERE collection = ?1 AND key = ?2")
                    .and_then(|mut st| st.query_row(params![collection.tag(), key], |r| r.get(0)).optional())
                    .map_err(sql_err)?;
                check(collection, id, current.as_deref(), condition)?;
                match w {
                    Write::Put { document: d, .. } => {
                        tx.prepare_cached(
                            "INSERT INTO documents (collection, key, id, etag, partition, body, expires_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                             ON CONFLICT (collection, key) DO UPDATE SET id = excluded.id, etag = excluded.etag,
                               partition = excluded.partition, body = excluded.body, expires_at = excluded.expires_at",
                        )
                        .and_then(|mut st| {
                            st.execute(params![collection.tag(), key, d.id, d.etag, d.partition, d.body, d.expires_at])
                        })
                        .map_err(sql_err)?;
                    }
                    Write::Delete { .. } => {
                        if current.is_none() {
                            return Err(StoreError::NotFound(format!("{collection:?} '{id}' does not exist")));
                        }
                        tx.prepare_cached("DELETE FROM documents WHERE collection = ?1 AND key = ?2")
                            .and_then(|mut st| st.execute(params![collection.tag(), key]))
                            .map_err(sql_err)?;
                    }
                }
            }
            tx.commit().map_err(sql_err)
        })
        .await
    }

    async fn list(
        &self,
        collection: Collection,
        partition: Option<&str>,
        continuation: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let after =
            match continuation {
                Some(c) => Some(B64URL.decode(c).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(|| {
                    StoreError::Corrupt("the continuation token was not issued by this server".into())
                })?),
                None => None,
            };
        let partition = partition.map(str::to_string);
        let limit = limit.max(1);
        self.blocking(move |conn| {
            let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
            let mut st = conn
                .prepare_cached(
                    "SELECT id, etag, partition, body, expires_at, key FROM documents
                     WHERE collection = ?1 AND (?2 IS NULL OR partition = ?2) AND (?3 IS NULL OR key > ?3)
                     ORDER BY key LIMIT ?4",
                )
                .map_err(sql_err)?;
            let rows = st
                .query_map(params![collection.tag(), partition, after, fetch], |r| {
                    Ok((read_doc(r)?, r.get::<_, String>(5)?))
                })
                .map_err(sql_err)?;
            let mut docs = Vec::new();
            for row in rows {
                docs.push(row.map_err(sql_err)?);
            }
            let continuation = if docs.len() > limit {
                docs.truncate(limit);
                docs.last().map(|(_, key)| B64URL.encode(key.as_bytes()))
            } else {
                None
            };
            Ok(Page { documents: docs.into_iter().map(|(d, _)| d).collect(), continuation })
        })
        .await
    }

    async fn purge_expired(&self, now_millis: i64) -> Result<u64, StoreError> {
        self.blocking(move |conn| {
            conn.execute("DELETE FROM documents WHERE expires_at IS NOT NULL AND expires_at < ?1", params![now_millis])
                .map(|n| n as u64)
                .map_err(sql_err)
        })
        .await
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        self.blocking(move |conn| {
            conn.query_row("SELECT value FROM settings WHERE key = ?1", params![key], |r| r.get(0))
                .optional()
                .map_err(sql_err)
        })
        .await
    }

    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.blocking(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
            tx.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, value],
            )
            .map_err(sql_err)?;
            let stored: String = tx
                .query_row("SELECT value FROM settings WHERE key = ?1", params![key], |r| r.get(0))
                .map_err(sql_err)?;
            tx.commit().map_err(sql_err)?;
            Ok(stored)
        })
        .await
    }
}
