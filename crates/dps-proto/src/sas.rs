//! Shared access signature (SAS) tokens: parsing, signing, verification and key derivation.
//!
//! Grammar (docs/protocol-notes.md §2.1): `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`, fields in any
//! order. The signature is `base64(HMAC-SHA256(key, sr_raw + "\n" + se_raw))` where `sr_raw`
//! is the resource **exactly as it appears in the token** (clients encode it in several
//! ways, §2.2), so verification signs over the raw text and never re-encodes it.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Longest token text accepted, in bytes. Real tokens are well under 1 KiB.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Why a SAS token could not be parsed or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The text does not start with `SharedAccessSignature `.
    #[error("the authorization value must start with 'SharedAccessSignature '")]
    MissingPrefix,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("the SAS token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    /// A required field is absent.
    #[error("the SAS token has no '{0}' field")]
    MissingField(&'static str),
    /// A field appears twice.
    #[error("the SAS token has the field '{0}' more than once")]
    DuplicateField(String),
    /// A `key=value` pair has no `=`.
    #[error("the SAS token has a malformed field '{0}' (expected key=value)")]
    MalformedField(String),
    /// `se` is not a whole number of seconds.
    #[error("the SAS token expiry 'se' is not a whole number of seconds since 1970")]
    BadExpiry,
    /// A field is not valid percent-encoded UTF-8.
    #[error("the SAS token field '{0}' is not valid percent-encoded UTF-8")]
    BadEncoding(&'static str),
    /// `sig` is not base64.
    #[error("the SAS token signature 'sig' is not base64")]
    BadSignatureEncoding,
    /// A key is not valid base64.
    #[error("the key is not valid base64")]
    BadKey,
}

/// A parsed SAS token. Keeps the raw field texts needed to verify the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as sent (still percent-encoded if the client encoded it).
    pub resource_raw: String,
    /// `sr` percent-decoded.
    pub resource: String,
    /// The decoded signature bytes.
    pub signature: Vec<u8>,
    /// `se` exactly as sent.
    pub expiry_raw: String,
    /// `se` as seconds since the Unix epoch.
    pub expiry: u64,
    /// `skn`, decoded; `None` when absent. May be empty (Java sends `skn=`).
    pub key_name: Option<String>,
}

impl std::fmt::Debug for SasToken {
    // Never print the signature: a token is a bearer credential until it expires.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

const PREFIX: &str = "SharedAccessSignature";

fn decode_field(value: &str, name: &'static str) -> Result<String, SasError> {
    percent_decode_str(value).decode_utf8().map(|v| v.into_owned()).map_err(|_| SasError::BadEncoding(name))
}

impl SasToken {
    /// Parses an `Authorization` header value, an MQTT password or a SASL PLAIN password.
    pub fn parse(text: &str) -> Result<SasToken, SasError> {
        if text.len() > MAX_TOKEN_LEN {
            return Err(SasError::TooLong);
        }
        let text = text.trim();
        let rest = match text.get(..PREFIX.len()) {
            Some(p) if p.eq_ignore_ascii_case(PREFIX) => &text[PREFIX.len()..],
            _ => return Err(SasError::MissingPrefix),
        };
        if !rest.starts_with(' ') {
            return Err(SasError::MissingPrefix);
        }
        let rest = rest.trim_start();
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in rest.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| SasError::MalformedField(truncate(pair)))?;
            let slot = match key {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(SasError::DuplicateField(key.to_string()));
            }
        }
        let resource_raw = sr.ok_or(SasError::MissingField("sr"))?;
        let sig = sig.ok_or(SasError::MissingField("sig"))?;
        let expiry_raw = se.ok_or(SasError::MissingField("se"))?;
        if expiry_raw.is_empty() || !expiry_raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SasError::BadExpiry);
        }
        let expiry = expiry_raw.parse::<u64>().map_err(|_| SasError::BadExpiry)?;
        let signature = BASE64.decode(decode_field(sig, "sig")?).map_err(|_| SasError::BadSignatureEncoding)?;
        Ok(SasToken {
            resource: decode_field(resource_raw, "sr")?,
            resource_raw: resource_raw.to_string(),
            signature,
            expiry_raw: expiry_raw.to_string(),
            expiry,
            key_name: skn.map(|k| decode_field(k, "skn")).transpose()?,
        })
    }

    /// True when the token's signature was made with `key` (raw key bytes). Constant time.
    pub fn is_signed_by(&self, key: &[u8]) -> bool {
        let expected = sign_raw(key, &self.resource_raw, &self.expiry_raw);
        expected.len() == self.signature.len() && bool::from(expected.ct_eq(&self.signature))
    }

    /// True when the token expired more than `skew_secs` before `now_secs`.
    pub fn is_expired(&self, now_secs: u64, skew_secs: u64) -> bool {
        self.expiry.saturating_add(skew_secs) < now_secs
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

fn sign_raw(key: &[u8], resource_raw: &str, expiry_raw: &str) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(resource_raw.as_bytes());
    mac.update(b"\n");
    mac.update(expiry_raw.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Decodes a base64 key as stored in enrollments and policies.
pub fn decode_key(key_b64: &str) -> Result<Vec<u8>, SasError> {
    BASE64.decode(key_b64.trim()).map_err(|_| SasError::BadKey)
}

/// Derives a group member's device key: `base64(HMAC-SHA256(base64decode(group_key), registration_id))`
/// (docs/protocol-notes.md §2.3). Returns the raw derived key bytes.
pub fn derive_device_key(group_key: &[u8], registration_id: &str) -> Vec<u8> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(group_key).expect("HMAC takes any key length");
    mac.update(registration_id.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Characters left unencoded by [`encode_component`]: RFC 3986 unreserved.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes a URI component the way `encodeURIComponent` does (upper-case hex).
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// Builds a token: `sr` is URL-encoded, the signature is computed over the encoded form.
pub fn build_token(resource: &str, key: &[u8], expiry: u64, key_name: Option<&str>) -> String {
    let sr = encode_component(resource);
    let se = expiry.to_string();
    let sig = BASE64.encode(sign_raw(key, &sr, &se));
    let mut token = format!("SharedAccessSignature sr={sr}&sig={}&se={se}", encode_component(&sig));
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&encode_component(name));
    }
    token
}

/// The device resource a registration token must name: `{idScope}/registrations/{registrationId}`.
pub fn device_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

/// Service audience check (docs/protocol-notes.md §2.5): strips a scheme and a port from the decoded
/// `sr`, then requires it to be a segment-wise prefix of `host + path`, comparing
/// case-insensitively. `host` is one of the names the service answers to.
pub fn service_audience_matches(audience: &str, host: &str, path: &str) -> bool {
    let mut aud = audience.trim();
    for scheme in ["https://", "http://"] {
        if aud.get(..scheme.len()).is_some_and(|p| p.eq_ignore_ascii_case(scheme)) {
            aud = &aud[scheme.len()..];
        }
    }
    let (aud_host, aud_path) = match aud.find('/') {
        Some(i) => (&aud[..i], &aud[i..]),
        None => (aud, ""),
    };
    let aud_host = strip_port(aud_host);
    if !aud_host.eq_ignore_ascii_case(strip_port(host)) {
        return false;
    }
    let aud_path = aud_path.trim_end_matches('/');
    if aud_path.is_empty() {
        return true;
    }
    let path = path.to_ascii_lowercase();
    let aud_path = aud_path.to_ascii_lowercase();
    path == aud_path || path.starts_with(&format!("{aud_path}/"))
}

/// `host[:port]` without the port (`[::1]:443` → `[::1]`; a bare IPv6 address is left alone).
pub fn strip_port(host: &str) -> &str {
    // `[::1]:443` → `[::1]`; `localhost:9443` → `localhost`; bare IPv6 left alone.
    if let Some(end) = host.rfind(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_B64: &str = "YWNjZXB0YW5jZS10ZXN0LWRldmljZS1rZXktMDAwMQ==";
    const SCOPE: &str = "0ne00000A0A";

    fn key() -> Vec<u8> {
        decode_key(KEY_B64).unwrap()
    }

    fn sig_for(sr_raw: &str, se: &str, encode_lower: bool) -> String {
        let sig = BASE64.encode(sign_raw(&key(), sr_raw, se));
        let enc = encode_component(&sig);
        if encode_lower {
            lower_hex(&enc)
        } else {
            enc
        }
    }

    fn lower_hex(s: &str) -> String {
        // Lower-cases the two hex digits after every '%'.
        let mut out = String::new();
        let mut pending = 0;
        for c in s.chars() {
            if c == '%' {
                pending = 2;
                out.push(c);
            } else if pending > 0 {
                pending -= 1;
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Every `sr` encoding and `skn` variant of docs/protocol-notes.md §2.2 verifies, and resolves to the
    /// same decoded resource.
    #[test]
    fn accepts_every_client_encoding() {
        let id = "dev-1";
        let se = "1795561052";
        let cases: Vec<(&str, String, String)> = vec![
            // Node symmetric key: raw sr, skn before se.
            ("node", format!("{SCOPE}/registrations/{id}"), "skn=registration&se={se}".into()),
            // Java: raw sr, empty skn.
            ("java", format!("{SCOPE}/registrations/{id}"), "se={se}&skn=".into()),
            // Python: upper-case percent-encoding, no skn.
            ("python", format!("{SCOPE}%2Fregistrations%2F{id}"), "se={se}".into()),
            // C#: upper-case, skn=registration.
            ("csharp", format!("{SCOPE}%2Fregistrations%2F{id}"), "se={se}&skn=registration".into()),
            // C SDK: lower-case hex.
            ("c", format!("{SCOPE}%2fregistrations%2f{id}"), "se={se}&skn=registration".into()),
            // Embedded C: mixed.
            ("embedded-c", format!("{SCOPE}%2fregistrations%2f{id}"), "se={se}".into()),
            // IoT Edge: whole audience lower-cased.
            ("iot-edge", format!("{}%2fregistrations%2f{id}", SCOPE.to_lowercase()), "se={se}&skn=registration".into()),
        ];
        for (client, sr, tail) in cases {
            let tail = tail.replace("{se}", se);
            for lower_sig in [false, true] {
                let sig = sig_for(&sr, se, lower_sig);
                let text = format!("SharedAccessSignature sr={sr}&sig={sig}&{tail}");
                let token = SasToken::parse(&text).unwrap_or_else(|e| panic!("{client}: {e}"));
                assert!(token.is_signed_by(&key()), "{client} (lower sig {lower_sig})");
                assert!(
                    token.resource.eq_ignore_ascii_case(&device_resource(SCOPE, id)),
                    "{client}: {}",
                    token.resource
                );
            }
        }
    }

    #[test]
    fn field_order_does_not_matter() {
        let sr = format!("{SCOPE}/registrations/x");
        let sig = sig_for(&sr, "100", false);
        let a = SasToken::parse(&format!("SharedAccessSignature sig={sig}&se=100&skn=k&sr={sr}")).unwrap();
        let b = SasToken::parse(&format!("SharedAccessSignature sr={sr}&sig={sig}&skn=k&se=100")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.key_name.as_deref(), Some("k"));
        assert!(a.is_signed_by(&key()));
    }

    #[test]
    fn signature_is_over_the_raw_resource() {
        // Signed over the lower-case encoding; the same token re-encoded upper-case must fail.
        let sr_lower = format!("{SCOPE}%2fregistrations%2fx");
        let sig = sig_for(&sr_lower, "100", false);
        let sr_upper = format!("{SCOPE}%2Fregistrations%2Fx");
        let t = SasToken::parse(&format!("SharedAccessSignature sr={sr_upper}&sig={sig}&se=100")).unwrap();
        assert!(!t.is_signed_by(&key()));
    }

    #[test]
    fn wrong_key_and_tampering_fail() {
        let token = build_token("s/registrations/x", &key(), 100, Some("registration"));
        let t = SasToken::parse(&token).unwrap();
        assert!(t.is_signed_by(&key()));
        assert!(!t.is_signed_by(b"another key"));
        let tampered = token.replace("se=100", "se=101");
        assert!(!SasToken::parse(&tampered).unwrap().is_signed_by(&key()));
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_reason() {
        let cases = [
            ("", SasError::MissingPrefix),
            ("Bearer abc", SasError::MissingPrefix),
            ("SharedAccessSignaturesr=a", SasError::MissingPrefix),
            ("SharedAccessSignature sig=AAAA&se=1", SasError::MissingField("sr")),
            ("SharedAccessSignature sr=a&se=1", SasError::MissingField("sig")),
            ("SharedAccessSignature sr=a&sig=AAAA", SasError::MissingField("se")),
            ("SharedAccessSignature sr=a&sig=AAAA&se=-1", SasError::BadExpiry),
            ("SharedAccessSignature sr=a&sig=AAAA&se=1.5", SasError::BadExpiry),
            ("SharedAccessSignature sr=a&sig=AAAA&se=99999999999999999999999", SasError::BadExpiry),
            ("SharedAccessSignature sr=a&sig=%%%&se=1", SasError::BadSignatureEncoding),
            ("SharedAccessSignature sr=a&sig=not*base64&se=1", SasError::BadSignatureEncoding),
            ("SharedAccessSignature sr=a&sr=b&sig=AAAA&se=1", SasError::DuplicateField("sr".into())),
            ("SharedAccessSignature sr=a&sig&se=1", SasError::MalformedField("sig".into())),
            ("SharedAccessSignature sr=%FF&sig=AAAA&se=1", SasError::BadEncoding("sr")),
        ];
        for (text, want) in cases {
            assert_eq!(SasToken::parse(text).err(), Some(want), "{text:?}");
        }
        assert_eq!(
            SasToken::parse(&format!("SharedAccessSignature sr={}", "a".repeat(MAX_TOKEN_LEN))).err(),
            Some(SasError::TooLong)
        );
    }

    #[test]
    fn expiry_allows_clock_skew() {
        let t = SasToken::parse(&build_token("r", b"k", 1000, None)).unwrap();
        assert!(!t.is_expired(999, 0));
        assert!(!t.is_expired(1000, 0));
        assert!(t.is_expired(1001, 0));
        assert!(!t.is_expired(1300, 300));
        assert!(t.is_expired(1301, 300));
        let far = SasToken::parse(&build_token("r", b"k", u64::MAX, None)).unwrap();
        assert!(!far.is_expired(u64::MAX, 300));
    }

    /// Reference vector from the DPS documentation's key derivation walkthrough shape:
    /// the derived key equals HMAC-SHA256(decoded group key, registration ID), base64.
    #[test]
    fn derived_device_key_matches_reference() {
        let group = decode_key(KEY_B64).unwrap();
        let derived = BASE64.encode(derive_device_key(&group, "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"));
        // Computed independently with: echo -n sn-007-… | openssl dgst -sha256 -mac HMAC
        //   -macopt hexkey:$(echo KEY | base64 -d | xxd -p -c256) -binary | base64
        assert_eq!(derived, "ScGlnd2FALtF+EiyvKoiFFvfTCB3a37SfCfuwKcEiXw=");
        // Derivation is over the exact bytes: case changes the key.
        assert_ne!(derive_device_key(&group, "SN-007"), derive_device_key(&group, "sn-007"));
    }

    #[test]
    fn service_audience_rules() {
        let ok = [
            ("localhost", "localhost", "/enrollments/x"),
            ("LOCALHOST", "localhost", "/enrollments/x"),
            ("localhost%3A9443", "localhost", "/enrollments/x"),
            ("localhost:9443", "localhost", "/enrollments/x"),
            ("https://localhost:9443", "localhost", "/enrollments/x"),
            ("https://localhost:9443/", "localhost", "/enrollments/x"),
            ("localhost/enrollments", "localhost", "/enrollments/x"),
            ("localhost/enrollments/x", "localhost", "/enrollments/x"),
            ("[::1]:443", "[::1]", "/"),
        ];
        for (aud, host, path) in ok {
            let aud = percent_decode_str(aud).decode_utf8().unwrap();
            assert!(service_audience_matches(&aud, host, path), "{aud} {host} {path}");
        }
        let bad = [
            ("otherhost", "localhost", "/enrollments/x"),
            ("localhost.evil", "localhost", "/enrollments/x"),
            ("localhost/enroll", "localhost", "/enrollments/x"),
            ("localhost/enrollmentGroups", "localhost", "/enrollments/x"),
        ];
        for (aud, host, path) in bad {
            assert!(!service_audience_matches(aud, host, path), "{aud} {host} {path}");
        }
    }
}

#[cfg(test)]
mod robustness {
    use super::*;

    /// A small deterministic generator, so failures reproduce.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Random and mutated tokens never panic, and parsing is total (Ok or a reason).
    #[test]
    fn parser_never_panics_on_arbitrary_input() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let alphabet = b"SharedAccessSignature sr=sig=se=skn=&%2F%2f%ZZ%/+=0123456789abcXYZ\x00\xff \t";
        let seed = build_token("0ne00000A0A/registrations/dev-1", b"key", 1_795_561_052, Some("registration"));
        for i in 0..50_000 {
            let text: String = if i % 2 == 0 {
                let len = (rng.next() % 200) as usize;
                (0..len).map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize] as char).collect()
            } else {
                let mut t: Vec<char> = seed.chars().collect();
                for _ in 0..(rng.next() % 6) {
                    let pos = (rng.next() % t.len() as u64) as usize;
                    t[pos] = alphabet[(rng.next() % alphabet.len() as u64) as usize] as char;
                }
                t.into_iter().collect()
            };
            if let Ok(token) = SasToken::parse(&text) {
                let _ = token.is_signed_by(b"key");
                let _ = token.is_expired(u64::MAX, u64::MAX);
                let _ = service_audience_matches(&token.resource, "localhost", "/enrollments/x");
            }
            let _ = crate::ids::validate_registration_id(&text);
            let _ = crate::ids::is_valid_api_version(&text);
        }
    }
}
