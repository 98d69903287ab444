//! Configuration: a TOML file, every setting optional. `dps config default` prints
//! [`DEFAULT_CONFIG`], which documents each setting and parses to [`Config::default`].
//!
//! This file holds the settings' types and defaults only, and depends on no transport and on
//! no other part of the server but [`crate::address_policy`]'s default deny list; reading and
//! checking a file ([`Config::from_toml`], [`Config::load`], [`Config::validate`]) is in
//! [`crate::config_check`], which may call into the parts it checks (rule sets, address policy).

use std::net::SocketAddr;
use std::path::PathBuf;

use dps_proto::service::AllocationPolicy;
use serde::Deserialize;

/// The documented default configuration (what `dps config default` prints).
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// Configuration errors: what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown / mistyped settings.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// serde/toml's message, with line and column.
        message: String,
    },
    /// A setting has a value that cannot work.
    #[error("invalid setting {setting}: {message}")]
    Invalid {
        /// Dotted name of the setting.
        setting: String,
        /// Why.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store, TLS material and dev credentials live.
    pub data_dir: PathBuf,
    /// ID scope; generated once and kept in the store when absent.
    pub id_scope: Option<String>,
    /// Logging: `log = "<filter>"` or a `[log]` table with `level` and `format`.
    pub log: LogConfig,
    /// Region of this node, for `geoLatency` allocation.
    pub region: Option<String>,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// TLS.
    pub tls: TlsConfig,
    /// Device runtime API behaviour.
    pub device: DeviceConfig,
    /// Service API.
    pub service: ServiceConfig,
    /// Allocation defaults.
    pub allocation: AllocationConfig,
    /// Linked IoT hubs.
    pub hubs: Vec<HubConfig>,
    /// Per-webhook settings (signature secret, CA, client certificate), by URL prefix.
    pub webhooks: Vec<WebhookConfig>,
    /// Built-in allocation rule sets, used by `webhookUrl = "rules://<name>"`.
    pub rules: Vec<RuleSetConfig>,
    /// MQTT device transport.
    pub mqtt: MqttConfig,
    /// AMQP device transport.
    pub amqp: AmqpConfig,
    /// X.509 attestation.
    pub x509: X509Config,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Store.
    #[serde(deserialize_with = "store_with_default_backend")]
    pub store: StoreConfig,
    /// Rate limits (429 with Retry-After).
    pub throttling: ThrottlingConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// Lifecycle events (CloudEvents) to NATS JetStream and/or an HTTP endpoint.
    pub events: EventsConfig,
}

/// `[events]`: registration and enrollment lifecycle events as CloudEvents 1.0, delivered at
/// least once from an outbox in the store (docs/events.md). Off when no sink is set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// NATS server (`nats://host:4222`, or `tls://` for TLS); events go to JetStream.
    pub nats_url: Option<String>,
    /// Subject prefix: an event of type `registration.assigned` goes to
    /// `{prefix}.registration.assigned`.
    pub nats_subject_prefix: String,
    /// A JetStream stream over `{prefix}.>` that dps creates if it is missing; unset: the
    /// operator provides one (a publish no stream takes is retried).
    pub nats_stream: Option<String>,
    /// NATS credentials file (`.creds`), when the server requires one.
    pub nats_credentials_file: Option<PathBuf>,
    /// HTTP sink: each event is POSTed here (structured CloudEvents JSON, signed).
    pub http_url: Option<String>,
    /// The HTTP sink's signature secret (`x-dps-signature`, as webhooks), at least 16
    /// characters; or `http_secret_env`.
    pub http_secret: Option<String>,
    /// Environment variable holding the HTTP sink's secret.
    pub http_secret_env: Option<String>,
    /// Time allowed for one delivery, in seconds.
    pub timeout_secs: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            nats_url: None,
            nats_subject_prefix: "dps".into(),
            nats_stream: None,
            nats_credentials_file: None,
            http_url: None,
            http_secret: None,
            http_secret_env: None,
            timeout_secs: 5,
        }
    }
}

impl EventsConfig {
    /// Whether any sink is configured (events are written only then).
    pub fn any(&self) -> bool {
        self.nats_url.is_some() || self.http_url.is_some()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, message, fields, the request's span
    /// with its `request_id`), for log shippers.
    Json,
}

/// `log = "<filter>"`, or `[log]` with `level` (the filter) and `format`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Filter in `RUST_LOG` syntax; the `RUST_LOG` environment variable wins.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

impl<'de> Deserialize<'de> for LogConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            #[serde(default = "default_level")]
            level: String,
            #[serde(default)]
            format: LogFormat,
        }
        fn default_level() -> String {
            "info".into()
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Filter(String),
            Table(Table),
        }
        match Form::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "log must be a filter string (log = \"info\") or a [log] table with level and format = \"text\" | \"json\"",
            )
        })? {
            Form::Filter(level) => Ok(Self { level, format: LogFormat::Text }),
            Form::Table(t) => Ok(Self { level: t.level, format: t.format }),
        }
    }
}

/// `[metrics]`: Prometheus text at `GET /metrics` on a listener of its own (plain HTTP, no
/// authentication: bind it to loopback or a private interface). Off when `listen` is unset.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where to serve `/metrics`, e.g. `127.0.0.1:9464`.
    pub listen: Option<SocketAddr>,
}

/// `[throttling]`: token buckets; a `*_per_min` of 0 turns that limit off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottlingConfig {
    /// Registrations of the whole instance per minute.
    pub registrations_per_min: u32,
    /// Registrations at once above that rate.
    pub registrations_burst: u32,
    /// Register, poll and status requests per registration ID per minute.
    pub device_requests_per_min: u32,
    /// Such requests at once.
    pub device_requests_burst: u32,
    /// Failed authentications (device or service API) per source address per minute.
    pub failed_auth_per_min: u32,
    /// Such failures at once.
    pub failed_auth_burst: u32,
}

impl Default for ThrottlingConfig {
    fn default() -> Self {
        Self {
            registrations_per_min: 0,
            registrations_burst: 1000,
            device_requests_per_min: 0,
            device_requests_burst: 10,
            failed_auth_per_min: 600,
            failed_auth_burst: 100,
        }
    }
}

impl ThrottlingConfig {
    fn limit(per_min: u32, burst: u32) -> Option<dps_core::throttle::RateLimit> {
        (per_min > 0).then_some(dps_core::throttle::RateLimit { burst, per_minute: per_min })
    }

    /// The instance-wide registration limit, if on.
    pub fn registrations(&self) -> Option<dps_core::throttle::RateLimit> {
        Self::limit(self.registrations_per_min, self.registrations_burst)
    }

    /// The per-device limit, if on.
    pub fn device_requests(&self) -> Option<dps_core::throttle::RateLimit> {
        Self::limit(self.device_requests_per_min, self.device_requests_burst)
    }

    /// The failed-authentication limit, if on.
    pub fn failed_auth(&self) -> Option<dps_core::throttle::RateLimit> {
        Self::limit(self.failed_auth_per_min, self.failed_auth_burst)
    }
}

/// `[listen]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// HTTPS (device runtime API and service API; MQTT and AMQP over WebSocket).
    pub https: SocketAddr,
    /// MQTT over TLS.
    pub mqtt: SocketAddr,
    /// AMQP over TLS.
    pub amqp: SocketAddr,
}

/// `[x509]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct X509Config {
    /// Group members' chains must reach a CA verified in the certificate store.
    pub require_verified_ca: bool,
}

impl Default for X509Config {
    fn default() -> Self {
        Self { require_verified_ca: true }
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Serve MQTT over TLS on `listen.mqtt`.
    pub enabled: bool,
    /// Serve MQTT over WebSocket on the HTTPS port.
    pub websocket: bool,
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_bytes: usize,
    /// Seconds a new connection has to complete the TLS handshake, and then to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Idle limit when a client sets keep-alive 0 (otherwise 1.5 × its keep-alive applies).
    pub idle_timeout_secs: u64,
    /// Seconds a write may wait for a client that does not read.
    pub write_timeout_secs: u64,
    /// Open MQTT connections at most (TCP and WebSocket together); unset: fitted to the
    /// file-descriptor limit at start (at most [`MQTT_MAX_CONNECTIONS`]).
    pub max_connections: Option<usize>,
    /// Open MQTT-over-TLS connections per source address (IPv6: per /64) at most.
    pub max_connections_per_address: usize,
}

/// The highest `mqtt.max_packet_bytes` accepted by the config (16 MiB).
pub const MAX_PACKET_LIMIT: usize = 16 * 1024 * 1024;
/// The most MQTT connections an unset `mqtt.max_connections` is fitted to.
pub const MQTT_MAX_CONNECTIONS: usize = 50_000;
/// The most HTTPS connections an unset `limits.max_connections` is fitted to.
pub const HTTPS_MAX_CONNECTIONS: usize = 10_000;

impl MqttConfig {
    /// The cap in force (fitted at start when unset).
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(MQTT_MAX_CONNECTIONS)
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            websocket: true,
            max_packet_bytes: 131_072,
            connect_timeout_secs: 10,
            idle_timeout_secs: 1800,
            write_timeout_secs: 30,
            max_connections: None,
            max_connections_per_address: 1000,
        }
    }
}

/// `[amqp]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Serve AMQP 1.0 over TLS on `listen.amqp`.
    pub enabled: bool,
    /// Serve AMQP over WebSocket (subprotocol `AMQPWSB10`) on the HTTPS port.
    pub websocket: bool,
    /// Largest AMQP frame accepted (and the `max-frame-size` announced), in bytes.
    pub max_frame_bytes: u32,
    /// Largest request message (all transfer frames of one delivery), in bytes.
    pub max_message_bytes: usize,
    /// Seconds a new connection has to complete the TLS handshake, and then to send its
    /// protocol header and `open`.
    pub connect_timeout_secs: u64,
    /// Seconds the whole SASL exchange may take (a TPM device works its TPM between the
    /// challenges).
    pub sasl_timeout_secs: u64,
    /// The `idle-time-out` announced in `open`: a connection that sends no frame for this
    /// long is closed.
    pub idle_timeout_secs: u64,
    /// Seconds a write may wait for a client that does not read.
    pub write_timeout_secs: u64,
    /// Sessions per connection at most (`channel-max` + 1).
    pub max_sessions: u16,
    /// Links per connection at most (the SDKs attach two).
    pub max_links: u32,
    /// Open AMQP connections at most (TCP and WebSocket together); unset: fitted to the
    /// file-descriptor limit at start (at most [`AMQP_MAX_CONNECTIONS`]).
    pub max_connections: Option<usize>,
    /// Open AMQP-over-TLS connections per source address (IPv6: per /64) at most.
    pub max_connections_per_address: usize,
}

/// The most AMQP connections an unset `amqp.max_connections` is fitted to.
pub const AMQP_MAX_CONNECTIONS: usize = 50_000;
/// The highest `amqp.max_frame_bytes` accepted by the config (1 MiB).
pub const MAX_AMQP_FRAME_LIMIT: u32 = 1024 * 1024;

impl AmqpConfig {
    /// The cap in force (fitted at start when unset).
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(AMQP_MAX_CONNECTIONS)
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            websocket: true,
            max_frame_bytes: 65_536,
            max_message_bytes: 131_072,
            connect_timeout_secs: 10,
            sasl_timeout_secs: 30,
            idle_timeout_secs: 240,
            write_timeout_secs: 30,
            max_sessions: 4,
            max_links: 8,
            max_connections: None,
            max_connections_per_address: 1000,
        }
    }
}

/// `[tls]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; generated from a test CA in the data directory when absent.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Names in the generated server certificate, and the host names service SAS
    /// audiences may name.
    pub host_names: Vec<String>,
    /// Key type of the generated server certificate.
    pub generated_key: GeneratedKey,
}

pub use dps_proto::tls::GeneratedKey;

/// `[device]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// Answer every register with `assigning` and make devices poll, as real DPS does.
    pub assigning_first: bool,
    /// `retry-after` seconds on `assigning` answers.
    pub retry_after_secs: u32,
    /// How long operations stay queryable.
    pub operation_retention_secs: u64,
    /// Largest device `payload` (compact JSON bytes).
    pub max_payload_bytes: usize,
    /// Accepted clock skew for SAS expiry.
    pub sas_clock_skew_secs: u64,
    /// A failed device authentication is answered no sooner than this many milliseconds
    /// after it began (the answer time then tells nothing about which IDs are enrolled).
    pub auth_failure_delay_ms: u64,
    /// How long the key a TPM challenge delivers is accepted, in seconds from its issue (for
    /// the registration it was asked for and the polls after it).
    pub tpm_challenge_secs: u64,
}

/// `[service]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Extra shared access policies (the generated `provisioningserviceowner` always exists
    /// unless a policy of that name is defined here).
    pub policies: Vec<PolicyConfig>,
    /// Page size of queries that send no `x-ms-max-item-count`.
    pub default_page_size: usize,
}

/// `[[service.policies]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Policy name (`SharedAccessKeyName`).
    pub name: String,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key.
    #[serde(default)]
    pub secondary_key: Option<String>,
    /// Rights: EnrollmentRead, EnrollmentWrite, RegistrationStatusRead,
    /// RegistrationStatusWrite, ServiceConfig.
    pub rights: Vec<String>,
}

/// `[allocation]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocationConfig {
    /// Policy for enrollments that set none: hashed, static or geoLatency.
    pub default_policy: AllocationPolicy,
    /// Whole-call timeout of a custom allocation webhook.
    pub webhook_timeout_secs: u64,
    /// How long a register waits for the webhook before answering `assigning`.
    pub webhook_inline_wait_ms: u64,
    /// Webhook calls in flight at most; more wait for a free slot (within the timeout).
    pub webhook_max_in_flight: usize,
    /// Calls in flight to one webhook URL (query excluded) at most, so that a hanging webhook
    /// leaves slots for the others.
    pub webhook_max_in_flight_per_url: usize,
    /// Largest webhook answer.
    pub webhook_max_response_bytes: usize,
    /// If not empty, webhooks may be called only at these hosts (`name`, `*.suffix`) and
    /// networks (CIDR or address).
    pub webhook_allow: Vec<String>,
    /// Hosts and networks webhooks may never be called at (checked first, also on every
    /// address a name resolves to).
    pub webhook_deny: Vec<String>,
    /// Tell devices what a failing webhook said (body excerpt, connection error) instead of
    /// only the cause class. For development instances: it can show internal details.
    pub expose_webhook_errors: bool,
}

/// `[[webhooks]]`: settings for webhook URLs starting with `url_prefix`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// URL prefix, e.g. `https://alloc.example.net/`; the longest matching prefix applies.
    pub url_prefix: String,
    /// Secret for the `x-dps-signature` header (HMAC-SHA256); no header when absent.
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM CA bundle to trust for this webhook (in addition to the system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain to present.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// `[[hubs]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Host name.
    pub host_name: String,
    /// Weight under `hashed` (1–1000).
    #[serde(default = "one")]
    pub allocation_weight: u32,
    /// Takes part when an enrollment names no hubs.
    #[serde(default = "yes")]
    pub apply_allocation_policy: bool,
    /// Region the hub is in, for `geoLatency`.
    #[serde(default)]
    pub region: Option<String>,
    /// What a registration does in this hub (`[hubs.registrar]`); `record` (nothing) by default.
    #[serde(default)]
    pub registrar: RegistrarConfig,
}

/// `[hubs.registrar]`: what creates a registered device in its hub.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RegistrarConfig {
    /// The assignment is only recorded; nothing is called.
    #[default]
    Record,
    /// A signed HTTP call to the operator's endpoint.
    Http(HttpRegistrarConfig),
    /// Azure IoT Hub's identity registry and twins.
    AzureIotHub(AzureRegistrarConfig),
    /// A Mosquitto broker's dynamic-security plugin: a client and a role per device.
    Mosquitto(MosquittoRegistrarConfig),
}

/// `[hubs.registrar] kind = "mosquitto"`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MosquittoRegistrarConfig {
    /// The broker's MQTT listener (`host:port`) dps administers it through; one broker is one
    /// hub.
    pub address: String,
    /// TLS to the broker (default); plain MQTT only to a loopback address.
    #[serde(default = "registrar_tls")]
    pub tls: bool,
    /// PEM CA bundle the broker's certificate must chain to (with `tls`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The TLS server name, when not the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// A dynamic-security admin (a client with the `admin` role).
    pub username: String,
    /// Its password.
    #[serde(default)]
    pub password: Option<String>,
    /// The name of an environment variable holding it instead.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Devices may publish and subscribe under `{topic_prefix}/{deviceId}/#` only.
    #[serde(default = "registrar_topic_prefix")]
    pub topic_prefix: String,
    /// As for `http`.
    #[serde(default)]
    pub on_failure: OnRegistrarFailure,
    /// Timeout of one attempt, in seconds.
    #[serde(default = "registrar_timeout")]
    pub timeout_secs: u64,
    /// Attempts per call, with backoff.
    #[serde(default = "registrar_attempts")]
    pub attempts: u32,
}

impl std::fmt::Debug for MosquittoRegistrarConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MosquittoRegistrarConfig")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_env", &self.password_env)
            .field("topic_prefix", &self.topic_prefix)
            .finish_non_exhaustive()
    }
}

fn registrar_tls() -> bool {
    true
}
fn registrar_topic_prefix() -> String {
    "devices".into()
}

/// `[hubs.registrar] kind = "azure-iot-hub"`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureRegistrarConfig {
    /// The hub's connection string with a policy that may write the registry
    /// (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`).
    #[serde(default)]
    pub connection_string: Option<String>,
    /// The name of an environment variable holding it instead.
    #[serde(default)]
    pub connection_string_env: Option<String>,
    /// Where the requests go, when not `https://{HostName}` (a proxy, a test server).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// As for `http`.
    #[serde(default)]
    pub on_failure: OnRegistrarFailure,
    /// Timeout of one request, in seconds.
    #[serde(default = "registrar_timeout")]
    pub timeout_secs: u64,
    /// Attempts per request (on a connection failure, a timeout, 429 or 5xx), with backoff.
    #[serde(default = "registrar_attempts")]
    pub attempts: u32,
    /// PEM CA bundle to trust for the endpoint (in addition to the system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for AzureRegistrarConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureRegistrarConfig")
            .field("connection_string", &self.connection_string.as_ref().map(|_| "<redacted>"))
            .field("connection_string_env", &self.connection_string_env)
            .field("endpoint", &self.endpoint)
            .field("on_failure", &self.on_failure)
            .field("timeout_secs", &self.timeout_secs)
            .field("attempts", &self.attempts)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `[hubs.registrar] kind = "http"`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRegistrarConfig {
    /// The endpoint (`https://…` or `http://…`); every call is a POST of JSON to it.
    pub url: String,
    /// The HMAC-SHA256 secret of the `x-dps-signature` header (at least 16 characters).
    #[serde(default)]
    pub secret: Option<String>,
    /// The name of an environment variable holding the secret instead.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// `fail` (default): a failed call fails the registration; `tolerate`: the registration is
    /// assigned and the call retried from the outbox until it succeeds.
    #[serde(default)]
    pub on_failure: OnRegistrarFailure,
    /// Timeout of one attempt, in seconds.
    #[serde(default = "registrar_timeout")]
    pub timeout_secs: u64,
    /// Attempts per call (on a connection failure, a timeout, 429 or 5xx), with backoff.
    #[serde(default = "registrar_attempts")]
    pub attempts: u32,
    /// PEM CA bundle to trust for the endpoint (in addition to the system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for HttpRegistrarConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRegistrarConfig")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("on_failure", &self.on_failure)
            .field("timeout_secs", &self.timeout_secs)
            .field("attempts", &self.attempts)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// What a registration does when its hub's registrar fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRegistrarFailure {
    /// The registration fails; the device keeps its previous assignment.
    #[default]
    Fail,
    /// The registration is assigned; the hub call is retried from the outbox.
    Tolerate,
}

fn registrar_timeout() -> u64 {
    10
}
fn registrar_attempts() -> u32 {
    3
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// `[[rules]]`: a built-in allocation rule set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetConfig {
    /// Name; enrollments use it as `webhookUrl = "rules://<name>"`.
    pub name: String,
    /// JSON Schema (as JSON text) the device payload must match.
    #[serde(default)]
    pub payload_schema: Option<String>,
    /// The same, from a file.
    #[serde(default)]
    pub payload_schema_file: Option<PathBuf>,
    /// Cases, tried in order.
    #[serde(default)]
    pub cases: Vec<RuleCaseConfig>,
}

/// `[[rules.cases]]`: CEL expressions.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleCaseConfig {
    /// Boolean: does this case apply?
    pub when: String,
    /// String: the hub (weighted hashing among the linked hubs when absent).
    #[serde(default)]
    pub hub: Option<String>,
    /// Any value: the payload returned to the device.
    #[serde(default)]
    pub payload: Option<String>,
    /// Map: the initial twin.
    #[serde(default)]
    pub initial_twin: Option<String>,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Time allowed to send a request's headers, counted from the end of the TLS handshake and
    /// from each answer (so also the idle limit of a kept-alive connection); then the
    /// connection is closed without an answer.
    pub header_read_timeout_secs: u64,
    /// Time allowed to send a request's body; then `400` `400001` and the connection closed.
    pub body_read_timeout_secs: u64,
    /// Open HTTPS connections at most; unset: fitted to the file-descriptor limit at start
    /// (at most [`HTTPS_MAX_CONNECTIONS`]). Over it, connections still in their TLS handshake
    /// are shed first, then newcomers are refused at accept.
    pub max_connections: Option<usize>,
    /// Open HTTPS connections per source address (IPv6: per /64) at most.
    pub max_connections_per_address: usize,
    /// TLS handshake time once a listener is more than half full (milliseconds).
    pub busy_handshake_timeout_ms: u64,
}

impl LimitsConfig {
    /// The cap in force (fitted at start when unset).
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(HTTPS_MAX_CONNECTIONS)
    }
}

/// `[store]`: the backend that keeps enrollments, registrations and operations (`backend`,
/// default `"sqlite"`), and that backend's settings beside it. Opened by
/// [`crate::store::open_store`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum StoreConfig {
    /// `backend = "sqlite"`: one SQLite database file in the data directory.
    Sqlite(SqliteStoreConfig),
    /// `backend = "postgres"`: a PostgreSQL database that several nodes may share.
    Postgres(PostgresStoreConfig),
}

impl StoreConfig {
    /// Every `backend` value.
    pub const BACKENDS: [&'static str; 2] = ["sqlite", "postgres"];

    /// The `backend` value of this configuration.
    pub fn backend(&self) -> &'static str {
        match self {
            StoreConfig::Sqlite(_) => "sqlite",
            StoreConfig::Postgres(_) => "postgres",
        }
    }

    /// Whether other processes (other `dps` nodes) share this store.
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreConfig::Postgres(_))
    }
}

/// The environment variable that holds the PostgreSQL URL (it wins over `[store] url`), so
/// that the password need not be in the configuration file.
pub const STORE_URL_ENV: &str = "DPS_STORE_URL";

/// `[store]` settings of `backend = "postgres"`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresStoreConfig {
    /// `postgres://user:password@host:port/database` (or libpq key=value); the environment
    /// variable [`STORE_URL_ENV`] wins over it.
    pub url: Option<String>,
    /// Pooled connections of this node to the database (the writers, purges, settings); the
    /// `readers` connections come on top.
    pub pool_size: usize,
    /// Writer tasks, each committing batches of writes on a connection of its own.
    pub writers: usize,
    /// Connections shared by every read of this node.
    pub readers: usize,
    /// `synchronous_commit` of this node's sessions; unset: the database's default.
    pub synchronous_commit: Option<String>,
    /// CA certificate (PEM) of the database server's TLS certificate; with it the connection
    /// is TLS and verified.
    pub ca_file: Option<PathBuf>,
    /// How long a start keeps trying to reach an unreachable database.
    pub start_timeout_secs: u64,
}

impl PostgresStoreConfig {
    /// The URL in force: the environment's, else the file's.
    pub fn url(&self) -> Option<String> {
        std::env::var(STORE_URL_ENV).ok().filter(|u| !u.is_empty()).or_else(|| self.url.clone())
    }
}

impl std::fmt::Debug for PostgresStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold the password.
        f.debug_struct("PostgresStoreConfig")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("writers", &self.writers)
            .field("readers", &self.readers)
            .field("synchronous_commit", &self.synchronous_commit)
            .field("ca_file", &self.ca_file)
            .field("start_timeout_secs", &self.start_timeout_secs)
            .finish()
    }
}

impl Default for PostgresStoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 16,
            writers: 1,
            readers: 1,
            synchronous_commit: None,
            ca_file: None,
            start_timeout_secs: 60,
        }
    }
}

/// `[store]` settings of `backend = "sqlite"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteStoreConfig {
    /// SQLite file name inside the data directory.
    pub sqlite_file: String,
    /// `full` (survives power loss) or `normal` (survives a crash of dps).
    pub synchronous: String,
}

/// Reads `[store]`, taking `backend = "sqlite"` when the table names no backend.
fn store_with_default_backend<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StoreConfig, D::Error> {
    use serde::de::Error as _;
    let mut table = toml::Table::deserialize(d)?;
    match table.get("backend") {
        None => {
            table.insert("backend".into(), toml::Value::String(StoreConfig::default().backend().into()));
        }
        Some(toml::Value::String(name)) if StoreConfig::BACKENDS.contains(&name.as_str()) => {}
        Some(other) => {
            let known: Vec<String> = StoreConfig::BACKENDS.iter().map(|b| format!("`{b}`")).collect();
            return Err(D::Error::custom(format!(
                "store.backend: {other} is not a store backend; expected one of {}",
                known.join(", ")
            )));
        }
    }
    StoreConfig::deserialize(toml::Value::Table(table)).map_err(|e| D::Error::custom(format!("store: {}", e.message())))
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./dps-data"),
            id_scope: None,
            log: LogConfig::default(),
            region: None,
            listen: ListenConfig::default(),
            tls: TlsConfig::default(),
            device: DeviceConfig::default(),
            service: ServiceConfig::default(),
            allocation: AllocationConfig::default(),
            hubs: Vec::new(),
            webhooks: Vec::new(),
            rules: Vec::new(),
            mqtt: MqttConfig::default(),
            amqp: AmqpConfig::default(),
            x509: X509Config::default(),
            limits: LimitsConfig::default(),
            store: StoreConfig::default(),
            throttling: ThrottlingConfig::default(),
            metrics: MetricsConfig::default(),
            events: EventsConfig::default(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            https: SocketAddr::from(([0, 0, 0, 0], 443)),
            mqtt: SocketAddr::from(([0, 0, 0, 0], 8883)),
            amqp: SocketAddr::from(([0, 0, 0, 0], 5671)),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            host_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            generated_key: GeneratedKey::Rsa2048,
        }
    }
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            assigning_first: false,
            retry_after_secs: 3,
            operation_retention_secs: 86_400,
            max_payload_bytes: 65_536,
            sas_clock_skew_secs: 300,
            auth_failure_delay_ms: 50,
            tpm_challenge_secs: 3600,
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self { policies: Vec::new(), default_page_size: 100 }
    }
}

impl Default for AllocationConfig {
    fn default() -> Self {
        Self {
            default_policy: AllocationPolicy::Hashed,
            webhook_timeout_secs: 10,
            webhook_inline_wait_ms: 2000,
            webhook_max_in_flight: 256,
            webhook_max_in_flight_per_url: 64,
            webhook_max_response_bytes: 65_536,
            webhook_allow: Vec::new(),
            webhook_deny: crate::address_policy::DEFAULT_DENY.iter().map(|s| s.to_string()).collect(),
            expose_webhook_errors: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 98_304,
            max_header_bytes: 16_384,
            tls_handshake_timeout_secs: 10,
            header_read_timeout_secs: 30,
            body_read_timeout_secs: 30,
            max_connections: None,
            max_connections_per_address: 1000,
            busy_handshake_timeout_ms: 2000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Sqlite(SqliteStoreConfig::default())
    }
}

impl Default for SqliteStoreConfig {
    fn default() -> Self {
        Self { sqlite_file: "dps.sqlite".into(), synchronous: "full".into() }
    }
}

/// The rights a policy can grant.
pub const RIGHTS: [&str; 5] =
    ["EnrollmentRead", "EnrollmentWrite", "RegistrationStatusRead", "RegistrationStatusWrite", "ServiceConfig"];

/// The placeholder hub used when the config links none, so that a fresh `dps serve` can
/// assign devices. Devices are recorded as assigned to it; nothing is written to a hub.
pub const PLACEHOLDER_HUB: &str = "hub.localhost";

impl Config {
    /// Linked hubs in force: the configured ones, or the placeholder.
    pub fn linked_hubs(&self) -> Vec<HubConfig> {
        if self.hubs.is_empty() {
            vec![HubConfig {
                host_name: PLACEHOLDER_HUB.into(),
                allocation_weight: 1,
                apply_allocation_policy: true,
                region: None,
                registrar: RegistrarConfig::Record,
            }]
        } else {
            self.hubs.clone()
        }
    }
}
