//! What the HTTP-speaking registrars share: one request sent with retries (a connection
//! failure, a timeout, `429` or `5xx` is tried again, waiting `Retry-After` or a growing
//! backoff, both capped), the answer read within a size limit, and error texts without URLs.

use std::time::Duration;

/// The longest wait between two attempts (also caps `Retry-After`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The start of an answer kept for an error message.
const ANSWER_START: usize = 200;
/// The largest answer read.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// An answer.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: reqwest::StatusCode,
    /// Its `ETag`, if any.
    pub etag: Option<String>,
    /// Its body (cut at [`MAX_ANSWER_BYTES`]).
    pub body: String,
}

impl Answer {
    /// `HTTP <status>`, for a device.
    pub fn status_text(&self) -> String {
        format!("HTTP {}", self.status.as_u16())
    }

    /// `HTTP <status>: <the start of the body>`, for the operator.
    pub fn describe(&self) -> String {
        format!("HTTP {}: {}", self.status.as_u16(), answer_start(&self.body))
    }
}

/// Why no answer came: for a device, and with the connection error for the operator.
#[derive(Debug)]
pub struct Unanswered {
    /// `cannot be reached`, `did not answer within N s`.
    pub public: String,
    /// The same with the error under it.
    pub detail: String,
}

/// Sends what `build` makes up to `attempts` times. `Ok`: the first answer that is not
/// retried, or the last one; `Err`: the last attempt reached no answer.
pub async fn send_retried<F>(attempts: u32, timeout: Duration, build: F) -> Result<Answer, Unanswered>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    let mut last = Err(Unanswered { public: String::new(), detail: String::new() });
    for attempt in 1..=attempts.max(1) {
        let wait = match build().send().await {
            Ok(mut answer) => {
                let status = answer.status();
                let header = |name: reqwest::header::HeaderName| {
                    answer.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
                };
                let retry_after = header(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let etag = header(reqwest::header::ETAG);
                let mut body = Vec::new();
                while let Ok(Some(chunk)) = answer.chunk().await {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_ANSWER_BYTES {
                        body.truncate(MAX_ANSWER_BYTES);
                        break;
                    }
                }
                let body = String::from_utf8_lossy(&body).into_owned();
                let retried = status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                last = Ok(Answer { status, etag, body });
                if !retried {
                    return last;
                }
                retry_after
            }
            Err(e) if e.is_timeout() => {
                let text = format!("did not answer within {} s", timeout.as_secs());
                last = Err(Unanswered { public: text.clone(), detail: text });
                None
            }
            Err(e) => {
                last = Err(Unanswered {
                    public: "cannot be reached".into(),
                    detail: format!("cannot be reached ({})", without_url(&e)),
                });
                None
            }
        };
        if attempt < attempts {
            let backoff = Duration::from_millis(200u64 << attempt.min(5));
            tokio::time::sleep(wait.unwrap_or(backoff).min(MAX_BACKOFF)).await;
        }
    }
    last
}

/// A client for a registrar's endpoint: rustls, no proxy, no redirects, the timeout per
/// attempt, and the CA bundle of `ca_file` trusted besides the system roots.
pub fn client(timeout: Duration, ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("dps-rs/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        for c in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())? {
            builder = builder.add_root_certificate(c);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// The start of an answer, on one line.
pub fn answer_start(text: &str) -> String {
    let one_line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let trimmed = one_line.trim();
    match trimmed.char_indices().nth(ANSWER_START) {
        Some((i, _)) => format!("{}…", &trimmed[..i]),
        None => trimmed.to_string(),
    }
}

/// A connection error's text without the URL (its query may hold a key): the error's kind and
/// the causes under it.
fn without_url(e: &reqwest::Error) -> String {
    let mut text = String::from(if e.is_connect() { "connection failed" } else { "request failed" });
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_answers_are_cut_to_one_line() {
        assert_eq!(answer_start("a\nb"), "a b");
        assert_eq!(answer_start(&"x".repeat(500)).chars().count(), ANSWER_START + 1);
    }
}
