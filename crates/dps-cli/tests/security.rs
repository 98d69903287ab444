//! Hardening: what an outside security review found, each case against a spawned `dps`.

mod common;

use std::time::Duration;

use common::{key, now, output_within, Dps};
use reqwest::Method;
use serde_json::{json, Value};

const RIGHTS: [&str; 5] =
    ["EnrollmentRead", "EnrollmentWrite", "RegistrationStatusRead", "RegistrationStatusWrite", "ServiceConfig"];

/// A policy per single right, one with read + write, one with none of the enrollment rights.
fn policies() -> Vec<(String, Vec<&'static str>)> {
    let mut p: Vec<(String, Vec<&'static str>)> = RIGHTS.iter().map(|r| (format!("only-{r}"), vec![*r])).collect();
    p.push(("read-write".into(), vec!["EnrollmentRead", "EnrollmentWrite"]));
    p.push(("write-and-status".into(), vec!["EnrollmentWrite", "RegistrationStatusRead", "RegistrationStatusWrite"]));
    p
}

fn policy_key(name: &str) -> Vec<u8> {
    let mut k = [0u8; 32];
    for (i, b) in name.bytes().enumerate() {
        k[i % 32] ^= b;
    }
    k.to_vec()
}

fn policies_toml() -> String {
    use base64::Engine as _;
    policies()
        .iter()
        .map(|(name, rights)| {
            format!(
                "[[service.policies]]\nname = \"{name}\"\nprimary_key = \"{}\"\nrights = {:?}\n",
                base64::engine::general_purpose::STANDARD.encode(policy_key(name)),
                rights
            )
        })
        .collect()
}

fn as_policy(dps: &Dps, name: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
    let token = dps_proto::sas::build_token("localhost", &policy_key(name), now() + 600, Some(name));
    let sep = if path.contains('?') { '&' } else { '?' };
    dps.client.request(method, dps.url(&format!("{path}{sep}{}", common::API))).header("Authorization", token)
}

/// Keys (given by the caller, kept from the stored record or generated) reach a response only
/// when the caller's policy has EnrollmentRead: single PUT, bulk and groups, every right.
#[tokio::test]
async fn keys_reach_only_callers_that_may_read_enrollments() {
    let dps = Dps::start(&policies_toml()).await;
    for (name, rights) in policies() {
        let may_read = rights.contains(&"EnrollmentRead");
        let may_write = rights.contains(&"EnrollmentWrite");
        let tag = name.to_ascii_lowercase();
        // Records created by the owner, with known keys; then written by this policy without keys.
        let (ind, grp) = (format!("{tag}-e"), format!("{tag}-g"));
        dps.put_enrollment(json!({"registrationId": ind, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": key(11), "secondaryKey": key(12)}}}))
            .await;
        dps.put_group(json!({"enrollmentGroupId": grp, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": key(13), "secondaryKey": key(14)}}}))
            .await;
        let (new_ind, new_grp, bulk_ind, bulk_grp) =
            (format!("{tag}-new-e"), format!("{tag}-new-g"), format!("{tag}-bulk-e"), format!("{tag}-bulk-g"));
        let sk = json!({"type": "symmetricKey"});
        let calls: Vec<(&str, Method, String, Value)> = vec![
            ("PUT existing enrollment", Method::PUT, format!("/enrollments/{ind}"), json!({"attestation": sk})),
            ("PUT existing group", Method::PUT, format!("/enrollmentGroups/{grp}"), json!({"attestation": sk})),
            ("PUT new enrollment", Method::PUT, format!("/enrollments/{new_ind}"), json!({"attestation": sk})),
            ("PUT new group", Method::PUT, format!("/enrollmentGroups/{new_grp}"), json!({"attestation": sk})),
            (
                "bulk enrollments",
                Method::POST,
                "/enrollments".into(),
                json!({"mode": "update", "enrollments": [{"registrationId": ind, "attestation": sk},
                    {"registrationId": bulk_ind, "attestation": sk}]}),
            ),
            (
                "bulk groups",
                Method::POST,
                "/enrollmentGroups".into(),
                json!({"mode": "update", "enrollmentGroups": [{"enrollmentGroupId": grp, "attestation": sk},
                    {"enrollmentGroupId": bulk_grp, "attestation": sk}]}),
            ),
            ("GET enrollment", Method::GET, format!("/enrollments/{ind}"), Value::Null),
            ("GET group", Method::GET, format!("/enrollmentGroups/{grp}"), Value::Null),
            ("query enrollments", Method::POST, "/enrollments/query".into(), json!({"query": "SELECT *"})),
            ("query groups", Method::POST, "/enrollmentGroups/query".into(), json!({"query": "SELECT *"})),
        ];
        let mut texts = Vec::new();
        for (what, method, path, body) in calls {
            let mut req = as_policy(&dps, &name, method.clone(), &path);
            if !body.is_null() {
                req = req.json(&body);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let needs = if method == Method::GET || path.ends_with("/query") { may_read } else { may_write };
            assert_eq!(status == 200, needs, "{name}: {what} answered {status}");
            texts.push((what, resp.text().await.unwrap()));
        }
        // Every key the records now hold, read back by the owner.
        let mut keys = vec![key(11), key(12), key(13), key(14)];
        for path in [
            format!("/enrollments/{ind}"),
            format!("/enrollmentGroups/{grp}"),
            format!("/enrollments/{new_ind}"),
            format!("/enrollmentGroups/{new_grp}"),
            format!("/enrollments/{bulk_ind}"),
            format!("/enrollmentGroups/{bulk_grp}"),
        ] {
            let resp = dps.service(Method::POST, &format!("{path}/attestationmechanism")).send().await.unwrap();
            if resp.status() == 200 {
                let a: Value = resp.json().await.unwrap();
                for slot in ["primaryKey", "secondaryKey"] {
                    keys.push(a["symmetricKey"][slot].as_str().unwrap().to_string());
                }
            }
        }
        for (what, text) in &texts {
            let leaked = keys.iter().any(|k| text.contains(k.as_str()));
            let put = what.starts_with("PUT");
            // Only a PUT by a policy that may also read answers with the keys (as Azure does).
            assert_eq!(leaked, put && may_read && may_write, "{name}: {what}: {text}");
        }
        // The attestation mechanism (keys) needs both rights.
        let resp = as_policy(&dps, &name, Method::POST, &format!("/enrollments/{ind}/attestationmechanism"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status() == 200, may_read && may_write, "{name}: attestation mechanism");
        // Keys were kept, not rotated, by the keyless writes.
        let a: Value = dps
            .service(Method::POST, &format!("/enrollments/{ind}/attestationmechanism"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(a["symmetricKey"]["primaryKey"], key(11), "{name}");
    }
}

/// Request parsing: one Authorization header, object bodies only, field names instead of Rust
/// type names, no repeated keys in either API, a truncated TPM endorsement key, and an
/// oversized Content-Length refused at once.
#[tokio::test]
async fn requests_are_parsed_strictly() {
    let dps = Dps::start("").await;
    let k = key(1);
    dps.put_enrollment(json!({"registrationId": "d", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let token = dps.device_token("d", &k);
    let register = |body: &'static str| {
        dps.client
            .put(dps.url(&format!("/{}/registrations/d/register?api-version=2021-10-01", dps.scope())))
            .header("Authorization", &token)
            .header("content-type", "application/json")
            .body(body)
    };
    let expect = |status: u16, code: u32, needle: &'static str| {
        move |(s, body): (u16, Value)| {
            assert_eq!((s, body["errorCode"].as_u64()), (status, Some(u64::from(code))), "{body}");
            let message = body["message"].as_str().unwrap();
            assert!(message.contains(needle), "{message}");
            for rust in ["struct", "TpmAttestation", "DeviceRegistration", "IndividualEnrollment", "enum "] {
                assert!(!message.contains(rust), "a Rust type name in: {message}");
            }
        }
    };
    async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }
    // Two Authorization headers: 400, whichever one is valid.
    let twice = register("{}").header("Authorization", "SharedAccessSignature sr=x&sig=y&se=1");
    expect(400, 400004, "2 Authorization headers")(send(twice).await);
    let svc = dps.service(Method::GET, "/enrollments/d").header("Authorization", dps.service_token());
    expect(400, 400004, "2 Authorization headers")(send(svc).await);
    // A body that is an array is not read by position.
    expect(400, 400001, "must be a JSON object, not an array")(send(register(r#"["d", null, {"a": 1}]"#)).await);
    // Shape errors name the field and the JSON kind.
    expect(400, 400001, "tpm: invalid type: string \"x\", expected a JSON object")(
        send(register(r#"{"tpm": "x"}"#)).await,
    );
    // Repeated keys, at the top and inside the payload, in the device API...
    expect(400, 400001, "\"registrationId\" appears twice")(
        send(register(r#"{"registrationId": "d", "registrationId": "e"}"#)).await,
    );
    expect(400, 400001, "\"a\" appears twice")(send(register(r#"{"payload": {"a": 1, "a": 2}}"#)).await);
    // ...and in the service API (which kept the last one before).
    let dup = r#"{"registrationId": "dup", "attestation": {"type": "x509"}, "attestation": {"type": "symmetricKey"}}"#;
    let req = dps.service(Method::PUT, "/enrollments/dup").header("content-type", "application/json").body(dup);
    expect(400, 400001, "\"attestation\" appears twice")(send(req).await);
    let req = dps.service(Method::POST, "/enrollments").header("content-type", "application/json").body(
        r#"{"mode": "create", "enrollments": [{"registrationId": "b", "registrationId": "c", "attestation": {"type": "symmetricKey"}}]}"#,
    );
    expect(400, 400001, "\"registrationId\" appears twice")(send(req).await);
    let req = dps
        .service(Method::PUT, "/enrollments/shape")
        .json(&json!({"attestation": {"type": "symmetricKey", "symmetricKey": []}}));
    expect(400, 400001, "attestation.symmetricKey: invalid type: array, expected a JSON object")(send(req).await);
    let resp = dps.service(Method::GET, "/enrollments/dup").send().await.unwrap();
    assert_eq!(resp.status(), 404, "nothing stored");
    // A TPM enrollment's endorsement key is read as strictly (a truncated TPM2B_PUBLIC).
    let tpm = json!({"registrationId": "t", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AToAAQAL"}}});
    let req = dps.service(Method::PUT, "/enrollments/t").json(&tpm);
    expect(400, 400004, "attestation.tpm.endorsementKey is not a marshalled TPM2B_PUBLIC: TPM2B_PUBLIC is truncated")(
        send(req).await,
    );

    // A Content-Length over the limit gets 413 at once, without waiting for the body.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = common::mqtt::tls(&dps, dps.addr.port()).await;
    let head = format!(
        "PUT /{}/registrations/d/register?api-version=2021-10-01 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{{",
        dps.scope()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut answer))
        .await
        .expect("an answer before the body read timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("413001"), "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// An existing data directory is checked at start: writable by others → refused; readable by
/// others → a warning; store files readable by others are made owner-only.
#[tokio::test]
async fn data_directory_modes_are_checked_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let chmod =
        |p: &std::path::Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    let mut dps = Dps::start("").await;
    let data = dps.data_dir();
    dps.kill9();
    // Readable by others (as dps before this version made it): starts, warns, tightens the files.
    chmod(&data, 0o755);
    chmod(&data.join("dps.sqlite"), 0o644);
    dps.restart().await;
    let log = dps.log();
    assert!(log.contains("the data directory can be read by group or others"), "{log}");
    assert!(log.contains("store file was readable by others; made owner-only"), "{log}");
    assert_eq!(common::file_mode(&data.join("dps.sqlite")), 0o600);
    assert_eq!(common::file_mode(&data), 0o755, "the directory is the operator's to change");
    let resp = dps.service(Method::POST, "/enrollments/query").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    dps.kill9();
    // Writable by others: refused with what to do.
    chmod(&data, 0o777);
    let out = output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_dps")).args(["serve", "--config"]).arg(dps.dir.join("dps.toml")),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is writable by group or others (mode 0777)") && err.contains("chmod 700"), "{err}");
    chmod(&data, 0o700);
}

/// Service API authentication failures are logged, rate-limited, with the policy name and the
/// source address and never the token.
#[tokio::test]
async fn service_authentication_failures_are_logged_without_the_token() {
    let dps = Dps::start("").await;
    let forged = dps_proto::sas::build_token("localhost", &[7u8; 32], now() + 600, Some("provisioningserviceowner"));
    let signature = forged.split("sig=").nth(1).unwrap().split('&').next().unwrap().to_string();
    for _ in 0..100 {
        let resp = dps
            .client
            .get(dps.url(&format!("/enrollments/x?{}", common::API)))
            .header("Authorization", &forged)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let log = dps.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("service API authentication failed")).collect();
    assert!(!lines.is_empty(), "{log}");
    assert!(lines.len() <= 20, "rate-limited: {} lines", lines.len());
    assert!(
        lines[0].contains("source=127.0.0.1") && lines[0].contains("policy=\"provisioningserviceowner\""),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("does not match policy"), "the reason: {}", lines[0]);
    assert!(!log.contains(&signature) && !log.contains("SharedAccessSignature sr="), "no token in the log");
}

/// `dps serve` prints the owner key on stdout only when it was just created (or to a terminal),
/// so it does not land in journald or a container log at every start.
#[tokio::test]
async fn the_owner_key_is_printed_only_on_the_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dps.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[listen]\nhttps = \"127.0.0.1:0\"\nmqtt = \"127.0.0.1:0\"\namqp = \"127.0.0.1:0\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let creds = dir.path().join("data/dev-credentials.json");
    let start = |n: usize| {
        let out = std::fs::File::create(dir.path().join(format!("out-{n}"))).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dps"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let done = std::fs::read_to_string(&creds)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| v["pid"] == child.id());
            let printed = std::fs::read_to_string(dir.path().join(format!("out-{n}"))).unwrap_or_default();
            if done && printed.contains("Credentials file") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "dps did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::read_to_string(dir.path().join(format!("out-{n}"))).unwrap()
    };
    let first = start(1);
    let key = serde_json::from_str::<Value>(&std::fs::read_to_string(&creds).unwrap()).unwrap()
        ["serviceConnectionString"]
        .as_str()
        .unwrap()
        .split("SharedAccessKey=")
        .nth(1)
        .unwrap()
        .to_string();
    assert!(first.contains(&key), "first start prints the connection string: {first}");
    let second = start(2);
    assert!(!second.contains(&key) && !second.contains("SharedAccessKey"), "{second}");
    assert!(second.contains("dev-credentials.json"), "points to the file: {second}");
}

async fn put_custom(dps: &Dps, id: &str, url: &str) -> (u16, Value) {
    let k = key(9);
    let resp = dps
        .service(Method::PUT, &format!("/enrollments/{id}"))
        .json(&json!({"registrationId": id, "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Webhook URLs are checked when the enrollment is written, and the address policy applies to
/// the resolved address at call time.
#[tokio::test]
async fn webhook_urls_cannot_reach_internal_addresses() {
    let hook = common::webhook::start().await;
    let port = hook.addr.port();
    let dps = Dps::start("[[rules]]\nname = \"by-model\"\n[[rules.cases]]\nwhen = \"true\"\n").await;
    // Refused at write, with the reason: schemes, syntax, unknown rule sets, and (default
    // policy) link-local and metadata addresses in any spelling.
    for (url, needle) in [
        ("file:///etc/passwd", "only http:// and https://"),
        ("ftp://alloc.example/x", "only http:// and https://"),
        ("alloc.example/x", "relative URL without a base"),
        ("http://", "empty host"),
        ("rules://nope", "no rule set named 'nope'"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254"),
        ("http://[::ffff:a9fe:a9fe]/", "169.254.169.254"),
        ("http://0x0/", "webhook_deny"),
        ("http://metadata.google.internal/computeMetadata/v1/", "webhook_deny"),
    ] {
        let (status, body) = put_custom(&dps, "ssrf", url).await;
        assert_eq!((status, body["errorCode"].as_u64()), (400, Some(400004)), "{url}: {body}");
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains("webhookUrl") && msg.contains(needle), "{url}: {msg}");
    }
    for url in ["rules://by-model", "RULES://by-model/", "http://alloc.example.net/api?code=k", &hook.url("/ok")] {
        let (status, body) = put_custom(&dps, "fine", url).await;
        assert_eq!(status, 200, "{url}: {body}");
    }
    drop(dps);

    // An operator policy that refuses loopback: an address literal in any spelling is refused
    // at write; a name is judged on what it resolves to, at call time, and nothing is sent.
    let dps = Dps::start("[allocation]\nwebhook_deny = [\"127.0.0.0/8\", \"::1\"]\n").await;
    for url in [
        format!("http://127.0.0.1:{port}/ok"),
        format!("http://2130706433:{port}/ok"),
        format!("http://0x7f.1:{port}/ok"),
    ] {
        let (status, body) = put_custom(&dps, "loop", &url).await;
        assert_eq!(status, 400, "{url}: {body}");
        assert!(body["message"].as_str().unwrap().contains("127.0.0.1"), "{url}: {body}");
    }
    let (status, body) = put_custom(&dps, "by-name", &format!("http://localhost:{port}/ok")).await;
    assert_eq!(status, 200, "{body}");
    let token = dps.device_token("by-name", &key(9));
    let (_, _, body) = dps.register("by-name", Some(&token), json!({})).await;
    assert_eq!(body["status"], "failed", "{body}");
    let msg = body["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(msg.contains("refused by the server's address policy") && !msg.contains("127.0.0.1"), "{msg}");
    assert!(dps.log().contains("127.0.0.1 of 'localhost' is in allocation.webhook_deny"), "{}", dps.log());
    assert!(hook.received.lock().unwrap().is_empty(), "the webhook was never called");
    drop(dps);

    // An allow list: only what it names.
    let dps = Dps::start("[allocation]\nwebhook_allow = [\"127.0.0.1/32\"]\n").await;
    let (status, body) = put_custom(&dps, "other", &format!("http://127.0.0.2:{port}/ok")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("not in allocation.webhook_allow"), "{body}");
    let (status, _) = put_custom(&dps, "allowed", &hook.url("/ok")).await;
    assert_eq!(status, 200);
    let token = dps.device_token("allowed", &key(9));
    let (_, _, body) = dps.register("allowed", Some(&token), json!({})).await;
    assert_eq!(body["status"], "assigned", "{body}");
}

/// An unauthenticated caller learns nothing about which registration IDs exist: a wrong key
/// for an enrolled ID, an unknown ID, a disabled enrollment and a wrong group-derived key get
/// one message and a comparable answer time (HTTPS and MQTT); the log keeps the reason.
#[tokio::test]
async fn refusals_do_not_tell_which_ids_exist() {
    use common::mqtt::{connect_packet, RawMqtt};
    let dps = Dps::start("").await;
    let sk = |k: &str| json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}});
    dps.put_enrollment(json!({"registrationId": "known", "attestation": sk(&key(1))})).await;
    dps.put_enrollment(json!({"registrationId": "off", "provisioningStatus": "disabled", "attestation": sk(&key(2))}))
        .await;
    dps.put_group(json!({"enrollmentGroupId": "grp", "attestation": sk(&key(3))})).await;
    let wrong = key(99);
    let cases = ["known", "unknown", "off", "member-of-grp"];
    let mut messages = Vec::new();
    let mut times = Vec::new();
    for id in cases {
        let token = dps.device_token(id, &wrong);
        let mut ms = Vec::new();
        for _ in 0..12 {
            let started = std::time::Instant::now();
            let (status, _, body) = dps.register(id, Some(&token), json!({})).await;
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!((status, body["errorCode"].as_u64()), (401, Some(401002)), "{id}: {body}");
            messages.push(body["message"].as_str().unwrap().replace(id, "<id>"));
        }
        ms.sort_by(f64::total_cmp);
        times.push((id, ms[ms.len() / 2]));
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "one message for all: {messages:?}");
    assert!(!messages[0].contains("enrollment for") && !messages[0].contains("no enrollment"), "{}", messages[0]);
    // Every refusal waits for device.auth_failure_delay_ms (50), so the work behind it (a
    // store hit or miss, a group scan) does not show.
    for (id, median) in &times {
        assert!(*median >= 50.0, "{id}: answered after {median:.1} ms");
    }
    let (lo, hi) = times.iter().fold((f64::MAX, 0f64), |(lo, hi), (_, m)| (lo.min(*m), hi.max(*m)));
    assert!(hi - lo < 25.0, "median answer times differ by {:.1} ms: {times:?}", hi - lo);
    let log = dps.log();
    assert!(log.contains("signature does not match the individual enrollment's keys"), "{log}");
    assert!(log.contains("no individual enrollment and no group key matches"), "{log}");

    // MQTT: CONNACK 5 for all, after the same delay.
    for id in cases {
        let token = dps.device_token(id, &wrong);
        let mut c = RawMqtt::tls(&dps).await;
        let started = std::time::Instant::now();
        assert_eq!(c.connect(connect_packet(&dps, id, Some(&token))).await, 5, "{id}");
        assert!(started.elapsed() >= std::time::Duration::from_millis(50), "{id}");
    }
}

fn client_from(dps: &Dps, source: &str) -> reqwest::Client {
    dps.client_builder().local_address(source.parse::<std::net::IpAddr>().unwrap()).build().unwrap()
}

async fn register_via(dps: &Dps, client: &reqwest::Client, id: &str, token: &str) -> (u16, Option<String>, Value) {
    let url = dps.url(&format!("/{}/registrations/{id}/register?api-version=2021-10-01", dps.scope()));
    let resp = client.put(url).header("Authorization", token).json(&json!({})).send().await.unwrap();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), retry, resp.json().await.unwrap_or(Value::Null))
}

/// Failed authentications per source address: once used up, the address gets 429 with
/// Retry-After on HTTPS (device and service API) and CONNACK 3 on MQTT, other addresses do not,
/// and it may try again once the bucket refills.
#[tokio::test]
async fn failed_authentications_are_throttled_per_address() {
    use common::mqtt::{connect_packet, RawMqtt};
    let dps = Dps::start(
        "[device]\nauth_failure_delay_ms = 0\n[throttling]\nfailed_auth_per_min = 60\nfailed_auth_burst = 3\n",
    )
    .await;
    let k = key(1);
    dps.put_enrollment(json!({"registrationId": "d", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let (good, bad) = (dps.device_token("d", &k), dps.device_token("d", &key(2)));
    let here = client_from(&dps, "127.0.0.1");
    for _ in 0..3 {
        assert_eq!(register_via(&dps, &here, "d", &bad).await.0, 401);
    }
    let (status, retry, body) = register_via(&dps, &here, "d", &good).await;
    assert_eq!((status, body["errorCode"].as_u64()), (429, Some(429001)), "even a good key waits: {body}");
    assert_eq!(retry.as_deref(), Some("1"), "{body}");
    let resp = dps.service(Method::GET, "/enrollments/d").send().await.unwrap();
    assert_eq!(resp.status(), 429, "the service API too");
    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(connect_packet(&dps, "d", Some(&good))).await, 3, "MQTT: server unavailable");
    // Another address is not affected.
    let there = client_from(&dps, "127.0.0.2");
    assert_eq!(register_via(&dps, &there, "d", &good).await.0, 202);
    // After Retry-After, the address may try again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(register_via(&dps, &here, "d", &good).await.0, 202);
    assert!(dps.log().contains("too many failed authentications from this address"));
}

/// Per registration ID (after authentication, so others cannot use up a device's allowance)
/// and for the whole instance: 429 with Retry-After over HTTPS, the 429 topic over MQTT.
#[tokio::test]
async fn devices_and_the_instance_are_throttled_as_configured() {
    use common::mqtt::{connect_packet, RawMqtt, REGISTER};
    let dps = Dps::start(
        "[device]\nauth_failure_delay_ms = 0\n[throttling]\ndevice_requests_per_min = 60\ndevice_requests_burst = 2\n\
         registrations_per_min = 60\nregistrations_burst = 4\n",
    )
    .await;
    let mut tokens = Vec::new();
    for i in 0..4 {
        let id = format!("d{i}");
        let k = key(i + 1);
        dps.put_enrollment(json!({"registrationId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
            .await;
        tokens.push(dps.device_token(&id, &k));
    }
    let client = client_from(&dps, "127.0.0.1");
    // Wrong keys for d0 do not use its allowance.
    let wrong = dps.device_token("d0", &key(50));
    for _ in 0..3 {
        assert_eq!(register_via(&dps, &client, "d0", &wrong).await.0, 401);
    }
    assert_eq!(register_via(&dps, &client, "d0", &tokens[0]).await.0, 202);
    assert_eq!(register_via(&dps, &client, "d0", &tokens[0]).await.0, 202);
    let (status, retry, body) = register_via(&dps, &client, "d0", &tokens[0]).await;
    assert_eq!((status, retry.as_deref()), (429, Some("1")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("too many requests for registration ID 'd0'"), "{body}");
    // Over MQTT: the 429 response topic with retry-after.
    let mut c = RawMqtt::tls(&dps).await;
    assert_eq!(c.connect(connect_packet(&dps, "d0", Some(&tokens[0]))).await, 0);
    c.subscribe().await;
    let (topic, body) = c.request(&format!("{REGISTER}7"), b"{}", Some(1)).await;
    assert_eq!(topic, "$dps/registrations/res/429/?$rid=7&retry-after=1", "{body}");
    assert_eq!(body["errorCode"], 429001);
    // The instance ceiling: 4 registrations at once, d0 took 2 of them.
    assert_eq!(register_via(&dps, &client, "d1", &tokens[1]).await.0, 202);
    assert_eq!(register_via(&dps, &client, "d2", &tokens[2]).await.0, 202);
    let (status, _, body) = register_via(&dps, &client, "d3", &tokens[3]).await;
    assert_eq!(status, 429, "{body}");
    assert!(body["message"].as_str().unwrap().contains("as many registrations as it is set to"), "{body}");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(register_via(&dps, &client, "d3", &tokens[3]).await.0, 202, "after Retry-After");
}

async fn idle_from(source: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closed this connection within `within` (it never sent anything).
async fn closed_within(stream: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 64];
    matches!(tokio::time::timeout(within, stream.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
}

async fn query_via(dps: &Dps, client: &reqwest::Client) -> Result<u16, reqwest::Error> {
    let resp = client
        .post(dps.url(&format!("/enrollments/query?{}", common::API)))
        .header("Authorization", dps.service_token())
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

/// Connections that never finish a TLS handshake cannot keep real clients out: at the cap the
/// oldest unfinished handshake is shed, so a real client is served at once; past half the cap
/// handshakes get the short budget; and no single address may hold more than its share.
#[tokio::test]
async fn idle_sockets_do_not_starve_real_clients() {
    use std::time::{Duration, Instant};
    let dps = Dps::start("[limits]\nmax_connections = 50\nbusy_handshake_timeout_ms = 700\n").await;
    let addr = dps.addr;
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(idle_from("127.0.0.1", addr).await);
    }
    // A real client is not left in the backlog until the handshake timeout clears them.
    let client = client_from(&dps, "127.0.0.1");
    let started = Instant::now();
    assert_eq!(query_via(&dps, &client).await.unwrap(), 200);
    assert!(started.elapsed() < Duration::from_secs(2), "served after {:?}", started.elapsed());
    // The oldest silent connections were the ones shed for the newer ones.
    assert!(closed_within(&mut idle[0], Duration::from_millis(500)).await, "the oldest was shed");
    drop(idle);
    drop(dps);

    // Past half the cap, handshakes get busy_handshake_timeout_ms (700 ms), not 10 s (a fresh
    // server, so that the connections above cannot still count).
    let dps = Dps::start("[limits]\nmax_connections = 50\nbusy_handshake_timeout_ms = 700\n").await;
    let addr = dps.addr;
    let mut quiet = Vec::new();
    for _ in 0..25 {
        quiet.push(idle_from("127.0.0.1", addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut late = idle_from("127.0.0.1", addr).await;
    let started = Instant::now();
    assert!(closed_within(&mut late, Duration::from_secs(3)).await, "closed after the busy budget");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(!closed_within(&mut quiet[0], Duration::from_millis(100)).await, "admitted before half: the full 10 s");
    drop(quiet);
    drop(dps);

    // Per source address: HTTPS and MQTT.
    let dps = Dps::start("[limits]\nmax_connections_per_address = 5\n[mqtt]\nmax_connections_per_address = 3\n").await;
    let mqtt: std::net::SocketAddr = dps.creds["mqttAddress"].as_str().unwrap().parse().unwrap();
    let mut mine = Vec::new();
    for _ in 0..5 {
        mine.push(idle_from("127.0.0.1", dps.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut sixth = idle_from("127.0.0.1", dps.addr).await;
    assert!(closed_within(&mut sixth, Duration::from_millis(500)).await, "refused at accept");
    assert!(query_via(&dps, &client_from(&dps, "127.0.0.1")).await.is_err(), "this address is full");
    assert_eq!(query_via(&dps, &client_from(&dps, "127.0.0.2")).await.unwrap(), 200, "another address is not");
    for _ in 0..3 {
        mine.push(idle_from("127.0.0.1", mqtt).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = idle_from("127.0.0.1", mqtt).await;
    assert!(closed_within(&mut fourth, Duration::from_millis(500)).await, "MQTT: refused at accept");
    assert!(!closed_within(&mut mine[0], Duration::from_millis(100)).await, "the admitted ones stay");
    drop(mine);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(query_via(&dps, &client_from(&dps, "127.0.0.1")).await.unwrap(), 200, "free again");
    assert!(dps.log().contains("the connection limit per source address is reached"));
}

/// Connection caps fit the file-descriptor limit (set caps that cannot are refused at start),
/// and running out of descriptors does not stop the accept loop.
#[tokio::test]
async fn connection_caps_fit_the_descriptor_limit_and_emfile_does_not_stop_accepting() {
    use std::process::Command;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let write = |extra: &str| {
        let path = dir.path().join("dps.toml");
        std::fs::write(
            &path,
            format!(
                "data_dir = {:?}\n[listen]\nhttps = \"127.0.0.1:0\"\nmqtt = \"127.0.0.1:0\"\namqp = \"127.0.0.1:0\"\n{extra}",
                dir.path().join("data").display().to_string()
            ),
        )
        .unwrap();
        path
    };
    // Set caps that do not fit under a hard limit of 1000: refused, saying what to change.
    let config = write("[limits]\nmax_connections = 5000\n");
    let out = output_within(
        Command::new("prlimit")
            .args(["--nofile=1000:1000", env!("CARGO_BIN_EXE_dps"), "serve", "--config"])
            .arg(&config),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("limits.max_connections (5000)") && err.contains("may open 1000"), "{err}");
    // Unset caps are fitted to it: 1000 - 128 - 256 (webhooks) = 616, a fifth for HTTPS, the
    // rest split between MQTT and AMQP.
    let config = write("");
    let log = std::fs::File::create(dir.path().join("fit.log")).unwrap();
    let mut child = Command::new("prlimit")
        .args(["--nofile=1000:1000", env!("CARGO_BIN_EXE_dps"), "serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(dir.path().join("fit.log")).unwrap_or_default();
        if text.contains("dps serving") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "did not start: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(text.contains("connection caps https=123 mqtt=246 amqp=246 descriptor_limit=1000"), "{text}");

    // Out of descriptors at run time (the soft limit lowered under the running server).
    let dps = Dps::start("").await;
    let pid = dps.creds["pid"].as_u64().unwrap();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let lower = Command::new("prlimit").arg(format!("--pid={pid}")).arg(format!("--nofile={}:", open_fds + 8)).status();
    assert!(lower.unwrap().success());
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(idle_from("127.0.0.1", dps.addr).await);
    }
    let mut closed = 0;
    for s in &mut flood {
        if closed_within(s, Duration::from_millis(200)).await {
            closed += 1;
        }
    }
    assert!(closed >= 25, "connections beyond the limit are closed at once, not left waiting ({closed} of 40)");
    drop(flood);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still accepting: a real client is served once descriptors are free again.
    assert_eq!(query_via(&dps, &client_from(&dps, "127.0.0.1")).await.unwrap(), 200);
    assert!(dps.log().contains("out of file descriptors"), "{}", dps.log());
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let hard = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().nth(4).unwrap();
    let restore = Command::new("prlimit").arg(format!("--pid={pid}")).arg(format!("--nofile={hard}:")).status();
    assert!(restore.unwrap().success());
    assert_eq!(query_via(&dps, &client_from(&dps, "127.0.0.1")).await.unwrap(), 200);
}

/// A full disk: writes get 503001 with Retry-After, the log says so a bounded number of times
/// (not two lines per request), nothing half-written is acknowledged, and registrations work
/// again once there is room.
#[tokio::test]
async fn a_full_disk_is_logged_a_bounded_number_of_times_and_recovers() {
    let dps = Dps::start_on_tmpfs("[device]\nauth_failure_delay_ms = 0\n", 8).await;
    let k = key(1);
    dps.put_enrollment(json!({"registrationId": "d", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let token = dps.device_token("d", &k);
    assert_eq!(dps.register("d", Some(&token), json!({})).await.0, 202);
    // Fill the file system.
    let filler = dps.host_path(&dps.data_dir().join("filler"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).and_then(|()| f.sync_data()).is_ok() {}
    }
    let mut unavailable = 0;
    for _ in 0..60 {
        let (status, headers, body) =
            dps.register("d", Some(&token), json!({"payload": {"n": "x".repeat(2000)}})).await;
        if status == 503 {
            assert_eq!(body["errorCode"], 503001, "{body}");
            assert_eq!(headers["retry-after"], "5");
            unavailable += 1;
        } else {
            assert_eq!(status, 202, "{body}");
        }
    }
    assert!(unavailable >= 50, "the disk is full: {unavailable} of 60 refused");
    let log = dps.log();
    let warns = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warns <= 45, "rate-limited: {warns} WARN lines for {unavailable} failed requests");
    assert!(log.contains("disk full"), "the cause is logged");
    // Room again: registrations work, and the store kept what it acknowledged.
    std::fs::remove_file(&filler).unwrap();
    let (status, _, body) = dps.register("d", Some(&token), json!({})).await;
    assert_eq!(status, 202, "{body}");
    let state: Value = dps.service(Method::GET, "/registrations/d").send().await.unwrap().json().await.unwrap();
    assert_eq!(state["status"], "assigned", "{state}");
}

/// A service route in a rights table: what, method, path, body, the rights it needs and its
/// status when they are granted.
type Route = (&'static str, Method, String, Value, Vec<&'static str>, u16);

/// Every service API route needs its right, and only that: a table of routes × the policy of
/// each single right (and the owner). A caller without the right gets `401` `401002` naming the
/// missing right; one with it gets the route's own answer. `/certificates` needs ServiceConfig:
/// a policy that may verify a CA admits every device that CA issued.
#[tokio::test]
async fn every_service_route_needs_its_right() {
    let dps = Dps::start(&policies_toml()).await;
    let group_key = key(21);
    dps.put_group(json!({"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": group_key, "secondaryKey": key(22)}}}))
        .await;
    dps.put_enrollment(json!({"registrationId": "e", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": key(23), "secondaryKey": key(24)}}}))
        .await;
    let ca = common::pki::ca("Rights Test CA", None);
    let resp =
        dps.service(Method::PUT, "/certificates/ca").json(&json!({"certificate": ca.pem()})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let sk = json!({"type": "symmetricKey"});
    let mut owner_policy = vec![("provisioningserviceowner".to_string(), RIGHTS.to_vec())];
    owner_policy.extend(policies());
    for (name, rights) in owner_policy {
        let tag = name.to_ascii_lowercase();
        // A registration of its own for each policy, so that deletes have something to delete.
        let member = format!("{tag}-m");
        let (status, _, _) = dps
            .register(&member, Some(&dps.device_token(&member, &common::derive(&group_key, &member))), json!({}))
            .await;
        assert_eq!(status, 202);
        let routes: Vec<Route> = vec![
            ("get enrollment", Method::GET, "/enrollments/e".into(), Value::Null, vec!["EnrollmentRead"], 200),
            (
                "put enrollment",
                Method::PUT,
                format!("/enrollments/{tag}-e"),
                json!({"attestation": sk}),
                vec!["EnrollmentWrite"],
                200,
            ),
            (
                "delete enrollment",
                Method::DELETE,
                format!("/enrollments/{tag}-e"),
                Value::Null,
                vec!["EnrollmentWrite"],
                204,
            ),
            (
                "query enrollments",
                Method::POST,
                "/enrollments/query".into(),
                json!({"query": "*"}),
                vec!["EnrollmentRead"],
                200,
            ),
            (
                "bulk enrollments",
                Method::POST,
                "/enrollments".into(),
                json!({"mode": "create", "enrollments": [{"registrationId": format!("{tag}-b"), "attestation": sk}]}),
                vec!["EnrollmentWrite"],
                200,
            ),
            (
                "enrollment keys",
                Method::POST,
                "/enrollments/e/attestationmechanism".into(),
                Value::Null,
                vec!["EnrollmentRead", "EnrollmentWrite"],
                200,
            ),
            ("get group", Method::GET, "/enrollmentGroups/g".into(), Value::Null, vec!["EnrollmentRead"], 200),
            (
                "put group",
                Method::PUT,
                format!("/enrollmentGroups/{tag}-g"),
                json!({"attestation": sk}),
                vec!["EnrollmentWrite"],
                200,
            ),
            ("query groups", Method::POST, "/enrollmentGroups/query".into(), json!({}), vec!["EnrollmentRead"], 200),
            (
                "group keys",
                Method::POST,
                "/enrollmentGroups/g/attestationmechanism".into(),
                Value::Null,
                vec!["EnrollmentRead", "EnrollmentWrite"],
                200,
            ),
            (
                "get registration",
                Method::GET,
                format!("/registrations/{member}"),
                Value::Null,
                vec!["RegistrationStatusRead"],
                200,
            ),
            (
                "query registrations",
                Method::POST,
                "/registrations/g/query".into(),
                json!({}),
                vec!["RegistrationStatusRead"],
                200,
            ),
            (
                "delete registration",
                Method::DELETE,
                format!("/registrations/{member}"),
                Value::Null,
                vec!["RegistrationStatusWrite"],
                204,
            ),
            ("list certificates", Method::GET, "/certificates".into(), Value::Null, vec!["ServiceConfig"], 200),
            ("get certificate", Method::GET, "/certificates/ca".into(), Value::Null, vec!["ServiceConfig"], 200),
            (
                "put certificate",
                Method::PUT,
                format!("/certificates/{tag}-ca"),
                json!({"certificate": ca.pem()}),
                vec!["ServiceConfig"],
                200,
            ),
            (
                "verification code",
                Method::POST,
                format!("/certificates/{tag}-ca/generateVerificationCode"),
                Value::Null,
                vec!["ServiceConfig"],
                200,
            ),
            (
                "verify certificate",
                Method::POST,
                format!("/certificates/{tag}-ca/verify"),
                json!({"certificate": ca.pem()}),
                vec!["ServiceConfig"],
                400,
            ),
            (
                "delete certificate",
                Method::DELETE,
                format!("/certificates/{tag}-ca"),
                Value::Null,
                vec!["ServiceConfig"],
                204,
            ),
        ];
        for (what, method, path, body, needs, allowed) in routes {
            let mut req = if name == "provisioningserviceowner" {
                dps.service(method, &path)
            } else {
                as_policy(&dps, &name, method, &path)
            };
            if !body.is_null() {
                req = req.json(&body);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            match needs.iter().find(|r| !rights.contains(r)) {
                Some(missing) => {
                    assert_eq!(status, 401, "{name}: {what}: {text}");
                    let err: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(err["errorCode"], 401002, "{name}: {what}: {text}");
                    assert!(
                        err["message"].as_str().unwrap().contains(&format!("lacks the {missing} right")),
                        "{name}: {what}: {text}"
                    );
                }
                None => assert_eq!(status, allowed, "{name}: {what}: {text}"),
            }
        }
    }
}

/// A policy's secondary key signs tokens as well as its primary; a token expired for longer
/// than the allowed clock skew, a token from another key and a token for another policy name
/// are refused alike.
#[tokio::test]
async fn service_tokens_secondary_keys_and_expiry() {
    use base64::Engine as _;
    let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    let (primary, secondary) = ([5u8; 32], [6u8; 32]);
    let dps = Dps::start(&format!(
        "[[service.policies]]\nname = \"ops\"\nprimary_key = \"{}\"\nsecondary_key = \"{}\"\nrights = [\"EnrollmentRead\"]\n",
        b64(&primary),
        b64(&secondary)
    ))
    .await;
    let get = |token: String| {
        dps.client.get(dps.url(&format!("/enrollments/nobody?{}", common::API))).header("Authorization", token).send()
    };
    let token = |k: &[u8], expiry: u64, name: &str| dps_proto::sas::build_token("localhost", k, expiry, Some(name));
    for (what, t, status) in [
        ("primary key", token(&primary, now() + 600, "ops"), 404),
        ("secondary key", token(&secondary, now() + 600, "ops"), 404),
        ("expired, primary key", token(&primary, now() - 3600, "ops"), 401),
        ("expired, secondary key", token(&secondary, now() - 3600, "ops"), 401),
        ("another key", token(&[7u8; 32], now() + 600, "ops"), 401),
        ("the owner's name with this key", token(&secondary, now() + 600, "provisioningserviceowner"), 401),
    ] {
        let resp = get(t).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let err: Value = resp.json().await.unwrap();
        let code = if status == 404 { 404201 } else { 401002 };
        assert_eq!(err["errorCode"], code, "{what}: {err}");
    }
    let log = dps.log();
    assert!(log.lines().any(|l| l.contains("service API authentication failed") && l.contains("expired")), "{log}");
}
