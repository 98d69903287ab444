//! File descriptors: every connection is one. At start the soft `RLIMIT_NOFILE` is raised to the
//! hard limit (or to what the configured caps need, when the process may raise the hard limit),
//! unset connection caps are fitted to what is left after a reserve (store, webhooks, listeners),
//! and caps that were set but cannot fit are refused with the numbers and what to change.

use crate::config::{Config, AMQP_MAX_CONNECTIONS, HTTPS_MAX_CONNECTIONS, MQTT_MAX_CONNECTIONS};
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
    /// AMQP connections at most (0 when AMQP is off).
    pub amqp: usize,
    /// The descriptor limit of the process after raising it.
    pub limit: u64,
}

/// One listener's cap: as set, or `None` to be fitted; `default` is the most it is fitted to.
struct Cap {
    set: Option<usize>,
    on: bool,
    default: usize,
}

fn caps(config: &Config) -> [Cap; 3] {
    [
        Cap { set: config.limits.max_connections, on: true, default: HTTPS_MAX_CONNECTIONS },
        Cap { set: config.mqtt.max_connections, on: config.mqtt.enabled, default: MQTT_MAX_CONNECTIONS },
        Cap { set: config.amqp.max_connections, on: config.amqp.enabled, default: AMQP_MAX_CONNECTIONS },
    ]
}

/// Fits `config`'s connection caps to a descriptor `limit`: set caps are kept (or refused
/// when they do not fit), unset ones share what is left (devices hold MQTT and AMQP
/// connections for long, so HTTPS gets a fifth and the connection transports split the rest),
/// each at most its default.
pub fn fit(config: &Config, limit: u64) -> Result<Plan, ServerError> {
    let reserve = RESERVE + config.allocation.webhook_max_in_flight as u64;
    let budget = limit.saturating_sub(reserve);
    let [https, mqtt, amqp] = caps(config);
    let set = |c: &Cap| c.set.filter(|_| c.on);
    let fixed: u64 = [&https, &mqtt, &amqp].iter().map(|c| set(c).unwrap_or(0) as u64).sum();
    if fixed > budget {
        let show = |c: &Cap| set(c).map_or_else(|| "unset".to_string(), |n| n.to_string());
        return Err(ServerError::Bootstrap(format!(
            "limits.max_connections ({}) + mqtt.max_connections ({}) + amqp.max_connections ({}) + {reserve} descriptors for the store, listeners and allocation.webhook_max_in_flight need {} file descriptors, but this process may open {limit} (RLIMIT_NOFILE hard limit): lower those settings (or leave them unset to fit), or raise the limit (ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=)",
            show(&https),
            show(&mqtt),
            show(&amqp),
            fixed + reserve
        )));
    }
    let left = (budget - fixed) as usize;
    let connection_transports = [&mqtt, &amqp].iter().filter(|c| c.on && c.set.is_none()).count();
    let https_cap = match https.set {
        Some(h) => h,
        None if connection_transports == 0 => left.min(HTTPS_MAX_CONNECTIONS),
        None => (left / 5).min(HTTPS_MAX_CONNECTIONS),
    };
    let after_https = if https.set.is_some() { left } else { left - https_cap };
    let share = |c: &Cap| match (c.on, set(c)) {
        (false, _) => 0,
        (true, Some(n)) => n,
        (true, None) => (after_https / connection_transports.max(1)).min(c.default),
    };
    let (mqtt_cap, amqp_cap) = (share(&mqtt), share(&amqp));
    if https_cap == 0 || (mqtt.on && mqtt_cap == 0) || (amqp.on && amqp_cap == 0) {
        return Err(ServerError::Bootstrap(format!(
            "this process may open only {limit} file descriptors (RLIMIT_NOFILE), which leaves no room for connections after {reserve} reserved; raise the limit (ulimit -n)"
        )));
    }
    Ok(Plan { https: https_cap, mqtt: mqtt_cap, amqp: amqp_cap, limit })
}

/// Raises the soft descriptor limit as far as it goes (to the hard limit; further, to what set
/// caps need, when the process may raise the hard limit) and returns it.
pub fn raise_limit(config: &Config) -> u64 {
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let wanted = RESERVE
        + config.allocation.webhook_max_in_flight as u64
        + caps(config).iter().filter(|c| c.on).map(|c| c.set.unwrap_or(c.default) as u64).sum::<u64>();
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
        assert_eq!(plan.mqtt, (left - left / 5) / 2);
        assert_eq!(plan.amqp, (left - left / 5) / 2, "MQTT and AMQP split the rest");
        let big = fit(&config(None, None), 1_048_576).unwrap();
        assert_eq!(
            (big.https, big.mqtt, big.amqp),
            (HTTPS_MAX_CONNECTIONS, MQTT_MAX_CONNECTIONS, AMQP_MAX_CONNECTIONS),
            "at most the defaults"
        );
        let one = fit(&config(Some(1000), None), 20_000).unwrap();
        assert_eq!((one.https, one.mqtt), (1000, (20_000 - RESERVE as usize - 256 - 1000) / 2));
        let mut no_amqp = config(None, None);
        no_amqp.amqp.enabled = false;
        let plan = fit(&no_amqp, 20_000).unwrap();
        assert_eq!((plan.mqtt, plan.amqp), (left - left / 5, 0), "AMQP off: MQTT gets the rest");
    }

    #[test]
    fn set_caps_that_do_not_fit_are_refused_with_the_numbers() {
        let e = fit(&config(Some(10_000), Some(50_000)), 20_000).unwrap_err().to_string();
        assert!(
            e.contains("limits.max_connections (10000) + mqtt.max_connections (50000) + amqp.max_connections (unset)"),
            "{e}"
        );
        assert!(e.contains("need 60384") && e.contains("may open 20000"), "{e}");
        assert!(fit(&config(None, None), 300).is_err(), "nothing left");
        let mut off = config(None, Some(1_000_000));
        off.mqtt.enabled = false;
        assert_eq!(fit(&off, 20_000).unwrap().mqtt, 0, "MQTT off: its cap does not count");
    }
}
