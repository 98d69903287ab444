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
use serde_json::value::RawValue;

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
#[derive(Debug, Clone, Serialize)]
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
    /// What happened (docs/events.md), as JSON text: written once when the event is made and
    /// copied as is into the outbox and to every sink, never parsed into a tree.
    pub data: Box<RawValue>,
}

/// An event on its way to the sinks: what they route and log it by, and its JSON (structured
/// CloudEvents), sent as is.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    /// The event's `id`.
    pub id: String,
    /// Its `type` (`com.dps-rs.registration.assigned`).
    pub kind: String,
    /// Its `subject`.
    pub subject: String,
    /// The whole event as JSON.
    pub json: String,
}

impl OutgoingEvent {
    /// The short type name (`registration.assigned`).
    pub fn short_type(&self) -> &str {
        self.kind.strip_prefix(TYPE_PREFIX).unwrap_or(&self.kind)
    }
}

/// An outbox entry as the drain reads it: the event to send, and the sinks that have it.
#[derive(Debug, Clone)]
pub(crate) struct PendingEvent {
    pub(crate) event: OutgoingEvent,
    pub(crate) delivered_to: Vec<String>,
}

/// The members of a stored event the drain needs; the others are only checked to be JSON.
#[derive(Deserialize)]
struct StoredHead<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    subject: std::borrow::Cow<'a, str>,
    #[serde(default, rename = "dpsDeliveredTo")]
    delivered_to: Vec<String>,
}

/// The member of a stored event that names the sinks that have it (absent until one has).
const DELIVERED_TO: &str = "dpsDeliveredTo";

impl PendingEvent {
    /// Reads a stored outbox entry. Until a sink has it, the stored JSON is the event itself
    /// and is sent as it is, unparsed; after, it is sent without `dpsDeliveredTo`.
    pub(crate) fn read(body: String) -> Result<Self, serde_json::Error> {
        let head: StoredHead<'_> = serde_json::from_str(&body)?;
        let (id, kind, subject) = (head.id.into_owned(), head.kind.into_owned(), head.subject.into_owned());
        let delivered_to = head.delivered_to;
        let json = if delivered_to.is_empty() {
            body
        } else {
            let mut members: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&body)?;
            members.remove(DELIVERED_TO);
            serde_json::to_string(&members)?
        };
        Ok(Self { event: OutgoingEvent { id, kind, subject, json }, delivered_to })
    }

    /// The write that stores it again, with the sinks that have it now.
    pub(crate) fn put_again(&self) -> Result<Write, Error> {
        let stored = (|| {
            let mut members: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&self.event.json)?;
            members.insert(DELIVERED_TO.into(), serde_json::to_value(&self.delivered_to)?);
            serde_json::to_string(&members)
        })()
        .map_err(|e| Error::Internal(format!("cannot write an event back: {e}")))?;
        Ok(outbox_put(&self.event.id, stored))
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

/// Where events go: NATS JetStream, an HTTP endpoint (`dps-server`).
#[async_trait]
pub trait EventSink: Send + Sync {
    /// The sink's name, for logs and metrics.
    fn name(&self) -> &'static str;
    /// Delivers one event; `Ok` only once the sink has it durably (a JetStream ack, a 2xx).
    async fn publish(&self, event: &OutgoingEvent) -> Result<(), SinkError>;

    /// Delivers events in order: one result per event. A sink may send them before the first
    /// acknowledgement arrives (pipelined); by default they go one by one, and none is started
    /// after a failure or after `deadline`.
    async fn publish_all(&self, events: &[&OutgoingEvent], deadline: std::time::Instant) -> Vec<Result<(), SinkError>> {
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

/// A new event of this instance (`scope`), happening now, whose `data` is `data` as JSON.
pub(crate) fn event(
    scope: &str,
    kind: EventKind,
    subject: String,
    data: &impl Serialize,
    now_millis: i64,
) -> Result<CloudEvent, Error> {
    Ok(CloudEvent {
        specversion: "1.0".into(),
        id: uuid::Uuid::now_v7().to_string(),
        source: format!("/dps/{scope}"),
        kind: format!("{TYPE_PREFIX}{}", kind.name()),
        subject,
        time: dps_proto::timestamp::format_millis(now_millis),
        datacontenttype: "application/json".into(),
        data: serde_json::value::to_raw_value(data)
            .map_err(|e| Error::Internal(format!("cannot write an event's data: {e}")))?,
    })
}

/// The write that puts a new event in the outbox: the event's JSON, as the sinks get it.
/// Unconditional: the key is a fresh UUIDv7 (a millisecond and 74 random bits), so no earlier
/// event can hold it, and checking would cost a lookup in every registration's write.
pub(crate) fn outbox_write(event: CloudEvent) -> Result<Write, Error> {
    let body = serde_json::to_string(&event).map_err(|e| Error::Internal(format!("cannot write an event: {e}")))?;
    Ok(outbox_put(&event.id, body))
}

/// The write that puts (or replaces) the outbox entry of event `id`, stored as `body`.
fn outbox_put(id: &str, body: String) -> Write {
    Write::Put {
        collection: Collection::EventOutbox,
        document: Document { id: id.into(), etag: id.into(), partition: None, body, expires_at: None },
        condition: Condition::Always,
    }
}

/// The `data` of an enrollment's or group's event.
#[derive(Serialize)]
struct EnrollmentData<'a> {
    #[serde(rename = "registrationId", skip_serializing_if = "Option::is_none")]
    registration_id: Option<&'a str>,
    #[serde(rename = "enrollmentGroupId", skip_serializing_if = "Option::is_none")]
    enrollment_group_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<&'a str>,
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
    let individual = path == "enrollments";
    let data = EnrollmentData {
        registration_id: individual.then_some(id),
        enrollment_group_id: (!individual).then_some(id),
        etag,
    };
    outbox_write(event(scope, kind, format!("{path}/{id}"), &data, now_millis)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(write: &Write) -> &str {
        let Write::Put { document, .. } = write else { panic!("a put") };
        &document.body
    }

    #[test]
    fn the_stored_form_is_the_event_with_the_sinks_that_have_it() {
        let data = EnrollmentData { registration_id: Some("dev-1"), enrollment_group_id: None, etag: Some("\"e\"") };
        let e = event("0ne00000001", EventKind::EnrollmentCreated, "enrollments/dev-1".into(), &data, 0).unwrap();
        let published = serde_json::to_string(&e).unwrap();
        let write = outbox_write(e.clone()).unwrap();
        // Before any sink has it, the stored form is exactly the event a sink gets.
        assert_eq!(body(&write), published);
        let v: serde_json::Value = serde_json::from_str(body(&write)).unwrap();
        assert_eq!(v["type"], "com.dps-rs.enrollment.created");
        assert_eq!(v["data"], serde_json::json!({"registrationId": "dev-1", "etag": "\"e\""}));
        let mut pending = PendingEvent::read(body(&write).to_string()).unwrap();
        pending.delivered_to.push("nats".into());
        let back = PendingEvent::read(body(&pending.put_again().unwrap()).to_string()).unwrap();
        assert_eq!(back.delivered_to, ["nats"]);
        assert_eq!(back.event.json, published);
        assert_eq!(back.event.id, e.id);
    }

    #[test]
    fn an_event_stored_with_null_members_is_read() {
        // The form written before members without a value were left out.
        let stored = r#"{"specversion":"1.0","id":"01","source":"/dps/s","type":"com.dps-rs.registration.assigned","subject":"registrations/d","time":"t","datacontenttype":"application/json","data":{"registrationId":"d","previousHub":null},"dpsDeliveredTo":["http"]}"#;
        let back = PendingEvent::read(stored.into()).unwrap();
        assert_eq!(back.event.short_type(), "registration.assigned");
        let sent: serde_json::Value = serde_json::from_str(&back.event.json).unwrap();
        assert_eq!(sent["data"].to_string(), r#"{"registrationId":"d","previousHub":null}"#);
        assert!(sent.get("dpsDeliveredTo").is_none());
        assert_eq!(back.delivered_to, ["http"]);
    }

    #[test]
    fn the_drain_sends_a_stored_event_as_it_is_and_without_the_sinks_that_have_it() {
        let data = EnrollmentData { registration_id: None, enrollment_group_id: Some("g"), etag: None };
        let e = event("s", EventKind::GroupDeleted, "enrollmentGroups/g".into(), &data, 0).unwrap();
        let published = serde_json::to_string(&e).unwrap();
        let fresh = PendingEvent::read(body(&outbox_write(e.clone()).unwrap()).to_string()).unwrap();
        assert_eq!(fresh.event.json, published);
        assert_eq!(
            (fresh.event.short_type(), fresh.event.subject.as_str()),
            ("enrollmentgroup.deleted", "enrollmentGroups/g")
        );
        assert_eq!(fresh.event.id, e.id);
        assert!(fresh.delivered_to.is_empty());
        let stored_partly = format!("{},\"dpsDeliveredTo\":[\"nats\"]}}", published.strip_suffix('}').unwrap());
        let partly = PendingEvent::read(stored_partly.clone()).unwrap();
        assert_eq!(partly.event.json, published);
        assert_eq!(partly.delivered_to, ["nats"]);
        assert_eq!(body(&partly.put_again().unwrap()), stored_partly);
        assert!(PendingEvent::read("{\"id\": 1}".into()).is_err());
    }
}
