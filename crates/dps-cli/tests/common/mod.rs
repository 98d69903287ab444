//! Test harness: spawns the real `dps` binary on an ephemeral port with a fresh data
//! directory and talks to it over real TLS, trusting the test CA it generated.
#![allow(dead_code)]

pub mod amqp;
pub mod mqtt;
pub mod pki;
pub mod webhook;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::sas::{build_token, decode_key};
use serde_json::Value;

pub const API: &str = "api-version=2021-10-01";

/// A running `dps serve`.
pub struct Dps {
    child: Option<Child>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    config_extra: String,
    listen: String,
    pub creds: Value,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    /// The data directory is a tmpfs of this many MiB in a mount namespace of dps's own.
    tmpfs_mib: Option<u32>,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

impl Dps {
    /// Starts a server with extra TOML added to a minimal config: the keys before its first
    /// table header at the top level, the tables after `[listen]`.
    pub async fn start(config_extra: &str) -> Dps {
        Self::start_with(config_extra, None).await
    }

    /// Starts a server whose data directory is a small tmpfs (`unshare -rm`: a user and mount
    /// namespace of its own), so that a test can fill it up; [`Dps::host_path`] reaches it.
    pub async fn start_on_tmpfs(config_extra: &str, mib: u32) -> Dps {
        Self::start_with(config_extra, Some(mib)).await
    }

    async fn start_with(config_extra: &str, tmpfs_mib: Option<u32>) -> Dps {
        let tmp = tempfile::tempdir().unwrap();
        let mut dps = Dps {
            child: None,
            dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
            config_extra: config_extra.to_string(),
            listen: "https = \"127.0.0.1:0\"\nmqtt = \"127.0.0.1:0\"\namqp = \"127.0.0.1:0\"".into(),
            creds: Value::Null,
            addr: "127.0.0.1:1".parse().unwrap(),
            client: reqwest::Client::new(),
            tmpfs_mib,
        };
        if tmpfs_mib.is_some() {
            std::fs::create_dir_all(dps.data_dir()).unwrap();
        }
        dps.spawn().await;
        dps
    }

    /// A path inside the server's view of the file system (its tmpfs data directory, when
    /// it has one), as this process can reach it.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        match (self.tmpfs_mib, &self.child) {
            (Some(_), Some(c)) => {
                PathBuf::from(format!("/proc/{}/root", c.id())).join(path.strip_prefix("/").unwrap_or(path))
            }
            _ => path.to_path_buf(),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("dps.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    async fn spawn(&mut self) {
        // Keys before the extra config's first table header are top-level keys.
        let extra = self.config_extra.as_str();
        let split = if extra.starts_with('[') { 0 } else { extra.find("\n[").map_or(extra.len(), |i| i + 1) };
        let (top, tables) = extra.split_at(split);
        // A [log] table of the test's replaces the short form.
        let log = if tables.contains("[log]") { "" } else { "log = \"info\"\n" };
        let config = format!(
            "data_dir = {:?}\n{log}{top}\n[listen]\n{}\n{tables}\n",
            self.data_dir().display().to_string(),
            self.listen,
        );
        std::fs::write(self.config_path(), config).unwrap();
        let log = std::fs::File::create(self.dir.join("dps.log")).unwrap();
        let mut command = match self.tmpfs_mib {
            None => Command::new(env!("CARGO_BIN_EXE_dps")),
            Some(mib) => {
                // unshare execs sh, sh execs dps: the child's PID is dps's.
                let mut c = Command::new("unshare");
                c.args([
                    "-rm",
                    "sh",
                    "-c",
                    "m=$1 d=$2 b=$3; shift 3; mount -t tmpfs -o size=\"$m\"m,mode=0700 tmpfs \"$d\" && exec \"$b\" \"$@\"",
                    "sh",
                ])
                .arg(mib.to_string())
                .arg(self.data_dir())
                .arg(env!("CARGO_BIN_EXE_dps"));
                c
            }
        };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dps");
        let pid = child.id();
        self.child = Some(child);
        let creds_path = self.host_path(&self.data_dir().join("dev-credentials.json"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&creds_path) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if v["pid"].as_u64() == Some(u64::from(pid)) {
                        self.creds = v;
                        break;
                    }
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dps exited early ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "dps did not start: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.addr = self.creds["httpsAddress"].as_str().unwrap().parse().unwrap();
        self.client = self.client_builder().timeout(Duration::from_secs(30)).build().unwrap();
    }

    /// A client builder that trusts only this server's CA and reaches it as `localhost`.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let ca = std::fs::read(self.host_path(Path::new(self.creds["caCertificatePath"].as_str().unwrap()))).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .resolve("localhost", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dps.log")).unwrap_or_default()
    }

    /// The server's process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM (a graceful stop) and waits up to `deadline` for the process to exit;
    /// returns its exit status, or panics when it is still running.
    pub fn terminate(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("dps is running");
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
        assert!(sent.success(), "kill -TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > deadline {
                let _ = child.kill();
                panic!("dps still running {deadline:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Changes the extra config used by the next restart.
    pub fn set_config_extra(&mut self, extra: &str) {
        self.config_extra = extra.to_string();
    }

    /// Makes later restarts listen on the ports the server has now (devices configured
    /// with them reach the restarted server).
    pub fn pin_ports(&mut self) {
        self.listen = format!(
            "https = \"{}\"\nmqtt = \"{}\"\namqp = \"{}\"",
            self.creds["httpsAddress"].as_str().unwrap(),
            self.creds["mqttAddress"].as_str().unwrap(),
            self.creds["amqpAddress"].as_str().unwrap()
        );
    }

    /// Starts the same configuration and data directory again.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("https://localhost:{}{}", self.addr.port(), path_and_query)
    }

    pub fn scope(&self) -> String {
        self.creds["idScope"].as_str().unwrap().to_string()
    }

    fn owner_key(&self) -> Vec<u8> {
        let cs = self.creds["serviceConnectionString"].as_str().unwrap();
        let key = cs.split(';').find_map(|p| p.strip_prefix("SharedAccessKey=")).unwrap();
        decode_key(key).unwrap()
    }

    pub fn service_token(&self) -> String {
        build_token("localhost", &self.owner_key(), now() + 3600, Some("provisioningserviceowner"))
    }

    /// A service request with the owner policy.
    pub fn service(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.client
            .request(method, self.url(&format!("{path}{sep}{API}")))
            .header("Authorization", self.service_token())
    }

    pub async fn put_enrollment(&self, body: Value) -> Value {
        let id = body["registrationId"].as_str().unwrap().to_string();
        let resp = self.service(reqwest::Method::PUT, &format!("/enrollments/{id}")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        resp.json().await.unwrap()
    }

    pub async fn put_group(&self, body: Value) -> Value {
        let id = body["enrollmentGroupId"].as_str().unwrap().to_string();
        let resp =
            self.service(reqwest::Method::PUT, &format!("/enrollmentGroups/{id}")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        resp.json().await.unwrap()
    }

    pub fn device_token(&self, registration_id: &str, key_b64: &str) -> String {
        let resource = format!("{}/registrations/{registration_id}", self.scope());
        build_token(&resource, &decode_key(key_b64).unwrap(), now() + 3600, Some("registration"))
    }

    /// `PUT …/register` with a body; returns (status, headers, JSON).
    pub async fn register(
        &self,
        registration_id: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.register_with_query(registration_id, token, body, "").await
    }

    /// `PUT …/register` with extra query parameters (`&forceRegistration=true`).
    pub async fn register_with_query(
        &self,
        registration_id: &str,
        token: Option<&str>,
        body: Value,
        extra_query: &str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let url = self.url(&format!(
            "/{}/registrations/{registration_id}/register?api-version=2019-03-31{extra_query}",
            self.scope()
        ));
        let mut req = self.client.put(url).json(&body);
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let json = resp.json().await.unwrap_or(Value::Null);
        (status, headers, json)
    }
}

impl Dps {
    /// Polls from a register answer `first` until it is no longer `assigning` (at most 30 s);
    /// returns the final `registrationState`.
    pub async fn poll_to_end(&self, registration_id: &str, token: &str, first: Value) -> Value {
        let mut body = first;
        for _ in 0..150 {
            if body["status"] != "assigning" {
                return body["registrationState"].clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let op = body["operationId"].as_str().unwrap().to_string();
            let (status, polled) = self.poll(registration_id, token, &op).await;
            assert_eq!(status, 200, "{polled}");
            body = polled;
        }
        panic!("still assigning: {body}");
    }

    /// Registers over HTTPS with a SAS token and polls to the end: the final `registrationState`.
    pub async fn register_to_end(&self, registration_id: &str, token: &str) -> Value {
        let (status, _, body) =
            self.register(registration_id, Some(token), serde_json::json!({"registrationId": registration_id})).await;
        assert_eq!(status, 202, "{body}");
        self.poll_to_end(registration_id, token, body).await
    }

    /// An HTTPS client that presents `chain_pem` (leaf first) with `key_pem`.
    /// Polls an operation over HTTPS with a SAS token: (status, body).
    pub async fn poll(&self, registration_id: &str, token: &str, operation_id: &str) -> (u16, Value) {
        let url = self.url(&format!(
            "/{}/registrations/{registration_id}/operations/{operation_id}?api-version=2019-03-31",
            self.scope()
        ));
        let resp = self.client.get(url).header("Authorization", token).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    pub fn client_with_certificate(&self, chain_pem: &str, key_pem: &str) -> reqwest::Client {
        let identity = reqwest::Identity::from_pem(format!("{chain_pem}\n{key_pem}").as_bytes()).unwrap();
        self.client_builder().identity(identity).timeout(Duration::from_secs(30)).build().unwrap()
    }

    /// `PUT …/register` through a given client, without an Authorization header.
    pub async fn register_as(&self, client: &reqwest::Client, registration_id: &str, body: Value) -> (u16, Value) {
        let url =
            self.url(&format!("/{}/registrations/{registration_id}/register?api-version=2019-03-31", self.scope()));
        let resp = client.put(url).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Dps {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn derive(group_key_b64: &str, registration_id: &str) -> String {
    BASE64.encode(dps_proto::sas::derive_device_key(&decode_key(group_key_b64).unwrap(), registration_id))
}

pub fn key(seed: u8) -> String {
    BASE64.encode([seed; 32])
}

/// Runs `dps config check` and `dps serve` (with `data_dir`) on a config file that must be
/// refused: both exit with status 2 before anything starts. Returns their stderr.
pub fn refused_config(path: &Path, data_dir: &Path) -> [String; 2] {
    let check = output_within(
        Command::new(env!("CARGO_BIN_EXE_dps")).args(["config", "check"]).arg(path),
        Duration::from_secs(30),
    );
    let serve = output_within(
        Command::new(env!("CARGO_BIN_EXE_dps")).args(["serve", "--config"]).arg(path).arg("--data-dir").arg(data_dir),
        Duration::from_secs(30),
    );
    let [check, serve] =
        [check, serve].map(|out| (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()));
    assert_eq!(check.0, Some(2), "dps config check: {}", check.1);
    assert_eq!(serve.0, Some(2), "dps serve: {}", serve.1);
    [check.1, serve.1]
}

pub fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Runs `cmd` to its end and returns its output, like `Command::output`, but kills it and
/// panics (with what it printed) when it is still running after `deadline`: a `dps serve` that
/// should have refused to start must fail the test, not hang it.
pub fn output_within(cmd: &mut Command, deadline: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!("{cmd:?} still running after {deadline:?}; stderr: {}", String::from_utf8_lossy(&err));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}
