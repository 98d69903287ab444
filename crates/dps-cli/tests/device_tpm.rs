//! `dps device register|reprovision` with TPM attestation end to end: a software TPM (swtpm),
//! a spawned dps with a TPM individual enrollment made through the service API from the EK
//! `dps_device::tpm` reads, a custom allocation webhook that echoes the payload, and an IoT Edge
//! style config (`[provisioning.attestation] method = "tpm"`, aziot's `[tpm]` table).
//!
//! Needs the `tpm` feature (`cargo test -p dps-cli --features tpm --test device_tpm`); skips,
//! passing with a message, when swtpm is not installed.
#![cfg(feature = "tpm")]

mod common;

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::webhook;
use common::Dps;
use dps_device::tpm::Tpm;
use dps_device::{TpmConfig, DEFAULT_AUTH_KEY_HANDLE};
use serde_json::{json, Value};

#[path = "../../../tests/support/swtpm.rs"]
mod swtpm;

use swtpm::{on_path, Swtpm};

impl Swtpm {
    /// The EK as the device sends it (base64 TPM2B_PUBLIC), read (and made) through dps-device.
    fn endorsement_key(&self) -> String {
        let keys = Tpm::open(&TpmConfig::new(&self.tcti())).unwrap().keys().unwrap();
        BASE64.encode(keys.endorsement_key)
    }
}

fn run(args: &[&str], cwd: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dps")).args(args).current_dir(cwd).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An IoT Edge style config for a TPM device of `dps`'s test server.
fn edge_config(dps: &Dps, registration_id: &str, tpm_table: &str, state: &str) -> String {
    format!(
        r#"# An IoT Edge config.toml with TPM attestation.
hostname = "{registration_id}"
trust_bundle_cert = "file://{ca}"

[provisioning]
source = "dps"
global_endpoint = "https://localhost:{port}"
id_scope = "{scope}"
payload = {{ uri = "payload.json" }}

[provisioning.attestation]
method = "tpm"
registration_id = "{registration_id}"

{tpm_table}

[aziot_keys]
# other IoT Edge sections are ignored

[dps_device]
state_file = "{state}"
"#,
        ca = dps.creds["caCertificatePath"].as_str().unwrap(),
        port = dps.addr.port(),
        scope = dps.scope(),
    )
}

// Multi-threaded: the webhook keeps answering while a test thread waits for the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_device_registers_and_reprovisions_from_an_iot_edge_config() {
    if !on_path("swtpm") {
        eprintln!("SKIPPED device_tpm: `swtpm` is not on PATH (apt-get install swtpm swtpm-tools)");
        return;
    }
    let tpm = Swtpm::start();
    let other_tpm = Swtpm::start();
    let hook = webhook::start().await;
    let dps = Dps::start("[[hubs]]\nhost_name = \"hub-t.test\"\n").await;
    let ek = tpm.endorsement_key();
    let enrollment = dps
        .put_enrollment(json!({"registrationId": "tpm-edge-1", "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": hook.url("/ok"), "apiVersion": "2021-10-01"},
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}))
        .await;
    assert_eq!(enrollment["attestation"]["type"], "tpm", "{enrollment}");
    // An enrollment for another TPM's EK: this TPM cannot prove it.
    dps.put_enrollment(json!({"registrationId": "tpm-edge-2",
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": other_tpm.endorsement_key()}}}))
        .await;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("payload.json"), r#"{"modelId": "tpm-1", "site": "plant-7"}"#).unwrap();
    let table = format!("[tpm]\ntcti = \"{}\"\nauth_key_index = 0x00_01_00\n", tpm.tcti());
    std::fs::write(d.join("config.toml"), edge_config(&dps, "tpm-edge-1", &table, "state.json")).unwrap();
    let calls = || hook.received.lock().unwrap().len();

    let (code, out, err) = run(&["device", "register", "--config", "config.toml", "--json"], d);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}\ndps log:\n{}", dps.log());
    let first: Value = serde_json::from_str(&out).unwrap();
    eprintln!("dps device register --json: {first}");
    let state = &first["registrationState"];
    assert_eq!(state["status"], "assigned", "{first}");
    assert_eq!(state["deviceId"], "tpm-edge-1");
    assert_eq!(state["assignedHub"], "hub-t.test");
    assert_eq!(state["payload"]["echo"], json!({"modelId": "tpm-1", "site": "plant-7"}), "{first}");
    assert!(state["tpm"]["authenticationKey"].is_string(), "the hub key came in the assigned answer: {first}");
    assert_eq!(calls(), 1);
    let webhook_request: Value = serde_json::from_slice(&hook.last("/ok").body).unwrap();
    assert_eq!(webhook_request["deviceRuntimeContext"]["payload"], json!({"modelId": "tpm-1", "site": "plant-7"}));
    let record: Value =
        dps.service(reqwest::Method::GET, "/registrations/tpm-edge-1").send().await.unwrap().json().await.unwrap();
    assert_eq!(record["status"], "assigned", "{record}");
    // The imported hub key is in the TPM at the default handle and signs.
    let signature = Tpm::open(&TpmConfig::new(&tpm.tcti())).unwrap().hmac_sha256(DEFAULT_AUTH_KEY_HANDLE, b"x");
    assert_eq!(signature.map(|s| s.len()).ok(), Some(32));

    // register again: the cached assignment, nothing sent.
    let (code, out, err) = run(&["device", "register", "--config", "config.toml"], d);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("assigned: device 'tpm-edge-1' on hub hub-t.test (cached"), "{out}");
    assert_eq!(calls(), 1, "nothing sent");

    // reprovision: the whole TPM exchange again, with the current payload.
    std::fs::write(d.join("payload.json"), r#"{"modelId": "tpm-2"}"#).unwrap();
    let (code, out, err) = run(&["device", "reprovision", "--config", "config.toml", "--json"], d);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}\ndps log:\n{}", dps.log());
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["registrationState"]["status"], "assigned", "{again}");
    assert_eq!(again["registrationState"]["payload"]["echo"], json!({"modelId": "tpm-2"}), "{again}");
    assert_eq!(calls(), 2);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(d.join("state.json")).unwrap()).unwrap();
    assert_eq!(saved["registrationState"]["payload"]["echo"], json!({"modelId": "tpm-2"}), "state updated");

    // A TPM whose EK is not the enrollment's: the service refuses it (exit 1, its reason).
    std::fs::write(d.join("wrong.toml"), edge_config(&dps, "tpm-edge-2", &table, "wrong-state.json")).unwrap();
    let (code, _, err) = run(&["device", "register", "--config", "wrong.toml"], d);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("error: unauthorized"), "{err}");
    assert!(!d.join("wrong-state.json").exists(), "nothing cached for a refused device");
    // The same answer as for a registration ID nobody enrolled (an unauthenticated caller learns
    // nothing about which IDs exist).
    std::fs::write(d.join("nobody.toml"), edge_config(&dps, "tpm-edge-9", &table, "nobody-state.json")).unwrap();
    let (code, _, nobody_err) = run(&["device", "register", "--config", "nobody.toml"], d);
    assert_eq!(code, Some(1), "{nobody_err}");
    assert_eq!(nobody_err.replace("tpm-edge-9", "ID"), err.replace("tpm-edge-2", "ID"));

    // TPM over MQTT does not exist: one line, exit 2, nothing sent.
    let (code, _, err) = run(&["device", "reprovision", "--config", "config.toml", "--transport", "mqtt"], d);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("error: ") && err.contains("HTTPS only"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    // An auth_key_index out of range: one line naming the key, exit 2.
    let bad = format!("[tpm]\ntcti = \"{}\"\nauth_key_index = 0x80_00_00\n", tpm.tcti());
    std::fs::write(d.join("bad.toml"), edge_config(&dps, "tpm-edge-1", &bad, "bad-state.json")).unwrap();
    let (code, _, err) = run(&["device", "reprovision", "--config", "bad.toml"], d);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tpm.auth_key_index"), "{err}");
    assert_eq!(calls(), 2, "nothing sent for bad input");
}
