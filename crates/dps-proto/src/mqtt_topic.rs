//! The DPS MQTT naming: the CONNECT user name, the request topics devices publish to, and the
//! response topics DPS publishes (docs/protocol-notes.md §4.1, §4.4, §4.5).

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The one topic filter devices subscribe to.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";

const REGISTER_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/?";
const POLL_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?";

/// The parts of a CONNECT user name:
/// `{idScope}/registrations/{registrationId}/api-version={v}[&ClientVersion={ua}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    /// ID scope.
    pub id_scope: String,
    /// Registration ID.
    pub registration_id: String,
    /// `api-version`, when present.
    pub api_version: Option<String>,
}

/// Why a user name is not a DPS user name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the MQTT user name '{username}' is not '{{idScope}}/registrations/{{registrationId}}/api-version=…': {reason}"
)]
pub struct UsernameError {
    /// The user name (truncated to 200 characters).
    pub username: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Parses a CONNECT user name. The query part is split on `&`; `ClientVersion` is neither
/// required nor checked (clients encode it differently).
pub fn parse_username(username: &str) -> Result<Username, UsernameError> {
    let err = |reason| UsernameError { username: username.chars().take(200).collect(), reason };
    let mut parts = username.splitn(4, '/');
    let id_scope = parts.next().filter(|s| !s.is_empty()).ok_or_else(|| err("the ID scope is missing"))?;
    if parts.next() != Some("registrations") {
        return Err(err("the second part must be 'registrations'"));
    }
    let registration_id =
        parts.next().filter(|s| !s.is_empty()).ok_or_else(|| err("the registration ID is missing"))?;
    let query = parts.next().unwrap_or("");
    let api_version = query_pairs(query).find(|(k, _)| k.eq_ignore_ascii_case("api-version")).map(|(_, v)| v);
    let registration_id = percent_decode_str(registration_id)
        .decode_utf8()
        .map_err(|_| err("the registration ID is not UTF-8"))?
        .into_owned();
    Ok(Username { id_scope: id_scope.to_string(), registration_id, api_version })
}

fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        let dec = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        (dec(k), dec(v))
    })
}

/// A request a device publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// `$dps/registrations/PUT/iotdps-register/?$rid={rid}`.
    Register {
        /// Request ID, decoded.
        rid: String,
    },
    /// `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}`.
    Poll {
        /// Request ID, decoded.
        rid: String,
        /// Operation ID, decoded.
        operation_id: String,
    },
}

/// Why a publish topic is not a DPS request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not one of the two request topics.
    #[error("'{0}' is not a DPS request topic ($dps/registrations/PUT/iotdps-register/?$rid=… or $dps/registrations/GET/iotdps-get-operationstatus/?$rid=…&operationId=…)")]
    Unknown(String),
    /// A request topic without `$rid`.
    #[error("the topic has no $rid")]
    MissingRid,
    /// A poll without `operationId`.
    #[error("the operation status topic has no operationId")]
    MissingOperationId,
}

/// Parses the topic of a device publish.
pub fn parse_request_topic(topic: &str) -> Result<DeviceRequest, TopicError> {
    let find = |query: &str, key: &str| query_pairs(query).find(|(k, _)| k == key).map(|(_, v)| v);
    if let Some(query) = strip_prefix_ignore_case(topic, REGISTER_PREFIX) {
        let rid = find(query, "$rid").ok_or(TopicError::MissingRid)?;
        return Ok(DeviceRequest::Register { rid });
    }
    if let Some(query) = strip_prefix_ignore_case(topic, POLL_PREFIX) {
        let rid = find(query, "$rid").ok_or(TopicError::MissingRid)?;
        let operation_id = find(query, "operationId").ok_or(TopicError::MissingOperationId)?;
        return Ok(DeviceRequest::Poll { rid, operation_id });
    }
    Err(TopicError::Unknown(topic.chars().take(200).collect()))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// Characters escaped in a `$rid` echoed back: everything but `A–Z a–z 0–9 - . _ ~`, so that
/// no `&`, `$`, `/` or `=` can break the clients' topic parsers.
const RID_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The response topic: `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={secs}]`.
/// `$rid` comes first (C# requires it) and `retry-after` is lower case (Python requires it).
pub fn response_topic(status: u16, rid: &str, retry_after: Option<u64>) -> String {
    let rid = utf8_percent_encode(rid, RID_ESCAPE);
    match retry_after {
        Some(secs) => format!("$dps/registrations/res/{status}/?$rid={rid}&retry-after={secs}"),
        None => format!("$dps/registrations/res/{status}/?$rid={rid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_username_variant_parses() {
        for (name, username) in [
            ("C", "0ne00000A0A/registrations/dev-1/api-version=2021-06-01&ClientVersion=1.15.0"),
            ("C#", "0ne00000A0A/registrations/dev-1/api-version=2019-03-31&ClientVersion=Microsoft.Azure.Devices.Provisioning.Client%2F1.19.0%20%28.NET%29"),
            ("Node", "0ne00000A0A/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-provisioning-device-mqtt%2F1.9.0%20(node%20v20)"),
            ("Python", "0ne00000A0A/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%28python%3B%29"),
            ("Java", "0ne00000A0A/registrations/dev-1/api-version=2019-03-31&ClientVersion=2019-03-31"),
            ("Embedded C", "0ne00000A0A/registrations/dev-1/api-version=2019-03-31"),
            ("raw UA with spaces and slashes", "0ne00000A0A/registrations/dev-1/api-version=2019-03-31&ClientVersion=my agent/1.0 (x/y)"),
        ] {
            let u = parse_username(username).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(u.id_scope, "0ne00000A0A", "{name}");
            assert_eq!(u.registration_id, "dev-1", "{name}");
            assert!(u.api_version.is_some(), "{name}");
        }
        // Without any query: still a user name; the api-version is optional here.
        assert_eq!(parse_username("s/registrations/d").unwrap().api_version, None);
    }

    #[test]
    fn bad_usernames_say_why() {
        for (username, needle) in [
            ("", "ID scope"),
            ("scope", "registrations"),
            ("scope/devices/d/api-version=1", "registrations"),
            ("scope/registrations/", "registration ID"),
        ] {
            let err = parse_username(username).unwrap_err().to_string();
            assert!(err.contains(needle), "{username}: {err}");
        }
    }

    #[test]
    fn request_topics() {
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=1").unwrap(),
            DeviceRequest::Register { rid: "1".into() }
        );
        // Python quotes the values.
        assert_eq!(
            parse_request_topic(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=a%20b&operationId=4.abc.0%2E1"
            )
            .unwrap(),
            DeviceRequest::Poll { rid: "a b".into(), operation_id: "4.abc.0.1".into() }
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2"),
            Err(TopicError::MissingOperationId)
        );
        assert_eq!(parse_request_topic("$dps/registrations/PUT/iotdps-register/?x=1"), Err(TopicError::MissingRid));
        assert!(matches!(parse_request_topic("devices/x/messages/events/"), Err(TopicError::Unknown(_))));
    }

    #[test]
    fn response_topics_satisfy_every_client_parser() {
        assert_eq!(response_topic(202, "1", Some(3)), "$dps/registrations/res/202/?$rid=1&retry-after=3");
        assert_eq!(response_topic(200, "1", None), "$dps/registrations/res/200/?$rid=1");
        // Python splits on '$': exactly two, whatever the rid.
        let t = response_topic(401, "a$b&c=d/e f", None);
        assert_eq!(t.matches('$').count(), 2, "{t}");
        assert_eq!(t, "$dps/registrations/res/401/?$rid=a%24b%26c%3Dd%2Fe%20f");
    }
}
