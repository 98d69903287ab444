//! A custom allocation webhook for the bench: plain HTTP on loopback, answers every call with
//! one of the offered hubs and a payload that echoes the device's.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::BenchError;

/// Decides for one webhook call: `(status, body)`.
pub fn answer(request: &[u8]) -> (u16, Value) {
    let Ok(req) = serde_json::from_slice::<Value>(request) else {
        return (400, json!({"message": "not JSON"}));
    };
    let hubs: Vec<&str> =
        req["linkedHubs"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let id = req["deviceRuntimeContext"]["registrationId"].as_str().unwrap_or("");
    let Some(hub) = hubs.get(id.len() % hubs.len().max(1)) else {
        return (400, json!({"message": "no linked hubs offered"}));
    };
    let payload = &req["deviceRuntimeContext"]["payload"];
    (200, json!({"iotHubHostName": hub, "payload": {"allocatedBy": "dps-bench", "echo": payload}}))
}

/// Starts the webhook on a free loopback port; its URL. Runs until the runtime ends.
pub async fn start() -> Result<String, BenchError> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.map_err(BenchError::io("cannot bind the webhook"))?;
    let addr: SocketAddr = listener.local_addr().map_err(BenchError::io("webhook address"))?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let (status, value) = answer(&body);
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(value.to_string())))
                            .unwrap_or_default(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    Ok(format!("http://{addr}/allocate"))
}
