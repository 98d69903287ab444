//! The registration a DPS AMQP name addresses (docs/protocol-notes.md §5.1, §5.3): link
//! addresses and the SASL PLAIN authentication ID are `{idScope}/registrations/{registrationId}`,
//! which the SDKs spell with a leading `/` (Java) or as `amqps://{host}/…` (C). The host is not
//! checked (clients send the DPS host, `host:port`, or an IP).

use thiserror::Error;

/// The ID scope and registration ID an AMQP address names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationAddress {
    /// The ID scope.
    pub id_scope: String,
    /// The registration ID.
    pub registration_id: String,
}

impl RegistrationAddress {
    /// Whether `other` names the same registration (scope and ID compared without case, as
    /// DPS does).
    pub fn same_as(&self, id_scope: &str, registration_id: &str) -> bool {
        self.id_scope.eq_ignore_ascii_case(id_scope) && self.registration_id.eq_ignore_ascii_case(registration_id)
    }
}

/// An address that names no registration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "address '{shown}' is not {{idScope}}/registrations/{{registrationId}} (optionally after '/' or 'amqps://host/')"
)]
pub struct AddressError {
    shown: String,
}

/// Parses an address in any of the SDKs' spellings. The scope and ID are returned as sent;
/// their grammar is the engine's to check.
pub fn parse(address: &str) -> Result<RegistrationAddress, AddressError> {
    let bad = || AddressError { shown: address.chars().take(160).collect() };
    let mut rest = address;
    for scheme in ["amqps://", "amqp://", "wss://", "ws://"] {
        if let Some(after) =
            rest.get(..scheme.len()).filter(|p| p.eq_ignore_ascii_case(scheme)).and(rest.get(scheme.len()..))
        {
            rest = after;
            // The host (and port), up to the first '/'.
            rest = rest.split_once('/').map(|(_, r)| r).ok_or_else(bad)?;
            break;
        }
    }
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(scope), Some(kind), Some(id), None)
            if !scope.is_empty() && kind.eq_ignore_ascii_case("registrations") && !id.is_empty() =>
        {
            Ok(RegistrationAddress { id_scope: scope.to_string(), registration_id: id.to_string() })
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(a: &str) -> (String, String) {
        let r = parse(a).unwrap();
        (r.id_scope, r.registration_id)
    }

    #[test]
    fn every_sdk_spelling_names_the_registration() {
        let want = ("0ne00000A0A".to_string(), "dev-1".to_string());
        assert_eq!(ok("0ne00000A0A/registrations/dev-1"), want, "Node, C#");
        assert_eq!(ok("/0ne00000A0A/registrations/dev-1"), want, "Java");
        assert_eq!(ok("amqps://global.azure-devices-provisioning.net/0ne00000A0A/registrations/dev-1"), want, "C");
        assert_eq!(ok("AMQPS://localhost:5671/0ne00000A0A/Registrations/dev-1"), want);
    }

    #[test]
    fn other_addresses_are_refused_with_what_was_sent() {
        for a in [
            "",
            "/",
            "0ne00000A0A",
            "0ne00000A0A/registrations",
            "0ne00000A0A/registrations/",
            "0ne/devices/x",
            "a/registrations/b/c",
            "amqps://host-only",
            "//registrations/x",
            "amqps:/é",
        ] {
            let e = parse(a).unwrap_err().to_string();
            assert!(e.contains(&format!("'{a}'")), "{a}: {e}");
        }
        let long = "x".repeat(5000);
        assert!(parse(&long).unwrap_err().to_string().len() < 400, "the echo is bounded");
    }
}
