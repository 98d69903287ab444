//! A real HTTP webhook server for the tests: each path is a behaviour.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// A request the webhook received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub signature: Option<String>,
    pub body: Vec<u8>,
}

pub struct Webhook {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Webhook {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn last(&self, path: &str) -> Received {
        self.received.lock().unwrap().iter().rev().find(|r| r.path == path).cloned().expect("webhook was called")
    }
}

fn reply(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r
}

async fn behave(path: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let hubs = req["linkedHubs"].as_array().cloned().unwrap_or_default();
    let last_hub = hubs.last().cloned().unwrap_or(Value::Null);
    let ok = || {
        json!({"iotHubHostName": last_hub, "initialTwin": {"tags": {"fromWebhook": true}},
               "payload": {"echo": req["deviceRuntimeContext"]["payload"], "hub": last_hub}})
        .to_string()
    };
    match path {
        "/ok" => reply(200, ok()),
        "/legacy-return-data" => {
            reply(200, json!({"iotHubHostName": last_hub, "returnData": {"old": true}}).to_string())
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            reply(200, ok())
        }
        "/never" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            reply(200, ok())
        }
        "/status-400" => reply(400, "bad model: thermostat-9 is not allowed"),
        "/invalid-json" => reply(200, "<html>not json</html>"),
        "/no-hub" => reply(200, r#"{"payload":{"a":1}}"#),
        "/unlinked" => reply(200, r#"{"iotHubHostName":"evil.test"}"#),
        "/payload-array" => reply(200, json!({"iotHubHostName": last_hub, "payload": [1, 2]}).to_string()),
        // The device payload back as it came, whatever JSON value it is.
        "/payload-verbatim" => reply(
            200,
            json!({"iotHubHostName": last_hub, "payload": req["deviceRuntimeContext"]["payload"]}).to_string(),
        ),
        "/huge" => reply(
            200,
            format!(r#"{{"iotHubHostName":{last_hub},"payload":{{"x":"{}"}}}}"#, "a".repeat(2 * 1024 * 1024)),
        ),
        _ => reply(404, "no such behaviour"),
    }
}

/// Starts the webhook on an ephemeral loopback port.
pub async fn start() -> Webhook {
    start_with_tls(None).await
}

/// Starts the webhook, over TLS when an acceptor is given.
pub async fn start_with_tls(tls: Option<tokio_rustls::TlsAcceptor>) -> Webhook {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let log = log.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let signature =
                            req.headers().get("x-dps-signature").and_then(|v| v.to_str().ok()).map(str::to_string);
                        let body = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                        log.lock().unwrap().push(Received { path: path.clone(), signature, body: body.clone() });
                        Ok::<_, Infallible>(behave(path.strip_prefix("/secure").unwrap_or(&path), &body).await)
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
            });
        }
    });
    Webhook { addr, received }
}

/// One scripted answer: a status, a body, extra headers (`Location` for a redirect), and when
/// to send it: after a delay, or once [`Scripted::release`] is called.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
    pub held: bool,
}

impl Answer {
    /// A JSON answer.
    pub fn json(status: u16, body: Value) -> Answer {
        Answer { status, body: body.to_string().into_bytes(), headers: Vec::new(), delay: Duration::ZERO, held: false }
    }

    /// A text answer.
    pub fn text(status: u16, body: &str) -> Answer {
        Answer { body: body.as_bytes().to_vec(), ..Answer::json(status, Value::Null) }
    }

    /// Adds a header (`Location`, `Retry-After`, …).
    pub fn header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Answers only after `delay`.
    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }

    /// Answers only once [`Scripted::release`] has been called.
    pub fn held(mut self) -> Answer {
        self.held = true;
        self
    }
}

/// A request a [`Scripted`] webhook received, as it came over the wire.
#[derive(Debug, Clone)]
pub struct Call {
    /// The path, without the query.
    pub path: String,
    pub query: Option<String>,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The exact body bytes.
    pub body: Vec<u8>,
}

impl Call {
    /// The value of a header (name in any case); `None` when absent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

#[derive(Default)]
struct Script {
    /// Answers for any path, in order, one per call.
    queue: std::collections::VecDeque<Answer>,
    /// Answers for one path, every time (before the queue).
    standing: std::collections::HashMap<String, Answer>,
    calls: Vec<Call>,
}

/// A webhook that gives its answers in order, one per call (HTTP/1.1, one request per
/// connection, `connection: close`), or a standing answer per path, and keeps the requests it
/// got. Connections are served concurrently; it counts how many calls are open at once (from
/// accept until the answer starts, or the peer closes).
pub struct Scripted {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    max_open: Arc<std::sync::atomic::AtomicUsize>,
    gate: tokio::sync::watch::Sender<bool>,
}

/// Decrements the open-call count when a connection's call ends, however it ends.
struct Open(Arc<std::sync::atomic::AtomicUsize>, bool);

impl Open {
    fn close(&mut self) {
        if std::mem::replace(&mut self.1, false) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads one request; `None` when the peer went away first.
async fn read_call(stream: &mut tokio::net::TcpStream) -> Option<Call> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let mut lines = head.split("\r\n");
        let target = lines.next()?.split(' ').nth(1)?.to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length: usize = headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
        if buf.len() >= end + 4 + length {
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (target, None),
            };
            return Some(Call { path, query, headers, body: buf[end + 4..end + 4 + length].to_vec() });
        }
    }
}

impl Scripted {
    /// Starts the webhook on an ephemeral loopback port.
    pub async fn start() -> Scripted {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scripted = Scripted {
            addr: listener.local_addr().unwrap(),
            script: Default::default(),
            open: Default::default(),
            max_open: Default::default(),
            gate: tokio::sync::watch::channel(false).0,
        };
        let (script, open, max_open, gate) =
            (scripted.script.clone(), scripted.open.clone(), scripted.max_open.clone(), scripted.gate.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let now_open = open.fetch_add(1, SeqCst) + 1;
                max_open.fetch_max(now_open, SeqCst);
                let mut guard = Open(open.clone(), true);
                let (script, mut gate) = (script.clone(), gate.subscribe());
                tokio::spawn(async move {
                    let Some(call) = read_call(&mut stream).await else { return };
                    let answer = {
                        let mut s = script.lock().unwrap();
                        let answer = s.standing.get(&call.path).cloned().or_else(|| s.queue.pop_front());
                        s.calls.push(call.clone());
                        answer.unwrap_or_else(|| Answer::text(418, &format!("no answer scripted for {}", call.path)))
                    };
                    let wait = async {
                        if answer.held {
                            let _ = gate.wait_for(|released| *released).await;
                        }
                        tokio::time::sleep(answer.delay).await;
                    };
                    // dps sends one request per connection: a read that ends is dps giving up
                    // (its timeout), which ends the call.
                    let mut probe = [0u8; 1];
                    tokio::select! {
                        () = wait => {}
                        _ = stream.read(&mut probe) => return,
                    }
                    // The call ends as the answer starts: dps cannot start another before it
                    // has this one, so the count never includes a call that dps has finished.
                    guard.close();
                    let mut head = format!(
                        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                        answer.status,
                        answer.body.len()
                    );
                    for (name, value) in &answer.headers {
                        head.push_str(&format!("{name}: {value}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(&answer.body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        scripted
    }

    /// The URL of `/alloc`.
    pub fn url(&self) -> String {
        self.url_at("/alloc")
    }

    /// The URL of a path (and query) on this server.
    pub fn url_at(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next call (to any path without a standing answer) gets this JSON answer.
    pub fn answer(&self, status: u16, body: Value) {
        self.push(Answer::json(status, body));
    }

    /// The next call (to any path without a standing answer) gets this answer.
    pub fn push(&self, answer: Answer) {
        self.script.lock().unwrap().queue.push_back(answer);
    }

    /// Every call to `path` (without its query) gets this answer.
    pub fn always(&self, path: &str, answer: Answer) {
        self.script.lock().unwrap().standing.insert(path.to_string(), answer);
    }

    /// Sends the [`Answer::held`] answers, those waiting and those to come.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Every request received so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.script.lock().unwrap().calls.clone()
    }

    /// The requests received for one path.
    pub fn calls_to(&self, path: &str) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.path == path).collect()
    }

    /// The body of the last request, as JSON.
    pub fn last_request(&self) -> Value {
        self.calls().last().expect("the webhook was called").json()
    }

    /// Calls open now (accepted, not answered yet).
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most calls that were open at once.
    pub fn max_open(&self) -> usize {
        self.max_open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `done` holds (checked every 10 ms), at most 10 s; panics naming `what`.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&Scripted) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
