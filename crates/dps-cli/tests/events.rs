//! Lifecycle events end to end: to the machine's NATS JetStream (127.0.0.1:4222, or
//! DPS_TEST_NATS_URL) across a `kill -9` in the middle of a load, and to a signed HTTP endpoint
//! that fails at first.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::webhook::{Answer, Scripted};
use common::{derive, key, Dps};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

fn nats_url() -> String {
    std::env::var("DPS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A register that does not panic when the server goes away: the final status, if answered.
async fn try_register(dps: &Dps, id: &str, key_b64: String) -> Option<String> {
    let url = dps.url(&format!("/{}/registrations/{id}/register?api-version=2021-10-01", dps.scope()));
    let resp = dps
        .client
        .put(url)
        .header("Authorization", dps.device_token(id, &key_b64))
        .json(&json!({"registrationId": id}))
        .send()
        .await
        .ok()?;
    let body: Value = resp.json().await.ok()?;
    body["status"].as_str().map(str::to_string)
}

/// Every message of a JetStream stream, in stream order.
async fn read_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
    want: impl Fn(&[Value]) -> bool,
) -> Vec<(String, Value)> {
    // After the kill, the restarted dps takes the outbox over when the dead one's lease
    // expires (15 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = match js.get_stream(stream).await {
            Ok(s) => s,
            // dps creates it with its first publish.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => panic!("stream {stream}: {e}"),
        };
        let count = s.info().await.expect("stream info").state.messages;
        let mut out = Vec::new();
        for seq in 1..=count {
            if let Ok(m) = s.get_raw_message(seq).await {
                out.push((m.subject.to_string(), serde_json::from_slice::<Value>(&m.payload).expect("event JSON")));
            }
        }
        let events: Vec<Value> = out.iter().map(|(_, e)| e.clone()).collect();
        if want(&events) {
            return out;
        }
        if Instant::now() > deadline {
            eprintln!("read_stream: gave up waiting with {} events", events.len());
            return out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn events_reach_jetstream_in_order_across_a_kill_9() {
    let run = uuid_like();
    let prefix = format!("dpstest.{run}");
    let stream = format!("DPSTEST_{run}");
    let client = async_nats::connect(nats_url()).await.expect("NATS at 127.0.0.1:4222 (DPS_TEST_NATS_URL)");
    let js = async_nats::jetstream::new(client);
    let mut dps = Dps::start(&format!(
        "[events]\nnats_url = \"{}\"\nnats_subject_prefix = \"{prefix}\"\nnats_stream = \"{stream}\"\n",
        nats_url()
    ))
    .await;
    dps.pin_ports();
    let group_key = key(11);
    dps.put_group(json!({"enrollmentGroupId": "fleet",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}}))
        .await;
    let ids: Vec<String> = (0..200).map(|i| format!("dev-{i}")).collect();
    // 30 registered; then the rest, 16 at a time, and dps is killed once 40 more are answered.
    let mut assigned: HashSet<String> = HashSet::new();
    let first =
        futures_util::future::join_all(ids[..30].iter().map(|id| try_register(&dps, id, derive(&group_key, id)))).await;
    for (id, status) in ids[..30].iter().zip(first) {
        assert_eq!(status.as_deref(), Some("assigned"), "{id}");
        assigned.insert(id.clone());
    }
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let in_flight = futures_util::stream::iter(ids[30..].iter())
        .map(|id| {
            let answered = &answered;
            let dps = &dps;
            let key = derive(&group_key, id);
            async move {
                let status = try_register(dps, id, key).await;
                if status.is_some() {
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                (id.clone(), status)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>();
    let pid = dps.pid().expect("running").to_string();
    let killer = async {
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 40 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let killed = std::process::Command::new("kill").args(["-9", &pid]).status().expect("kill");
        assert!(killed.success());
    };
    let (results, ()) = tokio::join!(in_flight, killer);
    dps.kill9();
    for (id, status) in results {
        if status.as_deref() == Some("assigned") {
            assigned.insert(id);
        }
    }
    eprintln!("{} of 170 in flight were answered before the kill", assigned.len() - 30);
    assert!(assigned.len() < ids.len(), "the kill came after the load");
    dps.restart().await;
    // The rest register after the restart; dev-0 registers again (same hub: assigned again).
    for id in ids.iter().filter(|id| !assigned.contains(*id)).cloned().collect::<Vec<_>>() {
        assert_eq!(try_register(&dps, &id, derive(&group_key, &id)).await.as_deref(), Some("assigned"), "{id}");
        assigned.insert(id);
    }
    assert_eq!(try_register(&dps, "dev-0", derive(&group_key, "dev-0")).await.as_deref(), Some("assigned"));
    assert!(assigned.len() == ids.len());

    let enough = |events: &[Value]| {
        let seen: HashSet<&str> = events
            .iter()
            .filter(|e| e["type"] == "com.dps-rs.registration.assigned")
            .filter_map(|e| e["data"]["registrationId"].as_str())
            .collect();
        seen.len() >= ids.len() && events.iter().filter(|e| e["data"]["registrationId"] == "dev-0").count() >= 2
    };
    let messages = read_stream(&js, &stream, enough).await;
    assert!(!messages.is_empty(), "no events; dps log: {}", dps.log());
    let events: Vec<&Value> = messages.iter().map(|(_, e)| e).collect();
    // Every device that was told "assigned" has its event, whatever the kill interrupted.
    let seen: HashSet<&str> = events
        .iter()
        .filter(|e| e["type"] == "com.dps-rs.registration.assigned")
        .filter_map(|e| e["data"]["registrationId"].as_str())
        .collect();
    for id in &assigned {
        assert!(seen.contains(id.as_str()), "no registration.assigned event for {id}; {} events", events.len());
    }
    // The group's creation came first; every event is a well-formed CloudEvent on its subject.
    assert_eq!(events[0]["type"], "com.dps-rs.enrollmentgroup.created", "{:?}", events[0]);
    let scope = dps.scope();
    for (subject, e) in &messages {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["source"], format!("/dps/{scope}"));
        assert_eq!(e["datacontenttype"], "application/json");
        let short = e["type"].as_str().unwrap().strip_prefix("com.dps-rs.").unwrap();
        assert_eq!(subject, &format!("{prefix}.{short}"));
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
        assert!(!e.to_string().contains(&group_key), "no key in an event");
    }
    // Delivered once each (JetStream drops a resend by its Nats-Msg-Id), in order per device.
    let unique: HashSet<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(unique.len(), events.len(), "an event arrived twice");
    let mut last: HashMap<&str, &str> = HashMap::new();
    for e in &events {
        if let Some(rid) = e["data"]["registrationId"].as_str() {
            let id = e["id"].as_str().unwrap();
            if let Some(prev) = last.insert(rid, id) {
                assert!(prev < id, "events of {rid} out of order");
            }
        }
    }
    let dev0: Vec<&&Value> = events.iter().filter(|e| e["data"]["registrationId"] == "dev-0").collect();
    assert_eq!(dev0.len(), 2, "{dev0:?}");
    assert!(dev0[1]["data"]["previousHub"].is_string(), "{:?}", dev0[1]);
    assert_eq!(dev0[1]["data"]["previousHub"], dev0[0]["data"]["assignedHub"]);
    // Members without a value are left out: a first assignment has no previous hub, no error.
    for absent in ["previousHub", "errorCode", "errorMessage"] {
        assert!(dev0[0]["data"].get(absent).is_none(), "{absent} in {:?}", dev0[0]);
    }
    for present in [
        "registrationId",
        "enrollmentGroupId",
        "attestation",
        "status",
        "substatus",
        "deviceId",
        "assignedHub",
        "operationId",
        "etag",
    ] {
        assert!(dev0[0]["data"].get(present).is_some_and(|v| !v.is_null()), "{present} in {:?}", dev0[0]);
    }
    js.delete_stream(&stream).await.expect("delete the test stream");
}

#[tokio::test]
async fn events_go_to_a_signed_http_sink_that_fails_at_first() {
    const SECRET: &str = "an-event-sink-secret";
    let hook = Scripted::start().await;
    for _ in 0..3 {
        hook.push(Answer::text(503, "not yet"));
    }
    for _ in 0..50 {
        hook.push(Answer::text(204, ""));
    }
    let dps =
        Dps::start(&format!("[events]\nhttp_url = \"{}\"\nhttp_secret = \"{SECRET}\"\n", hook.url_at("/events"))).await;
    let k = enroll_and_assign(&dps, "cam-1", 4).await;
    // Disabled: the refused registration has its event too.
    dps.put_enrollment(json!({"registrationId": "cam-1", "provisioningStatus": "disabled",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let (_, _, body) = dps.register("cam-1", Some(&dps.device_token("cam-1", &k)), json!({})).await;
    assert_eq!(body["status"], "disabled", "{body}");
    let resp = dps.service(reqwest::Method::DELETE, "/enrollments/cam-1").send().await.unwrap();
    assert_eq!(resp.status(), 204);

    hook.wait_until("three events taken", |h| {
        let mut taken = HashSet::new();
        for c in h.calls_to("/events") {
            taken.insert(c.json()["id"].as_str().unwrap_or_default().to_string());
        }
        taken.len() >= 5 && h.calls_to("/events").len() >= 8
    })
    .await;
    let calls = hook.calls_to("/events");
    // The first event was offered until the endpoint took it (3 refusals), then each once, in order.
    let ids: Vec<String> = calls.iter().map(|c| c.json()["id"].as_str().unwrap().to_string()).collect();
    assert!(ids[..4].iter().all(|i| i == &ids[0]), "retries of the first event: {ids:?}");
    let mut delivered: Vec<Value> = Vec::new();
    for c in calls.iter().skip(3) {
        let e = c.json();
        if delivered.last().map(|d| d["id"] != e["id"]).unwrap_or(true) {
            delivered.push(e);
        }
    }
    let types: Vec<&str> = delivered.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "com.dps-rs.enrollment.created",
            "com.dps-rs.registration.assigned",
            "com.dps-rs.enrollment.updated",
            "com.dps-rs.registration.disabled",
            "com.dps-rs.enrollment.deleted"
        ]
    );
    assert_eq!(delivered[1]["subject"], "registrations/cam-1");
    assert_eq!(delivered[1]["data"]["status"], "assigned");
    assert_eq!(delivered[3]["data"]["status"], "disabled");
    // Signed as webhooks are: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">.
    for c in &calls {
        assert_eq!(c.header("content-type"), Some("application/cloudevents+json; charset=utf-8"));
        let signature = c.header("x-dps-signature").expect("signed");
        let (t, v1) = signature.split_once(',').unwrap();
        let t = t.strip_prefix("t=").unwrap();
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(t.as_bytes());
        mac.update(b".");
        mac.update(&c.body);
        let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(v1.strip_prefix("v1=").unwrap(), expected);
        assert!(!String::from_utf8_lossy(&c.body).contains(&k), "no key in an event");
    }
}

#[test]
fn event_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, needle) in [
        ("[events]\nnats_url = \"http://x\"\n", "nats:// or tls://"),
        ("[events]\nnats_url = \"nats://127.0.0.1:4222\"\nnats_subject_prefix = \"a..b\"\n", "NATS subject"),
        ("[events]\nhttp_url = \"https://sink.example/e\"\n", "http_secret"),
        ("[events]\nhttp_url = \"http://sink.example/e\"\nhttp_secret = \"0123456789abcdef\"\n", "loopback"),
        ("[events]\nhttp_url = \"https://sink.example/e\"\nhttp_secret = \"short\"\n", "16 characters"),
        ("[events]\nhttp_secret = \"0123456789abcdef\"\n", "only with http_url"),
        ("[events]\nnats_url = \"nats://127.0.0.1:4222\"\ntimeout_secs = 0\n", "0 is outside 1..=8"),
        ("[events]\nnats_url = \"nats://127.0.0.1:4222\"\ntimeout_secs = 9\n", "9 is outside 1..=8"),
    ] {
        let path = dir.path().join("dps.toml");
        std::fs::write(&path, toml).unwrap();
        let [check, serve] = common::refused_config(&path, &dir.path().join("data"));
        assert!(check.contains(needle) && serve.contains(needle), "{toml}: {check} / {serve}");
    }
}

/// Creates an individual symmetric-key enrollment `id` with `key(n)` and registers it to
/// `assigned`; returns the key.
async fn enroll_and_assign(dps: &Dps, id: &str, n: u8) -> String {
    let k = key(n);
    dps.put_enrollment(json!({"registrationId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let state = dps.register_to_end(id, &dps.device_token(id, &k)).await;
    assert_eq!(state["status"], "assigned", "{state}");
    k
}

fn uuid_like() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:04x}", t, std::process::id() & 0xffff)
}

/// A 4xx other than 408/429 drops that event (counted in the metrics) instead of blocking the
/// ones behind it; with NATS and a failing HTTP sink, JetStream gets each event once while the
/// HTTP sink is retried.
#[tokio::test]
async fn a_permanent_refusal_drops_one_event_and_a_working_sink_is_not_sent_it_again() {
    const SECRET: &str = "an-event-sink-secret";
    let run = uuid_like();
    let (prefix, stream) = (format!("dpstest.{run}"), format!("DPSTEST_{run}"));
    let client = async_nats::connect(nats_url()).await.expect("NATS at 127.0.0.1:4222 (DPS_TEST_NATS_URL)");
    let js = async_nats::jetstream::new(client);
    // A duplicate window far shorter than the retries' back-off: an event sent again would be
    // stored again, so the count below sees it.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .expect("create the test stream");
    let hook = Scripted::start().await;
    // The first event (the enrollment's creation) is refused for good; the second is refused
    // for now, four times; then everything is taken.
    hook.push(Answer::text(422, "no such schema"));
    for _ in 0..4 {
        hook.push(Answer::text(503, "not yet"));
    }
    for _ in 0..20 {
        hook.push(Answer::text(204, ""));
    }
    let dps = Dps::start(&format!(
        "[events]\nnats_url = \"{}\"\nnats_subject_prefix = \"{prefix}\"\nnats_stream = \"{stream}\"\n\
         http_url = \"{}\"\nhttp_secret = \"{SECRET}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        nats_url(),
        hook.url_at("/events")
    ))
    .await;
    enroll_and_assign(&dps, "cam-2", 6).await;
    hook.wait_until("the registration's event taken", |h| {
        h.calls_to("/events").iter().filter(|c| c.json()["type"] == "com.dps-rs.registration.assigned").count() >= 5
    })
    .await;
    let calls = hook.calls_to("/events");
    let types: Vec<String> = calls.iter().map(|c| c.json()["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(types[0], "com.dps-rs.enrollment.created", "{types:?}");
    assert_eq!(types.iter().filter(|t| *t == "com.dps-rs.enrollment.created").count(), 1, "dropped, not retried");
    // JetStream: both events, each once, although the HTTP sink made the second wait.
    let messages = read_stream(&js, &stream, |events| events.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut s = js.get_stream(&stream).await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 2, "{messages:?}");
    let metrics = dps.creds["metricsAddress"].as_str().unwrap().to_string();
    let text = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap().text().await.unwrap();
    assert!(text.lines().any(|l| l == "dps_events_dropped_total 1"), "{text}");
    js.delete_stream(&stream).await.expect("delete the test stream");
}
