//! The HTTPS transport (docs/protocol-notes.md §3): PUT register, then GET the operation until it ends.

use std::time::Duration;

use crate::{interpret, AttemptError, Outcome, Prepared, Registration};

const API_VERSION: &str = "2021-06-01";

fn client(p: &Prepared) -> Result<reqwest::Client, AttemptError> {
    reqwest::Client::builder()
        .use_preconfigured_tls((*p.tls).clone())
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("dps-device/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| AttemptError::Fatal(crate::DeviceError::Config(format!("HTTP client: {e}"))))
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

async fn send(req: reqwest::RequestBuilder, p: &Prepared) -> Result<Outcome, AttemptError> {
    let req = match p.sas_token() {
        Some(token) => req.header(reqwest::header::AUTHORIZATION, token),
        None => req,
    };
    let resp = req.send().await.map_err(|e| AttemptError::Retry { reason: format!("HTTPS: {e}"), after: None })?;
    let status = resp.status().as_u16();
    let after = retry_after(&resp);
    let body =
        resp.bytes().await.map_err(|e| AttemptError::Retry { reason: format!("HTTPS body: {e}"), after: None })?;
    interpret(status, after, &body)
}

/// One attempt over HTTPS.
pub(crate) async fn register(p: &Prepared) -> Result<Registration, AttemptError> {
    let c = client(p)?;
    let cfg = &p.config;
    let base =
        format!("https://{}:{}/{}/registrations/{}", cfg.host, cfg.https_port, cfg.id_scope, cfg.registration_id);
    let put = c
        .put(format!("{base}/register?api-version={API_VERSION}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(p.body.clone());
    let mut outcome = send(put, p).await?;
    loop {
        match outcome {
            Outcome::Done(r) => return Ok(*r),
            Outcome::Poll { operation_id, after } => {
                tokio::time::sleep(after).await;
                let get = c.get(format!("{base}/operations/{operation_id}?api-version={API_VERSION}"));
                outcome = send(get, p).await?;
            }
        }
    }
}
