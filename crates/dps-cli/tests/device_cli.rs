//! `dps device register|reprovision` end to end: an IoT Edge style config file with a payload
//! file, against a spawned dps whose custom allocation webhook echoes the payload.

mod common;

use std::path::Path;
use std::process::Command;

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
    let config = format!(
        r#"# An IoT Edge config.toml, plus the [dps_device] table of dps.
hostname = "edge-device-1"
trust_bundle_cert = "file://{ca}"

[provisioning]
source = "dps"
global_endpoint = "https://localhost:{port}"
id_scope = "{scope}"
payload = {{ uri = "file://{dir}/payload.json" }}

[provisioning.attestation]
method = "symmetric_key"
registration_id = "edge-device-1"
symmetric_key = {{ uri = "file://{dir}/group.key" }}

[aziot_keys]
# other IoT Edge sections are ignored

[dps_device]
group_key = true
transport = "mqtt"
mqtt_port = {mqtt}
state_file = "state.json"
"#,
        ca = dps.creds["caCertificatePath"].as_str().unwrap(),
        port = dps.addr.port(),
        scope = dps.scope(),
        dir = d.display(),
        mqtt = dps.creds["mqttPort"],
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

    // Bad input: one line naming the file, exit 2, nothing sent.
    std::fs::write(d.join("array.json"), "[1, 2]").unwrap();
    std::fs::write(d.join("broken.json"), "{\"modelId\": ").unwrap();
    std::fs::write(d.join("broken.toml"), "[provisioning\nsource = ").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--payload-file", "missing.json"], "payload file missing.json"),
        (&["--payload-file", "array.json"], "payload file array.json: the payload must be a JSON object"),
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
    assert_eq!(calls(), 2, "nothing sent for bad input");

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
