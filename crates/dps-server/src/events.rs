//! The event sinks of `[events]` (NATS JetStream, a signed HTTP endpoint) and the task that
//! drains the store's event outbox into them, one node at a time under the `event-outbox`
//! lease (docs/events.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dps_core::events::{EventSink, OutgoingEvent, SinkError};
use dps_core::Engine;
use tokio::sync::{watch, Mutex};

use crate::config::EventsConfig;
use crate::error::ServerError;

/// How often an idle outbox is looked at.
const POLL: Duration = Duration::from_millis(100);
/// The lease a draining node holds.
const LEASE: Duration = Duration::from_secs(15);
/// How often the holder renews it.
const RENEW: Duration = Duration::from_secs(2);
/// A drain starts no delivery after this long.
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// The longest `[events] timeout_secs` (a drain ends within DRAIN_TIME + this < LEASE).
pub const MAX_DELIVERY_SECS: u64 = 8;
/// How often a backlog is counted for `dps_events_pending`, and the most it counts (a count
/// reads the events: it is made only when a drain left some behind).
const PENDING_EVERY: Duration = Duration::from_secs(5);
const PENDING_CAP: usize = 10_000;
/// Events per drain, at most (then the lease is renewed).
const PER_DRAIN: usize = 500;
/// The longest wait after a sink failed.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Publishes to NATS JetStream: subject `{prefix}.{type}`, `Nats-Msg-Id` = the event ID (the
/// stream drops a duplicate within its window), done when the stream acknowledges.
pub struct NatsSink {
    url: String,
    /// The URL without credentials, for messages.
    shown: String,
    prefix: String,
    stream: Option<String>,
    credentials: Option<std::path::PathBuf>,
    timeout: Duration,
    context: Mutex<Option<async_nats::jetstream::Context>>,
}

impl NatsSink {
    /// Sends one event; the future acknowledges it.
    async fn send(
        &self,
        context: &async_nats::jetstream::Context,
        event: &OutgoingEvent,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, SinkError> {
        let subject = format!("{}.{}", self.prefix, event.short_type());
        let body = event.json.clone().into_bytes();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.id.as_str());
        headers.insert("Content-Type", "application/cloudevents+json");
        context
            .publish_with_headers(subject.clone(), headers, body.into())
            .await
            .map_err(|e| SinkError::transient(format!("JetStream refused {subject}: {e}")))
    }

    async fn context(&self) -> Result<async_nats::jetstream::Context, SinkError> {
        let mut slot = self.context.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let mut options = async_nats::ConnectOptions::new().connection_timeout(self.timeout).name("dps");
        if let Some(path) = &self.credentials {
            options = options.credentials_file(path).await.map_err(|e| {
                SinkError::transient(format!("cannot read the NATS credentials file {}: {e}", path.display()))
            })?;
        }
        let client = tokio::time::timeout(self.timeout, options.connect(self.url.as_str()))
            .await
            .map_err(|_| {
                SinkError::transient(format!("NATS at {} did not answer within {:?}", self.shown, self.timeout))
            })?
            .map_err(|e| SinkError::transient(format!("cannot connect to NATS at {}: {}", self.shown, e.kind())))?;
        let context = async_nats::jetstream::new(client);
        if let Some(name) = &self.stream {
            let config = async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{}.>", self.prefix)],
                ..Default::default()
            };
            context
                .get_or_create_stream(config)
                .await
                .map_err(|e| SinkError::transient(format!("cannot create or read the JetStream stream {name}: {e}")))?;
        }
        *slot = Some(context.clone());
        Ok(context)
    }
}

#[async_trait]
impl EventSink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    /// Pipelined: every publish is sent, then the acknowledgements are awaited in order.
    async fn publish_all(&self, events: &[&OutgoingEvent], deadline: Instant) -> Vec<Result<(), SinkError>> {
        let mut results: Vec<Result<(), SinkError>> = Vec::with_capacity(events.len());
        let context = match self.context().await {
            Ok(c) => c,
            Err(e) => {
                results.push(Err(e));
                results.resize_with(events.len(), || Err(SinkError::untried()));
                return results;
            }
        };
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            if Instant::now() >= deadline {
                break;
            }
            match self.send(&context, event).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    results.push(Err(e));
                    break;
                }
            }
        }
        // A send that failed stops the batch: what was sent before it is acknowledged first.
        let sent_failed = results.pop();
        let wait_until = tokio::time::Instant::now() + self.timeout;
        for ack in acks {
            let r = match tokio::time::timeout_at(wait_until, ack).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(SinkError::transient(format!("JetStream did not acknowledge an event: {e}"))),
                Err(_) => Err(SinkError::transient(format!("JetStream did not acknowledge within {:?}", self.timeout))),
            };
            let failed = r.is_err();
            results.push(r);
            if failed {
                // Later acknowledgements may come; the events are offered again (deduplicated
                // by their Nats-Msg-Id).
                break;
            }
        }
        if let Some(e) = sent_failed {
            if results.iter().all(Result::is_ok) {
                results.push(e);
            }
        }
        results.resize_with(events.len(), || Err(SinkError::untried()));
        results
    }

    async fn publish(&self, event: &OutgoingEvent) -> Result<(), SinkError> {
        let results = self.publish_all(&[event], Instant::now() + self.timeout).await;
        results.into_iter().next().unwrap_or_else(|| Err(SinkError::untried()))
    }
}

/// POSTs each event (structured CloudEvents JSON) with the webhooks' `x-dps-signature`; any
/// 2xx takes it.
pub struct HttpSink {
    url: String,
    /// The URL without credentials or query, for messages.
    shown: String,
    secret: String,
    client: reqwest::Client,
}

#[async_trait]
impl EventSink for HttpSink {
    fn name(&self) -> &'static str {
        "http"
    }

    async fn publish(&self, event: &OutgoingEvent) -> Result<(), SinkError> {
        let body = event.json.clone().into_bytes();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let signature = crate::webhook::sign(self.secret.as_bytes(), now, &body);
        let response = self
            .client
            .post(&self.url)
            .header("content-type", "application/cloudevents+json; charset=utf-8")
            .header(crate::webhook::SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                SinkError::transient(format!("cannot reach the event endpoint {}: {}", self.shown, e.without_url()))
            })?;
        let status = response.status();
        let text = format!("the event endpoint {} answered HTTP {}", self.shown, status.as_u16());
        match status.as_u16() {
            200..=299 => Ok(()),
            // A refusal of this event that a retry will not change.
            400..=499 if status.as_u16() != 408 && status.as_u16() != 429 => Err(SinkError::permanent(text)),
            // 3xx (redirects are not followed: a body must not be lost or sent elsewhere), 408,
            // 429, 5xx: retried.
            _ => Err(SinkError::transient(text)),
        }
    }
}

/// The sinks `[events]` names (none when it names none).
pub fn sinks(config: &EventsConfig) -> Result<Vec<Arc<dyn EventSink>>, ServerError> {
    let timeout = Duration::from_secs(config.timeout_secs);
    let mut sinks: Vec<Arc<dyn EventSink>> = Vec::new();
    if let Some(url) = &config.nats_url {
        sinks.push(Arc::new(NatsSink {
            url: url.clone(),
            shown: crate::webhook::redact(url),
            prefix: config.nats_subject_prefix.clone(),
            stream: config.nats_stream.clone(),
            credentials: config.nats_credentials_file.clone(),
            timeout,
            context: Mutex::new(None),
        }));
    }
    if let Some(url) = &config.http_url {
        let secret = crate::registrar::secret(
            "events",
            "http_secret",
            config.http_secret.as_deref(),
            config.http_secret_env.as_deref(),
            16,
        )?;
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .build()
            .map_err(|e| ServerError::Bootstrap(format!("events: cannot set up HTTPS: {e}")))?;
        sinks.push(Arc::new(HttpSink { url: url.clone(), shown: crate::webhook::redact(url), secret, client }));
    }
    Ok(sinks)
}

/// Drains the event outbox while this node holds the lease, until `stop`. The lease is
/// renewed every [`RENEW`] and a drain stops starting deliveries after [`DRAIN_TIME`]: with
/// `timeout_secs` at most [`MAX_DELIVERY_SECS`] a drain ends well within the lease, so two nodes
/// never deliver at once.
pub async fn outbox_loop(engine: Engine, sinks: Vec<Arc<dyn EventSink>>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::ZERO;
    let mut renewed: Option<Instant> = None;
    let mut counted = Instant::now() - PENDING_EVERY;
    // The last drain stopped at its limits with events left and no sink failing: the next one
    // starts at once (after a poll it could not keep up with a busy node's registrations).
    let mut more = false;
    loop {
        let wait = if more { Duration::ZERO } else { POLL.max(backoff) };
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        more = false;
        if renewed.is_none_or(|at| at.elapsed() >= RENEW) {
            match engine.hold_lease("event-outbox", LEASE).await {
                Ok(true) => renewed = Some(Instant::now()),
                Ok(false) => {
                    renewed = None;
                    continue;
                }
                Err(e) => {
                    renewed = None;
                    dps_core::warn_limited!("event-outbox", error = %e, "the event outbox lease cannot be read");
                    continue;
                }
            }
        }
        let started = Instant::now();
        match engine.drain_event_outbox(&sinks, PER_DRAIN, DRAIN_TIME).await {
            Ok(d) => {
                let emptied = !d.stalled && d.delivered + d.dropped < PER_DRAIN && started.elapsed() < DRAIN_TIME;
                more = !emptied && !d.stalled;
                if emptied {
                    crate::metrics::events_pending(0);
                } else if counted.elapsed() >= PENDING_EVERY {
                    counted = Instant::now();
                    if let Ok(n) = engine.pending_events(PENDING_CAP).await {
                        crate::metrics::events_pending(n);
                    }
                }
                if d.delivered > 0 || d.dropped > 0 {
                    crate::metrics::events_delivered(d.delivered, d.dropped, started);
                }
                backoff = if d.stalled {
                    crate::metrics::event_delivery_failed();
                    (backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF)
                } else {
                    Duration::ZERO
                };
            }
            Err(e) => {
                dps_core::warn_limited!("event-outbox", error = %e, "the event outbox cannot be read");
                backoff = (backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::store::{Collection, Condition, Document, Store, Write};

    /// A sink that takes everything and notes when (in tokio's time) each event came.
    struct Recording(std::sync::Mutex<Vec<tokio::time::Instant>>);

    #[async_trait]
    impl EventSink for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }
        async fn publish(&self, _event: &OutgoingEvent) -> Result<(), SinkError> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(tokio::time::Instant::now());
            Ok(())
        }
    }

    /// Delivery keeps up with a busy node: a drain that stopped at its limit with events left
    /// is followed at once by the next, not after a poll interval (before, 1,000 events took
    /// two more intervals than 1 did, and a sustained load grew the backlog without bound).
    #[tokio::test(start_paused = true)]
    async fn a_drain_that_leaves_events_behind_is_followed_at_once() {
        let store = Arc::new(dps_store::MemoryStore::new());
        let count = PER_DRAIN * 2 + 7;
        let writes = (0..count)
            .map(|i| {
                let id = format!("{i:08}");
                let body = format!(
                    r#"{{"specversion":"1.0","id":"{id}","source":"/dps/s","type":"com.dps-rs.enrollment.created","subject":"enrollments/d{i}","time":"2026-12-07T00:00:00Z","datacontenttype":"application/json","data":{{}}}}"#
                );
                Write::Put {
                    collection: Collection::EventOutbox,
                    document: Document { id: id.clone(), etag: id, partition: None, body, expires_at: None },
                    condition: Condition::Always,
                }
            })
            .collect();
        store.write(writes).await.unwrap();
        let engine = Engine::new(store.clone(), dps_core::engine::EngineSettings::default());
        let sink = Arc::new(Recording(std::sync::Mutex::new(Vec::new())));
        let (stop, stopped) = watch::channel(false);
        let sinks: Vec<Arc<dyn EventSink>> = vec![sink.clone()];
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(outbox_loop(engine.clone(), sinks, stopped));
        while sink.0.lock().unwrap().len() < count {
            assert!(started.elapsed() < Duration::from_secs(60), "only {} delivered", sink.0.lock().unwrap().len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let times = sink.0.lock().unwrap().clone();
        let (first, last) = (times[0], times[count - 1]);
        assert!(
            last - first < POLL,
            "three drains' worth of events took {:?} of poll intervals: a drain that leaves events waits before the next",
            last - first
        );
        assert_eq!(engine.pending_events(10).await.unwrap(), 0, "every delivered event is gone from the outbox");
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
