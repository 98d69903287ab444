//! The HTTP hub registrar (`[hubs.registrar] kind = "http"`) through a spawned dps and a real
//! HTTP server as the operator's endpoint: what each kind of device's registration sends it
//! (signed, without keys), failures that fail the registration and keep the previous
//! assignment, throttling retried, tolerated failures done later from the outbox, removal
//! from the hub a device left, and secrets absent from the log.

mod common;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use common::pki::{ca, device};
use common::{derive, key, Dps};
use dps_core::tpm::software::SoftwareTpm;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "registrar-secret-0123456789";

/// A call the endpoint received.
#[derive(Debug, Clone)]
struct Call {
    path: String,
    signature: String,
    body: Vec<u8>,
}

impl Call {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// The operator's endpoint: answers each path with the statuses queued for it, then with its
/// default status (200). Status 1 means "answer 200 after 3 s".
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    queued: Arc<Mutex<HashMap<String, VecDeque<u16>>>>,
    default: Arc<Mutex<HashMap<String, u16>>>,
}

impl Endpoint {
    async fn start() -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint {
            addr: listener.local_addr().unwrap(),
            calls: Arc::default(),
            queued: Arc::default(),
            default: Arc::default(),
        };
        let e = endpoint.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let e = e.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let e = e.clone();
                        async move { Ok::<_, Infallible>(e.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        endpoint
    }

    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let signature = req.headers().get("x-dps-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
        self.calls.lock().unwrap().push(Call { path: path.clone(), signature, body });
        let status = {
            let queued = self.queued.lock().unwrap().get_mut(&path).and_then(VecDeque::pop_front);
            queued.or_else(|| self.default.lock().unwrap().get(&path).copied()).unwrap_or(200)
        };
        let status = if status == 1 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            200
        } else {
            status
        };
        let mut r =
            Response::new(Full::new(Bytes::from(format!("{{\"answer\":\"status {status} from the endpoint\"}}"))));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        if status == 429 {
            r.headers_mut().insert("retry-after", hyper::header::HeaderValue::from_static("1"));
        }
        r
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn queue(&self, path: &str, statuses: &[u16]) {
        self.queued.lock().unwrap().entry(path.into()).or_default().extend(statuses);
    }

    fn set_default(&self, path: &str, status: u16) {
        self.default.lock().unwrap().insert(path.into(), status);
    }

    fn calls(&self, path: &str) -> Vec<Call> {
        self.calls.lock().unwrap().iter().filter(|c| c.path == path).cloned().collect()
    }

    /// The `register` calls on `path`.
    fn registrations(&self, path: &str) -> Vec<Call> {
        self.calls(path).into_iter().filter(|c| c.json()["action"] == "register").collect()
    }

    /// Waits until `path` got a call whose JSON matches `pred`.
    async fn wait_for(&self, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..150 {
            if let Some(c) = self.calls(path).iter().rev().find(|c| pred(&c.json())) {
                return c.json();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no {what} call on {path} within 15 s: {:?}", self.calls(path));
    }
}

/// `[[hubs]]` entries: each hub's registrar posts to the endpoint's `/<hub>` path.
fn hubs(endpoint: &Endpoint, names: &[(&str, &str)]) -> String {
    let mut toml = String::new();
    for (name, on_failure) in names {
        toml.push_str(&format!(
            "[[hubs]]\nhost_name = \"{name}\"\n[hubs.registrar]\nkind = \"http\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\non_failure = \"{on_failure}\"\ntimeout_secs = 2\nattempts = 3\n",
            endpoint.url(&format!("/{name}"))
        ));
    }
    toml
}

/// Checks `x-dps-signature: t=<s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
fn assert_signed(call: &Call) {
    let (t, v1) = call.signature.split_once(",v1=").expect("signature header");
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&call.body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(v1, expected, "signature of {}", String::from_utf8_lossy(&call.body));
}

async fn enroll_key(dps: &Dps, id: &str, hub: &str, twin: Value, policy: Option<(bool, bool)>) -> String {
    let mut body = json!({"registrationId": id, "iotHubs": [hub], "initialTwin": twin,
        "capabilities": {"iotEdge": true},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}});
    if let Some((update, migrate)) = policy {
        body["reprovisionPolicy"] = json!({"updateHubAssignment": update, "migrateDeviceData": migrate});
    }
    dps.put_enrollment(body).await;
    dps.device_token(id, &key(1))
}

async fn register(dps: &Dps, id: &str, token: &str) -> Value {
    dps.register_to_end(id, token).await
}

async fn registration_state(dps: &Dps, id: &str) -> Value {
    dps.service(reqwest::Method::GET, &format!("/registrations/{id}")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn each_kind_of_device_is_registered_in_its_hub_with_a_signed_call_and_no_key() {
    let endpoint = Endpoint::start().await;
    let config = format!("[x509]\nrequire_verified_ca = false\n{}", hubs(&endpoint, &[("hub-1.test", "fail")]));
    let dps = Dps::start(&config).await;

    // An individual symmetric-key enrollment (an IoT Edge device, with a twin).
    let token = enroll_key(&dps, "sym-1", "hub-1.test", json!({"tags": {"site": "north"}}), None).await;
    let state = register(&dps, "sym-1", &token).await;
    assert_eq!(state["status"], "assigned", "{state}");
    let calls = endpoint.calls("/hub-1.test");
    assert_eq!(calls.len(), 1, "one call for one registration");
    assert_signed(&calls[0]);
    let call = calls[0].json();
    assert_eq!(call["action"], "register");
    assert_eq!(call["hub"], "hub-1.test");
    assert_eq!(call["deviceId"], "sym-1");
    assert_eq!(call["registrationId"], "sym-1");
    assert_eq!(call["attestation"], "symmetricKey");
    assert_eq!(call["authentication"], json!({"type": "sas"}));
    assert_eq!(call["iotEdge"], true);
    assert_eq!(call["initialTwin"], json!({"tags": {"site": "north"}}));
    assert_eq!(call["substatus"], "initialAssignment");
    assert_eq!(call["deviceData"], "initial");
    assert!(call.get("previous").is_none(), "{call}");
    let text = String::from_utf8_lossy(&calls[0].body).to_string();
    assert!(!text.contains(&key(1)) && !text.contains(&key(2)), "the device's key went to the endpoint: {text}");

    // A group member (its derived key stays here too).
    let group_key = key(7);
    dps.put_group(json!({"enrollmentGroupId": "grp", "iotHubs": ["hub-1.test"],
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": key(8)}}}))
        .await;
    let member_key = derive(&group_key, "member-1");
    let state = register(&dps, "member-1", &dps.device_token("member-1", &member_key)).await;
    assert_eq!(state["status"], "assigned", "{state}");
    let call = endpoint.wait_for("/hub-1.test", "member", |c| c["deviceId"] == "member-1").await;
    assert_eq!(call["enrollmentGroupId"], "grp");
    assert_eq!(call["authentication"], json!({"type": "sas"}));
    assert!(!call.to_string().contains(&member_key));

    // An individual X.509 device: the thumbprint of the certificate it presented.
    let leaf = device("x509-dev", None, (-1, 30));
    dps.put_enrollment(json!({"registrationId": "x509-dev", "iotHubs": ["hub-1.test"],
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": leaf.pem()}}}}}))
        .await;
    let client = dps.client_with_certificate(&leaf.pem(), &leaf.key.serialize_pem());
    let (status, body) = dps.register_as(&client, "x509-dev", json!({"registrationId": "x509-dev"})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigned")), "{body}");
    let call = endpoint.wait_for("/hub-1.test", "x509", |c| c["deviceId"] == "x509-dev").await;
    let thumbprint: String = {
        use sha2::Digest;
        Sha256::digest(leaf.der()).iter().map(|b| format!("{b:02X}")).collect()
    };
    assert_eq!(call["authentication"], json!({"type": "selfSigned", "primaryThumbprint": thumbprint}));
    assert_eq!(call["attestation"], "x509");

    // An X.509 group member: CA-signed.
    let root = ca("registrar root", None);
    dps.put_group(json!({"enrollmentGroupId": "x509-grp", "iotHubs": ["hub-1.test"],
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": root.pem()}}}}}))
        .await;
    let member = device("x509-member", Some(&root), (-1, 30));
    let client = dps.client_with_certificate(&format!("{}{}", member.pem(), root.pem()), &member.key.serialize_pem());
    let (status, body) = dps.register_as(&client, "x509-member", json!({"registrationId": "x509-member"})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigned")), "{body}");
    let call = endpoint.wait_for("/hub-1.test", "x509 member", |c| c["deviceId"] == "x509-member").await;
    assert_eq!(call["authentication"], json!({"type": "certificateAuthority"}));
    assert_eq!(call["enrollmentGroupId"], "x509-grp");

    // A TPM device: registered once it proved its key; the key is not sent.
    let tpm = SoftwareTpm::generate(&mut StdRng::seed_from_u64(11)).unwrap();
    let ek = BASE64.encode(tpm.endorsement_key().marshal_tpm2b().unwrap());
    let srk = BASE64.encode(tpm.storage_root_key().marshal_tpm2b().unwrap());
    dps.put_enrollment(json!({"registrationId": "tpm-dev", "iotHubs": ["hub-1.test"],
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}))
        .await;
    let (status, _, challenge) = dps
        .register(
            "tpm-dev",
            None,
            json!({"registrationId": "tpm-dev", "tpm": {"endorsementKey": ek, "storageRootKey": srk}}),
        )
        .await;
    assert_eq!(status, 401, "{challenge}");
    assert!(
        endpoint.calls("/hub-1.test").iter().all(|c| c.json()["deviceId"] != "tpm-dev"),
        "no call before the proof"
    );
    let hub_key = tpm.import(&BASE64.decode(challenge["authenticationKey"].as_str().unwrap()).unwrap()).unwrap();
    let state = register(&dps, "tpm-dev", &dps.device_token("tpm-dev", &BASE64.encode(&hub_key))).await;
    assert_eq!(state["status"], "assigned", "{state}");
    let tpm_call = endpoint.calls("/hub-1.test").into_iter().find(|c| c.json()["deviceId"] == "tpm-dev").unwrap();
    assert_signed(&tpm_call);
    assert_eq!(tpm_call.json()["attestation"], "tpm");
    assert_eq!(tpm_call.json()["authentication"], json!({"type": "sas"}));
    assert!(!String::from_utf8_lossy(&tpm_call.body).contains(&BASE64.encode(&hub_key)));

    // Secrets are nowhere in the log.
    let log = dps.log();
    for secret in [SECRET.to_string(), key(1), member_key, BASE64.encode(&hub_key)] {
        assert!(!log.contains(&secret), "a secret is in the log");
    }
}

#[tokio::test]
async fn a_failing_registrar_fails_the_registration_and_keeps_the_previous_assignment() {
    let endpoint = Endpoint::start().await;
    let config = hubs(&endpoint, &[("hub-1.test", "fail"), ("hub-2.test", "fail")]);
    let dps = Dps::start(&config).await;
    let token = enroll_key(&dps, "dev", "hub-1.test", json!({"tags": {"v": 1}}), None).await;
    assert_eq!(register(&dps, "dev", &token).await["assignedHub"], "hub-1.test");

    // hub-2's endpoint fails every attempt: the move fails, the device stays on hub-1.
    endpoint.set_default("/hub-2.test", 500);
    enroll_key(&dps, "dev", "hub-2.test", json!({"tags": {"v": 2}}), None).await;
    let state = register(&dps, "dev", &token).await;
    assert_eq!(state["status"], "failed", "{state}");
    assert_eq!(state["errorCode"], 500210, "{state}");
    let message = state["errorMessage"].as_str().unwrap();
    assert!(message.contains("hub-2.test") && message.contains("HTTP 500"), "{message}");
    assert_eq!(endpoint.registrations("/hub-2.test").len(), 3, "3 attempts for a 5xx");
    // hub-2 may hold part of the device: it is removed there (from the outbox), not from hub-1.
    let undo = endpoint.wait_for("/hub-2.test", "remove", |c| c["action"] == "remove").await;
    assert_eq!(undo, json!({"action": "remove", "hub": "hub-2.test", "deviceId": "dev"}));
    let rs = registration_state(&dps, "dev").await;
    assert_eq!(rs["status"], "failed", "{rs}");
    // (The move that succeeds below names hub-1 as where the device was, with its twin.)
    // Nothing is removed from hub-1: the device is still there.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(endpoint.calls("/hub-1.test").iter().all(|c| c.json()["action"] == "register"));

    // A refusal (4xx other than 429) is not retried.
    endpoint.set_default("/hub-2.test", 403);
    let state = register(&dps, "dev", &token).await;
    assert_eq!(state["status"], "failed");
    assert!(state["errorMessage"].as_str().unwrap().contains("HTTP 403"), "{state}");
    assert_eq!(endpoint.registrations("/hub-2.test").len(), 4, "one attempt for a 403");

    // Throttled, then accepted: retried after Retry-After, and the move goes through; the
    // device is then removed from hub-1 (from the outbox, after the registration's write).
    endpoint.set_default("/hub-2.test", 200);
    endpoint.queue("/hub-2.test", &[429]);
    let state = register(&dps, "dev", &token).await;
    assert_eq!(state["status"], "assigned", "{state}");
    assert_eq!(state["assignedHub"], "hub-2.test");
    assert_eq!(state["substatus"], "deviceDataMigrated");
    let calls = endpoint.registrations("/hub-2.test");
    assert_eq!(calls.len(), 6, "the 429 and its retry");
    let moved = calls.last().unwrap().json();
    assert_eq!(moved["previous"], json!({"hub": "hub-1.test", "deviceId": "dev"}));
    assert_eq!(moved["deviceData"], "keep");
    assert_eq!(moved["initialTwin"]["tags"]["v"], 1, "migrated data: the twin it had");
    let removal = endpoint.wait_for("/hub-1.test", "remove", |c| c["action"] == "remove").await;
    assert_eq!(removal, json!({"action": "remove", "hub": "hub-1.test", "deviceId": "dev"}));
    assert_signed(endpoint.calls("/hub-1.test").last().unwrap());
}

#[tokio::test]
async fn a_tolerated_failure_assigns_and_the_outbox_registers_the_device_later_even_after_a_kill() {
    let endpoint = Endpoint::start().await;
    let config = hubs(&endpoint, &[("hub-1.test", "tolerate")]);
    let mut dps = Dps::start(&config).await;
    endpoint.set_default("/hub-1.test", 503);
    let token = enroll_key(&dps, "tol", "hub-1.test", json!({"tags": {"v": 1}}), None).await;
    let state = register(&dps, "tol", &token).await;
    assert_eq!(state["status"], "assigned", "tolerated: {state}");
    assert_eq!(state["assignedHub"], "hub-1.test");
    // The outbox keeps retrying; dps is killed and started again before the endpoint recovers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    dps.kill9();
    assert!(endpoint.calls("/hub-1.test").len() >= 4, "the inline attempts and an outbox retry");
    endpoint.set_default("/hub-1.test", 200);
    let before = endpoint.calls("/hub-1.test").len();
    dps.restart().await;
    // The restarted dps does the work owed; then the work is gone and the calls stop.
    let mut last = before;
    let mut quiet = 0;
    // The dead node's lease on the outbox runs out first (15 s).
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = endpoint.calls("/hub-1.test").len();
        if now == last && now > before {
            quiet += 1;
            if quiet == 40 {
                break;
            }
        } else {
            quiet = 0;
            last = now;
        }
    }
    let calls = endpoint.calls("/hub-1.test");
    assert!(calls.len() > before, "the restarted dps registered the device");
    assert_eq!(quiet, 40, "the outbox stopped calling once the hub had the device: {} calls", calls.len());
    let call = calls.last().unwrap();
    assert_signed(call);
    assert_eq!(call.json()["action"], "register");
    assert_eq!(call.json()["deviceId"], "tol");
}

#[tokio::test]
async fn a_slow_registrar_makes_the_device_poll() {
    let endpoint = Endpoint::start().await;
    let config = format!("[allocation]\nwebhook_inline_wait_ms = 500\n{}", hubs(&endpoint, &[("hub-1.test", "fail")]));
    let dps = Dps::start(&config).await;
    endpoint.queue("/hub-1.test", &[1]);
    let token = enroll_key(&dps, "slow", "hub-1.test", json!({}), None).await;
    let (status, headers, body) = dps.register("slow", Some(&token), json!({"registrationId": "slow"})).await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "assigning", "{body}");
    assert!(headers.get("retry-after").is_some());
    let state = register(&dps, "slow", &token).await;
    assert_eq!(state["status"], "assigned", "{state}");
}

#[tokio::test]
async fn a_registrar_without_a_secret_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dps.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[[hubs]]\nhost_name = \"h.test\"\n[hubs.registrar]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = common::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_dps")).args(["serve", "--config"]).arg(&config),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hubs[0].registrar") && err.contains("secret"), "{err}");
}
