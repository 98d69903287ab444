//! A local IoT hub for the tests and the benchmark (`dps bench --registrar azure-iot-hub`): an
//! HTTPS server that implements the published contract of
//! the IoT Hub service REST API calls dps's `azure-iot-hub` registrar makes
//! (`api-version=2021-04-12`; the REST reference "Devices - Create Or Update Identity", "Get
//! Identity", "Delete Identity", "Twin - Get / Replace Device Twin", and the service swagger in
//! azure-iot-sdk-node `service/src/service.json`): shared access signatures with `sr` = the hub
//! host name checked against the policy key, create without `If-Match` (`409
//! DeviceAlreadyExists` when the device exists), update with `If-Match` (`412
//! PreconditionFailed` on another ETag, `*` matches any), delete with `If-Match` (`204`, `404
//! DeviceNotFound`), twins replaced by `PUT`; errors in the classic body
//! `{"Message":"ErrorCode:<code>;<text>","ExceptionMessage":"Tracking ID:…"}`. Every request is
//! kept for field-by-field assertions; statuses can be queued to answer first (throttling,
//! outages), and a delay set (a slow hub).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::{json, Value};

/// A request the hub received.
#[derive(Debug, Clone)]
pub struct HubRequest {
    /// Method.
    pub method: String,
    /// Path (still percent-encoded).
    pub path: String,
    /// Query.
    pub query: String,
    /// `If-Match`, if any.
    pub if_match: Option<String>,
    /// The JSON body (`null` when empty).
    pub body: Value,
}

#[derive(Default)]
struct State {
    devices: HashMap<String, (u64, Value)>,
    twins: HashMap<String, Value>,
    requests: Vec<HubRequest>,
    queued: VecDeque<u16>,
    delay: Duration,
    etags: u64,
}

/// A running local hub.
#[derive(Clone)]
pub struct IotHub {
    /// The hub's host name (the SAS audience).
    pub host_name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its `iothubowner` key (base64).
    pub key: String,
    state: Arc<Mutex<State>>,
    /// PEM of the CA that issued the server's certificate.
    pub ca_pem: String,
}

/// The shared access policy it knows.
pub const POLICY: &str = "iothubowner";

impl IotHub {
    /// Starts a hub named `host_name` on a loopback port, with `key` (base64) as its policy
    /// key. Keeps requests for [`IotHub::requests`].
    pub async fn start(host_name: &str, key: &str) -> IotHub {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "local IoT hub CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hub = IotHub {
            host_name: host_name.to_string(),
            addr: listener.local_addr().unwrap(),
            key: key.to_string(),
            state: Arc::default(),
            ca_pem: ca.pem(),
        };
        let h = hub.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (h, acceptor) = (h.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let h = h.clone();
                        async move { Ok::<_, Infallible>(h.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        hub
    }

    /// The connection string of its `iothubowner` policy.
    pub fn connection_string(&self) -> String {
        format!("HostName={};SharedAccessKeyName={POLICY};SharedAccessKey={}", self.host_name, self.key)
    }

    /// The `[[hubs]]` entry that links it through the `azure-iot-hub` registrar (its CA
    /// written to `dir`).
    pub fn config(&self, dir: &std::path::Path, on_failure: &str) -> String {
        let ca = dir.join(format!("{}-ca.pem", self.host_name));
        std::fs::write(&ca, &self.ca_pem).unwrap();
        format!(
            "[[hubs]]\nhost_name = \"{}\"\n[hubs.registrar]\nkind = \"azure-iot-hub\"\nconnection_string = \"{}\"\n\
             endpoint = \"https://{}\"\nca_file = {:?}\non_failure = \"{on_failure}\"\ntimeout_secs = 2\nattempts = 3\n",
            self.host_name,
            self.connection_string(),
            self.addr,
            ca.display().to_string()
        )
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<HubRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// A device identity as stored.
    pub fn device(&self, id: &str) -> Option<Value> {
        self.state.lock().unwrap().devices.get(id).map(|(_, d)| d.clone())
    }

    /// A device's twin (`tags`, `properties.desired`).
    pub fn twin(&self, id: &str) -> Option<Value> {
        self.state.lock().unwrap().twins.get(id).cloned()
    }

    /// Changes a twin as the hub's back end or the device would.
    pub fn set_twin(&self, id: &str, twin: Value) {
        self.state.lock().unwrap().twins.insert(id.to_string(), twin);
    }

    /// How many identities it holds.
    pub fn device_count(&self) -> usize {
        self.state.lock().unwrap().devices.len()
    }

    /// Answers the next requests with these statuses first (429: throttled; others: an outage).
    pub fn queue(&self, statuses: &[u16]) {
        self.state.lock().unwrap().queued.extend(statuses);
    }

    /// Answers every request after this delay.
    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    fn authorized(&self, header: Option<&str>) -> bool {
        let Some(token) = header.and_then(|h| dps_proto::sas::SasToken::parse(h).ok()) else { return false };
        let key = dps_proto::sas::decode_key(&self.key).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        token.resource.eq_ignore_ascii_case(&self.host_name)
            && token.key_name.as_deref() == Some(POLICY)
            && token.is_signed_by(&key)
            && !token.is_expired(now, 0)
    }

    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (auth, if_match) = (header("authorization"), header("if-match"));
        let bytes = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
        let body: Value =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(json!("<not json>")) };
        let (queued, delay) = {
            let mut s = self.state.lock().unwrap();
            s.requests.push(HubRequest {
                method: method.to_string(),
                path: path.clone(),
                query: query.clone(),
                if_match: if_match.clone(),
                body: body.clone(),
            });
            (s.queued.pop_front(), s.delay)
        };
        tokio::time::sleep(delay).await;
        if let Some(status) = queued {
            let code = if status == 429 { "ThrottlingException" } else { "ServerError" };
            let mut r = error(status, code, "injected by the test");
            if status == 429 {
                r.headers_mut().insert("retry-after", hyper::header::HeaderValue::from_static("1"));
            }
            return r;
        }
        if !self.authorized(auth.as_deref()) {
            return error(401, "IotHubUnauthorizedAccess", "Unauthorized");
        }
        if query != "api-version=2021-04-12" {
            return error(400, "InvalidProtocolVersion", &format!("unsupported query '{query}'"));
        }
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (collection, id) = (parts.next().unwrap_or(""), percent_decode(parts.next().unwrap_or("")));
        let mut s = self.state.lock().unwrap();
        match (collection, method) {
            ("devices", Method::GET) => match s.devices.get(&id) {
                Some((etag, d)) => ok(200, d.clone(), Some(*etag)),
                None => error(404, "DeviceNotFound", &id),
            },
            ("devices", Method::PUT) => {
                if let Err(m) = check_device(&id, &body) {
                    return error(400, "ArgumentInvalid", &m);
                }
                let current = s.devices.get(&id).map(|(e, _)| *e);
                match (current, if_match.as_deref().map(unquote)) {
                    (Some(_), None) => {
                        return error(
                            409,
                            "DeviceAlreadyExists",
                            &format!("A device with ID '{id}' is already registered."),
                        )
                    }
                    (None, Some(_)) => return error(404, "DeviceNotFound", &id),
                    (Some(e), Some(m)) if m != "*" && m != e.to_string() => {
                        return error(412, "PreconditionFailed", "Precondition failed: Invalid ETag")
                    }
                    _ => {}
                }
                s.etags += 1;
                let etag = s.etags;
                let mut stored = body.clone();
                stored["etag"] = json!(etag.to_string());
                stored["generationId"] = json!("637000000000000000");
                s.devices.insert(id.clone(), (etag, stored.clone()));
                s.twins.entry(id.clone()).or_insert_with(|| json!({"tags": {}, "properties": {"desired": {}}}));
                ok(200, stored, Some(etag))
            }
            ("devices", Method::DELETE) => {
                if if_match.is_none() {
                    return error(400, "ArgumentInvalid", "If-Match is required");
                }
                match s.devices.remove(&id) {
                    Some(_) => {
                        s.twins.remove(&id);
                        Response::builder().status(204).body(Full::new(Bytes::new())).unwrap()
                    }
                    None => error(404, "DeviceNotFound", &id),
                }
            }
            ("twins", Method::GET) => match s.twins.get(&id) {
                Some(t) => {
                    let mut twin = t.clone();
                    twin["deviceId"] = json!(id);
                    twin["etag"] = json!("AAAAAAAAAAE=");
                    twin["properties"]["desired"]["$version"] = json!(2);
                    twin["properties"]["desired"]["$metadata"] = json!({"$lastUpdated": "2026-12-07T00:00:00Z"});
                    twin["properties"]["reported"] = json!({"$version": 1});
                    ok(200, twin, None)
                }
                None => error(404, "DeviceNotFound", &id),
            },
            ("twins", Method::PUT) => {
                if !s.devices.contains_key(&id) {
                    return error(404, "DeviceNotFound", &id);
                }
                let tags = body.get("tags").cloned().unwrap_or(json!({}));
                let desired = body.pointer("/properties/desired").cloned().unwrap_or(json!({}));
                if !tags.is_object()
                    || !desired.is_object()
                    || desired.as_object().unwrap().keys().any(|k| k.starts_with('$'))
                {
                    return error(400, "ArgumentInvalid", "tags and properties.desired must be objects without $ keys");
                }
                let twin = json!({"tags": tags, "properties": {"desired": desired}});
                s.twins.insert(id, twin.clone());
                ok(200, twin, None)
            }
            _ => error(405, "InvalidOperation", "not part of this contract"),
        }
    }
}

/// The checks IoT Hub makes on a Device body (the fields dps sends).
fn check_device(id: &str, body: &Value) -> Result<(), String> {
    if body["deviceId"] != json!(id) {
        return Err(format!("deviceId {} does not match the path '{id}'", body["deviceId"]));
    }
    if !matches!(body["status"].as_str(), Some("enabled" | "disabled")) {
        return Err("status must be enabled or disabled".into());
    }
    if !body["capabilities"]["iotEdge"].is_boolean() {
        return Err("capabilities.iotEdge must be a boolean".into());
    }
    let auth = &body["authentication"];
    match auth["type"].as_str() {
        Some("sas") => {
            for k in ["primaryKey", "secondaryKey"] {
                let key = auth["symmetricKey"][k].as_str().ok_or(format!("symmetricKey.{k} is missing"))?;
                let bytes = dps_proto::sas::decode_key(key).map_err(|e| format!("symmetricKey.{k}: {e}"))?;
                if !(16..=64).contains(&bytes.len()) {
                    return Err(format!("symmetricKey.{k} must be 16 to 64 bytes"));
                }
            }
        }
        Some("selfSigned") => {
            let t = auth["x509Thumbprint"]["primaryThumbprint"]
                .as_str()
                .ok_or("x509Thumbprint.primaryThumbprint is missing")?;
            if !(t.len() == 40 || t.len() == 64) || !t.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!("'{t}' is not a SHA-1 or SHA-256 thumbprint"));
            }
        }
        Some("certificateAuthority") => {}
        other => return Err(format!("authentication.type {other:?} is not supported")),
    }
    Ok(())
}

fn unquote(s: &str) -> String {
    s.trim().trim_matches(|c| c == '"' || c == '\'').to_string()
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn ok(status: u16, body: Value, etag: Option<u64>) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status).header("content-type", "application/json; charset=utf-8");
    if let Some(e) = etag {
        b = b.header("etag", format!("\"{e}\""));
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn error(status: u16, code: &str, text: &str) -> Response<Full<Bytes>> {
    let body = json!({"Message": format!("ErrorCode:{code};{text}"), "ExceptionMessage": "Tracking ID:0123456789abcdef-G:1-TimeStamp:12/07/2026 00:00:00"});
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .header("iothub-errorcode", code)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}
