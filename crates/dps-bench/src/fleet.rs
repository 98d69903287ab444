//! A fleet run: setup through the service API, then N devices with C in flight against dps
//! and, when asked, the same against the ceiling server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dps_proto::sas::{build_token, derive_device_key, device_resource};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};

use crate::amqp_client::amqp_register;
use crate::client::{
    client_tls, https_register_fresh, mqtt_register, tpm_token, Device, DeviceAuth, Failure, HttpsConn, TpmIdentity,
};
use crate::report::{BenchReport, Cpu, Latency, Memory, PhaseReport, TpmSplit};
use crate::setup::{allocation_fields, merge, symmetric_key_attestation, ServiceClient};
use crate::target::Target;
use crate::BenchError;

/// How devices reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// HTTPS; each of the C clients keeps its connection open and registers device after device.
    Https,
    /// HTTPS; a new TCP + TLS connection (full handshake) for every device.
    HttpsNewConn,
    /// MQTT over TLS; a new connection (full handshake, CONNECT, SUBSCRIBE) for every device.
    Mqtt,
    /// AMQP 1.0 over TLS; a new connection for every device (full handshake, SASL PLAIN or
    /// TPM, or none for X.509; open, session, two links, close).
    Amqp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Https => "https",
            Transport::HttpsNewConn => "https-new-conn",
            Transport::Mqtt => "mqtt",
            Transport::Amqp => "amqp",
        }
    }
}

/// How devices attest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attestation {
    /// An individual enrollment per device (symmetric key), created in bulk first.
    Individual,
    /// One enrollment group (symmetric key); devices use keys derived from it.
    Group,
    /// One X.509 enrollment group on a bench CA uploaded as verified; a certificate per device.
    X509,
    /// An individual TPM enrollment per device, created in bulk first (HTTPS or AMQP). Each
    /// device asks for its key (over HTTPS the 401 challenge, over AMQP SASL TPM), imports it
    /// in a software TPM and registers with a SAS token signed by it; the devices share a pool
    /// of 8 TPMs.
    Tpm,
}

/// Software TPMs made for a TPM run (RSA key generation is slow): device `i` uses TPM
/// `i % TPM_POOL`, so several enrollments share an endorsement key.
pub const TPM_POOL: usize = 8;

impl Attestation {
    fn name(self) -> &'static str {
        match self {
            Attestation::Individual => "individual",
            Attestation::Group => "group",
            Attestation::X509 => "x509",
            Attestation::Tpm => "tpm",
        }
    }
}

/// How devices are allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    /// The server's default policy (hashed).
    Hashed,
    /// Custom allocation through the bench's own webhook (plain HTTP on loopback).
    Webhook,
    /// Custom allocation through a built-in rule set of the server (`rules://<name>`).
    Rules(String),
}

impl std::str::FromStr for Allocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hashed" => Ok(Allocation::Hashed),
            "webhook" => Ok(Allocation::Webhook),
            "rules" => Ok(Allocation::Rules("bench".into())),
            _ => match s.strip_prefix("rules:") {
                Some(name) if !name.is_empty() => Ok(Allocation::Rules(name.trim_start_matches("//").to_string())),
                _ => Err(format!("'{s}': expected hashed, webhook, rules or rules:<name>")),
            },
        }
    }
}

/// Progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing.
    Quiet,
    /// A progress bar (terminal).
    Bar,
    /// A plain line every few seconds (logs, CI).
    Lines,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Devices to register.
    pub devices: usize,
    /// Devices in flight at once (HTTPS keep-alive: connections).
    pub concurrency: usize,
    /// Transport.
    pub transport: Transport,
    /// Attestation.
    pub attestation: Attestation,
    /// Allocation.
    pub allocation: Allocation,
    /// Registration payload size in bytes; 0 sends none.
    pub payload_bytes: usize,
    /// Open-loop rate (devices started per second); `None` runs flat out.
    pub rate: Option<f64>,
    /// Registration ID prefix (a fresh one gives first registrations).
    pub id_prefix: String,
    /// Per-device time limit.
    pub device_timeout: Duration,
    /// Parallel bulk operations while creating individual enrollments.
    pub setup_parallel: usize,
    /// Progress display.
    pub progress: Progress,
    /// TPM over HTTPS keep-alive: every device's challenge request first (timed), then every
    /// software TPM opens its blob off the clock, then every device's proof and polls
    /// (timed). The server gets the requests and does the writes of an interleaved run (each
    /// timed phase opens its own kept-alive connections, and a challenge record is read long
    /// after it was written rather than at once); the load generator's RSA private-key work,
    /// which on a shared machine costs more CPU than the server's, is left out of the time.
    pub tpm_split: bool,
}

impl FleetOptions {
    /// Checks the option combination.
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.devices == 0 || self.concurrency == 0 {
            return Err(BenchError::Input("--devices and --concurrency must be at least 1".into()));
        }
        if self.attestation == Attestation::X509 && self.transport == Transport::Https {
            return Err(BenchError::Input(
                "X.509 devices present their own certificate in the TLS handshake, so they cannot share kept-alive connections: use --transport https-new-conn, mqtt or amqp".into(),
            ));
        }
        if self.attestation == Attestation::Tpm && self.transport == Transport::Mqtt {
            return Err(BenchError::Input(
                "TPM devices get their key from a challenge (an HTTPS 401 with authenticationKey, or SASL TPM over AMQP), which DPS has no MQTT form of: use --transport https, https-new-conn or amqp".into(),
            ));
        }
        if self.attestation == Attestation::X509 && self.devices > 200_000 {
            return Err(BenchError::Input(
                "--attestation x509 makes a certificate per device up front: at most 200000 devices".into(),
            ));
        }
        if self.tpm_split
            && (self.attestation != Attestation::Tpm || self.transport != Transport::Https || self.rate.is_some())
        {
            return Err(BenchError::Input(
                "--tpm-split is for --attestation tpm over --transport https (keep-alive), without --rate".into(),
            ));
        }
        if self.tpm_split && self.devices > 200_000 {
            return Err(BenchError::Input(
                "--tpm-split keeps every device's challenge and token between its phases: at most 200000 devices"
                    .into(),
            ));
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                return Err(BenchError::Input("--rate must be a positive number of devices per second".into()));
            }
        }
        if self.payload_bytes > 60_000 {
            return Err(BenchError::Input(
                "--payload-bytes: at most 60000 (the server's default limit is 65536)".into(),
            ));
        }
        if !self.id_prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._:".contains(c)) {
            return Err(BenchError::Input("--id-prefix: lower-case letters, digits and '-._:' only".into()));
        }
        // Registration IDs are at most 128 characters; the device number follows the prefix.
        if self.id_prefix.len() > 100 {
            return Err(BenchError::Input("--id-prefix: at most 100 characters".into()));
        }
        Ok(())
    }
}

/// A default registration ID prefix, new for every run: `bench-<unix time in ms>-<pid>-`
/// (two runs in the same second must not share devices: one may have created individual
/// enrollments for IDs the other registers with group keys).
pub fn default_prefix() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("bench-{ms}-{}-", std::process::id())
}

/// Turns device numbers into devices.
enum Credentials {
    Individual { secret: Vec<u8> },
    Group { key: Vec<u8> },
    X509 { configs: Vec<Arc<rustls::ClientConfig>> },
    Tpm { pool: Vec<Arc<TpmIdentity>> },
}

struct Fleet {
    opts: FleetOptions,
    credentials: Credentials,
    /// Expected in `registrationState.payload` of custom allocations.
    check_payload: bool,
    /// `registrationState.tpm.authenticationKey` expected (TPM devices against dps).
    check_tpm: bool,
    plain_tls: Arc<rustls::ClientConfig>,
}

impl Fleet {
    fn registration_id(&self, i: usize) -> String {
        format!("{}{i}", self.opts.id_prefix)
    }

    fn device(&self, target: &Target, i: usize) -> Device {
        let registration_id = self.registration_id(i);
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 3600;
        let resource = device_resource(&target.id_scope, &registration_id);
        let auth = match &self.credentials {
            Credentials::Individual { secret } => {
                let key = derive_device_key(secret, &registration_id);
                DeviceAuth::Sas(build_token(&resource, &key, expiry, Some("registration")))
            }
            Credentials::Group { key } => {
                let key = derive_device_key(key, &registration_id);
                DeviceAuth::Sas(build_token(&resource, &key, expiry, Some("registration")))
            }
            Credentials::X509 { configs } => DeviceAuth::X509(configs[i % configs.len()].clone()),
            Credentials::Tpm { pool } => DeviceAuth::Tpm(pool[i % pool.len()].clone()),
        };
        let payload = (self.opts.payload_bytes > 0).then(|| {
            let base = json!({"modelId": "bench-thermostat", "serial": i, "pad": ""});
            let pad = self.opts.payload_bytes.saturating_sub(base.to_string().len());
            json!({"modelId": "bench-thermostat", "serial": i, "pad": "x".repeat(pad)})
        });
        Device { registration_id, auth, payload }
    }

    fn check(&self, state: &Value) -> Result<(), Failure> {
        if self.check_payload && !state["payload"].is_object() {
            return Err(Failure {
                key: "custom allocation payload missing".into(),
                detail: format!("registrationState has no payload object: {state}"),
            });
        }
        if self.check_tpm && state["tpm"]["authenticationKey"].as_str().is_none_or(str::is_empty) {
            return Err(Failure {
                key: "tpm.authenticationKey missing".into(),
                detail: format!("the assigned registrationState has no tpm.authenticationKey: {state}"),
            });
        }
        Ok(())
    }
}

/// What a worker does with each device.
#[derive(Clone)]
enum Step {
    /// The whole registration.
    Register,
    /// The first timed phase of a split TPM run: the challenge request; the blob is kept.
    TpmChallenge(Arc<SplitLegs>),
    /// Its second: the register request with the token made off the clock, then polls.
    TpmProof(Arc<SplitLegs>),
}

/// What the phases of a split TPM run hand each other, by device number.
struct SplitLegs {
    /// The authentication-key blob each device's challenge delivered.
    blobs: Vec<OnceLock<Vec<u8>>>,
    /// How long each challenge request took, microseconds.
    first_micros: Vec<AtomicU32>,
    /// The SAS token each device signed with its imported key, off the clock.
    tokens: Vec<OnceLock<String>>,
}

impl SplitLegs {
    fn new(devices: usize) -> SplitLegs {
        SplitLegs {
            blobs: (0..devices).map(|_| OnceLock::new()).collect(),
            first_micros: (0..devices).map(|_| AtomicU32::new(0)).collect(),
            tokens: (0..devices).map(|_| OnceLock::new()).collect(),
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<u32>,
    errors: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
    assigned: usize,
}

impl Tally {
    fn fail(&mut self, f: Failure) {
        *self.errors.entry(f.key.clone()).or_default() += 1;
        self.examples.entry(f.key).or_insert(f.detail);
    }

    fn add(&mut self, t: Tally) {
        self.latencies.extend(t.latencies);
        self.assigned += t.assigned;
        for (k, n) in t.errors {
            *self.errors.entry(k).or_default() += n;
        }
        for (k, v) in t.examples {
            self.examples.entry(k).or_insert(v);
        }
    }
}

/// CPU seconds used so far by dps (all its nodes), by this process and by the `postgres`
/// processes; or, from [`CpuClock::since`], used since an earlier reading.
#[derive(Debug, Clone, Copy, Default)]
struct CpuClock {
    dps: Option<f64>,
    bench: Option<f64>,
    database: Option<f64>,
}

impl CpuClock {
    fn read(target: &Target) -> CpuClock {
        CpuClock {
            dps: target.cpu_seconds(),
            bench: crate::target::process_cpu_seconds("/proc/self/stat"),
            database: crate::target::database_cpu_seconds(),
        }
    }

    fn since(&self, target: &Target) -> CpuClock {
        let now = CpuClock::read(target);
        let used = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
        CpuClock {
            dps: used(self.dps, now.dps),
            bench: used(self.bench, now.bench),
            database: used(self.database, now.database),
        }
    }
}

/// Counters a phase's workers share.
#[derive(Clone)]
struct Progressed {
    next: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

async fn worker(
    fleet: Arc<Fleet>,
    target: Arc<Target>,
    counters: Progressed,
    step: Step,
    t0: Instant,
    mut conn: Option<HttpsConn>,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let i = counters.next.fetch_add(1, Ordering::Relaxed);
        if i >= fleet.opts.devices {
            return tally;
        }
        let mut device = fleet.device(&target, i);
        if let Step::TpmProof(legs) = &step {
            // A device whose challenge or import failed was counted then.
            match legs.tokens[i].get() {
                Some(token) => device.auth = DeviceAuth::Sas(token.clone()),
                None => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    counters.done.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let scheduled = match fleet.opts.rate {
            Some(rate) => {
                let at = t0 + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        // `Some(blob)`: a challenge (Step::TpmChallenge); `None`: registered and checked.
        let attempt = async {
            let state = match fleet.opts.transport {
                Transport::Https => {
                    if conn.as_ref().is_none_or(|c| !c.is_open()) {
                        conn = Some(HttpsConn::open(&target, &fleet.plain_tls).await?);
                    }
                    let Some(c) = conn.as_mut() else {
                        return Err(Failure { key: "no connection".into(), detail: String::new() });
                    };
                    match (&step, &device.auth) {
                        (Step::TpmChallenge(_), DeviceAuth::Tpm(id)) => {
                            return c.tpm_challenge_blob(&target, &device, id).await.map(Some)
                        }
                        _ => c.register(&target, &device).await,
                    }
                }
                Transport::HttpsNewConn => https_register_fresh(&target, &fleet.plain_tls, &device).await,
                Transport::Mqtt => mqtt_register(&target, &fleet.plain_tls, &device).await,
                Transport::Amqp => amqp_register(&target, &fleet.plain_tls, &device).await,
            }?;
            fleet.check(&state).map(|()| None)
        };
        let outcome = match tokio::time::timeout(fleet.opts.device_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                conn = None;
                Err(Failure {
                    key: "timeout".into(),
                    detail: format!("no final answer within {:?}", fleet.opts.device_timeout),
                })
            }
        };
        let mut micros = u32::try_from(scheduled.elapsed().as_micros()).unwrap_or(u32::MAX);
        match outcome {
            Ok(blob) => {
                match (&step, blob) {
                    (Step::TpmChallenge(legs), Some(blob)) => {
                        legs.first_micros[i].store(micros, Ordering::Relaxed);
                        let _ = legs.blobs[i].set(blob);
                    }
                    (Step::TpmProof(legs), _) => {
                        micros = micros.saturating_add(legs.first_micros[i].load(Ordering::Relaxed));
                    }
                    _ => {}
                }
                tally.assigned += 1;
                tally.latencies.push(micros);
            }
            Err(f) => {
                if fleet.opts.transport == Transport::Https {
                    conn = None;
                }
                tally.fail(f);
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        counters.done.fetch_add(1, Ordering::Relaxed);
    }
}

fn progress_task(
    label: &'static str,
    total: usize,
    mode: Progress,
    done: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let bar = (mode == Progress::Bar).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(label);
            bar
        });
        let tick = if mode == Progress::Lines { Duration::from_secs(5) } else { Duration::from_millis(200) };
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(tick).await;
            let (d, f) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
            match (&bar, mode) {
                (Some(bar), _) => {
                    bar.set_position(d as u64);
                    bar.set_message(if f > 0 { format!("{f} failed") } else { String::new() });
                }
                (None, Progress::Lines) if !stop.load(Ordering::Relaxed) => {
                    let rate = d as f64 / started.elapsed().as_secs_f64().max(1e-3);
                    eprintln!("{label}: {d}/{total} done, {rate:.0}/s, {f} failed");
                }
                _ => {}
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    })
}

/// The devices against `target`: one timed run, or the three steps of a split TPM run.
async fn phase(fleet: &Arc<Fleet>, target: &Target, label: &'static str) -> Result<PhaseReport, BenchError> {
    if !fleet.opts.tpm_split {
        let (tally, seconds) = timed(fleet, target, label, Step::Register).await?;
        return Ok(phase_report(fleet, tally, seconds, None));
    }
    let legs = Arc::new(SplitLegs::new(fleet.opts.devices));
    let cpu = CpuClock::read(target);
    let (challenged, challenge_seconds) = timed(fleet, target, label, Step::TpmChallenge(legs.clone())).await?;
    let challenge_dps_cpu_seconds = cpu.since(target).dps;
    let started = Instant::now();
    let cpu = CpuClock::read(target);
    let import_failures = open_challenges(fleet, target, &legs).await?;
    let off_clock = cpu.since(target);
    let split = TpmSplit {
        challenge_seconds,
        challenge_dps_cpu_seconds,
        off_clock_seconds: started.elapsed().as_secs_f64(),
        off_clock_bench_cpu_seconds: off_clock.bench.unwrap_or(0.0),
        off_clock_dps_cpu_seconds: off_clock.dps,
        off_clock_database_cpu_seconds: off_clock.database,
    };
    let (proved, proof_seconds) = timed(fleet, target, label, Step::TpmProof(legs)).await?;
    // A device counts once: assigned (with both requests' latency) or failed at some step.
    let mut total = Tally { errors: challenged.errors, examples: challenged.examples, ..Tally::default() };
    total.add(import_failures);
    total.add(proved);
    Ok(phase_report(fleet, total, challenge_seconds + proof_seconds, Some(split)))
}

fn phase_report(fleet: &Fleet, mut total: Tally, seconds: f64, tpm_split: Option<TpmSplit>) -> PhaseReport {
    PhaseReport {
        devices: fleet.opts.devices,
        assigned: total.assigned,
        errors: total.errors,
        error_examples: total.examples,
        seconds,
        per_second: total.assigned as f64 / seconds.max(1e-9),
        latency_ms: Latency::of(&mut total.latencies),
        tpm_split,
    }
}

/// A split TPM run's untimed step: every software TPM opens the blob its challenge delivered
/// and signs its token, on every core. Failures count as the device's.
async fn open_challenges(fleet: &Arc<Fleet>, target: &Target, legs: &Arc<SplitLegs>) -> Result<Tally, BenchError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) {
        let (fleet, legs, next, target) = (fleet.clone(), legs.clone(), next.clone(), Arc::new(target.clone()));
        tasks.spawn_blocking(move || {
            let mut tally = Tally::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= fleet.opts.devices {
                    return tally;
                }
                let Some(blob) = legs.blobs[i].get() else { continue };
                let device = fleet.device(&target, i);
                let DeviceAuth::Tpm(id) = &device.auth else { continue };
                match tpm_token(id, &target.id_scope, &device.registration_id, blob) {
                    Ok(token) => {
                        let _ = legs.tokens[i].set(token);
                    }
                    Err(f) => tally.fail(f),
                }
            }
        });
    }
    let mut failed = Tally::default();
    while let Some(t) = tasks.join_next().await {
        failed.add(t.map_err(|e| BenchError::Setup(format!("a software TPM task failed: {e}")))?);
    }
    Ok(failed)
}

/// One timed pass of every device through `step`: its tally and wall-clock seconds.
async fn timed(
    fleet: &Arc<Fleet>,
    target: &Target,
    label: &'static str,
    step: Step,
) -> Result<(Tally, f64), BenchError> {
    // Worker `i` talks to node `i % nodes` (one node unless the target has peers).
    let counters = Progressed {
        next: Arc::new(AtomicUsize::new(0)),
        done: Arc::new(AtomicUsize::new(0)),
        failed: Arc::new(AtomicUsize::new(0)),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let progress = progress_task(
        label,
        fleet.opts.devices,
        fleet.opts.progress,
        counters.done.clone(),
        counters.failed.clone(),
        stop.clone(),
    );
    let workers = fleet.opts.concurrency.min(fleet.opts.devices);
    let targets: Vec<Arc<Target>> = (0..workers).map(|i| Arc::new(target.node(i))).collect();
    // Keep-alive HTTPS measures registrations over open connections: the connections are
    // opened before the clock starts (a worker whose connection failed opens one itself).
    let mut conns: Vec<Option<HttpsConn>> = Vec::with_capacity(workers);
    if fleet.opts.transport == Transport::Https {
        let mut opening = tokio::task::JoinSet::new();
        for target in &targets {
            let (target, tls, limit) = (target.clone(), fleet.plain_tls.clone(), fleet.opts.device_timeout);
            opening.spawn(async move { tokio::time::timeout(limit, HttpsConn::open(&target, &tls)).await.ok()?.ok() });
        }
        while let Some(c) = opening.join_next().await {
            conns.push(c.ok().flatten());
        }
    }
    conns.resize_with(workers, || None);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (conn, target) in conns.into_iter().zip(targets) {
        tasks.spawn(worker(fleet.clone(), target, counters.clone(), step.clone(), t0, conn));
    }
    let mut total = Tally::default();
    while let Some(r) = tasks.join_next().await {
        total.add(r.map_err(|e| BenchError::Setup(format!("a bench worker failed: {e}")))?);
    }
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = progress.await;
    Ok((total, seconds))
}

fn bench_ca() -> Result<(rcgen::Certificate, rcgen::KeyPair), BenchError> {
    let err = |e: rcgen::Error| BenchError::Setup(format!("bench CA: {e}"));
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "dps-bench CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert, key))
}

fn device_certificate(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    registration_id: &str,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), BenchError> {
    let err = |e: rcgen::Error| BenchError::Setup(format!("device certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, registration_id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let cert = params.signed_by(&key, ca, ca_key).map_err(err)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
}

/// Prints setup progress (every 5 s and at the end) unless quiet.
fn setup_progress(opts: &FleetOptions, kind: &'static str) -> Arc<dyn Fn(usize) + Send + Sync> {
    let shown = Mutex::new(Instant::now());
    let (total, mode) = (opts.devices, opts.progress);
    Arc::new(move |n: usize| {
        if mode == Progress::Quiet {
            return;
        }
        if let Ok(mut last) = shown.lock() {
            if last.elapsed() > Duration::from_secs(5) || n == total {
                *last = Instant::now();
                eprintln!("setup: {n}/{total} {kind} enrollments created");
            }
        }
    })
}

/// Generates the [`TPM_POOL`] software TPMs of a TPM run, in parallel on blocking threads.
async fn tpm_pool() -> Result<Vec<Arc<TpmIdentity>>, BenchError> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TPM_POOL {
        tasks.spawn_blocking(|| {
            let tpm = dps_core::tpm::software::SoftwareTpm::generate(&mut rand::rngs::OsRng)
                .map_err(|e| format!("generating a software TPM: {e}"))?;
            TpmIdentity::new(tpm).map(Arc::new)
        });
    }
    let mut pool = Vec::with_capacity(TPM_POOL);
    while let Some(r) = tasks.join_next().await {
        let identity = r.map_err(|e| BenchError::Setup(format!("software TPM task: {e}")))?;
        pool.push(identity.map_err(BenchError::Setup)?);
    }
    Ok(pool)
}

/// Runs the fleet against `target` and, when given, against the ceiling server (the same
/// target with the ceiling's addresses). The webhook of `Allocation::Webhook` runs in this
/// process.
pub async fn run(target: &Target, ceiling: Option<&Target>, opts: FleetOptions) -> Result<BenchReport, BenchError> {
    opts.validate()?;
    if opts.transport == Transport::Mqtt && target.mqtt_addr.is_none() {
        return Err(BenchError::Input("the server has no MQTT listener (mqtt.enabled = false?)".into()));
    }
    if opts.transport == Transport::Amqp && target.amqp_addr.is_none() {
        return Err(BenchError::Input(
            "the server has no AMQP listener (no amqpAddress in its credentials: amqp.enabled = false, or no listen.amqp?)"
                .into(),
        ));
    }
    // A ceiling without an AMQP listener (an older binary) cannot take an AMQP run.
    let ceiling = ceiling.filter(|c| {
        let usable = opts.transport != Transport::Amqp || c.amqp_addr.is_some();
        if !usable {
            eprintln!("note: the ceiling server has no AMQP listener; no ceiling run");
        }
        usable
    });
    let setup_started = Instant::now();
    let service = ServiceClient::new(target)?;
    let webhook_url = match &opts.allocation {
        Allocation::Hashed => None,
        Allocation::Webhook => Some(crate::webhook::start().await?),
        Allocation::Rules(name) => Some(format!("rules://{name}")),
    };
    let alloc = allocation_fields(webhook_url.as_deref());
    let group_id = format!("{}group", opts.id_prefix);
    let alpn: &[&[u8]] = if matches!(opts.transport, Transport::Mqtt | Transport::Amqp) { &[] } else { &[b"http/1.1"] };
    let mut enrollments_created = 0;
    let credentials = match opts.attestation {
        Attestation::Group => {
            let key = derive_device_key(b"dps-bench group", &group_id);
            service
                .put_group(
                    &group_id,
                    merge(
                        json!({"enrollmentGroupId": group_id, "attestation": symmetric_key_attestation(&key)}),
                        alloc,
                    ),
                )
                .await?;
            Credentials::Group { key }
        }
        Attestation::Individual => {
            let secret = derive_device_key(b"dps-bench individual", &opts.id_prefix);
            let (secret2, prefix) = (secret.clone(), opts.id_prefix.clone());
            let make = Arc::new(move |i: usize| {
                let id = format!("{prefix}{i}");
                let key = derive_device_key(&secret2, &id);
                merge(json!({"registrationId": id, "attestation": symmetric_key_attestation(&key)}), alloc.clone())
            });
            let progress = setup_progress(&opts, "individual");
            service.create_individual_enrollments(opts.devices, opts.setup_parallel, make, progress).await?;
            enrollments_created = opts.devices;
            Credentials::Individual { secret }
        }
        Attestation::Tpm => {
            let pool = tpm_pool().await?;
            let eks: Vec<String> = pool.iter().map(|t| t.endorsement_key.clone()).collect();
            let prefix = opts.id_prefix.clone();
            let make = Arc::new(move |i: usize| {
                let ek = &eks[i % eks.len()];
                merge(
                    json!({"registrationId": format!("{prefix}{i}"),
                           "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}),
                    alloc.clone(),
                )
            });
            let progress = setup_progress(&opts, "TPM");
            service.create_individual_enrollments(opts.devices, opts.setup_parallel, make, progress).await?;
            enrollments_created = opts.devices;
            Credentials::Tpm { pool }
        }
        Attestation::X509 => {
            let (ca, ca_key) = bench_ca()?;
            let ca_name = format!("{}ca", opts.id_prefix).replace(['.', ':'], "-");
            service.put_verified_certificate(&ca_name, &ca.pem()).await?;
            service
                .put_group(
                    &group_id,
                    merge(
                        json!({"enrollmentGroupId": group_id, "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca_name}}}}),
                        alloc,
                    ),
                )
                .await?;
            let mut configs = Vec::with_capacity(opts.devices);
            for i in 0..opts.devices {
                let (leaf, key) = device_certificate(&ca, &ca_key, &format!("{}{i}", opts.id_prefix))?;
                let chain = vec![leaf, ca.der().clone()];
                configs.push(
                    client_tls(target.roots.clone(), Some((chain, key)), alpn, false).map_err(BenchError::Setup)?,
                );
            }
            Credentials::X509 { configs }
        }
    };
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    let resume = opts.transport == Transport::Https;
    let plain_tls = client_tls(target.roots.clone(), None, alpn, resume).map_err(BenchError::Setup)?;
    let fleet = Arc::new(Fleet {
        opts: opts.clone(),
        credentials,
        check_payload: webhook_url.is_some(),
        check_tpm: opts.attestation == Attestation::Tpm,
        plain_tls,
    });

    // dps, with its memory sampled.
    let before = target.memory_kib();
    let cpu_before = CpuClock::read(target);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (target, sampling) = (target.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut peak = 0u64;
            while sampling.load(Ordering::Relaxed) {
                if let Some((rss, _)) = target.memory_kib() {
                    peak = peak.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    };
    let dps = phase(&fleet, target, "dps").await?;
    // A split TPM run leaves its untimed step out of the CPU figures too.
    let used = cpu_before.since(target);
    let off = |f: fn(&TpmSplit) -> Option<f64>| dps.tpm_split.as_ref().and_then(f).unwrap_or(0.0);
    let database_used = used.database.map(|s| s - off(|o| o.off_clock_database_cpu_seconds));
    let cpu = match (used.dps, used.bench) {
        (Some(d), Some(b)) => {
            let dps_seconds = d - off(|o| o.off_clock_dps_cpu_seconds);
            Some(Cpu {
                dps_seconds,
                dps_us_per_device: dps_seconds * 1e6 / dps.assigned.max(1) as f64,
                bench_seconds: b - off(|o| Some(o.off_clock_bench_cpu_seconds)),
                database_seconds: database_used,
                database_us_per_device: database_used.map(|s| s * 1e6 / dps.assigned.max(1) as f64),
                nodes: 1 + target.peers.len(),
            })
        }
        _ => None,
    };
    sampling.store(false, Ordering::Relaxed);
    let peak = sampler.await.unwrap_or(0);
    let after = target.memory_kib();
    let mib = |k: u64| k as f64 / 1024.0;
    let server_memory = match (before, after) {
        (Some(b), Some(a)) => Some(Memory {
            rss_before_mib: mib(b.0),
            rss_peak_during_mib: mib(peak.max(a.0)),
            rss_after_mib: mib(a.0),
            hwm_mib: mib(a.1),
        }),
        _ => None,
    };

    // The ceiling: same devices, same TLS, fixed answers.
    let ceiling_report = match ceiling {
        Some(c) => {
            let ceiling_fleet = Arc::new(Fleet {
                opts: fleet.opts.clone(),
                credentials: match &fleet.credentials {
                    Credentials::Individual { secret } => Credentials::Individual { secret: secret.clone() },
                    Credentials::Group { key } => Credentials::Group { key: key.clone() },
                    Credentials::X509 { configs } => Credentials::X509 { configs: configs.clone() },
                    Credentials::Tpm { pool } => Credentials::Tpm { pool: pool.clone() },
                },
                check_payload: false,
                check_tpm: false,
                plain_tls: fleet.plain_tls.clone(),
            });
            Some(phase(&ceiling_fleet, c, "ceiling").await?)
        }
        None => None,
    };
    let ratio = ceiling_report.as_ref().filter(|c| c.per_second > 0.0).map(|c| dps.per_second / c.per_second);
    Ok(BenchReport {
        transport: opts.transport.name().into(),
        attestation: opts.attestation.name().into(),
        allocation: match &opts.allocation {
            Allocation::Hashed => "hashed".into(),
            Allocation::Webhook => "webhook".into(),
            Allocation::Rules(n) => format!("rules://{n}"),
        },
        payload_bytes: opts.payload_bytes,
        devices: opts.devices,
        concurrency: opts.concurrency,
        rate: opts.rate,
        setup_seconds,
        enrollments_created,
        dps,
        ceiling: ceiling_report,
        ratio_to_ceiling: ratio,
        server_memory,
        cpu,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        server_key: target.server_key.clone(),
        hub_registrar: None,
        metrics_registrations: None,
        events: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(attestation: Attestation, transport: Transport) -> FleetOptions {
        FleetOptions {
            devices: 10,
            concurrency: 2,
            transport,
            attestation,
            allocation: Allocation::Hashed,
            payload_bytes: 0,
            rate: None,
            id_prefix: "t-".into(),
            device_timeout: Duration::from_secs(5),
            setup_parallel: 1,
            progress: Progress::Quiet,
            tpm_split: false,
        }
    }

    #[test]
    fn tpm_runs_over_https_and_amqp_only() {
        assert!(options(Attestation::Tpm, Transport::Https).validate().is_ok());
        assert!(options(Attestation::Tpm, Transport::HttpsNewConn).validate().is_ok());
        assert!(options(Attestation::Tpm, Transport::Amqp).validate().is_ok());
        let err = options(Attestation::Tpm, Transport::Mqtt).validate().unwrap_err().to_string();
        assert!(err.contains("use --transport https, https-new-conn or amqp"), "{err}");
    }

    #[test]
    fn a_split_run_is_tpm_over_kept_alive_https_without_a_rate() {
        let split = |attestation, transport, rate| {
            let mut o = options(attestation, transport);
            (o.tpm_split, o.rate) = (true, rate);
            o.validate()
        };
        assert!(split(Attestation::Tpm, Transport::Https, None).is_ok());
        let mut many = options(Attestation::Tpm, Transport::Https);
        (many.tpm_split, many.devices) = (true, 200_001);
        assert!(many.validate().unwrap_err().to_string().contains("at most 200000 devices"));
        for (a, t, rate) in [
            (Attestation::Individual, Transport::Https, None),
            (Attestation::Tpm, Transport::HttpsNewConn, None),
            (Attestation::Tpm, Transport::Amqp, None),
            (Attestation::Tpm, Transport::Https, Some(100.0)),
        ] {
            let err = split(a, t, rate).unwrap_err().to_string();
            assert!(err.contains("--tpm-split is for --attestation tpm"), "{a:?} {t:?}: {err}");
        }
    }

    #[test]
    fn x509_runs_on_a_connection_per_device() {
        for t in [Transport::HttpsNewConn, Transport::Mqtt, Transport::Amqp] {
            assert!(options(Attestation::X509, t).validate().is_ok(), "{t:?}");
        }
        let err = options(Attestation::X509, Transport::Https).validate().unwrap_err().to_string();
        assert!(err.contains("https-new-conn, mqtt or amqp"), "{err}");
    }

    #[test]
    fn an_assigned_tpm_device_must_get_its_authentication_key() {
        let plain_tls = client_tls(Arc::new(rustls::RootCertStore::empty()), None, &[], false).unwrap();
        let fleet = Fleet {
            opts: options(Attestation::Tpm, Transport::Https),
            credentials: Credentials::Tpm { pool: Vec::new() },
            check_payload: false,
            check_tpm: true,
            plain_tls,
        };
        assert!(fleet.check(&json!({"assignedHub": "h", "tpm": {"authenticationKey": "AAEC"}})).is_ok());
        for state in [json!({"assignedHub": "h"}), json!({"tpm": {}}), json!({"tpm": {"authenticationKey": ""}})] {
            let failure = fleet.check(&state).unwrap_err();
            assert_eq!(failure.key, "tpm.authenticationKey missing", "{state}");
        }
    }
}
