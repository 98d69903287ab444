//! Re-registration per `reprovisionPolicy` (protocol.md §10.3), every combination, through a
//! spawned server.

mod common;

use common::{key, Dps};
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

async fn register(dps: &Dps, id: &str, token: &str, query: &str) -> (String, String) {
    let (status, _, body) = dps.register_with_query(id, Some(token), json!({}), query).await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "assigned", "{body}");
    let s = &body["registrationState"];
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
        // forceRegistration: a fresh (initial) assignment.
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
