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
