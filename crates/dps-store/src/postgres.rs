//! The PostgreSQL store: several `dps` nodes share one database.
//!
//! Documents live in one table keyed by (collection, lower-cased ID), like the SQLite store's.
//! Writes go through a few writer tasks, each owning a connection while it commits: a writer
//! takes every write request waiting and commits them in one transaction ("group commit"), so
//! the commit rate is not one round trip per device. Inside it, each write is one conditional
//! statement (`INSERT … ON CONFLICT DO NOTHING`, `UPDATE … WHERE etag = …`, …) whose row count
//! says whether its condition held, and all statements of the batch are sent at once
//! (pipelined). A request whose writes partly applied is undone by rolling the transaction back
//! and running the batch again without it; nobody hears of a write before its transaction
//! committed. Conditions are checked by the statement that writes, under the row lock it takes,
//! so two nodes racing for one record serialise on that row (no advisory locks, no
//! `SERIALIZABLE` needed on PostgreSQL; on databases that run everything serialisable, such as
//! CockroachDB, serialisation failures (SQLSTATE 40001) and deadlocks (40P01) are retried
//! with backoff).

use std::future::Future;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use dps_core::store::{Collection, Condition, Document, Page, Store, StoreError, Write};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use crate::version_cache::{collection_of, VersionCache, WriteCounts};

/// Migrations, applied in order; `dps_schema.version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: documents, settings, collection versions.
    r#"CREATE TABLE dps_documents (
        collection SMALLINT NOT NULL,
        key        TEXT COLLATE "C" NOT NULL,
        id         TEXT NOT NULL,
        etag       TEXT NOT NULL,
        partition  TEXT COLLATE "C",
        body       TEXT NOT NULL,
        expires_at BIGINT,
        PRIMARY KEY (collection, key)
     );
     CREATE INDEX dps_documents_by_partition ON dps_documents (collection, partition, key) WHERE partition IS NOT NULL;
     CREATE INDEX dps_documents_by_expiry ON dps_documents (collection, expires_at) WHERE expires_at IS NOT NULL;
     CREATE TABLE dps_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE dps_versions (collection SMALLINT NOT NULL, slot SMALLINT NOT NULL, version BIGINT NOT NULL,
       PRIMARY KEY (collection, slot));"#,
];

/// Most write requests committed in one transaction.
const MAX_BATCH: usize = 256;
/// Attempts of a transaction that failed with a serialisation failure or a deadlock.
const SERIALIZATION_ATTEMPTS: u32 = 6;
/// How long one read, or one batch's transaction, may wait for the database: past it the
/// caller gets `Unavailable` (a device `503`), never a hang, and the connection is closed
/// (a transaction it was in rolls back on the server).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(15);

fn no_answer() -> StoreError {
    StoreError::Unavailable(format!("the database did not answer within {} s", ANSWER_WITHIN.as_secs()))
}

/// How to reach the database and how to use it.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// libpq-style URL or key/value string (`postgres://user:password@host:5432/db`). Holds the
    /// password: never logged (see [`PostgresOptions::describe`]).
    pub url: String,
    /// Connections in the pool (the writers, and rare jobs: purges, settings); at least
    /// `writers + 1`. The read connections are taken out of the pool and come on top.
    pub pool_size: usize,
    /// Writer tasks, each committing batches on a connection of its own. One writer makes the
    /// biggest batches (everything that arrived during the previous commit goes into the next).
    pub writers: usize,
    /// Connections shared by all reads (the reads of concurrent requests go out together on
    /// each): more spread the reads over more database processes, fewer batch them better.
    pub readers: usize,
    /// `synchronous_commit` for this node's sessions (`on`, `remote_apply`, `remote_write`,
    /// `local`, `off`), or the server's default when `None`.
    pub synchronous_commit: Option<String>,
    /// PEM file of the CA that signs the database server's certificate; needed for
    /// `sslmode=require` (then the connection is TLS and the certificate verified).
    pub ca_file: Option<std::path::PathBuf>,
    /// How long the first start keeps trying to reach an unreachable database.
    pub start_timeout: Duration,
    /// How long a version read is reused while this handle has written nothing to the
    /// collection ([`Store::version`]): other nodes' writes are seen within it.
    pub refresh: Duration,
}

impl PostgresOptions {
    /// Options with the defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            pool_size: 16,
            writers: 1,
            readers: 1,
            synchronous_commit: None,
            ca_file: None,
            start_timeout: Duration::from_secs(60),
            refresh: crate::OTHER_WRITERS_SEEN_WITHIN,
        }
    }

    /// `user@host:port/database`, without the password: what logs and errors name.
    pub fn describe(&self) -> String {
        match tokio_postgres::Config::from_str(&self.url) {
            Ok(c) => describe(&c),
            Err(_) => "the configured database".into(),
        }
    }
}

fn describe(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!("{}@{host}:{port}/{}", c.get_user().unwrap_or("?"), c.get_dbname().unwrap_or("?"))
}

/// One write request waiting for a writer.
struct Job {
    writes: Vec<Write>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Connections shared by every read: queries of concurrent readers on one connection go
    /// out together (tokio-postgres pipelines them), which saves the database a wake-up and
    /// the node a round trip per read. A closed one is replaced from the pool on next use.
    readers: Vec<std::sync::Mutex<Option<Arc<ClientWrapper>>>>,
    next_reader: std::sync::atomic::AtomicUsize,
    jobs: mpsc::UnboundedSender<Job>,
    versions: VersionCache,
    /// `user@host:port/db`, for messages.
    target: String,
    /// The `dps_versions` slot of this handle's purges (its writers use this one and the next).
    slot: i16,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("target", &self.inner.target).finish_non_exhaustive()
    }
}

/// Whether a failure is the database asking for the transaction to be tried again.
fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// Maps a driver error to the store's: connection and capacity trouble is `Unavailable` (the
/// caller answers `503` with a retry hint); the message never carries the URL.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let class = &db.code().code()[..2];
        let message = format!("database error {}: {}", db.code().code(), db.message());
        return match class {
            // connection exception, insufficient resources, operator intervention, transaction
            // rollback (serialisation failure or deadlock after the retries), lock timeout.
            "08" | "53" | "57" | "40" | "55" => StoreError::Unavailable(message),
            _ => StoreError::Other(message),
        };
    }
    if e.is_closed() {
        return StoreError::Unavailable("the database connection was lost".into());
    }
    StoreError::Unavailable(format!("database: {e}"))
}

fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_err(e),
        PoolError::Timeout(_) => StoreError::Unavailable("no database connection within the pool timeout".into()),
        other => StoreError::Unavailable(format!("database pool: {other}")),
    }
}

/// Whether a connection failure at start will not go away by waiting (wrong password, unknown
/// database or user, bad TLS setup): fail at once with one clear line.
fn is_permanent(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(c) => {
            let code = c.code();
            code.starts_with("28") || code == "3D000" || code.starts_with("42")
        }
        None => {
            let text = e.to_string();
            text.contains("certificate") || text.contains("tls") || text.contains("TLS")
        }
    }
}

fn tag(collection: Collection) -> i16 {
    i16::try_from(collection.tag()).unwrap_or(i16::MAX)
}

fn key_of(id: &str) -> String {
    id.to_ascii_lowercase()
}

fn read_doc(row: &Row) -> Result<Document, StoreError> {
    let get = |e: tokio_postgres::Error| StoreError::Corrupt(format!("a stored document cannot be read: {e}"));
    Ok(Document {
        id: row.try_get(0).map_err(get)?,
        etag: row.try_get(1).map_err(get)?,
        partition: row.try_get(2).map_err(get)?,
        body: row.try_get(3).map_err(get)?,
        expires_at: row.try_get(4).map_err(get)?,
    })
}

const UPSERT: &str = "INSERT INTO dps_documents (collection, key, id, etag, partition, body, expires_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (collection, key) DO UPDATE SET id = excluded.id, etag = excluded.etag,
       partition = excluded.partition, body = excluded.body, expires_at = excluded.expires_at";
const INSERT_IF_ABSENT: &str = "INSERT INTO dps_documents (collection, key, id, etag, partition, body, expires_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (collection, key) DO NOTHING";
const UPDATE_IF_EXISTS: &str = "UPDATE dps_documents SET id = $3, etag = $4, partition = $5, body = $6, expires_at = $7
     WHERE collection = $1 AND key = $2";
const UPDATE_IF_MATCH: &str = "UPDATE dps_documents SET id = $3, etag = $4, partition = $5, body = $6, expires_at = $7
     WHERE collection = $1 AND key = $2 AND etag = $8";
const DELETE: &str = "DELETE FROM dps_documents WHERE collection = $1 AND key = $2";
const DELETE_IF_MATCH: &str = "DELETE FROM dps_documents WHERE collection = $1 AND key = $2 AND etag = $3";
const EXISTS: &str = "SELECT 1 FROM dps_documents WHERE collection = $1 AND key = $2";
const BUMP_VERSION: &str = "INSERT INTO dps_versions (collection, slot, version) VALUES ($1, $2, $3)
     ON CONFLICT (collection, slot) DO UPDATE SET version = dps_versions.version + excluded.version";
/// A collection's version is the sum of its rows in `dps_versions`, one per slot: each writer
/// moves the row of its own slot, so that writers (of this node and of others) do not queue
/// for one row lock held until each other's commit is flushed.
const VERSION_SLOTS: i16 = 16;

/// The statements of a write, in the order of [`Statements::all`].
#[derive(Clone, Copy)]
enum Kind {
    Upsert,
    InsertIfAbsent,
    UpdateIfExists,
    UpdateIfMatch,
    Delete,
    DeleteIfMatch,
    Exists,
}

/// One write as statement parameters, borrowed from the [`Write`] it comes from.
struct Planned<'a> {
    kind: Kind,
    collection: Collection,
    tag: i16,
    key: String,
    id: &'a str,
    etag: &'a str,
    partition: Option<&'a str>,
    body: &'a str,
    expires_at: Option<i64>,
    /// The ETag an `IfMatch` compares with.
    expected: &'a str,
    /// The error when the statement touched no row (for `Exists`: when it found one).
    failure: fn(&str) -> StoreError,
}

impl<'a> Planned<'a> {
    fn of(write: &'a Write) -> Planned<'a> {
        let (collection, condition) = match write {
            Write::Put { collection, condition, .. } | Write::Delete { collection, condition, .. } => {
                (*collection, condition)
            }
        };
        let (kind, failure): (Kind, fn(&str) -> StoreError) = match (write, condition) {
            (Write::Put { .. }, Condition::Always) => {
                (Kind::Upsert, |w| StoreError::Other(format!("{w} was not written")))
            }
            (Write::Put { .. }, Condition::IfAbsent) => {
                (Kind::InsertIfAbsent, |w| StoreError::AlreadyExists(format!("{w} already exists")))
            }
            (Write::Put { .. }, Condition::IfExists) => {
                (Kind::UpdateIfExists, |w| StoreError::PreconditionFailed(format!("{w} does not exist")))
            }
            (Write::Put { .. }, Condition::IfMatch(_)) => (Kind::UpdateIfMatch, |w| {
                StoreError::PreconditionFailed(format!("{w} does not exist or has another etag"))
            }),
            (Write::Delete { .. }, Condition::Always) => {
                (Kind::Delete, |w| StoreError::NotFound(format!("{w} does not exist")))
            }
            (Write::Delete { .. }, Condition::IfExists) => {
                (Kind::Delete, |w| StoreError::PreconditionFailed(format!("{w} does not exist")))
            }
            (Write::Delete { .. }, Condition::IfMatch(_)) => (Kind::DeleteIfMatch, |w| {
                StoreError::PreconditionFailed(format!("{w} does not exist or has another etag"))
            }),
            // Deleting what must be absent never succeeds: it exists (condition failed) or it
            // does not (nothing to delete).
            (Write::Delete { .. }, Condition::IfAbsent) => {
                (Kind::Exists, |w| StoreError::NotFound(format!("{w} does not exist")))
            }
        };
        let expected = match condition {
            Condition::IfMatch(e) => e.as_str(),
            _ => "",
        };
        let (id, etag, partition, body, expires_at) = match write {
            Write::Put { document: d, .. } => {
                (d.id.as_str(), d.etag.as_str(), d.partition.as_deref(), d.body.as_str(), d.expires_at)
            }
            Write::Delete { id, .. } => (id.as_str(), "", None, "", None),
        };
        Planned {
            kind,
            collection,
            tag: tag(collection),
            key: key_of(id),
            id,
            etag,
            partition,
            body,
            expires_at,
            expected,
            failure,
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        match self.kind {
            Kind::Upsert | Kind::InsertIfAbsent | Kind::UpdateIfExists => {
                vec![&self.tag, &self.key, &self.id, &self.etag, &self.partition, &self.body, &self.expires_at]
            }
            Kind::UpdateIfMatch => vec![
                &self.tag,
                &self.key,
                &self.id,
                &self.etag,
                &self.partition,
                &self.body,
                &self.expires_at,
                &self.expected,
            ],
            Kind::Delete | Kind::Exists => vec![&self.tag, &self.key],
            Kind::DeleteIfMatch => vec![&self.tag, &self.key, &self.expected],
        }
    }

    /// What the statement's row count means: `Ok` it wrote, `Err` its condition failed.
    fn outcome(&self, rows: u64) -> Result<(), StoreError> {
        let what = || format!("{:?} '{}'", self.collection, self.id);
        match self.kind {
            Kind::Exists if rows > 0 => Err(StoreError::AlreadyExists(format!("{} already exists", what()))),
            Kind::Exists => Err((self.failure)(&what())),
            _ if rows > 0 => Ok(()),
            _ => Err((self.failure)(&what())),
        }
    }
}

/// The prepared statements of one connection, one per [`Kind`] in its order.
struct Statements {
    all: Vec<Statement>,
    bump: Statement,
}

impl Statements {
    async fn prepare(client: &Object) -> Result<Statements, tokio_postgres::Error> {
        let texts = [UPSERT, INSERT_IF_ABSENT, UPDATE_IF_EXISTS, UPDATE_IF_MATCH, DELETE, DELETE_IF_MATCH, EXISTS];
        let mut all = Vec::with_capacity(texts.len());
        for t in texts {
            all.push(client.prepare_cached(t).await?);
        }
        let bump = client.prepare_cached(BUMP_VERSION).await?;
        Ok(Statements { all, bump })
    }

    fn of(&self, kind: Kind) -> &Statement {
        &self.all[kind as usize]
    }
}

impl PostgresStore {
    /// Connects (trying again with backoff while the database cannot be reached, up to
    /// `start_timeout`; a wrong password or an unknown database fails at once), creates or
    /// migrates the schema (safe when several nodes start at once), and starts the writers.
    pub async fn connect(options: PostgresOptions) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(&options.url).map_err(|e| {
            StoreError::Unavailable(format!("[store] url is not a PostgreSQL URL or key=value string: {e}"))
        })?;
        let target = describe(&config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        if let Some(mode) = &options.synchronous_commit {
            let extra = format!("-c synchronous_commit={mode}");
            let joined = match config.get_options() {
                Some(o) if !o.is_empty() => format!("{o} {extra}"),
                _ => extra,
            };
            config.options(&joined);
        }
        if config.get_application_name().is_none() {
            config.application_name("dps");
        }
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match (config.get_ssl_mode(), &options.ca_file) {
            (_, Some(ca)) => Manager::from_config(config, tls_connector(ca)?, manager_config),
            (tokio_postgres::config::SslMode::Require, None) => {
                return Err(StoreError::Unavailable(
                    "[store] url asks for sslmode=require: set [store] ca_file to the CA of the database server's certificate".into(),
                ))
            }
            // `prefer` without a CA to verify against: plain TCP, as the server is not verified anyway.
            (_, None) => {
                let mut plain = config;
                plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
                Manager::from_config(plain, tokio_postgres::NoTls, manager_config)
            }
        };
        let writers = options.writers.max(1);
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(writers + 1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot set up the database pool: {e}")))?;
        let first = first_connection(&pool, &target, options.start_timeout).await?;
        migrate(first, &target).await?;
        let (jobs, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        let base_slot = rand::random::<u16>() % VERSION_SLOTS as u16;
        for k in 0..writers {
            let slot = i16::try_from((base_slot as usize + k) % VERSION_SLOTS as usize).unwrap_or(0);
            tokio::spawn(writer_loop(pool.clone(), rx.clone(), slot));
        }
        let max = pool.status().max_size;
        let readers = options.readers.clamp(1, max.saturating_sub(writers).max(1));
        tracing::info!(database = %target, writers, readers, pool = max, "PostgreSQL store ready");
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                readers: (0..readers).map(|_| std::sync::Mutex::new(None)).collect(),
                next_reader: std::sync::atomic::AtomicUsize::new(0),
                jobs,
                versions: VersionCache::new(options.refresh),
                target,
                slot: i16::try_from(base_slot).unwrap_or(0),
            }),
        })
    }

    /// The schema version the database holds.
    pub async fn schema_version(&self) -> Result<usize, StoreError> {
        let client = self.inner.pool.get().await.map_err(pool_err)?;
        let row = client.query_one("SELECT version FROM dps_schema WHERE id = 1", &[]).await.map_err(pg_err)?;
        let v: i32 = row.try_get(0).map_err(pg_err)?;
        Ok(usize::try_from(v).unwrap_or(0))
    }

    /// The migrations this build knows.
    pub fn known_schema_version() -> usize {
        MIGRATIONS.len()
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.inner.pool.get().await.map_err(pool_err)
    }

    /// A shared read connection, in turn, and its slot. Taken out of the pool for good (it
    /// closes when the slot lets go of it and its last reader is done).
    async fn reader(&self) -> Result<(Arc<ClientWrapper>, usize), StoreError> {
        let readers = &self.inner.readers;
        let i = self.inner.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % readers.len();
        let slot = &readers[i];
        if let Some(client) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref().filter(|c| !c.is_closed()) {
            return Ok((client.clone(), i));
        }
        let fresh = Arc::new(Object::take(self.client().await?));
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        Ok((fresh, i))
    }

    /// Runs a read on a shared read connection within [`ANSWER_WITHIN`]; a connection that
    /// did not answer in time is given up (the next read opens another).
    async fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<ClientWrapper>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let (client, slot) = self.reader().await?;
        match tokio::time::timeout(ANSWER_WITHIN, f(client.clone())).await {
            Ok(result) => result,
            Err(_) => {
                let mut held = self.inner.readers[slot].lock().unwrap_or_else(|p| p.into_inner());
                if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, &client)) {
                    *held = None;
                }
                Err(no_answer())
            }
        }
    }
}

fn tls_connector(ca: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls_pki_types::pem::PemObject as _;
    let bad = |e: String| StoreError::Unavailable(format!("[store] ca_file {}: {e}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))?;
    for cert in certs {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The first connection, retried with backoff while the database cannot be reached.
async fn first_connection(pool: &Pool, target: &str, patience: Duration) -> Result<Object, StoreError> {
    let started = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(250);
    loop {
        match pool.get().await {
            Ok(client) => return Ok(client),
            Err(PoolError::Backend(e)) if is_permanent(&e) => {
                let reason = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
                return Err(StoreError::Unavailable(format!(
                    "cannot use PostgreSQL at {target}: {reason}; check [store] url (or DPS_STORE_URL) and ca_file"
                )));
            }
            Err(e) => {
                let reason = match e {
                    PoolError::Backend(e) => e.to_string(),
                    other => other.to_string(),
                };
                if started.elapsed() + wait > patience {
                    return Err(StoreError::Unavailable(format!(
                        "PostgreSQL at {target} cannot be reached ({reason}); gave up after {}s ([store] start_timeout_secs)",
                        started.elapsed().as_secs()
                    )));
                }
                tracing::warn!(database = %target, error = %reason, retry_in_ms = wait.as_millis() as u64,
                    "the database cannot be reached yet; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Creates the schema table, then applies the missing migrations under its row lock, so that
/// nodes starting at once run each migration exactly once.
async fn migrate(mut client: Object, target: &str) -> Result<(), StoreError> {
    for attempt in 0.. {
        // Two sessions creating the same table at once can collide in the catalogue even with
        // IF NOT EXISTS (a unique violation, or 42710 for the table's row type); the loser sees
        // the table on the next try.
        match client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS dps_schema (id INT PRIMARY KEY, version INT NOT NULL);
                 INSERT INTO dps_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;",
            )
            .await
        {
            Ok(()) => break,
            Err(e)
                if attempt < 5
                    && matches!(e.code(), Some(c) if *c == SqlState::UNIQUE_VIOLATION
                        || *c == SqlState::DUPLICATE_TABLE
                        || *c == SqlState::DUPLICATE_OBJECT
                        || is_retryable(&e)) =>
            {
                tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
            }
            Err(e) => return Err(pg_err(e)),
        }
    }
    for attempt in 1..=SERIALIZATION_ATTEMPTS {
        let tx = client.transaction().await.map_err(pg_err)?;
        let result: Result<(), tokio_postgres::Error> = async {
            let row = tx.query_one("SELECT version FROM dps_schema WHERE id = 1 FOR UPDATE", &[]).await?;
            let current: i32 = row.try_get(0)?;
            let current = usize::try_from(current).unwrap_or(usize::MAX);
            if current > MIGRATIONS.len() {
                return Ok(());
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
                tx.batch_execute(sql).await?;
                let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
                tx.execute("UPDATE dps_schema SET version = $1 WHERE id = 1", &[&version]).await?;
                tracing::info!(version = i + 1, database = %target, "store schema migrated");
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                tx.commit().await.map_err(pg_err)?;
                break;
            }
            Err(e) if is_retryable(&e) && attempt < SERIALIZATION_ATTEMPTS => continue,
            Err(e) => return Err(pg_err(e)),
        }
    }
    let row = client.query_one("SELECT version FROM dps_schema WHERE id = 1", &[]).await.map_err(pg_err)?;
    let current: i32 = row.try_get(0).map_err(pg_err)?;
    if usize::try_from(current).unwrap_or(usize::MAX) > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "the database {target} has schema version {current}, newer than this dps understands ({}); upgrade dps",
            MIGRATIONS.len()
        )));
    }
    Ok(())
}

/// A writer task: takes every write request waiting (up to [`MAX_BATCH`]) and commits them in
/// one transaction, then answers each.
async fn writer_loop(pool: Pool, jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>, slot: i16) {
    loop {
        let batch = {
            let mut rx = jobs.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        let (size, started) = (batch.len(), std::time::Instant::now());
        commit_batch(&pool, batch, slot).await;
        crate::record_commit("postgres", size, started);
    }
}

async fn commit_batch(pool: &Pool, batch: Vec<Job>, slot: i16) {
    let writes: Vec<&[Write]> = batch.iter().map(|j| j.writes.as_slice()).collect();
    match commit_with_retries(pool, &writes, slot).await {
        Ok(results) => {
            for (job, r) in batch.into_iter().zip(results) {
                let _ = job.reply.send(r);
            }
        }
        // A statement failed for a reason of its own (not a condition, not the connection):
        // run the requests one by one so that one bad request fails alone.
        Err(StoreError::Other(_)) if batch.len() > 1 => {
            for job in batch {
                let r = match commit_with_retries(pool, &[job.writes.as_slice()], slot).await {
                    Ok(mut one) => one.pop().unwrap_or(Ok(())),
                    Err(e) => Err(e),
                };
                let _ = job.reply.send(r);
            }
        }
        Err(e) => {
            dps_core::warn_limited!("store-write", error = %e, requests = batch.len(),
                "store transaction failed; nothing of it was written");
            for job in batch {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Commits `requests` in one transaction, retrying it on serialisation failures and deadlocks.
async fn commit_with_retries(
    pool: &Pool,
    requests: &[&[Write]],
    slot: i16,
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let client = pool.get().await.map_err(pool_err)?;
        let Ok(outcome) = tokio::time::timeout(ANSWER_WITHIN, commit_once(&client, requests, slot)).await else {
            // Mid-transaction, maybe: close the connection (the server rolls back what did not
            // commit) rather than give it back to the pool.
            drop(Object::take(client));
            return Err(no_answer());
        };
        match outcome {
            Ok(results) => return Ok(results),
            Err(e) if is_retryable(&e) && attempt < SERIALIZATION_ATTEMPTS => {
                let jitter = u64::from(rand::random::<u8>());
                tokio::time::sleep(Duration::from_millis((5 << attempt) + jitter % 10)).await;
            }
            Err(e) => return Err(pg_err(e)),
        }
    }
}

/// One attempt: runs every request's statements pipelined; a request that partly applied is
/// dropped (answered with its failure) and the transaction run again without it. The
/// transaction is driven by hand (`BEGIN` sent with the batch's statements, `COMMIT` with the
/// version moves) so that a batch costs two round trips; on any error it is rolled back
/// before the connection goes back to the pool.
async fn commit_once(
    client: &Object,
    requests: &[&[Write]],
    slot: i16,
) -> Result<Vec<Result<(), StoreError>>, tokio_postgres::Error> {
    let statements = Statements::prepare(client).await?;
    let result = transaction_rounds(client, &statements, requests, slot).await;
    if result.is_err() {
        // Best effort: a broken connection is dropped by the pool anyway.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

async fn transaction_rounds(
    client: &Object,
    statements: &Statements,
    requests: &[&[Write]],
    slot: i16,
) -> Result<Vec<Result<(), StoreError>>, tokio_postgres::Error> {
    let planned: Vec<Vec<Planned>> = requests.iter().map(|ws| ws.iter().map(Planned::of).collect()).collect();
    let mut results: Vec<Option<Result<(), StoreError>>> = vec![None; requests.len()];
    let mut dropped = vec![false; requests.len()];
    loop {
        let live: Vec<usize> = (0..requests.len()).filter(|i| !dropped[*i]).collect();
        let params: Vec<Vec<&(dyn ToSql + Sync)>> =
            live.iter().flat_map(|i| planned[*i].iter().map(Planned::params)).collect();
        let kinds: Vec<Kind> = live.iter().flat_map(|i| planned[*i].iter().map(|p| p.kind)).collect();
        let begin = client.batch_execute("BEGIN");
        let runs = kinds.iter().zip(&params).map(|(k, p)| client.execute(statements.of(*k), p.as_slice()));
        let (begun, counts) = futures_util::future::join(begin, futures_util::future::join_all(runs)).await;
        begun?;
        let mut counts = counts.into_iter();
        let mut partly: Option<(usize, StoreError)> = None;
        let mut round: Vec<(usize, Result<(), StoreError>)> = Vec::with_capacity(live.len());
        for &i in &live {
            let mut first_failure = None;
            let mut wrote_any = false;
            for p in &planned[i] {
                let rows = counts.next().unwrap_or(Ok(0))?;
                match p.outcome(rows) {
                    Ok(()) => wrote_any = true,
                    Err(e) => {
                        first_failure.get_or_insert(e);
                    }
                }
            }
            match first_failure {
                Some(e) if wrote_any => {
                    partly.get_or_insert((i, e));
                }
                Some(e) => round.push((i, Err(e))),
                None => round.push((i, Ok(()))),
            }
        }
        if let Some((i, e)) = partly {
            // Everything after it may have seen its partial writes: run the rest again.
            client.batch_execute("ROLLBACK").await?;
            dropped[i] = true;
            results[i] = Some(Err(e));
            continue;
        }
        let mut written = WriteCounts::default();
        for (i, r) in &round {
            if r.is_ok() {
                written.add(requests[*i]);
            }
        }
        let bumps: Vec<(i16, i64)> = written.moved().collect();
        let bump_params: Vec<[&(dyn ToSql + Sync); 3]> =
            bumps.iter().map(|(t, n)| [t as _, &slot as _, n as _]).collect();
        let bump_runs = bump_params.iter().map(|p| client.execute(&statements.bump, p));
        let (bumped, committed) =
            futures_util::future::join(futures_util::future::join_all(bump_runs), client.batch_execute("COMMIT")).await;
        // A COMMIT after a failed statement only rolls back: check the statements first.
        for r in bumped {
            r?;
        }
        committed?;
        for (i, r) in round {
            results[i] = Some(r);
        }
        return Ok(results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect());
    }
}

/// Runs `f` (a rare job: a purge, a setting) with retries on serialisation failures, within
/// [`ANSWER_WITHIN`] each, on a connection taken out of the pool: it closes when `f` is done
/// or given up, so a transaction cut short never goes back to the pool.
async fn with_retries<T, F, Fut>(store: &PostgresStore, mut f: F) -> Result<T, StoreError>
where
    F: FnMut(ClientWrapper) -> Fut,
    Fut: Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let client = Object::take(store.client().await?);
        let Ok(outcome) = tokio::time::timeout(ANSWER_WITHIN, f(client)).await else {
            return Err(no_answer());
        };
        match outcome {
            Ok(v) => return Ok(v),
            Err(e) if is_retryable(&e) && attempt < SERIALIZATION_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
            }
            Err(e) => return Err(pg_err(e)),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, collection: Collection, id: &str) -> Result<Option<Document>, StoreError> {
        let key = key_of(id);
        self.read(|client| async move {
            let st = client
                .prepare_cached(
                    "SELECT id, etag, partition, body, expires_at FROM dps_documents WHERE collection = $1 AND key = $2",
                )
                .await
                .map_err(pg_err)?;
            let row = client.query_opt(&st, &[&tag(collection), &key]).await.map_err(pg_err)?;
            row.as_ref().map(read_doc).transpose()
        })
        .await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let written: Vec<Collection> = writes.iter().map(collection_of).collect();
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(Job { writes, reply })
            .map_err(|_| StoreError::Unavailable("the store's writers have stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("the store's writers have stopped".into()))??;
        self.inner.versions.wrote(written);
        Ok(())
    }

    async fn list(
        &self,
        collection: Collection,
        partition: Option<&str>,
        continuation: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let after = crate::continuation::decode(continuation)?;
        let limit = limit.max(1);
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        self.read(|client| async move {
            let columns = "SELECT id, etag, partition, body, expires_at, key FROM dps_documents WHERE collection = $1";
            let c = tag(collection);
            let rows = match (partition, after.as_deref()) {
                (None, None) => {
                    let st =
                        client.prepare_cached(&format!("{columns} ORDER BY key LIMIT $2")).await.map_err(pg_err)?;
                    client.query(&st, &[&c, &fetch]).await
                }
                (Some(p), None) => {
                    let st = client
                        .prepare_cached(&format!("{columns} AND partition = $2 ORDER BY key LIMIT $3"))
                        .await
                        .map_err(pg_err)?;
                    client.query(&st, &[&c, &p, &fetch]).await
                }
                (None, Some(a)) => {
                    let st = client
                        .prepare_cached(&format!("{columns} AND key > $2 ORDER BY key LIMIT $3"))
                        .await
                        .map_err(pg_err)?;
                    client.query(&st, &[&c, &a, &fetch]).await
                }
                (Some(p), Some(a)) => {
                    let st = client
                        .prepare_cached(&format!("{columns} AND partition = $2 AND key > $3 ORDER BY key LIMIT $4"))
                        .await
                        .map_err(pg_err)?;
                    client.query(&st, &[&c, &p, &a, &fetch]).await
                }
            }
            .map_err(pg_err)?;
            let mut docs = Vec::with_capacity(rows.len());
            for row in &rows {
                let key: String =
                    row.try_get(5).map_err(|e| StoreError::Corrupt(format!("a stored key cannot be read: {e}")))?;
                docs.push((read_doc(row)?, key));
            }
            Ok(crate::continuation::page(docs, limit))
        })
        .await
    }

    async fn purge_expired(&self, now_millis: i64) -> Result<u64, StoreError> {
        let slot = self.inner.slot;
        let purged = with_retries(self, |mut client| async move {
            let tx = client.transaction().await?;
            let mut purged = Vec::new();
            for c in Collection::ALL {
                let n = tx
                    .execute(
                        "DELETE FROM dps_documents WHERE collection = $1 AND expires_at IS NOT NULL AND expires_at < $2",
                        &[&tag(c), &now_millis],
                    )
                    .await?;
                if n > 0 {
                    tx.execute(BUMP_VERSION, &[&tag(c), &slot, &i64::try_from(n).unwrap_or(i64::MAX)]).await?;
                    purged.push((c, n));
                }
            }
            tx.commit().await?;
            Ok(purged)
        })
        .await?;
        self.inner.versions.wrote(purged.iter().map(|(c, _)| *c));
        Ok(purged.iter().map(|(_, n)| n).sum())
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read(|client| async move {
            let row =
                client.query_opt("SELECT value FROM dps_settings WHERE key = $1", &[&key]).await.map_err(pg_err)?;
            row.map(|r| r.try_get(0).map_err(pg_err)).transpose()
        })
        .await
    }

    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        with_retries(self, |client| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                client
                    .execute(
                        "INSERT INTO dps_settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                        &[&key, &value],
                    )
                    .await?;
                let row = client.query_one("SELECT value FROM dps_settings WHERE key = $1", &[&key]).await?;
                row.try_get(0)
            }
        })
        .await
    }

    async fn version(&self, collection: Collection) -> Result<u64, StoreError> {
        let ticket = match self.inner.versions.lookup(collection) {
            Ok(version) => return Ok(version),
            Err(ticket) => ticket,
        };
        let stored: i64 = self
            .read(|client| async move {
                let st = client
                    .prepare_cached("SELECT COALESCE(SUM(version), 0)::BIGINT FROM dps_versions WHERE collection = $1")
                    .await
                    .map_err(pg_err)?;
                let row = client.query_opt(&st, &[&tag(collection)]).await.map_err(pg_err)?;
                match row {
                    Some(r) => r.try_get(0).map_err(pg_err),
                    None => Ok(0),
                }
            })
            .await?;
        let version = u64::try_from(stored)
            .map_err(|_| StoreError::Corrupt(format!("the stored version of {collection:?} is negative")))?;
        self.inner.versions.record(ticket, version);
        Ok(version)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let v: i32 = self
            .read(|client| async move {
                let row = client.query_one("SELECT version FROM dps_schema WHERE id = 1", &[]).await.map_err(pg_err)?;
                row.try_get(0).map_err(pg_err)
            })
            .await?;
        if usize::try_from(v).ok() != Some(MIGRATIONS.len()) {
            return Err(StoreError::Unavailable(format!(
                "the database holds schema version {v}; this dps expects {}",
                MIGRATIONS.len()
            )));
        }
        Ok(())
    }
}
