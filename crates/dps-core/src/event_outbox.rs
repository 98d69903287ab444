//! Draining the event outbox ([`crate::events`]): in key (time) order, to every sink, deleting
//! an event once all have it, stopping at the first refusal.

use crate::engine::Engine;
use crate::error::Error;
use crate::events::{CloudEvent, EventSink};
use crate::store::{Collection, Condition, StoreError, Write};

/// What one drain of the event outbox did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventsDrained {
    /// Events every sink took (deleted from the outbox).
    pub delivered: usize,
    /// Whether a sink failed (the drain stopped at that event).
    pub stalled: bool,
}

impl Engine {
    /// Whether changes write lifecycle events.
    pub fn writes_events(&self) -> bool {
        self.settings().lifecycle_events
    }

    /// Delivers the outbox's events in order to every sink, at most `max` of them; stops at
    /// the first a sink refuses (it is tried again by the next drain).
    pub async fn drain_event_outbox(
        &self,
        sinks: &[std::sync::Arc<dyn EventSink>],
        max: usize,
    ) -> Result<EventsDrained, Error> {
        let mut drained = EventsDrained::default();
        let store = self.store().clone();
        while drained.delivered < max {
            let page =
                store.list(Collection::EventOutbox, None, None, max.saturating_sub(drained.delivered).min(200)).await?;
            if page.documents.is_empty() {
                break;
            }
            for doc in page.documents {
                let event: CloudEvent = match serde_json::from_str(&doc.body) {
                    Ok(e) => e,
                    Err(e) => {
                        // It cannot be delivered and must not block the others.
                        crate::warn_limited!("event-outbox-corrupt", key = %doc.id, error = %e,
                            "an event in the outbox cannot be read; dropped");
                        self.settle_event(&doc.id).await?;
                        continue;
                    }
                };
                for sink in sinks {
                    if let Err(e) = sink.publish(&event).await {
                        crate::warn_limited!("event-sink", sink = sink.name(), event = %event.id, error = %e,
                            "an event sink did not take an event; retrying");
                        drained.stalled = true;
                        return Ok(drained);
                    }
                }
                self.settle_event(&doc.id).await?;
                drained.delivered += 1;
            }
        }
        Ok(drained)
    }

    /// How many events wait in the outbox (at most `limit` counted).
    pub async fn pending_events(&self, limit: usize) -> Result<usize, Error> {
        Ok(self.store().list(Collection::EventOutbox, None, None, limit).await?.documents.len())
    }

    async fn settle_event(&self, id: &str) -> Result<(), Error> {
        match self
            .store()
            .write(vec![Write::Delete {
                collection: Collection::EventOutbox,
                id: id.to_string(),
                condition: Condition::Always,
            }])
            .await
        {
            Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
