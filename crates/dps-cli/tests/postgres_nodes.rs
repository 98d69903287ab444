//! Several `dps` nodes on one PostgreSQL database (issue 17): any node answers any device, an
//! enrollment written through one is used by the others, one consistent record when two nodes
//! race for one registration ID, `kill -9` of a node under load loses nothing acknowledged, a
//! slow webhook whose node dies is finished through another, and a database stopped and
//! started again under load (a PostgreSQL instance of the test's own) gives `503` + `Retry-After`
//! meanwhile and recovers without a restart of dps.
//!
//! The shared server is `DPS_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! each test creates a database of its own and drops it.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{derive, key, webhook, Dps};
use dps_store::ScratchDatabase;
use serde_json::{json, Value};

async fn scratch(prefix: &str) -> ScratchDatabase {
    ScratchDatabase::for_test(prefix).await.unwrap()
}

fn store_config(url: &str) -> String {
    format!("[store]\nbackend = \"postgres\"\nurl = {url:?}\npool_size = 6\nstart_timeout_secs = 20\n")
}

/// Starts `n` nodes on `url`, one after another (the first creates the schema and the service
/// identity), with `extra` config each.
async fn nodes(url: &str, n: usize, extra: &str) -> Vec<Dps> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Dps::start(&format!("{extra}{}", store_config(url))).await);
    }
    out
}

/// An HTTPS client that trusts `trusting`'s CA file and reaches `node` as `localhost`.
fn client_for(trusting: &Dps, node: &Dps) -> reqwest::Client {
    let ca = std::fs::read(trusting.creds["caCertificatePath"].as_str().unwrap()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve("localhost", node.addr)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `PUT …/register` through `client` to `node`; `None` when the node cannot be reached.
async fn try_register(
    node: &Dps,
    client: &reqwest::Client,
    id: &str,
    token: &str,
) -> Option<(u16, Option<String>, Value)> {
    let url = node.url(&format!("/{}/registrations/{id}/register?api-version=2019-03-31", node.scope()));
    let resp = client.put(url).header("Authorization", token).json(&json!({"registrationId": id})).send().await.ok()?;
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = resp.json().await.unwrap_or(Value::Null);
    Some((status, retry_after, body))
}

/// Polls `op` on `node` until it leaves `assigning` (for up to 10 s) and asserts that it ended
/// `assigned`; the last answer.
async fn assert_assigned(node: &Dps, id: &str, token: &str, op: &str) -> Value {
    let started = Instant::now();
    loop {
        let (code, body) = node.poll(id, token, op).await;
        if body["status"] != "assigning" || started.elapsed() > Duration::from_secs(10) {
            assert_eq!((code, body["status"].as_str()), (200, Some("assigned")), "{id}: {body}");
            return body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A symmetric-key individual enrollment `id` with keys from `seed`, through `node`; its
/// primary key.
async fn symmetric_enrollment(node: &Dps, id: &str, seed: u8) -> String {
    let k = key(seed);
    node.put_enrollment(json!({"registrationId": id, "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": key(seed + 1)}}}))
        .await;
    k
}

/// A symmetric-key enrollment group `id` with keys from `seed`, through `node`; its primary key.
async fn symmetric_group(node: &Dps, id: &str, seed: u8) -> String {
    let k = key(seed);
    node.put_group(json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": key(seed + 1)}}}))
        .await;
    k
}

async fn registration_record(node: &Dps, id: &str) -> (u16, Value) {
    let resp = node.service(reqwest::Method::GET, &format!("/registrations/{id}")).send().await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn three_nodes_share_the_service_identity_and_every_record() {
    let db = scratch("three").await;
    let n = nodes(&db.url, 3, "").await;
    let (a, b, c) = (&n[0], &n[1], &n[2]);
    // One service identity: ID scope, owner policy, test CA.
    for other in [b, c] {
        assert_eq!(other.scope(), a.scope(), "one ID scope");
        assert_eq!(
            other.creds["serviceConnectionString"].as_str().unwrap().split(';').next_back(),
            a.creds["serviceConnectionString"].as_str().unwrap().split(';').next_back(),
            "one owner key"
        );
        let ca = |d: &Dps| std::fs::read(d.creds["caCertificatePath"].as_str().unwrap()).unwrap();
        assert_eq!(ca(other), ca(a), "one test CA file for every node");
    }
    // A's CA is trusted for C's server certificate: one file serves a load balancer's pool.
    let resp = client_for(a, c).get(c.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "ok");
    for node in [a, b, c] {
        let resp = node.client.get(node.url("/readyz")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "a node on a reachable database is ready");
    }

    // An enrollment written through C; the device registers on A and polls on B.
    let k = symmetric_enrollment(c, "node-dev", 7).await;
    let token = a.device_token("node-dev", &k);
    let (status, _, body) = a.register("node-dev", Some(&token), json!({"registrationId": "node-dev"})).await;
    assert_eq!(status, 202, "{body}");
    let op = body["operationId"].as_str().unwrap().to_string();
    let polled = assert_assigned(b, "node-dev", &token, &op).await;
    let (code, record) = registration_record(c, "node-dev").await;
    assert_eq!(code, 200, "{record}");
    assert_eq!(record["status"], "assigned");
    assert_eq!(record["assignedHub"], polled["registrationState"]["assignedHub"]);

    // A group created through C is used by A within the documented time (100 ms of version
    // refresh; we allow 2 s before calling it a failure).
    let gk = symmetric_group(c, "node-group", 21).await;
    let member_token = a.device_token("node-member", &derive(&gk, "node-member"));
    let started = Instant::now();
    let status = loop {
        let (status, _, body) = a.register("node-member", Some(&member_token), json!({})).await;
        if status == 202 || started.elapsed() > Duration::from_secs(2) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.0, 202, "the group written through C is used by A: {}", status.1);
    // Its key rolled through B: A refuses the old key within the same time.
    let etag = b
        .service(reqwest::Method::GET, "/enrollmentGroups/node-group")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["etag"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = b
        .service(reqwest::Method::PUT, "/enrollmentGroups/node-group")
        .header("If-Match", etag)
        .json(&json!({"enrollmentGroupId": "node-group", "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": key(23), "secondaryKey": key(24)}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    loop {
        let (status, _, _) = a.register("node-member", Some(&member_token), json!({})).await;
        if status == 401 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "A still accepts the old group key ({status})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // One registration ID through two nodes at once: every request is answered (assigned, or
    // `503` "being registered by several requests at once; retry", as on one node), and the
    // record every node reads afterwards is one and the same.
    let racers = (0..12).map(|i| {
        let node = if i % 2 == 0 { a } else { b };
        let token = token.clone();
        async move { node.register("node-dev", Some(&token), json!({"registrationId": "node-dev"})).await }
    });
    let answers = futures_util::future::join_all(racers).await;
    let mut operations = Vec::new();
    for (status, headers, body) in &answers {
        match status {
            200 | 202 => operations.push(body["operationId"].as_str().unwrap().to_string()),
            503 => {
                assert!(headers.get("retry-after").is_some(), "{body}");
                let message = body["message"].as_str().unwrap_or_default();
                assert!(message.contains("several requests at once"), "{body}");
            }
            other => panic!("a concurrent registration is answered: {other} {body}"),
        }
    }
    assert!(!operations.is_empty(), "some of the racing registrations succeed");
    let records: Vec<Value> = futures_util::future::join_all([a, b, c].map(|n| registration_record(n, "node-dev")))
        .await
        .into_iter()
        .map(|(code, v)| {
            assert_eq!(code, 200);
            v
        })
        .collect();
    assert_eq!(records[0], records[1], "A and B read one record");
    assert_eq!(records[1], records[2], "B and C read one record");
    assert_eq!(records[0]["status"], "assigned");
    for op in &operations {
        assert_assigned(c, "node-dev", &token, op).await;
    }
    drop(n);
    db.drop_database().await.unwrap();
}

/// `kill -9` of one node of two while devices register through both: devices that lose their
/// node retry on the other, every registration a device saw acknowledged is in the store, and
/// every device ends assigned.
#[tokio::test]
async fn kill9_of_a_node_under_load_loses_nothing_acknowledged() {
    let db = scratch("kill").await;
    let n = nodes(&db.url, 2, "").await;
    let gk = symmetric_group(&n[0], "kill-group", 31).await;
    let devices = 240;
    let clients = [client_for(&n[0], &n[0]), client_for(&n[0], &n[1])];
    let acknowledged = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let n = Arc::new(tokio::sync::RwLock::new(n));
    let load = {
        let n = n.clone();
        let acknowledged = acknowledged.clone();
        let gk = gk.clone();
        tokio::spawn(async move {
            let work = (0..devices).map(|i| {
                let n = n.clone();
                let acknowledged = acknowledged.clone();
                let clients = clients.clone();
                let id = format!("kill-dev-{i:04}");
                let gk = gk.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(i as u64 * 4)).await;
                    let mut node = i % 2;
                    for _attempt in 0..20 {
                        let guard = n.read().await;
                        let token = guard[1].device_token(&id, &derive(&gk, &id));
                        match try_register(&guard[node], &clients[node], &id, &token).await {
                            Some((202 | 200, _, body)) => {
                                acknowledged.lock().unwrap().insert(id.clone());
                                return (id, token, body["operationId"].as_str().unwrap_or_default().to_string());
                            }
                            // Refused by the dying node, or unreachable: the device tries the other.
                            _ => node = 1,
                        }
                        drop(guard);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    panic!("{id} never registered");
                }
            });
            futures_util::future::join_all(work).await
        })
    };
    // Kill node 0 once part of the load has been acknowledged.
    let started = Instant::now();
    while acknowledged.lock().unwrap().len() < devices / 4 {
        assert!(started.elapsed() < Duration::from_secs(60), "the load does not progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // kill9 needs the write lock; the load's requests hold read locks only while sending.
    n.write().await[0].kill9();
    let finished = load.await.unwrap();
    let guard = n.read().await;
    let survivor = &guard[1];
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), devices, "every device registered in the end");
    for (id, token, op) in &finished {
        let (code, record) = registration_record(survivor, id).await;
        assert_eq!(code, 200, "{id} was acknowledged, so it must be stored: {record}");
        assert_assigned(survivor, id, token, op).await;
    }
    drop(guard);
    db.drop_database().await.unwrap();
}

/// A node dies while a slow webhook holds its device's registration (`assigning`): another
/// node reports the operation failed once its deadline (the lease of that allocation step:
/// the webhook timeout plus 30 s) has passed, and the device registers again through it.
/// Takes about 33 s.
#[tokio::test]
async fn a_slow_webhook_whose_node_dies_is_finished_through_another() {
    let db = scratch("webhook").await;
    let hook = webhook::start().await;
    let extra = format!(
        "[[hubs]]\nhost_name = \"hub-a.test\"\n[allocation]\nwebhook_timeout_secs = 2\nwebhook_inline_wait_ms = 300\n\
         [[webhooks]]\nurl_prefix = \"http://{}/\"\nsecret = \"node-secret-0123456789\"\n",
        hook.addr
    );
    let mut n = nodes(&db.url, 2, &extra).await;
    let k = key(41);
    let enroll = |url: String| {
        json!({"registrationId": "slow-dev", "allocationPolicy": "custom", "customAllocationDefinition":
            {"webhookUrl": url, "apiVersion": "2021-10-01"},
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": key(42)}}})
    };
    n[1].put_enrollment(enroll(hook.url("/never"))).await;
    let token = n[0].device_token("slow-dev", &k);
    let started = Instant::now();
    let (status, _, body) = n[0].register("slow-dev", Some(&token), json!({})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigning")), "{body}");
    let op = body["operationId"].as_str().unwrap().to_string();
    n[0].kill9();
    let (code, polled) = n[1].poll("slow-dev", &token, &op).await;
    assert_eq!(
        (code, polled["status"].as_str()),
        (202, Some("assigning")),
        "the other node sees it assigning: {polled}"
    );
    tokio::time::sleep(Duration::from_secs(32).saturating_sub(started.elapsed()) + Duration::from_millis(500)).await;
    let (code, polled) = n[1].poll("slow-dev", &token, &op).await;
    assert_eq!((code, polled["status"].as_str()), (200, Some("failed")), "never stuck: {polled}");
    assert_eq!(polled["registrationState"]["errorCode"], 400209, "{polled}");
    // The operator fixes the webhook; the device registers again through the surviving node.
    let current = n[1].service(reqwest::Method::GET, "/enrollments/slow-dev").send().await.unwrap();
    let etag = current.json::<Value>().await.unwrap()["etag"].as_str().unwrap().to_string();
    let resp = n[1]
        .service(reqwest::Method::PUT, "/enrollments/slow-dev")
        .header("If-Match", etag)
        .json(&enroll(hook.url("/ok")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _, body) = n[1].register("slow-dev", Some(&token), json!({})).await;
    assert_eq!(status, 202, "{body}");
    let op = body["operationId"].as_str().unwrap().to_string();
    assert_assigned(&n[1], "slow-dev", &token, &op).await;
    drop(n);
    db.drop_database().await.unwrap();
}

/// A PostgreSQL server of the test's own (initdb into a temporary directory, run as the
/// `postgres` user, on a free port), so that it can be stopped and started again.
struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    let out = Command::new("runuser").args(["-u", "postgres", "--"]).args(args).output().expect("runuser");
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn pg_bin(name: &str) -> String {
    for dir in ["/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    name.to_string()
}

impl OwnPostgres {
    /// Trust authentication, plain TCP.
    fn start() -> OwnPostgres {
        Self::start_with(&["-A", "trust"], |_| {})
    }

    /// `initdb` with `initdb_args`, then `configure(data directory)` before the first start.
    fn start_with(initdb_args: &[&str], configure: impl FnOnce(&Path)) -> OwnPostgres {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
        assert!(status.success(), "chown the PostgreSQL directory to the postgres user");
        let data = dir.path().join("data");
        let mut args = vec![pg_bin("initdb"), "-D".into(), data.display().to_string(), "-U".into(), "postgres".into()];
        args.extend(initdb_args.iter().map(|a| a.to_string()));
        as_postgres(&args.iter().map(String::as_str).collect::<Vec<_>>());
        configure(&data);
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
        assert!(status.success());
        let pg = OwnPostgres { dir, port };
        pg.run();
        pg
    }

    fn run(&self) {
        let data = self.dir.path().join("data").display().to_string();
        let log = self.dir.path().join("pg.log").display().to_string();
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        as_postgres(&[&pg_bin("pg_ctl"), "-D", &data, "-l", &log, "-o", &options, "-w", "start"]);
    }

    fn stop(&self) {
        let data = self.dir.path().join("data").display().to_string();
        as_postgres(&[&pg_bin("pg_ctl"), "-D", &data, "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_bin("pg_ctl"), "-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The database stops under load and comes back: meanwhile devices get `503` with
/// `Retry-After` (never a `500`, never a hang) and `/readyz` says not ready; afterwards the
/// same node serves again by itself, and everything acknowledged is stored.
#[tokio::test]
async fn the_database_stopped_and_started_under_load() {
    let pg = OwnPostgres::start();
    let node = Dps::start(&store_config(&pg.url())).await;
    let gk = symmetric_group(&node, "outage-group", 51).await;
    let client = client_for(&node, &node);
    let mut acknowledged = Vec::new();
    let mut unavailable = 0;
    let mut i = 0;
    let register = |i: usize| {
        let id = format!("outage-{i:04}");
        let token = node.device_token(&id, &derive(&gk, &id));
        let client = client.clone();
        let node = &node;
        async move { (id.clone(), try_register(node, &client, &id, &token).await) }
    };
    for _ in 0..20 {
        let (id, answer) = register(i).await;
        i += 1;
        assert!(matches!(answer, Some((202, _, _))), "before the outage: {answer:?}");
        acknowledged.push(id);
    }
    pg.stop();
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        let (id, answer) = register(i).await;
        i += 1;
        assert!(started.elapsed() < Duration::from_secs(15), "an answer within the pool timeout, no hang");
        match answer {
            Some((503, retry_after, body)) => {
                assert!(retry_after.is_some(), "503 carries Retry-After: {body}");
                assert_eq!(body["errorCode"], 503001, "{body}");
                unavailable += 1;
            }
            Some((202, _, _)) => acknowledged.push(id),
            other => panic!("during the outage only 503 (or a success before it showed): {other:?}"),
        }
    }
    assert!(unavailable > 0, "the outage was seen");
    let ready = node.client.get(node.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready without the database");
    assert!(ready.headers().get("retry-after").is_some());
    let health = node.client.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "the process is still healthy");
    pg.run();
    let back = Instant::now();
    loop {
        let (id, answer) = register(i).await;
        i += 1;
        match answer {
            Some((202, _, _)) => {
                acknowledged.push(id);
                break;
            }
            Some((503, _, _)) => {}
            other => panic!("while the database comes back: {other:?}"),
        }
        assert!(back.elapsed() < Duration::from_secs(30), "the node recovers by itself");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = node.client.get(node.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "ready again");
    for id in &acknowledged {
        let (code, record) = registration_record(&node, id).await;
        assert_eq!(code, 200, "{id} was acknowledged: {record}");
    }
}

/// Runs `dps serve` on `url` (with `extra` store settings) in `dir`, which must refuse to start:
/// non-zero exit within `within`, the last line containing `needle`, and `secret` nowhere.
fn serve_refused(dir: &Path, url: &str, extra: &str, needle: &str, secret: &str, within: Duration) {
    let config = dir.join("refused.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[listen]\nhttps = \"127.0.0.1:0\"\nmqtt = \"127.0.0.1:0\"\namqp = \"127.0.0.1:0\"\n\
             [store]\nbackend = \"postgres\"\nurl = {url:?}\n{extra}",
            dir.join("refused-data").display().to_string()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = common::output_within(
        Command::new(env!("CARGO_BIN_EXE_dps")).args(["serve", "--config"]).arg(&config),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains(needle), "the last line says what is wrong ({needle}): {stderr}");
    assert!(!stderr.contains(secret), "the password is never shown: {stderr}");
    assert!(started.elapsed() < within, "took {:?}: {stderr}", started.elapsed());
}

/// `dps serve` on a database it cannot use: an unreachable one is retried for
/// `start_timeout_secs`, then one clear line; an unknown database fails at once. Neither shows
/// the password, and both exit non-zero without binding anything.
#[test]
fn serve_refuses_a_database_it_cannot_use_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for (url, needle, within) in [
        (format!("postgres://dps:hunter2-secret@127.0.0.1:{closed}/dps"), "cannot be reached", Duration::from_secs(15)),
        (
            "postgres://postgres:hunter2-secret@127.0.0.1:5432/dps_no_such_db".to_string(),
            "check [store] url",
            Duration::from_secs(5),
        ),
    ] {
        serve_refused(dir.path(), &url, "start_timeout_secs = 2\n", needle, "hunter2", within);
    }
}

/// TLS to the database with `[store] ca_file`, and a wrong password, on a PostgreSQL of the
/// test's own that takes only TLS connections with a password (scram-sha-256) from TCP: the
/// right password over TLS verified against the CA serves devices; a wrong password, a server
/// certificate from another CA, and `sslmode=require` without `ca_file` each stop the start at
/// once with one line that says what to fix and never shows the password.
#[tokio::test]
async fn tls_to_the_database_and_a_wrong_password() {
    let scratch = tempfile::tempdir().unwrap();
    let ca = common::pki::ca("db test CA", None);
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = params.signed_by(&server_key, &ca.cert, &ca.key).unwrap();
    let other_ca = common::pki::ca("another CA", None);
    let (ca_file, other_ca_file) = (scratch.path().join("db-ca.pem"), scratch.path().join("other-ca.pem"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&other_ca_file, other_ca.pem()).unwrap();
    let pwfile = scratch.path().join("pw");
    std::fs::write(&pwfile, "right-db-pass\n").unwrap();
    Command::new("chmod").arg("644").arg(&pwfile).status().unwrap();
    let pg = OwnPostgres::start_with(
        &["--auth-local=trust", "--auth-host=scram-sha-256", &format!("--pwfile={}", pwfile.display())],
        |data| {
            std::fs::write(data.join("server.crt"), server_cert.pem()).unwrap();
            std::fs::write(data.join("server.key"), server_key.serialize_pem()).unwrap();
            Command::new("chmod").arg("600").arg(data.join("server.key")).status().unwrap();
            let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
            conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            std::fs::write(data.join("postgresql.conf"), conf).unwrap();
            // TCP only over TLS, with a password.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .unwrap();
        },
    );
    let url = |password: &str| {
        format!("host=localhost hostaddr=127.0.0.1 port={} user=postgres password={password} dbname=postgres sslmode=require", pg.port)
    };
    let refused = |url: String, ca: Option<&Path>, needle: &str| {
        let ca_line = ca.map(|c| format!("ca_file = {:?}\n", c.display().to_string())).unwrap_or_default();
        let extra = format!("start_timeout_secs = 20\n{ca_line}");
        serve_refused(scratch.path(), &url, &extra, needle, "db-pass", Duration::from_secs(10));
    };
    refused(url("wrong-db-pass"), Some(&ca_file), "password authentication failed");
    refused(url("right-db-pass"), Some(&other_ca_file), "check [store] url");
    refused(url("right-db-pass"), None, "ca_file");

    let node =
        Dps::start(&format!("{}ca_file = {:?}\n", store_config(&url("right-db-pass")), ca_file.display().to_string()))
            .await;
    let ready = node.client.get(node.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", node.log());
    let k = symmetric_enrollment(&node, "tls-db-dev", 61).await;
    let token = node.device_token("tls-db-dev", &k);
    let (status, _, body) = node.register("tls-db-dev", Some(&token), json!({})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigned")), "{body}");
    assert!(!node.log().contains("db-pass"), "the password is never logged");
}

/// The HAProxy configuration of docs/multi-node.md (TCP mode, `/readyz` checked over TLS) in
/// front of two nodes: devices that open a new connection each are spread over both nodes
/// (told apart by the node part of their operation IDs); after `kill -9` of one node, HAProxy's
/// check takes it out and every device registers through the other.
#[tokio::test]
async fn haproxy_in_front_of_two_nodes_spreads_devices_and_routes_around_a_dead_one() {
    let db = scratch("haproxy").await;
    let n = Arc::new(tokio::sync::Mutex::new(nodes(&db.url, 2, "").await));
    let (scope, gk) = {
        let guard = n.lock().await;
        (guard[0].scope(), symmetric_group(&guard[0], "lb-group", 71).await)
    };
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (a, b, ca) = {
        let guard = n.lock().await;
        (guard[0].addr, guard[1].addr, std::fs::read(guard[0].creds["caCertificatePath"].as_str().unwrap()).unwrap())
    };
    let config = format!(
        "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
         frontend dps_https\n  bind 127.0.0.1:{port}\n  default_backend dps_https\n\
         backend dps_https\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n\
         \x20 server a {a} check check-ssl verify none inter 300ms fall 2 rise 2\n\
         \x20 server b {b} check check-ssl verify none inter 300ms fall 2 rise 2\n"
    );
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, config).unwrap();
    let mut haproxy = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy (Debian package haproxy) must be installed");
    let lb: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    // A new connection per request, so that round robin applies per device.
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve("localhost", lb)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let register = |id: String| {
        let client = client.clone();
        let (scope, gk) = (scope.clone(), gk.clone());
        async move {
            let key = dps_proto::sas::decode_key(&derive(&gk, &id)).unwrap();
            let token = dps_proto::sas::build_token(
                &format!("{scope}/registrations/{id}"),
                &key,
                common::now() + 3600,
                Some("registration"),
            );
            let url = format!("https://localhost:{port}/{scope}/registrations/{id}/register?api-version=2019-03-31");
            let resp = client.put(url).header("Authorization", token).json(&json!({})).send().await.ok()?;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.ok()?;
            (status == 202 && body["status"] == "assigned").then(|| body["operationId"].as_str().unwrap().to_string())
        }
    };
    // Wait until HAProxy has seen both nodes ready.
    let started = Instant::now();
    let mut prefixes = BTreeSet::new();
    let mut i = 0;
    while prefixes.len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "both nodes serve through HAProxy: {prefixes:?}");
        if let Some(op) = register(format!("lb-dev-{i}")).await {
            // `5.<node>.<uuid>`: the middle part is fixed per node.
            prefixes.insert(op.split('.').nth(1).unwrap_or_default().to_string());
        }
        i += 1;
    }
    let spread: Vec<Option<String>> =
        futures_util::future::join_all((0..20).map(|j| register(format!("lb-spread-{j}")))).await;
    assert!(spread.iter().all(Option::is_some), "every device through the balancer is assigned: {spread:?}");
    n.lock().await[0].kill9();
    // Within HAProxy's check interval × fall, devices are all routed to the survivor.
    let killed = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 20 {
        assert!(killed.elapsed() < Duration::from_secs(20), "HAProxy routes around the dead node");
        match register(format!("lb-after-{i}")).await {
            Some(_) => in_a_row += 1,
            None => in_a_row = 0,
        }
        i += 1;
    }
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    drop(n);
    db.drop_database().await.unwrap();
}

/// The database stops answering without closing its connections (its processes frozen with
/// SIGSTOP, as in a network partition): a registration is answered `503` with `Retry-After`
/// within the store's answer time (15 s), never left hanging; once the database answers again
/// the node serves by itself.
#[tokio::test]
async fn a_database_that_stops_answering_gives_503_not_a_hang() {
    let pg = OwnPostgres::start();
    let node = Dps::start(&store_config(&pg.url())).await;
    let k = symmetric_enrollment(&node, "frozen-dev", 81).await;
    let token = node.device_token("frozen-dev", &k);
    let client = client_for(&node, &node);
    assert!(matches!(try_register(&node, &client, "frozen-dev", &token).await, Some((202, _, _))));
    let pid = std::fs::read_to_string(pg.dir.path().join("data/postmaster.pid")).unwrap();
    let postmaster = pid.lines().next().unwrap().trim().to_string();
    let children = String::from_utf8(Command::new("pgrep").args(["-P", &postmaster]).output().unwrap().stdout).unwrap();
    let mut pids: Vec<String> = children.split_whitespace().map(str::to_string).collect();
    pids.push(postmaster);
    let signal = |sig: &str| {
        let status = Command::new("kill").arg(sig).args(&pids).status().unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    let started = Instant::now();
    let answer = try_register(&node, &client, "frozen-dev", &token).await;
    let took = started.elapsed();
    signal("-CONT");
    match answer {
        Some((503, retry_after, body)) => {
            assert!(retry_after.is_some(), "{body}");
            assert_eq!(body["errorCode"], 503001, "{body}");
        }
        other => panic!("a frozen database gives 503: {other:?}"),
    }
    assert!(took < Duration::from_secs(25), "answered within the store's answer time, took {took:?}");
    let back = Instant::now();
    loop {
        if let Some((202, _, _)) = try_register(&node, &client, "frozen-dev", &token).await {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(30), "the node serves again by itself");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
