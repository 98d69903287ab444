//! The AMQP 1.0 device transport against a spawned dps (docs/protocol-notes.md §5), over TLS
//! and WebSocket, at the frame level: SASL PLAIN, TPM and none (X.509), the links, requests and
//! their dispositions and replies, and every refusal and limit. The official Node clients are
//! in the compat suite (tests/compat/node/amqp.js).

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::amqp::{amqp_port, Answer, RawAmqp};
use common::pki::{ca, device, Issued};
use common::{derive, key, Dps};
use dps_core::tpm::software::SoftwareTpm;
use dps_proto::amqp::Value;
use dps_proto::amqp_frame::{Attach, Begin, Frame, Performative, Role, Sasl, Terminus, AMQP_HEADER, SASL_HEADER};
use dps_proto::amqp_message::Body;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

const HUBS: &str = "[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n";

fn address(dps: &Dps, id: &str) -> String {
    format!("{}/registrations/{id}", dps.scope())
}

/// SASL PLAIN with `token`, open, links: a connection ready for requests.
async fn connected(dps: &Dps, id: &str, token: &str, ws: bool) -> RawAmqp {
    let mut c = if ws { RawAmqp::ws(dps, None).await.unwrap() } else { RawAmqp::tls(dps).await };
    assert_eq!(c.sasl_plain(&dps.scope(), id, token).await, 0, "SASL outcome ok");
    let open = c.open().await;
    assert!(open.max_frame_size >= 4096, "{open:?}");
    assert!(open.idle_time_out.is_some(), "the server announces its idle time-out");
    c.links(&address(dps, id)).await.expect("links attached");
    c
}

#[tokio::test]
async fn symmetric_keys_register_over_tls_and_websocket() {
    let dps = Dps::start(HUBS).await;
    dps.put_enrollment(json!({"registrationId": "amqp-1", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    dps.put_group(json!({"enrollmentGroupId": "amqp-group", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(3), "secondaryKey": key(4)}}}))
        .await;
    for ws in [false, true] {
        let token = dps.device_token("amqp-1", &key(1));
        let mut c = connected(&dps, "amqp-1", &token, ws).await;
        let reply = c.register(&json!({"registrationId": "amqp-1", "payload": {"m": ws}})).await.json();
        assert_eq!(reply["status"], "assigned", "{reply}");
        let state = &reply["registrationState"];
        assert_eq!(state["deviceId"], "amqp-1");
        assert!(state["assignedHub"].as_str().unwrap().starts_with("hub-"), "{reply}");
        // The operation is there to poll on the same connection, with the same answer.
        let op = reply["operationId"].as_str().unwrap().to_string();
        let polled = c.poll(&op).await.json();
        assert_eq!(polled["status"], "assigned");
        assert_eq!(polled["operationId"], op.as_str());
        // A group member with its derived key.
        let member = format!("amqp-member-{ws}");
        let token = dps.device_token(&member, &derive(&key(3), &member));
        let mut c = connected(&dps, &member, &token, ws).await;
        // C# sends an empty body: that registers too.
        let props = [("iotdps-operation-type", Value::String("iotdps-register".into()))];
        let reply = match c.request(&props, Body::Empty).await {
            Answer::Reply { json, .. } => json,
            other => panic!("{other:?}"),
        };
        assert_eq!(reply["status"], "assigned", "{reply}");
        assert_eq!(reply["registrationState"]["deviceId"], member.as_str());
    }
    // The service API sees the registrations.
    let resp = dps.service(reqwest::Method::GET, "/registrations/amqp-1").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // With amqp.websocket off, the upgrade is refused with a DPS error that says so.
    let mut dps = dps;
    dps.set_config_extra(&format!("{HUBS}[amqp]\nwebsocket = false\n"));
    dps.restart().await;
    let (status, body) = RawAmqp::ws(&dps, None).await.err().unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("AMQP over WebSocket is disabled on this server (amqp.websocket)"), "{body}");
}

#[tokio::test]
async fn wrong_credentials_get_the_auth_outcome_and_nothing_about_which_ids_exist() {
    let dps = Dps::start("").await;
    dps.put_enrollment(json!({"registrationId": "amqp-known", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    for (id, k) in [("amqp-known", key(9)), ("amqp-unknown", key(1))] {
        let mut c = RawAmqp::tls(&dps).await;
        let token = dps.device_token(id, &k);
        assert_eq!(c.sasl_plain(&dps.scope(), id, &token).await, 1, "outcome auth for {id}");
        assert!(c.closed("after a failed outcome").await.is_none());
    }
    let log = dps.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("AMQP authentication refused")).collect();
    assert_eq!(lines.len(), 2, "{log}");
    // A PLAIN response without the NULs, an authcid that names nothing, a wrong mechanism.
    for (mechanism, initial) in [
        ("PLAIN", b"no separators".to_vec()),
        ("PLAIN", b"\0nothing\0token".to_vec()),
        ("EXTERNAL", Vec::new()),
        ("ANONYMOUS", Vec::new()),
    ] {
        let mut c = RawAmqp::tls(&dps).await;
        match c.sasl_init(mechanism, &initial).await {
            Sasl::Outcome { code, .. } => assert_eq!(code, 1, "{mechanism} {initial:?}"),
            other => panic!("{other:?}"),
        }
        c.closed("after a failed outcome").await;
    }
    assert!(dps.log().contains("SASL mechanism 'EXTERNAL' is not offered"));
}

#[tokio::test]
async fn x509_devices_connect_without_sasl_and_their_links_name_the_registration() {
    let dps = Dps::start(&format!("[x509]\nrequire_verified_ca = false\n{HUBS}")).await;
    let root = ca("AMQP Root", None);
    let inter = ca("AMQP Intermediate", Some(&root));
    dps.put_group(json!({"enrollmentGroupId": "amqp-x509", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": root.pem()}}}}}))
        .await;
    let identity = |leaf: &Issued| (vec![leaf.der(), inter.der()], leaf.key.serialize_der());
    let leaf = device("amqp-x509-1", Some(&inter), (-1, 30));
    for ws in [false, true] {
        let mut c = if ws {
            RawAmqp::ws(&dps, Some(&identity(&leaf))).await.unwrap()
        } else {
            RawAmqp::tls_with_certificate(&dps, &identity(&leaf)).await
        };
        c.open().await;
        c.links(&format!("amqps://localhost/{}", address(&dps, "amqp-x509-1"))).await.expect("attached");
        let reply = c.register(&json!({"registrationId": "amqp-x509-1"})).await.json();
        assert_eq!(reply["status"], "assigned", "{reply}");
        assert_eq!(reply["registrationState"]["x509"], json!({"enrollmentGroupId": "amqp-x509"}));
    }
    // A link for another registration than the certificate's is refused.
    let mut c = RawAmqp::tls_with_certificate(&dps, &identity(&leaf)).await;
    c.open().await;
    let refused = c.links(&address(&dps, "someone-else")).await.unwrap_err();
    assert_eq!(refused.condition, "amqp:unauthorized-access", "{refused:?}");
    // Without a certificate, nothing is authenticated.
    let mut c = RawAmqp::tls(&dps).await;
    c.open().await;
    let refused = c.links(&format!("/{}", address(&dps, "amqp-x509-1"))).await.unwrap_err();
    assert_eq!(refused.condition, "amqp:unauthorized-access", "{refused:?}");
    // After SASL, links must name the authenticated registration.
    dps.put_enrollment(json!({"registrationId": "amqp-sk", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    let mut c = RawAmqp::tls(&dps).await;
    assert_eq!(c.sasl_plain(&dps.scope(), "amqp-sk", &dps.device_token("amqp-sk", &key(1))).await, 0);
    c.open().await;
    let refused = c.links(&address(&dps, "amqp-x509-1")).await.unwrap_err();
    assert!(refused.description.unwrap().contains("authenticated as 'amqp-sk'"));
}

/// The SASL `TPM` exchange to its end (the key imported from the blob signs the token), then
/// open and links: a TPM device's connection ready for requests, and the key it holds.
async fn tpm_connected(dps: &Dps, t: &SoftwareTpm, id: &str) -> (RawAmqp, Vec<u8>) {
    let ek = t.endorsement_key().marshal_tpm2b().unwrap();
    let srk = t.storage_root_key().marshal_tpm2b().unwrap();
    let initial = [&[0u8][..], dps.scope().as_bytes(), &[0], id.as_bytes(), &[0], &ek].concat();
    let mut c = RawAmqp::tls(dps).await;
    assert_eq!(c.sasl_init("TPM", &initial).await, Sasl::Challenge(vec![0]), "the first challenge is one zero byte");
    c.send(Frame::Sasl(Sasl::Response([&[0u8][..], &srk].concat()))).await;
    let Sasl::Challenge(part1) = c.sasl().await else { panic!("no first segment") };
    assert_eq!(part1[0], 0x80);
    c.send(Frame::Sasl(Sasl::Response(vec![0x00]))).await;
    let Sasl::Challenge(part2) = c.sasl().await else { panic!("no final segment") };
    assert_eq!(part2[0], 0xC1);
    let key = t.import(&[&part1[1..], &part2[1..]].concat()).expect("the blob opens with the device's TPM");
    let token = dps.device_token(id, &BASE64.encode(&key));
    c.send(Frame::Sasl(Sasl::Response([&[0u8][..], token.as_bytes()].concat()))).await;
    assert!(matches!(c.sasl().await, Sasl::Outcome { code: 0, .. }), "SASL outcome ok");
    c.open().await;
    c.links(&address(dps, id)).await.expect("links attached");
    (c, key)
}

/// Polls `operation` until it is no longer assigning.
async fn poll_to_end(c: &mut RawAmqp, operation: &str) -> serde_json::Value {
    for _ in 0..25 {
        let polled = c.poll(operation).await.json();
        if polled["status"] != "assigning" {
            return polled;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("operation {operation} still assigning after 5 s");
}

/// An individual TPM enrollment of `id` with `t`'s endorsement key.
fn tpm_enrollment(id: &str, t: &SoftwareTpm) -> serde_json::Value {
    let ek = BASE64.encode(t.endorsement_key().marshal_tpm2b().unwrap());
    json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}})
}

/// A register request answered `assigning` (`device.assigning_first`): its operation ID.
async fn register_assigning(c: &mut RawAmqp, id: &str) -> String {
    let first = c.register(&json!({"registrationId": id})).await.json();
    assert_eq!(first["status"], "assigning", "{first}");
    first["operationId"].as_str().unwrap().to_string()
}

/// A request refused as unauthenticated (`amqp:unauthorized-access`, 401002): its error body.
fn unauthorized(answer: Answer) -> serde_json::Value {
    let (condition, err) = answer.rejection();
    assert_eq!(condition, "amqp:unauthorized-access", "{err}");
    assert_eq!(err["errorCode"], 401002, "{err}");
    err
}

#[tokio::test]
async fn a_tpm_device_answers_three_sasl_challenges() {
    let dps = Dps::start(HUBS).await;
    let t = SoftwareTpm::generate(&mut StdRng::seed_from_u64(7)).unwrap();
    let ek = t.endorsement_key().marshal_tpm2b().unwrap();
    let srk = t.storage_root_key().marshal_tpm2b().unwrap();
    let id = "amqp-tpm-1";
    dps.put_enrollment(
        json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": BASE64.encode(&ek)}}}),
    )
    .await;
    let initial = [&[0u8][..], dps.scope().as_bytes(), &[0], id.as_bytes(), &[0], &ek].concat();

    let (mut c, key) = tpm_connected(&dps, &t, id).await;
    let token = dps.device_token(id, &BASE64.encode(&key));
    let reply = c.register(&json!({"registrationId": id, "payload": {"p": 1}})).await.json();
    assert_eq!(reply["status"], "assigned", "{reply}");
    let hub_key = BASE64.decode(reply["registrationState"]["tpm"]["authenticationKey"].as_str().unwrap()).unwrap();
    assert_eq!(t.import(&hub_key).unwrap(), key, "the hub key is the challenge's key");

    // Another TPM's EK: outcome auth after the SRK, the same as an unknown ID.
    let other = SoftwareTpm::generate(&mut StdRng::seed_from_u64(8)).unwrap();
    let other_ek = other.endorsement_key().marshal_tpm2b().unwrap();
    for (rid, ek) in [(id, &other_ek), ("amqp-tpm-unknown", &ek)] {
        let initial = [&[0u8][..], dps.scope().as_bytes(), &[0], rid.as_bytes(), &[0], ek].concat();
        let mut c = RawAmqp::tls(&dps).await;
        assert_eq!(c.sasl_init("TPM", &initial).await, Sasl::Challenge(vec![0]));
        c.send(Frame::Sasl(Sasl::Response([&[0u8][..], &srk].concat()))).await;
        assert!(matches!(c.sasl().await, Sasl::Outcome { code: 1, .. }), "{rid}");
    }
    // The exchange abandoned after each step: nothing is left waiting, the next device is served.
    for steps in 0..4 {
        let mut c = RawAmqp::tls(&dps).await;
        c.sasl_init("TPM", &initial).await;
        if steps > 0 {
            c.send(Frame::Sasl(Sasl::Response([&[0u8][..], &srk].concat()))).await;
            c.sasl().await;
        }
        if steps > 1 {
            c.send(Frame::Sasl(Sasl::Response(vec![0x00]))).await;
            c.sasl().await;
        }
        if steps > 2 {
            // The SASL header again, out of turn.
            c.send_raw(&SASL_HEADER).await;
            c.closed("a header in the middle of SASL").await;
        }
        drop(c);
    }
    // A wrong control byte on the acknowledgement, and a stale key (the previous challenge's).
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_init("TPM", &initial).await;
    c.send(Frame::Sasl(Sasl::Response([&[0x01u8][..], &srk].concat()))).await;
    assert!(c.closed("a wrong control byte").await.is_none());
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_init("TPM", &initial).await;
    c.send(Frame::Sasl(Sasl::Response([&[0u8][..], &srk].concat()))).await;
    c.sasl().await;
    c.send(Frame::Sasl(Sasl::Response(vec![0x00, 0x00]))).await;
    assert!(c.closed("an acknowledgement with more than the control byte").await.is_none());
    assert!(dps.log().contains("the first segment must be acknowledged with the single byte 0x00"));
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_init("TPM", &initial).await;
    c.send(Frame::Sasl(Sasl::Response([&[0u8][..], &srk].concat()))).await;
    c.sasl().await;
    c.send(Frame::Sasl(Sasl::Response(vec![0x00]))).await;
    c.sasl().await;
    // The key from before this challenge no longer works: a new challenge replaced it.
    c.send(Frame::Sasl(Sasl::Response([&[0u8][..], token.as_bytes()].concat()))).await;
    assert!(matches!(c.sasl().await, Sasl::Outcome { code: 1, .. }));
}

/// A TPM device that gets `assigning` first polls over AMQP: the assigned answer carries the
/// authentication key again (put back from the challenge record, docs/tpm.md §3). A newer
/// challenge replaces the key at once, also for the connection that authenticated with it:
/// its next poll is refused as an HTTPS poll with that key would be; the old operation polled
/// on the new key's connection answers `assigned` without the blob of a key the device no
/// longer holds, and registering again brings the new one.
#[tokio::test]
async fn a_tpm_device_polling_over_amqp_gets_its_key_back_until_a_new_challenge_replaces_it() {
    let dps = Dps::start(&format!("{HUBS}[device]\nassigning_first = true\nretry_after_secs = 1\n")).await;
    let t = SoftwareTpm::generate(&mut StdRng::seed_from_u64(9)).unwrap();
    let id = "amqp-tpm-poll";
    dps.put_enrollment(tpm_enrollment(id, &t)).await;
    let (mut c, key) = tpm_connected(&dps, &t, id).await;
    let op = register_assigning(&mut c, id).await;
    let assigned = poll_to_end(&mut c, &op).await;
    assert_eq!(assigned["status"], "assigned", "{assigned}");
    let blob = BASE64.decode(assigned["registrationState"]["tpm"]["authenticationKey"].as_str().unwrap()).unwrap();
    assert_eq!(t.import(&blob).unwrap(), key, "the polled answer's blob delivers the challenge's key");
    assert_eq!(c.poll(&op).await.json(), assigned, "polled again: the same answer");

    let (mut c2, key2) = tpm_connected(&dps, &t, id).await;
    assert_ne!(key2, key, "a new challenge, a new key");
    let err = unauthorized(c.poll(&op).await);
    assert!(err["message"].as_str().unwrap().contains("a newer challenge replaced it"), "{err}");
    unauthorized(c.register(&json!({"registrationId": id})).await);

    let old = c2.poll(&op).await.json();
    assert_eq!(old["status"], "assigned", "{old}");
    assert_eq!(old["registrationState"]["assignedHub"], assigned["registrationState"]["assignedHub"]);
    assert!(old["registrationState"].get("tpm").is_none(), "no blob of a replaced key: {old}");
    let again = c2.register(&json!({"registrationId": id})).await.json();
    let again = poll_to_end(&mut c2, again["operationId"].as_str().unwrap()).await;
    let blob2 = BASE64.decode(again["registrationState"]["tpm"]["authenticationKey"].as_str().unwrap()).unwrap();
    assert_eq!(t.import(&blob2).unwrap(), key2, "registering again brings the new key");
}

/// A TPM device's key stops counting, on a connection that authenticated with it, once the
/// enrollment's endorsement key is changed: the connection's next poll and register are refused.
#[tokio::test]
async fn a_tpm_devices_connection_is_refused_once_its_enrollments_ek_changes() {
    let dps = Dps::start(&format!("{HUBS}[device]\nassigning_first = true\nretry_after_secs = 1\n")).await;
    let t = SoftwareTpm::generate(&mut StdRng::seed_from_u64(10)).unwrap();
    let other = SoftwareTpm::generate(&mut StdRng::seed_from_u64(11)).unwrap();
    let id = "amqp-tpm-ek";
    dps.put_enrollment(tpm_enrollment(id, &t)).await;
    let (mut c, _) = tpm_connected(&dps, &t, id).await;
    let op = register_assigning(&mut c, id).await;
    assert_eq!(poll_to_end(&mut c, &op).await["status"], "assigned");

    dps.put_enrollment(tpm_enrollment(id, &other)).await;
    let err = unauthorized(c.poll(&op).await);
    // A changed enrollment is authenticated anew, with the answer any unproven token gets.
    assert!(err["message"].as_str().unwrap().contains("is not accepted for registration ID 'amqp-tpm-ek'"), "{err}");
    unauthorized(c.register(&json!({"registrationId": id})).await);
    // The TPM the enrollment names now gets a challenge and registers.
    let (mut c2, key2) = tpm_connected(&dps, &other, id).await;
    let again = c2.register(&json!({"registrationId": id})).await.json();
    let again = poll_to_end(&mut c2, again["operationId"].as_str().unwrap()).await;
    let blob = BASE64.decode(again["registrationState"]["tpm"]["authenticationKey"].as_str().unwrap()).unwrap();
    assert_eq!(other.import(&blob).unwrap(), key2);
}

/// ... and once the key's lifetime (`device.tpm_challenge_secs`) runs out.
#[tokio::test]
async fn a_tpm_devices_connection_is_refused_once_its_key_expires() {
    let dps =
        Dps::start(&format!("{HUBS}[device]\nassigning_first = true\nretry_after_secs = 1\ntpm_challenge_secs = 1\n"))
            .await;
    let t = SoftwareTpm::generate(&mut StdRng::seed_from_u64(12)).unwrap();
    let id = "amqp-tpm-expiry";
    dps.put_enrollment(tpm_enrollment(id, &t)).await;
    let (mut c, _) = tpm_connected(&dps, &t, id).await;
    let op = register_assigning(&mut c, id).await;
    // The key counts for one second after its challenge; well after that it does not.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = unauthorized(c.poll(&op).await);
    assert!(err["message"].as_str().unwrap().contains("expired"), "{err}");
    unauthorized(c.register(&json!({"registrationId": id})).await);
}

#[tokio::test]
async fn polling_errors_and_disabled_enrollments_are_answered_as_the_sdks_expect() {
    let dps = Dps::start(&format!("{HUBS}[device]\nassigning_first = true\nretry_after_secs = 1\n")).await;
    dps.put_enrollment(json!({"registrationId": "amqp-poll", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    dps.put_enrollment(
        json!({"registrationId": "amqp-off", "provisioningStatus": "disabled", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}),
    )
    .await;
    let mut c = connected(&dps, "amqp-poll", &dps.device_token("amqp-poll", &key(1)), false).await;
    let Answer::Reply { json, message } = c.register(&json!({"registrationId": "amqp-poll"})).await else { panic!() };
    assert_eq!(json["status"], "assigning");
    assert_eq!(message.application_property("retry-after"), Some(&Value::String("1".into())));
    assert_eq!(message.application_property("Retry-After"), Some(&Value::String("1".into())));
    let op = json["operationId"].as_str().unwrap().to_string();
    assert_eq!(poll_to_end(&mut c, &op).await["status"], "assigned");
    // Errors are rejected dispositions carrying the DPS error JSON.
    let (condition, err) = c.poll("not-an-operation").await.rejection();
    assert_eq!(condition, "amqp:not-found");
    assert_eq!(err["errorCode"], 404203, "{err}");
    assert!(err["trackingId"].as_str().is_some_and(|t| !t.is_empty()));
    let (condition, err) = c.register(&json!({"registrationId": "someone-else"})).await.rejection();
    assert_eq!(condition, "com.microsoft:argument-error");
    assert_eq!(err["errorCode"], 400004, "{err}");
    let (_, err) =
        c.request(&[("iotdps-operation-type", Value::String("iotdps-delete".into()))], Body::Empty).await.rejection();
    assert!(err["message"].as_str().unwrap().contains("'iotdps-delete' is not known"), "{err}");
    let (_, err) = c.request(&[], Body::Empty).await.rejection();
    assert!(err["message"].as_str().unwrap().contains("iotdps-operation-type is missing"), "{err}");
    // A disabled enrollment is an answer, not an error.
    let mut c = connected(&dps, "amqp-off", &dps.device_token("amqp-off", &key(1)), false).await;
    let reply = c.register(&json!({"registrationId": "amqp-off"})).await.json();
    let mut reply = reply;
    for _ in 0..20 {
        if reply["status"] != "assigning" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        reply = c.poll(reply["operationId"].as_str().unwrap()).await.json();
    }
    assert_eq!(reply["status"], "disabled", "{reply}");
}

#[tokio::test]
async fn protocol_violations_and_limits_close_only_that_connection() {
    let dps = Dps::start(
        "[amqp]\nidle_timeout_secs = 2\nconnect_timeout_secs = 2\nsasl_timeout_secs = 2\nmax_frame_bytes = 4096\n",
    )
    .await;
    dps.put_enrollment(json!({"registrationId": "amqp-lim", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    let token = dps.device_token("amqp-lim", &key(1));
    // Not an AMQP header: the server answers with the header it speaks and closes.
    let mut c = RawAmqp::tls(&dps).await;
    c.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(c.header().await, Some(SASL_HEADER));
    c.closed("garbage header").await;
    // The TLS header (this port is TLS already).
    let mut c = RawAmqp::tls(&dps).await;
    c.send_raw(b"AMQP\x02\x01\x00\x00").await;
    assert_eq!(c.header().await, Some(SASL_HEADER));
    c.closed("TLS header").await;
    // Garbage after the AMQP header.
    let mut c = RawAmqp::tls(&dps).await;
    c.send_raw(&AMQP_HEADER).await;
    assert_eq!(c.header().await, Some(AMQP_HEADER));
    c.send_raw(&[0, 0, 0, 9, 7, 7, 7, 7, 7]).await;
    c.closed("garbage frame").await;
    // SASL aborted at each step: after the header, after the mechanisms (silence: the SASL
    // time limit), after init.
    let mut c = RawAmqp::tls(&dps).await;
    c.send_raw(&SASL_HEADER).await;
    drop(c);
    let mut c = RawAmqp::tls(&dps).await;
    c.send_raw(&SASL_HEADER).await;
    c.header().await;
    c.sasl().await;
    let started = std::time::Instant::now();
    c.closed("silent after the mechanisms").await;
    assert!(started.elapsed() < Duration::from_secs(6));
    // An oversized frame after open.
    let mut c = RawAmqp::tls(&dps).await;
    assert_eq!(c.sasl_plain(&dps.scope(), "amqp-lim", &token).await, 0);
    c.open().await;
    let mut big = vec![0u8; 8];
    big[..4].copy_from_slice(&100_000u32.to_be_bytes());
    big[4] = 2;
    c.send_raw(&big).await;
    let err = c.closed("oversized frame").await.expect("a close with the reason");
    assert_eq!(err.condition, "amqp:resource-limit-exceeded");
    assert!(err.description.unwrap().contains("amqp.max_frame_bytes"));
    // Too many sessions.
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_plain(&dps.scope(), "amqp-lim", &token).await;
    c.open().await;
    for ch in 0..5u16 {
        c.perform(
            ch,
            Performative::Begin(Begin {
                remote_channel: None,
                next_outgoing_id: 0,
                incoming_window: 10,
                outgoing_window: 10,
                handle_max: 7,
            }),
        )
        .await;
    }
    let err = c.closed("a fifth session").await.expect("a close with the reason");
    assert!(err.description.unwrap().contains("amqp.max_sessions"));
    // Too many links.
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_plain(&dps.scope(), "amqp-lim", &token).await;
    c.open().await;
    c.perform(
        0,
        Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 10,
            outgoing_window: 10,
            handle_max: 100,
        }),
    )
    .await;
    for handle in 0..9 {
        let terminus = Some(Terminus { address: Some(address(&dps, "amqp-lim")), ..Terminus::default() });
        c.perform(
            0,
            Performative::Attach(Attach {
                name: format!("l{handle}"),
                handle,
                role: Role::Receiver,
                source: terminus,
                ..Attach::default()
            }),
        )
        .await;
    }
    let err = c.closed("a ninth link").await.expect("a close with the reason");
    assert!(err.description.unwrap().contains("amqp.max_links"));
    // Idle: nothing after open for longer than the idle time-out announced.
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_plain(&dps.scope(), "amqp-lim", &token).await;
    let open = c.open().await;
    assert_eq!(open.idle_time_out, Some(2000));
    let err = c.closed("idle").await.expect("a close with the reason");
    assert!(err.description.unwrap().contains("amqp.idle_timeout_secs"));
    // A client that announces an idle time-out gets heartbeats at half of it, even while it
    // sends frames of its own.
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_plain(&dps.scope(), "amqp-lim", &token).await;
    c.open_with(dps_proto::amqp_frame::Open {
        container_id: "hb".into(),
        idle_time_out: Some(1000),
        ..Default::default()
    })
    .await;
    c.send(Frame::Heartbeat { channel: 0 }).await;
    let beats = c.heartbeats_within(Duration::from_millis(1800)).await;
    assert!((2..=5).contains(&beats), "{beats} heartbeats in 1.8 s with idle-time-out 1 s");
    // A transfer with no link, a second open.
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_plain(&dps.scope(), "amqp-lim", &token).await;
    c.open().await;
    c.perform(0, Performative::Open(Default::default())).await;
    let err = c.closed("a second open").await.expect("a close with the reason");
    assert_eq!(err.condition, "amqp:not-allowed");
    // The server is fine for the next device.
    let mut c = connected(&dps, "amqp-lim", &token, false).await;
    assert_eq!(c.register(&json!({})).await.json()["status"], "assigned");
    let _ = amqp_port(&dps);
}

/// Delivery `i`: a settled poll of an unknown operation, answered with an error reply (about
/// 400 bytes) that waits for the client's credit.
fn settled_poll(i: u32) -> Frame {
    let poll = dps_proto::amqp_message::Message {
        application_properties: vec![
            ("iotdps-operation-type".into(), Value::String("iotdps-get-operationstatus".into())),
            ("iotdps-operation-id".into(), Value::String("x".into())),
        ],
        ..Default::default()
    };
    let mut payload = Vec::new();
    poll.encode(&mut payload);
    let transfer = dps_proto::amqp_frame::Transfer {
        handle: 1,
        delivery_id: Some(i),
        delivery_tag: Some(i.to_be_bytes().to_vec()),
        settled: Some(true),
        ..Default::default()
    };
    Frame::Amqp { channel: 0, performative: Performative::Transfer(transfer), payload }
}

#[tokio::test]
async fn a_client_that_grants_no_reply_credit_is_disconnected() {
    let dps = Dps::start("[amqp]\nwrite_timeout_secs = 1\n").await;
    dps.put_enrollment(json!({"registrationId": "amqp-slow", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    let token = dps.device_token("amqp-slow", &key(1));
    // A reader that takes no replies: the replies it does not take are bounded.
    let mut c = RawAmqp::tls(&dps).await;
    c.sasl_plain(&dps.scope(), "amqp-slow", &token).await;
    c.open().await;
    c.perform(
        0,
        Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 1000,
            outgoing_window: 1000,
            handle_max: 7,
        }),
    )
    .await;
    c.performative().await;
    let terminus = |a: Option<String>| Some(Terminus { address: a, ..Terminus::default() });
    c.perform(
        0,
        Performative::Attach(Attach {
            name: "r".into(),
            handle: 0,
            role: Role::Receiver,
            source: terminus(Some(address(&dps, "amqp-slow"))),
            ..Attach::default()
        }),
    )
    .await;
    c.performative().await;
    c.perform(
        0,
        Performative::Attach(Attach {
            name: "s".into(),
            handle: 1,
            role: Role::Sender,
            target: terminus(Some(address(&dps, "amqp-slow"))),
            initial_delivery_count: Some(0),
            ..Attach::default()
        }),
    )
    .await;
    c.performative().await;
    c.performative().await;
    // Settled requests: their errors come back as replies, which wait for credit.
    let mut closed = false;
    for i in 0..40u32 {
        c.send(settled_poll(i)).await;
        if i % 4 == 3 {
            // Credit top-ups come as flows.
            loop {
                match tokio::time::timeout(Duration::from_millis(300), c.frame()).await {
                    Ok(Some(Frame::Amqp { performative: Performative::Close(close), .. })) => {
                        assert!(close.error.unwrap().description.unwrap().contains("link credit"));
                        closed = true;
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        if closed {
            break;
        }
    }
    assert!(closed, "the connection was closed for holding too many replies");
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_after_the_write_timeout() {
    let dps = Dps::start("[amqp]\nwrite_timeout_secs = 1\n").await;
    dps.put_enrollment(json!({"registrationId": "amqp-deaf", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    let token = dps.device_token("amqp-deaf", &key(1));
    let mut c = RawAmqp::tls_small_window(&dps, 4096).await;
    c.sasl_plain(&dps.scope(), "amqp-deaf", &token).await;
    c.open().await;
    c.links_with_credit(&address(&dps, "amqp-deaf"), 1_000_000).await.unwrap();
    // Settled polls of an unknown operation: each is answered with an error reply (~400 bytes)
    // that this client never reads.
    let mut sent = 0u32;
    for i in 0..20_000u32 {
        let mut out = Vec::new();
        settled_poll(i).encode(&mut out);
        if !c.try_send_raw(&out, Duration::from_millis(500)).await {
            break;
        }
        sent += 1;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dps.log().contains("amqp.write_timeout_secs") {
        assert!(std::time::Instant::now() < deadline, "not disconnected after {sent} requests:\n{}", dps.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Others are served meanwhile.
    let mut other = connected(&dps, "amqp-deaf", &token, false).await;
    assert_eq!(other.register(&json!({})).await.json()["status"], "assigned");
}
