//! X.509 attestation through a spawned dps, over HTTPS and MQTT, with a PKI made by the test:
//! individual (self-signed) and group enrollments, the certificate store with proof of
//! possession, resolution order, and every refusal.

mod common;

use common::mqtt::{connect_packet, RawMqtt, REGISTER};
use common::pki::{ca, device, verification, Issued};
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

    // A group on the intermediate is nearer the leaf, so it wins (protocol.md §7 order); a
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
