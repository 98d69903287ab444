//! `dps bench` and the hidden `dps bench-ceiling`.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::ValueEnum as _;
use dps_bench::fleet::{default_prefix, Progress};
use dps_bench::target::{BenchStore, GeneratedKey, SpawnedServer};
use dps_bench::{Allocation, Attestation, BenchError, FleetOptions, Target, Transport};

/// `--store` of `dps bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// The embedded SQLite store.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// `--registrar` of `dps bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RegistrarKind {
    /// The linked hubs only record (no hub call).
    Record,
    /// One linked hub, a Mosquitto broker that dps bench starts (the Debian package with its
    /// dynamic-security plugin): a client and a role per device.
    Mosquitto,
    /// The three linked hubs are local IoT hubs in this process that implement the IoT Hub
    /// service REST contract (identity and twin per device, over HTTPS).
    AzureIotHub,
}

/// `dps bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Run against the dps whose dev-credentials.json this is (it must be on this machine for
    /// its memory figures and the ceiling). Without it, dps bench starts a dps of its own.
    #[arg(long, value_name = "FILE")]
    target: Option<PathBuf>,
    /// Data directory for the dps that dps bench starts (kept, and reused by later runs: a way
    /// to measure against a large store). Default: a temporary directory, removed afterwards.
    #[arg(long, conflicts_with = "target")]
    data_dir: Option<PathBuf>,
    /// Key type of the server certificate of the dps that dps bench starts (tls.generated_key):
    /// rsa-2048 or ecdsa-p256. The TLS handshake's cost, which bounds new connections per
    /// second, depends on it.
    #[arg(long, default_value = "rsa-2048", conflicts_with = "target")]
    server_key: GeneratedKey,
    /// Store of the dps that dps bench starts: sqlite (a file in its data directory,
    /// synchronous = "full") or postgres (a database created on the --store-url server for the
    /// run and dropped afterwards, unless --store-database names one to use and keep).
    #[arg(long, value_enum, default_value = "sqlite", conflicts_with = "target")]
    store: StoreKind,
    /// PostgreSQL server for --store postgres; the role needs CREATEDB unless
    /// --store-database is given. Default: $DPS_STORE_URL, else
    /// postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, value_name = "URL", conflicts_with = "target")]
    store_url: Option<String>,
    /// Use (and keep) this existing database on the --store-url server instead of a fresh one:
    /// a way to measure against a large store.
    #[arg(long, value_name = "NAME", requires = "store_url", conflicts_with = "target")]
    store_database: Option<String>,
    /// dps nodes to start on the one PostgreSQL database (--store postgres); the load is
    /// spread over them, worker i on node i mod N.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8), conflicts_with = "target")]
    nodes: u16,
    /// Devices to register.
    #[arg(long, short = 'n', default_value_t = 1000)]
    devices: usize,
    /// Devices in flight at once (for https: kept-alive connections).
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// How devices connect.
    #[arg(long, value_enum, default_value = "https")]
    transport: Transport,
    /// How devices attest (individual and tpm enrollments are created in bulk first; tpm
    /// devices use software TPMs and need --transport https, https-new-conn or amqp).
    #[arg(long, value_enum, default_value = "group")]
    attestation: Attestation,
    /// Allocation: hashed (the default policy), webhook (a webhook in this process), rules
    /// (the rule set "bench" of the dps bench starts) or rules:<name>.
    #[arg(long, default_value = "hashed")]
    allocation: Allocation,
    /// Send a registration payload of about this many bytes (0: none).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Start devices at this rate (per second) instead of as fast as they finish; latency is
    /// then counted from each device's scheduled start.
    #[arg(long)]
    rate: Option<f64>,
    /// Skip the ceiling run (the same devices against a fixed-answer server on the same TLS
    /// settings: hyper + rustls, and minimal MQTT and AMQP responders).
    #[arg(long)]
    no_ceiling: bool,
    /// Registration ID prefix; default bench-<unix time in ms>-<pid>- (new devices each run).
    #[arg(long)]
    id_prefix: Option<String>,
    /// Seconds one device may take before it counts as failed.
    #[arg(long, default_value_t = 60)]
    device_timeout_secs: u64,
    /// Bulk operations in flight while creating individual enrollments.
    #[arg(long, default_value_t = 8)]
    setup_parallel: usize,
    /// With --attestation tpm over https: time every device's challenge request, then let
    /// the software TPMs open their blobs off the clock (two RSA-2048 private-key operations
    /// per device, which cost the load generator more CPU than the server's whole work),
    /// then time every device's proof and polls. The server gets the same requests and does
    /// the same writes as in an interleaved run; throughput counts both timed phases.
    #[arg(long)]
    tpm_split: bool,
    /// What the linked hubs of the dps that dps bench starts do with a registration: the
    /// registrar's cost shows against a `record` run in the same session (BENCHMARKS.md).
    #[arg(long, value_enum, default_value = "record")]
    registrar: RegistrarKind,
    /// Turn on the started dps's Prometheus metrics (`[metrics] listen` on loopback) and scrape
    /// them after the run: their cost shows against a run without (BENCHMARKS.md).
    #[arg(long)]
    metrics: bool,
    /// Turn on the started dps's lifecycle events to this NATS server (JetStream; e.g.
    /// nats://127.0.0.1:4222), into a stream of the run's own that is deleted at the end; the
    /// report counts the events delivered.
    #[arg(long, value_name = "URL")]
    events_nats: Option<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// `dps bench-ceiling` options (started by dps bench).
#[derive(Debug, clap::Args)]
pub struct CeilingArgs {
    /// Server certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Server key (PEM).
    #[arg(long)]
    key: PathBuf,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Serves the ceiling until stdin closes; prints `{"https": addr, "mqtt": addr, "amqp": addr}`
/// when ready.
pub fn ceiling(args: CeilingArgs) -> ExitCode {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Ends when the parent closes our stdin (or dies).
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin().lock().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        std::process::exit(0);
    });
    let result = rt.block_on(dps_bench::ceiling::serve(&args.cert, &args.key, |l| {
        println!(
            "{}",
            serde_json::json!({"https": l.https.to_string(), "mqtt": l.mqtt.to_string(), "amqp": l.amqp.to_string()})
        );
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A ceiling server process; stopped when dropped.
struct CeilingProcess {
    child: std::process::Child,
}

impl Drop for CeilingProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ceiling(target: &Target) -> Result<Option<(CeilingProcess, Target)>, BenchError> {
    let Some((cert, key)) = &target.server_tls else {
        eprintln!("note: the server's certificate and key are not in its data directory; no ceiling run");
        return Ok(None);
    };
    let exe = std::env::current_exe().map_err(BenchError::io("cannot find the dps binary"))?;
    let mut child = Command::new(exe)
        .arg("bench-ceiling")
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(BenchError::io("cannot start the ceiling server"))?;
    let stdout = child.stdout.take();
    let process = CeilingProcess { child };
    let mut line = String::new();
    if let Some(out) = stdout {
        std::io::BufReader::new(out).read_line(&mut line).map_err(BenchError::io("reading the ceiling's address"))?;
    }
    let v: serde_json::Value = serde_json::from_str(&line)
        .map_err(|_| BenchError::Setup(format!("the ceiling server did not start (said {line:?})")))?;
    let addr = |k: &str| {
        v[k].as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| BenchError::Setup(format!("the ceiling server gave no {k} address")))
    };
    let mut c = target.clone();
    c.https_addr = addr("https")?;
    c.mqtt_addr = Some(addr("mqtt")?);
    // A ceiling that predates AMQP prints no "amqp": AMQP runs then skip the ceiling.
    c.amqp_addr = v["amqp"].as_str().and_then(|a| a.parse().ok());
    c.pid = None;
    c.peers.clear();
    Ok(Some((process, c)))
}

/// Runs `dps bench`.
pub fn run(args: BenchArgs) -> ExitCode {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let progress = if args.json {
        Progress::Quiet
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Progress::Bar
    } else {
        Progress::Lines
    };
    let opts = FleetOptions {
        devices: args.devices,
        concurrency: args.concurrency,
        transport: args.transport,
        attestation: args.attestation,
        allocation: args.allocation.clone(),
        payload_bytes: args.payload_bytes,
        rate: args.rate,
        id_prefix: args.id_prefix.clone().unwrap_or_else(default_prefix),
        device_timeout: Duration::from_secs(args.device_timeout_secs.max(1)),
        setup_parallel: args.setup_parallel.max(1),
        progress,
        tpm_split: args.tpm_split,
    };
    if let Err(e) = opts.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match execute(&args, opts) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", report.to_text());
            }
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(BenchError::Input(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(args: &BenchArgs, opts: FleetOptions) -> Result<dps_bench::BenchReport, BenchError> {
    if args.nodes > 1 && args.store != StoreKind::Postgres {
        return Err(BenchError::Input("--nodes above 1 needs --store postgres (nodes share one database)".into()));
    }
    let rt = runtime().map_err(BenchError::Setup)?;
    // A database of the run's own unless --store-database.
    let (store, scratch) = match args.store {
        StoreKind::Sqlite => (BenchStore::Sqlite, None),
        StoreKind::Postgres => {
            let server = args
                .store_url
                .clone()
                .or_else(|| std::env::var(dps_server::config::STORE_URL_ENV).ok())
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
            match &args.store_database {
                Some(name) => (
                    BenchStore::Postgres(
                        dps_store::ScratchDatabase::url_of(&server, name)
                            .map_err(|e| BenchError::Input(e.to_string()))?,
                    ),
                    None,
                ),
                None => {
                    let db = rt
                        .block_on(dps_store::ScratchDatabase::create(&server, "bench"))
                        .map_err(|e| BenchError::Setup(e.to_string()))?;
                    (BenchStore::Postgres(db.url.clone()), Some(db))
                }
            }
        }
    };
    // The database goes whatever happened to the run.
    let report = run_nodes(args, opts, &rt, &store);
    if let Some(db) = scratch {
        if let Err(e) = rt.block_on(db.drop_database()) {
            eprintln!("note: {e}");
        }
    }
    report
}

/// Starts the run's dps nodes on `store` (unless `--target`), then measures.
fn run_nodes(
    args: &BenchArgs,
    opts: FleetOptions,
    rt: &tokio::runtime::Runtime,
    store: &BenchStore,
) -> Result<dps_bench::BenchReport, BenchError> {
    if args.target.is_some() && args.registrar != RegistrarKind::Record {
        return Err(BenchError::Input(
            "--registrar applies to the dps that dps bench starts (configure a --target's hubs in its own config)"
                .into(),
        ));
    }
    // The hubs, and what runs them, for the whole run.
    let hubs = rt.block_on(BenchHubs::start(args.registrar))?;
    if args.target.is_some() && args.events_nats.is_some() {
        return Err(BenchError::Input(
            "--events-nats applies to the dps that dps bench starts (configure a --target's [events] in its own config)"
                .into(),
        ));
    }
    // The run's own subjects and stream.
    let events_stream = args.events_nats.as_ref().map(|_| {
        let run =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        (format!("dpsbench.r{run}"), format!("DPSBENCH_{run}"))
    });
    // dps nodes of our own unless --target: in --data-dir, or in a temporary directory.
    let mut temp = None;
    let mut servers = Vec::new();
    if args.target.is_none() {
        let dir = match &args.data_dir {
            Some(d) => d.clone(),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("dps-bench-")
                    .tempdir()
                    .map_err(BenchError::io("cannot create a temporary directory"))?;
                let p = t.path().to_path_buf();
                temp = Some(t);
                p
            }
        };
        let exe = std::env::current_exe().map_err(BenchError::io("cannot find the dps binary"))?;
        // The first node creates the schema and the service identity; the others join it.
        for i in 0..args.nodes {
            let node_dir = if args.nodes == 1 { dir.clone() } else { dir.join(format!("node-{i}")) };
            let mut extra = String::new();
            if args.metrics {
                extra.push_str("[metrics]\nlisten = \"127.0.0.1:0\"\n");
            }
            if let (Some(url), Some((prefix, stream))) = (&args.events_nats, &events_stream) {
                extra.push_str(&format!(
                    "[events]\nnats_url = \"{url}\"\nnats_subject_prefix = \"{prefix}\"\nnats_stream = \"{stream}\"\n"
                ));
            }
            servers.push(SpawnedServer::start(
                &exe,
                &node_dir,
                args.server_key,
                store,
                hubs.config.as_deref(),
                &extra,
            )?);
        }
    }
    let target = match (servers.first(), &args.target) {
        (Some(first), _) => {
            let mut t = first.target.clone();
            t.peers = servers.iter().skip(1).map(|s| s.target.as_peer()).collect();
            t
        }
        (None, Some(path)) => Target::from_credentials(path)?,
        (None, None) => return Err(BenchError::Input("no target".into())),
    };
    let ceiling = if args.no_ceiling { None } else { start_ceiling(&target)? };
    let mut report = rt.block_on(dps_bench::run(&target, ceiling.as_ref().map(|(_, t)| t), opts)).map(|mut r| {
        if args.target.is_none() {
            r.hub_registrar =
                Some(args.registrar.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string()));
        }
        r
    });
    if let (Ok(r), true) = (&mut report, args.metrics) {
        let mut total = 0;
        for server in &servers {
            total += rt.block_on(scraped_registrations(&server.data_dir))?;
        }
        r.metrics_registrations = Some(total);
    }
    if let (Some(url), Some((_, stream))) = (&args.events_nats, &events_stream) {
        let settled = rt.block_on(events_settled(url, stream));
        match (&mut report, settled) {
            (Ok(r), Ok(e)) => r.events = Some(e),
            (Ok(_), Err(e)) => report = Err(e),
            (Err(_), _) => {}
        }
    }
    drop(ceiling);
    drop(servers);
    drop(temp);
    drop(hubs);
    report
}

/// Waits until the run's stream stops growing (1 s without a new message, at most 120 s),
/// then deletes it: how many events it held and when the last arrived.
async fn events_settled(url: &str, stream: &str) -> Result<dps_bench::report::EventsReport, BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Setup(format!("JetStream stream {stream} at {url}: {e}"));
    let client = async_nats::connect(url).await.map_err(|e| fail(&e))?;
    let js = async_nats::jetstream::new(client);
    let started = std::time::Instant::now();
    let (mut count, mut last_change) = (0u64, started);
    while last_change.elapsed() < std::time::Duration::from_secs(1)
        && started.elapsed() < std::time::Duration::from_secs(120)
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map_err(|e| fail(&e))?.state.messages,
            Err(_) => 0,
        };
        if now != count {
            count = now;
            last_change = std::time::Instant::now();
        }
    }
    let settled_after_seconds = last_change.duration_since(started).as_secs_f64();
    if let Err(e) = js.delete_stream(stream).await {
        eprintln!("note: cannot delete the stream {stream}: {e}");
    }
    Ok(dps_bench::report::EventsReport { delivered: count, settled_after_seconds })
}

/// The sum of `dps_registrations_total` a started dps serves at its metrics address.
async fn scraped_registrations(data_dir: &std::path::Path) -> Result<u64, BenchError> {
    let path = data_dir.join(dps_server::bootstrap::DEV_CREDENTIALS_FILE);
    let creds: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| BenchError::Setup(format!("cannot read {}", path.display())))?;
    let addr = creds["metricsAddress"]
        .as_str()
        .ok_or_else(|| BenchError::Setup(format!("{} has no metricsAddress", path.display())))?;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| BenchError::Setup(format!("cannot scrape http://{addr}/metrics: {e}")))?
        .text()
        .await
        .map_err(|e| BenchError::Setup(format!("cannot scrape http://{addr}/metrics: {e}")))?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("dps_registrations_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// The linked hubs of a run with a registrar, and what serves them (kept until the run ends).
struct BenchHubs {
    /// The `[[hubs]]` entries; `None`: the default hubs, which only record.
    config: Option<String>,
    _broker: Option<dps_bench::mosquitto::Broker>,
    _iot_hubs: Vec<dps_bench::iot_hub::IotHub>,
    _dir: Option<tempfile::TempDir>,
}

/// The hub names of a bench run.
const BENCH_HUBS: [&str; 3] = ["hub-1.bench.localhost", "hub-2.bench.localhost", "hub-3.bench.localhost"];

impl BenchHubs {
    async fn start(kind: RegistrarKind) -> Result<BenchHubs, BenchError> {
        let mut hubs = BenchHubs { config: None, _broker: None, _iot_hubs: Vec::new(), _dir: None };
        match kind {
            RegistrarKind::Record => {}
            RegistrarKind::Mosquitto => {
                // One broker is one hub (its clients are named by device ID).
                let broker = dps_bench::mosquitto::Broker::start().await?;
                hubs.config = Some(broker.config(BENCH_HUBS[0], "fail"));
                hubs._broker = Some(broker);
            }
            RegistrarKind::AzureIotHub => {
                let dir = tempfile::tempdir().map_err(BenchError::io("cannot create a temporary directory"))?;
                let mut config = String::new();
                for (i, name) in BENCH_HUBS.iter().enumerate() {
                    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [i as u8 + 1; 32]);
                    let hub = dps_bench::iot_hub::IotHub::start(name, &key).await;
                    config.push_str(&hub.config(dir.path(), "fail"));
                    hubs._iot_hubs.push(hub);
                }
                hubs.config = Some(config);
                hubs._dir = Some(dir);
            }
        }
        Ok(hubs)
    }
}
