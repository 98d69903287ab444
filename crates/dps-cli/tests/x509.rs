//! X.509 attestation through a spawned dps, over HTTPS and MQTT, with a PKI made by the test:
//! individual (self-signed) and group enrollments, the certificate store with proof of
//! possession, resolution order, and every refusal.

mod common;

use common::mqtt::{connect_packet, RawMqtt, REGISTER};
use common::pki::{ca, ca_valid, ca_with_path_len, device, device_with_ekus, end_entity_issuer, verification, Issued};
use common::Dps;
use serde_json::{json, Value};

struct Pki {
    root: Issued,
    inter: Issued,
}

async fn register(dps: &Dps, leaf: &Issued, extra_chain: &str, id: &str) -> (u16, Value) {
    let client = dps.client_with_certificate(&format!("{}{extra_chain}", leaf.pem()), &leaf.key.serialize_pem());
    dps.register_as(&client, id, json!({"registrationId": id, "payload": {"m": 1}})).await
}

async fn upload_and_prove(dps: &Dps, name: &str, ca: &Issued) {
    let put = |body: Value| dps.service(reqwest::Method::PUT, &format!("/certificates/{name}")).json(&body);
    let resp = put(json!({"certificate": ca.pem()})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let c: Value = resp.json().await.unwrap();
    assert_eq!(c["properties"]["isVerified"], false);
    let resp = dps
        .service(reqwest::Method::POST, &format!("/certificates/{name}/generateVerificationCode"))
        .header("If-Match", c["etag"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let c: Value = resp.json().await.unwrap();
    let code = c["properties"]["verificationCode"].as_str().unwrap().to_string();
    // A verification certificate with the wrong CN, or signed by another key, is refused.
    let other = common::pki::ca("someone else", None);
    for (bad, needle) in
        [(verification("WRONG", ca), "must be the verification code"), (verification(&code, &other), "not signed by")]
    {
        let resp = dps
            .service(reqwest::Method::POST, &format!("/certificates/{name}/verify"))
            .json(&json!({"certificate": bad.pem()}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let err: Value = resp.json().await.unwrap();
        assert!(err["message"].as_str().unwrap().contains(needle), "{err}");
    }
    let resp = dps
        .service(reqwest::Method::POST, &format!("/certificates/{name}/verify"))
        .json(&json!({"certificate": verification(&code, ca).pem()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let c: Value = resp.json().await.unwrap();
    assert_eq!(c["properties"]["isVerified"], true, "{c}");
}

/// The message for every refusal that depends on what is enrolled.
const NOT_ACCEPTED: &str = "the device certificate is not accepted for registration ID";

#[tokio::test]
async fn individual_and_group_x509_over_https() {
    let dps = Dps::start("[[hubs]]\nhost_name = \"hub-a.test\"\n").await;
    let pki = Pki { root: ca("Test Root CA", None), inter: ca("Test Intermediate CA", None) };
    let pki = Pki { inter: ca("Test Intermediate CA", Some(&pki.root)), root: pki.root };

    // Individual, self-signed, pinned by the enrollment.
    let self_signed = device("x509-solo", None, (-1, 30));
    let e = dps
        .put_enrollment(json!({"registrationId": "x509-solo", "attestation": {"type": "x509",
            "x509": {"clientCertificates": {"primary": {"certificate": self_signed.pem()}}}}}))
        .await;
    assert_eq!(
        e["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["subjectName"], "CN=x509-solo",
        "the service fills in the certificate info: {e}"
    );
    let (status, body) = register(&dps, &self_signed, "", "x509-solo").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "assigned", "{body}");
    assert_eq!(body["registrationState"]["x509"], json!({}));
    assert_eq!(body["registrationState"]["assignedHub"], "hub-a.test");
    // Another self-signed certificate with the same CN is not the enrolled one.
    let impostor = device("x509-solo", None, (-1, 30));
    let (status, body) = register(&dps, &impostor, "", "x509-solo").await;
    assert_eq!(status, 401, "{body}");
    // The device is not told that an enrollment exists for its ID; the log says why.
    assert!(body["message"].as_str().unwrap().contains(NOT_ACCEPTED), "{body}");
    assert!(dps.log().contains("is not a client certificate of the individual enrollment"), "{}", dps.log());

    // A group whose signing certificate is the root: refused until the root is verified.
    dps.put_group(json!({"enrollmentGroupId": "x509-root-group", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": pki.root.pem()}}}}}))
        .await;
    let member = device("x509-member-1", Some(&pki.inter), (-1, 30));
    let (status, body) = register(&dps, &member, &pki.inter.pem(), "x509-member-1").await;
    assert_eq!(status, 401, "{body}");
    assert!(body["message"].as_str().unwrap().contains(NOT_ACCEPTED), "{body}");
    assert!(dps.log().contains("no certificate in the chain is verified"), "{}", dps.log());
    let member_identity = (vec![member.der(), pki.inter.der()], member.key.serialize_der());
    let mut c = RawMqtt::tls_with_certificate(&dps, &member_identity).await;
    assert_eq!(c.connect(connect_packet(&dps, "x509-member-1", None)).await, 5, "MQTT: CA not verified");
    upload_and_prove(&dps, "test-root", &pki.root).await;
    let (status, body) = register(&dps, &member, &pki.inter.pem(), "x509-member-1").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "assigned", "{body}");
    assert_eq!(body["registrationState"]["x509"], json!({"enrollmentGroupId": "x509-root-group"}));

    // A group on the intermediate is nearer the leaf, so it wins (docs/protocol-notes.md §7 order); a
    // group that references the verified root by name works the same way.
    dps.put_group(json!({"enrollmentGroupId": "x509-inter-group", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": pki.inter.pem()}}}}}))
        .await;
    let (_, body) = register(&dps, &member, &pki.inter.pem(), "x509-member-1").await;
    assert_eq!(body["registrationState"]["x509"], json!({"enrollmentGroupId": "x509-inter-group"}), "{body}");
    let resp = dps.service(reqwest::Method::DELETE, "/enrollmentGroups/x509-inter-group").send().await.unwrap();
    assert_eq!(resp.status(), 204);
    let resp = dps.service(reqwest::Method::DELETE, "/enrollmentGroups/x509-root-group").send().await.unwrap();
    assert_eq!(resp.status(), 204);
    dps.put_group(json!({"enrollmentGroupId": "x509-ref-group", "attestation": {"type": "x509",
        "x509": {"caReferences": {"primary": "test-root"}}}}))
        .await;
    let (_, body) = register(&dps, &member, &pki.inter.pem(), "x509-member-1").await;
    assert_eq!(body["registrationState"]["x509"], json!({"enrollmentGroupId": "x509-ref-group"}), "{body}");

    // Refusals: what the device's own certificate shows is named; whether it matches an
    // enrollment is not (the log has that reason).
    let stranger_ca = ca("Stranger CA", None);
    let cases: Vec<(Issued, String, &str, &str)> = vec![
        (device("x509-old", Some(&pki.inter), (-30, -1)), pki.inter.pem(), "x509-old", "expired"),
        (device("x509-future", Some(&pki.inter), (2, 30)), pki.inter.pem(), "x509-future", "not valid yet"),
        (
            device("x509-cn", Some(&pki.inter), (-1, 30)),
            pki.inter.pem(),
            "x509-other-id",
            "differs from the registration ID",
        ),
        (device("x509-stranger", Some(&stranger_ca), (-1, 30)), String::new(), "x509-stranger", NOT_ACCEPTED),
    ];
    for (leaf, extra, id, needle) in &cases {
        let (status, body) = register(&dps, leaf, extra, id).await;
        assert_eq!(status, 401, "{id}: {body}");
        assert_eq!(body["errorCode"], 401002, "{id}: {body}");
        assert!(body["message"].as_str().unwrap().contains(needle), "{id}: {body}");
    }
    assert!(dps.log().contains("no X.509 enrollment group whose CA the device's certificate chain leads to"));
    // A disabled individual enrollment revokes a group member.
    dps.put_enrollment(json!({"registrationId": "x509-member-1", "provisioningStatus": "disabled",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": device("x509-member-1", None, (-1, 2)).pem()}}}}}))
        .await;
    let (status, body) = register(&dps, &member, &pki.inter.pem(), "x509-member-1").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "disabled", "{body}");
    // Over MQTT too: connected, then told `disabled`.
    let mut c = RawMqtt::tls_with_certificate(&dps, &member_identity).await;
    assert_eq!(c.connect(connect_packet(&dps, "x509-member-1", None)).await, 0);
    c.subscribe().await;
    let (_, body) = c.request(&format!("{REGISTER}1"), b"", Some(1)).await;
    assert_eq!(body["status"], "disabled", "{body}");

    // The certificate store lists what it holds; bad uploads say why.
    let list: Value = dps.service(reqwest::Method::GET, "/certificates").send().await.unwrap().json().await.unwrap();
    assert_eq!(list["value"][0]["name"], "test-root", "{list}");
    let resp = dps
        .service(reqwest::Method::PUT, "/certificates/leaf")
        .json(&json!({"certificate": member.pem()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("not a CA certificate"));
    // Enrollments with a broken certificate are refused at write time.
    let resp = dps
        .service(reqwest::Method::PUT, "/enrollments/x509-bad")
        .json(&json!({"registrationId": "x509-bad", "attestation": {"type": "x509",
            "x509": {"clientCertificates": {"primary": {"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"}}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("clientCertificates.primary.certificate"));
}

#[tokio::test]
async fn x509_over_mqtt() {
    // A rule set that allocates by the certificate's issuer.
    let dps = Dps::start(
        "[x509]\nrequire_verified_ca = false\n[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n\
         [[rules]]\nname = \"by-issuer\"\n[[rules.cases]]\nwhen = \"certificate.certificateInfo.issuerName == 'CN=MQTT Intermediate'\"\n\
         hub = \"'hub-b.test'\"\npayload = \"{'issuer': certificate.certificateInfo.issuerName, 'next': certificate.signingCertificateInfo.subjectName}\"\n",
    )
    .await;
    let root = ca("MQTT Root", None);
    let inter = ca("MQTT Intermediate", Some(&root));
    dps.put_group(json!({"enrollmentGroupId": "mqtt-x509", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": root.pem()}}}},
        "allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": "rules://by-issuer", "apiVersion": "2021-10-01"}}))
        .await;
    let identity = |leaf: &Issued| (vec![leaf.der(), inter.der()], leaf.key.serialize_der());

    let good = device("mqtt-x509-1", Some(&inter), (-1, 30));
    let mut c = RawMqtt::tls_with_certificate(&dps, &identity(&good)).await;
    assert_eq!(c.connect(connect_packet(&dps, "mqtt-x509-1", None)).await, 0);
    c.subscribe().await;
    let (topic, body) = c.request(&format!("{REGISTER}1"), br#"{"registrationId":"mqtt-x509-1"}"#, Some(1)).await;
    assert_eq!(topic, "$dps/registrations/res/202/?$rid=1");
    assert_eq!(body["status"], "assigned", "{body}");
    assert_eq!(body["registrationState"]["x509"], json!({"enrollmentGroupId": "mqtt-x509"}));
    assert_eq!(body["registrationState"]["assignedHub"], "hub-b.test", "the rule saw the certificate");
    assert_eq!(
        body["registrationState"]["payload"],
        json!({"issuer": "CN=MQTT Intermediate", "next": "CN=MQTT Intermediate"})
    );

    for (leaf, id) in [
        (device("mqtt-x509-old", Some(&inter), (-30, -1)), "mqtt-x509-old"),
        (device("mqtt-x509-future", Some(&inter), (2, 30)), "mqtt-x509-future"),
        (device("mqtt-x509-cn", Some(&inter), (-1, 30)), "mqtt-x509-other"),
        (device("mqtt-x509-self", None, (-1, 30)), "mqtt-x509-self"),
    ] {
        let mut c = RawMqtt::tls_with_certificate(&dps, &identity(&leaf)).await;
        assert_eq!(c.connect(connect_packet(&dps, id, None)).await, 5, "{id}");
        c.expect_closed(id).await;
    }
    let log = dps.log();
    for needle in ["expired", "not valid yet", "differs from the registration ID", "X.509 authentication refused"] {
        assert!(log.contains(needle), "log lacks '{needle}'");
    }
}

/// `dps cert` works on the data directory of a running server.
#[tokio::test]
async fn the_cert_cli_uploads_and_proves_a_ca() {
    let dps = Dps::start("").await;
    let root = ca("CLI Root", None);
    let inter = ca("CLI Intermediate", Some(&root));
    dps.put_group(json!({"enrollmentGroupId": "cli-group", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": inter.pem()}}}}}))
        .await;
    let member = device("cli-member", Some(&inter), (-1, 30));
    let (status, _) = register(&dps, &member, &inter.pem(), "cli-member").await;
    assert_eq!(status, 401, "not verified yet");

    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("inter.pem");
    std::fs::write(&ca_file, inter.pem()).unwrap();
    let dps_cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dps"))
            .args(["cert", "--data-dir"])
            .arg(dps.data_dir())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = dps_cli(&["add", "cli-inter", ca_file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"isVerified\": false"), "{out}");
    let (code, out, err) = dps_cli(&["verification-code", "cli-inter"]);
    assert_eq!(code, Some(0), "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    let code_text = shown["properties"]["verificationCode"].as_str().unwrap();
    let proof = files.path().join("proof.pem");
    std::fs::write(&proof, verification(code_text, &inter).pem()).unwrap();
    let (code, out, err) = dps_cli(&["verify", "cli-inter", proof.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"isVerified\": true"), "{out}");
    // Another process's write to the store reaches the server's cache within the store's
    // refresh time (dps_store::OTHER_WRITERS_SEEN_WITHIN, 100 ms).
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (status, body) = register(&dps, &member, &inter.pem(), "cli-member").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "assigned");
    // Errors name the problem and exit non-zero.
    let (code, _, err) = dps_cli(&["show", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no certificate named 'nope'"), "{err}");
    let (code, _, err) = dps_cli(&["add", "x", "/nonexistent.pem"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot read /nonexistent.pem"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Refusals that depend on the chain itself (docs/x509.md, "Refusals"): each case has a twin
// that differs only in the property under test and is accepted, so a refusal for another
// reason (or an acceptance by name only) shows up.

/// The exact message of every refusal that depends on what is enrolled (docs/x509.md).
fn not_accepted_message(id: &str) -> String {
    format!(
        "the device certificate is not accepted for registration ID '{id}': it must be an individual \
         enrollment's client certificate, or chain to an enrollment group's CA that is verified in the \
         certificate store"
    )
}

/// Uploads `ca` to the certificate store as verified (the operator's shortcut).
async fn trust(dps: &Dps, name: &str, ca: &Issued) {
    let resp = dps
        .service(reqwest::Method::PUT, &format!("/certificates/{name}"))
        .json(&json!({"certificate": ca.pem(), "isVerified": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let c: Value = resp.json().await.unwrap();
    assert_eq!(c["properties"]["isVerified"], true, "{c}");
}

/// An X.509 group whose signing certificate is `ca`, on `hub`.
async fn x509_group(dps: &Dps, id: &str, ca: &Issued, hub: &str) {
    dps.put_group(json!({"enrollmentGroupId": id, "iotHubs": [hub], "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": ca.pem()}}}}}))
        .await;
}

/// The chain a device sends: the leaf, then `extra` in order.
fn chain_pem(leaf: &Issued, extra: &[&Issued]) -> String {
    std::iter::once(leaf).chain(extra.iter().copied()).map(Issued::pem).collect()
}

fn mqtt_identity(leaf: &Issued, extra: &[&Issued]) -> common::mqtt::ClientIdentity {
    (std::iter::once(leaf).chain(extra.iter().copied()).map(Issued::der).collect(), leaf.key.serialize_der())
}

/// Registers `id` over HTTPS presenting `leaf` + `extra`, optionally with a SAS token too.
async fn register_chain(dps: &Dps, id: &str, leaf: &Issued, extra: &[&Issued], token: Option<&str>) -> (u16, Value) {
    let client = dps.client_with_certificate(&chain_pem(leaf, extra), &leaf.key.serialize_pem());
    let url = dps.url(&format!("/{}/registrations/{id}/register?api-version=2019-03-31", dps.scope()));
    let mut req = client.put(url).json(&json!({"registrationId": id}));
    if let Some(t) = token {
        req = req.header("Authorization", t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Asserts an accepted X.509 registration through group `group` on `hub`.
fn assert_assigned_by_group(id: &str, status: u16, body: &Value, group: &str, hub: &str) {
    assert_eq!(status, 202, "{id}: {body}");
    assert_eq!(body["status"], "assigned", "{id}: {body}");
    assert_eq!(body["registrationState"]["x509"], json!({"enrollmentGroupId": group}), "{id}: {body}");
    assert_eq!(body["registrationState"]["assignedHub"], hub, "{id}: {body}");
}

/// Asserts the uniform refusal (401, 401002, the exact message).
fn assert_not_accepted(id: &str, status: u16, body: &Value) {
    assert_eq!(status, 401, "{id}: {body}");
    assert_eq!(body["errorCode"], 401002, "{id}: {body}");
    assert_eq!(body["message"], not_accepted_message(id), "{id}: {body}");
}

/// The `reason` of the server log's `X.509 authentication refused` line for `id` (waits up to
/// 5 s for it to be written; panics with the log when there is none, or more than one).
async fn refusal_reason(dps: &Dps, id: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let id_field = format!("registration_id=\"{id}\"");
    loop {
        let log = dps.log();
        let lines: Vec<&str> =
            log.lines().filter(|l| l.contains("X.509 authentication refused") && l.contains(&id_field)).collect();
        match lines.as_slice() {
            [line] => {
                let (_, reason) = line.split_once(" reason=").unwrap_or_else(|| panic!("no reason in: {line}"));
                return reason.trim_end().to_string();
            }
            [] if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            _ => panic!("expected one refusal line for '{id}', found {}:\n{log}", lines.len()),
        }
    }
}

/// Connects over MQTT presenting the chain, without a password; returns the CONNACK code and
/// (when refused) checks that the server closes the connection.
async fn mqtt_connect(dps: &Dps, id: &str, leaf: &Issued, extra: &[&Issued]) -> u8 {
    let mut c = RawMqtt::tls_with_certificate(dps, &mqtt_identity(leaf, extra)).await;
    let code = c.connect(connect_packet(dps, id, None)).await;
    if code != 0 {
        c.expect_closed(id).await;
    }
    code
}

async fn delete_group(dps: &Dps, id: &str) {
    let resp = dps.service(reqwest::Method::DELETE, &format!("/enrollmentGroups/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 204, "{id}");
}

const HUB: &str = "hub-a.test";
const ONE_HUB: &str = "[[hubs]]\nhost_name = \"hub-a.test\"\n";

/// A CA with the same subject DN as the group's verified CA but another key signs the device
/// certificate: the chain is judged by signature, not by name.
#[tokio::test]
async fn a_forged_issuer_with_the_ca_name_is_refused() {
    let dps = Dps::start(ONE_HUB).await;
    let root = ca("Forge Test Root", None);
    let forged = ca("Forge Test Root", None);
    assert_eq!(root.cert.params().distinguished_name, forged.cert.params().distinguished_name);
    assert_ne!(root.key.public_key_der(), forged.key.public_key_der());
    trust(&dps, "forge-root", &root).await;
    x509_group(&dps, "forge-group", &root, HUB).await;

    // The twin: the same shape, signed by the real root's key.
    let genuine = device("forge-genuine", Some(&root), (-1, 30));
    let (status, body) = register_chain(&dps, "forge-genuine", &genuine, &[], None).await;
    assert_assigned_by_group("forge-genuine", status, &body, "forge-group", HUB);

    // The leaf alone, and the leaf with the forged root (a self-signed "Forge Test Root").
    for (id, extra) in [("forge-alone", vec![]), ("forge-with-ca", vec![&forged])] {
        let leaf = device(id, Some(&forged), (-1, 30));
        let (status, body) = register_chain(&dps, id, &leaf, &extra, None).await;
        assert_not_accepted(id, status, &body);
        assert_eq!(refusal_reason(&dps, id).await, "group 'forge-group': a signature in the chain does not verify");
    }
    for (id, extra) in [("forge-mqtt-alone", vec![]), ("forge-mqtt-with-ca", vec![&forged])] {
        let leaf = device(id, Some(&forged), (-1, 30));
        assert_eq!(mqtt_connect(&dps, id, &leaf, &extra).await, 5, "{id}");
        assert_eq!(refusal_reason(&dps, id).await, "group 'forge-group': a signature in the chain does not verify");
    }
    let genuine_mqtt = device("forge-mqtt-genuine", Some(&root), (-1, 30));
    assert_eq!(mqtt_connect(&dps, "forge-mqtt-genuine", &genuine_mqtt, &[]).await, 0);
}

/// The device's issuer is an end-entity certificate with keyCertSign (basicConstraints
/// `cA=false`, or none at all) signed by the group's CA; and the device certificate itself
/// is a CA.
#[tokio::test]
async fn an_end_entity_certificate_cannot_act_as_a_ca() {
    let dps = Dps::start(ONE_HUB).await;
    let root = ca("EE Test Root", None);
    trust(&dps, "ee-root", &root).await;
    x509_group(&dps, "ee-group", &root, HUB).await;

    // The twin: a real CA in the issuer's place.
    let real_ca = ca("EE Real Intermediate", Some(&root));
    let member = device("ee-genuine", Some(&real_ca), (-1, 30));
    let (status, body) = register_chain(&dps, "ee-genuine", &member, &[&real_ca], None).await;
    assert_assigned_by_group("ee-genuine", status, &body, "ee-group", HUB);

    const REASON: &str = "group 'ee-group': an end-entity certificate is used as a CA in the chain";
    for (explicit, id) in [(true, "ee-explicit"), (false, "ee-no-constraints")] {
        let issuer = end_entity_issuer(&format!("EE issuer {id}"), &root, explicit);
        let leaf = device(id, Some(&issuer), (-1, 30));
        let (status, body) = register_chain(&dps, id, &leaf, &[&issuer], None).await;
        assert_not_accepted(id, status, &body);
        assert_eq!(refusal_reason(&dps, id).await, REASON, "{id}");
        let mqtt_id = format!("{id}-mqtt");
        let leaf = device(&mqtt_id, Some(&issuer), (-1, 30));
        assert_eq!(mqtt_connect(&dps, &mqtt_id, &leaf, &[&issuer]).await, 5, "{mqtt_id}");
        assert_eq!(refusal_reason(&dps, &mqtt_id).await, REASON, "{mqtt_id}");
    }

    // The device certificate is a CA itself (CN = the registration ID, signed by the root).
    let ca_leaf = ca("ee-ca-leaf", Some(&root));
    let (status, body) = register_chain(&dps, "ee-ca-leaf", &ca_leaf, &[], None).await;
    assert_not_accepted("ee-ca-leaf", status, &body);
    assert_eq!(
        refusal_reason(&dps, "ee-ca-leaf").await,
        "group 'ee-group': the device certificate is a CA certificate (basicConstraints cA=true)"
    );
}

/// The group's CA is a root with `pathLenConstraint`; it signs an intermediate that signs the
/// device certificate. 1 allows that intermediate, 0 does not (docs/x509.md: "CA basic
/// constraints and path length").
#[tokio::test]
async fn the_path_length_of_the_groups_root_is_enforced() {
    let dps = Dps::start(ONE_HUB).await;
    // pathLenConstraint 1: accepted.
    let root1 = ca_with_path_len("PathLen 1 Root", None, 1);
    let inter1 = ca("PathLen 1 Intermediate", Some(&root1));
    trust(&dps, "pl1-root", &root1).await;
    x509_group(&dps, "pl1-group", &root1, HUB).await;
    let leaf = device("pl1-device", Some(&inter1), (-1, 30));
    let (status, body) = register_chain(&dps, "pl1-device", &leaf, &[&inter1], None).await;
    assert_assigned_by_group("pl1-device", status, &body, "pl1-group", HUB);

    // pathLenConstraint 0, same shape: refused.
    let root0 = ca_with_path_len("PathLen 0 Root", None, 0);
    let inter0 = ca("PathLen 0 Intermediate", Some(&root0));
    trust(&dps, "pl0-root", &root0).await;
    x509_group(&dps, "pl0-group", &root0, HUB).await;
    const REASON: &str = "group 'pl0-group': the chain is longer than a CA's pathLenConstraint allows";
    let leaf = device("pl0-device", Some(&inter0), (-1, 30));
    let (status, body) = register_chain(&dps, "pl0-device", &leaf, &[&inter0], None).await;
    assert_not_accepted("pl0-device", status, &body);
    assert_eq!(refusal_reason(&dps, "pl0-device").await, REASON);
    let leaf = device("pl0-mqtt", Some(&inter0), (-1, 30));
    assert_eq!(mqtt_connect(&dps, "pl0-mqtt", &leaf, &[&inter0]).await, 5);
    assert_eq!(refusal_reason(&dps, "pl0-mqtt").await, REASON);
}

/// The same rule one level down: an intermediate with `pathLenConstraint` between the group's
/// root and a second intermediate that signs the device certificate.
#[tokio::test]
async fn the_path_length_of_an_intermediate_is_enforced() {
    let dps = Dps::start(ONE_HUB).await;
    let root = ca("Inner PathLen Root", None);
    trust(&dps, "ipl-root", &root).await;
    x509_group(&dps, "ipl-group", &root, HUB).await;
    for (path_len, id) in [(1, "ipl-1"), (0, "ipl-0")] {
        let upper = ca_with_path_len(&format!("Upper {id}"), Some(&root), path_len);
        let lower = ca(&format!("Lower {id}"), Some(&upper));
        let leaf = device(id, Some(&lower), (-1, 30));
        let (status, body) = register_chain(&dps, id, &leaf, &[&lower, &upper], None).await;
        if path_len == 1 {
            assert_assigned_by_group(id, status, &body, "ipl-group", HUB);
        } else {
            assert_not_accepted(id, status, &body);
            assert_eq!(
                refusal_reason(&dps, id).await,
                "group 'ipl-group': the chain is longer than a CA's pathLenConstraint allows"
            );
        }
    }
}

/// An extended key usage, when present, must allow client authentication; none at all is fine.
#[tokio::test]
async fn an_extended_key_usage_without_client_auth_is_refused() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let dps = Dps::start(ONE_HUB).await;
    let root = ca("EKU Test Root", None);
    trust(&dps, "eku-root", &root).await;
    x509_group(&dps, "eku-group", &root, HUB).await;

    for (id, ekus) in [("eku-none", vec![]), ("eku-both", vec![ServerAuth, ClientAuth])] {
        let leaf = device_with_ekus(id, &root, ekus);
        let (status, body) = register_chain(&dps, id, &leaf, &[], None).await;
        assert_assigned_by_group(id, status, &body, "eku-group", HUB);
    }
    const REASON: &str =
        "group 'eku-group': the device certificate's extended key usage does not allow client authentication";
    let leaf = device_with_ekus("eku-server", &root, vec![ServerAuth]);
    let (status, body) = register_chain(&dps, "eku-server", &leaf, &[], None).await;
    assert_not_accepted("eku-server", status, &body);
    assert_eq!(refusal_reason(&dps, "eku-server").await, REASON);
    let leaf = device_with_ekus("eku-server-mqtt", &root, vec![ServerAuth]);
    assert_eq!(mqtt_connect(&dps, "eku-server-mqtt", &leaf, &[]).await, 5);
    assert_eq!(refusal_reason(&dps, "eku-server-mqtt").await, REASON);
    let leaf = device_with_ekus("eku-none-mqtt", &root, vec![]);
    assert_eq!(mqtt_connect(&dps, "eku-none-mqtt", &leaf, &[]).await, 0);
}

/// docs/compatibility.md: "Token and certificate both present — the SAS token wins". A device
/// whose certificate an X.509 group accepts also sends a SAS token: the token alone decides.
#[tokio::test]
async fn a_sas_token_wins_over_the_client_certificate() {
    let dps = Dps::start("[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n").await;
    let root = ca("Both Test Root", None);
    trust(&dps, "both-root", &root).await;
    x509_group(&dps, "cert-group", &root, "hub-a.test").await;
    let group_key = common::key(7);
    dps.put_group(json!({"enrollmentGroupId": "sas-group", "iotHubs": ["hub-b.test"],
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}}))
        .await;
    let id = "both-1";
    let leaf = device(id, Some(&root), (-1, 30));
    let good_token = dps.device_token(id, &common::derive(&group_key, id));
    let bad_token = dps.device_token(id, &common::key(8));

    // The certificate alone: the X.509 group.
    let (status, body) = register_chain(&dps, id, &leaf, &[], None).await;
    assert_assigned_by_group(id, status, &body, "cert-group", "hub-a.test");
    // Certificate and a valid token: the symmetric-key group.
    let (status, body) = register_chain(&dps, id, &leaf, &[], Some(&good_token)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["registrationState"]["symmetricKey"], json!({"enrollmentGroupId": "sas-group"}), "{body}");
    assert_eq!(body["registrationState"]["x509"], Value::Null, "{body}");
    assert_eq!(body["registrationState"]["assignedHub"], "hub-b.test", "{body}");
    // Certificate and a bad token: refused as a SAS device, although the certificate is good.
    let sas_refusal = format!(
        "the SAS token is not accepted for registration ID '{id}': check the key (or the group key it is derived from) and the registration ID"
    );
    let (status, body) = register_chain(&dps, id, &leaf, &[], Some(&bad_token)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["errorCode"], 401002, "{body}");
    assert_eq!(body["message"], sas_refusal, "{body}");
    let log = dps.log();
    assert!(log.contains("SAS rejected: no individual enrollment and no group key matches"), "{log}");
    assert!(!log.contains("X.509 authentication refused"), "the certificate was not looked at: {log}");
    // A certificate no enrollment accepts (self-signed) does not spoil a valid token.
    let stranger = device(id, None, (-1, 30));
    let (status, body) = register_chain(&dps, id, &stranger, &[], Some(&good_token)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["registrationState"]["symmetricKey"], json!({"enrollmentGroupId": "sas-group"}), "{body}");

    // MQTT: the password is the token.
    let identity = mqtt_identity(&leaf, &[]);
    let mut c = RawMqtt::tls_with_certificate(&dps, &identity).await;
    assert_eq!(c.connect(connect_packet(&dps, id, Some(&bad_token))).await, 5, "certificate + bad token");
    c.expect_closed("certificate + bad token").await;
    for (token, state) in [
        (Some(good_token.as_str()), json!({"symmetricKey": {"enrollmentGroupId": "sas-group"}, "hub": "hub-b.test"})),
        (None, json!({"x509": {"enrollmentGroupId": "cert-group"}, "hub": "hub-a.test"})),
    ] {
        let mut c = RawMqtt::tls_with_certificate(&dps, &identity).await;
        assert_eq!(c.connect(connect_packet(&dps, id, token)).await, 0, "{state}");
        c.subscribe().await;
        let (_, body) = c.request(&format!("{REGISTER}1"), br#"{"registrationId":"both-1"}"#, Some(1)).await;
        assert_eq!(body["status"], "assigned", "{body}");
        let rs = &body["registrationState"];
        assert_eq!(rs["assignedHub"], state["hub"], "{body}");
        for kind in ["symmetricKey", "x509"] {
            assert_eq!(rs[kind], state[kind], "{kind}: {body}");
        }
    }
    assert!(!dps.log().contains("X.509 authentication refused"), "{}", dps.log());
}

/// Several verified groups whose CAs are in the device's chain: the CA nearest the leaf wins;
/// groups on the same CA tie, and the tie goes to the first group ID in case-insensitive order
/// (docs/compatibility.md: "ties by group ID").
#[tokio::test]
async fn the_group_nearest_the_leaf_wins_and_ties_go_by_group_id() {
    let dps = Dps::start(ONE_HUB).await;
    let root = ca("Tie Test Root", None);
    let upper = ca("Tie Test Upper", Some(&root));
    let lower = ca("Tie Test Lower", Some(&upper));
    trust(&dps, "tie-root", &root).await;
    // IDs sort opposite to nearness, so that the ID order alone would pick the farthest.
    x509_group(&dps, "a-root", &root, HUB).await;
    x509_group(&dps, "b-upper", &upper, HUB).await;
    x509_group(&dps, "c-lower", &lower, HUB).await;
    let leaf = device("tie-device", Some(&lower), (-1, 30));
    let sent: &[&Issued] = &[&lower, &upper];
    for (winner, then_delete) in [("c-lower", "c-lower"), ("b-upper", "b-upper"), ("a-root", "")] {
        let (status, body) = register_chain(&dps, "tie-device", &leaf, sent, None).await;
        assert_assigned_by_group("tie-device", status, &body, winner, HUB);
        if !then_delete.is_empty() {
            delete_group(&dps, then_delete).await;
        }
    }

    // Two groups on the first intermediate ("Tie-B" written first; "Tie-B" < "tie-a" in byte
    // order, "tie-a" < "tie-b" ignoring case), one by signing certificate, one by reference.
    x509_group(&dps, "Tie-B", &lower, HUB).await;
    trust(&dps, "tie-lower", &lower).await;
    dps.put_group(json!({"enrollmentGroupId": "tie-a", "iotHubs": [HUB], "attestation": {"type": "x509",
        "x509": {"caReferences": {"primary": "tie-lower"}}}}))
        .await;
    let (status, body) = register_chain(&dps, "tie-device", &leaf, sent, None).await;
    assert_assigned_by_group("tie-device", status, &body, "tie-a", HUB);
    // The same on a CA the device did not send (the issuer of the last certificate sent).
    delete_group(&dps, "tie-a").await;
    delete_group(&dps, "Tie-B").await;
    x509_group(&dps, "root-y", &root, HUB).await;
    x509_group(&dps, "ROOT-X", &root, HUB).await;
    let (status, body) = register_chain(&dps, "tie-device", &leaf, sent, None).await;
    assert_assigned_by_group("tie-device", status, &body, "a-root", HUB);
    delete_group(&dps, "a-root").await;
    let (status, body) = register_chain(&dps, "tie-device", &leaf, sent, None).await;
    assert_assigned_by_group("tie-device", status, &body, "ROOT-X", HUB);
}

/// The group's own CA is held to the rules of a CA in the chain: an expired (or not yet valid)
/// signing certificate admits no device, even when it is verified in the store.
#[tokio::test]
async fn an_expired_group_ca_admits_no_device() {
    let dps = Dps::start(ONE_HUB).await;
    for (group, days, reason) in [
        ("expired-group", (-30, -1), "group 'expired-group': the CA certificate expired at "),
        ("future-group", (2, 30), "group 'future-group': the CA certificate is not valid yet (valid from "),
    ] {
        let root = ca_valid(&format!("{group} root"), None, days);
        trust(&dps, group, &root).await;
        x509_group(&dps, group, &root, HUB).await;
        for (id, extra) in [(format!("{group}-alone"), vec![]), (format!("{group}-with-ca"), vec![&root])] {
            let leaf = device(&id, Some(&root), (-1, 30));
            let (status, body) = register_chain(&dps, &id, &leaf, &extra, None).await;
            assert_not_accepted(&id, status, &body);
            // (The log also names what the other group made of this chain.)
            let got = refusal_reason(&dps, &id).await;
            assert!(got.split("; ").any(|r| r.starts_with(reason)), "{id}: {got}");
        }
        let id = format!("{group}-mqtt");
        let leaf = device(&id, Some(&root), (-1, 30));
        assert_eq!(mqtt_connect(&dps, &id, &leaf, &[]).await, 5, "{id}");
    }
}

/// A group whose signing certificate is not verified admits a device only through a validated
/// path to a verified CA: a verified CA that the device merely sends along (verified CAs are
/// public) admits nothing; an unverified intermediate under a verified root admits its
/// devices, whether or not they send the intermediate.
#[tokio::test]
async fn a_verified_ca_sent_along_does_not_vouch_for_an_unverified_group_ca() {
    let dps = Dps::start(ONE_HUB).await;
    let unverified = ca("Unverified Group CA", None);
    let bystander = ca("Bystander Verified CA", None);
    trust(&dps, "bystander", &bystander).await;
    x509_group(&dps, "unverified-group", &unverified, HUB).await;
    let reason =
        "group 'unverified-group': the chain reaches its signing certificate 'CN=Unverified Group CA', but no \
                  certificate in the chain is verified in the certificate store (upload the CA and verify it, or set \
                  x509.require_verified_ca = false)";
    for (id, extra) in [("uv-alone", vec![]), ("uv-with-bystander", vec![&bystander])] {
        let leaf = device(id, Some(&unverified), (-1, 30));
        let (status, body) = register_chain(&dps, id, &leaf, &extra, None).await;
        assert_not_accepted(id, status, &body);
        assert_eq!(refusal_reason(&dps, id).await, reason, "{id}");
    }
    let leaf = device("uv-mqtt-bystander", Some(&unverified), (-1, 30));
    assert_eq!(mqtt_connect(&dps, "uv-mqtt-bystander", &leaf, &[&bystander]).await, 5);

    // The group's CA is an unverified intermediate of a verified root.
    let root = ca("Verified Root Above", None);
    let intermediate = ca("Unverified Intermediate", Some(&root));
    trust(&dps, "root-above", &root).await;
    x509_group(&dps, "under-root", &intermediate, HUB).await;
    for (id, extra) in [("ur-alone", vec![]), ("ur-with-intermediate", vec![&intermediate])] {
        let leaf = device(id, Some(&intermediate), (-1, 30));
        let (status, body) = register_chain(&dps, id, &leaf, &extra, None).await;
        assert_assigned_by_group(id, status, &body, "under-root", HUB);
    }
    let leaf = device("ur-mqtt", Some(&intermediate), (-1, 30));
    assert_eq!(mqtt_connect(&dps, "ur-mqtt", &leaf, &[]).await, 0);
}
