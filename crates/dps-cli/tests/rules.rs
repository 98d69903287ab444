//! Built-in allocation rule sets (`webhookUrl = "rules://<name>"`) through a spawned server.

mod common;

use common::{derive, key, Dps};
use serde_json::{json, Value};

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["modelId"],
  "properties": {"modelId": {"type": "string", "maxLength": 64}, "site": {"type": "string"}}
}"#;

fn rules_config(schema_path: &std::path::Path) -> String {
    format!(
        r#"
# Rule sets are evaluated inside the request: even with no inline wait for webhooks, the
# register answer carries the final state.
[allocation]
webhook_inline_wait_ms = 0

[[hubs]]
host_name = "hub-a.test"
[[hubs]]
host_name = "hub-b.test"
allocation_weight = 3

[[rules]]
name = "by-model"
payload_schema_file = {schema:?}

[[rules.cases]]
when = "payload.modelId.startsWith('thermo-')"
hub = "'hub-b.test'"
payload = "{{'telemetryTopic': 'thermo/' + registrationId, 'group': enrollmentGroupId, 'firstTime': currentHub == ''}}"
initial_twin = "{{'tags': {{'model': payload.modelId, 'site': has(payload.site) ? payload.site : 'unknown'}}}}"

[[rules.cases]]
when = "payload.modelId == 'rogue'"
hub = "'elsewhere.test'"

[[rules.cases]]
when = "true"
payload = "{{'hubs': linkedHubs}}"
"#,
        schema = schema_path.display().to_string()
    )
}

struct Setup {
    dps: Dps,
    group_key: String,
    _schema_dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let schema_dir = tempfile::tempdir().unwrap();
    let schema_path = schema_dir.path().join("by-model.schema.json");
    std::fs::write(&schema_path, SCHEMA).unwrap();
    let dps = Dps::start(&rules_config(&schema_path)).await;
    let group_key = key(41);
    dps.put_group(json!({"enrollmentGroupId": "models", "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": "rules://by-model", "apiVersion": "2021-10-01"},
        "initialTwin": {"tags": {"fromGroup": true}},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}}))
        .await;
    Setup { dps, group_key, _schema_dir: schema_dir }
}

impl Setup {
    async fn register(&self, id: &str, payload: Option<Value>) -> Value {
        let token = self.dps.device_token(id, &derive(&self.group_key, id));
        let mut body = json!({"registrationId": id});
        if let Some(p) = payload {
            body["payload"] = p;
        }
        let (status, _, answer) = self.dps.register(id, Some(&token), body).await;
        assert_eq!(status, 202, "{answer}");
        answer
    }
}

#[tokio::test]
async fn a_rule_set_chooses_hub_twin_and_payload() {
    let s = setup().await;
    let body = s.register("thermo-17", Some(json!({"modelId": "thermo-x2", "site": "plant-3"}))).await;
    assert_eq!(body["status"], "assigned", "{body}");
    let state = &body["registrationState"];
    assert_eq!(state["assignedHub"], "hub-b.test");
    assert_eq!(state["substatus"], "initialAssignment");
    assert_eq!(state["payload"], json!({"telemetryTopic": "thermo/thermo-17", "group": "models", "firstTime": true}));
    // The rule's initial twin replaces the group's, as a webhook's would.
    let rs: Value =
        s.dps.service(reqwest::Method::GET, "/registrations/thermo-17").send().await.unwrap().json().await.unwrap();
    assert_eq!(rs["initialTwin"], json!({"tags": {"model": "thermo-x2", "site": "plant-3"}}), "{rs}");
    assert_eq!(rs["payload"], state["payload"]);

    // Re-registration: the rule sees the current hub.
    let again = s.register("thermo-17", Some(json!({"modelId": "thermo-x2"}))).await;
    assert_eq!(again["registrationState"]["payload"]["firstTime"], false, "{again}");

    // The fall-through case hashes among the linked hubs, the same hub every time, and keeps
    // the group's twin since the case sets none.
    let first = s.register("lamp-1", Some(json!({"modelId": "lamp"}))).await;
    assert_eq!(first["status"], "assigned", "{first}");
    let hub = first["registrationState"]["assignedHub"].as_str().unwrap().to_string();
    assert!(hub == "hub-a.test" || hub == "hub-b.test", "{hub}");
    assert_eq!(first["registrationState"]["payload"], json!({"hubs": ["hub-a.test", "hub-b.test"]}));
    for _ in 0..3 {
        let again = s.register("lamp-1", Some(json!({"modelId": "lamp"}))).await;
        assert_eq!(again["registrationState"]["assignedHub"], hub.as_str());
    }
    let rs: Value =
        s.dps.service(reqwest::Method::GET, "/registrations/lamp-1").send().await.unwrap().json().await.unwrap();
    assert_eq!(rs["initialTwin"], json!({"tags": {"fromGroup": true}}), "{rs}");
}

#[tokio::test]
async fn hashing_in_a_rule_follows_the_configured_weights() {
    let s = setup().await;
    let mut on_b = 0;
    let n = 200;
    for i in 0..n {
        let body = s.register(&format!("lamp-{i}"), Some(json!({"modelId": "lamp"}))).await;
        if body["registrationState"]["assignedHub"] == "hub-b.test" {
            on_b += 1;
        }
    }
    // Weight 3 of 4: expect 150 of 200; a binomial standard deviation is about 6.
    assert!((120..=180).contains(&on_b), "{on_b} of {n} on the weight-3 hub");
}

#[tokio::test]
async fn bad_payloads_and_bad_answers_fail_with_a_reason() {
    let s = setup().await;
    for (id, payload, code, needle) in [
        ("dev-num", Some(json!({"modelId": 7})), 400003, "/modelId"),
        ("dev-none", None, 400003, "the device sent no payload"),
        ("dev-long", Some(json!({"modelId": "x".repeat(65)})), 400003, "/modelId"),
        ("dev-rogue", Some(json!({"modelId": "rogue"})), 400208, "'elsewhere.test', which is not in linkedHubs"),
    ] {
        let body = s.register(id, payload).await;
        assert_eq!(body["status"], "failed", "{id}: {body}");
        assert_eq!(body["registrationState"]["errorCode"], code, "{id}: {body}");
        let msg = body["registrationState"]["errorMessage"].as_str().unwrap();
        assert!(msg.contains(needle), "{id}: {msg}");
        if code == 400003 {
            assert!(msg.contains("by-model"), "names the rule set: {msg}");
        }
    }
    // A rule set that the config does not define is refused when the enrollment is written.
    let k = key(9);
    let resp = s
        .dps
        .service(reqwest::Method::PUT, "/enrollments/dev-unknown")
        .json(&json!({"registrationId": "dev-unknown", "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": "rules://by-modle", "apiVersion": "2021-10-01"},
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errorCode"], 400004, "{body}");
    assert!(body["message"].as_str().unwrap().contains("no rule set named 'by-modle'"), "{body}");
}

#[test]
fn broken_rules_are_refused_when_the_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (rules, needle) in [
        ("[[rules]]\nname = \"r\"\n[[rules.cases]]\nwhen = \"payload.modelId ==\"\n", "rules[0].cases[0].when"),
        ("[[rules]]\nname = \"r\"\npayload_schema_file = \"/nonexistent/s.json\"\n[[rules.cases]]\nwhen = \"true\"\n", "payload_schema_file"),
        ("[[rules]]\nname = \"r\"\n[[rules.cases]]\nwhen = \"true\"\nhub = \"'a' +\"\n", "rules[0].cases[0].hub"),
    ] {
        let path = dir.path().join("dps.toml");
        std::fs::write(&path, rules).unwrap();
        // `dps config check` says what is wrong; `dps serve` refuses to start with it, before
        // binding anything.
        for err in common::refused_config(&path, &dir.path().join("data")) {
            assert!(err.contains(needle), "{rules}: {err}");
        }
    }
}
