//! `dps-bench`: load generator for a running dps (see BENCHMARKS.md).
//!
//! `dps-bench mqtt-hold --credentials <data dir>/dev-credentials.json --connections 10000`
//! creates an enrollment group through the service API, opens that many MQTT-over-TLS device
//! connections (CONNECT with a group-derived SAS token, SUBSCRIBE), holds them, checks that
//! every one still answers PINGREQ, registers through a sample of them, and reports the
//! times, the failures and the server's resident memory (read from /proc for the pid in the
//! credentials file, so run it on the server's machine).
//!
//! `dps-bench amqp-hold` does the same over AMQP: each connection is a TLS handshake, SASL
//! PLAIN with a group-derived SAS token, open, a session and the two links; liveness is an
//! operation-status query each held connection must get an answer to (a `404` rejection).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use clap::{Parser, Subcommand};
use dps_proto::connection_string::ServiceConnectionString;
use dps_proto::mqtt::{Connect, ConnectReturnCode, Packet, Publish};
use dps_proto::mqtt_io::PacketStream;
use dps_proto::sas::{build_token, derive_device_key};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;

#[derive(Parser)]
#[command(name = "dps-bench", version, about = "Load generator for dps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold many MQTT device connections open, then register through some of them.
    MqttHold {
        /// dev-credentials.json of the dps under test.
        #[arg(long)]
        credentials: std::path::PathBuf,
        /// Connections to open and hold.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Connection attempts in flight at once.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Seconds to hold every connection before checking them.
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
        /// Registrations to run through held connections at the end.
        #[arg(long, default_value_t = 200)]
        registrations: usize,
    },
    /// Hold many AMQP device connections open, then register through some of them.
    AmqpHold {
        /// dev-credentials.json of the dps under test.
        #[arg(long)]
        credentials: std::path::PathBuf,
        /// Connections to open and hold.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Connection attempts in flight at once.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Seconds to hold every connection before checking them.
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
        /// Registrations to run through held connections at the end.
        #[arg(long, default_value_t = 200)]
        registrations: usize,
    },
}

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Conn {
    stream: PacketStream<TlsStream<TcpStream>>,
}

impl Conn {
    async fn send(&mut self, packet: &Packet) -> Result<(), Error> {
        Ok(self.stream.write(packet).await?)
    }

    async fn recv(&mut self) -> Result<Packet, Error> {
        self.stream.read().await?.ok_or_else(|| "connection closed".into())
    }
}

struct Target {
    scope: String,
    host: String,
    mqtt_port: u16,
    https_port: u16,
    tls: Arc<rustls::ClientConfig>,
    group_key: Vec<u8>,
    group_id: String,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn open(target: &Target, i: usize) -> Result<Conn, Error> {
    let id = format!("{}-{i}", target.group_id);
    let key = derive_device_key(&target.group_key, &id);
    let token = build_token(&format!("{}/registrations/{id}", target.scope), &key, now() + 7200, Some("registration"));
    let tcp = TcpStream::connect(("127.0.0.1", target.mqtt_port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(target.host.clone())?;
    let stream = tokio_rustls::TlsConnector::from(target.tls.clone()).connect(name, tcp).await?;
    let mut c = Conn { stream: PacketStream::new(stream, 1 << 20) };
    c.send(&Packet::Connect(Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: true,
        keep_alive: 600,
        client_id: id.clone(),
        will: None,
        username: Some(format!("{}/registrations/{id}/api-version=2019-03-31&ClientVersion=dps-bench", target.scope)),
        password: Some(token.into_bytes()),
    }))
    .await?;
    match c.recv().await? {
        Packet::ConnAck { code: ConnectReturnCode::Accepted, .. } => {}
        other => return Err(format!("CONNECT refused: {other:?}").into()),
    }
    c.send(&Packet::Subscribe { packet_id: 1, filters: vec![("$dps/registrations/res/#".into(), 1)] }).await?;
    match c.recv().await? {
        Packet::SubAck { return_codes, .. } if return_codes == [1] => Ok(c),
        other => Err(format!("SUBSCRIBE refused: {other:?}").into()),
    }
}

async fn register(c: &mut Conn, rid: u16) -> Result<Value, Error> {
    c.send(&Packet::Publish(Publish {
        dup: false,
        qos: 1,
        retain: false,
        topic: format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
        packet_id: Some(rid),
        payload: br#"{"payload":{"bench":true}}"#.to_vec(),
    }))
    .await?;
    loop {
        match c.recv().await? {
            Packet::PubAck(_) => {}
            Packet::Publish(p) => {
                if let Some(id) = p.packet_id {
                    c.send(&Packet::PubAck(id)).await?;
                }
                return Ok(serde_json::from_slice(&p.payload)?);
            }
            other => return Err(format!("unexpected {}", other.name()).into()),
        }
    }
}

fn rss_kib(pid: u64) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn mqtt_hold(
    credentials: &std::path::Path,
    connections: usize,
    concurrency: usize,
    hold_secs: u64,
    registrations: usize,
) -> Result<(), Error> {
    let creds: Value = serde_json::from_slice(&std::fs::read(credentials)?)?;
    let field = |k: &str| creds[k].as_str().map(str::to_string).ok_or(format!("{k} missing in the credentials file"));
    let pid = creds["pid"].as_u64().unwrap_or(0);
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls_pki_types::pem::PemObject;
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(field("caCertificatePath")?)? {
            roots.add(cert?)?;
        }
    }
    let tls = Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots.clone()).with_no_client_auth());
    let group_id = format!("bench-{}", now());
    let group_key = derive_device_key(b"dps-bench", &group_id);
    let target = Arc::new(Target {
        scope: field("idScope")?,
        host: field("hostName")?,
        mqtt_port: creds["mqttPort"].as_u64().ok_or("mqttPort missing: is MQTT enabled?")? as u16,
        https_port: creds["httpsPort"].as_u64().ok_or("httpsPort missing")? as u16,
        tls,
        group_key,
        group_id: group_id.clone(),
    });

    // The enrollment group, through the service API.
    let conn = ServiceConnectionString::parse(&field("serviceConnectionString")?)?;
    let token = build_token(&target.host, &conn.key, now() + 3600, Some(&conn.key_name));
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(field("caCertificatePath")?)?)?)
        .resolve(&target.host, ([127, 0, 0, 1], target.https_port).into())
        .build()?;
    let key_b64 = BASE64.encode(&target.group_key);
    let resp = http
        .put(format!(
            "https://{}:{}/enrollmentGroups/{group_id}?api-version=2021-10-01",
            target.host, target.https_port
        ))
        .header("Authorization", token)
        .json(&serde_json::json!({"enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key_b64, "secondaryKey": key_b64}}}))
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(format!("creating the enrollment group: {} {}", resp.status(), resp.text().await?).into());
    }
    let before = rss_kib(pid);

    // Open every connection.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(connections);
    for i in 0..connections {
        let target = target.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await;
            let t = Instant::now();
            let c = tokio::time::timeout(Duration::from_secs(60), open(&target, i)).await;
            (c, t.elapsed())
        }));
    }
    let mut held = Vec::with_capacity(connections);
    let mut setup = Vec::with_capacity(connections);
    let mut failures: Vec<String> = Vec::new();
    for task in tasks {
        match task.await? {
            (Ok(Ok(c)), t) => {
                held.push(c);
                setup.push(t);
            }
            (Ok(Err(e)), _) => failures.push(e.to_string()),
            (Err(_), _) => failures.push("timed out after 60 s".into()),
        }
    }
    report_opened("", "CONNECT+SUBSCRIBE", held.len(), connections, started, &mut setup, &failures);
    let during = rss_kib(pid);

    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    // Every held connection still answers.
    let started = Instant::now();
    let mut alive = 0usize;
    let mut checks = Vec::new();
    for mut c in held {
        checks.push(tokio::spawn(async move {
            let ok = c.send(&Packet::PingReq).await.is_ok()
                && matches!(tokio::time::timeout(Duration::from_secs(30), c.recv()).await, Ok(Ok(Packet::PingResp)));
            (ok, c)
        }));
    }
    let mut held = Vec::new();
    for check in checks {
        let (ok, c) = check.await?;
        if ok {
            alive += 1;
            held.push(c);
        }
    }
    println!(
        "after {hold_secs} s: {alive} of them answered PINGREQ (checked in {:.1} s)",
        started.elapsed().as_secs_f64()
    );

    // Registrations through held connections, all at once.
    let started = Instant::now();
    let mut regs = Vec::new();
    for (i, mut c) in held.drain(..registrations.min(alive)).enumerate() {
        regs.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = register(&mut c, (i % 60_000 + 1) as u16).await;
            (r, t.elapsed(), c)
        }));
    }
    let mut latencies = Vec::new();
    let mut assigned = 0;
    let mut keep = Vec::new();
    for reg in regs {
        let (r, t, c) = reg.await?;
        if let Ok(v) = r {
            if v["status"] == "assigned" {
                assigned += 1;
            }
        }
        latencies.push(t);
        keep.push(c);
    }
    report_registrations(assigned, &mut latencies, started);
    report_memory(before, during, pid);
    drop(keep);
    drop(held);
    held_outcome(failures.len(), alive, connections)
}

async fn amqp_hold(
    credentials: &std::path::Path,
    connections: usize,
    concurrency: usize,
    hold_secs: u64,
    registrations: usize,
) -> Result<(), Error> {
    use dps_bench::amqp_client::AmqpConnection;
    use dps_bench::client::{client_tls, Device, DeviceAuth};
    let target = Arc::new(dps_bench::Target::from_credentials(credentials)?);
    if target.amqp_addr.is_none() {
        return Err("amqpAddress missing in the credentials: is AMQP enabled?".into());
    }
    let pid = u64::from(target.pid.unwrap_or(0));
    let tls = client_tls(target.roots.clone(), None, &[], false)?;
    let group_id = format!("bench-amqp-{}", now());
    let group_key = derive_device_key(b"dps-bench", &group_id);
    let service = dps_bench::setup::ServiceClient::new(&target)?;
    service
        .put_group(
            &group_id,
            serde_json::json!({"enrollmentGroupId": group_id,
                "attestation": dps_bench::setup::symmetric_key_attestation(&group_key)}),
        )
        .await?;
    let device = {
        let (target, group_id, group_key) = (target.clone(), group_id.clone(), group_key.clone());
        Arc::new(move |i: usize| {
            let id = format!("{group_id}-{i}");
            let key = derive_device_key(&group_key, &id);
            let resource = format!("{}/registrations/{id}", target.id_scope);
            let token = build_token(&resource, &key, now() + 7200, Some("registration"));
            Device { registration_id: id, auth: DeviceAuth::Sas(token), payload: None }
        })
    };
    let before = rss_kib(pid);

    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(connections);
    for i in 0..connections {
        let (target, tls, gate, device) = (target.clone(), tls.clone(), gate.clone(), device.clone());
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await;
            let t = Instant::now();
            let d = device(i);
            let c = tokio::time::timeout(Duration::from_secs(60), AmqpConnection::open(&target, &tls, &d)).await;
            (c, t.elapsed(), d)
        }));
    }
    let mut held = Vec::with_capacity(connections);
    let mut setup = Vec::with_capacity(connections);
    let mut failures: Vec<String> = Vec::new();
    for task in tasks {
        match task.await? {
            (Ok(Ok(c)), t, d) => {
                held.push((c, d));
                setup.push(t);
            }
            (Ok(Err(e)), _, _) => failures.push(e.detail),
            (Err(_), _, _) => failures.push("timed out after 60 s".into()),
        }
    }
    report_opened("AMQP ", "TLS+SASL+open+links", held.len(), connections, started, &mut setup, &failures);
    let during = rss_kib(pid);

    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    // Every held connection still answers: a status query for no operation gets a rejection.
    let started = Instant::now();
    let mut checks = Vec::new();
    for (mut c, d) in held {
        checks.push(tokio::spawn(async move {
            let answer = tokio::time::timeout(Duration::from_secs(30), c.status("no-such-operation")).await;
            let ok = matches!(&answer, Ok(Err(f)) if f.key.starts_with("dps "));
            (ok, c, d)
        }));
    }
    let mut held = Vec::new();
    for check in checks {
        let (ok, c, d) = check.await?;
        if ok {
            held.push((c, d));
        }
    }
    let alive = held.len();
    println!(
        "after {hold_secs} s: {alive} of them answered a status query (checked in {:.1} s)",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let mut regs = Vec::new();
    for (mut c, d) in held.drain(..registrations.min(alive)) {
        regs.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.register(&d).await;
            (r.is_ok(), t.elapsed(), c)
        }));
    }
    let mut latencies = Vec::new();
    let mut assigned = 0;
    let mut keep = Vec::new();
    for reg in regs {
        let (ok, t, c) = reg.await?;
        assigned += usize::from(ok);
        latencies.push(t);
        keep.push(c);
    }
    report_registrations(assigned, &mut latencies, started);
    report_memory(before, during, pid);
    drop(keep);
    drop(held);
    held_outcome(failures.len(), alive, connections)
}

/// Prints how opening the held connections went (`kind` prefixes "connections", `steps` names
/// what each one's setup time covers).
fn report_opened(
    kind: &str,
    steps: &str,
    opened: usize,
    connections: usize,
    started: Instant,
    setup: &mut [Duration],
    failures: &[String],
) {
    let open_secs = started.elapsed().as_secs_f64();
    setup.sort();
    println!(
        "opened {opened} of {connections} {kind}connections in {open_secs:.1} s ({:.0}/s); {steps} p50 {:?} p99 {:?}; {} failed",
        opened as f64 / open_secs,
        percentile(setup, 0.5),
        percentile(setup, 0.99),
        failures.len()
    );
    if let Some(first) = failures.first() {
        println!("  first failure: {first}");
    }
}

/// Prints how the registrations through held connections went.
fn report_registrations(assigned: usize, latencies: &mut [Duration], started: Instant) {
    latencies.sort();
    println!(
        "{assigned} of {} registrations assigned in {:.2} s; latency p50 {:?} p99 {:?} (all started together)",
        latencies.len(),
        started.elapsed().as_secs_f64(),
        percentile(latencies, 0.5),
        percentile(latencies, 0.99)
    );
}

/// Prints dps's resident memory before, with the connections open and now (`(rss, peak)` KiB).
fn report_memory(before: Option<(u64, u64)>, during: Option<(u64, u64)>, pid: u64) {
    match (before, during, rss_kib(pid)) {
        (Some(b), Some(d), Some(a)) => println!(
            "dps resident memory: {} MiB before, {} MiB with the connections open, {} MiB at the end (peak {} MiB)",
            b.0 / 1024,
            d.0 / 1024,
            a.0 / 1024,
            a.1 / 1024
        ),
        _ => println!("dps resident memory: not readable (is dps on this machine, pid {pid}?)"),
    }
}

/// A hold run succeeds when every connection opened and stayed alive.
fn held_outcome(failed: usize, alive: usize, connections: usize) -> Result<(), Error> {
    if failed == 0 && alive == connections {
        Ok(())
    } else {
        Err(format!("{failed} connections failed, {alive} of {connections} alive").into())
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::MqttHold { credentials, connections, concurrency, hold_secs, registrations } => {
            runtime.block_on(mqtt_hold(&credentials, connections, concurrency, hold_secs, registrations))
        }
        Command::AmqpHold { credentials, connections, concurrency, hold_secs, registrations } => {
            runtime.block_on(amqp_hold(&credentials, connections, concurrency, hold_secs, registrations))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
