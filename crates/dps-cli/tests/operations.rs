//! Operating dps: Prometheus metrics scraped after a known load match what the load did, and
//! JSON log lines parse and carry the tracking IDs devices got in their error bodies.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::amqp::RawAmqp;
use common::mqtt::{connect_packet, RawMqtt};
use common::{derive, key, webhook, Dps};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// Prometheus text as `name{labels}` → value (labels as written, sorted by the exporter).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the sample named `name` whose labels include every `label="value"` of `labels`
/// (summed over the others), 0 when there is none.
fn value(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            let (n, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
            n == name && labels.iter().all(|(l, v)| rest.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(addr: &str) -> HashMap<String, f64> {
    let resp = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    samples(&resp.text().await.unwrap())
}

#[tokio::test]
async fn metrics_count_what_a_known_load_did() {
    let hook = webhook::start().await;
    let dps = Dps::start(&format!(
        "[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n\
         [[webhooks]]\nurl_prefix = \"http://{}/\"\nsecret = \"a-webhook-secret-of-some-length\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        hook.addr
    ))
    .await;
    let metrics = dps.creds["metricsAddress"].as_str().expect("metricsAddress in dev-credentials.json").to_string();

    // 20 group members assigned, 3 wrong keys, one disabled enrollment, one custom allocation.
    let group_key = key(5);
    dps.put_group(json!({"enrollmentGroupId": "fleet",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}}))
        .await;
    let mut last = (String::new(), String::new(), Value::Null);
    for i in 0..20 {
        let id = format!("m-{i}");
        let token = dps.device_token(&id, &derive(&group_key, &id));
        let (status, _, body) = dps.register(&id, Some(&token), json!({"registrationId": id})).await;
        assert_eq!((status, body["status"].as_str()), (202, Some("assigned")), "{body}");
        last = (id, token, body);
    }
    for i in 0..3 {
        let id = format!("m-{i}");
        let (status, _, _) = dps.register(&id, Some(&dps.device_token(&id, &key(99))), json!({})).await;
        assert_eq!(status, 401);
    }
    let k = key(7);
    dps.put_enrollment(json!({"registrationId": "off", "provisioningStatus": "disabled",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let (_, _, body) = dps.register("off", Some(&dps.device_token("off", &k)), json!({})).await;
    assert_eq!(body["status"], "disabled", "{body}");
    dps.put_enrollment(json!({"registrationId": "custom", "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": hook.url("/ok"), "apiVersion": "2021-10-01"},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let state = dps.register_to_end("custom", &dps.device_token("custom", &k)).await;
    assert_eq!(state["status"], "assigned", "{state}");
    // Five polls of a finished operation.
    let (id, token, body) = last;
    for _ in 0..5 {
        let (status, _) = dps.poll(&id, &token, body["operationId"].as_str().unwrap()).await;
        assert_eq!(status, 200);
    }
    // A service call with a wrong key, and a TLS handshake that fails.
    let bad = dps_proto::sas::build_token("localhost", &[1; 32], common::now() + 60, Some("provisioningserviceowner"));
    let resp = dps
        .client
        .get(dps.url("/enrollments/x?api-version=2021-10-01"))
        .header("Authorization", bad)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let mut raw = tokio::net::TcpStream::connect(dps.addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut sink)).await;

    let m = scrape(&metrics).await;
    let reg = "dps_registrations_total";
    let https = ("transport", "https");
    assert_eq!(
        value(&m, reg, &[https, ("attestation", "symmetricKey"), ("outcome", "assigned"), ("error_code", "")]),
        21.0,
        "{m:#?}"
    );
    assert_eq!(value(&m, reg, &[https, ("outcome", "refused"), ("error_code", "401002")]), 3.0);
    assert_eq!(value(&m, reg, &[https, ("outcome", "disabled")]), 1.0);
    assert_eq!(value(&m, reg, &[]), 25.0, "nothing else counted");
    assert_eq!(value(&m, "dps_registration_duration_seconds_count", &[https, ("outcome", "assigned")]), 21.0);
    assert_eq!(value(&m, "dps_operation_polls_total", &[https, ("outcome", "assigned")]), 5.0);
    assert_eq!(value(&m, "dps_auth_rejections_total", &[https, ("api", "device")]), 3.0);
    assert_eq!(value(&m, "dps_auth_rejections_total", &[https, ("api", "service")]), 1.0);
    assert_eq!(value(&m, "dps_webhook_calls_total", &[("outcome", "ok")]), 1.0);
    assert_eq!(value(&m, "dps_webhook_call_duration_seconds_count", &[]), 1.0);
    assert_eq!(value(&m, "dps_http_requests_total", &[("route", "device register"), ("status", "2xx")]), 22.0);
    assert_eq!(value(&m, "dps_http_requests_total", &[("route", "device register"), ("status", "4xx")]), 3.0);
    assert!(value(&m, "dps_tls_handshake_failures_total", &[("listener", "https"), ("cause", "failed")]) >= 1.0);
    assert!(value(&m, "dps_connections_open", &[("listener", "https")]) >= 1.0, "our keep-alive connection");
    // Every registration's writes were committed, in batches of one or more.
    let commits = value(&m, "dps_store_commit_batch_size_count", &[("store", "sqlite")]);
    let requests = value(&m, "dps_store_commit_batch_size_sum", &[("store", "sqlite")]);
    assert!(commits >= 1.0 && requests >= 22.0 && requests >= commits, "{commits} commits of {requests} requests");
    assert_eq!(value(&m, "dps_store_commit_duration_seconds_count", &[("store", "sqlite")]), commits);
    // No label carries an ID.
    assert!(!m.keys().any(|k| k.contains("m-1") || k.contains("fleet") || k.contains("hub-a")));

    // Only GET /metrics.
    let client = reqwest::Client::new();
    assert_eq!(client.post(format!("http://{metrics}/metrics")).send().await.unwrap().status(), 405);
    assert_eq!(client.get(format!("http://{metrics}/other")).send().await.unwrap().status(), 404);
}

/// The metrics listener serves eight connections at once; a ninth is closed at once (it takes
/// no descriptor), and a slot is free again once a connection ends.
#[tokio::test]
async fn the_metrics_listener_holds_eight_connections_at_most() {
    use tokio::io::AsyncReadExt;
    let dps = Dps::start("[metrics]\nlisten = \"127.0.0.1:0\"\n").await;
    let metrics = dps.creds["metricsAddress"].as_str().expect("metricsAddress").to_string();
    // Eight idle connections (no request yet: each holds its slot until it sends one).
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(&metrics).await.unwrap());
    }
    // Give the listener time to take all eight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ninth = tokio::net::TcpStream::connect(&metrics).await.unwrap();
    ninth.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), ninth.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the ninth connection was neither served nor closed");
    assert!(answer.is_empty(), "a ninth connection was served: {}", String::from_utf8_lossy(&answer));
    // One of the eight asks and is answered; once it has gone, a new scrape gets its slot.
    let mut first = idle.remove(0);
    first.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    drop(first);
    let mut served = false;
    for _ in 0..50 {
        if reqwest::get(format!("http://{metrics}/metrics")).await.is_ok_and(|r| r.status() == 200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "no slot came free after a connection ended");
    drop(idle);
}

#[tokio::test]
async fn metrics_are_off_by_default() {
    let dps = Dps::start("").await;
    assert!(dps.creds.get("metricsAddress").is_none(), "{}", dps.creds);
    assert!(!dps.log().contains("metrics=Some"), "{}", dps.log());
}

/// The log's lines, each parsed as JSON (panics on one that is not).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn json_log_lines_parse_and_carry_tracking_ids() {
    let dps = Dps::start("[log]\nlevel = \"debug\"\nformat = \"json\"\n").await;
    let k = key(3);
    dps.put_enrollment(json!({"registrationId": "dev-1",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    // A refused registration: its error body's trackingId is in the log, on the request's lines.
    let (status, headers, body) = dps.register("dev-1", Some(&dps.device_token("dev-1", &key(9))), json!({})).await;
    assert_eq!(status, 401);
    let tracking = body["trackingId"].as_str().unwrap().to_string();
    assert_eq!(headers["x-ms-request-id"].to_str().unwrap(), tracking);
    // One that works.
    let state = dps.register_to_end("dev-1", &dps.device_token("dev-1", &k)).await;
    assert_eq!(state["status"], "assigned");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = dps.log();
    let lines = json_lines(&log);
    assert!(lines.len() > 5, "{log}");
    for line in &lines {
        assert!(line["timestamp"].is_string() && line["level"].is_string() && line["target"].is_string(), "{line}");
    }
    let of_request: Vec<&Value> = lines.iter().filter(|l| l["span"]["request_id"] == tracking.as_str()).collect();
    assert!(!of_request.is_empty(), "no line carries the tracking ID {tracking}: {log}");
    assert!(
        of_request.iter().any(|l| l["status"] == 401 && l["message"] == "request"),
        "the request's own line: {of_request:?}"
    );
    // No key reaches the log.
    assert!(!log.contains(&k) && !log.contains(&key(9)));
}

#[tokio::test]
async fn json_log_lines_of_mqtt_and_amqp_requests_carry_their_tracking_ids() {
    let dps = Dps::start("[log]\nlevel = \"debug\"\nformat = \"json\"\n").await;
    let k = key(4);
    for id in ["mq-1", "amqp-1"] {
        dps.put_enrollment(json!({"registrationId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
            .await;
    }
    // MQTT: a failed request's error body (in the response publish) has a trackingId.
    let mut mqtt = RawMqtt::tls(&dps).await;
    assert_eq!(mqtt.connect(connect_packet(&dps, "mq-1", Some(&dps.device_token("mq-1", &k)))).await, 0);
    mqtt.subscribe().await;
    let poll = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=4.0000000000000000.nope";
    let (topic, err) = mqtt.request(poll, b"", Some(1)).await;
    assert_eq!(topic, "$dps/registrations/res/404/?$rid=1", "{err}");
    let mqtt_tracking = err["trackingId"].as_str().expect("trackingId").to_string();
    // AMQP: so has a rejected disposition's.
    let mut amqp = RawAmqp::tls(&dps).await;
    assert_eq!(amqp.sasl_plain(&dps.scope(), "amqp-1", &dps.device_token("amqp-1", &k)).await, 0);
    amqp.open().await;
    amqp.links(&format!("{}/registrations/amqp-1", dps.scope())).await.expect("links attached");
    let (_, err) = amqp.poll("not-an-operation").await.rejection();
    assert_eq!(err["errorCode"], 404203, "{err}");
    let amqp_tracking = err["trackingId"].as_str().expect("trackingId").to_string();
    assert_ne!(mqtt_tracking, amqp_tracking);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = dps.log();
    let lines = json_lines(&log);
    for (transport, tracking) in [("MQTT", &mqtt_tracking), ("AMQP", &amqp_tracking)] {
        let of_request: Vec<&Value> = lines
            .iter()
            .filter(|l| l["request_id"] == tracking.as_str() || l["span"]["request_id"] == tracking.as_str())
            .collect();
        assert!(
            of_request.iter().any(|l| l["registration_id"].as_str().is_some_and(|id| id.ends_with("-1"))
                && l["message"].as_str().is_some_and(|m| m.contains("request failed"))),
            "{transport}: no line of the failed request carries its tracking ID {tracking}: {log}"
        );
    }
    assert!(!log.contains(&k));
}
