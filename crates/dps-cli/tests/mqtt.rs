//! MQTT device transport against a spawned dps: the docs/protocol-notes.md §4 exchange over TLS and over
//! WebSocket, the same engine results as HTTPS, and the packet-level edge cases.

mod common;

use std::time::{Duration, Instant};

use common::mqtt::{connect_packet, RawMqtt, REGISTER};
use common::{derive, key, Dps};
use dps_proto::mqtt::{Connect, Packet, Publish};
use serde_json::json;

const POLL: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=";

async fn enroll(dps: &Dps, id: &str, seed: u8, extra: serde_json::Value) -> String {
    let k = key(seed);
    let mut body = json!({"registrationId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    dps.put_enrollment(body).await;
    dps.device_token(id, &k)
}

#[tokio::test]
async fn register_and_poll_over_tls_and_websocket() {
    let dps = Dps::start("[[hubs]]\nhost_name = \"hub-a.test\"\n").await;
    let token = enroll(&dps, "mq-dev-1", 1, json!({"initialTwin": {"tags": {"t": 1}}})).await;

    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(connect_packet(&dps, "mq-dev-1", Some(&token))).await, 0);
    c.subscribe().await;
    let (topic, body) = c
        .request(&format!("{REGISTER}7"), br#"{"registrationId":"mq-dev-1","payload":{"modelId":"m1"}}"#, Some(3))
        .await;
    assert_eq!(topic, "$dps/registrations/res/202/?$rid=7", "{body}");
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["registrationState"]["assignedHub"], "hub-a.test");
    assert_eq!(body["registrationState"]["deviceId"], "mq-dev-1");
    let op = body["operationId"].as_str().unwrap().to_string();
    // Poll on the same connection, QoS 0 as C and Java do.
    let (topic, polled) = c.request(&format!("{POLL}8&operationId={op}"), b" ", None).await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=8");
    assert_eq!(polled["status"], "assigned");
    assert_eq!(polled["operationId"], op.as_str());
    // PINGREQ, UNSUBSCRIBE, DISCONNECT.
    c.send(&Packet::PingReq).await;
    assert_eq!(c.recv().await, Some(Packet::PingResp));
    c.send(&Packet::Unsubscribe { packet_id: 9, filters: vec!["$dps/registrations/res/#".into()] }).await;
    assert_eq!(c.recv().await, Some(Packet::UnsubAck(9)));
    c.send(&Packet::Disconnect).await;
    c.expect_closed("after DISCONNECT").await;

    // The same over WebSocket on the HTTPS port, both paths the SDKs use, both spellings.
    for (path, subprotocol) in
        [("/$iothub/websocket", "mqtt"), ("/", "MQTT"), ("/$iothub/websocket?iothub-no-client-cert=true", "mqtt")]
    {
        let mut ws = RawMqtt::ws(&dps, path, subprotocol).await.unwrap_or_else(|e| panic!("{path}: {e:?}"));
        assert_eq!(ws.connect(connect_packet(&dps, "mq-dev-1", Some(&token))).await, 0);
        ws.subscribe().await;
        // C# sends an empty register payload.
        let (topic, body) = ws.request(&format!("{REGISTER}1"), b"", Some(1)).await;
        assert_eq!(topic, "$dps/registrations/res/202/?$rid=1");
        assert_eq!(body["status"], "assigned", "{body}");
        assert_eq!(body["registrationState"]["substatus"], "initialAssignment");
    }
    // AMQP over WebSocket goes to AMQP (crates/dps-cli/tests/amqp.rs); unknown subprotocols
    // are refused with a DPS error that names the ones served.
    assert!(RawMqtt::ws(&dps, "/$iothub/websocket", "AMQPWSB10").await.is_ok());
    let (status, body) = RawMqtt::ws(&dps, "/", "wamp").await.err().unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("unsupported WebSocket subprotocol"), "{body}");
}

#[tokio::test]
async fn same_results_as_https() {
    let dps = Dps::start("[device]\nassigning_first = true\nretry_after_secs = 1\n").await;
    // Group member with a derived key; Python's "payload": null.
    let group_key = key(42);
    dps.put_group(json!({"enrollmentGroupId": "mq-grp",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}}))
        .await;
    let token = dps.device_token("mq-member", &derive(&group_key, "mq-member"));
    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(connect_packet(&dps, "mq-member", Some(&token))).await, 0);
    c.subscribe().await;
    let (topic, body) =
        c.request(&format!("{REGISTER}1"), br#"{"registrationId":"mq-member","payload":null}"#, Some(1)).await;
    assert_eq!(topic, "$dps/registrations/res/202/?$rid=1&retry-after=1", "assigning first: {body}");
    assert_eq!(body["status"], "assigning");
    let op = body["operationId"].as_str().unwrap();
    let (topic, polled) = c.request(&format!("{POLL}2&operationId={op}"), b" ", Some(2)).await;
    assert_eq!(topic, "$dps/registrations/res/200/?$rid=2");
    assert_eq!(polled["status"], "assigned");
    // Errors travel as the status in the topic with the DPS error body.
    let oversized = format!(r#"{{"payload":"{}"}}"#, "x".repeat(70_000));
    let (topic, err) = c.request(&format!("{REGISTER}3"), oversized.as_bytes(), Some(3)).await;
    assert_eq!(topic, "$dps/registrations/res/400/?$rid=3");
    assert_eq!(err["errorCode"], 400003, "{err}");
    assert!(err["message"].as_str().unwrap().contains("the limit is 65536 bytes"), "{err}");
    let (topic, err) = c.request(&format!("{POLL}4&operationId=4.0000000000000000.nope"), b"", Some(4)).await;
    assert_eq!(topic, "$dps/registrations/res/404/?$rid=4");
    assert_eq!(err["errorCode"], 404203, "{err}");
    let (topic, err) = c.request(&format!("{REGISTER}5"), b"{not json", Some(5)).await;
    assert_eq!(topic, "$dps/registrations/res/400/?$rid=5");
    assert_eq!(err["errorCode"], 400001, "{err}");
    // A rid with characters that would break the clients' topic parsers is escaped.
    let (topic, _) = c.request(&format!("{REGISTER}a%24b%26c"), b"", Some(6)).await;
    assert_eq!(topic, "$dps/registrations/res/202/?$rid=a%24b%26c&retry-after=1");

    // A disabled enrollment: connected, then told `disabled` by the register.
    let disabled = enroll(&dps, "mq-off", 3, json!({"provisioningStatus": "disabled"})).await;
    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(connect_packet(&dps, "mq-off", Some(&disabled))).await, 0);
    c.subscribe().await;
    let (_, body) = c.request(&format!("{REGISTER}1"), b"", Some(1)).await;
    let op = body["operationId"].as_str().unwrap();
    let (_, polled) = c.request(&format!("{POLL}2&operationId={op}"), b"", Some(2)).await;
    assert_eq!(polled["status"], "disabled", "{polled}");
}

#[tokio::test]
async fn connect_is_refused_with_the_right_return_code() {
    let dps = Dps::start("").await;
    let token = enroll(&dps, "mq-auth", 5, json!({})).await;
    let wrong = dps.device_token("mq-auth", &key(6));
    let cases: Vec<(&str, Connect, u8)> = vec![
        ("wrong key", connect_packet(&dps, "mq-auth", Some(&wrong)), 5),
        ("no password", connect_packet(&dps, "mq-auth", None), 5),
        ("unknown device", connect_packet(&dps, "mq-nobody", Some(&token)), 5),
        (
            "wrong scope",
            Connect {
                username: Some("0ne99999999/registrations/mq-auth/api-version=2019-03-31".into()),
                ..connect_packet(&dps, "mq-auth", Some(&token))
            },
            5,
        ),
        (
            "client id differs",
            Connect { client_id: "other".into(), ..connect_packet(&dps, "mq-auth", Some(&token)) },
            2,
        ),
        ("empty client id", Connect { client_id: String::new(), ..connect_packet(&dps, "mq-auth", Some(&token)) }, 2),
        (
            "bad user name",
            Connect { username: Some("mq-auth".into()), ..connect_packet(&dps, "mq-auth", Some(&token)) },
            4,
        ),
        (
            "bad registration ID grammar",
            Connect {
                client_id: "bad id!".into(),
                username: Some(format!("{}/registrations/bad id!/api-version=2019-03-31", dps.scope())),
                ..connect_packet(&dps, "mq-auth", Some(&token))
            },
            2,
        ),
        (
            "password not UTF-8",
            Connect { password: Some(vec![0xff, 0xfe, 0x00]), ..connect_packet(&dps, "mq-auth", Some(&token)) },
            4,
        ),
        (
            "MQTT 3.1",
            Connect { protocol_name: "MQIsdp".into(), protocol_level: 3, ..connect_packet(&dps, "x", None) },
            1,
        ),
    ];
    for (name, packet, code) in cases {
        let mut c = RawMqtt::tls(&dps).await;
        assert_eq!(c.connect(packet).await, code, "{name}");
        c.expect_closed(name).await;
    }
    // MQTT 5 CONNECT (properties after keep-alive): refused with 1, not misread.
    let mut c = RawMqtt::tls(&dps).await;
    c.send_raw(&[0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x00]).await;
    assert!(matches!(
        c.recv().await,
        Some(Packet::ConnAck { code: dps_proto::mqtt::ConnectReturnCode::UnacceptableProtocolVersion, .. })
    ));
    c.expect_closed("MQTT 5").await;
    // The log says why, and never shows the token.
    let log = dps.log();
    assert!(log.contains("signature does not match"), "{log}");
    assert!(!log.contains(token.split("sig=").nth(1).unwrap().split('&').next().unwrap()), "token in the log");
}

#[tokio::test]
async fn protocol_violations_close_only_that_connection() {
    let dps = Dps::start("[mqtt]\nmax_packet_bytes = 2048\nconnect_timeout_secs = 1\n").await;
    let token = enroll(&dps, "mq-rob", 7, json!({})).await;
    // A healthy session that stays open through all of it.
    let mut good = RawMqtt::tls(&dps).await;
    assert_eq!(good.connect(connect_packet(&dps, "mq-rob", Some(&token))).await, 0);
    good.subscribe().await;

    async fn connected(dps: &Dps, token: &str, subscribe: bool) -> RawMqtt {
        let mut c = RawMqtt::tls(dps).await;
        assert_eq!(c.connect(connect_packet(dps, "mq-rob", Some(token))).await, 0);
        if subscribe {
            c.subscribe().await;
        }
        c
    }
    let publish = |topic: &str, qos: u8| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: (qos > 0).then_some(1),
            payload: vec![],
        })
    };

    // Publish before SUBSCRIBE.
    let mut c = connected(&dps, &token, false).await;
    c.send(&publish(&format!("{REGISTER}1"), 0)).await;
    c.expect_closed("publish before subscribe").await;
    // Publish to an unknown topic (PUBACK, then closed).
    let mut c = connected(&dps, &token, true).await;
    c.send(&publish("devices/mq-rob/messages/events/", 1)).await;
    assert_eq!(c.recv().await, Some(Packet::PubAck(1)));
    c.expect_closed("unknown topic").await;
    // QoS 2.
    let mut c = connected(&dps, &token, true).await;
    c.send_raw(&[0x34, 0x06, 0x00, 0x01, b't', 0x00, 0x01, b'x']).await;
    c.expect_closed("QoS 2").await;
    // A packet larger than mqtt.max_packet_bytes (the header alone is enough).
    let mut c = connected(&dps, &token, true).await;
    c.send_raw(&[0x32, 0x80, 0x80, 0x04]).await;
    c.expect_closed("oversized").await;
    // Garbage, and a reserved packet type.
    let mut c = connected(&dps, &token, true).await;
    c.send_raw(&[0xff, 0xff, 0xff, 0xff, 0xff]).await;
    c.expect_closed("garbage").await;
    let mut c = connected(&dps, &token, true).await;
    c.send_raw(&[0x00, 0x00]).await;
    c.expect_closed("reserved type 0").await;
    // A second CONNECT; a server-only packet from the client.
    let mut c = connected(&dps, &token, true).await;
    c.send(&Packet::Connect(connect_packet(&dps, "mq-rob", Some(&token)))).await;
    c.expect_closed("second CONNECT").await;
    let mut c = connected(&dps, &token, true).await;
    c.send(&Packet::SubAck { packet_id: 1, return_codes: vec![0] }).await;
    c.expect_closed("SUBACK from a client").await;
    // First packet not CONNECT.
    let mut c = RawMqtt::tls(&dps).await;
    c.send(&Packet::PingReq).await;
    c.expect_closed("PINGREQ before CONNECT").await;
    // Silence after TLS: closed after connect_timeout_secs.
    let started = Instant::now();
    let mut c = RawMqtt::tls(&dps).await;
    c.expect_closed("no CONNECT").await;
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    // Half a packet, then the client goes away.
    let mut c = connected(&dps, &token, true).await;
    c.send_raw(&[0x30, 0x10, 0x00]).await;
    drop(c);
    // Subscribing to anything else is refused per filter.
    let mut c = connected(&dps, &token, false).await;
    c.send(&Packet::Subscribe { packet_id: 4, filters: vec![("#".into(), 1), ("$dps/registrations/res/#".into(), 2)] })
        .await;
    assert_eq!(
        c.recv().await,
        Some(Packet::SubAck { packet_id: 4, return_codes: vec![0x80, 1] }),
        "QoS 2 granted as 1"
    );

    // The healthy session still works.
    let (topic, body) = good.request(&format!("{REGISTER}42"), b"", Some(42)).await;
    assert_eq!(topic, "$dps/registrations/res/202/?$rid=42");
    assert_eq!(body["status"], "assigned");
    let log = dps.log();
    for needle in
        ["before SUBSCRIBE", "not a DPS request topic", "QoS 2", "mqtt.max_packet_bytes", "no CONNECT within 1 s"]
    {
        assert!(log.contains(needle), "log lacks '{needle}': {log}");
    }
}

#[tokio::test]
async fn keep_alive_and_connection_limit_are_enforced() {
    let dps = Dps::start("[mqtt]\nmax_connections = 2\n").await;
    let token = enroll(&dps, "mq-ka", 8, json!({})).await;
    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(Connect { keep_alive: 1, ..connect_packet(&dps, "mq-ka", Some(&token)) }).await, 0);
    let started = Instant::now();
    c.expect_closed("keep-alive 1 s").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5), "{waited:?}");

    // A client that pings within its keep-alive stays connected well past 1.5 × keep-alive,
    // and can still register afterwards.
    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(Connect { keep_alive: 1, ..connect_packet(&dps, "mq-ka", Some(&token)) }).await, 0);
    c.subscribe().await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.send(&Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp), "alive after {:?}", started.elapsed());
    }
    let (topic, body) = c.request(&format!("{REGISTER}ka"), b"{}", Some(3)).await;
    assert!(topic.starts_with("$dps/registrations/res/202/"), "{topic}: {body}");
    drop(c);

    let mut a = RawMqtt::tls(&dps).await;
    assert_eq!(a.connect(connect_packet(&dps, "mq-ka", Some(&token))).await, 0);
    let mut b = RawMqtt::tls(&dps).await;
    assert_eq!(b.connect(connect_packet(&dps, "mq-ka", Some(&token))).await, 0);
    // A third connection is dropped at accept; the TLS handshake fails or the stream ends.
    let third = tokio::time::timeout(Duration::from_secs(5), async {
        let port = dps.creds["mqttPort"].as_u64().unwrap() as u16;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 1];
        tokio::io::AsyncReadExt::read(&mut s, &mut buf).await
    })
    .await
    .expect("the third connection is closed at once");
    assert!(matches!(third, Ok(0) | Err(_)), "{third:?}");
    // Over WebSocket too: 503 with a DPS error.
    let (status, body) = RawMqtt::ws(&dps, "/", "mqtt").await.err().unwrap();
    assert_eq!(status, 503, "{body}");
    drop(a);
    drop(b);
    assert!(dps.log().contains("mqtt.max_connections reached"));
}

/// A client that sends but never reads: once its receive buffer and the server's send buffer
/// are full, the server's write waits; after mqtt.write_timeout_secs it closes that
/// connection (and only that one) instead of holding it forever.
#[tokio::test]
async fn a_client_that_never_reads_is_closed_after_the_write_timeout() {
    let dps = Dps::start("[mqtt]\nwrite_timeout_secs = 1\n").await;
    let token = enroll(&dps, "mq-slow-reader", 9, json!({})).await;
    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(connect_packet(&dps, "mq-slow-reader", Some(&token))).await, 0);
    // PINGREQs (2 bytes each, answered by 2-byte PINGRESPs) until our own writes stall: the
    // server has stopped reading because its writes to us are stuck.
    let pings = [0xC0u8, 0x00].repeat(32 * 1024);
    let started = Instant::now();
    let mut stalled = false;
    while started.elapsed() < Duration::from_secs(60) {
        if tokio::time::timeout(Duration::from_secs(2), c.send_raw(&pings)).await.is_err() {
            stalled = true;
            break;
        }
    }
    assert!(stalled, "writes never stalled: the server must have stopped answering");
    // The write deadline (1 s) passes; the server closes. Reading drains the PINGRESPs it had
    // sent, then finds the end of the stream.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        let mut answers = 0u64;
        while let Some(p) = c.recv().await {
            assert_eq!(p, Packet::PingResp);
            answers += 1;
        }
        answers
    })
    .await
    .expect("the server closed the connection");
    assert!(drained > 1000, "the server answered until its writes stalled ({drained})");
    assert!(
        dps.log().contains("the client did not read a response within 1 s (mqtt.write_timeout_secs)"),
        "{}",
        dps.log()
    );
    // Other devices are served as before.
    let mut other = RawMqtt::tls(&dps).await;
    assert_eq!(other.connect(connect_packet(&dps, "mq-slow-reader", Some(&token))).await, 0);
}

/// The SAS token is checked at CONNECT and again on every register and poll: a connection
/// whose token expired meanwhile gets 401 responses, not registrations.
#[tokio::test]
async fn an_expired_token_is_refused_on_an_open_connection() {
    let dps = Dps::start("[device]\nsas_clock_skew_secs = 0\n").await;
    let k = key(31);
    dps.put_enrollment(json!({"registrationId": "mq-exp", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let resource = format!("{}/registrations/mq-exp", dps.scope());
    let expiry = common::now() + 2;
    let token =
        dps_proto::sas::build_token(&resource, &dps_proto::sas::decode_key(&k).unwrap(), expiry, Some("registration"));
    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(connect_packet(&dps, "mq-exp", Some(&token))).await, 0);
    c.subscribe().await;
    let (topic, body) = c.request(&format!("{REGISTER}1"), b"{}", Some(1)).await;
    assert!(topic.starts_with("$dps/registrations/res/202/"), "{topic}: {body}");
    let operation = body["operationId"].as_str().unwrap().to_string();
    // Wait until the token is past its expiry (whole seconds), keeping the connection alive.
    while common::now() <= expiry + 1 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.send(&Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp));
    }
    let (topic, body) = c.request(&format!("{REGISTER}2"), b"{}", Some(2)).await;
    assert!(topic.starts_with("$dps/registrations/res/401/"), "register: {topic}: {body}");
    assert_eq!(body["errorCode"], 401002, "{body}");
    let poll = format!("{POLL}3&operationId={operation}");
    let (topic, body) = c.request(&poll, b"", Some(3)).await;
    assert!(topic.starts_with("$dps/registrations/res/401/"), "poll: {topic}: {body}");
}
