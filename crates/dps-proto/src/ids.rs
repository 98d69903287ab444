//! Identifier grammars: registration IDs, enrollment group IDs, ID scopes, operation IDs and
//! api-version strings (docs/protocol-notes.md §1.5, §3.2).

/// Longest registration ID (docs/protocol-notes.md §1.5).
pub const MAX_REGISTRATION_ID_LEN: usize = 128;
/// Longest operation ID we issue or accept.
pub const MAX_OPERATION_ID_LEN: usize = 128;

/// Why an identifier was refused. The message names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The identifier is empty.
    #[error("the {0} is empty")]
    Empty(&'static str),
    /// The identifier is longer than allowed.
    #[error("the {kind} is {len} characters long; the limit is {max}")]
    TooLong {
        /// Which identifier.
        kind: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The identifier has a character outside its alphabet.
    #[error("the {kind} contains {ch:?}; only letters, digits and {allowed} are allowed")]
    BadCharacter {
        /// Which identifier.
        kind: &'static str,
        /// The first offending character.
        ch: char,
        /// The allowed punctuation.
        allowed: &'static str,
    },
    /// The identifier ends with a character it may not end with.
    #[error("the {0} must end with a letter, a digit or '-'")]
    BadEnd(&'static str),
}

fn check(kind: &'static str, id: &str, max: usize, punct: &[char], allowed: &'static str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty(kind));
    }
    let len = id.chars().count();
    if len > max {
        return Err(IdError::TooLong { kind, len, max });
    }
    if let Some(ch) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || punct.contains(c))) {
        return Err(IdError::BadCharacter { kind, ch, allowed });
    }
    Ok(())
}

/// Checks a registration ID: 1–128 characters of letters, digits and `- . _ :`, ending with a
/// letter, digit or `-`. Registration IDs compare case-insensitively (see [`id_key`]).
pub fn validate_registration_id(id: &str) -> Result<(), IdError> {
    check_enrollment_style("registration ID", id)
}

/// Checks an enrollment group ID with the same grammar as a registration ID.
pub fn validate_enrollment_group_id(id: &str) -> Result<(), IdError> {
    check_enrollment_style("enrollment group ID", id)
}

fn check_enrollment_style(kind: &'static str, id: &str) -> Result<(), IdError> {
    check(kind, id, MAX_REGISTRATION_ID_LEN, &['-', '.', '_', ':'], "'-', '.', '_', ':'")?;
    match id.chars().last() {
        Some(c) if c.is_ascii_alphanumeric() || c == '-' => Ok(()),
        _ => Err(IdError::BadEnd(kind)),
    }
}

/// Checks an ID scope: 1–32 letters and digits (real ones look like `0ne0004E52F`).
pub fn validate_id_scope(scope: &str) -> Result<(), IdError> {
    check("ID scope", scope, 32, &[], "nothing else")
}

/// Checks an operation ID: 1–128 characters of letters, digits, `.` and `-`.
pub fn validate_operation_id(id: &str) -> Result<(), IdError> {
    check("operation ID", id, MAX_OPERATION_ID_LEN, &['.', '-'], "'.', '-'")
}

/// The storage key of a case-insensitive identifier: ASCII lower case.
pub fn id_key(id: &str) -> String {
    id.to_ascii_lowercase()
}

/// True for an `api-version` of the form `YYYY-MM-DD` with an optional `-suffix`
/// (`2019-03-31`, `2021-10-01`, `2025-07-01-preview`). Any such value is accepted.
pub fn is_valid_api_version(v: &str) -> bool {
    let b = v.as_bytes();
    if !v.is_ascii() || b.len() < 10 || b.len() > 32 {
        return false;
    }
    let date_ok =
        b[..10].iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() });
    let rest = &v[10..];
    date_ok
        && (rest.is_empty()
            || (rest.starts_with('-') && rest.len() > 1 && rest[1..].bytes().all(|c| c.is_ascii_alphanumeric())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_id_grammar() {
        for ok in
            ["a", "dev-1", "node-http-1", "A.b_c:d-", "x".repeat(128).as_str(), "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"]
        {
            assert_eq!(validate_registration_id(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_registration_id(""), Err(IdError::Empty("registration ID")));
        assert!(matches!(validate_registration_id(&"x".repeat(129)), Err(IdError::TooLong { len: 129, max: 128, .. })));
        for (bad, ch) in [("a b", ' '), ("a/b", '/'), ("é", 'é'), ("a#", '#'), ("a%2F", '%'), ("a\0", '\0')] {
            assert!(
                matches!(validate_registration_id(bad), Err(IdError::BadCharacter { ch: c, .. }) if c == ch),
                "{bad:?}"
            );
        }
        for bad in ["a.", "a_", "a:"] {
            assert_eq!(validate_registration_id(bad), Err(IdError::BadEnd("registration ID")), "{bad}");
        }
    }

    #[test]
    fn error_messages_say_what_to_fix() {
        let e = validate_registration_id("bad id").unwrap_err().to_string();
        assert!(e.contains("' '") && e.contains("letters, digits"), "{e}");
        let e = validate_registration_id(&"x".repeat(200)).unwrap_err().to_string();
        assert!(e.contains("200") && e.contains("128"), "{e}");
    }

    #[test]
    fn id_scope_and_operation_id() {
        assert!(validate_id_scope("0ne0004E52F").is_ok());
        assert!(validate_id_scope("0ne/x").is_err());
        assert!(validate_operation_id("5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550").is_ok());
        assert!(validate_operation_id("5.x/../y").is_err());
        assert!(validate_operation_id("").is_err());
    }

    #[test]
    fn api_versions() {
        for ok in ["2019-03-31", "2021-06-01", "2021-10-01", "2021-11-01-preview", "2025-07-01-preview"] {
            assert!(is_valid_api_version(ok), "{ok}");
        }
        for bad in [
            "",
            "2019",
            "2019-3-31",
            "latest",
            "2019-03-31-",
            "2019-03-31x",
            "2019-03-31-pre view",
            "2019-03-3é-x",
            "2019-03-31é",
        ] {
            assert!(!is_valid_api_version(bad), "{bad}");
        }
    }
}
