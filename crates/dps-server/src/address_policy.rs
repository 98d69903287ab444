//! Where custom allocation webhooks may be called: allow and deny lists of host names and
//! CIDRs (`[allocation] webhook_allow`, `webhook_deny`), applied to the host of the URL when an
//! enrollment is written and to every address its name resolves to at call time (so a name that
//! resolves to a metadata address is refused too). The default denies link-local, cloud
//! metadata, unspecified, multicast and broadcast addresses; loopback and private networks are
//! allowed, where self-hosted webhooks usually live.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The default `webhook_deny`.
pub const DEFAULT_DENY: [&str; 13] = [
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    "168.63.129.16/32",
    "192.0.0.192/32",
    "metadata.google.internal",
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
    "255.255.255.255/32",
    "fec0::/10",
];

/// One list entry: a network, an exact host name, or `*.suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Net(IpNet),
    Host(String),
    Suffix(String),
}

impl Entry {
    fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("an empty entry".into());
        }
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(Entry::Net(net.trunc()));
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Entry::Net(IpNet::from(canonical(ip))));
        }
        let host = t.to_ascii_lowercase();
        if host.contains(['/', ':', ' ']) {
            return Err(format!("'{t}' is neither a CIDR (10.0.0.0/8), an address, a host name nor *.suffix"));
        }
        match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() => Ok(Entry::Suffix(format!(".{suffix}"))),
            Some(_) => Err(format!("'{t}' names no domain")),
            None => Ok(Entry::Host(host.trim_end_matches('.').to_string())),
        }
    }

    fn matches_host(&self, host: &str) -> bool {
        match self {
            Entry::Host(h) => h == host,
            Entry::Suffix(s) => host.ends_with(s.as_str()),
            Entry::Net(_) => false,
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        matches!(self, Entry::Net(net) if net.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:169.254.169.254`) are judged as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    allow: Vec<Entry>,
    deny: Vec<Entry>,
}

impl AddressPolicy {
    /// Parses the lists; the error names the bad entry.
    pub fn new(allow: &[String], deny: &[String]) -> Result<Self, String> {
        let parse = |list: &[String], name: &str| {
            list.iter()
                .map(|e| Entry::parse(e).map_err(|m| format!("allocation.{name}: {m}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self { allow: parse(allow, "webhook_allow")?, deny: parse(deny, "webhook_deny")? })
    }

    /// Whether a host name (lower case, no trailing dot) may be called at all, before
    /// resolution; `Err` says which list refused it.
    pub fn check_host(&self, host: &str) -> Result<(), String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return self.check_ip(&host, ip);
        }
        if self.deny.iter().any(|e| e.matches_host(&host)) {
            return Err(format!("host '{host}' is in allocation.webhook_deny"));
        }
        Ok(())
    }

    /// Whether `ip`, which `host` resolved to (or is), may be called.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.deny.iter().any(|e| e.matches_ip(ip) || e.matches_host(&host)) {
            return Err(format!("address {ip} of '{host}' is in allocation.webhook_deny"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|e| e.matches_ip(ip) || e.matches_host(&host)) {
            return Err(format!("address {ip} of '{host}' is not in allocation.webhook_allow"));
        }
        Ok(())
    }
}

/// A webhook call refused by the policy (so the client can tell it from a network failure).
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A DNS resolver for the webhook client that keeps only the addresses the policy permits.
pub struct PolicyResolver {
    /// The policy.
    pub policy: Arc<AddressPolicy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            policy.check_host(&host).map_err(|m| Box::new(Refused(m)) as Box<dyn std::error::Error + Send + Sync>)?;
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut reasons = Vec::new();
            let permitted: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check_ip(&host, a.ip()) {
                    Ok(()) => true,
                    Err(m) => {
                        reasons.push(m);
                        false
                    }
                })
                .collect();
            if permitted.is_empty() {
                let why =
                    if reasons.is_empty() { format!("'{host}' resolves to no address") } else { reasons.join("; ") };
                return Err(Box::new(Refused(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> AddressPolicy {
        let deny: Vec<String> = DEFAULT_DENY.iter().map(|s| s.to_string()).collect();
        AddressPolicy::new(&[], &deny).unwrap()
    }

    #[test]
    fn the_default_refuses_metadata_and_link_local_only() {
        let p = default_policy();
        for refused in [
            "169.254.169.254",
            "[fd00:ec2::254]",
            "fe80::1",
            "0.0.0.0",
            "::",
            "metadata.google.internal",
            "168.63.129.16",
        ] {
            assert!(p.check_host(refused).is_err(), "{refused}");
        }
        let mapped: IpAddr = "::ffff:169.254.169.254".parse().unwrap();
        assert!(p.check_ip("x.example", mapped).is_err(), "IPv4-mapped");
        for allowed in ["127.0.0.1", "10.1.2.3", "192.168.0.10", "[::1]", "alloc.example.net", "localhost"] {
            assert!(p.check_host(allowed).is_ok(), "{allowed}");
        }
    }

    #[test]
    fn allow_lists_and_host_patterns() {
        let p = AddressPolicy::new(&["10.0.0.0/8".into(), "*.alloc.example".into()], &["bad.alloc.example".into()])
            .unwrap();
        assert!(p.check_ip("fn.example", "10.9.9.9".parse().unwrap()).is_ok());
        assert!(p.check_ip("fn.example", "192.168.1.1".parse().unwrap()).unwrap_err().contains("webhook_allow"));
        assert!(p.check_ip("a.alloc.example", "192.168.1.1".parse().unwrap()).is_ok(), "allowed by name");
        assert!(p.check_host("bad.alloc.example").unwrap_err().contains("webhook_deny"));
        assert!(p.check_ip("BAD.alloc.example.", "10.0.0.1".parse().unwrap()).is_err(), "case and trailing dot");
        for bad in ["", "10.0.0.0/33", "*.", "a b", "http://x/"] {
            assert!(AddressPolicy::new(&[bad.into()], &[]).is_err(), "{bad:?}");
        }
    }
}
