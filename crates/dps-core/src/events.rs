//! Lifecycle events: what happened to registrations and enrollments, as CloudEvents 1.0,
//! delivered at least once to the configured sinks (the [`EventSink`] port: NATS JetStream,
//! an HTTP endpoint — `dps-server`).
//!
//! An event is written to the store's event outbox in the same write as the change it tells
//! of, so a crash loses none. One node at a time (under a lease) drains the outbox in key
//! order — event IDs are UUIDv7, time-ordered — and deletes an event once every sink has it;
//! a sink that fails stops the drain, so the next one starts again with that event and the
//! events of one device stay in order. A crash between a sink's acknowledgement and the
//! delete sends an event again with the same `id` (JetStream drops such duplicates by
//! `Nats-Msg-Id`; HTTP receivers should dedupe by `id`). The drain is in
//! [`crate::event_outbox`].

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::Error;
use crate::store::{Collection, Condition, Document, Write};

/// The CloudEvents `type` prefix of every event.
pub const TYPE_PREFIX: &str = "com.dps-rs.";

/// What an event tells of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A first assignment (or a re-registration that kept the device where it was).
    RegistrationAssigned,
    /// A re-registration that moved the device or migrated or reset its data.
    RegistrationReprovisioned,
    /// A registration that failed.
    RegistrationFailed,
    /// A registration refused because its enrollment is disabled.
    RegistrationDisabled,
    /// An individual enrollment was created.
    EnrollmentCreated,
    /// An individual enrollment was replaced.
    EnrollmentUpdated,
    /// An individual enrollment was deleted.
    EnrollmentDeleted,
    /// An enrollment group was created.
    GroupCreated,
    /// An enrollment group was replaced.
    GroupUpdated,
    /// An enrollment group was deleted.
    GroupDeleted,
}

impl EventKind {
    /// The short name (`registration.assigned`); the CloudEvents `type` is
    /// [`TYPE_PREFIX`] + this, and the NATS subject `{prefix}.` + this.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::RegistrationAssigned => "registration.assigned",
            EventKind::RegistrationReprovisioned => "registration.reprovisioned",
            EventKind::RegistrationFailed => "registration.failed",
            EventKind::RegistrationDisabled => "registration.disabled",
            EventKind::EnrollmentCreated => "enrollment.created",
            EventKind::EnrollmentUpdated => "enrollment.updated",
            EventKind::EnrollmentDeleted => "enrollment.deleted",
            EventKind::GroupCreated => "enrollmentgroup.created",
            EventKind::GroupUpdated => "enrollmentgroup.updated",
            EventKind::GroupDeleted => "enrollmentgroup.deleted",
        }
    }
}

/// A CloudEvents 1.0 event in its structured JSON form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique, time-ordered (UUIDv7).
    pub id: String,
    /// `/dps/{idScope}`.
    pub source: String,
    /// `com.dps-rs.registration.assigned`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// `registrations/{registrationId}`, `enrollments/{id}`, `enrollmentGroups/{id}`.
    pub subject: String,
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    /// `application/json`.
    pub datacontenttype: String,
    /// What happened (docs/events.md).
    pub data: Value,
}

impl CloudEvent {
    /// The short type name (`registration.assigned`).
    pub fn short_type(&self) -> &str {
        self.kind.strip_prefix(TYPE_PREFIX).unwrap_or(&self.kind)
    }
}

/// Why a sink did not take an event.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// What went wrong (no credentials: URLs are shown without them).
    pub message: String,
    /// The sink refused this event for good (an HTTP 4xx other than 408 and 429): it is
    /// dropped with a warning instead of blocking every event behind it.
    pub permanent: bool,
    /// The event was not offered at all (an earlier one failed, or time was up): the next
    /// drain offers it, and it is no failure of the sink's.
    pub untried: bool,
}

impl SinkError {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self { message: message.into(), permanent: false, untried: false }
    }

    /// A refusal of this event that retrying will not change.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { message: message.into(), permanent: true, untried: false }
    }

    /// Not offered in this drain.
    pub fn untried() -> Self {
        Self { message: "not offered in this drain".into(), permanent: false, untried: true }
    }
}

/// An event as the outbox keeps it: the event, and the sinks that already have it (so that a
/// sink that fails does not make the others get it again at every retry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// The event.
    #[serde(flatten)]
    pub event: CloudEvent,
    /// Names of the sinks that acknowledged it.
    #[serde(default, rename = "dpsDeliveredTo", skip_serializing_if = "Vec::is_empty")]
    pub delivered_to: Vec<String>,
}

/// Where events go: NATS JetStream, an HTTP endpoint (`dps-server`).
#[async_trait]
pub trait EventSink: Send + Sync {
    /// The sink's name, for logs and metrics.
    fn name(&self) -> &'static str;
    /// Delivers one event; `Ok` only once the sink has it durably (a JetStream ack, a 2xx).
    async fn publish(&self, event: &CloudEvent) -> Result<(), SinkError>;

    /// Delivers events in order: one result per event. A sink may send them before the first
    /// acknowledgement arrives (pipelined); by default they go one by one, and none is started
    /// after a failure or after `deadline`.
    async fn publish_all(&self, events: &[&CloudEvent], deadline: std::time::Instant) -> Vec<Result<(), SinkError>> {
        let mut results = Vec::with_capacity(events.len());
        for event in events {
            if std::time::Instant::now() >= deadline {
                break;
            }
            let r = self.publish(event).await;
            let failed = r.as_ref().is_err_and(|e| !e.permanent);
            results.push(r);
            if failed {
                break;
            }
        }
        while results.len() < events.len() {
            results.push(Err(SinkError::untried()));
        }
        results
    }
}

/// A new event of this instance (`scope`), happening now.
pub(crate) fn event(
    settings_scope: &str,
    kind: EventKind,
    subject: String,
    data: Value,
    now_millis: i64,
) -> CloudEvent {
    CloudEvent {
        specversion: "1.0".into(),
        id: uuid::Uuid::now_v7().to_string(),
        source: format!("/dps/{settings_scope}"),
        kind: format!("{TYPE_PREFIX}{}", kind.name()),
        subject,
        time: dps_proto::timestamp::format_millis(now_millis),
        datacontenttype: "application/json".into(),
        data,
    }
}

/// The write that puts `event` in the outbox.
pub(crate) fn outbox_write(event: &CloudEvent) -> Result<Write, Error> {
    outbox_put(&OutboxEvent { event: event.clone(), delivered_to: Vec::new() }, Condition::IfAbsent)
}

/// The write that puts (or updates) an outbox entry.
pub(crate) fn outbox_put(entry: &OutboxEvent, condition: Condition) -> Result<Write, Error> {
    Ok(Write::Put {
        collection: Collection::EventOutbox,
        document: Document {
            id: entry.event.id.clone(),
            etag: entry.event.id.clone(),
            partition: None,
            body: serde_json::to_string(entry).map_err(|e| Error::Internal(format!("cannot write an event: {e}")))?,
            expires_at: None,
        },
        condition,
    })
}

/// The event of an enrollment or group change. `path` is `enrollments` or `enrollmentGroups`.
pub(crate) fn enrollment_event(
    scope: &str,
    kind: EventKind,
    path: &str,
    id: &str,
    etag: Option<&str>,
    now_millis: i64,
) -> Result<Write, Error> {
    let id_field = if path == "enrollments" { "registrationId" } else { "enrollmentGroupId" };
    let data = json!({ id_field: id, "etag": etag });
    outbox_write(&event(scope, kind, format!("{path}/{id}"), data, now_millis))
}
