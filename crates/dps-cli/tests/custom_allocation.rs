//! Custom allocation against real HTTP webhooks started by the test.

mod common;

use std::time::{Duration, Instant};

use common::webhook::{self, Scripted, Webhook};
use common::{key, Dps};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

const SECRET: &str = "a-webhook-secret-of-some-length";

async fn setup() -> (Dps, Webhook) {
    let hook = webhook::start().await;
    let config = format!(
        "[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n\
         [allocation]\nwebhook_timeout_secs = 2\nwebhook_inline_wait_ms = 500\n\
         [[webhooks]]\nurl_prefix = \"http://{}/\"\nsecret = \"{SECRET}\"\n",
        hook.addr
    );
    (Dps::start(&config).await, hook)
}

async fn enroll_custom(dps: &Dps, id: &str, url: &str) -> String {
    let k = key(id.len() as u8);
    dps.put_enrollment(json!({"registrationId": id, "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
        "initialTwin": {"tags": {"fromEnrollment": true}},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    dps.device_token(id, &k)
}

#[tokio::test]
async fn webhook_round_trip_returns_its_payload_and_twin() {
    let (dps, hook) = setup().await;
    let token = enroll_custom(&dps, "dev-ok", &hook.url("/ok?code=FUNCTION-KEY")).await;
    let (status, _, body) =
        dps.register("dev-ok", Some(&token), json!({"registrationId": "dev-ok", "payload": {"modelId": "m1"}})).await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "assigned", "{body}");
    let state = &body["registrationState"];
    assert_eq!(state["assignedHub"], "hub-b.test");
    assert_eq!(state["payload"], json!({"echo": {"modelId": "m1"}, "hub": "hub-b.test"}));

    // What the webhook received: docs/protocol-notes.md §8.2, no secrets, signed.
    let got = hook.last("/ok");
    let req: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(req["individualEnrollment"]["registrationId"], "dev-ok");
    assert_eq!(req["individualEnrollment"]["attestation"], json!({"type": "symmetricKey"}), "no keys sent");
    assert_eq!(req["deviceRuntimeContext"]["registrationId"], "dev-ok");
    assert_eq!(req["deviceRuntimeContext"]["symmetricKey"], json!({}));
    assert_eq!(req["deviceRuntimeContext"]["payload"], json!({"modelId": "m1"}));
    assert!(req["deviceRuntimeContext"].get("currentIotHubHostName").is_none(), "first registration");
    assert_eq!(req["linkedHubs"], json!(["hub-a.test", "hub-b.test"]));
    let signature = got.signature.expect("signature header");
    let (t, v1) = signature.split_once(',').unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&got.body);
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(v1.strip_prefix("v1=").unwrap(), want, "signature verifies");

    // The service API shows the state; a re-registration tells the webhook the current hub.
    let rs: Value =
        dps.service(reqwest::Method::GET, "/registrations/dev-ok").send().await.unwrap().json().await.unwrap();
    assert_eq!(rs["payload"], state["payload"]);
    let (_, _, again) = dps.register("dev-ok", Some(&token), json!({})).await;
    assert_eq!(again["status"], "assigned");
    let req: Value = serde_json::from_slice(&hook.last("/ok").body).unwrap();
    assert_eq!(req["deviceRuntimeContext"]["currentIotHubHostName"], "hub-b.test");
    assert_eq!(req["deviceRuntimeContext"]["currentDeviceId"], "dev-ok");
    // "Never reprovision": the webhook is offered only the current hub.
    let k = key("dev-ok".len() as u8);
    dps.put_enrollment(json!({"registrationId": "dev-ok", "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": hook.url("/ok?code=FUNCTION-KEY"), "apiVersion": "2021-10-01"},
        "reprovisionPolicy": {"updateHubAssignment": false, "migrateDeviceData": true},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let (_, _, again) = dps.register("dev-ok", Some(&token), json!({"payload": {"modelId": "m2"}})).await;
    assert_eq!(again["registrationState"]["assignedHub"], "hub-b.test");
    let req: Value = serde_json::from_slice(&hook.last("/ok").body).unwrap();
    assert_eq!(req["linkedHubs"], json!(["hub-b.test"]));
    assert_eq!(
        again["registrationState"]["payload"]["echo"],
        json!({"modelId": "m2"}),
        "payload returned on re-registration too"
    );
    // The function key never reaches the log.
    assert!(!dps.log().contains("FUNCTION-KEY"), "{}", dps.log());

    // The old name returnData is accepted.
    let token = enroll_custom(&dps, "dev-legacy", &hook.url("/legacy-return-data")).await;
    let (_, _, body) = dps.register("dev-legacy", Some(&token), json!({})).await;
    assert_eq!(body["registrationState"]["payload"], json!({"old": true}), "{body}");
}

#[tokio::test]
async fn slow_webhook_makes_the_device_poll_without_blocking_others() {
    let (dps, hook) = setup().await;
    let slow = enroll_custom(&dps, "dev-slow", &hook.url("/slow")).await;
    let fast = enroll_custom(&dps, "dev-fast", &hook.url("/ok")).await;
    let started = Instant::now();
    let (status, headers, body) = dps.register("dev-slow", Some(&slow), json!({"payload": {"n": 1}})).await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "assigning", "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_millis(1100), "answered after the inline wait, not the webhook");
    // Another device is not held up by the slow webhook.
    let (_, _, other) = dps.register("dev-fast", Some(&fast), json!({})).await;
    assert_eq!(other["status"], "assigned");
    let op = body["operationId"].as_str().unwrap().to_string();
    let (code, polled) = dps.poll("dev-slow", &slow, &op).await;
    assert_eq!(code, 202, "still assigning: {polled}");
    assert_eq!(polled["registrationState"]["registrationId"], "dev-slow", "assigning polls carry the registration ID");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, polled) = dps.poll("dev-slow", &slow, &op).await;
    assert_eq!(code, 200, "{polled}");
    assert_eq!(polled["status"], "assigned");
    assert_eq!(polled["registrationState"]["payload"]["echo"], json!({"n": 1}));
}

/// A hanging webhook takes at most `webhook_max_in_flight_per_url` of the shared slots: another
/// group's fast webhook still answers inline.
#[tokio::test]
async fn a_hanging_webhook_leaves_slots_for_the_others() {
    let hook = webhook::start().await;
    let dps = Dps::start(
        "[[hubs]]\nhost_name = \"hub-a.test\"\n[allocation]\nwebhook_timeout_secs = 20\nwebhook_inline_wait_ms = 1000\n\
         webhook_max_in_flight = 8\nwebhook_max_in_flight_per_url = 4\n",
    )
    .await;
    let mut hanging = Vec::new();
    for i in 0..8 {
        let id = format!("dev-hang-{i}");
        let token = enroll_custom(&dps, &id, &hook.url("/never")).await;
        hanging.push((id, token));
    }
    let fast = enroll_custom(&dps, "dev-quick", &hook.url("/ok")).await;
    // Eight registrations at the hanging webhook: all answered `assigning` after the wait.
    let dps_ref = &dps;
    let answers = futures_util::future::join_all(
        hanging.iter().map(|(id, token)| async move { dps_ref.register(id, Some(token), json!({})).await.2 }),
    )
    .await;
    for a in &answers {
        assert_eq!(a["status"], "assigning", "{a}");
    }
    let calls = |path: &str| hook.received.lock().unwrap().iter().filter(|r| r.path == path).count();
    assert_eq!(calls("/never"), 4, "only 4 calls to one webhook at a time");
    // The other webhook is not queued behind them.
    let (_, _, body) = dps.register("dev-quick", Some(&fast), json!({})).await;
    assert_eq!(body["status"], "assigned", "answered inline: {body}");
}

/// dps killed while a slow webhook's device was answered `assigning`: the operation survives
/// the restart, and once the webhook timeout plus 30 s have passed a poll reports it `failed`
/// (register again) instead of `assigning` forever. Takes about 33 s.
#[tokio::test]
async fn a_server_killed_during_a_webhook_call_fails_the_operation_after_the_grace_period() {
    let (mut dps, hook) = setup().await;
    let token = enroll_custom(&dps, "dev-crash", &hook.url("/never")).await;
    let started = Instant::now();
    let (status, _, body) = dps.register("dev-crash", Some(&token), json!({})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigning")), "{body}");
    let op = body["operationId"].as_str().unwrap().to_string();
    dps.restart().await; // SIGKILL, then the same data directory
    let (code, polled) = dps.poll("dev-crash", &token, &op).await;
    assert_eq!(code, 202, "acknowledged as assigning, still assigning after the crash: {polled}");
    // webhook_timeout_secs = 2, plus 30 s.
    let grace = Duration::from_secs(32);
    tokio::time::sleep(grace.saturating_sub(started.elapsed()) + Duration::from_millis(500)).await;
    let (code, polled) = dps.poll("dev-crash", &token, &op).await;
    assert_eq!(code, 200, "{polled}");
    assert_eq!(polled["status"], "failed", "{polled}");
    assert_eq!(polled["registrationState"]["errorCode"], 400209, "{polled}");
    let message = polled["registrationState"]["errorMessage"].as_str().unwrap_or_default();
    assert!(message.contains("the server stopped while calling the webhook"), "{polled}");
}

/// A device payload may be any JSON value (`az iot device registration create --payload` sends a
/// string): the webhook gets it unchanged, and whatever JSON value it answers comes back.
#[tokio::test]
async fn any_json_payload_passes_through_unchanged() {
    let (dps, hook) = setup().await;
    let token = enroll_custom(&dps, "dev-any", &hook.url("/payload-verbatim")).await;
    let payloads =
        [json!("{\"a\":1}"), json!([1, "two", {"three": 3}]), json!(42), json!(-0.5), json!(true), json!({"o": {}})];
    for payload in payloads {
        let (status, _, body) =
            dps.register("dev-any", Some(&token), json!({"registrationId": "dev-any", "payload": payload})).await;
        assert_eq!(status, 202, "{payload}: {body}");
        assert_eq!(body["status"], "assigned", "{payload}: {body}");
        let sent: Value = serde_json::from_slice(&hook.last("/payload-verbatim").body).unwrap();
        assert_eq!(sent["deviceRuntimeContext"]["payload"], payload, "the webhook sees it as sent");
        assert_eq!(body["registrationState"]["payload"], payload, "and the device gets the webhook's value back");
    }
    // `null` stays "no payload": none in the webhook request, none in the answer.
    let (_, _, body) = dps.register("dev-any", Some(&token), json!({"payload": null})).await;
    assert_eq!(body["status"], "assigned", "{body}");
    let sent: Value = serde_json::from_slice(&hook.last("/payload-verbatim").body).unwrap();
    assert!(sent["deviceRuntimeContext"].get("payload").is_none(), "{sent}");
    assert!(body["registrationState"].get("payload").is_none(), "{body}");
    // A webhook may answer a non-object payload whatever the device sent.
    let arr_token = enroll_custom(&dps, "dev-arr", &hook.url("/payload-array")).await;
    let (_, _, body) = dps.register("dev-arr", Some(&arr_token), json!({})).await;
    assert_eq!(body["registrationState"]["payload"], json!([1, 2]), "{body}");
    // The size limit still applies to any kind of value.
    let big = json!("x".repeat(70_000));
    let (status, _, body) = dps.register("dev-any", Some(&token), json!({"payload": big})).await;
    assert_eq!((status, body["errorCode"].as_u64()), (400, Some(400003)), "{body}");
}

/// Every failure ends the registration `failed` with a code and a message naming the cause
/// class; what the webhook said goes to the log under the operation ID, and to the device only
/// with `allocation.expose_webhook_errors`.
#[tokio::test]
async fn webhook_failures_say_why() {
    let (dps, hook) = setup().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    };
    // (path, code, what the device is told, what only the operator sees)
    let cases = [
        (
            "/status-400".to_string(),
            400209,
            "the webhook answered HTTP 400",
            Some("bad model: thermostat-9 is not allowed"),
        ),
        ("/invalid-json".into(), 400209, "not a valid allocation response", Some("<html>not json</html>")),
        ("/no-hub".into(), 400208, "no iotHubHostName", None),
        (
            "/unlinked".into(),
            400208,
            "chose an IoT hub that is not linked",
            Some("'evil.test', which is not in linkedHubs"),
        ),
        ("/huge".into(), 400209, "larger than 65536 bytes", None),
        (
            format!("http://{closed}/alloc"),
            400209,
            "the webhook could not be reached",
            Some("cannot reach the webhook"),
        ),
    ];
    let mut failed = Vec::new();
    for (i, (path, code, public, detail)) in cases.iter().enumerate() {
        let id = format!("dev-fail-{i}");
        let url = if path.starts_with('/') { hook.url(path) } else { path.clone() };
        let token = enroll_custom(&dps, &id, &url).await;
        let (status, _, body) = dps.register(&id, Some(&token), json!({})).await;
        assert_eq!(status, 202, "{path}");
        assert_eq!(body["status"], "failed", "{path}: {body}");
        assert_eq!(body["registrationState"]["errorCode"], *code, "{path}: {body}");
        let msg = body["registrationState"]["errorMessage"].as_str().unwrap().to_string();
        assert!(msg.contains(public), "{path}: {msg}");
        let operation = body["operationId"].as_str().unwrap().to_string();
        if let Some(detail) = detail {
            assert!(!msg.contains(detail), "the device is not told what the webhook said: {msg}");
            assert!(msg.contains(&operation), "the message names the operation to look up: {msg}");
            failed.push((operation, *detail));
        }
    }
    let log = dps.log();
    for (operation, detail) in &failed {
        assert!(
            log.lines().any(|l| l.contains("custom allocation failed") && l.contains(operation) && l.contains(detail)),
            "the log has '{detail}' under {operation}"
        );
    }
    // A development instance shows devices the webhook's own words.
    let mut dev = Dps::start(
        "[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n[allocation]\nexpose_webhook_errors = true\n",
    )
    .await;
    for (i, (path, _, _, detail)) in cases.iter().enumerate() {
        let Some(detail) = detail else { continue };
        let id = format!("dev-open-{i}");
        let url = if path.starts_with('/') { hook.url(path) } else { path.clone() };
        let token = enroll_custom(&dev, &id, &url).await;
        let (_, _, body) = dev.register(&id, Some(&token), json!({})).await;
        let msg = body["registrationState"]["errorMessage"].as_str().unwrap();
        assert!(msg.contains(detail), "{path}: {msg}");
    }
    dev.kill9();
    // A webhook that never answers: the device polls and learns about the timeout.
    let token = enroll_custom(&dps, "dev-never", &hook.url("/never")).await;
    let (_, _, body) = dps.register("dev-never", Some(&token), json!({})).await;
    assert_eq!(body["status"], "assigning");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (code, polled) = dps.poll("dev-never", &token, body["operationId"].as_str().unwrap()).await;
    assert_eq!(code, 200, "{polled}");
    assert_eq!(polled["status"], "failed");
    assert_eq!(polled["registrationState"]["errorCode"], 400209);
    assert!(
        polled["registrationState"]["errorMessage"].as_str().unwrap().contains("did not answer within 2 s"),
        "{polled}"
    );
    // The service API shows the failure too.
    let rs: Value =
        dps.service(reqwest::Method::GET, "/registrations/dev-never").send().await.unwrap().json().await.unwrap();
    assert_eq!(rs["status"], "failed");
}

async fn registration_state(dps: &Dps, id: &str) -> Value {
    let resp = dps.service(reqwest::Method::GET, &format!("/registrations/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// A webhook that fails, then answers: the device's next registration is assigned, and the
/// registration state goes from failed to assigned. A failure after an assignment keeps the
/// current hub for the next registration (the webhook is told it, and the move is a migration).
#[tokio::test]
async fn a_registration_after_a_failed_allocation_is_assigned() {
    let hook = Scripted::start().await;
    let dps = Dps::start("[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n").await;
    let token = enroll_custom(&dps, "dev-retry", &hook.url()).await;

    hook.answer(500, json!({"message": "database down"}));
    let (status, _, body) = dps.register("dev-retry", Some(&token), json!({})).await;
    assert_eq!((status, &body["status"]), (202, &json!("failed")), "{body}");
    let op = body["operationId"].as_str().unwrap();
    let failed = json!({"errorCode": 400209, "errorMessage": format!(
        "custom allocation failed for individual enrollment 'dev-retry': the webhook answered HTTP 500 (the server log has the details under operation {op})")});
    let pick = |v: &Value| json!({"errorCode": v["errorCode"], "errorMessage": v["errorMessage"]});
    assert_eq!(pick(&body["registrationState"]), failed);
    let rs = registration_state(&dps, "dev-retry").await;
    assert_eq!(rs["status"], "failed", "{rs}");
    assert_eq!(pick(&rs), failed);
    assert!(rs.get("assignedHub").is_none() && rs.get("substatus").is_none(), "{rs}");

    hook.answer(200, json!({"iotHubHostName": "hub-a.test"}));
    let (_, _, body) = dps.register("dev-retry", Some(&token), json!({})).await;
    assert_eq!(body["status"], "assigned", "{body}");
    assert!(hook.last_request()["deviceRuntimeContext"].get("currentIotHubHostName").is_none(), "never assigned yet");
    let rs = registration_state(&dps, "dev-retry").await;
    let brief = |v: &Value| json!([v["status"], v["assignedHub"], v["substatus"], v["deviceId"], v.get("errorCode")]);
    assert_eq!(brief(&rs), json!(["assigned", "hub-a.test", "initialAssignment", "dev-retry", null]), "{rs}");
    assert_eq!(brief(&body["registrationState"]), brief(&rs));

    // An answer without a hub fails the registration; the device stays assigned to hub-a.
    hook.answer(200, json!({"payload": {"x": 1}}));
    let (_, _, body) = dps.register("dev-retry", Some(&token), json!({})).await;
    assert_eq!(body["status"], "failed", "{body}");
    let no_hub = json!({"errorCode": 400208,
        "errorMessage": "custom allocation failed: the webhook's answer has no iotHubHostName"});
    assert_eq!(pick(&body["registrationState"]), no_hub);
    let rs = registration_state(&dps, "dev-retry").await;
    assert_eq!((&rs["status"], pick(&rs)), (&json!("failed"), no_hub), "{rs}");

    hook.answer(200, json!({"iotHubHostName": "hub-b.test"}));
    let (_, _, body) = dps.register("dev-retry", Some(&token), json!({})).await;
    assert_eq!(body["status"], "assigned", "{body}");
    let context = &hook.last_request()["deviceRuntimeContext"];
    assert_eq!(
        (&context["currentIotHubHostName"], &context["currentDeviceId"]),
        (&json!("hub-a.test"), &json!("dev-retry"))
    );
    let rs = registration_state(&dps, "dev-retry").await;
    assert_eq!(brief(&rs), json!(["assigned", "hub-b.test", "deviceDataMigrated", "dev-retry", null]), "{rs}");
    assert_eq!(rs["initialTwin"], json!({"tags": {"fromEnrollment": true}}), "the twin of the first assignment, kept");
}

/// The webhook's `initialTwin` replaces the enrollment's (no merge), as the service API's
/// registration state shows; without one, the enrollment's applies. Re-registering to the
/// same hub while migrating keeps the twin of the assignment; a reset takes the webhook's.
#[tokio::test]
async fn the_webhook_initial_twin_replaces_the_enrollments() {
    let hook = Scripted::start().await;
    let dps = Dps::start("[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n").await;
    let token = enroll_custom(&dps, "dev-twin", &hook.url()).await;
    let webhook_twin = json!({"tags": {"site": "plant-7", "fromEnrollment": false},
                              "properties": {"desired": {"interval": 30, "mode": {"eco": true}}}});
    hook.answer(200, json!({"iotHubHostName": "hub-b.test", "initialTwin": webhook_twin, "payload": {"p": 1}}));
    let (_, _, body) = dps.register("dev-twin", Some(&token), json!({})).await;
    assert_eq!(body["status"], "assigned", "{body}");
    let state = &body["registrationState"];
    assert_eq!((&state["assignedHub"], &state["payload"]), (&json!("hub-b.test"), &json!({"p": 1})));
    assert!(state.get("initialTwin").is_none(), "the device is not sent the twin: {state}");
    let rs = registration_state(&dps, "dev-twin").await;
    assert_eq!(rs["initialTwin"], webhook_twin, "the webhook's twin whole, nothing of the enrollment's");

    // Same hub, migrating (the default): the twin of the assignment is kept, the new one ignored.
    hook.answer(200, json!({"iotHubHostName": "hub-b.test", "initialTwin": {"tags": {"second": true}}}));
    dps.register("dev-twin", Some(&token), json!({})).await;
    let rs = registration_state(&dps, "dev-twin").await;
    assert_eq!((&rs["substatus"], &rs["initialTwin"]), (&json!("initialAssignment"), &webhook_twin), "{rs}");
    assert!(rs.get("payload").is_none(), "no payload in this answer: {rs}");

    // A reset takes the twin from this answer; an answer without one, the enrollment's.
    let k = key("dev-twin".len() as u8);
    dps.put_enrollment(json!({"registrationId": "dev-twin", "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": hook.url(), "apiVersion": "2021-10-01"},
        "initialTwin": {"tags": {"fromEnrollment": true}},
        "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    hook.answer(200, json!({"iotHubHostName": "hub-b.test", "initialTwin": {"tags": {"third": true}}}));
    dps.register("dev-twin", Some(&token), json!({})).await;
    let rs = registration_state(&dps, "dev-twin").await;
    assert_eq!((&rs["substatus"], &rs["initialTwin"]), (&json!("deviceDataReset"), &json!({"tags": {"third": true}})));
    hook.answer(200, json!({"iotHubHostName": "hub-a.test", "initialTwin": null}));
    dps.register("dev-twin", Some(&token), json!({})).await;
    let rs = registration_state(&dps, "dev-twin").await;
    assert_eq!((&rs["assignedHub"], &rs["substatus"]), (&json!("hub-a.test"), &json!("deviceDataReset")), "{rs}");
    assert_eq!(rs["initialTwin"], json!({"tags": {"fromEnrollment": true}}), "null means none: the enrollment's");
}
