//! Attestation checks. This version implements symmetric keys (individual keys and
//! group-derived keys, docs/protocol-notes.md §2.3).

use dps_proto::sas::{decode_key, derive_device_key, SasToken};
use dps_proto::service::SymmetricKeyAttestation;

/// Which key of an enrollment validated a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    /// The primary key.
    Primary,
    /// The secondary key.
    Secondary,
}

fn keys(sk: &SymmetricKeyAttestation) -> [(KeySlot, Option<Vec<u8>>); 2] {
    let decode = |k: &Option<String>| k.as_deref().and_then(|k| decode_key(k).ok());
    [(KeySlot::Primary, decode(&sk.primary_key)), (KeySlot::Secondary, decode(&sk.secondary_key))]
}

/// Checks a token against an individual enrollment's keys.
pub fn verify_individual(token: &SasToken, sk: &SymmetricKeyAttestation) -> Option<KeySlot> {
    keys(sk).into_iter().find_map(|(slot, key)| key.filter(|k| token.is_signed_by(k)).map(|_| slot))
}

/// Checks a token against the device keys derived from a group's keys for `registration_id`
/// (exactly as the device spelled it).
pub fn verify_group(token: &SasToken, sk: &SymmetricKeyAttestation, registration_id: &str) -> Option<KeySlot> {
    keys(sk).into_iter().find_map(|(slot, key)| {
        key.map(|k| derive_device_key(&k, registration_id)).filter(|k| token.is_signed_by(k)).map(|_| slot)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;
    use dps_proto::sas::build_token;

    fn attestation(p: &[u8], s: &[u8]) -> SymmetricKeyAttestation {
        SymmetricKeyAttestation { primary_key: Some(BASE64.encode(p)), secondary_key: Some(BASE64.encode(s)) }
    }

    #[test]
    fn primary_and_secondary_individual_keys() {
        let sk = attestation(b"primary-key-0123456789", b"secondary-key-0123456789");
        let t = |k: &[u8]| SasToken::parse(&build_token("s/registrations/d", k, 10, None)).unwrap();
        assert_eq!(verify_individual(&t(b"primary-key-0123456789"), &sk), Some(KeySlot::Primary));
        assert_eq!(verify_individual(&t(b"secondary-key-0123456789"), &sk), Some(KeySlot::Secondary));
        assert_eq!(verify_individual(&t(b"wrong"), &sk), None);
        assert_eq!(verify_individual(&t(b"x"), &SymmetricKeyAttestation::default()), None);
    }

    #[test]
    fn group_derived_keys() {
        let sk = attestation(b"group-primary-0123456789", b"group-secondary-0123456789");
        let derived = derive_device_key(b"group-secondary-0123456789", "dev-7");
        let token = SasToken::parse(&build_token("s/registrations/dev-7", &derived, 10, None)).unwrap();
        assert_eq!(verify_group(&token, &sk, "dev-7"), Some(KeySlot::Secondary));
        // A member key is bound to its registration ID.
        assert_eq!(verify_group(&token, &sk, "dev-8"), None);
        // The group key itself is not a device key.
        let raw =
            SasToken::parse(&build_token("s/registrations/dev-7", b"group-primary-0123456789", 10, None)).unwrap();
        assert_eq!(verify_group(&raw, &sk, "dev-7"), None);
    }
}
