//! The storage port. Records are JSON documents in a few collections, keyed by
//! case-insensitive identifiers; a [`Store::write`] of several writes is atomic and durable
//! before it returns (nothing is acknowledged to a client before it is committed).

use async_trait::async_trait;

/// A collection of documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collection {
    /// Individual enrollments, keyed by registration ID.
    Enrollments,
    /// Enrollment groups, keyed by group ID.
    EnrollmentGroups,
    /// Device registration states, keyed by registration ID; partition = group ID key.
    Registrations,
    /// Registration operations, keyed by operation ID (time-ordered); no partition.
    Operations,
    /// CA certificates of the certificate store, keyed by name.
    Certificates,
    /// The TPM challenge last issued to a registration ID (the key it delivers), keyed by
    /// registration ID; each expires after the challenge lifetime.
    TpmChallenges,
    /// Leases on background work that one node at a time does (the purge sweep), keyed by
    /// the work's name ([`crate::lease`]).
    Leases,
    /// Hub calls owed (a hub registrar's work that is decided but not yet done), keyed by hub
    /// and device ID ([`crate::registrar::outbox_key`]).
    HubOutbox,
    /// Lifecycle events not yet delivered to every sink, keyed by event ID (UUIDv7,
    /// time-ordered) ([`crate::events`]).
    EventOutbox,
}

impl Collection {
    /// All collections.
    pub const ALL: [Collection; 9] = [
        Collection::Enrollments,
        Collection::EnrollmentGroups,
        Collection::Registrations,
        Collection::Operations,
        Collection::Certificates,
        Collection::TpmChallenges,
        Collection::Leases,
        Collection::HubOutbox,
        Collection::EventOutbox,
    ];

    /// A stable small number for storage.
    pub fn tag(self) -> i64 {
        match self {
            Collection::Enrollments => 1,
            Collection::EnrollmentGroups => 2,
            Collection::Registrations => 3,
            Collection::Operations => 4,
            Collection::Certificates => 5,
            Collection::TpmChallenges => 6,
            Collection::Leases => 7,
            Collection::HubOutbox => 8,
            Collection::EventOutbox => 9,
        }
    }
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Identifier as the client spelled it. The store matches it case-insensitively.
    pub id: String,
    /// Opaque version tag; a conditional write compares it exactly.
    pub etag: String,
    /// Secondary key to list by (already normalised by the caller), if any.
    pub partition: Option<String>,
    /// JSON text.
    pub body: String,
    /// Unix milliseconds after which the record may be purged.
    pub expires_at: Option<i64>,
}

/// Condition a write must meet, checked inside the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Unconditional.
    Always,
    /// The record must exist with exactly this ETag.
    IfMatch(String),
    /// The record must not exist.
    IfAbsent,
    /// The record must exist.
    IfExists,
}

/// One write in an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Insert or replace.
    Put {
        /// Collection.
        collection: Collection,
        /// The new record.
        document: Document,
        /// Condition on the current record.
        condition: Condition,
    },
    /// Delete.
    Delete {
        /// Collection.
        collection: Collection,
        /// Identifier.
        id: String,
        /// Condition on the current record.
        condition: Condition,
    },
}

/// A page of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// Documents in key order.
    pub documents: Vec<Document>,
    /// Token for the next page; `None` when this is the last.
    pub continuation: Option<String>,
}

/// Store failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A condition failed: the ETag did not match, or the record was required to exist.
    #[error("{0}")]
    PreconditionFailed(String),
    /// `IfAbsent` failed.
    #[error("{0}")]
    AlreadyExists(String),
    /// A delete named a record that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The backend cannot be reached or is busy; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A stored record or continuation token cannot be read.
    #[error("{0}")]
    Corrupt(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// The storage port. Implementations: `dps-store` (SQLite, and an in-memory store for tests).
/// Every implementation passes
/// the conformance suite in `dps-store`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one record (case-insensitive ID).
    async fn get(&self, collection: Collection, id: &str) -> Result<Option<Document>, StoreError>;

    /// Applies all writes atomically, durably, or none of them.
    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError>;

    /// Lists records in key order, optionally only one partition, starting after a
    /// continuation token from a previous page. `limit` is at least 1.
    async fn list(
        &self,
        collection: Collection,
        partition: Option<&str>,
        continuation: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Deletes records whose `expires_at` is before `now_millis`; returns how many.
    async fn purge_expired(&self, now_millis: i64) -> Result<u64, StoreError>;

    /// Reads an instance setting.
    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Stores `value` under `key` unless a value is already there; returns the stored value.
    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError>;

    /// The version of `collection`: a number that grows with every committed write to it
    /// (by at least one per [`Write`] of a committed batch, deletes and purges included) and
    /// with nothing else, whoever wrote it: this handle, another handle on the same backend, or
    /// another process sharing it. This handle's writes show at once; another handle's within a
    /// bounded time the backend documents (SQLite: `OTHER_WRITERS_SEEN_WITHIN`, 100 ms, which
    /// spares a read of the file on most calls). Callers cache what they read from a collection
    /// under its version (the engine does so for enrollment groups and CA certificates).
    ///
    /// Kept in the backend and moved in the same transaction as the write it counts. Read it
    /// before the data it guards: a write that commits between the two moves it past what the
    /// cache recorded, so the next look reads again. It is read on every group registration,
    /// so it must be cheap (a point read). A failure is a store failure like any other: a
    /// caller must not take it as "nothing changed".
    async fn version(&self, collection: Collection) -> Result<u64, StoreError>;

    /// Whether the store can serve now (reachable, schema current): what `/readyz` reports.
    /// Embedded stores are always ready once open.
    async fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
