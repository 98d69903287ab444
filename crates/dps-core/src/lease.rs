//! Leases on background work that exactly one node sharing a store should do at a time (the
//! sweep of expired operations): a record per kind of work in [`Collection::Leases`] names its
//! holder and until when it holds. A node takes a lease that is free or expired, and keeps it
//! by renewing it before it expires; a holder that dies stops renewing, and another node takes
//! the lease over once it has expired. Taking and renewing are conditional writes (`If-Match`
//! on the record's ETag, `IfAbsent` for the first), so two nodes never both win, on any store
//! that passes the conformance suite — no advisory locks or other database-specific features.

use serde::{Deserialize, Serialize};

use crate::store::{Collection, Condition, Document, Store, StoreError, Write};

/// What a lease record holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// The node that holds it.
    pub holder: String,
    /// Unix milliseconds until which it holds.
    pub until: i64,
}

/// Takes or renews the lease `name` for `holder` until `now + ttl_millis`. `Ok(true)`: the
/// holder has it now; `Ok(false)`: another node holds it and it has not expired (or another
/// node took it at the same moment).
pub async fn acquire(
    store: &dyn Store,
    name: &str,
    holder: &str,
    now: i64,
    ttl_millis: i64,
) -> Result<bool, StoreError> {
    let record = LeaseRecord { holder: holder.to_string(), until: now.saturating_add(ttl_millis) };
    let body = serde_json::to_string(&record).map_err(|e| StoreError::Other(e.to_string()))?;
    let etag = format!("{holder}:{}", record.until);
    let condition = match store.get(Collection::Leases, name).await? {
        None => Condition::IfAbsent,
        Some(doc) => {
            let current: Option<LeaseRecord> = serde_json::from_str(&doc.body).ok();
            let free = match &current {
                Some(c) => c.holder == holder || c.until < now,
                // A record that cannot be read is taken over, not kept forever.
                None => true,
            };
            if !free {
                return Ok(false);
            }
            Condition::IfMatch(doc.etag)
        }
    };
    let document = Document { id: name.to_string(), etag, partition: None, body, expires_at: None };
    match store.write(vec![Write::Put { collection: Collection::Leases, document, condition }]).await {
        Ok(()) => Ok(true),
        Err(StoreError::AlreadyExists(_) | StoreError::PreconditionFailed(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The current holder of `name` and until when, if anyone ever held it.
pub async fn holder(store: &dyn Store, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
    let Some(doc) = store.get(Collection::Leases, name).await? else { return Ok(None) };
    serde_json::from_str(&doc.body).map(Some).map_err(|e| StoreError::Corrupt(format!("lease '{name}': {e}")))
}
