//! The `azure-iot-hub` registrar through a spawned dps against local IoT hubs that implement
//! the published IoT Hub service REST contract (`dps_bench::iot_hub`; no Azure IoT Hub is
//! reachable from here): every kind of device created with the authentication it will use
//! there, the initial twin applied, reprovisioning that migrates or resets across hubs and
//! removes the device from the hub it left, a refusing hub, throttling, and `kill -9` during a
//! hub call.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::pki::{ca, device};
use common::{derive, key, Dps};
use dps_bench::iot_hub::IotHub;
use dps_core::tpm::software::SoftwareTpm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

async fn register(dps: &Dps, id: &str, token: &str) -> Value {
    dps.register_to_end(id, token).await
}

async fn enroll(dps: &Dps, id: &str, hub: &str, twin: Value, policy: Option<(bool, bool)>) -> String {
    let mut body = json!({"registrationId": id, "iotHubs": [hub], "initialTwin": twin,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}});
    if let Some((update, migrate)) = policy {
        body["reprovisionPolicy"] = json!({"updateHubAssignment": update, "migrateDeviceData": migrate});
    }
    dps.put_enrollment(body).await;
    dps.device_token(id, &key(1))
}

/// Waits until `pred` holds for the hub.
async fn eventually(what: &str, pred: impl Fn() -> bool) {
    for _ in 0..200 {
        if pred() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within 20 s");
}

#[tokio::test]
async fn every_kind_of_device_is_created_in_the_iot_hub_as_it_will_authenticate_there() {
    let hub = IotHub::start("hub-1.azure-devices.test", &key(40)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[x509]\nrequire_verified_ca = false\n{}", hub.config(dir.path(), "fail"));
    let dps = Dps::start(&config).await;

    // A symmetric-key IoT Edge device with an initial twin.
    dps.put_enrollment(json!({"registrationId": "edge-1", "iotHubs": [hub.host_name],
        "capabilities": {"iotEdge": true},
        "initialTwin": {"tags": {"site": "north"}, "properties": {"desired": {"fw": "1.0"}}},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    let token = dps.device_token("edge-1", &key(1));
    let state = register(&dps, "edge-1", &token).await;
    assert_eq!(state["status"], "assigned", "{state}");
    // The requests, field by field: read, create without If-Match, replace the twin.
    let requests = hub.requests();
    let shape: Vec<(String, String, Option<String>)> =
        requests.iter().map(|r| (r.method.clone(), r.path.clone(), r.if_match.clone())).collect();
    assert_eq!(
        shape,
        vec![
            ("GET".into(), "/devices/edge-1".into(), None),
            ("PUT".into(), "/devices/edge-1".into(), None),
            ("PUT".into(), "/twins/edge-1".into(), Some("*".into())),
        ]
    );
    assert!(requests.iter().all(|r| r.query == "api-version=2021-04-12"));
    assert_eq!(
        requests[1].body,
        json!({"deviceId": "edge-1", "status": "enabled", "capabilities": {"iotEdge": true},
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}})
    );
    assert_eq!(requests[2].body, json!({"tags": {"site": "north"}, "properties": {"desired": {"fw": "1.0"}}}));
    assert_eq!(hub.twin("edge-1").unwrap()["tags"]["site"], "north");

    // Registering again without a change: an update by ETag, the twin left alone.
    let state = register(&dps, "edge-1", &token).await;
    assert_eq!(state["status"], "assigned");
    let requests = hub.requests();
    assert_eq!(requests.len(), 5, "{requests:?}");
    assert_eq!((requests[3].method.as_str(), requests[4].method.as_str()), ("GET", "PUT"));
    assert_eq!(requests[4].if_match.as_deref(), Some("\"1\""), "the ETag the hub gave");

    // A group member: its derived keys.
    dps.put_group(json!({"enrollmentGroupId": "grp", "iotHubs": [hub.host_name],
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(7), "secondaryKey": key(8)}}}))
        .await;
    let member_key = derive(&key(7), "member-1");
    let state = register(&dps, "member-1", &dps.device_token("member-1", &member_key)).await;
    assert_eq!(state["status"], "assigned", "{state}");
    assert_eq!(
        hub.device("member-1").unwrap()["authentication"],
        json!({"type": "sas", "symmetricKey": {"primaryKey": member_key, "secondaryKey": derive(&key(8), "member-1")}})
    );
    assert_eq!(hub.device("member-1").unwrap()["capabilities"]["iotEdge"], false);

    // An individual X.509 device: self-signed, by the SHA-256 thumbprint of its certificate.
    let leaf = device("x509-dev", None, (-1, 30));
    dps.put_enrollment(json!({"registrationId": "x509-dev", "iotHubs": [hub.host_name],
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": leaf.pem()}}}}}))
        .await;
    let client = dps.client_with_certificate(&leaf.pem(), &leaf.key.serialize_pem());
    let (status, body) = dps.register_as(&client, "x509-dev", json!({"registrationId": "x509-dev"})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigned")), "{body}");
    let thumbprint: String = Sha256::digest(leaf.der()).iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(
        hub.device("x509-dev").unwrap()["authentication"],
        json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumbprint, "secondaryThumbprint": null}})
    );

    // An X.509 group member: CA-signed.
    let root = ca("azure registrar root", None);
    dps.put_group(json!({"enrollmentGroupId": "x509-grp", "iotHubs": [hub.host_name],
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root.pem()}}}}}))
        .await;
    let member = device("x509-member", Some(&root), (-1, 30));
    let client = dps.client_with_certificate(&format!("{}{}", member.pem(), root.pem()), &member.key.serialize_pem());
    let (status, body) = dps.register_as(&client, "x509-member", json!({"registrationId": "x509-member"})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigned")), "{body}");
    assert_eq!(hub.device("x509-member").unwrap()["authentication"], json!({"type": "certificateAuthority"}));

    // A TPM device: the key its TPM imported from the challenge (and gets again in the
    // assigned answer) is its hub key.
    let tpm = SoftwareTpm::generate(&mut StdRng::seed_from_u64(21)).unwrap();
    let ek = BASE64.encode(tpm.endorsement_key().marshal_tpm2b().unwrap());
    let srk = BASE64.encode(tpm.storage_root_key().marshal_tpm2b().unwrap());
    dps.put_enrollment(json!({"registrationId": "tpm-dev", "iotHubs": [hub.host_name],
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}))
        .await;
    let first = json!({"registrationId": "tpm-dev", "tpm": {"endorsementKey": ek, "storageRootKey": srk}});
    let (status, _, challenge) = dps.register("tpm-dev", None, first).await;
    assert_eq!(status, 401, "{challenge}");
    assert!(hub.device("tpm-dev").is_none(), "nothing in the hub before the proof");
    let imported = tpm.import(&BASE64.decode(challenge["authenticationKey"].as_str().unwrap()).unwrap()).unwrap();
    let token = dps.device_token("tpm-dev", &BASE64.encode(&imported));
    let state = register(&dps, "tpm-dev", &token).await;
    assert_eq!(state["status"], "assigned", "{state}");
    let again = tpm.import(&BASE64.decode(state["tpm"]["authenticationKey"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(again, imported);
    let hub_key = BASE64.encode(&imported);
    assert_eq!(
        hub.device("tpm-dev").unwrap()["authentication"],
        json!({"type": "sas", "symmetricKey": {"primaryKey": hub_key, "secondaryKey": hub_key}})
    );

    // No key and no connection string in the log; none in a service API read.
    let log = dps.log();
    for secret in [hub.key.clone(), key(1), key(2), member_key.clone(), hub_key.clone()] {
        assert!(!log.contains(&secret), "a secret is in the log");
    }
    let rs = dps.service(reqwest::Method::GET, "/registrations/tpm-dev").send().await.unwrap().text().await.unwrap();
    assert!(!rs.contains(&hub_key) && !rs.contains(&hub.key), "{rs}");
}

#[tokio::test]
async fn reprovisioning_migrates_or_resets_the_device_across_iot_hubs() {
    let hub_a = IotHub::start("hub-a.azure-devices.test", &key(41)).await;
    let hub_b = IotHub::start("hub-b.azure-devices.test", &key(42)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{}{}", hub_a.config(dir.path(), "fail"), hub_b.config(dir.path(), "fail"));
    let dps = Dps::start(&config).await;
    let id = "mover";
    let twin = |v: i64| json!({"tags": {"v": v}, "properties": {"desired": {"fw": format!("{v}.0")}}});
    let token = enroll(&dps, id, &hub_a.host_name, twin(1), Some((true, true))).await;
    assert_eq!(register(&dps, id, &token).await["substatus"], "initialAssignment");
    assert_eq!(hub_a.twin(id).unwrap()["tags"]["v"], 1);
    // The twin changes in hub A (the back end sets a new desired firmware).
    hub_a.set_twin(id, json!({"tags": {"v": 1, "owner": "ops"}, "properties": {"desired": {"fw": "1.5"}}}));

    // Migrating to B: the twin B gets is the one the device had in A; A loses the device.
    enroll(&dps, id, &hub_b.host_name, twin(2), Some((true, true))).await;
    let state = register(&dps, id, &token).await;
    assert_eq!(
        (state["assignedHub"].as_str(), state["substatus"].as_str()),
        (Some(hub_b.host_name.as_str()), Some("deviceDataMigrated"))
    );
    assert_eq!(
        hub_b.twin(id).unwrap(),
        json!({"tags": {"v": 1, "owner": "ops"}, "properties": {"desired": {"fw": "1.5"}}}),
        "the twin moved, without the hub's $metadata"
    );
    assert!(hub_b.device(id).is_some());
    eventually("the removal from hub A", || hub_a.device(id).is_none()).await;
    let delete = hub_a.requests().into_iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!((delete.path.as_str(), delete.if_match.as_deref()), ("/devices/mover", Some("*")));

    // Back to A without migration: reset to the enrollment's twin there; B loses the device.
    enroll(&dps, id, &hub_a.host_name, twin(3), Some((true, false))).await;
    let state = register(&dps, id, &token).await;
    assert_eq!(state["substatus"], "reprovisionedToInitialAssignment", "{state}");
    assert_eq!(hub_a.twin(id).unwrap(), twin(3));
    eventually("the removal from hub B", || hub_b.device(id).is_none()).await;

    // A factory reset on the same hub: the twin is replaced, the identity stays.
    hub_a.set_twin(id, json!({"tags": {"dirty": true}, "properties": {"desired": {}}}));
    enroll(&dps, id, &hub_a.host_name, twin(4), Some((true, false))).await;
    let state = register(&dps, id, &token).await;
    assert_eq!(state["substatus"], "deviceDataReset");
    assert_eq!(hub_a.twin(id).unwrap(), twin(4));
    assert_eq!(hub_a.device_count(), 1);
    assert_eq!(hub_b.device_count(), 0);

    // Never reprovision: the device stays on A whatever the enrollment now names; its identity
    // is written again in place, its twin left as the hub has it.
    hub_a.set_twin(id, json!({"tags": {"kept": true}, "properties": {"desired": {}}}));
    enroll(&dps, id, &hub_b.host_name, twin(5), Some((false, true))).await;
    let state = register(&dps, id, &token).await;
    assert_eq!(
        (state["assignedHub"].as_str(), state["substatus"].as_str()),
        (Some(hub_a.host_name.as_str()), Some("deviceDataReset")),
        "{state}"
    );
    assert_eq!(hub_a.twin(id).unwrap()["tags"]["kept"], true);
    assert_eq!((hub_a.device_count(), hub_b.device_count()), (1, 0));
}

#[tokio::test]
async fn a_refusing_hub_fails_the_registration_with_its_answer_and_throttling_is_retried() {
    let hub = IotHub::start("hub-r.azure-devices.test", &key(43)).await;
    let dir = tempfile::tempdir().unwrap();
    // A connection string with another key: the hub answers 401.
    let config = hub.config(dir.path(), "fail").replace(&hub.key, &key(99));
    let dps = Dps::start(&config).await;
    let token = enroll(&dps, "refused", &hub.host_name, json!({}), None).await;
    let state = register(&dps, "refused", &token).await;
    assert_eq!(state["status"], "failed", "{state}");
    assert_eq!(state["errorCode"], 500210);
    let message = state["errorMessage"].as_str().unwrap();
    assert!(message.contains("hub-r.azure-devices.test") && message.contains("HTTP 401"), "{message}");
    // The hub's own words go to the operator's log, not to the device.
    assert!(!message.contains("IotHubUnauthorizedAccess"), "{message}");
    assert!(dps.log().contains("IotHubUnauthorizedAccess"), "the log names the hub's error code");
    assert_eq!(hub.device_count(), 0);

    // With the right key, throttled twice, then created.
    drop(dps);
    let dps = Dps::start(&hub.config(dir.path(), "fail")).await;
    let token = enroll(&dps, "throttled", &hub.host_name, json!({}), None).await;
    hub.queue(&[429, 429]);
    let state = register(&dps, "throttled", &token).await;
    assert_eq!(state["status"], "assigned", "{state}");
    assert!(hub.device("throttled").is_some());
}

#[tokio::test]
async fn after_a_kill_during_the_hub_call_the_device_is_in_its_hub_exactly_once() {
    let hub = IotHub::start("hub-k.azure-devices.test", &key(44)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[allocation]\nwebhook_inline_wait_ms = 300\n{}", hub.config(dir.path(), "fail"));
    let mut dps = Dps::start(&config).await;
    let token = enroll(&dps, "killed", &hub.host_name, json!({"tags": {"k": 1}}), None).await;
    hub.set_delay(Duration::from_secs(2));
    let (status, _, body) = dps.register("killed", Some(&token), json!({"registrationId": "killed"})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigning")), "{body}");
    // The GET is in flight (or the PUT after it): dps dies.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    dps.kill9();
    hub.set_delay(Duration::ZERO);
    dps.restart().await;
    // The device registers again (it would after its operation is reported failed).
    let state = register(&dps, "killed", &token).await;
    assert_eq!(state["status"], "assigned", "{state}");
    assert_eq!(hub.device_count(), 1, "exactly one identity");
    assert_eq!(hub.device("killed").unwrap()["authentication"]["symmetricKey"]["primaryKey"], key(1));
    assert_eq!(hub.twin("killed").unwrap()["tags"]["k"], 1);
}
