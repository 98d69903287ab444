//! The custom allocation webhook client: connection reuse, a bounded number of calls in
//! flight, a whole-call timeout, a response size limit, optional HMAC-SHA256 signatures,
//! per-webhook CA and client certificate, and URLs logged without their query string
//! (Azure Functions keys live there).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dps_core::custom::{body_start, parse_answer, AllocationHook, CallError, HookError};
use dps_proto::webhook::{AllocationRequest, AllocationResponse};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::address_policy::{AddressPolicy, PolicyResolver, Refused};
use crate::config::{AllocationConfig, WebhookConfig};
use crate::error::ServerError;

/// Header carrying the signature: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "x-dps-signature";

struct Target {
    prefix: String,
    secret: Option<Vec<u8>>,
    client: reqwest::Client,
}

/// The webhook client used by the engine.
pub struct WebhookClient {
    policy: Arc<AddressPolicy>,
    targets: Vec<Target>,
    default: reqwest::Client,
    timeout: Duration,
    max_response_bytes: usize,
    slots: Arc<Semaphore>,
    /// Calls in flight per webhook (URL without its query), so that one hanging webhook cannot
    /// take every slot from the others.
    per_url: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
    per_url_limit: usize,
}

fn builder(timeout: Duration, policy: &Arc<AddressPolicy>) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        // Names resolve only to addresses the policy permits; no proxy (the policy judges the
        // webhook's address, not a proxy's).
        .dns_resolver(Arc::new(PolicyResolver { policy: policy.clone() }))
        .no_proxy()
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("dps-rs/", env!("CARGO_PKG_VERSION")))
}

impl WebhookClient {
    /// Builds the client from the allocation settings and the `[[webhooks]]` entries.
    pub fn new(config: &AllocationConfig, webhooks: &[WebhookConfig]) -> Result<Self, ServerError> {
        let timeout = Duration::from_secs(config.webhook_timeout_secs);
        let policy =
            Arc::new(AddressPolicy::new(&config.webhook_allow, &config.webhook_deny).map_err(ServerError::Bootstrap)?);
        let build_err = |what: &str, e: reqwest::Error| ServerError::Bootstrap(format!("webhook client ({what}): {e}"));
        let mut targets = Vec::new();
        for (i, w) in webhooks.iter().enumerate() {
            let at = format!("webhooks[{i}]");
            let mut b = builder(timeout, &policy);
            if let Some(ca) = &w.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| ServerError::Bootstrap(format!("{at}.ca_file {}: {e}", ca.display())))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| build_err(&at, e))?;
                for c in certs {
                    b = b.add_root_certificate(c);
                }
            }
            if let (Some(cert), Some(key)) = (&w.client_cert_file, &w.client_key_file) {
                let mut pem = std::fs::read(cert)
                    .map_err(|e| ServerError::Bootstrap(format!("{at}.client_cert_file {}: {e}", cert.display())))?;
                pem.extend(
                    std::fs::read(key)
                        .map_err(|e| ServerError::Bootstrap(format!("{at}.client_key_file {}: {e}", key.display())))?,
                );
                b = b.identity(reqwest::Identity::from_pem(&pem).map_err(|e| build_err(&at, e))?);
            }
            // Compared in the form the request goes to: `http://H` becomes `http://h/`, so a
            // prefix that names a host matches that host only.
            let prefix = reqwest::Url::parse(&w.url_prefix)
                .map_err(|e| ServerError::Bootstrap(format!("{at}.url_prefix: {e}")))?
                .to_string();
            targets.push(Target {
                prefix,
                secret: w.secret.as_ref().map(|s| s.as_bytes().to_vec()),
                client: b.build().map_err(|e| build_err(&at, e))?,
            });
        }
        Ok(Self {
            default: builder(timeout, &policy).build().map_err(|e| build_err("default", e))?,
            policy,
            targets,
            timeout,
            max_response_bytes: config.webhook_max_response_bytes,
            slots: Arc::new(Semaphore::new(config.webhook_max_in_flight)),
            per_url: Default::default(),
            per_url_limit: config.webhook_max_in_flight_per_url,
        })
    }

    /// The settings for a URL (already parsed, so `..` and `%2e%2e` are resolved as the request
    /// will resolve them): the longest prefix that matches up to a path segment boundary.
    fn target(&self, url: &reqwest::Url) -> (Option<&Target>, &reqwest::Client) {
        let url = url.as_str();
        let t = self.targets.iter().filter(|t| prefix_matches(&t.prefix, url)).max_by_key(|t| t.prefix.len());
        (t, t.map_or(&self.default, |t| &t.client))
    }

    /// Checks a webhook URL: absolute http(s) with a host the policy permits (an address
    /// literal is judged here; a name when it is resolved).
    fn check(&self, url: &str) -> Result<reqwest::Url, CallError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| CallError::InvalidUrl(format!("{}: {e}", redact(url))))?;
        if parsed.scheme() != "https" && parsed.scheme() != "http" {
            return Err(CallError::InvalidUrl(format!(
                "{}: only http:// and https:// URLs (or rules://<name>) can be called",
                redact(url)
            )));
        }
        // WHATWG parsing has already turned `2130706433` or `0x7f.1` into 127.0.0.1.
        match parsed.host() {
            None => return Err(CallError::InvalidUrl(format!("{}: the URL names no host", redact(url)))),
            Some(url::Host::Ipv4(ip)) => self.policy.check_ip(&ip.to_string(), ip.into()),
            Some(url::Host::Ipv6(ip)) => self.policy.check_ip(&ip.to_string(), ip.into()),
            Some(url::Host::Domain(name)) => self.policy.check_host(name),
        }
        .map_err(CallError::Refused)?;
        Ok(parsed)
    }

    async fn post(&self, url: &str, body: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let parsed = self.check(url)?;
        let mut key = parsed.clone();
        key.set_query(None);
        key.set_fragment(None);
        let key = key.to_string();
        let own = UrlSlots {
            sem: {
                let mut map = self.per_url.lock().unwrap_or_else(|p| p.into_inner());
                map.entry(key.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.per_url_limit))).clone()
            },
            key,
            client: self,
        };
        // This webhook's own slot first, so that calls queued behind a slow webhook hold none
        // of the shared ones while they wait. (Dropped in reverse order: the permits, then
        // `own`, which forgets the URL when nobody else uses it, also on timeout.)
        let _own = own.sem.clone().acquire_owned().await.map_err(|_| CallError::Busy)?;
        let _slot = self.slots.acquire().await.map_err(|_| CallError::Busy)?;
        self.send(parsed, body).await
    }

    async fn send(&self, parsed: reqwest::Url, body: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let (target, client) = self.target(&parsed);
        let mut request = client.post(parsed).header("content-type", "application/json");
        if let Some(secret) = target.and_then(|t| t.secret.as_deref()) {
            request = request.header(SIGNATURE_HEADER, sign(secret, unix_now(), &body));
        }
        let mut response = request.body(body).send().await.map_err(|e| classify(&e))?;
        let status = response.status();
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| classify(&e))? {
            if answer.len() + chunk.len() > self.max_response_bytes {
                return Err(CallError::TooLarge(self.max_response_bytes));
            }
            answer.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(CallError::Status { status: status.as_u16(), body: body_start(&answer) });
        }
        Ok(answer)
    }
}

/// A webhook's entry in the per-URL table while a call uses it.
struct UrlSlots<'a> {
    client: &'a WebhookClient,
    key: String,
    sem: Arc<Semaphore>,
}

impl Drop for UrlSlots<'_> {
    fn drop(&mut self) {
        let mut map = self.client.per_url.lock().unwrap_or_else(|p| p.into_inner());
        // The table's reference and ours: nobody else calls or waits for this webhook, so
        // forget it (enrollments may name any number of URLs).
        if Arc::strong_count(&self.sem) == 2 {
            map.remove(&self.key);
        }
    }
}

#[async_trait]
impl AllocationHook for WebhookClient {
    async fn call(&self, url: &str, request: &AllocationRequest) -> Result<AllocationResponse, HookError> {
        let body = serde_json::to_vec(request).map_err(|e| CallError::Request(e.to_string()))?;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.post(url, body)).await {
            Ok(r) => r.and_then(|answer| parse_answer(&answer)),
            Err(_) => Err(CallError::Timeout(self.timeout.as_secs())),
        };
        crate::metrics::webhook_call(result.as_ref().map_or_else(failure_cause, |_| "ok"), started);
        match &result {
            Ok(_) => tracing::debug!(url = %redact(url), ms = started.elapsed().as_millis() as u64, "webhook answered"),
            Err(e) => tracing::info!(url = %redact(url), error = %e, "webhook call failed"),
        }
        Ok(result?)
    }
}

/// The `outcome` label of a failed webhook call.
fn failure_cause(e: &CallError) -> &'static str {
    match e {
        CallError::Status { status, .. } if *status >= 500 => "status_5xx",
        CallError::Status { .. } => "status_4xx",
        CallError::Timeout(_) => "timeout",
        CallError::Connect(_) => "connect",
        CallError::TooLarge(_) => "too_large",
        CallError::InvalidUrl(_) | CallError::Refused(_) => "refused_url",
        CallError::Busy => "busy",
        CallError::Request(_) => "request",
        CallError::InvalidAnswer { .. } => "invalid_answer",
    }
}

/// The custom allocation hook of the server: `rules://…` URLs go to the built-in rule sets,
/// everything else to the webhook client.
pub struct CustomAllocator {
    /// Webhook client.
    pub webhooks: WebhookClient,
    /// Built-in rule sets.
    pub rules: crate::rules::RuleSets,
}

#[async_trait]
impl AllocationHook for CustomAllocator {
    async fn call(&self, url: &str, request: &AllocationRequest) -> Result<AllocationResponse, HookError> {
        if !is_rules_url(url) {
            return self.webhooks.call(url, request).await;
        }
        self.rules.evaluate(&url[crate::rules::SCHEME.len()..], request)
    }

    fn answers_inline(&self, url: &str) -> bool {
        is_rules_url(url)
    }

    fn check_url(&self, url: &str) -> Result<(), String> {
        if is_rules_url(url) {
            let name = url[crate::rules::SCHEME.len()..].trim_end_matches('/');
            return if self.rules.contains(name) {
                Ok(())
            } else {
                Err(format!("no rule set named '{name}' in the config ([[rules]] name = \"{name}\")"))
            };
        }
        self.webhooks.check(url).map(drop).map_err(|e| e.to_string())
    }
}

/// Whether a custom allocation URL names a built-in rule set (`rules://<name>`).
/// `url` starts with `prefix`, and the prefix ends at a boundary: it ends in `/`, or the URL
/// goes on with `/`, `?` or `#` (so `https://h/a` covers `https://h/a/b`, not `https://h/ab`).
fn prefix_matches(prefix: &str, url: &str) -> bool {
    url.strip_prefix(prefix)
        .is_some_and(|rest| prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?', '#']))
}

fn is_rules_url(url: &str) -> bool {
    url.get(..crate::rules::SCHEME.len()).is_some_and(|s| s.eq_ignore_ascii_case(crate::rules::SCHEME))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The signature header value for `body` sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// A URL without its query string and credentials, for logs and messages.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let had_query = u.query().is_some();
            u.set_query(None);
            let _ = u.set_password(None);
            let _ = u.set_username("");
            let mut s = u.to_string();
            if had_query {
                s.push_str("?…");
            }
            s
        }
        Err(_) => url.split('?').next().unwrap_or_default().to_string(),
    }
}

fn classify(e: &reqwest::Error) -> CallError {
    // The chain says what failed: "connection refused", "invalid peer certificate", …
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let text = chain.join(": ").replace(&e.url().map(|u| u.to_string()).unwrap_or_default(), "");
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<Refused>() {
            return CallError::Refused(refused.0.clone());
        }
        source = s.source();
    }
    if e.is_timeout() {
        CallError::Timeout(0)
    } else {
        CallError::Connect(text.trim_start_matches(": ").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_matches;

    #[test]
    fn prefixes_match_at_boundaries() {
        assert!(prefix_matches("https://h/a/", "https://h/a/x"));
        assert!(prefix_matches("https://h/a", "https://h/a/x"));
        assert!(prefix_matches("https://h/a", "https://h/a?x=1"));
        assert!(prefix_matches("https://h/a", "https://h/a"));
        assert!(!prefix_matches("https://h/a", "https://h/ab"));
        assert!(!prefix_matches("https://h/", "https://h.evil.test/"));
        assert!(!prefix_matches("https://h/a/", "https://h/c/"));
    }

    use super::*;

    #[test]
    fn redaction_hides_keys() {
        assert_eq!(redact("https://fn.example.net/api/alloc?code=SECRET"), "https://fn.example.net/api/alloc?…");
        assert_eq!(redact("https://user:pw@h.example/x"), "https://h.example/x");
        assert_eq!(redact("not a url?code=SECRET"), "not a url");
    }

    #[test]
    fn signature_is_reproducible() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign(b"secret", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }
}
