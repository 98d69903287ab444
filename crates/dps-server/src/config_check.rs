//! Reading and checking a configuration: [`Config::from_toml`], [`Config::load`] and
//! [`Config::validate`]. Apart from [`crate::config`] (the settings' types, which depend on
//! nothing they check) so that checking may call the parts it checks — rule sets are
//! compiled here ([`crate::rules`]), address policies parsed ([`crate::address_policy`]) —
//! without those parts and the configuration depending on each other.

use std::path::Path;

use dps_proto::service::AllocationPolicy;

use crate::config::{Config, ConfigError, StoreConfig, MAX_PACKET_LIMIT, RIGHTS, STORE_URL_ENV};

/// The values PostgreSQL takes for `synchronous_commit`.
const SYNCHRONOUS_COMMIT: [&str; 5] = ["on", "remote_apply", "remote_write", "local", "off"];

impl Config {
    /// Parses TOML text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, path)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting: &str, message: String| ConfigError::Invalid { setting: setting.into(), message };
        if let Some(scope) = &self.id_scope {
            dps_proto::ids::validate_id_scope(scope).map_err(|e| invalid("id_scope", e.to_string()))?;
            if ["enrollments", "enrollmentgroups", "registrations"].contains(&scope.to_ascii_lowercase().as_str()) {
                return Err(invalid("id_scope", format!("'{scope}' collides with a service API path")));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid("tls", "set both tls.cert and tls.key, or neither".into()));
        }
        if self.tls.host_names.is_empty() {
            return Err(invalid("tls.host_names", "name at least one host (e.g. \"localhost\")".into()));
        }
        if self.allocation.default_policy == AllocationPolicy::Custom {
            return Err(invalid(
                "allocation.default_policy",
                "custom cannot be the instance default; set it on enrollments".into(),
            ));
        }
        let m = &self.mqtt;
        if !(1024..=MAX_PACKET_LIMIT).contains(&m.max_packet_bytes) {
            return Err(invalid(
                "mqtt.max_packet_bytes",
                format!("must be 1024..={} (a register carries up to 96 KiB of JSON)", MAX_PACKET_LIMIT),
            ));
        }
        if m.connect_timeout_secs == 0
            || m.idle_timeout_secs == 0
            || m.write_timeout_secs == 0
            || m.max_connections == Some(0)
            || m.max_connections_per_address == 0
        {
            return Err(invalid(
                "mqtt",
                "connect_timeout_secs, idle_timeout_secs, write_timeout_secs, max_connections and max_connections_per_address must be ≥ 1".into(),
            ));
        }
        if m.enabled && self.listen.mqtt == self.listen.https && self.listen.https.port() != 0 {
            return Err(invalid("listen.mqtt", "must differ from listen.https".into()));
        }
        let q = &self.amqp;
        if !(4096..=crate::config::MAX_AMQP_FRAME_LIMIT).contains(&q.max_frame_bytes) {
            return Err(invalid(
                "amqp.max_frame_bytes",
                format!("must be 4096..={}", crate::config::MAX_AMQP_FRAME_LIMIT),
            ));
        }
        if !(1024..=MAX_PACKET_LIMIT).contains(&q.max_message_bytes) {
            return Err(invalid(
                "amqp.max_message_bytes",
                format!("must be 1024..={MAX_PACKET_LIMIT} (a register carries up to 96 KiB of JSON)"),
            ));
        }
        if q.connect_timeout_secs == 0
            || q.sasl_timeout_secs == 0
            || q.idle_timeout_secs == 0
            || q.idle_timeout_secs > 3600
            || q.write_timeout_secs == 0
            || q.max_sessions == 0
            || q.max_links < 2
            || q.max_connections == Some(0)
            || q.max_connections_per_address == 0
        {
            return Err(invalid(
                "amqp",
                "connect_timeout_secs, sasl_timeout_secs, write_timeout_secs, max_sessions, max_connections and max_connections_per_address must be ≥ 1, idle_timeout_secs 1..=3600, max_links ≥ 2".into(),
            ));
        }
        if q.enabled
            && (self.listen.amqp == self.listen.https || (m.enabled && self.listen.amqp == self.listen.mqtt))
            && self.listen.amqp.port() != 0
        {
            return Err(invalid("listen.amqp", "must differ from listen.https and listen.mqtt".into()));
        }
        let a = &self.allocation;
        if a.webhook_timeout_secs == 0 || a.webhook_timeout_secs > 300 {
            return Err(invalid("allocation.webhook_timeout_secs", "must be 1..=300".into()));
        }
        if a.webhook_max_in_flight == 0 || a.webhook_max_response_bytes < 1024 {
            return Err(invalid(
                "allocation",
                "webhook_max_in_flight must be ≥ 1 and webhook_max_response_bytes ≥ 1024".into(),
            ));
        }
        if a.webhook_max_in_flight_per_url == 0 || a.webhook_max_in_flight_per_url > a.webhook_max_in_flight {
            return Err(invalid(
                "allocation.webhook_max_in_flight_per_url",
                format!("must be 1..=webhook_max_in_flight ({})", a.webhook_max_in_flight),
            ));
        }
        crate::address_policy::AddressPolicy::new(&a.webhook_allow, &a.webhook_deny)
            .map_err(|m| invalid("allocation", m))?;
        for (i, w) in self.webhooks.iter().enumerate() {
            if !(w.url_prefix.starts_with("https://") || w.url_prefix.starts_with("http://")) {
                return Err(invalid(
                    &format!("webhooks[{i}].url_prefix"),
                    "must start with https:// or http://".into(),
                ));
            }
            if w.client_cert_file.is_some() != w.client_key_file.is_some() {
                return Err(invalid(
                    &format!("webhooks[{i}]"),
                    "set both client_cert_file and client_key_file, or neither".into(),
                ));
            }
            if w.secret.as_deref().is_some_and(|s| s.len() < 16) {
                return Err(invalid(&format!("webhooks[{i}].secret"), "use at least 16 characters".into()));
            }
        }
        crate::rules::RuleSets::compile(&self.rules, Vec::new())?;
        let mut seen = std::collections::HashSet::new();
        let mut brokers = std::collections::HashSet::new();
        for (i, hub) in self.hubs.iter().enumerate() {
            let name = hub.host_name.trim();
            if name.is_empty() || name.len() > 253 || name.contains(char::is_whitespace) {
                return Err(invalid(&format!("hubs[{i}].host_name"), format!("'{name}' is not a host name")));
            }
            if !(1..=1000).contains(&hub.allocation_weight) {
                return Err(invalid(
                    &format!("hubs[{i}].allocation_weight"),
                    format!("{} is outside 1..=1000", hub.allocation_weight),
                ));
            }
            if !seen.insert(name.to_ascii_lowercase()) {
                return Err(invalid(&format!("hubs[{i}].host_name"), format!("'{name}' is linked twice")));
            }
            check_registrar(&format!("hubs[{i}].registrar"), name, &hub.registrar)?;
            // Broker clients are named by device ID: two hubs on one broker would share (and
            // on a move, delete) them.
            if let crate::config::RegistrarConfig::Mosquitto(r) = &hub.registrar {
                if !brokers.insert(r.address.trim().to_ascii_lowercase()) {
                    return Err(invalid(
                        &format!("hubs[{i}].registrar.address"),
                        format!("the broker {} is already another hub's; link each broker as one hub", r.address),
                    ));
                }
            }
        }
        for (i, p) in self.service.policies.iter().enumerate() {
            let at = format!("service.policies[{i}]");
            if p.name.is_empty() || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(invalid(
                    &format!("{at}.name"),
                    format!("'{}' must be letters, digits, '-', '_' or '.'", p.name),
                ));
            }
            for key in std::iter::once(&p.primary_key).chain(p.secondary_key.iter()) {
                if dps_proto::sas::decode_key(key).map(|k| k.len() < 16).unwrap_or(true) {
                    return Err(invalid(&at, "keys must be base64 of at least 16 bytes".into()));
                }
            }
            if let Some(r) = p.rights.iter().find(|r| !RIGHTS.contains(&r.as_str())) {
                return Err(invalid(
                    &format!("{at}.rights"),
                    format!("unknown right '{r}'; known: {}", RIGHTS.join(", ")),
                ));
            }
        }
        match &self.store {
            StoreConfig::Sqlite(sqlite) => match sqlite.synchronous.as_str() {
                "full" | "normal" => {}
                other => return Err(invalid("store.synchronous", format!("'{other}' is not 'full' or 'normal'"))),
            },
            StoreConfig::Postgres(pg) => {
                if pg.url().is_none() {
                    return Err(invalid(
                        "store.url",
                        format!("backend \"postgres\" needs the database URL in [store] url or in {STORE_URL_ENV}"),
                    ));
                }
                if pg.pool_size < 2 || pg.pool_size > 1000 {
                    return Err(invalid("store.pool_size", format!("{} is not between 2 and 1000", pg.pool_size)));
                }
                if pg.writers == 0 || pg.writers >= pg.pool_size {
                    return Err(invalid(
                        "store.writers",
                        format!("{} must be at least 1 and less than pool_size ({})", pg.writers, pg.pool_size),
                    ));
                }
                if pg.readers == 0 || pg.writers + pg.readers > pg.pool_size {
                    return Err(invalid(
                        "store.readers",
                        format!(
                            "{} must be at least 1, and writers + readers ({}) at most pool_size ({})",
                            pg.readers,
                            pg.writers + pg.readers,
                            pg.pool_size
                        ),
                    ));
                }
                if let Some(mode) = &pg.synchronous_commit {
                    if !SYNCHRONOUS_COMMIT.contains(&mode.as_str()) {
                        return Err(invalid(
                            "store.synchronous_commit",
                            format!("'{mode}' is not one of {}", SYNCHRONOUS_COMMIT.join(", ")),
                        ));
                    }
                }
                if pg.start_timeout_secs == 0 || pg.start_timeout_secs > 3600 {
                    return Err(invalid("store.start_timeout_secs", "must be between 1 and 3600".to_string()));
                }
            }
        }
        let l = &self.limits;
        if l.max_body_bytes < 1024
            || l.max_header_bytes < 8192
            || l.max_connections == Some(0)
            || l.max_connections_per_address == 0
            || l.busy_handshake_timeout_ms == 0
        {
            return Err(invalid(
                "limits",
                "max_body_bytes must be ≥ 1024, max_header_bytes ≥ 8192, and max_connections, max_connections_per_address and busy_handshake_timeout_ms ≥ 1".into(),
            ));
        }
        if self.device.max_payload_bytes >= l.max_body_bytes {
            return Err(invalid(
                "device.max_payload_bytes",
                format!("must be smaller than limits.max_body_bytes ({})", l.max_body_bytes),
            ));
        }
        let t = &self.throttling;
        for (name, per_min, burst) in [
            ("registrations", t.registrations_per_min, t.registrations_burst),
            ("device_requests", t.device_requests_per_min, t.device_requests_burst),
            ("failed_auth", t.failed_auth_per_min, t.failed_auth_burst),
        ] {
            if per_min > 0 && burst == 0 {
                return Err(invalid(&format!("throttling.{name}_burst"), "must be ≥ 1 when the limit is on".into()));
            }
        }
        if self.device.auth_failure_delay_ms > 10_000 {
            return Err(invalid("device.auth_failure_delay_ms", "must be at most 10000".into()));
        }
        if !(1..=86_400).contains(&self.device.tpm_challenge_secs) {
            return Err(invalid("device.tpm_challenge_secs", "must be 1..=86400".into()));
        }
        if self.service.default_page_size == 0 || self.service.default_page_size > 1000 {
            return Err(invalid("service.default_page_size", "must be 1..=1000".into()));
        }
        check_events(&self.events)
    }
}

/// `[events]`.
fn check_events(e: &crate::config::EventsConfig) -> Result<(), ConfigError> {
    let invalid =
        |setting: &str, message: String| ConfigError::Invalid { setting: format!("events.{setting}"), message };
    let token = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !e.nats_subject_prefix.split('.').all(token) {
        return Err(invalid(
            "nats_subject_prefix",
            format!(
                "'{}' is not a NATS subject of letters, digits, '-' and '_' tokens joined by '.'",
                e.nats_subject_prefix
            ),
        ));
    }
    if let Some(stream) = &e.nats_stream {
        if !token(stream) {
            return Err(invalid("nats_stream", format!("'{stream}' is not a stream name (letters, digits, '-', '_')")));
        }
    }
    if let Some(url) = &e.nats_url {
        if !(url.starts_with("nats://") || url.starts_with("tls://")) || reqwest::Url::parse(url).is_err() {
            let url = crate::webhook::redact(url);
            return Err(invalid("nats_url", format!("'{url}' is not a nats:// or tls:// URL")));
        }
    }
    if let Some(url) = &e.http_url {
        let parsed = reqwest::Url::parse(url).ok().filter(|u| u.scheme() == "https" || u.scheme() == "http");
        let Some(parsed) = parsed else {
            let url = crate::webhook::redact(url);
            return Err(invalid("http_url", format!("'{url}' is not an http:// or https:// URL")));
        };
        let loopback = match parsed.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        if parsed.scheme() == "http" && !loopback {
            return Err(invalid(
                "http_url",
                "http:// sends events in clear: only to a loopback address; use https://".into(),
            ));
        }
        match (&e.http_secret, &e.http_secret_env) {
            (Some(s), None) if s.len() >= 16 => {}
            (Some(_), None) => return Err(invalid("http_secret", "use at least 16 characters".into())),
            (None, Some(_)) => {}
            _ => {
                return Err(invalid(
                    "http_secret",
                    "set exactly one of http_secret and http_secret_env (events are signed)".into(),
                ))
            }
        }
    } else if e.http_secret.is_some() || e.http_secret_env.is_some() {
        return Err(invalid("http_secret", "set only with http_url".into()));
    }
    let most = crate::events::MAX_DELIVERY_SECS;
    if !(1..=most).contains(&e.timeout_secs) {
        return Err(invalid("timeout_secs", format!("{} is outside 1..={most}", e.timeout_secs)));
    }
    Ok(())
}

/// `[hubs.registrar]` of the hub `hub` (`at` names it in errors).
fn check_registrar(at: &str, hub: &str, registrar: &crate::config::RegistrarConfig) -> Result<(), ConfigError> {
    use crate::config::RegistrarConfig;
    let invalid = |setting: String, message: String| ConfigError::Invalid { setting, message };
    let url = |what: &str, text: &str| {
        if (text.starts_with("https://") || text.starts_with("http://")) && reqwest::Url::parse(text).is_ok() {
            Ok(())
        } else {
            Err(invalid(format!("{at}.{what}"), format!("'{text}' is not an http:// or https:// URL")))
        }
    };
    let calls = |timeout_secs: u64, attempts: u32| {
        if !(1..=300).contains(&timeout_secs) {
            return Err(invalid(format!("{at}.timeout_secs"), format!("{timeout_secs} is outside 1..=300")));
        }
        if !(1..=10).contains(&attempts) {
            return Err(invalid(format!("{at}.attempts"), format!("{attempts} is outside 1..=10")));
        }
        Ok(())
    };
    match registrar {
        RegistrarConfig::Record => Ok(()),
        RegistrarConfig::Http(r) => {
            url("url", &r.url)?;
            if r.secret.is_some() == r.secret_env.is_some() {
                return Err(invalid(
                    at.into(),
                    "set exactly one of secret and secret_env (the calls are signed)".into(),
                ));
            }
            if r.secret.as_deref().is_some_and(|s| s.len() < 16) {
                return Err(invalid(format!("{at}.secret"), "use at least 16 characters".into()));
            }
            calls(r.timeout_secs, r.attempts)
        }
        RegistrarConfig::Mosquitto(r) => {
            let address: Option<std::net::SocketAddr> = r.address.parse().ok();
            let host = r.address.rsplit_once(':').map(|(h, _)| h).unwrap_or("");
            if host.is_empty() || r.address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                return Err(invalid(format!("{at}.address"), format!("'{}' is not host:port", r.address)));
            }
            let loopback = address.is_some_and(|a| a.ip().is_loopback()) || host.eq_ignore_ascii_case("localhost");
            if !r.tls && !loopback {
                return Err(invalid(
                    format!("{at}.tls"),
                    "plain MQTT carries the admin password in clear: only to a loopback address; set tls = true".into(),
                ));
            }
            if r.tls && r.ca_file.is_none() {
                return Err(invalid(format!("{at}.ca_file"), "set the broker's CA (tls = true)".into()));
            }
            if r.password.is_some() == r.password_env.is_some() {
                return Err(invalid(at.into(), "set exactly one of password and password_env".into()));
            }
            let prefix = r.topic_prefix.trim_matches('/');
            if prefix.is_empty() || prefix.contains(['#', '+']) {
                return Err(invalid(
                    format!("{at}.topic_prefix"),
                    format!("'{}' is not a topic prefix", r.topic_prefix),
                ));
            }
            calls(r.timeout_secs, r.attempts)
        }
        RegistrarConfig::AzureIotHub(r) => {
            if r.connection_string.is_some() == r.connection_string_env.is_some() {
                return Err(invalid(
                    at.into(),
                    "set exactly one of connection_string and connection_string_env".into(),
                ));
            }
            if let Some(text) = &r.connection_string {
                let parsed = dps_proto::connection_string::ServiceConnectionString::parse(text)
                    .map_err(|e| invalid(format!("{at}.connection_string"), e.to_string()))?;
                let host = parsed.host_name.split(':').next().unwrap_or_default();
                if !host.eq_ignore_ascii_case(hub) {
                    return Err(invalid(
                        format!("{at}.connection_string"),
                        format!("its HostName '{host}' is not this hub's host_name '{hub}'"),
                    ));
                }
            }
            if let Some(e) = &r.endpoint {
                url("endpoint", e)?;
                let loopback = reqwest::Url::parse(e).ok().is_some_and(|u| match u.host() {
                    Some(url::Host::Ipv4(a)) => a.is_loopback(),
                    Some(url::Host::Ipv6(a)) => a.is_loopback(),
                    Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                    None => false,
                });
                if e.starts_with("http://") && !loopback {
                    return Err(invalid(
                        format!("{at}.endpoint"),
                        "http:// carries the hub's registry token in clear: only to a loopback address".into(),
                    ));
                }
            }
            calls(r.timeout_secs, r.attempts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SqliteStoreConfig, DEFAULT_CONFIG, PLACEHOLDER_HUB};

    #[test]
    fn printed_default_parses_to_the_default() {
        let parsed = Config::from_toml(DEFAULT_CONFIG, Path::new("default")).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn log_takes_the_short_form_or_a_table_and_metrics_an_address() {
        use crate::config::{LogConfig, LogFormat};
        let short = Config::from_toml("log = \"debug\"\n", Path::new("x")).unwrap();
        assert_eq!(short.log, LogConfig { level: "debug".into(), format: LogFormat::Text });
        let table = Config::from_toml("[log]\nformat = \"json\"\n", Path::new("x")).unwrap();
        assert_eq!(table.log, LogConfig { level: "info".into(), format: LogFormat::Json });
        for bad in ["[log]\nformat = \"xml\"\n", "[log]\nlevl = \"info\"\n", "log = 3\n"] {
            let err = Config::from_toml(bad, Path::new("x")).unwrap_err().to_string();
            assert!(err.contains("text") && err.contains("json"), "{bad:?}: {err}");
        }
        let m = Config::from_toml("[metrics]\nlisten = \"127.0.0.1:9464\"\n", Path::new("x")).unwrap();
        assert_eq!(m.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(Config::from_toml("[metrics]\nlisten = \"localhost\"\n", Path::new("x")).is_err());
        assert_eq!(Config::default().metrics.listen, None, "off by default");
    }

    #[test]
    fn unknown_settings_are_named() {
        let err = Config::from_toml("[device]\nassigning_frist = true\n", Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("assigning_frist") && err.contains("x.toml"), "{err}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, needle) in [
            ("[[hubs]]\nhost_name = \"a\"\nallocation_weight = 0\n", "allocation_weight"),
            ("[[hubs]]\nhost_name = \"a\"\n[[hubs]]\nhost_name = \"A\"\n", "linked twice"),
            ("[allocation]\ndefault_policy = \"custom\"\n", "custom"),
            ("id_scope = \"bad scope\"\n", "id_scope"),
            ("[store]\nsynchronous = \"off\"\n", "synchronous"),
            ("[tls]\ncert = \"a.pem\"\n", "tls"),
            ("[tls]\ngenerated_key = \"rsa\"\n", "ecdsa-p256"),
            ("[[service.policies]]\nname = \"p\"\nprimary_key = \"AAAA\"\nrights = []\n", "16 bytes"),
            ("[[service.policies]]\nname = \"p\"\nprimary_key = \"MDEyMzQ1Njc4OWFiY2RlZg==\"\nrights = [\"Admin\"]\n", "unknown right"),
            ("[[rules]]\nname = \"r\"\n[[rules.cases]]\nwhen = \"payload.(\"\n", "rules[0].cases[0].when"),
            ("[[rules]]\nname = \"r\"\npayload_schema = \"{\\\"type\\\": 5}\"\n[[rules.cases]]\nwhen = \"true\"\n", "JSON Schema"),
            ("[[rules]]\nname = \"r\"\n", "rules[0].cases"),
        ] {
            let err = Config::from_toml(text, Path::new("c.toml")).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn bad_registrars_are_refused() {
        let hub =
            |name: &str, registrar: &str| format!("[[hubs]]\nhost_name = \"{name}\"\n[hubs.registrar]\n{registrar}\n");
        let mqtt =
            "kind = \"mosquitto\"\naddress = \"127.0.0.1:1883\"\ntls = false\nusername = \"a\"\npassword = \"b\"";
        let cs = "HostName=h.test;SharedAccessKeyName=p;SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZg==";
        for (text, needle) in [
            (hub("h", "kind = \"http\"\nurl = \"ftp://x\"\nsecret = \"0123456789abcdef\""), "registrar.url"),
            (hub("h", "kind = \"http\"\nurl = \"http://x/\""), "exactly one of secret and secret_env"),
            (hub("h", "kind = \"http\"\nurl = \"http://x/\"\nsecret = \"short\""), "16 characters"),
            (hub("h", "kind = \"http\"\nurl = \"http://x/\"\nsecret = \"0123456789abcdef\"\nattempts = 0"), "attempts"),
            (hub("h", "kind = \"azure\""), "unknown variant"),
            (
                hub("other.test", &format!("kind = \"azure-iot-hub\"\nconnection_string = \"{cs}\"")),
                "is not this hub's host_name",
            ),
            (
                hub(
                    "h.test",
                    &format!("kind = \"azure-iot-hub\"\nconnection_string = \"{cs}\"\nendpoint = \"http://10.0.0.1\""),
                ),
                "only to a loopback address",
            ),
            (hub("m", &mqtt.replace("127.0.0.1", "10.0.0.1")), "registrar.tls"),
            (hub("m", &mqtt.replace("tls = false", "tls = true")), "registrar.ca_file"),
            (format!("{}{}", hub("m1", mqtt), hub("m2", mqtt)), "already another hub's"),
        ] {
            let err = Config::from_toml(&text, Path::new("c.toml")).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let ok = format!(
            "{}{}",
            hub("h.test", &format!("kind = \"azure-iot-hub\"\nconnection_string = \"{cs}\"")),
            hub("m", mqtt)
        );
        Config::from_toml(&ok, Path::new("c.toml")).unwrap();
    }

    #[test]
    fn the_commented_rules_example_compiles() {
        let start = DEFAULT_CONFIG.find("# [[rules]]").unwrap();
        let block = &DEFAULT_CONFIG[start..];
        let block = &block[..block.find("\n\n").unwrap_or(block.len())];
        let text: String = block.lines().map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l))).collect();
        let config = Config::from_toml(&text, Path::new("example")).unwrap();
        assert_eq!(config.rules[0].name, "by-model");
        assert_eq!(config.rules[0].cases.len(), 2);
        assert!(config.rules[0].payload_schema.is_some());
    }

    #[test]
    fn placeholder_hub_only_without_hubs() {
        assert_eq!(Config::default().linked_hubs()[0].host_name, PLACEHOLDER_HUB);
        let c = Config::from_toml("[[hubs]]\nhost_name = \"h1\"\n", Path::new("c")).unwrap();
        assert_eq!(c.linked_hubs().len(), 1);
        assert_eq!(c.linked_hubs()[0].host_name, "h1");
        assert_eq!(c.linked_hubs()[0].allocation_weight, 1);
    }

    #[test]
    fn the_store_backend_defaults_to_sqlite() {
        let sqlite = |file: &str, synchronous: &str| {
            StoreConfig::Sqlite(SqliteStoreConfig { sqlite_file: file.into(), synchronous: synchronous.into() })
        };
        for (text, expected) in [
            ("", sqlite("dps.sqlite", "full")),
            ("[store]\n", sqlite("dps.sqlite", "full")),
            ("[store]\nsynchronous = \"normal\"\n", sqlite("dps.sqlite", "normal")),
            ("[store]\nbackend = \"sqlite\"\n", sqlite("dps.sqlite", "full")),
            ("[store]\nbackend = \"sqlite\"\nsqlite_file = \"x.db\"\n", sqlite("x.db", "full")),
        ] {
            let config = Config::from_toml(text, Path::new("c.toml")).unwrap();
            assert_eq!(config.store, expected, "{text:?}");
            assert_eq!(config.store.backend(), "sqlite");
        }
        for backend in StoreConfig::BACKENDS {
            let url = if backend == "postgres" { "url = \"postgres://db/dps\"\n" } else { "" };
            let config =
                Config::from_toml(&format!("[store]\nbackend = \"{backend}\"\n{url}"), Path::new("c")).unwrap();
            assert_eq!(config.store.backend(), backend);
        }
    }

    #[test]
    fn the_postgres_backend_is_checked_and_its_url_never_shown() {
        let text = "[store]\nbackend = \"postgres\"\nurl = \"postgres://dps:s3cret@db:5432/dps\"\npool_size = 8\n";
        let config = Config::from_toml(text, Path::new("c.toml")).unwrap();
        config.validate().unwrap();
        assert!(config.store.is_shared());
        let StoreConfig::Postgres(pg) = &config.store else { panic!("postgres") };
        assert_eq!((pg.pool_size, pg.writers, pg.readers, pg.start_timeout_secs), (8, 1, 1, 60));
        assert!(!format!("{config:?}").contains("s3cret"), "Debug output hides the password");
        for (extra, needle) in [
            ("synchronous_commit = \"sometimes\"\n", "store.synchronous_commit"),
            ("writers = 8\n", "store.writers"),
            ("readers = 0\n", "store.readers"),
            ("writers = 4\nreaders = 5\n", "store.readers"),
            ("start_timeout_secs = 0\n", "store.start_timeout_secs"),
        ] {
            let err = Config::from_toml(&format!("{text}{extra}"), Path::new("c.toml")).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        for size in ["1", "1001"] {
            let err = Config::from_toml(&text.replace("pool_size = 8", &format!("pool_size = {size}")), Path::new("c"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("store.pool_size"), "{size}: {err}");
        }
        if std::env::var(crate::config::STORE_URL_ENV).is_err() {
            let err =
                Config::from_toml("[store]\nbackend = \"postgres\"\n", Path::new("c.toml")).unwrap_err().to_string();
            assert!(err.contains("store.url") && err.contains("DPS_STORE_URL"), "{err}");
        }
    }

    #[test]
    fn unknown_store_backends_and_settings_are_named() {
        for (text, needles) in [
            ("[store]\nbackend = \"nope\"\n", &["store.backend", "\"nope\"", "`sqlite`", "line 1"][..]),
            ("[store]\nbackend = \"SQLite\"\n", &["store.backend", "`sqlite`"][..]),
            ("[store]\nbackend = 5\n", &["store.backend", "5", "`sqlite`"][..]),
            ("[store]\nbackend = \"sqlite\"\nsqlite_fil = \"x\"\n", &["store", "sqlite_fil"][..]),
            ("[store]\nsqlite_fil = \"x\"\n", &["store", "sqlite_fil"][..]),
        ] {
            let err = Config::from_toml(text, Path::new("c.toml")).unwrap_err().to_string();
            for needle in needles {
                assert!(err.contains(needle), "{text:?}: {err}");
            }
        }
    }
}
