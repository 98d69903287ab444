//! A client of the service API: signs each request with the policy's key, sends the ETag
//! conditions and turns DPS error bodies into [`AdminError::Refused`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dps_proto::sas::{build_token, encode_component, strip_port};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::login::Login;
use super::AdminError;

/// The service API version the commands speak.
pub const API_VERSION: &str = "2021-10-01";

/// Lifetime of the SAS token of each request.
const TOKEN_SECS: u64 = 300;

/// Items asked for per query page.
const PAGE_SIZE: usize = 100;

/// The service API of one dps.
pub struct ServiceApi {
    http: reqwest::Client,
    base: String,
    host: String,
    key_name: String,
    key: Vec<u8>,
}

/// One page of a query.
pub struct Page {
    /// The items.
    pub items: Vec<Value>,
    /// Where the next page starts, if there is one.
    pub continuation: Option<String>,
}

impl ServiceApi {
    /// A client for the login's service.
    pub fn new(login: Login) -> Result<ServiceApi, AdminError> {
        let host = login.connection.host_name.clone();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(login.timeout))
            .connect_timeout(Duration::from_secs(login.timeout.min(10)))
            .user_agent(concat!("dps-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &login.ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| AdminError::Usage(format!("the CA file is not a PEM certificate: {e}")))?;
            builder = builder.tls_built_in_root_certs(false).add_root_certificate(ca);
        }
        // The URL's port wins over a resolved address's: with --connect-to, its port is used.
        let mut base = format!("https://{host}");
        if let Some(addr) = login.connect_to {
            builder = builder.resolve(strip_port(&host), addr);
            base = format!("https://{}:{}", strip_port(&host), addr.port());
        }
        let http = builder.build().map_err(|e| AdminError::Usage(format!("cannot set up HTTPS: {e}")))?;
        Ok(ServiceApi { http, base, host, key_name: login.connection.key_name, key: login.connection.key })
    }

    fn token(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        build_token(&self.host, &self.key, now + TOKEN_SECS, Some(&self.key_name))
    }

    /// The URL of `segments` (each percent-encoded) under the service.
    fn url(&self, segments: &[&str]) -> String {
        let path: Vec<String> = segments.iter().map(|s| encode_component(s)).collect();
        format!("{}/{}?api-version={API_VERSION}", self.base, path.join("/"))
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Value), AdminError> {
        let what = format!("{method} /{}", segments.join("/"));
        let mut req = self.http.request(method, self.url(segments)).header("Authorization", self.token());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| AdminError::unreachable(&self.base, &e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.map_err(|e| AdminError::unreachable(&self.base, &e))?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|_| {
                AdminError::Protocol(format!("{what}: the service answered {status} with a body that is not JSON"))
            })?
        };
        if status.is_success() {
            Ok((status, headers, value))
        } else {
            Err(AdminError::refused(&what, status.as_u16(), &value))
        }
    }

    /// `GET` one resource.
    pub async fn get(&self, segments: &[&str]) -> Result<Value, AdminError> {
        Ok(self.send(Method::GET, segments, None, &[]).await?.2)
    }

    /// `PUT` one resource, with `If-Match` when an ETag is given.
    pub async fn put(&self, segments: &[&str], body: &Value, etag: Option<&str>) -> Result<Value, AdminError> {
        let headers: Vec<(&str, String)> = etag.map(|e| ("If-Match", quoted(e))).into_iter().collect();
        Ok(self.send(Method::PUT, segments, Some(body), &headers).await?.2)
    }

    /// `POST` to an action.
    pub async fn post(&self, segments: &[&str], body: &Value, etag: Option<&str>) -> Result<Value, AdminError> {
        let headers: Vec<(&str, String)> = etag.map(|e| ("If-Match", quoted(e))).into_iter().collect();
        Ok(self.send(Method::POST, segments, Some(body), &headers).await?.2)
    }

    /// `DELETE` one resource, with `If-Match` when an ETag is given.
    pub async fn delete(&self, segments: &[&str], etag: Option<&str>) -> Result<(), AdminError> {
        let headers: Vec<(&str, String)> = etag.map(|e| ("If-Match", quoted(e))).into_iter().collect();
        self.send(Method::DELETE, segments, None, &headers).await.map(|_| ())
    }

    /// One page of a query (`POST …/query` with the paging headers).
    async fn page(&self, segments: &[&str], size: usize, continuation: Option<&str>) -> Result<Page, AdminError> {
        let mut headers = vec![("x-ms-max-item-count", size.to_string())];
        if let Some(c) = continuation {
            headers.push(("x-ms-continuation", c.to_string()));
        }
        let (_, headers, value) =
            self.send(Method::POST, segments, Some(&serde_json::json!({"query": "*"})), &headers).await?;
        let items = match value {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            _ => return Err(AdminError::Protocol("a query answered with something other than a JSON array".into())),
        };
        let continuation = headers
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .filter(|c| !c.is_empty())
            .map(str::to_string);
        Ok(Page { items, continuation })
    }

    /// Every item of a query, or the first `top`.
    pub async fn query(&self, segments: &[&str], top: Option<usize>) -> Result<Vec<Value>, AdminError> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let want = top.map_or(PAGE_SIZE, |t| t.saturating_sub(items.len()).min(PAGE_SIZE));
            if want == 0 {
                break;
            }
            let page = self.page(segments, want, continuation.as_deref()).await?;
            let empty = page.items.is_empty();
            items.extend(page.items);
            match page.continuation {
                Some(c) if !empty && Some(&c) != continuation.as_ref() => continuation = Some(c),
                _ => break,
            }
        }
        if let Some(t) = top {
            items.truncate(t);
        }
        Ok(items)
    }
}

/// An ETag as a quoted entity tag (`"…"`), unless it already is one or is `*`.
fn quoted(etag: &str) -> String {
    let e = etag.trim();
    if e == "*" || (e.starts_with('"') && e.ends_with('"') && e.len() >= 2) || e.starts_with("W/") {
        e.to_string()
    } else {
        format!("\"{e}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_quoted_once() {
        assert_eq!(quoted("abc"), "\"abc\"");
        assert_eq!(quoted("\"abc\""), "\"abc\"");
        assert_eq!(quoted("*"), "*");
    }
}
