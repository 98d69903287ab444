//! ETags: generation and `If-Match` comparison.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// A new enrollment ETag, as DPS writes them: a quoted GUID (`"\"…\""` in JSON).
pub fn new_enrollment_etag() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4())
}

/// A new registration-state ETag, as DPS writes them: base64 of a quoted GUID.
pub fn new_registration_etag() -> String {
    BASE64.encode(format!("\"{}\"", uuid::Uuid::new_v4()))
}

/// What an `If-Match` header asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// No header: unconditional.
    Any,
    /// `*` or `"*"`: the record must exist.
    Exists,
    /// A specific ETag (quotes and a `W/` prefix removed).
    Tag(String),
}

impl IfMatch {
    /// Parses an optional header value. C# quotes unquoted values, Node and Java send the
    /// stored `etag` verbatim, so quoted and unquoted forms are the same tag.
    pub fn parse(header: Option<&str>) -> IfMatch {
        match header.map(str::trim) {
            None | Some("") => IfMatch::Any,
            Some(v) => {
                let inner = normalize(v);
                if inner == "*" {
                    IfMatch::Exists
                } else {
                    IfMatch::Tag(inner.to_string())
                }
            }
        }
    }

    /// True when a record with `stored` ETag (or none) satisfies this condition.
    pub fn allows(&self, stored: Option<&str>) -> bool {
        match (self, stored) {
            (IfMatch::Any, _) => true,
            (IfMatch::Exists, s) => s.is_some(),
            (IfMatch::Tag(_), None) => false,
            (IfMatch::Tag(t), Some(s)) => normalize(s) == t,
        }
    }
}

fn normalize(v: &str) -> &str {
    let v = v.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_and_unquoted_tags_match() {
        let stored = "\"13003fea-0000\"";
        assert!(IfMatch::parse(Some("\"13003fea-0000\"")).allows(Some(stored)));
        assert!(IfMatch::parse(Some("13003fea-0000")).allows(Some(stored)));
        assert!(!IfMatch::parse(Some("\"other\"")).allows(Some(stored)));
        assert!(!IfMatch::parse(Some("13003fea-0000")).allows(None));
    }

    #[test]
    fn wildcard_needs_a_record() {
        for w in ["*", "\"*\""] {
            assert_eq!(IfMatch::parse(Some(w)), IfMatch::Exists);
            assert!(IfMatch::parse(Some(w)).allows(Some("\"x\"")));
            assert!(!IfMatch::parse(Some(w)).allows(None));
        }
        assert!(IfMatch::parse(None).allows(None));
    }

    #[test]
    fn generated_tags_have_dps_shape() {
        let e = new_enrollment_etag();
        assert!(e.starts_with('"') && e.ends_with('"') && e.len() == 38);
        let r = new_registration_etag();
        let decoded = String::from_utf8(BASE64.decode(&r).unwrap()).unwrap();
        assert!(decoded.starts_with('"') && decoded.len() == 38);
    }
}
