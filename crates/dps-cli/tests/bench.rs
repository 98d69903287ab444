//! `dps bench` smoke runs: a few hundred devices over each transport (HTTPS, MQTT, AMQP; and
//! each attestation and allocation kind) against a dps the bench starts, checking that the
//! report is produced and error-free. Speed is not asserted here; BENCHMARKS.md has the figures.

use std::process::Command;

use serde_json::Value;

fn bench(data_dir: &std::path::Path, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dps"))
        .arg("bench")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--json")
        .args(args)
        .output()
        .expect("run dps bench");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), report, stderr)
}

fn assert_clean(report: &Value, devices: u64, transport: &str, stderr: &str) {
    assert_eq!(report["transport"], transport, "{report:#} {stderr}");
    for phase in ["dps", "ceiling"] {
        let p = &report[phase];
        assert_eq!(p["devices"], devices, "{phase}: {report:#}");
        assert_eq!(p["assigned"], devices, "{phase}: every device must be assigned: {report:#} {stderr}");
        assert_eq!(p["errors"], serde_json::json!({}), "{phase}: {report:#}");
        assert!(p["per_second"].as_f64().unwrap() > 0.0, "{report:#}");
        let l = &p["latency_ms"];
        assert!(l["p50"].as_f64().unwrap() > 0.0 && l["p50"].as_f64() <= l["p99"].as_f64(), "{report:#}");
        assert!(l["p99"].as_f64() <= l["max"].as_f64(), "{report:#}");
    }
    assert!(report["ratio_to_ceiling"].as_f64().unwrap() > 0.0, "{report:#}");
    let mem = &report["server_memory"];
    assert!(mem["rss_after_mib"].as_f64().unwrap() > 1.0, "server memory must be read: {report:#}");
    let cpu = &report["cpu"];
    assert!(cpu["dps_seconds"].as_f64().unwrap() > 0.0, "server CPU must be read: {report:#}");
    assert!(cpu["dps_us_per_device"].as_f64().unwrap() > 0.0, "{report:#}");
}

#[test]
fn bench_smoke_runs_every_transport_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let (code, r, err) = bench(&data, &["-n", "300", "-c", "16", "--transport", "https"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 300, "https", &err);
    assert_eq!(r["attestation"], "group");
    assert_eq!(r["server_key"], "rsa-2048", "the default server key: {r:#}");

    // Individual enrollments created in bulk first; the webhook's payload comes back.
    let (code, r, err) = bench(
        &data,
        &[
            "-n",
            "200",
            "-c",
            "16",
            "--transport",
            "https-new-conn",
            "--attestation",
            "individual",
            "--allocation",
            "webhook",
            "--payload-bytes",
            "300",
        ],
    );
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 200, "https-new-conn", &err);
    assert_eq!(r["enrollments_created"], 200, "{r:#}");
    assert_eq!(r["allocation"], "webhook");

    let (code, r, err) = bench(
        &data,
        &["-n", "300", "-c", "16", "--transport", "mqtt", "--allocation", "rules", "--payload-bytes", "100"],
    );
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 300, "mqtt", &err);
    assert_eq!(r["allocation"], "rules://bench");

    // tls.generated_key = "ecdsa-p256": the same data directory's certificate is re-issued
    // with an ECDSA key, and every device (and the ceiling, on the same files) handshakes.
    let (code, r, err) =
        bench(&data, &["-n", "200", "-c", "16", "--transport", "https-new-conn", "--server-key", "ecdsa-p256"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 200, "https-new-conn", &err);
    assert_eq!(r["server_key"], "ecdsa-p256", "{r:#}");

    let (code, r, err) = bench(&data, &["-n", "100", "-c", "8", "--transport", "mqtt", "--attestation", "x509"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 100, "mqtt", &err);
    assert_eq!(r["attestation"], "x509");
    assert_eq!(r["server_key"], "rsa-2048", "back to the default key: re-issued again: {r:#}");

    // An open-loop run at a set rate reports it.
    let (code, r, err) = bench(&data, &["-n", "200", "-c", "16", "--rate", "400", "--no-ceiling"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_eq!(r["rate"], 400.0);
    assert!(r["dps"]["seconds"].as_f64().unwrap() >= 0.45, "200 devices at 400/s take half a second: {r:#}");
    assert!(r["ceiling"].is_null());
}

/// TPM devices: an individual TPM enrollment each (the devices share a pool of software
/// TPMs), the 401 challenge, the import, the SAS token signed with the imported key; every
/// assigned answer carries `tpm.authenticationKey` (the bench counts a failure otherwise).
/// The ceiling answers the challenge too, so both phases run the same two legs.
#[test]
fn bench_tpm_devices_register_through_the_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let (code, r, err) = bench(&data, &["-n", "20", "-c", "4", "--transport", "https", "--attestation", "tpm"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 20, "https", &err);
    assert_eq!(r["attestation"], "tpm");
    assert_eq!(r["enrollments_created"], 20, "{r:#}");

    // A new connection per device, with a payload through the webhook: the payload goes with
    // the second leg and comes back.
    let (code, r, err) = bench(
        &data,
        &[
            "-n",
            "20",
            "-c",
            "4",
            "--transport",
            "https-new-conn",
            "--attestation",
            "tpm",
            "--allocation",
            "webhook",
            "--payload-bytes",
            "200",
        ],
    );
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 20, "https-new-conn", &err);
    assert_eq!(r["attestation"], "tpm");

    // Split: every challenge, then the blobs opened off the clock, then every proof. Both
    // timed phases count; the off-clock step is reported and left out of the CPU figures.
    let (code, r, err) = bench(&data, &["-n", "30", "-c", "4", "--attestation", "tpm", "--tpm-split"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 30, "https", &err);
    for phase in ["dps", "ceiling"] {
        let split = &r[phase]["tpm_split"];
        let (challenges, off_clock) =
            (split["challenge_seconds"].as_f64().unwrap(), split["off_clock_seconds"].as_f64().unwrap());
        assert!(challenges > 0.0 && challenges < r[phase]["seconds"].as_f64().unwrap(), "{phase}: {r:#}");
        assert!(off_clock > 0.0, "{phase}: {r:#}");
        assert!(split["off_clock_bench_cpu_seconds"].as_f64().unwrap() > 0.0, "{phase}: {r:#}");
    }
    assert!(r["dps"]["tpm_split"]["challenge_dps_cpu_seconds"].as_f64().unwrap() > 0.0, "{r:#}");
    // A part of the whole: CPU times are read in clock ticks (10 ms), and the 30 proofs after
    // the challenges can take less than one, so the two may be equal.
    assert!(r["dps"]["tpm_split"]["challenge_dps_cpu_seconds"].as_f64() <= r["cpu"]["dps_seconds"].as_f64(), "{r:#}");
    // Without --tpm-split there is no such part.
    let (code, r, err) = bench(&data, &["-n", "5", "-c", "2", "--attestation", "tpm", "--no-ceiling"]);
    assert_eq!(code, 0, "{err} {r}");
    assert!(r["dps"].get("tpm_split").is_none(), "{r:#}");
}

/// AMQP: a new TLS connection per device; symmetric keys over SASL PLAIN, X.509 devices
/// without SASL (the certificate in the handshake), TPM devices through SASL TPM's three
/// challenges. The ceiling speaks AMQP too, so every phase is checked.
#[test]
fn bench_amqp_devices_register_with_each_attestation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let (code, r, err) = bench(&data, &["-n", "200", "-c", "16", "--transport", "amqp", "--attestation", "individual"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 200, "amqp", &err);
    assert_eq!(r["attestation"], "individual");

    let (code, r, err) = bench(&data, &["-n", "200", "-c", "16", "--transport", "amqp", "--payload-bytes", "100"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 200, "amqp", &err);
    assert_eq!(r["attestation"], "group");

    let (code, r, err) = bench(&data, &["-n", "100", "-c", "8", "--transport", "amqp", "--attestation", "x509"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 100, "amqp", &err);
    assert_eq!(r["attestation"], "x509");

    let (code, r, err) = bench(&data, &["-n", "20", "-c", "4", "--transport", "amqp", "--attestation", "tpm"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 20, "amqp", &err);
    assert_eq!(r["attestation"], "tpm");
}

#[test]
fn bench_refuses_impossible_combinations_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never-created");
    let (code, _, err) = bench(&data, &["--attestation", "x509", "--transport", "https"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("https-new-conn, mqtt or amqp"), "{err}");
    let (code, _, err) = bench(&data, &["--attestation", "tpm", "--transport", "mqtt"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("use --transport https, https-new-conn or amqp"), "{err}");
    for args in [
        &["--tpm-split"][..],
        &["--tpm-split", "--attestation", "tpm", "--transport", "amqp"],
        &["--tpm-split", "--attestation", "tpm", "--rate", "100"],
    ] {
        let (code, _, err) = bench(&data, args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("--tpm-split is for --attestation tpm over --transport https"), "{args:?}: {err}");
    }
    let (code, _, err) = bench(&data, &["--allocation", "round-robin"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("expected hashed, webhook, rules"), "{err}");
    let long = "a".repeat(101);
    let (code, _, err) = bench(&data, &["--id-prefix", &long]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at most 100 characters"), "{err}");
    assert!(!data.exists(), "nothing may be started for a refused run");
}

/// The hubs' registrars under load: a Mosquitto broker and local IoT hubs that the bench
/// starts; every device assigned (so each got its broker client or hub identity: a failed
/// registrar call fails the registration).
#[test]
fn bench_runs_with_each_hub_registrar() {
    let dir = tempfile::tempdir().unwrap();
    for registrar in ["mosquitto", "azure-iot-hub"] {
        let data = dir.path().join(registrar);
        let (code, r, err) = bench(&data, &["-n", "100", "-c", "8", "--registrar", registrar]);
        assert_eq!(code, 0, "{registrar}: {err} {r}");
        assert_clean(&r, 100, "https", &err);
        assert_eq!(r["hub_registrar"], registrar, "{r:#}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dps"))
        .args(["bench", "--registrar", "azure-iot-hub", "--target", "/nonexistent.json"])
        .output()
        .expect("run dps bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--registrar applies to the dps that dps bench starts"), "{err}");
}

/// `--metrics`: the started dps counts in its metrics exactly the registrations the run made.
#[test]
fn bench_with_metrics_scrapes_what_the_run_did() {
    let dir = tempfile::tempdir().unwrap();
    let (code, r, err) = bench(dir.path(), &["-n", "100", "-c", "8", "--metrics"]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 100, "https", &err);
    assert_eq!(r["metrics_registrations"], 100, "{r:#}");
}

/// `--events-nats`: every registration's lifecycle event (and the group's creation) reaches
/// the run's JetStream stream (the machine's NATS, or DPS_TEST_NATS_URL).
#[test]
fn bench_with_events_counts_them_in_jetstream() {
    let nats = std::env::var("DPS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let dir = tempfile::tempdir().unwrap();
    let (code, r, err) = bench(dir.path(), &["-n", "100", "-c", "8", "--metrics", "--events-nats", &nats]);
    assert_eq!(code, 0, "{err} {r}");
    assert_clean(&r, 100, "https", &err);
    let delivered = r["events"]["delivered"].as_u64().unwrap_or(0);
    assert!((101..=110).contains(&delivered), "100 registrations and the enrollment group: {r:#}");
}

/// A server whose credentials name no AMQP listener: `--transport amqp` is refused before
/// anything is created (nothing listens at the addresses of this file).
#[test]
fn bench_refuses_amqp_when_the_server_has_no_amqp_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert.pem()).unwrap();
    let creds = dir.path().join("dev-credentials.json");
    let file = serde_json::json!({
        "idScope": "0ne00000000",
        "hostName": "localhost",
        "httpsAddress": "127.0.0.1:9",
        "mqttAddress": "127.0.0.1:9",
        "caCertificatePath": ca_path,
        "serviceConnectionString": "HostName=localhost;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=AAAA",
    });
    std::fs::write(&creds, file.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dps"))
        .args(["bench", "--target"])
        .arg(&creds)
        .args(["--transport", "amqp", "-n", "1"])
        .output()
        .expect("run dps bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the server has no AMQP listener"), "{err}");
}
