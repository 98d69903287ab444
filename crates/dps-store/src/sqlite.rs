//! The embedded SQLite store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use dps_core::store::{Collection, Condition, Document, Page, Store, StoreError, Write};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::version_cache::{collection_of, VersionCache, WriteCounts};

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

/// Migrations, applied in order; `PRAGMA user_version` records how many ran. Each is frozen
/// once released (a later one may repeat an earlier one's definitions); public so that tests
/// can build a file as an older dps left it.
pub const SQLITE_MIGRATIONS: &[&str] = &[
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
    // 2: documents in a rowid table. In a WITHOUT ROWID table every B-tree cell holds the whole
    // row, interior cells too, and a page keeps at most about 1,000 bytes of a cell: a larger
    // document (a TPM challenge, 1.6 KB) spilled onto an overflow page of its own, and a search
    // that compared keys with such a cell read that page as well. Now the primary-key index
    // holds only (collection, key, rowid) and the table keeps a row of up to about 4,000 bytes
    // in its leaf (BENCHMARKS.md, issue 15). The copy keeps every row as it is.
    "CREATE TABLE documents_rowid (
        collection INTEGER NOT NULL,
        key        TEXT    NOT NULL,
        id         TEXT    NOT NULL,
        etag       TEXT    NOT NULL,
        partition  TEXT,
        body       TEXT    NOT NULL,
        expires_at INTEGER,
        PRIMARY KEY (collection, key)
     );
     INSERT INTO documents_rowid (collection, key, id, etag, partition, body, expires_at)
        SELECT collection, key, id, etag, partition, body, expires_at FROM documents ORDER BY collection, key;
     DROP TABLE documents;
     ALTER TABLE documents_rowid RENAME TO documents;
     CREATE INDEX documents_by_partition ON documents (collection, partition, key) WHERE partition IS NOT NULL;
     CREATE INDEX documents_by_expiry ON documents (expires_at) WHERE expires_at IS NOT NULL;",
];

/// The `documents.collection` of the version rows: one per collection (key = the collection's
/// tag in decimal, body = its version in decimal), moved in the transaction of every write to
/// the collection, so that every handle and every process on the file sees the same versions
/// ([`Store::version`]). Tag 0 is no [`Collection`]'s: listings, gets and writes never see the
/// rows, and they never expire. A database written before they existed has none: a missing
/// row is version 0, and the first write to the collection creates it (no schema change).
const VERSION_ROWS: i64 = 0;

/// How long a collection's version read from the file is used again while this handle has
/// written nothing to the collection: another handle's or another process's write to it is
/// seen within this time, this handle's own writes at once ([`Store::version`]). It spares the
/// point read of the version on most group registrations.
pub const OTHER_WRITERS_SEEN_WITHIN: Duration = Duration::from_millis(100);

/// Most registrations' writes committed in one transaction (one fsync).
const MAX_BATCH: usize = 512;
/// Read connections (WAL readers run beside the writer).
const READERS: usize = 4;
/// How long the writer waits for more requests to join a small batch under concurrent load
/// (`writer_loop`): about what a commit of a few requests costs, and well under a device's
/// round trip. One device alone never waits (its batches hold one request).
const GATHER_FOR: Duration = Duration::from_micros(500);
/// Concurrent load: the batch before held more than one request and committed within this.
const LOADED_WITHIN: Duration = Duration::from_millis(2);
/// A batch of this many requests or more commits without waiting.
const GATHER_BELOW: usize = 32;

/// Work that runs alone on the writer connection.
type Exclusive = Box<dyn FnOnce(&mut Connection) + Send>;

/// One request to the writer thread.
enum Job {
    /// An atomic batch of writes; committed together with the other batches waiting.
    Write { writes: Vec<Write>, reply: tokio::sync::oneshot::Sender<Result<(), StoreError>> },
    /// Anything else that writes (settings, purges): run alone on the writer connection.
    Exclusive(Exclusive),
}

/// The embedded SQLite store. Cheap to clone.
///
/// One writer thread owns the only writing connection and commits every write request that
/// is waiting when it starts a transaction in that one transaction, each request inside a
/// savepoint of its own (a failed condition rolls back just that request): one fsync for many
/// registrations ("group commit"). Nobody hears of a write before its transaction committed.
/// Reads use a small pool of read connections, which WAL lets run beside the writer.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    writer: Option<mpsc::Sender<Job>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    /// This handle's writes and the versions it read ([`OTHER_WRITERS_SEEN_WITHIN`], or what
    /// the handle was opened with).
    versions: VersionCache,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer thread after the jobs already sent.
        self.writer = None;
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.inner.path).finish_non_exhaustive()
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

/// Creates the database file with mode 0600, or takes group and other permissions away from an
/// existing one and its `-wal` / `-shm` companions.
#[cfg(unix)]
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let unavailable = |e: std::io::Error| StoreError::Unavailable(format!("cannot prepare {}: {e}", path.display()));
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(unavailable)?;
    }
    let mut names = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        names.push(name.into());
    }
    for file in names {
        let Ok(meta) = std::fs::metadata(&file) else { continue };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o700)).map_err(unavailable)?;
            tracing::warn!(file = %file.display(), was = format!("{mode:04o}"), "store file was readable by others; made owner-only (it holds every key)");
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn make_private(_path: &Path) -> Result<(), StoreError> {
    Ok(())
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn =
        Connection::open(path).map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql_err)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations. The file
    /// holds every key: it is created owner-only (0600), and SQLite gives its `-wal` and
    /// `-shm` files the same mode; an existing file readable by others is made owner-only.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        Self::open_with_refresh(path, synchronous, OTHER_WRITERS_SEEN_WITHIN)
    }

    /// [`SqliteStore::open`], with another time within which other handles' writes are seen in
    /// [`Store::version`] (zero: read the version from the file every time).
    pub fn open_with_refresh(path: &Path, synchronous: Synchronous, refresh: Duration) -> Result<Self, StoreError> {
        make_private(path)?;
        let mut conn = open_connection(path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(sql_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!("{} cannot use WAL journaling (got {mode})", path.display())));
        }
        let sync = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        // temp_store = MEMORY keeps the statement journal of the per-request savepoints
        // (`commit_batch`) in memory: on a file it is written page by page, 4 KiB for every page
        // a request changes, and that file write cost more than the commit's own.
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;"
        ))
        .map_err(sql_err)?;
        migrate(&mut conn, path)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let r = open_connection(path)?;
            r.execute_batch("PRAGMA query_only = 1;").map_err(sql_err)?;
            readers.push(Mutex::new(r));
        }
        let (tx, rx) = mpsc::channel();
        let writer_thread = std::thread::Builder::new()
            .name("dps-store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store writer thread: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                readers,
                next_reader: AtomicUsize::new(0),
                writer: Some(tx),
                writer_thread: Some(writer_thread),
                versions: VersionCache::new(refresh),
            }),
        })
    }

    /// The current schema version.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let conn = self.reader();
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
        Ok(usize::try_from(v).unwrap_or(0))
    }

    /// A free read connection, else the next one in turn.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        let readers = &self.inner.readers;
        let start = self.inner.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..readers.len() {
            match readers[(start + i) % readers.len()].try_lock() {
                Ok(guard) => return guard,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        // A panic while holding the lock left no open transaction behind (rusqlite rolls
        // back on drop), so the connection is still usable.
        readers[start % readers.len()].lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this.reader()))
            .await
            .map_err(|e| StoreError::Other(format!("store task failed: {e}")))?
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.inner
            .writer
            .as_ref()
            .and_then(|w| w.send(job).ok())
            .ok_or_else(|| StoreError::Unavailable("the store's writer thread has stopped".into()))
    }

    /// Runs `f` alone on the writer connection.
    async fn exclusive<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Exclusive(Box::new(move |conn| {
            let _ = tx.send(f(conn));
        })))?;
        rx.await.map_err(|_| StoreError::Unavailable("the store's writer thread has stopped".into()))?
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
    let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
    let current = usize::try_from(current).unwrap_or(usize::MAX);
    if current > SQLITE_MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "{} has schema version {current}, newer than this dps understands ({}); upgrade dps",
            path.display(),
            SQLITE_MIGRATIONS.len()
        )));
    }
    for (i, sql) in SQLITE_MIGRATIONS.iter().enumerate().skip(current) {
        // Some copy every document once: on a large store that takes a while, and says so.
        tracing::info!(version = i + 1, path = %path.display(), "store schema migrating");
        tx.execute_batch(sql).map_err(sql_err)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1)).map_err(sql_err)?;
        tracing::info!(version = i + 1, "store schema migrated");
    }
    tx.commit().map_err(sql_err)
}

type Reply = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// The writer thread: takes every write request waiting (up to [`MAX_BATCH`]), commits them in
/// one transaction, then answers each. Under concurrent load it waits a moment for more
/// requests first ([`GATHER_FOR`]).
fn writer_loop(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    let (mut last_commit, mut previous_size) = (std::time::Instant::now(), 0usize);
    while let Ok(job) = jobs.recv() {
        let mut batch: Vec<(Vec<Write>, Reply)> = Vec::new();
        match job {
            Job::Write { writes, reply } => batch.push((writes, reply)),
            Job::Exclusive(f) => {
                f(&mut conn);
                continue;
            }
        }
        let mut after = take_waiting(&jobs, &mut batch);
        // Group commit under concurrent load: when the batch before held several requests and
        // committed a moment ago, more are on their way. A small batch waits a little for them
        // instead of paying a commit (its WAL writes and fsync) for one or two requests; a
        // large one (a queue that is long already) does not wait.
        if after.is_none() && batch.len() < GATHER_BELOW && previous_size > 1 && last_commit.elapsed() < LOADED_WITHIN {
            std::thread::sleep(GATHER_FOR);
            after = take_waiting(&jobs, &mut batch);
        }
        let (size, started) = (batch.len(), std::time::Instant::now());
        commit_batch(&mut conn, batch);
        (last_commit, previous_size) = (std::time::Instant::now(), size);
        crate::record_commit("sqlite", size, started);
        if let Some(f) = after {
            f(&mut conn);
        }
    }
}

/// Moves the write requests waiting into `batch` (up to [`MAX_BATCH`]); stops at an exclusive
/// job, which it returns (it runs after the batch's commit).
fn take_waiting(jobs: &mpsc::Receiver<Job>, batch: &mut Vec<(Vec<Write>, Reply)>) -> Option<Exclusive> {
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(Job::Write { writes, reply }) => batch.push((writes, reply)),
            Ok(Job::Exclusive(f)) => return Some(f),
            Err(_) => break,
        }
    }
    None
}

fn commit_batch(conn: &mut Connection, batch: Vec<(Vec<Write>, Reply)>) {
    let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
    let committed = (|| {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        // Writes per collection tag of the requests that succeeded: what their versions move by.
        let mut written = WriteCounts::default();
        for (writes, _) in &batch {
            let sp = tx.savepoint().map_err(sql_err)?;
            let r = apply(&sp, writes);
            if r.is_ok() {
                sp.commit().map_err(sql_err)?;
                written.add(writes);
            }
            // Dropping an uncommitted savepoint rolls it back.
            results.push(r);
        }
        for (tag, n) in written.moved() {
            bump_version(&tx, i64::from(tag), n)?;
        }
        tx.commit().map_err(sql_err)
    })();
    match committed {
        Ok(()) => {
            for ((_, reply), r) in batch.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            // Rate-limited: a full disk fails every write until it has room again.
            dps_core::warn_limited!("store-write", error = %e, requests = batch.len(),
                "store transaction failed; nothing of it was written");
            for (_, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Moves the version of the collection tagged `tag` by `by`, inside the caller's transaction.
fn bump_version(tx: &Connection, tag: i64, by: i64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO documents (collection, key, id, etag, partition, body, expires_at)
         VALUES (?1, ?2, ?2, '', NULL, CAST(?3 AS TEXT), NULL)
         ON CONFLICT (collection, key) DO UPDATE SET body = CAST(CAST(body AS INTEGER) + ?3 AS TEXT)",
    )
    .and_then(|mut st| st.execute(params![VERSION_ROWS, tag.to_string(), by]))
    .map_err(sql_err)?;
    Ok(())
}

/// Checks the conditions and applies one request's writes (inside its savepoint).
fn apply(tx: &Connection, writes: &[Write]) -> Result<(), StoreError> {
    for w in writes {
        let (collection, id, condition) = match w {
            Write::Put { collection, document, condition } => (*collection, document.id.as_str(), condition),
            Write::Delete { collection, id, condition } => (*collection, id.as_str(), condition),
        };
        let key = key_of(id);
        // An unconditional write needs no look at the current row first (a delete learns from
        // its change count whether there was one): one B-tree search fewer per event, say.
        let current: Option<String> = if matches!(condition, Condition::Always) {
            None
        } else {
            tx.prepare_cached("SELECT etag FROM documents WHERE collection = ?1 AND key = ?2")
                .and_then(|mut st| st.query_row(params![collection.tag(), key], |r| r.get(0)).optional())
                .map_err(sql_err)?
        };
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
                let deleted = tx
                    .prepare_cached("DELETE FROM documents WHERE collection = ?1 AND key = ?2")
                    .and_then(|mut st| st.execute(params![collection.tag(), key]))
                    .map_err(sql_err)?;
                if deleted == 0 {
                    return Err(StoreError::NotFound(format!("{collection:?} '{id}' does not exist")));
                }
            }
        }
    }
    Ok(())
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
        // A point read by primary key takes microseconds: it runs here, on the caller's
        // thread, rather than paying for a hand-off to the blocking pool (listings do that).
        let key = key_of(id);
        let conn = self.reader();
        conn.prepare_cached(
            "SELECT id, etag, partition, body, expires_at FROM documents WHERE collection = ?1 AND key = ?2",
        )
        .and_then(|mut st| st.query_row(params![collection.tag(), key], read_doc).optional())
        .map_err(sql_err)
    }

    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let written: Vec<Collection> = writes.iter().map(collection_of).collect();
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Job::Write { writes, reply })?;
        answer.await.map_err(|_| StoreError::Unavailable("the store's writer thread has stopped".into()))??;
        // Committed: this handle's next version read of these collections goes to the file.
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
        let partition = partition.map(str::to_string);
        let limit = limit.max(1);
        self.read(move |conn| {
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
            Ok(crate::continuation::page(docs, limit))
        })
        .await
    }

    async fn purge_expired(&self, now_millis: i64) -> Result<u64, StoreError> {
        let purged = self
            .exclusive(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
                let mut purged = Vec::new();
                for c in Collection::ALL {
                    let n = tx
                        .prepare_cached(
                            "DELETE FROM documents WHERE collection = ?1 AND expires_at IS NOT NULL AND expires_at < ?2",
                        )
                        .and_then(|mut st| st.execute(params![c.tag(), now_millis]))
                        .map_err(sql_err)?;
                    if n > 0 {
                        bump_version(&tx, c.tag(), i64::try_from(n).unwrap_or(i64::MAX))?;
                        purged.push((c, n as u64));
                    }
                }
                tx.commit().map_err(sql_err)?;
                Ok(purged)
            })
            .await?;
        // Only the collections something was deleted from have changed.
        self.inner.versions.wrote(purged.iter().map(|(c, _)| *c));
        Ok(purged.iter().map(|(_, n)| n).sum())
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        self.read(move |conn| {
            conn.query_row("SELECT value FROM settings WHERE key = ?1", params![key], |r| r.get(0))
                .optional()
                .map_err(sql_err)
        })
        .await
    }

    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.exclusive(move |conn| {
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

    async fn version(&self, collection: Collection) -> Result<u64, StoreError> {
        let ticket = match self.inner.versions.lookup(collection) {
            Ok(version) => return Ok(version),
            Err(ticket) => ticket,
        };
        let version = self.stored_version(collection)?;
        self.inner.versions.record(ticket, version);
        Ok(version)
    }
}

impl SqliteStore {
    /// A collection's version as the file holds it now.
    fn stored_version(&self, collection: Collection) -> Result<u64, StoreError> {
        // The point-read path: a primary-key lookup on the caller's thread (microseconds).
        // It reads the file, so another handle's or another process's commits count too.
        let conn = self.reader();
        let stored: Option<i64> = conn
            .prepare_cached("SELECT CAST(body AS INTEGER) FROM documents WHERE collection = ?1 AND key = ?2")
            .and_then(|mut st| {
                st.query_row(params![VERSION_ROWS, collection.tag().to_string()], |r| r.get(0)).optional()
            })
            .map_err(sql_err)?;
        u64::try_from(stored.unwrap_or(0))
            .map_err(|_| StoreError::Corrupt(format!("the stored version of {collection:?} is negative")))
    }
}
