//! The hub outbox: hub calls a registration decided but no hub has done yet (a removal from
//! the hub a device left; a registration whose hub call failed and was tolerated). They are
//! written in the same store write as the registration, so a crash loses none; one node at a
//! time (under a lease, `dps-server`) drains them with [`Engine::drain_hub_outbox`], retrying
//! with backoff until the hub does it. Before each call the device's registration state is
//! read again: work it has made void (the device came back to the hub it left, or moved on
//! from the hub a registration was owed to) is dropped, not done.

use crate::engine::{parse_stored, Engine};
use crate::error::Error;
use crate::registrar::{retry_delay_millis, HubWork, OutboxEntry};
use crate::registration::RegistrationRecord;
use crate::store::{Collection, Condition, Document, StoreError, Write};

/// What one drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Hub calls that succeeded (their work is done).
    pub done: usize,
    /// Hub calls that failed (retried later).
    pub failed: usize,
    /// Work dropped because the registration state made it void.
    pub void: usize,
    /// Work still owed, not yet due.
    pub waiting: usize,
}

impl Engine {
    /// Does the outbox work that is due: at most `max_calls` hub calls, and none started after
    /// `max_time` (so that the caller can renew its lease in time). A failed call is retried
    /// after [`retry_delay_millis`]; work is never dropped for failing.
    pub async fn drain_hub_outbox(&self, max_calls: usize, max_time: std::time::Duration) -> Result<Drained, Error> {
        let started = std::time::Instant::now();
        let mut drained = Drained::default();
        let Some(registrar) = self.devices().registrar.clone() else { return Ok(drained) };
        let store = self.store().clone();
        // A hub that failed in this drain is not called again in it: a hub that is down must
        // not hold up the work owed to the others.
        let mut failing: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut continuation: Option<String> = None;
        loop {
            let page = store.list(Collection::HubOutbox, None, continuation.as_deref(), 200).await?;
            for doc in page.documents {
                let entry: OutboxEntry = match serde_json::from_str(&doc.body) {
                    Ok(e) => e,
                    Err(e) => {
                        crate::warn_limited!("hub-outbox-corrupt", key = %doc.id, error = %e,
                            "hub outbox entry cannot be read; left in place");
                        continue;
                    }
                };
                let now = self.clock().now_millis();
                if entry.next_attempt_millis > now {
                    drained.waiting += 1;
                    continue;
                }
                if drained.done + drained.failed >= max_calls
                    || started.elapsed() >= max_time
                    || failing.contains(&entry.work.hub().to_ascii_lowercase())
                {
                    drained.waiting += 1;
                    continue;
                }
                if !self.still_owed(&entry).await? {
                    drained.void += 1;
                    self.settle(&doc, None).await?;
                    continue;
                }
                let result = match &entry.work {
                    HubWork::Register { device } => registrar.register(device).await,
                    HubWork::Remove { hub, device_id } => registrar.remove(hub, device_id).await,
                    HubWork::Void { .. } => Ok(()),
                };
                match result {
                    Ok(()) => {
                        drained.done += 1;
                        // A tolerated registration that moved the device: it leaves its old hub
                        // now that the new one has it (a migration has read its data there).
                        if let HubWork::Register { device } = &entry.work {
                            if let Some(p) = device.previous.as_ref().filter(|p| {
                                registrar.calls(&p.hub)
                                    && (!p.hub.eq_ignore_ascii_case(&device.hub) || p.device_id != device.device_id)
                            }) {
                                let work = HubWork::Remove { hub: p.hub.clone(), device_id: p.device_id.clone() };
                                let removal = OutboxEntry {
                                    registration_id: entry.registration_id.clone(),
                                    work,
                                    attempts: 0,
                                    next_attempt_millis: now,
                                    last_error: None,
                                };
                                store.write(vec![crate::registration::outbox_write(removal)?]).await?;
                            }
                        }
                        tracing::info!(registration_id = %entry.registration_id, hub = entry.work.hub(),
                            device_id = entry.work.device_id(), work = ?WorkKind(&entry.work), "hub outbox work done");
                        self.settle(&doc, None).await?;
                    }
                    Err(e) => {
                        drained.failed += 1;
                        failing.insert(entry.work.hub().to_ascii_lowercase());
                        let mut next = entry.clone();
                        next.next_attempt_millis = now.saturating_add(retry_delay_millis(entry.attempts));
                        next.attempts = entry.attempts.saturating_add(1);
                        next.last_error = Some(e.detail().to_string());
                        crate::warn_limited!("hub-outbox-failed", registration_id = %entry.registration_id,
                            hub = entry.work.hub(), attempts = next.attempts, error = %e.detail(), "hub outbox work failed; retried later");
                        self.settle(&doc, Some(next)).await?;
                    }
                }
            }
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => return Ok(drained),
            }
        }
    }

    /// Whether the device's registration state still wants `entry` done.
    async fn still_owed(&self, entry: &OutboxEntry) -> Result<bool, Error> {
        let record = match self.store().get(Collection::Registrations, &entry.registration_id).await? {
            Some(doc) => Some(parse_stored::<RegistrationRecord>(&doc.body, "registration", &entry.registration_id)?),
            None => None,
        };
        let there = |record: &RegistrationRecord| {
            record.assigned_hub.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(entry.work.hub()))
                && record.device_id.as_deref() == Some(entry.work.device_id())
        };
        Ok(match &entry.work {
            // A deleted registration state, or one that moved on, no longer wants the device there.
            HubWork::Register { .. } => record.as_ref().is_some_and(there),
            HubWork::Remove { .. } => !record.as_ref().is_some_and(there),
            HubWork::Void { .. } => false,
        })
    }

    /// Ends the work of `doc` (`None`: done or void, removed) or reschedules it, unless a
    /// registration replaced it meanwhile (its ETag moved): then the new work stays.
    async fn settle(&self, doc: &Document, next: Option<OutboxEntry>) -> Result<(), Error> {
        let condition = Condition::IfMatch(doc.etag.clone());
        let write = match next {
            None => Write::Delete { collection: Collection::HubOutbox, id: doc.id.clone(), condition },
            Some(entry) => Write::Put {
                collection: Collection::HubOutbox,
                document: Document {
                    id: doc.id.clone(),
                    etag: crate::etag::new_registration_etag(),
                    partition: None,
                    body: crate::engine::to_json(&entry)?,
                    expires_at: None,
                },
                condition,
            },
        };
        match self.store().write(vec![write]).await {
            Ok(()) | Err(StoreError::PreconditionFailed(_) | StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Hub work still owed, in key order (hub, device ID): at most `limit` entries.
    pub async fn hub_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, Error> {
        let page = self.store().list(Collection::HubOutbox, None, None, limit).await?;
        page.documents.iter().map(|d| parse_stored(&d.body, "hub outbox entry", &d.id)).collect()
    }
}

/// The kind of work, for the log.
struct WorkKind<'a>(&'a HubWork);

impl std::fmt::Debug for WorkKind<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            HubWork::Register { .. } => "register",
            HubWork::Remove { .. } => "remove",
            HubWork::Void { .. } => "void",
        })
    }
}
