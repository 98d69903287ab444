//! Draining the event outbox ([`crate::events`]): in key (time) order, to every sink, deleting
//! an event once all have it, stopping at the first refusal.

use crate::engine::Engine;
use crate::error::Error;
use crate::events::{EventSink, PendingEvent};
use crate::store::{Collection, Condition, StoreError, Write};

/// What one drain of the event outbox did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventsDrained {
    /// Events every sink took (deleted from the outbox).
    pub delivered: usize,
    /// Events a sink refused for good (dropped with a warning).
    pub dropped: usize,
    /// Whether a sink failed (the drain stopped at that event).
    pub stalled: bool,
}

impl Engine {
    /// Delivers the outbox's events in order to every sink: at most `max` of them, and none
    /// started after `max_time` (so that the caller can renew its lease in time). Stops at the
    /// first a sink fails to take (the next drain starts again there, without the sinks that
    /// already have it); an event a sink refuses for good is dropped with a warning.
    pub async fn drain_event_outbox(
        &self,
        sinks: &[std::sync::Arc<dyn EventSink>],
        max: usize,
        max_time: std::time::Duration,
    ) -> Result<EventsDrained, Error> {
        let started = std::time::Instant::now();
        let mut drained = EventsDrained::default();
        let store = self.store().clone();
        while drained.delivered + drained.dropped < max && started.elapsed() < max_time {
            let want = max.saturating_sub(drained.delivered + drained.dropped).min(200);
            let page = store.list(Collection::EventOutbox, None, None, want).await?;
            if page.documents.is_empty() {
                break;
            }
            // Each sink gets the page's events it does not have yet, in order (pipelined
            // where the sink can); an event is done once every sink has it (or one refused it
            // for good). The page is settled up to the first event that is not done.
            let mut entries: Vec<(String, Option<PendingEvent>)> = Vec::new();
            for doc in page.documents {
                match PendingEvent::read(doc.body) {
                    Ok(e) => entries.push((doc.id, Some(e))),
                    Err(e) => {
                        // It cannot be delivered and must not block the others.
                        crate::warn_limited!("event-outbox-corrupt", key = %doc.id, error = %e,
                            "an event in the outbox cannot be read; dropped");
                        entries.push((doc.id, None));
                    }
                }
            }
            let mut refused = vec![false; entries.len()];
            let mut failed_at: Option<usize> = None;
            let mut stalled = false;
            for sink in sinks {
                let wanted: Vec<usize> = entries
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, e))| e.as_ref().is_some_and(|e| !e.delivered_to.iter().any(|s| s == sink.name())))
                    .map(|(i, _)| i)
                    .collect();
                if wanted.is_empty() {
                    continue;
                }
                let events: Vec<&crate::events::OutgoingEvent> =
                    wanted.iter().filter_map(|&i| entries[i].1.as_ref().map(|e| &e.event)).collect();
                let results = sink.publish_all(&events, started + max_time).await;
                drop(events);
                for (&i, result) in wanted.iter().zip(results) {
                    match result {
                        Ok(()) => {
                            if let Some(e) = entries[i].1.as_mut() {
                                e.delivered_to.push(sink.name().to_string());
                            }
                        }
                        Err(e) if e.permanent => {
                            if let Some(entry) = entries[i].1.as_ref() {
                                tracing::warn!(sink = sink.name(), event = %entry.event.id, kind = %entry.event.kind,
                                    subject = %entry.event.subject, error = %e, "an event sink refused an event for good; dropped");
                            }
                            refused[i] = true;
                        }
                        Err(e) => {
                            if !e.untried {
                                stalled = true;
                                if let Some(entry) = entries[i].1.as_ref() {
                                    crate::warn_limited!("event-sink", sink = sink.name(), event = %entry.event.id,
                                        error = %e, "an event sink did not take an event; retrying");
                                }
                            }
                            failed_at = Some(failed_at.map_or(i, |f| f.min(i)));
                        }
                    }
                }
            }
            let end = failed_at.unwrap_or(entries.len());
            let mut done = Vec::with_capacity(end);
            for (i, (id, entry)) in entries.iter().enumerate().take(end) {
                done.push(id.clone());
                if entry.is_some() && !refused[i] {
                    drained.delivered += 1;
                } else {
                    drained.dropped += 1;
                }
            }
            self.settle_events(done).await?;
            if failed_at.is_some() {
                drained.stalled = stalled;
                // Remember which sinks have the events left, so that they do not get them again.
                let partial: Vec<Write> = entries[end..]
                    .iter()
                    .filter_map(|(_, e)| e.as_ref().filter(|e| !e.delivered_to.is_empty()))
                    .map(PendingEvent::put_again)
                    .collect::<Result<_, _>>()?;
                if !partial.is_empty() {
                    store.write(partial).await?;
                }
                return Ok(drained);
            }
        }
        Ok(drained)
    }

    /// How many events wait in the outbox (at most `limit` counted).
    pub async fn pending_events(&self, limit: usize) -> Result<usize, Error> {
        Ok(self.store().list(Collection::EventOutbox, None, None, limit).await?.documents.len())
    }

    /// Deletes delivered events from the outbox (one write; one by one if one is gone).
    async fn settle_events(&self, ids: Vec<String>) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let delete = |id: &String| Write::Delete {
            collection: Collection::EventOutbox,
            id: id.clone(),
            condition: Condition::Always,
        };
        match self.store().write(ids.iter().map(delete).collect()).await {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound(_)) => {
                for id in &ids {
                    match self.store().write(vec![delete(id)]).await {
                        Ok(()) | Err(StoreError::NotFound(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}
