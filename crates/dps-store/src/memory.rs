//! An in-memory store, for tests of the engine without sockets or files.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use dps_core::store::{Collection, Condition, Document, Page, Store, StoreError, Write};

/// A [`Store`] held in memory: it passes the same conformance suite as
/// [`SqliteStore`](crate::SqliteStore) (atomic batches, conditions, case-insensitive keys,
/// paging, expiry, settings, versions) and forgets everything when the last handle is dropped.
///
/// Clones are handles on one shared store, like two processes on one database: a write
/// through one is seen by the others, versions included.
///
/// [`set_unavailable`](Self::set_unavailable) simulates an outage: while it is on, every call
/// of every handle fails with [`StoreError::Unavailable`] and changes nothing, as a locked or
/// unreachable database does; switched off, the store answers again with its data intact.
///
/// ```
/// # async fn demo() {
/// use std::sync::Arc;
/// use dps_core::store::{Collection, Store, StoreError};
/// use dps_store::MemoryStore;
///
/// let store = MemoryStore::new();
/// let for_engine: Arc<dyn Store> = Arc::new(store.clone());
/// store.set_unavailable(true);
/// assert!(matches!(for_engine.get(Collection::Enrollments, "dev").await, Err(StoreError::Unavailable(_))));
/// store.set_unavailable(false);
/// assert_eq!(for_engine.get(Collection::Enrollments, "dev").await.unwrap(), None);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    unavailable: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Per collection: documents by lower-cased ID.
    documents: HashMap<Collection, BTreeMap<String, Document>>,
    settings: HashMap<String, String>,
    versions: HashMap<Collection, u64>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").field("unavailable", &self.is_unavailable()).finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Switches the simulated outage on or off, for every handle of this store.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Whether the simulated outage is on.
    pub fn is_unavailable(&self) -> bool {
        self.shared.unavailable.load(Ordering::SeqCst)
    }

    /// The state, unless the outage is on.
    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        if self.is_unavailable() {
            return Err(StoreError::Unavailable("the store is unavailable (simulated outage)".into()));
        }
        // Nothing panics while holding the lock with the state half-changed (a batch is
        // checked in full before anything of it is applied).
        Ok(self.shared.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn key_of(id: &str) -> String {
    id.to_ascii_lowercase()
}

fn check(collection: Collection, id: &str, current: Option<&str>, condition: &Condition) -> Result<(), StoreError> {
    let what = || format!("{collection:?} '{id}'");
    match (condition, current) {
        (Condition::Always, _) | (Condition::IfAbsent, None) | (Condition::IfExists, Some(_)) => Ok(()),
        (Condition::IfAbsent, Some(_)) => Err(StoreError::AlreadyExists(format!("{} already exists", what()))),
        (Condition::IfExists | Condition::IfMatch(_), None) => {
            Err(StoreError::PreconditionFailed(format!("{} does not exist", what())))
        }
        (Condition::IfMatch(want), Some(have)) if want == have => Ok(()),
        (Condition::IfMatch(_), Some(_)) => Err(StoreError::PreconditionFailed(format!("{} has another etag", what()))),
    }
}

impl State {
    /// Checks every write of a batch against the state as the earlier writes of the same
    /// batch leave it, then applies them all; on any failure nothing is applied.
    fn apply(&mut self, writes: Vec<Write>) -> Result<(), StoreError> {
        // What the batch has done so far to each key it touched: Some(etag) or deleted.
        let mut pending: HashMap<(Collection, String), Option<String>> = HashMap::new();
        for w in &writes {
            let (collection, id, condition) = match w {
                Write::Put { collection, document, condition } => (*collection, document.id.as_str(), condition),
                Write::Delete { collection, id, condition } => (*collection, id.as_str(), condition),
            };
            let key = key_of(id);
            let current = match pending.get(&(collection, key.clone())) {
                Some(p) => p.clone(),
                None => self.documents.get(&collection).and_then(|c| c.get(&key)).map(|d| d.etag.clone()),
            };
            check(collection, id, current.as_deref(), condition)?;
            let after = match w {
                Write::Put { document, .. } => Some(document.etag.clone()),
                Write::Delete { .. } if current.is_none() => {
                    return Err(StoreError::NotFound(format!("{collection:?} '{id}' does not exist")));
                }
                Write::Delete { .. } => None,
            };
            pending.insert((collection, key), after);
        }
        for w in writes {
            let collection = match w {
                Write::Put { collection, document, .. } => {
                    self.documents.entry(collection).or_default().insert(key_of(&document.id), document);
                    collection
                }
                Write::Delete { collection, id, .. } => {
                    self.documents.entry(collection).or_default().remove(&key_of(&id));
                    collection
                }
            };
            *self.versions.entry(collection).or_default() += 1;
        }
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, collection: Collection, id: &str) -> Result<Option<Document>, StoreError> {
        Ok(self.state()?.documents.get(&collection).and_then(|c| c.get(&key_of(id))).cloned())
    }

    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut state = self.state()?;
        state.apply(writes)
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
        let state = self.state()?;
        let Some(docs) = state.documents.get(&collection) else { return Ok(Page::default()) };
        let start = match &after {
            Some(a) => Bound::Excluded(a.as_str()),
            None => Bound::Unbounded,
        };
        let mut matching = docs
            .range::<str, _>((start, Bound::Unbounded))
            .filter(|(_, d)| partition.is_none() || d.partition.as_deref() == partition);
        let documents: Vec<(&String, &Document)> = matching.by_ref().take(limit).collect();
        let continuation = match (matching.next(), documents.last()) {
            (Some(_), Some((key, _))) => Some(crate::continuation::encode(key)),
            _ => None,
        };
        Ok(Page { documents: documents.into_iter().map(|(_, d)| d.clone()).collect(), continuation })
    }

    async fn purge_expired(&self, now_millis: i64) -> Result<u64, StoreError> {
        let mut state = self.state()?;
        let State { documents, versions, .. } = &mut *state;
        let mut purged = 0u64;
        for (collection, docs) in documents.iter_mut() {
            let before = docs.len();
            docs.retain(|_, d| d.expires_at.is_none_or(|e| e >= now_millis));
            let n = (before - docs.len()) as u64;
            if n > 0 {
                *versions.entry(*collection).or_default() += n;
                purged += n;
            }
        }
        Ok(purged)
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.state()?.settings.get(key).cloned())
    }

    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        Ok(self.state()?.settings.entry(key.to_string()).or_insert_with(|| value.to_string()).clone())
    }

    async fn version(&self, collection: Collection) -> Result<u64, StoreError> {
        Ok(self.state()?.versions.get(&collection).copied().unwrap_or(0))
    }
}
