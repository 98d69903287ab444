//! What a handle remembers of its collections' versions ([`Store::version`]): its own
//! acknowledged writes per collection, and each version as last read from the backend, reused
//! while the handle has written nothing to the collection and the read is younger than the
//! refresh time. Shared by the backends that other processes write to as well (SQLite, PostgreSQL).
//!
//! [`Store::version`]: dps_core::store::Store::version

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dps_core::store::{Collection, Write};

/// Slots for per-collection counters, indexed by [`Collection::tag`].
pub(crate) const TAGS: usize = dps_core::store::Collection::ALL.len() + 1;

/// A collection's version as last read from the backend.
#[derive(Clone, Copy)]
struct SeenVersion {
    /// This handle's write count of the collection when it was read.
    local: u64,
    /// When it was read.
    at: Instant,
    /// The version read.
    version: u64,
}

/// The cache; one per store handle.
pub(crate) struct VersionCache {
    /// Acknowledged writes of this handle per collection tag (moved after the commit, before
    /// the writer is answered).
    local_writes: [AtomicU64; TAGS],
    /// Each collection's version as last read.
    seen: Mutex<[Option<SeenVersion>; TAGS]>,
    /// How long a version read is used again while this handle has not written the collection.
    refresh: Duration,
}

/// A version read in progress: what [`VersionCache::record`] needs to keep its result.
pub(crate) struct ReadTicket {
    slot: Option<usize>,
    local: u64,
    at: Instant,
}

fn slot(collection: Collection) -> Option<usize> {
    usize::try_from(collection.tag()).ok().filter(|i| *i < TAGS)
}

impl VersionCache {
    /// An empty cache reusing reads for `refresh`.
    pub(crate) fn new(refresh: Duration) -> Self {
        VersionCache { local_writes: Default::default(), seen: Mutex::new([None; TAGS]), refresh }
    }

    /// The cached version of `collection` if it may be used, else a ticket to record the read.
    pub(crate) fn lookup(&self, collection: Collection) -> Result<u64, ReadTicket> {
        let slot = slot(collection);
        let local = slot.map(|i| self.local_writes[i].load(Ordering::Acquire)).unwrap_or(0);
        if let Some(i) = slot {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner())[i];
            if let Some(s) = seen.filter(|s| s.local == local && s.at.elapsed() < self.refresh) {
                return Ok(s.version);
            }
        }
        Err(ReadTicket { slot, local, at: Instant::now() })
    }

    /// Keeps a version read from the backend under the ticket `lookup` gave.
    pub(crate) fn record(&self, ticket: ReadTicket, version: u64) {
        if let Some(i) = ticket.slot {
            self.seen.lock().unwrap_or_else(|p| p.into_inner())[i] =
                Some(SeenVersion { local: ticket.local, at: ticket.at, version });
        }
    }

    /// Counts a committed write to each collection in `collections`: the handle's next version
    /// read of them goes to the backend.
    pub(crate) fn wrote(&self, collections: impl IntoIterator<Item = Collection>) {
        let mut hit = [false; TAGS];
        for c in collections {
            if let Some(i) = slot(c) {
                hit[i] = true;
            }
        }
        for (i, h) in hit.iter().enumerate() {
            if *h {
                self.local_writes[i].fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// The collection a write goes to.
pub(crate) fn collection_of(write: &Write) -> Collection {
    match write {
        Write::Put { collection, .. } | Write::Delete { collection, .. } => *collection,
    }
}

/// Committed writes per collection of a batch: what each collection's version moves by.
#[derive(Default)]
pub(crate) struct WriteCounts([i64; TAGS]);

impl WriteCounts {
    /// Counts the writes of one request that committed.
    pub(crate) fn add(&mut self, writes: &[Write]) {
        for w in writes {
            if let Some(n) = usize::try_from(collection_of(w).tag()).ok().and_then(|i| self.0.get_mut(i)) {
                *n += 1;
            }
        }
    }

    /// `(collection tag, writes)` of every collection written to.
    pub(crate) fn moved(&self) -> impl Iterator<Item = (i16, i64)> + '_ {
        self.0.iter().enumerate().filter(|(_, n)| **n > 0).map(|(t, n)| (i16::try_from(t).unwrap_or(i16::MAX), *n))
    }
}
