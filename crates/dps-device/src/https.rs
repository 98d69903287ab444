//! The HTTPS transport (docs/protocol-notes.md §3): PUT register, then GET the operation until it
//! ends. TPM attestation (feature `tpm`, protocol.md §3.9) puts a challenge leg in front: the
//! first PUT carries the TPM's keys and no `Authorization`, the `401` answer carries the
//! authentication key, and the PUT is repeated with a SAS token the TPM signed.

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

/// Sends a request (with `token` as `Authorization`, if any): status, retry-after, body.
async fn exchange(
    req: reqwest::RequestBuilder,
    token: Option<&str>,
) -> Result<(u16, Option<Duration>, Vec<u8>), AttemptError> {
    let req = match token {
        Some(token) => req.header(reqwest::header::AUTHORIZATION, token),
        None => req,
    };
    let resp = req.send().await.map_err(|e| AttemptError::Retry { reason: format!("HTTPS: {e}"), after: None })?;
    let status = resp.status().as_u16();
    let after = retry_after(&resp);
    let body =
        resp.bytes().await.map_err(|e| AttemptError::Retry { reason: format!("HTTPS body: {e}"), after: None })?;
    Ok((status, after, body.to_vec()))
}

async fn send(req: reqwest::RequestBuilder, token: Option<&str>) -> Result<Outcome, AttemptError> {
    let (status, after, body) = exchange(req, token).await?;
    interpret(status, after, &body)
}

/// The register request with `body`.
fn put(c: &reqwest::Client, base: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
    c.put(format!("{base}/register?api-version={API_VERSION}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
}

/// Polls until the registration ends.
async fn poll(
    c: &reqwest::Client,
    base: &str,
    mut outcome: Outcome,
    token: Option<&str>,
) -> Result<Registration, AttemptError> {
    loop {
        match outcome {
            Outcome::Done(r) => return Ok(*r),
            Outcome::Poll { operation_id, after } => {
                tokio::time::sleep(after).await;
                let get = c.get(format!("{base}/operations/{operation_id}?api-version={API_VERSION}"));
                outcome = send(get, token).await?;
            }
        }
    }
}

/// One attempt over HTTPS.
pub(crate) async fn register(p: &Prepared) -> Result<Registration, AttemptError> {
    let c = client(p)?;
    let cfg = &p.config;
    let base =
        format!("https://{}:{}/{}/registrations/{}", cfg.host, cfg.https_port, cfg.id_scope, cfg.registration_id);
    #[cfg(feature = "tpm")]
    if let crate::DeviceCredential::Tpm(tpm) = &cfg.credential {
        return tpm_flow::register(p, &c, &base, tpm).await;
    }
    let token = p.sas_token();
    let outcome = send(put(&c, &base, p.body.clone()), token.as_deref()).await?;
    poll(&c, &base, outcome, token.as_deref()).await
}

#[cfg(feature = "tpm")]
mod tpm_flow {
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;
    use serde_json::Value;

    use super::{exchange, poll, put, send};
    use crate::tpm::{Tpm, TpmKeys};
    use crate::{interpret, AttemptError, DeviceError, Prepared, Registration, TpmConfig};

    /// Runs TPM work on the blocking pool: the TPM is opened, used and closed in there.
    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, DeviceError> + Send + 'static,
    ) -> Result<T, AttemptError> {
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r.map_err(AttemptError::Fatal),
            Err(e) => Err(AttemptError::Fatal(DeviceError::Tpm(format!("the TPM task ended: {e}")))),
        }
    }

    fn protocol(message: impl Into<String>) -> AttemptError {
        AttemptError::Fatal(DeviceError::Protocol(message.into()))
    }

    /// The base64 `authenticationKey` of an answer object (`what` names it in errors), decoded.
    fn authentication_key(value: &Value, what: &str) -> Result<Option<Vec<u8>>, AttemptError> {
        match value.get("authenticationKey") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(b64)) => BASE64
                .decode(b64.trim())
                .map(Some)
                .map_err(|_| protocol(format!("{what}.authenticationKey is not base64"))),
            Some(_) => Err(protocol(format!("{what}.authenticationKey is not a string"))),
        }
    }

    async fn import(tpm: &TpmConfig, blob: Vec<u8>) -> Result<(), AttemptError> {
        let cfg = tpm.clone();
        blocking(move || Tpm::open(&cfg)?.import_authentication_key(&blob, cfg.auth_key_handle)).await
    }

    /// The register body: the registration ID, the TPM's keys and the payload.
    fn body(p: &Prepared, keys: &TpmKeys) -> Result<Vec<u8>, AttemptError> {
        let mut body = serde_json::json!({
            "registrationId": p.config.registration_id,
            "tpm": {
                "endorsementKey": BASE64.encode(&keys.endorsement_key),
                "storageRootKey": BASE64.encode(&keys.storage_root_key),
            },
        });
        if let Some(payload) = p.config.payload.as_ref().filter(|v| !v.is_null()) {
            body["payload"] = payload.clone();
        }
        serde_json::to_vec(&body).map_err(|e| AttemptError::Fatal(DeviceError::Config(e.to_string())))
    }

    /// One TPM attestation attempt (protocol.md §3.9): challenge, import, proof, polls, and the
    /// import of the final answer's key.
    pub(super) async fn register(
        p: &Prepared,
        c: &reqwest::Client,
        base: &str,
        tpm: &TpmConfig,
    ) -> Result<Registration, AttemptError> {
        let cfg = tpm.clone();
        let keys = blocking(move || Tpm::open(&cfg)?.keys()).await?;
        let body = body(p, &keys)?;

        // 1. No Authorization: the service answers 401 with the authentication key.
        let (status, after, answer) = exchange(put(c, base, body.clone()), None).await?;
        if status != 401 {
            return match interpret(status, after, &answer) {
                Err(e) => Err(e),
                Ok(_) => Err(protocol(format!(
                    "the service answered {status} to a TPM registration without a SAS token; a 401 challenge with an authenticationKey was expected"
                ))),
            };
        }
        let challenge: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
        let Some(blob) = authentication_key(&challenge, "the 401 answer")? else {
            // A 401 without a key is a refusal (unknown EK, disabled TPM enrollment, …).
            return match interpret(status, after, &answer) {
                Err(e) => Err(e),
                Ok(_) => Err(AttemptError::Fatal(DeviceError::Unauthorized("refused".into()))),
            };
        };
        let key_name = challenge.get("keyName").and_then(Value::as_str).unwrap_or("registration").to_string();
        import(tpm, blob).await?;

        // 2. The proof: the same PUT with a SAS token signed by the imported key.
        let sas = p.sas_to_sign();
        let data = sas.string_to_sign();
        let cfg = tpm.clone();
        let signature = blocking(move || Tpm::open(&cfg)?.hmac_sha256(cfg.auth_key_handle, &data)).await?;
        let token = sas.token(&signature, Some(&key_name));
        let outcome = send(put(c, base, body), Some(&token)).await?;
        let registration = poll(c, base, outcome, Some(&token)).await?;

        // 3. The assigned answer wraps the key the device uses from now on (its IoT Hub key).
        let state_tpm = registration.state.tpm.clone().unwrap_or(Value::Null);
        let Some(final_blob) = authentication_key(&state_tpm, "registrationState.tpm")? else {
            return Err(protocol(
                "the assigned TPM registration has no registrationState.tpm.authenticationKey (the device's hub key)",
            ));
        };
        import(tpm, final_blob).await?;
        Ok(registration)
    }
}
