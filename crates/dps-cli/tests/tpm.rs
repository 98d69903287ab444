//! TPM attestation over HTTPS against a spawned dps (docs/protocol-notes.md §3.9, §6): the
//! challenge, the proof, the key in the assigned answer, the challenge state across a restart
//! and a new challenge, and bad input. The device side is a software TPM
//! (`dps_core::tpm::software`) that checks every integrity value as a TPM does; that a real
//! TPM accepts the blob is shown by `crates/dps-core/tests/tpm_swtpm.rs` (swtpm) and by the
//! official Node TPM client in the compat suite.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::webhook::{self, Webhook};
use common::Dps;
use dps_core::tpm::software::SoftwareTpm;
use dps_proto::tpm::{PublicParams, TpmPublic};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

const HUBS: &str = "[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n";

fn tpm(seed: u64) -> SoftwareTpm {
    SoftwareTpm::generate(&mut StdRng::seed_from_u64(seed)).unwrap()
}

fn b64(public: &TpmPublic) -> String {
    BASE64.encode(public.marshal_tpm2b().unwrap())
}

fn ek(t: &SoftwareTpm) -> String {
    b64(t.endorsement_key())
}

fn srk(t: &SoftwareTpm) -> String {
    b64(t.storage_root_key())
}

/// The body of a TPM device's first register request.
fn first_leg(id: &str, t: &SoftwareTpm) -> Value {
    json!({"registrationId": id, "tpm": {"endorsementKey": ek(t), "storageRootKey": srk(t)}})
}

async fn enroll(dps: &Dps, id: &str, t: &SoftwareTpm, extra: Value) -> Value {
    let mut body = json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek(t)}}});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    dps.put_enrollment(body).await
}

/// Asks for a challenge; returns the key the software TPM imports from it.
async fn challenge(dps: &Dps, id: &str, t: &SoftwareTpm) -> Vec<u8> {
    let (status, headers, body) = dps.register(id, None, first_leg(id, t)).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.get("status").is_none(), "a challenge has no status (the C SDK relies on it): {body}");
    assert_eq!(body["keyName"], "registration", "{body}");
    assert!(headers.get("retry-after").is_none());
    assert!(headers.get("x-ms-error-code").is_none() && body.get("errorCode").is_none(), "not an error: {body}");
    let blob = BASE64.decode(body["authenticationKey"].as_str().expect("authenticationKey")).unwrap();
    t.import(&blob).expect("the blob opens with the device's TPM")
}

fn token(dps: &Dps, id: &str, key: &[u8]) -> String {
    dps.device_token(id, &BASE64.encode(key))
}

#[tokio::test]
async fn a_tpm_device_registers_through_the_challenge_with_its_payload() {
    let hook: Webhook = webhook::start().await;
    let dps = Dps::start(&format!(
        "{HUBS}[allocation]\nwebhook_inline_wait_ms = 3000\n[[webhooks]]\nurl_prefix = \"http://{}/\"\n",
        hook.addr
    ))
    .await;
    let t = tpm(1);
    let id = "tpm-device-1";
    let stored = enroll(
        &dps,
        id,
        &t,
        json!({"allocationPolicy": "custom",
               "customAllocationDefinition": {"webhookUrl": hook.url("/ok"), "apiVersion": "2021-10-01"}}),
    )
    .await;
    assert_eq!(stored["attestation"]["type"], "tpm");
    assert_eq!(stored["attestation"]["tpm"]["endorsementKey"], ek(&t));

    let key = challenge(&dps, id, &t).await;
    let token = token(&dps, id, &key);
    // The proof: IoT Edge sends it without the `tpm` object, the SDKs with it; both count.
    let payload = json!({"modelId": "dtmi:contoso:thermostat;1", "n": 7});
    let (status, _, body) = dps.register(id, Some(&token), json!({"registrationId": id, "payload": payload})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "assigned", "{body}");
    let state = &body["registrationState"];
    assert_eq!(state["assignedHub"], "hub-b.test", "the webhook picks the last hub: {body}");
    assert_eq!(state["payload"]["echo"], payload, "{body}");
    // The assigned answer carries the key again: the same one, the device's hub key.
    let again = BASE64.decode(state["tpm"]["authenticationKey"].as_str().expect("tpm.authenticationKey")).unwrap();
    assert_eq!(t.import(&again).unwrap(), key);
    // The webhook saw a TPM device, not its keys.
    let sent: Value = serde_json::from_slice(&hook.last("/ok").body).unwrap();
    assert_eq!(sent["deviceRuntimeContext"]["tpm"], json!({}), "{sent}");
    assert_eq!(sent["deviceRuntimeContext"]["payload"], payload);
    assert!(!sent.to_string().contains(&BASE64.encode(&key)), "the hub key never goes to the webhook");

    // Polls and the status lookup carry the same token.
    let op = body["operationId"].as_str().unwrap();
    let (status, polled) = dps.poll(id, &token, op).await;
    assert_eq!((status, &polled["status"]), (200, &json!("assigned")), "{polled}");
    assert_eq!(polled["registrationState"]["tpm"], state["tpm"]);
    // The service API's view holds no key.
    let resp = dps.service(reqwest::Method::GET, &format!("/registrations/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let record: Value = resp.json().await.unwrap();
    assert_eq!(record["status"], "assigned");
    assert!(record.get("tpm").is_none(), "{record}");
    assert!(!record.to_string().contains(&BASE64.encode(&key)));
    // The SDKs resend the `tpm` object with the token: the same outcome.
    let (status, _, body) = dps.register(id, Some(&token), first_leg(id, &t)).await;
    assert_eq!((status, &body["status"]), (202, &json!("assigned")), "{body}");
}

#[tokio::test]
async fn a_new_challenge_replaces_the_key_and_a_restart_keeps_it() {
    let mut dps = Dps::start(HUBS).await;
    let t = tpm(2);
    let id = "tpm-device-2";
    enroll(&dps, id, &t, json!({})).await;
    let first = challenge(&dps, id, &t).await;
    let second = challenge(&dps, id, &t).await;
    assert_ne!(first, second, "every challenge draws a fresh key");
    let (status, _, body) = dps.register(id, Some(&token(&dps, id, &first)), json!({})).await;
    assert_eq!(status, 401, "the replaced key no longer counts: {body}");
    assert_eq!(body["errorCode"], 401002);

    // Between the 401 and the proof, the server restarts: the challenge is in the store.
    dps.restart().await;
    let (status, _, body) = dps.register(id, Some(&token(&dps, id, &second)), json!({})).await;
    assert_eq!((status, &body["status"]), (202, &json!("assigned")), "{body}");
    let hub_key = BASE64.decode(body["registrationState"]["tpm"]["authenticationKey"].as_str().unwrap()).unwrap();
    assert_eq!(t.import(&hub_key).unwrap(), second);

    // An operator who changes the enrollment's EK revokes the keys issued for the old one.
    let other = tpm(3);
    let current: Value =
        dps.service(reqwest::Method::GET, &format!("/enrollments/{id}")).send().await.unwrap().json().await.unwrap();
    let mut changed = current.clone();
    changed["attestation"]["tpm"]["endorsementKey"] = json!(ek(&other));
    let resp = dps
        .service(reqwest::Method::PUT, &format!("/enrollments/{id}"))
        .header("If-Match", current["etag"].as_str().unwrap())
        .json(&changed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _, body) = dps.register(id, Some(&token(&dps, id, &second)), json!({})).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = dps.register(id, None, first_leg(id, &t)).await;
    assert_eq!(status, 401, "the old TPM gets no challenge any more: {body}");
    assert!(body.get("authenticationKey").is_none());
    challenge(&dps, id, &other).await;
}

/// `POST /{scope}/registrations/{id}`: the device's own view of its registration.
async fn status_lookup(dps: &Dps, id: &str, token: &str) -> (u16, Value) {
    let url = dps.url(&format!("/{}/registrations/{id}?api-version=2019-03-31", dps.scope()));
    let resp = dps.client.post(url).header("Authorization", token).json(&json!({"registrationId": id})).send().await;
    let resp = resp.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn the_blob_is_stored_once_and_every_assigned_answer_carries_it() {
    use dps_core::store::{Collection, Store as _};

    let mut dps = Dps::start(HUBS).await;
    let t = tpm(4);
    let id = "tpm-device-4";
    enroll(&dps, id, &t, json!({})).await;
    let key = challenge(&dps, id, &t).await;
    let token = token(&dps, id, &key);
    let (status, _, body) = dps.register(id, Some(&token), json!({"registrationId": id})).await;
    assert_eq!((status, &body["status"]), (202, &json!("assigned")), "{body}");
    let tpm_answer = body["registrationState"]["tpm"].clone();
    let blob = tpm_answer["authenticationKey"].as_str().expect("tpm.authenticationKey").to_string();
    let op = body["operationId"].as_str().unwrap().to_string();

    // Neither the poll nor the status lookup finds the blob in its own record: both put it
    // back from the challenge record, across a restart too.
    for round in ["before a restart", "after a restart"] {
        let (status, polled) = dps.poll(id, &token, &op).await;
        assert_eq!((status, &polled["registrationState"]["tpm"]), (200, &tpm_answer), "{round}: {polled}");
        let (status, state) = status_lookup(&dps, id, &token).await;
        assert_eq!((status, &state["status"]), (200, &json!("assigned")), "{round}: {state}");
        assert_eq!(state["tpm"], tpm_answer, "{round}: {state}");
        dps.restart().await;
    }

    // A new challenge replaces the key: the old assignment's answer no longer has a blob to
    // give (its key stopped counting), so it goes without one rather than with the new key's.
    let newer = challenge(&dps, id, &t).await;
    let newer_token = self::token(&dps, id, &newer);
    let (status, polled) = dps.poll(id, &newer_token, &op).await;
    assert_eq!((status, &polled["status"]), (200, &json!("assigned")), "{polled}");
    assert!(polled["registrationState"].get("tpm").is_none(), "{polled}");
    let (status, state) = status_lookup(&dps, id, &newer_token).await;
    assert_eq!(status, 200, "{state}");
    assert!(state.get("tpm").is_none(), "{state}");
    let (status, _) = dps.poll(id, &token, &op).await;
    assert_eq!(status, 401, "the replaced key no longer counts");

    // In the store, the blob is in the challenge record only; the registration keeps the
    // key (the device's hub key), the operation names it by a digest.
    assert!(dps.terminate(Duration::from_secs(20)).success());
    let store = dps_store::SqliteStore::open(&dps.data_dir().join("dps.sqlite"), dps_store::Synchronous::Full).unwrap();
    let registration = store.get(Collection::Registrations, id).await.unwrap().expect("registration record");
    let operation = store.get(Collection::Operations, &op).await.unwrap().expect("operation record");
    let challenge = store.get(Collection::TpmChallenges, id).await.unwrap().expect("challenge record");
    assert!(!registration.body.contains(&blob) && !registration.body.contains("authenticationKey"));
    assert!(registration.body.contains(&BASE64.encode(&key)), "the hub key stays: {}", registration.body);
    assert!(!operation.body.contains(&blob) && !operation.body.contains("authenticationKey"), "{}", operation.body);
    assert!(operation.body.contains("tpmKeyDigest"), "{}", operation.body);
    assert!(challenge.body.contains("authenticationKey"), "the newest challenge keeps its blob");
}

#[tokio::test]
async fn a_challenge_expires() {
    let dps = Dps::start(&format!("{HUBS}[device]\ntpm_challenge_secs = 1\n")).await;
    let t = tpm(4);
    let id = "tpm-device-expiring";
    enroll(&dps, id, &t, json!({})).await;
    let key = challenge(&dps, id, &t).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, _, body) = dps.register(id, Some(&token(&dps, id, &key)), json!({})).await;
    assert_eq!(status, 401, "{body}");
}

/// The endorsement key is compared as an RSA key, not as text: an enrollment whose EK spells
/// the default exponent out (65537 instead of 0) and carries another authPolicy is the same
/// key as the one the device sends, for the challenge and for the proof. After the
/// enrollment's EK is changed to another TPM's, the issued key stops counting.
#[tokio::test]
async fn the_endorsement_key_is_compared_as_a_key_not_as_text() {
    let dps = Dps::start(HUBS).await;
    let t = tpm(12);
    let id = "tpm-device-spelled-otherwise";
    let mut spelled = t.endorsement_key().clone();
    if let PublicParams::Rsa(rsa) = &mut spelled.params {
        assert_eq!(rsa.exponent, 0);
        rsa.exponent = 65537;
    }
    spelled.auth_policy = vec![0x5a; 32];
    assert_ne!(b64(&spelled), ek(&t));
    let body = json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": b64(&spelled)}}});
    let stored = dps.put_enrollment(body.clone()).await;
    let key = challenge(&dps, id, &t).await;
    let (status, _, answer) = dps.register(id, Some(&token(&dps, id, &key)), json!({})).await;
    assert_eq!((status, &answer["status"]), (202, &json!("assigned")), "{answer}");

    // The enrollment now names another TPM: the key issued for this one no longer counts.
    let mut changed = body;
    changed["attestation"]["tpm"]["endorsementKey"] = json!(ek(&tpm(13)));
    changed["etag"] = stored["etag"].clone();
    dps.put_enrollment(changed).await;
    let (status, _, answer) = dps.register(id, Some(&token(&dps, id, &key)), json!({})).await;
    assert_eq!(status, 401, "{answer}");
}

#[tokio::test]
async fn a_disabled_tpm_enrollment_answers_disabled_after_the_proof() {
    let dps = Dps::start(HUBS).await;
    let t = tpm(5);
    let id = "tpm-device-disabled";
    enroll(&dps, id, &t, json!({"provisioningStatus": "disabled"})).await;
    let key = challenge(&dps, id, &t).await;
    let (status, _, body) = dps.register(id, Some(&token(&dps, id, &key)), json!({})).await;
    assert_eq!((status, &body["status"]), (202, &json!("disabled")), "{body}");
    assert!(body["registrationState"].get("tpm").is_none(), "{body}");
    // A group's derived key for the same ID: the disabled individual enrollment revokes the
    // member (docs/protocol-notes.md §10.1) with the same `disabled`, not a TPM refusal.
    let group_key = common::key(21);
    dps.put_group(json!({"enrollmentGroupId": "tpm-test-group", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}}))
        .await;
    let member_key = dps_proto::sas::derive_device_key(&BASE64.decode(&group_key).unwrap(), id);
    let (status, _, body) = dps.register(id, Some(&token(&dps, id, &member_key)), json!({})).await;
    assert_eq!((status, &body["status"]), (202, &json!("disabled")), "{body}");
}

#[tokio::test]
async fn an_unknown_endorsement_key_tells_nothing_about_the_id() {
    let dps = Dps::start(HUBS).await;
    let (enrolled, stranger) = (tpm(6), tpm(7));
    enroll(&dps, "tpm-known", &enrolled, json!({})).await;
    let (s1, _, wrong_ek) = dps.register("tpm-known", None, first_leg("tpm-known", &stranger)).await;
    let (s2, _, unknown_id) = dps.register("tpm-unknown", None, first_leg("tpm-unknown", &stranger)).await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(wrong_ek["errorCode"], unknown_id["errorCode"]);
    assert_eq!(
        wrong_ek["message"].as_str().unwrap().replace("tpm-known", "ID"),
        unknown_id["message"].as_str().unwrap().replace("tpm-unknown", "ID"),
    );
    assert!(wrong_ek.get("authenticationKey").is_none());
    // A symmetric-key enrollment of the same ID does not answer for a TPM either.
    let k = common::key(9);
    dps.put_enrollment(json!({"registrationId": "tpm-sym", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let (status, _, body) = dps.register("tpm-sym", None, first_leg("tpm-sym", &enrolled)).await;
    assert_eq!(status, 401, "{body}");
    // A token signed with a key of one's own choosing is no proof.
    let (status, _, body) = dps.register("tpm-known", Some(&token(&dps, "tpm-known", &[7; 32])), json!({})).await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn bad_tpm_input_gets_a_400_that_names_the_field() {
    let dps = Dps::start(HUBS).await;
    let t = tpm(8);
    let id = "tpm-bad-input";
    enroll(&dps, id, &t, json!({})).await;
    let register = |body: Value| {
        let dps = &dps;
        async move {
            let (status, _, body) = dps.register(id, None, body).await;
            (status, body["errorCode"].clone(), body["message"].as_str().unwrap_or_default().to_string())
        }
    };
    let raw = t.endorsement_key().marshal_tpm2b().unwrap();
    let cases = [
        (
            "not base64",
            json!({"endorsementKey": "***", "storageRootKey": srk(&t)}),
            "tpm.endorsementKey is not valid base64",
        ),
        (
            "truncated",
            json!({"endorsementKey": BASE64.encode(&raw[..100]), "storageRootKey": srk(&t)}),
            "tpm.endorsementKey is not a marshalled TPM2B_PUBLIC",
        ),
        (
            "trailing bytes",
            json!({"endorsementKey": BASE64.encode([&raw[..], &[0]].concat()), "storageRootKey": srk(&t)}),
            "tpm.endorsementKey is not a marshalled TPM2B_PUBLIC",
        ),
        ("no SRK", json!({"endorsementKey": ek(&t)}), "tpm.storageRootKey is missing"),
        (
            "a signing key as EK",
            json!({"endorsementKey": b64(&signing(t.endorsement_key())), "storageRootKey": srk(&t)}),
            "tpm.endorsementKey: the endorsement key has objectAttributes",
        ),
        (
            "a bad SRK",
            json!({"endorsementKey": ek(&t), "storageRootKey": BASE64.encode([0u8, 1, 2])}),
            "tpm.storageRootKey is not a marshalled TPM2B_PUBLIC",
        ),
    ];
    for (what, tpm, message) in cases {
        let (status, code, text) = register(json!({"registrationId": id, "tpm": tpm})).await;
        assert_eq!((status, code), (400, json!(400004)), "{what}: {text}");
        assert!(text.starts_with(message), "{what}: {text}");
    }
    // None of this issued a challenge: the enrolled TPM still gets one.
    challenge(&dps, id, &t).await;

    // The service API checks TPM enrollments as strictly.
    let put = |path: String, body: Value| {
        let dps = &dps;
        async move {
            let resp = dps.service(reqwest::Method::PUT, &path).json(&body).send().await.unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            (status, body["message"].as_str().unwrap_or_default().to_string())
        }
    };
    let enrollment = |tpm: Value| json!({"registrationId": "tpm-e", "attestation": {"type": "tpm", "tpm": tpm}});
    let (status, message) = put("/enrollments/tpm-e".into(), enrollment(json!({"endorsementKey": "AAAA"}))).await;
    assert_eq!(status, 400);
    assert!(message.starts_with("attestation.tpm.endorsementKey is not a marshalled TPM2B_PUBLIC"), "{message}");
    let (status, message) =
        put("/enrollments/tpm-e".into(), json!({"registrationId": "tpm-e", "attestation": {"type": "tpm"}})).await;
    assert_eq!(status, 400);
    assert!(message.contains("attestation.tpm.endorsementKey"), "{message}");
    let (status, message) = put(
        "/enrollments/tpm-e".into(),
        json!({"registrationId": "tpm-e", "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek(&t)},
               "x509": {"clientCertificates": {"primary": {"certificate": "AAAA"}}}}}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(message.contains("remove attestation.symmetricKey and attestation.x509"), "{message}");
    let (status, message) = put(
        "/enrollments/tpm-e".into(),
        enrollment(json!({"endorsementKey": ek(&t), "storageRootKey": b64(&signing(t.storage_root_key()))})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        message.starts_with("attestation.tpm.storageRootKey: the storage root key has objectAttributes"),
        "{message}"
    );
    let (status, message) = put(
        "/enrollmentGroups/tpm-group".into(),
        json!({"enrollmentGroupId": "tpm-group", "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek(&t)}}}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(message.contains("use individual enrollments for TPM"), "{message}");
}

/// The same key as a signing key: usable RSA, but not a storage key a credential can go to.
fn signing(public: &TpmPublic) -> TpmPublic {
    let mut p = public.clone();
    p.object_attributes = 0x0004_0072;
    assert!(matches!(p.params, PublicParams::Rsa(_)));
    p
}

#[tokio::test]
async fn challenges_count_against_the_per_device_request_limit() {
    let dps =
        Dps::start(&format!("{HUBS}[throttling]\ndevice_requests_per_min = 1\ndevice_requests_burst = 2\n")).await;
    let t = tpm(10);
    let id = "tpm-device-throttled";
    enroll(&dps, id, &t, json!({})).await;
    challenge(&dps, id, &t).await;
    challenge(&dps, id, &t).await;
    let (status, headers, body) = dps.register(id, None, first_leg(id, &t)).await;
    assert_eq!(status, 429, "{body}");
    assert!(headers.get("retry-after").is_some());
    assert!(body.get("authenticationKey").is_none());
}

#[tokio::test]
async fn refused_challenges_count_as_failed_authentications_issued_ones_do_not() {
    let dps = Dps::start(&format!(
        "{HUBS}[device]\nauth_failure_delay_ms = 0\n[throttling]\nfailed_auth_per_min = 1\nfailed_auth_burst = 2\n"
    ))
    .await;
    let (t, stranger) = (tpm(11), tpm(12));
    let id = "tpm-device-failures";
    enroll(&dps, id, &t, json!({})).await;
    for _ in 0..3 {
        challenge(&dps, id, &t).await;
    }
    for _ in 0..2 {
        let (status, _, body) = dps.register(id, None, first_leg(id, &stranger)).await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, _, body) = dps.register(id, None, first_leg(id, &t)).await;
    assert_eq!((status, body["errorCode"].as_u64()), (429, Some(429001)), "{body}");
}
