//! Service connection strings (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`,
//! docs/protocol-notes.md §2.5), as `dev-credentials.json` and the Azure portal give them: `;`-separated
//! `name=value` pairs (the value may contain `=`, as base64 keys do), names case-insensitive,
//! each at most once.

use crate::sas::decode_key;

/// A parsed service connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceConnectionString {
    /// `HostName` (may carry a port).
    pub host_name: String,
    /// `SharedAccessKeyName`: the policy.
    pub key_name: String,
    /// `SharedAccessKey`, decoded.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ServiceConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

/// Why a connection string cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    /// A part is not `name=value`.
    #[error("the connection string has a part without '=' (expected name=value pairs separated by ';')")]
    Malformed,
    /// A name appears twice.
    #[error("the connection string names {0} more than once")]
    Duplicate(String),
    /// A required part is missing or empty.
    #[error("the connection string has no {0}")]
    Missing(&'static str),
    /// The key is not base64.
    #[error("the connection string's SharedAccessKey is not valid base64")]
    BadKey,
    /// Too long to be a connection string.
    #[error("the connection string is longer than 4096 characters")]
    TooLong,
}

impl ServiceConnectionString {
    /// Parses the text; unknown parts are ignored.
    pub fn parse(text: &str) -> Result<Self, ConnectionStringError> {
        if text.len() > 4096 {
            return Err(ConnectionStringError::TooLong);
        }
        let (mut host, mut name, mut key) = (None, None, None);
        for part in text.trim().split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or(ConnectionStringError::Malformed)?;
            let slot = match k.trim().to_ascii_lowercase().as_str() {
                "hostname" => &mut host,
                "sharedaccesskeyname" => &mut name,
                "sharedaccesskey" => &mut key,
                _ => continue,
            };
            if slot.replace(v.trim().to_string()).is_some() {
                return Err(ConnectionStringError::Duplicate(k.trim().chars().take(32).collect()));
            }
        }
        let required =
            |v: Option<String>, what| v.filter(|v| !v.is_empty()).ok_or(ConnectionStringError::Missing(what));
        let host_name = required(host, "HostName")?;
        let key_name = required(name, "SharedAccessKeyName")?;
        let key = decode_key(&required(key, "SharedAccessKey")?).map_err(|_| ConnectionStringError::BadKey)?;
        Ok(Self { host_name, key_name, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_dps_and_azure_print() {
        let c = ServiceConnectionString::parse(
            "HostName=localhost:8443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=MDEyMzQ1Njc4OWFiY2RlZg==",
        )
        .unwrap();
        assert_eq!(c.host_name, "localhost:8443");
        assert_eq!(c.key_name, "provisioningserviceowner");
        assert_eq!(c.key, b"0123456789abcdef");
        let c = ServiceConnectionString::parse(" hostname=h ; sharedaccesskeyname=p;SharedAccessKey=AAAA;Other=1; ")
            .unwrap();
        assert_eq!((c.host_name.as_str(), c.key_name.as_str()), ("h", "p"));
        assert!(!format!("{c:?}").contains("AAAA"), "Debug hides the key");
    }

    #[test]
    fn refuses_with_a_reason() {
        use ConnectionStringError::*;
        for (text, want) in [
            ("", Missing("HostName")),
            ("HostName=h;SharedAccessKeyName=p", Missing("SharedAccessKey")),
            ("HostName=h;SharedAccessKeyName=;SharedAccessKey=AAAA", Missing("SharedAccessKeyName")),
            ("HostName=h;SharedAccessKeyName=p;SharedAccessKey=not base64!", BadKey),
            ("HostName=h;HostName=i;SharedAccessKeyName=p;SharedAccessKey=AAAA", Duplicate("HostName".into())),
            ("HostName", Malformed),
        ] {
            assert_eq!(ServiceConnectionString::parse(text), Err(want), "{text}");
        }
        assert_eq!(ServiceConnectionString::parse(&"x".repeat(5000)), Err(TooLong));
    }
}
