//! `dps device register|reprovision` end to end: an IoT Edge style config file with a payload
//! file, against a spawned dps whose custom allocation webhook echoes the payload; and an X.509
//! identity from the config.

mod common;

use std::path::Path;
use std::process::Command;

use common::pki;
use common::webhook;
use common::{key, Dps};
use serde_json::{json, Value};

fn run(args: &[&str], cwd: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dps")).args(args).current_dir(cwd).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An IoT Edge style config for `dps`'s test server: the trust bundle and the `[provisioning]`
/// endpoint and scope filled in; `{dir}` and `{mqtt}` in `rest` become the test directory and
/// the server's MQTT port.
fn edge_config(dps: &Dps, dir: &Path, head: &str, provisioning_extra: &str, rest: &str) -> String {
    let rest = rest.replace("{dir}", &dir.display().to_string()).replace("{mqtt}", &dps.creds["mqttPort"].to_string());
    let extra = provisioning_extra.replace("{dir}", &dir.display().to_string());
    format!(
        "{head}trust_bundle_cert = \"file://{ca}\"\n\n[provisioning]\nsource = \"dps\"\n\
         global_endpoint = \"https://localhost:{port}\"\nid_scope = \"{scope}\"\n{extra}\n{rest}",
        ca = dps.creds["caCertificatePath"].as_str().unwrap(),
        port = dps.addr.port(),
        scope = dps.scope(),
    )
}

// Multi-threaded: the webhook keeps answering while a test thread waits for the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iot_edge_style_config_with_a_payload_file() {
    let hook = webhook::start().await;
    let dps = Dps::start("[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n").await;
    let group_key = key(81);
    dps.put_group(json!({"enrollmentGroupId": "edge-group", "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": hook.url("/ok"), "apiVersion": "2021-10-01"},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("payload.json"), r#"{"modelId": "edge-1", "site": "plant-3"}"#).unwrap();
    std::fs::write(d.join("group.key"), &group_key).unwrap();
    let config = edge_config(
        &dps,
        d,
        "# An IoT Edge config.toml, plus the [dps_device] table of dps.\nhostname = \"edge-device-1\"\n",
        "payload = { uri = \"file://{dir}/payload.json\" }\n",
        r#"[provisioning.attestation]
method = "symmetric_key"
registration_id = "edge-device-1"
symmetric_key = { uri = "file://{dir}/group.key" }

[aziot_keys]
# other IoT Edge sections are ignored

[dps_device]
group_key = true
transport = "mqtt"
mqtt_port = {mqtt}
state_file = "state.json"
"#,
    );
    std::fs::write(d.join("config.toml"), config).unwrap();
    let calls = || hook.received.lock().unwrap().len();

    let (code, out, err) = run(&["device", "register", "--config", "config.toml", "--json"], d);
    assert_eq!(code, Some(0), "{err}");
    let first: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(first["cached"], false);
    assert_eq!(first["registrationState"]["deviceId"], "edge-device-1");
    assert_eq!(first["registrationState"]["payload"]["echo"], json!({"modelId": "edge-1", "site": "plant-3"}));
    assert!(d.join("state.json").exists());
    assert_eq!(calls(), 1);

    // register again: the cached assignment, nothing sent.
    let (code, out, err) = run(&["device", "register", "--config", "config.toml"], d);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("assigned: device 'edge-device-1' on hub hub-b.test (cached"), "{out}");
    assert!(out.contains("payload: {\"echo\""), "{out}");
    assert_eq!(calls(), 1, "nothing sent");

    // reprovision re-reads the changed payload file and sends it (over HTTPS this time).
    std::fs::write(d.join("payload.json"), r#"{"modelId": "edge-2"}"#).unwrap();
    let (code, out, err) =
        run(&["device", "reprovision", "--config", "config.toml", "--transport", "https", "--json"], d);
    assert_eq!(code, Some(0), "{err}");
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["registrationState"]["payload"]["echo"], json!({"modelId": "edge-2"}));
    assert_eq!(calls(), 2);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(d.join("state.json")).unwrap()).unwrap();
    assert_eq!(saved["registrationState"]["payload"]["echo"], json!({"modelId": "edge-2"}), "state updated");

    // Any JSON value is a payload (docs/protocol-notes.md §14): an array goes to the webhook unchanged.
    std::fs::write(d.join("array.json"), "[1, \"two\"]").unwrap();
    let (code, out, err) =
        run(&["device", "reprovision", "--config", "config.toml", "--payload-file", "array.json", "--json"], d);
    assert_eq!(code, Some(0), "{err}");
    let arr: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(arr["registrationState"]["payload"]["echo"], json!([1, "two"]));
    assert_eq!(calls(), 3);

    // Bad input: one line naming the file, exit 2, nothing sent.
    std::fs::write(d.join("broken.json"), "{\"modelId\": ").unwrap();
    std::fs::write(d.join("broken.toml"), "[provisioning\nsource = ").unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--payload-file", "missing.json"], "payload file missing.json"),
        (&["--payload-file", "broken.json"], "payload file broken.json: not JSON"),
        (&["--config", "broken.toml"], "config file broken.toml"),
        (&["--config", "nowhere.toml"], "config file nowhere.toml"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["device", "reprovision"];
        if !extra.contains(&"--config") {
            args.extend(["--config", "config.toml"]);
        }
        args.extend(extra);
        let (code, _, err) = run(&args, d);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{extra:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(calls(), 3, "nothing sent for bad input");

    // Flags alone, with a wrong key: exit 1 and the service's reason.
    let (code, _, err) = run(
        &[
            "device",
            "register",
            "--endpoint",
            &format!("https://localhost:{}", dps.addr.port()),
            "--id-scope",
            &dps.scope(),
            "--registration-id",
            "edge-device-1",
            "--symmetric-key",
            &key(3),
            "--ca",
            dps.creds["caCertificatePath"].as_str().unwrap(),
            "--state-file",
            "other-state.json",
        ],
        d,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unauthorized"), "{err}");
}

/// `dps device register` with an X.509 identity from an IoT Edge style config: a group member
/// (leaf + intermediate chain) over MQTT and HTTPS, and a certificate whose CN is not the
/// registration ID refused with the service's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_identity_from_the_config() {
    let dps = Dps::start("[x509]\nrequire_verified_ca = false\n[[hubs]]\nhost_name = \"hub-x.test\"\n").await;
    let root = pki::ca("CLI Root", None);
    let inter = pki::ca("CLI Intermediate", Some(&root));
    dps.put_group(json!({"enrollmentGroupId": "cli-x509", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": root.pem()}}}}}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let leaf = pki::device("cli-x509-1", Some(&inter), (-1, 30));
    std::fs::write(d.join("chain.pem"), format!("{}{}", leaf.pem(), inter.pem())).unwrap();
    std::fs::write(d.join("key.pem"), leaf.key.serialize_pem()).unwrap();
    let other = pki::device("someone-else", Some(&inter), (-1, 30));
    std::fs::write(d.join("other-chain.pem"), format!("{}{}", other.pem(), inter.pem())).unwrap();
    std::fs::write(d.join("other-key.pem"), other.key.serialize_pem()).unwrap();
    let config = |registration_id: &str, cert: &str, key: &str, state: &str| {
        edge_config(
            &dps,
            d,
            "",
            "",
            &format!(
                r#"[provisioning.attestation]
method = "x509"
registration_id = "{registration_id}"
identity_cert = "file://{{dir}}/{cert}"
identity_pk = "file://{{dir}}/{key}"

[dps_device]
transport = "mqtt"
mqtt_port = {{mqtt}}
state_file = "{state}"
"#
            ),
        )
    };
    std::fs::write(d.join("x509.toml"), config("cli-x509-1", "chain.pem", "key.pem", "x509-state.json")).unwrap();

    let (code, out, err) = run(&["device", "register", "--config", "x509.toml", "--json"], d);
    assert_eq!(code, Some(0), "{err}");
    let first: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(first["registrationState"]["status"], "assigned", "{first}");
    assert_eq!(first["registrationState"]["assignedHub"], "hub-x.test");
    assert_eq!(first["registrationState"]["x509"], json!({"enrollmentGroupId": "cli-x509"}));
    let rs: Value =
        dps.service(reqwest::Method::GET, "/registrations/cli-x509-1").send().await.unwrap().json().await.unwrap();
    assert_eq!(rs["status"], "assigned", "{rs}");

    // Over HTTPS too (the certificate goes in the TLS handshake either way).
    let (code, out, err) =
        run(&["device", "reprovision", "--config", "x509.toml", "--transport", "https", "--json"], d);
    assert_eq!(code, Some(0), "{err}");
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["registrationState"]["status"], "assigned", "{again}");
    assert_eq!(again["cached"], false);

    // A certificate for another name: exit 1 with the service's reason.
    std::fs::write(d.join("other.toml"), config("cli-x509-2", "other-chain.pem", "other-key.pem", "other-state.json"))
        .unwrap();
    let (code, _, err) = run(&["device", "register", "--config", "other.toml", "--transport", "https"], d);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("subject CN 'someone-else' differs from the registration ID 'cli-x509-2'"), "{err}");
    assert!(!d.join("other-state.json").exists(), "nothing cached for a refused device");

    // A key that does not belong to the certificate: one line, exit 2, nothing sent.
    std::fs::write(d.join("mismatch.toml"), config("cli-x509-1", "chain.pem", "other-key.pem", "m.json")).unwrap();
    let (code, _, err) = run(&["device", "register", "--config", "mismatch.toml"], d);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("error: ") && err.contains("certificate and key do not fit together"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}
