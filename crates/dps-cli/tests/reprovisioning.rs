//! Re-registration per `reprovisionPolicy` (docs/protocol-notes.md §10.3), every combination, through a
//! spawned server.

mod common;

use common::mqtt::{connect_packet, RawMqtt, REGISTER};
use common::{derive, key, Dps};
use reqwest::Method;
use serde_json::{json, Value};

const HUBS: &str =
    "[[hubs]]\nhost_name = \"hub-1.test\"\n[[hubs]]\nhost_name = \"hub-2.test\"\n[[hubs]]\nhost_name = \"hub-3.test\"\n";

/// Points the enrollment at one hub (and a twin) with the given policy.
async fn enroll(dps: &Dps, id: &str, hub: &str, twin: i64, policy: Option<(bool, bool)>) -> String {
    let mut body = json!({"registrationId": id, "iotHubs": [hub], "initialTwin": {"tags": {"v": twin}},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}});
    if let Some((update, migrate)) = policy {
        body["reprovisionPolicy"] = json!({"updateHubAssignment": update, "migrateDeviceData": migrate});
    }
    dps.put_enrollment(body).await;
    dps.device_token(id, &key(1))
}

/// Registers over HTTPS; returns the `registrationState` of an `assigned` answer.
async fn register_state(dps: &Dps, id: &str, token: &str, query: &str) -> Value {
    let (status, _, body) = dps.register_with_query(id, Some(token), json!({}), query).await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "assigned", "{body}");
    body["registrationState"].clone()
}

async fn register(dps: &Dps, id: &str, token: &str, query: &str) -> (String, String) {
    let s = register_state(dps, id, token, query).await;
    (s["assignedHub"].as_str().unwrap().to_string(), s["substatus"].as_str().unwrap().to_string())
}

async fn twin(dps: &Dps, id: &str) -> Value {
    let rs: Value =
        dps.service(Method::GET, &format!("/registrations/{id}")).send().await.unwrap().json().await.unwrap();
    rs["initialTwin"]["tags"]["v"].clone()
}

#[tokio::test]
async fn update_and_migrate_default() {
    let dps = Dps::start(HUBS).await;
    let id = "migrate";
    let t = enroll(&dps, id, "hub-1.test", 1, None).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-1.test".into(), "initialAssignment".into()));
    assert_eq!(twin(&dps, id).await, 1);
    enroll(&dps, id, "hub-2.test", 2, None).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-2.test".into(), "deviceDataMigrated".into()));
    assert_eq!(twin(&dps, id).await, 1, "device data migrated, not reset");
    enroll(&dps, id, "hub-3.test", 3, Some((true, true))).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-3.test".into(), "deviceDataMigrated".into()));
    enroll(&dps, id, "hub-1.test", 4, None).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-1.test".into(), "reprovisionedToInitialAssignment".into()));
    // Nothing changes: the substatus stays.
    assert_eq!(register(&dps, id, &t, "").await, ("hub-1.test".into(), "reprovisionedToInitialAssignment".into()));
    assert_eq!(twin(&dps, id).await, 1);
}

#[tokio::test]
async fn update_and_reset() {
    let dps = Dps::start(HUBS).await;
    let id = "reset";
    let t = enroll(&dps, id, "hub-1.test", 1, Some((true, false))).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-1.test".into(), "initialAssignment".into()));
    enroll(&dps, id, "hub-2.test", 2, Some((true, false))).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-2.test".into(), "deviceDataReset".into()));
    assert_eq!(twin(&dps, id).await, 2, "reset to the enrollment's twin");
    // Same hub: a factory reset.
    enroll(&dps, id, "hub-2.test", 3, Some((true, false))).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-2.test".into(), "deviceDataReset".into()));
    assert_eq!(twin(&dps, id).await, 3);
    // Back to the first hub: reprovisionedToInitialAssignment, and not migrating, the twin is
    // reset to the enrollment's (not the one the device had there); staying is a reset again.
    enroll(&dps, id, "hub-1.test", 4, Some((true, false))).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-1.test".into(), "reprovisionedToInitialAssignment".into()));
    assert_eq!(twin(&dps, id).await, 4, "reset, not the first twin (1)");
    enroll(&dps, id, "hub-1.test", 5, Some((true, false))).await;
    assert_eq!(register(&dps, id, &t, "").await, ("hub-1.test".into(), "deviceDataReset".into()));
    assert_eq!(twin(&dps, id).await, 5);
}

#[tokio::test]
async fn never_reprovision_force_and_delete() {
    let dps = Dps::start(HUBS).await;
    for migrate in [true, false] {
        let id = format!("never-{migrate}");
        let t = enroll(&dps, &id, "hub-1.test", 1, Some((false, migrate))).await;
        assert_eq!(register(&dps, &id, &t, "").await, ("hub-1.test".into(), "initialAssignment".into()));
        enroll(&dps, &id, "hub-2.test", 2, Some((false, migrate))).await;
        assert_eq!(register(&dps, &id, &t, "").await, ("hub-1.test".into(), "initialAssignment".into()), "stays");
        assert_eq!(twin(&dps, &id).await, 1);
        // Over MQTT there is no forceRegistration: the device stays.
        assert_eq!(
            register_over_mqtt_asking_for_force(&dps, &id, &t).await,
            vec![(json!("hub-1.test"), json!("initialAssignment")); 3]
        );
        assert_eq!(twin(&dps, &id).await, 1);
        // forceRegistration over HTTPS: a fresh (initial) assignment.
        assert_eq!(
            register(&dps, &id, &t, "&forceRegistration=true").await,
            ("hub-2.test".into(), "initialAssignment".into())
        );
        assert_eq!(twin(&dps, &id).await, 2);
        // Deleting the registration state makes the next registration an initial one.
        let resp = dps.service(Method::DELETE, &format!("/registrations/{id}")).send().await.unwrap();
        assert_eq!(resp.status(), 204);
        enroll(&dps, &id, "hub-3.test", 3, Some((false, migrate))).await;
        assert_eq!(register(&dps, &id, &t, "").await, ("hub-3.test".into(), "initialAssignment".into()));
    }
}

/// Points `dev-explicit` at one hub, with or without a deviceId, migrating or not.
async fn enroll_device_id(dps: &Dps, hub: &str, device_id: Option<&str>, migrate: bool) {
    let mut body = json!({"registrationId": "dev-explicit", "iotHubs": [hub],
        "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": migrate},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}});
    if let Some(d) = device_id {
        body["deviceId"] = json!(d);
    }
    dps.put_enrollment(body).await;
}

/// Registers; returns (hub, substatus, deviceId) of the answer, after checking that the
/// service API's registration state shows the same device ID.
async fn register_device_id(dps: &Dps, id: &str, token: &str) -> (Value, Value, Value) {
    let s = register_state(dps, id, token, "").await;
    let rs: Value =
        dps.service(Method::GET, &format!("/registrations/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rs["deviceId"], s["deviceId"], "{rs}");
    (s["assignedHub"].clone(), s["substatus"].clone(), s["deviceId"].clone())
}

/// An individual enrollment's `deviceId` is the device ID, kept while migrating (even when the
/// enrollment's deviceId changes) and taken from the enrollment again on a reset; without one,
/// and for group members, the device ID is the registration ID.
#[tokio::test]
async fn device_ids_across_reprovisioning() {
    let dps = Dps::start(HUBS).await;
    let (id, t) = ("dev-explicit", dps.device_token("dev-explicit", &key(1)));
    // (hub, the enrollment's deviceId, migrateDeviceData) -> (substatus, device ID)
    let steps = [
        (("hub-1.test", Some("thermostat-7"), true), ("initialAssignment", "thermostat-7")),
        (("hub-2.test", Some("thermostat-7"), true), ("deviceDataMigrated", "thermostat-7")),
        // Migrating keeps the device ID even when the enrollment names another one now.
        (("hub-3.test", Some("thermostat-8"), true), ("deviceDataMigrated", "thermostat-7")),
        // A reset takes the enrollment's.
        (("hub-3.test", Some("thermostat-8"), false), ("deviceDataReset", "thermostat-8")),
        // Without a deviceId in the enrollment, a reset makes it the registration ID.
        (("hub-1.test", None, false), ("reprovisionedToInitialAssignment", "dev-explicit")),
    ];
    for ((hub, device_id, migrate), (substatus, want)) in steps {
        enroll_device_id(&dps, hub, device_id, migrate).await;
        assert_eq!(
            register_device_id(&dps, id, &t).await,
            (json!(hub), json!(substatus), json!(want)),
            "{hub} {device_id:?} {migrate}"
        );
    }

    // A group member's device ID is its registration ID, before and after moving.
    let member = dps.device_token("member-0042", &derive(&key(5), "member-0042"));
    for (hub, substatus) in [("hub-1.test", "initialAssignment"), ("hub-2.test", "deviceDataMigrated")] {
        dps.put_group(json!({"enrollmentGroupId": "ids", "iotHubs": [hub],
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(5), "secondaryKey": key(6)}}}))
            .await;
        assert_eq!(
            register_device_id(&dps, "member-0042", &member).await,
            (json!(hub), json!(substatus), json!("member-0042"))
        );
    }
}

/// (group, (updateHubAssignment, migrateDeviceData), key seed)
const GROUPS: [(&str, (bool, bool), u8); 3] =
    [("g-never", (false, true), 10), ("g-migrate", (true, true), 20), ("g-reset", (true, false), 30)];

/// Points every group of [`GROUPS`] at one hub with a twin.
async fn point_groups(dps: &Dps, hub: &str, twin: i64) {
    for (gid, (update, migrate), seed) in GROUPS {
        dps.put_group(json!({"enrollmentGroupId": gid, "iotHubs": [hub], "initialTwin": {"tags": {"v": twin}},
            "reprovisionPolicy": {"updateHubAssignment": update, "migrateDeviceData": migrate},
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(seed), "secondaryKey": key(seed + 1)}}}))
            .await;
    }
}

/// Registers the two members of each group of [`GROUPS`]; `want[g]` is what group `g`'s
/// members get: (hub, substatus, twin).
async fn expect_members(dps: &Dps, want: [(&str, &str, i64); 3]) {
    for ((gid, _, seed), (hub, substatus, v)) in GROUPS.iter().zip(want) {
        for i in 0..2 {
            let id = format!("{gid}-m{i}");
            let token = dps.device_token(&id, &derive(&key(*seed), &id));
            assert_eq!(register(dps, &id, &token, "").await, (hub.to_string(), substatus.to_string()), "{id}");
            assert_eq!(twin(dps, &id).await, v, "{id}");
        }
    }
}

/// An enrollment group's `reprovisionPolicy` governs its members when the group's `iotHubs`
/// change: never (they stay), migrate, reset; and back to the first hub.
#[tokio::test]
async fn group_reprovision_policies() {
    let dps = Dps::start(HUBS).await;
    point_groups(&dps, "hub-1.test", 1).await;
    let initial = ("hub-1.test", "initialAssignment", 1);
    expect_members(&dps, [initial; 3]).await;
    point_groups(&dps, "hub-2.test", 2).await;
    expect_members(&dps, [initial, ("hub-2.test", "deviceDataMigrated", 1), ("hub-2.test", "deviceDataReset", 2)])
        .await;
    point_groups(&dps, "hub-1.test", 3).await;
    let home = "reprovisionedToInitialAssignment";
    expect_members(&dps, [initial, ("hub-1.test", home, 1), ("hub-1.test", home, 3)]).await;
}

/// MQTT has no `forceRegistration`: no official SDK sends one over MQTT (Node's
/// `register(forceRegistration)` adds `&forceRegistration=true` to the HTTPS URL only), and dps
/// reads neither a `forceRegistration` in the register topic's query nor one in the body: each
/// spelling is an ordinary re-registration, whose (hub, substatus) this returns.
async fn register_over_mqtt_asking_for_force(dps: &Dps, id: &str, token: &str) -> Vec<(Value, Value)> {
    let mut c = RawMqtt::tls(dps).await;
    assert_eq!(c.connect(connect_packet(dps, id, Some(token))).await, 0);
    c.subscribe().await;
    let mut got = Vec::new();
    for (n, (query, body)) in [
        ("&forceRegistration=true", json!({"registrationId": id})),
        ("", json!({"registrationId": id, "forceRegistration": true})),
        ("&forceRegistration=true", json!({"registrationId": id, "forceRegistration": true})),
    ]
    .into_iter()
    .enumerate()
    {
        let (topic, answer) =
            c.request(&format!("{REGISTER}{n}{query}"), body.to_string().as_bytes(), Some(n as u16 + 1)).await;
        assert_eq!(topic, format!("$dps/registrations/res/202/?$rid={n}"), "{answer}");
        assert_eq!(answer["status"], "assigned", "{answer}");
        let s = &answer["registrationState"];
        got.push((s["assignedHub"].clone(), s["substatus"].clone()));
    }
    got
}
