//! The custom allocation webhook client against a scripted webhook: non-2xx answers,
//! redirects, the cap on calls in flight, and signatures scoped by `[[webhooks]]` URL prefix
//! (docs/allocation.md, "Custom allocation webhooks").

mod common;

use std::time::{Duration, Instant};

use common::webhook::{Answer, Call, Scripted};
use common::{key, now, Dps};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

const HUB: &str = "[[hubs]]\nhost_name = \"hub-a.test\"\n";

async fn enroll_custom(dps: &Dps, id: &str, url: &str) -> String {
    let k = key(id.len() as u8);
    dps.put_enrollment(json!({"registrationId": id, "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    dps.device_token(id, &k)
}

/// Polls the operation until it is no longer `assigning` (202), at most 10 s.
async fn poll_until_done(dps: &Dps, id: &str, token: &str, operation: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = dps.poll(id, token, operation).await;
        if code != 202 {
            assert_eq!(code, 200, "{id}: {body}");
            return body;
        }
        assert_eq!(body["status"], "assigning", "{id}: {body}");
        assert!(Instant::now() < deadline, "{id} still assigning after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn registration_state(dps: &Dps, id: &str) -> Value {
    let resp = dps.service(reqwest::Method::GET, &format!("/registrations/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{id}");
    resp.json().await.unwrap()
}

fn error_of(state: &Value) -> Value {
    json!({"errorCode": state["errorCode"], "errorMessage": state["errorMessage"]})
}

/// Registers `id` and checks that it failed with 400209 and `public` (the device's message
/// without the log pointer), in the device's answer and in the service API's registration
/// state; returns the operation ID.
async fn register_fails(dps: &Dps, id: &str, token: &str, public: &str) -> String {
    let (code, _, body) = dps.register(id, Some(token), json!({})).await;
    assert_eq!((code, &body["status"]), (202, &json!("failed")), "{id}: {body}");
    let op = body["operationId"].as_str().unwrap().to_string();
    let want = json!({"errorCode": 400209, "errorMessage": format!(
        "custom allocation failed for individual enrollment '{id}': {public} (the server log has the details under operation {op})")});
    assert_eq!(error_of(&body["registrationState"]), want, "{id}");
    let rs = registration_state(dps, id).await;
    assert_eq!(rs["status"], "failed", "{rs}");
    assert_eq!(error_of(&rs), want, "{rs}");
    assert!(rs.get("assignedHub").is_none(), "{rs}");
    op
}

/// Any non-2xx answer — a 5xx, a 503 with `Retry-After`, a 404, a 401 — ends the
/// registration `failed` (400209) naming the status, after exactly one call: no retry. The
/// webhook's body goes to the log under the operation, not to the device.
#[tokio::test]
async fn non_2xx_answers_fail_once_without_retry() {
    let hook = Scripted::start().await;
    let dps = Dps::start(HUB).await;
    let answers = [
        (500, Answer::text(500, "db-7.corp.internal is down")),
        (503, Answer::text(503, "overloaded, come back later").header("Retry-After", "1")),
        (404, Answer::text(404, "no function /status-404 here")),
        (401, Answer::text(401, "missing function key").header("WWW-Authenticate", "Bearer")),
    ];
    let mut failed = Vec::new();
    for (status, answer) in answers {
        let path = format!("/status-{status}");
        let said = String::from_utf8(answer.body.clone()).unwrap();
        // A standing answer: a retry would get the same status and show up as a second call.
        hook.always(&path, answer);
        let id = format!("dev-http-{status}");
        let token = enroll_custom(&dps, &id, &hook.url_at(&path)).await;
        let op = register_fails(&dps, &id, &token, &format!("the webhook answered HTTP {status}")).await;
        assert_eq!(hook.calls_to(&path).len(), 1, "one call for one registration ({path})");
        failed.push((op, format!("the webhook answered HTTP {status}: {said}")));
    }
    assert_eq!(hook.calls().len(), 4, "no call besides the four");
    let log = dps.log();
    for (op, detail) in &failed {
        assert!(
            log.lines().any(|l| l.contains("custom allocation failed") && l.contains(op) && l.contains(detail)),
            "the log has '{detail}' under {op}"
        );
    }
}

/// A 3xx is an answer, not a pointer: with a `Location` (relative or absolute) to another
/// path of the same server — one that would assign the device — the registration fails naming
/// the status, and the redirect target gets no request.
#[tokio::test]
async fn redirects_are_not_followed() {
    let hook = Scripted::start().await;
    let dps = Dps::start(HUB).await;
    hook.always("/hub", Answer::json(200, json!({"iotHubHostName": "hub-a.test"})));
    // The target is a working webhook: called directly, it assigns.
    let token = enroll_custom(&dps, "dev-direct", &hook.url_at("/hub")).await;
    let (_, _, body) = dps.register("dev-direct", Some(&token), json!({})).await;
    assert_eq!(
        (&body["status"], &body["registrationState"]["assignedHub"]),
        (&json!("assigned"), &json!("hub-a.test"))
    );
    assert_eq!(hook.calls_to("/hub").len(), 1);

    let absolute = hook.url_at("/hub");
    for (status, location) in
        [(301, "/hub"), (302, absolute.as_str()), (303, "/hub"), (307, absolute.as_str()), (308, "/hub")]
    {
        let path = format!("/moved-{status}");
        hook.always(&path, Answer::json(status, json!({"moved": true})).header("Location", location));
        let id = format!("dev-redirect-{status}");
        let token = enroll_custom(&dps, &id, &hook.url_at(&path)).await;
        register_fails(&dps, &id, &token, &format!("the webhook answered HTTP {status}")).await;
        assert_eq!(hook.calls_to(&path).len(), 1, "{path}");
        assert_eq!(hook.calls_to("/hub").len(), 1, "the {status} to {location} was not followed");
    }
    assert_eq!(hook.calls().len(), 6);
}

/// `webhook_max_in_flight = 2` with five registrations at five webhooks (so the per-URL cap
/// is not what limits) that answer only when the test says so: the calls over the cap wait for
/// a slot (they are neither refused nor failed), their devices get `assigning` after the inline
/// wait like any slow webhook's, the webhook never has more than two calls open, and when it
/// answers every registration is assigned with its own answer.
#[tokio::test]
async fn calls_over_the_in_flight_cap_wait_for_a_slot() {
    const CAP: usize = 2;
    const DEVICES: usize = 5;
    let hook = Scripted::start().await;
    let dps = Dps::start(&format!(
        "{HUB}[allocation]\nwebhook_max_in_flight = {CAP}\nwebhook_max_in_flight_per_url = {CAP}\n\
         webhook_inline_wait_ms = 500\nwebhook_timeout_secs = 20\n"
    ))
    .await;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let path = format!("/slot-{i}");
        hook.always(&path, Answer::json(200, json!({"iotHubHostName": "hub-a.test", "payload": {"i": i}})).held());
        let id = format!("dev-slot-{i}");
        let token = enroll_custom(&dps, &id, &hook.url_at(&path)).await;
        devices.push((id, token, path));
    }
    let dps_ref = &dps;
    let answers = futures_util::future::join_all(
        devices.iter().map(|(id, token, _)| async move { dps_ref.register(id, Some(token), json!({})).await }),
    )
    .await;
    let mut operations = Vec::new();
    for ((id, ..), (code, headers, body)) in devices.iter().zip(&answers) {
        assert_eq!((*code, &body["status"]), (202, &json!("assigning")), "{id}: {body}");
        assert!(headers.contains_key("retry-after"), "{id}");
        operations.push(body["operationId"].as_str().unwrap().to_string());
    }
    // Every device has had its answer (after the 500 ms inline wait); the webhook holds its
    // answers, so only the calls holding a slot can have reached it.
    hook.wait_until("two calls are open", |h| h.open() >= CAP).await;
    assert_eq!(hook.calls().len(), CAP, "calls over the cap wait in dps: {:?}", paths(&hook.calls()));
    assert_eq!(hook.max_open(), CAP);
    for ((id, token, _), op) in devices.iter().zip(&operations) {
        let (code, polled) = dps.poll(id, token, op).await;
        assert_eq!((code, &polled["status"]), (202, &json!("assigning")), "{id}: {polled}");
    }

    hook.release();
    for (i, ((id, token, path), op)) in devices.iter().zip(&operations).enumerate() {
        let polled = poll_until_done(&dps, id, token, op).await;
        assert_eq!(polled["status"], "assigned", "{id}: {polled}");
        let state = &polled["registrationState"];
        assert_eq!((&state["assignedHub"], &state["payload"]), (&json!("hub-a.test"), &json!({"i": i})), "{id}");
        let rs = registration_state(&dps, id).await;
        assert_eq!((&rs["status"], &rs["assignedHub"]), (&json!("assigned"), &json!("hub-a.test")), "{rs}");
        assert_eq!(hook.calls_to(path).len(), 1, "{path}");
    }
    assert_eq!(hook.calls().len(), DEVICES);
    assert_eq!(hook.max_open(), CAP, "never more than {CAP} calls open at once");
}

/// The wait for a slot counts against `webhook_timeout_secs` (the whole call is bounded): with
/// one slot held by a webhook that never answers, a second call fails as a timeout one timeout
/// after its registration, not after waiting for the slot and then a timeout of its own.
#[tokio::test]
async fn the_wait_for_a_slot_is_part_of_the_timeout() {
    let hook = Scripted::start().await;
    let dps = Dps::start(&format!(
        "{HUB}[allocation]\nwebhook_max_in_flight = 1\nwebhook_max_in_flight_per_url = 1\n\
         webhook_inline_wait_ms = 5000\nwebhook_timeout_secs = 1\n"
    ))
    .await;
    hook.always("/hold-a", Answer::json(200, json!({"iotHubHostName": "hub-a.test"})).held());
    hook.always("/hold-b", Answer::json(200, json!({"iotHubHostName": "hub-a.test"})).held());
    let token_a = enroll_custom(&dps, "dev-hold-a", &hook.url_at("/hold-a")).await;
    let token_b = enroll_custom(&dps, "dev-hold-b", &hook.url_at("/hold-b")).await;
    let timed_out = |id: &str| {
        json!({"errorCode": 400209, "errorMessage": format!(
            "custom allocation failed for individual enrollment '{id}': the webhook did not answer within 1 s")})
    };

    let first = dps.register("dev-hold-a", Some(&token_a), json!({}));
    let second = async {
        hook.wait_until("the first call holds the slot", |h| h.calls_to("/hold-a").len() == 1).await;
        let started = Instant::now();
        let answer = dps.register("dev-hold-b", Some(&token_b), json!({})).await;
        (answer, started.elapsed())
    };
    let ((_, _, a), ((_, _, b), b_took)) = tokio::join!(first, second);
    assert_eq!(a["status"], "failed", "{a}");
    assert_eq!(error_of(&a["registrationState"]), timed_out("dev-hold-a"));
    assert_eq!(b["status"], "failed", "{b}");
    assert_eq!(error_of(&b["registrationState"]), timed_out("dev-hold-b"), "a timeout, not a refusal");
    assert!(b_took >= Duration::from_secs(1), "{b_took:?}");
    assert!(b_took < Duration::from_millis(1600), "one timeout from the registration, the wait included: {b_took:?}");
    let rs = registration_state(&dps, "dev-hold-b").await;
    assert_eq!((&rs["status"], error_of(&rs)), (&json!("failed"), timed_out("dev-hold-b")), "{rs}");
}

fn paths(calls: &[Call]) -> Vec<&str> {
    calls.iter().map(|c| c.path.as_str()).collect()
}

fn hmac_hex(secret: &str, t: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks `x-dps-signature` as docs/allocation.md verifies it: `t=<unix seconds>,v1=<hex>`,
/// the hex being HMAC-SHA256(secret, "<t>." + the raw body), `t` within 300 s of now; and
/// that no other secret of the config produced it.
fn verify_signature(call: &Call, secret: &str, others: &[&str]) {
    let signatures: Vec<&str> =
        call.headers.iter().filter(|(n, _)| n == "x-dps-signature").map(|(_, v)| v.as_str()).collect();
    assert_eq!(signatures.len(), 1, "{}: one x-dps-signature header: {:?}", call.path, call.headers);
    let parts: Vec<(&str, &str)> = signatures[0].split(',').map(|kv| kv.split_once('=').unwrap()).collect();
    let [("t", t), ("v1", v1)] = parts[..] else { panic!("{}: {}", call.path, signatures[0]) };
    let age = now().abs_diff(t.parse::<u64>().unwrap());
    assert!(age < 300, "{}: t={t} is {age} s from now", call.path);
    assert_eq!(v1, hmac_hex(secret, t, &call.body), "{}: signed with {secret}", call.path);
    for other in others.iter().filter(|o| **o != secret) {
        assert_ne!(v1, hmac_hex(other, t, &call.body), "{}: not signed with {other}", call.path);
    }
}

/// `[[webhooks]]` secrets apply by URL prefix: a URL under prefix A is signed with A's
/// secret, under B with B's, under none unsigned. When prefixes nest, the longest match
/// applies (whichever is listed first), and applies whole: a longer entry without a secret
/// means no signature, even under a shorter prefix that has one.
#[tokio::test]
async fn signatures_are_scoped_by_url_prefix() {
    const A: &str = "secret-of-prefix-a-0123456789";
    const A_INNER: &str = "secret-of-prefix-a-inner-0123";
    const B_X: &str = "secret-of-prefix-b-x-01234567";
    const B: &str = "secret-of-prefix-b-0123456789";
    const D: &str = "secret-of-prefix-d-0123456789";
    let hook = Scripted::start().await;
    let base = format!("http://{}", hook.addr);
    let dps = Dps::start(&format!(
        "{HUB}\
         [[webhooks]]\nurl_prefix = \"{base}/a/\"\nsecret = \"{A}\"\n\
         [[webhooks]]\nurl_prefix = \"{base}/a/inner/\"\nsecret = \"{A_INNER}\"\n\
         [[webhooks]]\nurl_prefix = \"{base}/a/open/\"\n\
         [[webhooks]]\nurl_prefix = \"{base}/b/x/\"\nsecret = \"{B_X}\"\n\
         [[webhooks]]\nurl_prefix = \"{base}/b/\"\nsecret = \"{B}\"\n\
         [[webhooks]]\nurl_prefix = \"{base}/d\"\nsecret = \"{D}\"\n"
    ))
    .await;
    let all = [A, A_INNER, B_X, B, D];
    // (the path in the enrollment's webhookUrl, the path the call goes to, the secret)
    let cases = [
        ("/a/alloc", "/a/alloc", Some(A)),
        ("/a/inner/alloc", "/a/inner/alloc", Some(A_INNER)), // the longer prefix is listed after the shorter
        ("/a/open/alloc", "/a/open/alloc", None),            // the longest match has no secret
        ("/b/x/alloc", "/b/x/alloc", Some(B_X)),             // the longer prefix is listed before the shorter
        ("/b/alloc", "/b/alloc", Some(B)),
        ("/c/alloc", "/c/alloc", None), // under no prefix
        // Judged by where the call goes, not by how the URL is spelled.
        ("/a/../c/dotted", "/c/dotted", None),
        ("/a/%2e%2e/c/encoded", "/c/encoded", None),
        ("/c/../a/back", "/a/back", Some(A)),
        // A prefix without a trailing slash ends at a path segment.
        ("/d/alloc", "/d/alloc", Some(D)),
        ("/d?x=1", "/d", Some(D)),
        ("/dd/alloc", "/dd/alloc", None),
    ];
    for (i, (spelled, path, secret)) in cases.into_iter().enumerate() {
        hook.always(path, Answer::json(200, json!({"iotHubHostName": "hub-a.test"})));
        let id = format!("dev-sig-{i}");
        let token = enroll_custom(&dps, &id, &hook.url_at(spelled)).await;
        let (_, _, body) =
            dps.register(&id, Some(&token), json!({"registrationId": id, "payload": {"path": path}})).await;
        assert_eq!(body["status"], "assigned", "{path}: {body}");
        let calls = hook.calls_to(path);
        assert_eq!(calls.len(), 1, "{path}");
        let call = &calls[0];
        assert_eq!(call.header("content-type"), Some("application/json"), "{path}");
        assert_eq!(call.json()["deviceRuntimeContext"]["payload"], json!({"path": path}), "the body is the request");
        match secret {
            Some(secret) => verify_signature(call, secret, &all),
            None => assert_eq!(call.header("x-dps-signature"), None, "{path}: unsigned"),
        }
    }
}
