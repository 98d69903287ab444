//! The event sinks of `[events]` (NATS JetStream, a signed HTTP endpoint) and the task that
//! drains the store's event outbox into them, one node at a time under the `event-outbox`
//! lease (docs/events.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dps_core::events::{CloudEvent, EventSink, SinkError};
use dps_core::Engine;
use tokio::sync::{watch, Mutex};

use crate::config::EventsConfig;
use crate::error::ServerError;

/// How often an idle outbox is looked at.
const POLL: Duration = Duration::from_millis(100);
/// The lease a draining node holds, renewed at each drain.
const LEASE: Duration = Duration::from_secs(15);
/// Events per drain, at most (then the lease is renewed).
const PER_DRAIN: usize = 500;
/// The longest wait after a sink failed.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Publishes to NATS JetStream: subject `{prefix}.{type}`, `Nats-Msg-Id` = the event ID (the
/// stream drops a duplicate within its window), done when the stream acknowledges.
pub struct NatsSink {
    url: String,
    prefix: String,
    stream: Option<String>,
    credentials: Option<std::path::PathBuf>,
    timeout: Duration,
    context: Mutex<Option<async_nats::jetstream::Context>>,
}

impl NatsSink {
    async fn context(&self) -> Result<async_nats::jetstream::Context, SinkError> {
        let mut slot = self.context.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let mut options = async_nats::ConnectOptions::new().connection_timeout(self.timeout).name("dps");
        if let Some(path) = &self.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| SinkError(format!("cannot read the NATS credentials file {}: {e}", path.display())))?;
        }
        let client = tokio::time::timeout(self.timeout, options.connect(self.url.as_str()))
            .await
            .map_err(|_| SinkError(format!("NATS at {} did not answer within {:?}", self.url, self.timeout)))?
            .map_err(|e| SinkError(format!("cannot connect to NATS at {}: {e}", self.url)))?;
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
                .map_err(|e| SinkError(format!("cannot create or read the JetStream stream {name}: {e}")))?;
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

    async fn publish(&self, event: &CloudEvent) -> Result<(), SinkError> {
        let context = self.context().await?;
        let subject = format!("{}.{}", self.prefix, event.short_type());
        let body = serde_json::to_vec(event).map_err(|e| SinkError(format!("cannot write the event: {e}")))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.id.as_str());
        headers.insert("Content-Type", "application/cloudevents+json");
        let publish = async {
            context
                .publish_with_headers(subject.clone(), headers, body.into())
                .await
                .map_err(|e| SinkError(format!("JetStream refused {subject}: {e}")))?
                .await
                .map_err(|e| SinkError(format!("JetStream did not acknowledge {subject}: {e}")))
        };
        match tokio::time::timeout(self.timeout, publish).await {
            Ok(Ok(_ack)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SinkError(format!("JetStream did not acknowledge {subject} within {:?}", self.timeout))),
        }
    }
}

/// POSTs each event (structured CloudEvents JSON) with the webhooks' `x-dps-signature`; any
/// 2xx takes it.
pub struct HttpSink {
    url: String,
    secret: String,
    client: reqwest::Client,
}

#[async_trait]
impl EventSink for HttpSink {
    fn name(&self) -> &'static str {
        "http"
    }

    async fn publish(&self, event: &CloudEvent) -> Result<(), SinkError> {
        let body = serde_json::to_vec(event).map_err(|e| SinkError(format!("cannot write the event: {e}")))?;
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
            .map_err(|e| SinkError(format!("cannot reach the event endpoint: {e}")))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(SinkError(format!("the event endpoint answered HTTP {}", status.as_u16())))
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
            .timeout(timeout)
            .build()
            .map_err(|e| ServerError::Bootstrap(format!("events: cannot set up HTTPS: {e}")))?;
        sinks.push(Arc::new(HttpSink { url: url.clone(), secret, client }));
    }
    Ok(sinks)
}

/// Drains the event outbox while this node holds the lease, until `stop`.
pub async fn outbox_loop(engine: Engine, sinks: Vec<Arc<dyn EventSink>>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::ZERO;
    loop {
        let wait = POLL.max(backoff);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match engine.hold_lease("event-outbox", LEASE).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                dps_core::warn_limited!("event-outbox", error = %e, "the event outbox lease cannot be read");
                continue;
            }
        }
        let started = Instant::now();
        match engine.drain_event_outbox(&sinks, PER_DRAIN).await {
            Ok(d) => {
                if d.delivered > 0 {
                    crate::metrics::events_delivered(d.delivered, started);
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
