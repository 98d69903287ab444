//! The dps under test: read from its `dev-credentials.json`, or started by the bench.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dps_proto::connection_string::ServiceConnectionString;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::Value;

use crate::BenchError;

pub use dps_proto::tls::GeneratedKey;

/// Where and how to reach a dps.
#[derive(Debug, Clone)]
pub struct Target {
    /// ID scope.
    pub id_scope: String,
    /// Host name in the server certificate (connections go to 127.0.0.1 or `address`).
    pub host: String,
    /// IP address of the HTTPS listener.
    pub https_addr: std::net::SocketAddr,
    /// MQTT listener, when enabled.
    pub mqtt_addr: Option<std::net::SocketAddr>,
    /// AMQP-over-TLS listener (`amqpAddress`), when enabled.
    pub amqp_addr: Option<std::net::SocketAddr>,
    /// Roots that verify the server certificate.
    pub roots: Arc<rustls::RootCertStore>,
    /// CA certificate file.
    pub ca_path: PathBuf,
    /// Owner policy name and key for the service API.
    pub policy: (String, Vec<u8>),
    /// Server process ID (for its memory figures), when on this machine.
    pub pid: Option<u32>,
    /// The server's certificate and key files, when they sit in the data directory (the
    /// ceiling server reuses them).
    pub server_tls: Option<(PathBuf, PathBuf)>,
    /// Linked hubs.
    pub linked_hubs: Vec<String>,
    /// Key algorithm of the server certificate (`rsa-2048`, `ecdsa-p256`, ...), when its
    /// file is on this machine.
    pub server_key: Option<String>,
    /// The other nodes of the same service (sharing its store), for runs spread over several
    /// nodes: worker `i` talks to node `i % (1 + peers.len())`, node 0 being this one.
    pub peers: Vec<Peer>,
}

/// Another node of the service a [`Target`] names.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its HTTPS listener.
    pub https_addr: std::net::SocketAddr,
    /// Its MQTT listener, when enabled.
    pub mqtt_addr: Option<std::net::SocketAddr>,
    /// Its AMQP listener, when enabled.
    pub amqp_addr: Option<std::net::SocketAddr>,
    /// Its process ID, when on this machine.
    pub pid: Option<u32>,
}

/// Which store the bench's own servers use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchStore {
    /// The embedded SQLite file, `synchronous = "full"`.
    Sqlite,
    /// A PostgreSQL database (the URL), shared by every node of the run.
    Postgres(String),
}

/// User + system CPU seconds from a `/proc/<pid>/stat` file (fields 14 and 15, in the
/// kernel's fixed 100 Hz `USER_HZ` ticks).
pub fn process_cpu_seconds(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The command name (field 2) may hold spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU seconds used so far by every process on this machine named `postgres` (the database
/// server and its backends, when the database runs here); `None` when there is none.
pub fn database_cpu_seconds() -> Option<f64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres" {
            if let Some(s) = process_cpu_seconds(&format!("/proc/{pid}/stat")) {
                *total.get_or_insert(0.0) += s;
            }
        }
    }
    total
}

/// The key algorithm of the first certificate in a PEM file: `rsa-<bits>` or `ecdsa-<curve>`.
fn key_algorithm(cert: &Path) -> Option<String> {
    use x509_parser::public_key::PublicKey;
    let pem = std::fs::read(cert).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let spki = cert.public_key();
    match spki.parsed().ok()? {
        PublicKey::RSA(rsa) => Some(format!("rsa-{}", rsa.key_size())),
        PublicKey::EC(_) => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
            let name = match curve.map(|o| o.to_id_string()).as_deref() {
                Some("1.2.840.10045.3.1.7") => "p256".to_string(),
                Some("1.3.132.0.34") => "p384".to_string(),
                Some(other) => other.to_string(),
                None => "unknown".to_string(),
            };
            Some(format!("ecdsa-{name}"))
        }
        _ => Some(spki.algorithm.algorithm.to_id_string()),
    }
}

fn loopback(addr: &str) -> Result<std::net::SocketAddr, BenchError> {
    let mut a: std::net::SocketAddr =
        addr.parse().map_err(|_| BenchError::Setup(format!("'{addr}' is not a socket address")))?;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(a)
}

impl Target {
    /// Reads a server's `dev-credentials.json`.
    pub fn from_credentials(path: &Path) -> Result<Target, BenchError> {
        let text = std::fs::read(path).map_err(BenchError::io(format!("cannot read {}", path.display())))?;
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| BenchError::Setup(format!("{} is not JSON: {e}", path.display())))?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| BenchError::Setup(format!("{} has no '{k}'", path.display())))
        };
        let conn = ServiceConnectionString::parse(&field("serviceConnectionString")?)
            .map_err(|e| BenchError::Setup(format!("{}: {e}", path.display())))?;
        let ca_path = PathBuf::from(field("caCertificatePath")?);
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&ca_path)
            .map_err(|e| BenchError::Setup(format!("cannot read {}: {e}", ca_path.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| BenchError::Setup(format!("{}: {e}", ca_path.display())))?;
            roots.add(cert).map_err(|e| BenchError::Setup(format!("{}: {e}", ca_path.display())))?;
        }
        let server_tls = ca_path.parent().map(|d| (d.join("server.pem"), d.join("server-key.pem")));
        let server_tls = server_tls.filter(|(c, k)| c.exists() && k.exists());
        let server_key = server_tls.as_ref().and_then(|(cert, _)| key_algorithm(cert));
        Ok(Target {
            id_scope: field("idScope")?,
            host: field("hostName")?,
            https_addr: loopback(&field("httpsAddress")?)?,
            mqtt_addr: v["mqttAddress"].as_str().map(loopback).transpose()?,
            amqp_addr: v["amqpAddress"].as_str().map(loopback).transpose()?,
            roots: Arc::new(roots),
            ca_path,
            policy: (conn.key_name.clone(), conn.key.clone()),
            pid: v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            server_tls,
            server_key,
            linked_hubs: v["linkedHubs"]
                .as_array()
                .map(|a| a.iter().filter_map(|h| h.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
            peers: Vec::new(),
        })
    }

    /// This target as another node of the same service.
    pub fn as_peer(&self) -> Peer {
        Peer { https_addr: self.https_addr, mqtt_addr: self.mqtt_addr, amqp_addr: self.amqp_addr, pid: self.pid }
    }

    /// The target worker `i` talks to: this node or one of its peers, in turn.
    pub fn node(&self, i: usize) -> Target {
        let n = i % (1 + self.peers.len());
        let mut t = self.clone();
        if n > 0 {
            let p = &self.peers[n - 1];
            (t.https_addr, t.mqtt_addr, t.amqp_addr, t.pid) = (p.https_addr, p.mqtt_addr, p.amqp_addr, p.pid);
        }
        t.peers.clear();
        t
    }

    /// CPU time (user + system, seconds) the server process has used so far, when it runs on
    /// this machine.
    /// With peers, the sum over every node.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let mut total = process_cpu_seconds(&format!("/proc/{}/stat", self.pid?))?;
        for p in &self.peers {
            total += process_cpu_seconds(&format!("/proc/{}/stat", p.pid?))?;
        }
        Some(total)
    }

    /// Resident and peak resident memory of the server process, in KiB.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let field = |name: &str| {
            status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }
}

/// A dps started by the bench; stopped (SIGTERM, then kill) when dropped.
#[derive(Debug)]
pub struct SpawnedServer {
    child: Child,
    /// The server's data directory.
    pub data_dir: PathBuf,
    /// How to reach it.
    pub target: Target,
}

/// The hubs of a bench server: three that only record.
const DEFAULT_HUBS: &str = "[[hubs]]
host_name = \"hub-1.bench.localhost\"
[[hubs]]
host_name = \"hub-2.bench.localhost\"
[[hubs]]
host_name = \"hub-3.bench.localhost\"
";

/// The config a bench server runs with: loopback listeners on free ports, the durable store
/// (SQLite `synchronous = "full"`, or PostgreSQL with the database's default
/// `synchronous_commit`), three linked hubs and the `bench` rule set.
///
/// `hubs` replaces the three hubs (`[[hubs]]` entries with their registrars); `extra` (TOML
/// tables, e.g. `[metrics]`) is added at the end.
pub fn server_config(
    data_dir: &Path,
    server_key: GeneratedKey,
    store: &BenchStore,
    hubs: Option<&str>,
    extra: &str,
) -> String {
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let store = match store {
        BenchStore::Sqlite => "synchronous = \"full\"".to_string(),
        BenchStore::Postgres(url) => format!("backend = \"postgres\"\nurl = \"{}\"", quote(url)),
    };
    format!(
        r#"data_dir = "{}"
log = "warn"

[tls]
generated_key = "{}"

[listen]
https = "127.0.0.1:0"
mqtt = "127.0.0.1:0"
amqp = "127.0.0.1:0"

[store]
{}

[limits]
# One load generator, one address: no per-address cap; the caps fit the descriptor limit.
max_connections_per_address = 1000000

[mqtt]
max_connections_per_address = 1000000

[amqp]
max_connections_per_address = 1000000

[[rules]]
name = "bench"
[[rules.cases]]
when = "true"
payload = "{{'registrationId': registrationId, 'model': payload == null ? 'none' : string(payload.modelId)}}"

{}
{}"#,
        quote(&data_dir.display().to_string()),
        server_key.as_str(),
        store,
        hubs.unwrap_or(DEFAULT_HUBS),
        extra
    )
}

impl SpawnedServer {
    /// Starts `dps serve` (the binary at `dps_exe`) on `data_dir` with [`server_config`], and
    /// waits until it has written its credentials.
    pub fn start(
        dps_exe: &Path,
        data_dir: &Path,
        server_key: GeneratedKey,
        store: &BenchStore,
        hubs: Option<&str>,
        extra: &str,
    ) -> Result<SpawnedServer, BenchError> {
        std::fs::create_dir_all(data_dir).map_err(BenchError::io(format!("cannot create {}", data_dir.display())))?;
        let data_dir =
            data_dir.canonicalize().map_err(BenchError::io(format!("cannot resolve {}", data_dir.display())))?;
        let config = data_dir.join("bench-dps.toml");
        std::fs::write(&config, server_config(&data_dir, server_key, store, hubs, extra))
            .map_err(BenchError::io(format!("cannot write {}", config.display())))?;
        let log = data_dir.join("bench-dps.log");
        let log_file =
            std::fs::File::create(&log).map_err(BenchError::io(format!("cannot create {}", log.display())))?;
        let child = Command::new(dps_exe)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(BenchError::io(format!("cannot start {}", dps_exe.display())))?;
        let mut server = SpawnedServer { child, data_dir: data_dir.clone(), target: placeholder_target() };
        let creds = data_dir.join("dev-credentials.json");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = server.child.try_wait().map_err(BenchError::io("waiting for dps"))? {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(BenchError::Setup(format!("dps exited ({status}) at start: {}", tail.trim())));
            }
            // The file of an earlier server on the same directory does not count.
            if let Ok(t) = Target::from_credentials(&creds) {
                if t.pid == Some(server.child.id()) {
                    server.target = t;
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "dps did not write {} within 120 s (log: {})",
                    creds.display(),
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn placeholder_target() -> Target {
    Target {
        id_scope: String::new(),
        host: String::new(),
        https_addr: ([127, 0, 0, 1], 0).into(),
        mqtt_addr: None,
        amqp_addr: None,
        roots: Arc::new(rustls::RootCertStore::empty()),
        ca_path: PathBuf::new(),
        policy: (String::new(), Vec::new()),
        pid: None,
        server_tls: None,
        server_key: None,
        linked_hubs: Vec::new(),
        peers: Vec::new(),
    }
}

/// Stops a child process: SIGTERM, a grace period, then SIGKILL.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::process_cpu_seconds;

    #[test]
    fn cpu_seconds_are_read_after_the_command_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stat");
        // A command name with spaces and a ')' of its own; utime 250 and stime 50 ticks.
        let fields = "S 1 1 1 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 1000 200";
        std::fs::write(&path, format!("4242 (dps (worker) x) {fields}\n")).unwrap();
        assert_eq!(process_cpu_seconds(path.to_str().unwrap()), Some(3.0));
        std::fs::write(&path, "4242 (dps) S 1\n").unwrap();
        assert_eq!(process_cpu_seconds(path.to_str().unwrap()), None, "too few fields");
        assert_eq!(process_cpu_seconds("/nonexistent/stat"), None);
    }
}
