//! The admin CLI (`dps enrollment|group|registration|cert`) end to end: the real `dps` binary
//! as a client of a spawned server's service API, over TLS, with the login from a data
//! directory, an environment variable or --login.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{derive, key, output_within, pki, Dps};
use serde_json::{json, Value};

/// The outcome of one `dps` run: exit code, stdout, stderr.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    fn fails(&self, code: i32, needle: &str) -> &Run {
        assert_eq!(self.code, Some(code), "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert!(self.stderr.contains(needle), "stderr lacks {needle:?}: {}", self.stderr);
        self
    }
}

fn run(envs: &[(&str, String)], args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dps"));
    cmd.args(args).env_remove("DPS_CONNECTION_STRING").env_remove("DPS_DATA_DIR").env_remove("DPS_CA_FILE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = output_within(&mut cmd, Duration::from_secs(60));
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs against `dps` with its data directory as the login.
fn admin(dps: &Dps, args: &[&str]) -> Run {
    run(&[("DPS_DATA_DIR", dps.data_dir().display().to_string())], args)
}

fn connection_string(dps: &Dps) -> String {
    dps.creds["serviceConnectionString"].as_str().unwrap().to_string()
}

fn ca_file(dps: &Dps) -> String {
    dps.creds["caCertificatePath"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn enrollments_are_created_shown_listed_updated_and_deleted() {
    let dps = Dps::start("[[hubs]]\nhost_name = \"hub-a.example\"\n[[hubs]]\nhost_name = \"hub-b.example\"\n").await;
    let created =
        admin(&dps, &["enrollment", "create", "--registration-id", "dev-1", "--attestation", "symmetric-key"]).json();
    assert_eq!(created["registrationId"], "dev-1");
    assert_eq!(created["attestation"]["type"], "symmetricKey");
    admin(&dps, &["enrollment", "create", "--registration-id", "dev-1", "--attestation", "symmetric-key"])
        .fails(2, "exists; change it with `dps enrollment update`");

    // Reads hide the keys; --show-keys reveals them, and they are the keys that work.
    let shown = admin(&dps, &["enrollment", "show", "--registration-id", "dev-1"]).json();
    assert!(shown["attestation"]["symmetricKey"]["primaryKey"].is_null(), "{shown}");
    let with_keys = admin(&dps, &["enrollment", "show", "--eid", "dev-1", "--show-keys"]).json();
    let primary = with_keys["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_string();
    let state = dps.register_to_end("dev-1", &dps.device_token("dev-1", &primary)).await;
    assert_eq!(state["status"], "assigned", "{state}");

    // The login from the environment, with the CA file and address given explicitly.
    let env = [("DPS_CONNECTION_STRING", connection_string(&dps)), ("DPS_CA_FILE", ca_file(&dps))];
    let connect = dps.addr.to_string();
    let second = run(
        &env,
        &[
            "enrollment",
            "create",
            "--registration-id",
            "dev-2",
            "--attestation",
            "symmetric-key",
            "--primary-key",
            &key(7),
            "--secondary-key",
            &key(8),
            "--device-id",
            "device-two",
            "--iot-hubs",
            "hub-a.example,hub-b.example",
            "--allocation-policy",
            "hashed",
            "--initial-twin-tags",
            r#"{"site":"lab"}"#,
            "--initial-twin-properties",
            r#"{"interval":30}"#,
            "--edge-enabled",
            "--reprovision-policy",
            "reprovisionandresetdata",
            "--connect-to",
            &connect,
        ],
    )
    .json();
    assert_eq!(second["deviceId"], "device-two");
    assert_eq!(second["iotHubs"], json!(["hub-a.example", "hub-b.example"]));
    assert_eq!(second["initialTwin"]["tags"]["site"], "lab");
    assert_eq!(second["initialTwin"]["properties"]["desired"]["interval"], 30);
    assert_eq!(second["capabilities"]["iotEdge"], true);
    assert_eq!(second["reprovisionPolicy"], json!({"updateHubAssignment": true, "migrateDeviceData": false}));

    // List: JSON and a table; --top bounds it.
    let listed = admin(&dps, &["enrollment", "list"]).json();
    let ids: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|e| e["registrationId"].as_str()).collect();
    assert_eq!(ids.len(), 2, "{listed}");
    assert!(ids.contains(&"dev-1") && ids.contains(&"dev-2"));
    assert_eq!(admin(&dps, &["enrollment", "list", "--top", "1"]).json().as_array().unwrap().len(), 1);
    let table = admin(&dps, &["enrollment", "list", "-o", "table"]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("REGISTRATION ID") && lines[0].contains("ETAG"), "{}", table.stdout);
    assert_eq!(lines.len(), 3, "{}", table.stdout);
    assert!(lines.iter().any(|l| l.starts_with("dev-2 ") && l.contains("hub-a.example,hub-b.example")));

    // Update changes only what is given and keeps the keys; a stale ETag is refused.
    let before = admin(&dps, &["enrollment", "show", "--registration-id", "dev-1"]).json();
    let old_etag = before["etag"].as_str().unwrap().to_string();
    let updated =
        admin(&dps, &["enrollment", "update", "--registration-id", "dev-1", "--provisioning-status", "disabled"])
            .json();
    assert_eq!(updated["provisioningStatus"], "disabled");
    assert_ne!(updated["etag"], before["etag"]);
    assert!(updated["attestation"]["symmetricKey"]["primaryKey"].is_null(), "update hides keys: {updated}");
    let again = admin(&dps, &["enrollment", "show", "--registration-id", "dev-1", "--show-keys"]).json();
    assert_eq!(again["attestation"]["symmetricKey"]["primaryKey"], primary.as_str(), "update kept the keys");
    let state = dps.register_to_end("dev-1", &dps.device_token("dev-1", &primary)).await;
    assert_eq!(state["status"], "disabled", "{state}");
    admin(
        &dps,
        &[
            "enrollment",
            "update",
            "--registration-id",
            "dev-1",
            "--etag",
            &old_etag,
            "--provisioning-status",
            "enabled",
        ],
    )
    .fails(1, "412");
    admin(&dps, &["enrollment", "update", "--registration-id", "dev-1", "--ca-name", "x"])
        .fails(2, "the attestation is symmetricKey");

    // A new symmetric-key mechanism without keys: new keys, and the old one stops working.
    admin(&dps, &["enrollment", "update", "--registration-id", "dev-1", "--provisioning-status", "enabled"]).json();
    admin(&dps, &["enrollment", "update", "--registration-id", "dev-1", "--attestation", "symmetric-key"]).json();
    let rotated = admin(&dps, &["enrollment", "show", "--registration-id", "dev-1", "--show-keys"]).json();
    let new_primary = rotated["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_string();
    assert_ne!(new_primary, primary);
    let (status, _, _) = dps.register("dev-1", Some(&dps.device_token("dev-1", &primary)), json!({})).await;
    assert_eq!(status, 401, "the old key no longer works");
    let state = dps.register_to_end("dev-1", &dps.device_token("dev-1", &new_primary)).await;
    assert_eq!(state["status"], "assigned", "{state}");
    let old_etag =
        admin(&dps, &["enrollment", "show", "--registration-id", "dev-1"]).json()["etag"].as_str().unwrap().to_string();
    admin(&dps, &["enrollment", "update", "--registration-id", "dev-1", "--iot-hubs", "hub-a.example"]).json();

    // Delete: a stale ETag is refused, then it goes.
    admin(&dps, &["enrollment", "delete", "--registration-id", "dev-1", "--etag", &old_etag]).fails(1, "412");
    let gone = admin(&dps, &["enrollment", "delete", "--registration-id", "dev-1"]);
    assert_eq!(gone.code, Some(0), "{}", gone.stderr);
    admin(&dps, &["enrollment", "show", "--registration-id", "dev-1"]).fails(1, "404");
}

#[tokio::test]
async fn groups_registrations_and_certificates() {
    let dps = Dps::start("").await;
    let group_key = key(21);
    admin(
        &dps,
        &[
            "group",
            "create",
            "--group-id",
            "fleet",
            "--attestation",
            "symmetric-key",
            "--primary-key",
            &group_key,
            "--secondary-key",
            &key(22),
        ],
    )
    .json();
    // The member key: from the service, or offline from the key; both are the derived key.
    let from_service =
        admin(&dps, &["group", "compute-device-key", "--group-id", "fleet", "--registration-id", "m-1"]).json();
    assert_eq!(from_service, json!(derive(&group_key, "m-1")));
    let offline =
        run(&[], &["group", "compute-device-key", "--key", &group_key, "--registration-id", "m-1", "-o", "table"]);
    assert_eq!(offline.stdout.trim(), derive(&group_key, "m-1"), "{}", offline.stderr);
    for member in ["m-1", "m-2"] {
        let state = dps.register_to_end(member, &dps.device_token(member, &derive(&group_key, member))).await;
        assert_eq!(state["status"], "assigned", "{state}");
    }

    let listed = admin(&dps, &["registration", "list", "--group-id", "fleet"]).json();
    let mut ids: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|r| r["registrationId"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["m-1", "m-2"], "{listed}");
    let shown = admin(&dps, &["registration", "show", "--registration-id", "m-1"]).json();
    assert_eq!(shown["status"], "assigned");
    let table = admin(&dps, &["registration", "show", "--registration-id", "m-1", "--output", "table"]);
    assert!(table.stdout.lines().any(|l| l.starts_with("status") && l.ends_with("assigned")), "{}", table.stdout);
    admin(&dps, &["registration", "delete", "--registration-id", "m-1", "--etag", "\"stale\""]).fails(1, "412");
    assert_eq!(admin(&dps, &["registration", "delete", "--registration-id", "m-1"]).code, Some(0));
    admin(&dps, &["registration", "show", "--registration-id", "m-1"]).fails(1, "404");

    let updated = admin(&dps, &["enrollment-group", "update", "--group-id", "fleet", "--edge-enabled", "true"]).json();
    assert_eq!(updated["capabilities"]["iotEdge"], true);
    let groups = admin(&dps, &["group", "list", "-o", "table"]);
    assert!(groups.stdout.lines().nth(1).is_some_and(|l| l.starts_with("fleet ")), "{}", groups.stdout);
    admin(&dps, &["group", "create", "--group-id", "tpms", "--attestation", "tpm", "--endorsement-key", "AAAA"])
        .fails(2, "");

    // Certificates through the service API (--login), then an X.509 group that names one.
    let root = pki::ca("Admin CLI Root", None);
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("root.pem");
    std::fs::write(&pem, root.pem()).unwrap();
    let login = connection_string(&dps);
    let server_ca = ca_file(&dps);
    let via_api = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--login", &login, "--ca-file", &server_ca]);
        run(&[], &all)
    };
    let added = via_api(&["cert", "add", "root", pem.to_str().unwrap(), "--verified"]).json();
    assert_eq!(added["properties"]["isVerified"], true, "{added}");
    let list = via_api(&["cert", "list"]).json();
    assert!(list.to_string().contains("\"root\""), "{list}");
    let x509 =
        admin(&dps, &["group", "create", "--gid", "x509-fleet", "--attestation", "x509", "--ca-name", "root"]).json();
    assert_eq!(x509["attestation"]["x509"]["caReferences"]["primary"], "root");
    assert_eq!(admin(&dps, &["group", "delete", "--group-id", "x509-fleet"]).code, Some(0));
    assert_eq!(via_api(&["cert", "remove", "root"]).code, Some(0));
    via_api(&["cert", "show", "root"]).fails(1, "404");
}

#[tokio::test]
async fn errors_say_what_to_fix() {
    let dps = Dps::start("").await;
    let ca = ca_file(&dps);
    let port = dps.addr.port();
    // A wrong key: the service refuses, and the message names the connection string's key.
    let wrong =
        format!("HostName=localhost:{port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={}", key(99));
    run(&[("DPS_CONNECTION_STRING", wrong), ("DPS_CA_FILE", ca.clone())], &["enrollment", "list"])
        .fails(1, "401")
        .fails(1, "SharedAccessKey");
    // Nothing listening: exit 3 and say so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let nowhere = format!(
        "HostName=localhost:{closed_port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={}",
        key(1)
    );
    run(&[("DPS_CONNECTION_STRING", nowhere), ("DPS_CA_FILE", ca.clone())], &["enrollment", "list"])
        .fails(3, "cannot be reached");
    // An untrusted server certificate: exit 3, not a silent success.
    let other_ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other_ca.path(), pki::ca("Not The Server's CA", None).pem()).unwrap();
    run(
        &[("DPS_CONNECTION_STRING", connection_string(&dps)), ("DPS_CA_FILE", other_ca.path().display().to_string())],
        &["enrollment", "list"],
    )
    .fails(3, "");
    // No login anywhere.
    let empty = tempfile::tempdir().unwrap();
    run(&[("DPS_DATA_DIR", empty.path().display().to_string())], &["enrollment", "list"])
        .fails(2, "no connection string");
    run(&[], &["enrollment", "list", "--login", "HostName=x"]).fails(2, "connection string cannot be used");
    // Flags that do not fit the attestation.
    admin(&dps, &["enrollment", "create", "--registration-id", "t", "--attestation", "tpm"])
        .fails(2, "--endorsement-key");
    admin(&dps, &["enrollment", "create", "--registration-id", "t", "--attestation", "x509"])
        .fails(2, "--certificate-path");
    admin(
        &dps,
        &[
            "enrollment",
            "create",
            "--registration-id",
            "t",
            "--attestation",
            "symmetric-key",
            "--initial-twin-tags",
            "[1]",
        ],
    )
    .fails(2, "JSON object");
    // What the service refuses comes back with its DPS error code and tracking ID.
    admin(&dps, &["enrollment", "create", "--registration-id", "bad id!", "--attestation", "symmetric-key"])
        .fails(1, "400")
        .fails(1, "tracking ID");
    admin(&dps, &["enrollment", "show", "--registration-id", "missing"]).fails(1, "404");
    // The key never reaches stderr, even on failure.
    let key_text = connection_string(&dps).split("SharedAccessKey=").nth(1).unwrap().to_string();
    let refused = admin(&dps, &["enrollment", "show", "--registration-id", "missing"]);
    assert!(!refused.stderr.contains(&key_text) && !refused.stdout.contains(&key_text));
}
