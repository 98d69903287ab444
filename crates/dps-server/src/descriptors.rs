//! File descriptors: every connection is one. At start the soft `RLIMIT_NOFILE` is raised to the
//! hard limit (or to what the configured caps need, when the process may raise the hard limit),
//! unset connection caps are fitted to what is left after a reserve (store, webhooks, listeners),
//! and caps that were set but cannot fit are refused with the numbers and what to change.

use crate::config::{Config, HTTPS_MAX_CONNECTIONS, MQTT_MAX_CONNECTIONS};
use crate::error::ServerError;

/// Descriptors kept for everything but client connections, besides the webhook calls in
/// flight: the store's files, the listeners, standard streams, TLS files being read, the spare
/// the accept loop holds.
pub const RESERVE: u64 = 128;

/// The caps in force and the limit they were fitted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// HTTPS connections at most.
    pub https: usize,
    /// MQTT connections at most (0 when MQTT is off).
    pub mqtt: usize,
    /// The descriptor limit of the process after raising it.
    pub limit: u64,
}

/// Fits `config`'s connection caps to a descriptor `limit`: set caps are kept (or refused
/// when they do not fit), unset ones share what is left (MQTT devices hold connections for
/// long, so MQTT gets four fifths), each at most its default.
pub fn fit(config: &Config, limit: u64) -> Result<Plan, ServerError> {
    let reserve = RESERVE + config.allocation.webhook_max_in_flight as u64;
    let mqtt_on = config.mqtt.enabled;
    let budget = limit.saturating_sub(reserve);
    let (set_https, set_mqtt) = (config.limits.max_connections, config.mqtt.max_connections.filter(|_| mqtt_on));
    let fixed = set_https.unwrap_or(0) as u64 + set_mqtt.unwrap_or(0) as u64;
    if fixed > budget {
        return Err(ServerError::Bootstrap(format!(
            "limits.max_connections ({}) + mqtt.max_connections ({}) + {reserve} descriptors for the store, listeners and allocation.webhook_max_in_flight need {} file descriptors, but this process may open {limit} (RLIMIT_NOFILE hard limit): lower those settings (or leave them unset to fit), or raise the limit (ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=)",
            set_https.map_or_else(|| "unset".to_string(), |n| n.to_string()),
            set_mqtt.map_or_else(|| "unset".to_string(), |n| n.to_string()),
            fixed + reserve
        )));
    }
    let left = (budget - fixed) as usize;
    let (https, mqtt) = match (set_https, set_mqtt, mqtt_on) {
        (Some(h), Some(m), _) => (h, m),
        (Some(h), None, true) => (h, left.min(MQTT_MAX_CONNECTIONS)),
        (Some(h), None, false) => (h, 0),
        (None, Some(m), _) => (left.min(HTTPS_MAX_CONNECTIONS), m),
        (None, None, true) => {
            let https = (left / 5).min(HTTPS_MAX_CONNECTIONS);
            (https, (left - https).min(MQTT_MAX_CONNECTIONS))
        }
        (None, None, false) => (left.min(HTTPS_MAX_CONNECTIONS), 0),
    };
    if https == 0 || (mqtt_on && mqtt == 0) {
        return Err(ServerError::Bootstrap(format!(
            "this process may open only {limit} file descriptors (RLIMIT_NOFILE), which leaves no room for connections after {reserve} reserved; raise the limit (ulimit -n)"
        )));
    }
    Ok(Plan { https, mqtt, limit })
}

/// Raises the soft descriptor limit as far as it goes (to the hard limit; further, to what set
/// caps need, when the process may raise the hard limit) and returns it.
pub fn raise_limit(config: &Config) -> u64 {
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let wanted = RESERVE
        + config.allocation.webhook_max_in_flight as u64
        + config.limits.max_connections.unwrap_or(HTTPS_MAX_CONNECTIONS) as u64
        + if config.mqtt.enabled { config.mqtt.max_connections.unwrap_or(MQTT_MAX_CONNECTIONS) as u64 } else { 0 };
    if soft < wanted && rlimit::setrlimit(rlimit::Resource::NOFILE, wanted, wanted).is_ok() {
        return wanted;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(https: Option<usize>, mqtt: Option<usize>) -> Config {
        let mut c = Config::default();
        c.limits.max_connections = https;
        c.mqtt.max_connections = mqtt;
        c
    }

    #[test]
    fn unset_caps_fit_the_limit() {
        let plan = fit(&config(None, None), 20_000).unwrap();
        let left = 20_000 - RESERVE as usize - 256;
        assert_eq!(plan.https, left / 5);
        assert_eq!(plan.mqtt, left - left / 5);
        let big = fit(&config(None, None), 1_048_576).unwrap();
        assert_eq!((big.https, big.mqtt), (HTTPS_MAX_CONNECTIONS, MQTT_MAX_CONNECTIONS), "at most the defaults");
        let one = fit(&config(Some(1000), None), 20_000).unwrap();
        assert_eq!((one.https, one.mqtt), (1000, 20_000 - RESERVE as usize - 256 - 1000));
    }

    #[test]
    fn set_caps_that_do_not_fit_are_refused_with_the_numbers() {
        let e = fit(&config(Some(10_000), Some(50_000)), 20_000).unwrap_err().to_string();
        assert!(e.contains("limits.max_connections (10000) + mqtt.max_connections (50000)"), "{e}");
        assert!(e.contains("need 60384") && e.contains("may open 20000"), "{e}");
        assert!(fit(&config(None, None), 300).is_err(), "nothing left");
        let mut off = config(None, Some(1_000_000));
        off.mqtt.enabled = false;
        assert_eq!(fit(&off, 20_000).unwrap().mqtt, 0, "MQTT off: its cap does not count");
    }
}
