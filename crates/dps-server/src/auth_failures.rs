//! Failed authentications per source address (`[throttling] failed_auth_*`): once an address
//! has used its allowance, its device and service requests are answered `429` with
//! `Retry-After` (MQTT: CONNACK 3) without being checked, until the bucket refills. IPv6
//! addresses count per /64, the block one subscriber usually gets.

use std::net::IpAddr;

use dps_core::throttle::{Buckets, RateLimit};
use dps_core::Error;
use dps_proto::error::ErrorCode;

use crate::metrics::Transport;
use crate::reply::Refusal;
use crate::source::address_key;

/// The per-address buckets; `None` inside when the limit is off.
#[derive(Debug)]
pub struct AuthFailures {
    buckets: Option<Buckets<IpAddr>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl AuthFailures {
    /// Buckets for a limit, or none.
    pub fn new(limit: Option<RateLimit>) -> Self {
        Self { buckets: limit.map(Buckets::new) }
    }

    /// Whether `ip` may still try: `Err` with a 429 once its failures are used up.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let Some(b) = &self.buckets else { return Ok(()) };
        b.check(&address_key(ip), now_ms()).map_err(|retry_after| {
            dps_core::info_limited!("auth-throttled", source = %ip, retry_after, "too many failed authentications from this address");
            Refusal {
                code: ErrorCode::THROTTLED,
                message: format!("too many failed authentications from this address; retry after {retry_after} s"),
                retry_after: Some(retry_after),
            }
        })
    }

    /// Counts a failed authentication from `ip` (`api`: `device` or `service`).
    pub fn record(&self, ip: IpAddr, transport: Transport, api: &'static str) {
        crate::metrics::auth_rejected(transport, api);
        if let Some(b) = &self.buckets {
            let _ = b.take(&address_key(ip), now_ms());
        }
    }

    /// Counts `result` if it is a device's authentication failure; passes it on.
    pub fn observe<T>(&self, ip: IpAddr, transport: Transport, result: Result<T, Error>) -> Result<T, Error> {
        if matches!(result, Err(Error::Unauthorized(_))) {
            self.record(ip, transport, "device");
        }
        result
    }
}
