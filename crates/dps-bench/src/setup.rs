//! Preparing a run through the service API: enrollment groups, individual enrollments (in
//! bulk operations), and the CA certificate of X.509 devices.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::sas::build_token;
use serde_json::{json, Value};

use crate::target::Target;
use crate::BenchError;

/// Items per bulk operation (the service's limit, docs/protocol-notes.md §10.7).
pub const BULK_ITEMS: usize = 10;

/// A service API client with the owner policy.
#[derive(Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    base: String,
    host: String,
    policy: (String, Vec<u8>),
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl ServiceClient {
    /// A client for `target`'s service API.
    pub fn new(target: &Target) -> Result<ServiceClient, BenchError> {
        let ca = std::fs::read(&target.ca_path)
            .map_err(BenchError::io(format!("cannot read {}", target.ca_path.display())))?;
        let ca = reqwest::Certificate::from_pem(&ca).map_err(|e| BenchError::Setup(format!("CA certificate: {e}")))?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .resolve(&target.host, target.https_addr)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| BenchError::Setup(format!("HTTP client: {e}")))?;
        Ok(ServiceClient {
            http,
            base: format!("https://{}:{}", target.host, target.https_addr.port()),
            host: target.host.clone(),
            policy: target.policy.clone(),
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: &Value) -> Result<Value, BenchError> {
        let token = build_token(&self.host, &self.policy.1, now_secs() + 3600, Some(&self.policy.0));
        let url = format!("{}{path}{}api-version=2021-10-01", self.base, if path.contains('?') { "&" } else { "?" });
        let resp = self
            .http
            .request(method.clone(), &url)
            .header("Authorization", token)
            .json(body)
            .send()
            .await
            .map_err(|e| BenchError::Setup(format!("{method} {path}: {e}")))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| BenchError::Setup(format!("{method} {path}: {e}")))?;
        if !status.is_success() {
            return Err(BenchError::Setup(format!("{method} {path}: {status}: {text}")));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates or replaces an enrollment group.
    pub async fn put_group(&self, id: &str, body: Value) -> Result<(), BenchError> {
        self.call(reqwest::Method::PUT, &format!("/enrollmentGroups/{id}"), &body).await.map(|_| ())
    }

    /// Uploads a CA certificate, marked verified.
    pub async fn put_verified_certificate(&self, name: &str, pem: &str) -> Result<(), BenchError> {
        let body = json!({"certificate": pem, "isVerified": true});
        self.call(reqwest::Method::PUT, &format!("/certificates/{name}"), &body).await.map(|_| ())
    }

    /// Creates individual enrollments in bulk operations of [`BULK_ITEMS`], `parallel` at a
    /// time; `make(i)` gives the enrollment of device `i`. Calls `progress` with the number
    /// created so far.
    pub async fn create_individual_enrollments(
        &self,
        count: usize,
        parallel: usize,
        make: Arc<dyn Fn(usize) -> Value + Send + Sync>,
        progress: Arc<dyn Fn(usize) + Send + Sync>,
    ) -> Result<(), BenchError> {
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..parallel.max(1) {
            let (this, next, done, make, progress) =
                (self.clone(), next.clone(), done.clone(), make.clone(), progress.clone());
            tasks.spawn(async move {
                loop {
                    let start = next.fetch_add(BULK_ITEMS, Ordering::Relaxed);
                    if start >= count {
                        return Ok::<(), BenchError>(());
                    }
                    let end = (start + BULK_ITEMS).min(count);
                    let items: Vec<Value> = (start..end).map(|i| make(i)).collect();
                    let body = json!({"mode": "create", "enrollments": items});
                    let result = this.call(reqwest::Method::POST, "/enrollments", &body).await?;
                    if result["isSuccessful"] != Value::Bool(true) {
                        return Err(BenchError::Setup(format!("bulk create failed: {result}")));
                    }
                    progress(done.fetch_add(end - start, Ordering::Relaxed) + end - start);
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| BenchError::Setup(format!("bulk create task: {e}")))??;
        }
        Ok(())
    }
}

/// The attestation of a symmetric-key enrollment with `key` as both keys.
pub fn symmetric_key_attestation(key: &[u8]) -> Value {
    let k = BASE64.encode(key);
    json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}})
}

/// The allocation fields of an enrollment: a custom allocation definition for `webhook_url`,
/// or nothing (the server's default policy).
pub fn allocation_fields(webhook_url: Option<&str>) -> Value {
    match webhook_url {
        Some(url) => json!({"allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}}),
        None => json!({}),
    }
}

/// Merges the fields of `extra` (an object) into `base` (an object).
pub fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}
