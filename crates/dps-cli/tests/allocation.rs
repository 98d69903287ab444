//! Built-in allocation through a spawned server: `geoLatency` with configured regions, and
//! how long the operations of a registration stay queryable.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::mqtt::{connect_packet, RawMqtt};
use common::{derive, key, Dps};
use serde_json::{json, Value};

const REGION_HUBS: &str = "[[hubs]]\nhost_name = \"eu-1.test\"\nregion = \"westeurope\"\n\
    [[hubs]]\nhost_name = \"eu-2.test\"\nregion = \"WestEurope\"\n\
    [[hubs]]\nhost_name = \"us-1.test\"\nregion = \"eastus\"\n\
    [[hubs]]\nhost_name = \"plain-1.test\"\n";

/// Creates a group with a policy and the hubs it names (none: every linked hub).
async fn group(dps: &Dps, gid: &str, seed: u8, policy: &str, hubs: &[&str]) {
    let mut body = json!({"enrollmentGroupId": gid, "allocationPolicy": policy,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(seed), "secondaryKey": key(seed + 1)}}});
    if !hubs.is_empty() {
        body["iotHubs"] = json!(hubs);
    }
    dps.put_group(body).await;
}

/// The hub each of `ids` is assigned to, registering through the group keyed by `seed`.
async fn hubs_of(dps: &Dps, seed: u8, ids: &[String]) -> Vec<String> {
    let mut hubs = Vec::new();
    for id in ids {
        let token = dps.device_token(id, &derive(&key(seed), id));
        let (status, _, body) = dps.register(id, Some(&token), json!({})).await;
        assert_eq!((status, &body["status"]), (202, &json!("assigned")), "{id}: {body}");
        hubs.push(body["registrationState"]["assignedHub"].as_str().unwrap().to_string());
    }
    hubs
}

fn distinct(hubs: &[String]) -> BTreeSet<&str> {
    hubs.iter().map(String::as_str).collect()
}

/// `geoLatency`: on a node with a `region`, devices go to the candidates in that region
/// (region names compared case-insensitively), spread as `hashed` spreads them over those
/// hubs; when no candidate is in the region, or the node has none, to any candidate exactly as
/// `hashed` would.
#[tokio::test]
async fn geo_latency_uses_the_hubs_of_the_node_region() {
    let ids: Vec<String> = (0..16).map(|i| format!("geo-{i:02}")).collect();
    let dps = Dps::start(&format!("region = \"westeurope\"\n{REGION_HUBS}")).await;
    group(&dps, "geo-all", 10, "geoLatency", &[]).await;
    group(&dps, "hash-eu", 20, "hashed", &["eu-1.test", "eu-2.test"]).await;
    group(&dps, "geo-away", 30, "geoLatency", &["us-1.test", "plain-1.test"]).await;
    group(&dps, "hash-away", 40, "hashed", &["us-1.test", "plain-1.test"]).await;
    let in_region = hubs_of(&dps, 10, &ids).await;
    assert_eq!(distinct(&in_region), BTreeSet::from(["eu-1.test", "eu-2.test"]), "only (and both) hubs of westeurope");
    assert_eq!(in_region, hubs_of(&dps, 20, &ids).await, "hashed among the region's hubs");
    let away = hubs_of(&dps, 30, &ids).await;
    assert_eq!(distinct(&away), BTreeSet::from(["plain-1.test", "us-1.test"]), "none in the region: any candidate");
    assert_eq!(away, hubs_of(&dps, 40, &ids).await, "by weighted hashing");

    // A node in a region without hubs, and a node without a region: hashing over all hubs.
    for region in [Some("mars"), None] {
        let top = region.map_or(String::new(), |r| format!("region = {r:?}\n"));
        let dps = Dps::start(&format!("{top}{REGION_HUBS}")).await;
        group(&dps, "geo-all", 10, "geoLatency", &[]).await;
        group(&dps, "hash-all", 50, "hashed", &[]).await;
        let anywhere = hubs_of(&dps, 10, &ids).await;
        assert!(distinct(&anywhere).iter().any(|h| !h.starts_with("eu-")), "{region:?}: {anywhere:?}");
        assert_eq!(anywhere, hubs_of(&dps, 50, &ids).await, "{region:?}");
    }
}

/// An operation can be polled (HTTPS and MQTT) until `device.operation_retention_secs` after
/// its register; after that, the poll is `404` with `404203`.
#[tokio::test]
async fn operations_expire_after_the_retention() {
    let dps = Dps::start("[device]\noperation_retention_secs = 2\n").await;
    let (id, k) = ("dev-expiring", key(7));
    dps.put_enrollment(json!({"registrationId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let token = dps.device_token(id, &k);
    let registered = Instant::now();
    let (_, _, body) = dps.register(id, Some(&token), json!({})).await;
    assert_eq!(body["status"], "assigned", "{body}");
    let op = body["operationId"].as_str().unwrap().to_string();
    let url = dps.url(&format!("/{}/registrations/{id}/operations/{op}?api-version=2019-03-31", dps.scope()));
    let poll = || async {
        let resp = dps.client.get(&url).header("Authorization", &token).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    let mut mqtt = RawMqtt::tls(&dps).await;
    assert_eq!(mqtt.connect(connect_packet(&dps, id, Some(&token))).await, 0);
    mqtt.subscribe().await;
    let mqtt_poll = format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId={op}");

    let (status, polled) = poll().await;
    assert_eq!((status, &polled["status"]), (200, &json!("assigned")), "{polled}");
    let (topic, polled) = mqtt.request(&mqtt_poll, b"", Some(1)).await;
    assert_eq!((topic.as_str(), &polled["status"]), ("$dps/registrations/res/200/?$rid=1", &json!("assigned")));
    assert!(registered.elapsed() < Duration::from_secs(2), "polled within the retention");

    tokio::time::sleep(Duration::from_secs(3).saturating_sub(registered.elapsed())).await;
    let gone = format!("operation '{op}' does not exist for registration ID '{id}' (unknown or expired)");
    let (status, err) = poll().await;
    assert_eq!((status, &err["errorCode"], &err["message"]), (404, &json!(404203), &json!(gone)), "{err}");
    let (topic, err) = mqtt.request(&mqtt_poll, b"", Some(2)).await;
    assert_eq!(topic, "$dps/registrations/res/404/?$rid=1");
    assert_eq!((&err["errorCode"], &err["message"]), (&json!(404203), &json!(gone)), "{err}");
}
