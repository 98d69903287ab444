//! Strict JSON request bodies, the same for the device and the service API: the body must be
//! one JSON object, no object in it may repeat a key (a proxy or an auditor might read the
//! other one), and a shape error names the field (`attestation.tpm`) and what was expected in
//! JSON words, never a Rust type name.

use serde::de::{DeserializeOwned, DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Number, Value};

/// Why a body cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all, or a repeated key.
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// JSON, but not an object.
    #[error("must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    /// An object, but a field has the wrong shape.
    #[error("{0}")]
    Shape(String),
}

/// Parses `body` as one JSON object with no repeated keys at any depth.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = StrictValue.deserialize(&mut de).map_err(|e| JsonError::Syntax(e.to_string()))?;
    de.end().map_err(|e| JsonError::Syntax(e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(JsonError::NotAnObject(kind(&other))),
    }
}

/// Parses `body` strictly ([`parse_object`]) into `T`.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, JsonError> {
    from_value(Value::Object(parse_object(body)?))
}

/// Converts an already parsed value into `T`, with errors that name the field.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, JsonError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let (path, inner) = split_path(e.path().to_string(), &e.inner().to_string());
        if path.is_empty() {
            JsonError::Shape(inner)
        } else {
            JsonError::Shape(format!("{path}: {inner}"))
        }
    })
}

/// Marks an error raised by [`object`] / [`optional_object`] so that the outer path and the
/// nested one join into one (`attestation.tpm.endorsementKey`).
const NESTED: char = '\u{1}';

fn split_path(outer: String, message: &str) -> (String, String) {
    let outer = if outer == "." { String::new() } else { outer };
    if let Some(rest) = message.strip_prefix(NESTED) {
        if let Some((nested, inner)) = rest.split_once(NESTED) {
            let path = match (outer.is_empty(), nested.is_empty()) {
                (true, _) => nested.to_string(),
                (false, true) => outer,
                (false, false) => format!("{outer}.{nested}"),
            };
            return (path, humanise(inner));
        }
    }
    (outer, humanise(message))
}

/// `deserialize_with` for a field that must be a JSON object (serde would also read a
/// struct from an array, by position).
pub fn object<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    match Value::deserialize(d)? {
        v @ Value::Object(_) => nested(v),
        other => Err(D::Error::invalid_type(unexpected(&other), &"a JSON object")),
    }
}

/// [`object`] for a field of a `#[serde(flatten)]`ed struct, whose name serde cannot report
/// (flattened fields are buffered first): messages name it as `field`.
pub fn object_named<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D, field: &str) -> Result<T, D::Error> {
    match Value::deserialize(d)? {
        v @ Value::Object(_) => serde_path_to_error::deserialize(v).map_err(|e| {
            let (path, inner) = split_path(e.path().to_string(), &e.inner().to_string());
            let path = if path.is_empty() { field.to_string() } else { format!("{field}.{path}") };
            D::Error::custom(format!("{NESTED}{path}{NESTED}{inner}"))
        }),
        other => Err(D::Error::custom(format!(
            "{NESTED}{field}{NESTED}{}",
            D::Error::invalid_type(unexpected(&other), &"a JSON object")
        ))),
    }
}

/// `deserialize_with` for an optional field that must be a JSON object or `null`.
pub fn optional_object<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v @ Value::Object(_) => nested(v).map(Some),
        other => Err(D::Error::invalid_type(unexpected(&other), &"a JSON object")),
    }
}

fn nested<T: DeserializeOwned, E: serde::de::Error>(v: Value) -> Result<T, E> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let (path, inner) = split_path(e.path().to_string(), &e.inner().to_string());
        E::custom(format!("{NESTED}{path}{NESTED}{inner}"))
    })
}

fn unexpected(v: &Value) -> serde::de::Unexpected<'_> {
    use serde::de::Unexpected;
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Unexpected::Unsigned(u),
            (None, Some(i)) => Unexpected::Signed(i),
            _ => Unexpected::Float(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// The JSON name of a value's kind, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde's words for JSON's: `map` → object, `sequence` → array, `struct Foo` → a JSON
/// object, `enum Foo` → a string of the documented set.
fn humanise(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while !rest.is_empty() {
        // (serde's words, ours, whether a Rust type name follows and must go)
        const WORDS: [(&str, &str, bool); 7] = [
            ("expected struct ", "expected a JSON object", true),
            ("expected enum ", "expected one of the documented string values", true),
            ("expected tuple struct ", "expected a JSON value of the documented shape", true),
            ("invalid type: map", "invalid type: object", false),
            ("invalid type: sequence", "invalid type: array", false),
            ("expected a map", "expected an object", false),
            ("expected a sequence", "expected an array", false),
        ];
        let (replacement, after) = WORDS
            .iter()
            .find_map(|(needle, ours, ident)| {
                let after = rest.strip_prefix(needle)?;
                let after =
                    if *ident { after.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_') } else { after };
                Some((ours.to_string(), after))
            })
            .unwrap_or_else(|| {
                let c = rest.chars().next().unwrap_or(' ');
                (c.to_string(), &rest[c.len_utf8()..])
            });
        out.push_str(&replacement);
        rest = after;
    }
    out
}

/// Builds a [`Value`], refusing an object that names a key twice.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(A::Error::custom(format!("the key \"{shown}\" appears twice in one object")));
            }
            let value = access.next_value_seed(StrictValue)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        endorsement_key: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Outer {
        registration_id: Option<String>,
        #[serde(default, deserialize_with = "optional_object")]
        tpm: Option<Inner>,
        list: Option<Vec<u32>>,
        #[serde(default, deserialize_with = "optional_object")]
        wrap: Option<Wrap>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Wrap {
        #[serde(deserialize_with = "object")]
        inner: Inner,
    }

    #[test]
    fn objects_only() {
        assert_eq!(parse_object(b"[1,2]").unwrap_err(), JsonError::NotAnObject("an array"));
        assert_eq!(parse_object(b" \"x\" ").unwrap_err(), JsonError::NotAnObject("a string"));
        assert!(matches!(parse_object(b"{not json").unwrap_err(), JsonError::Syntax(_)));
        assert!(matches!(parse_object(b"{} {}").unwrap_err(), JsonError::Syntax(_)), "trailing data");
        assert_eq!(parse_object(br#" {"a": [1, {"b": null}]} "#).unwrap()["a"][1]["b"], Value::Null);
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        for body in [&br#"{"a":1,"a":2}"#[..], br#"{"p":{"x":1,"x":1}}"#, br#"{"l":[{"k":0,"k":0}]}"#] {
            let e = parse_object(body).unwrap_err().to_string();
            assert!(e.contains("appears twice"), "{e}");
        }
        assert!(parse_object(br#"{"a":{"x":1},"b":{"x":1}}"#).is_ok(), "same key in two objects");
    }

    #[test]
    fn shape_errors_name_the_field_in_json_words() {
        let e = parse::<Outer>(br#"{"tpm": "x"}"#).unwrap_err().to_string();
        assert_eq!(e, "tpm: invalid type: string \"x\", expected a JSON object");
        let e = parse::<Outer>(br#"{"tpm": {"endorsementKey": 5}}"#).unwrap_err().to_string();
        assert!(e.starts_with("tpm.endorsementKey: invalid type: integer `5`, expected a string"), "{e}");
        let e = parse::<Outer>(br#"{"list": {"a": 1}}"#).unwrap_err().to_string();
        assert_eq!(e, "list: invalid type: object, expected an array");
        let e = parse::<Outer>(br#"{"registrationId": []}"#).unwrap_err().to_string();
        assert_eq!(e, "registrationId: invalid type: array, expected a string");
        assert!(!e.contains("Outer") && !e.contains("Inner"));
        // Nested objects are never read from arrays by position, and paths join.
        let e = parse::<Outer>(br#"{"tpm": ["k"]}"#).unwrap_err().to_string();
        assert_eq!(e, "tpm: invalid type: array, expected a JSON object");
        let e = parse::<Outer>(br#"{"wrap": {"inner": ["k"]}}"#).unwrap_err().to_string();
        assert_eq!(e, "wrap.inner: invalid type: array, expected a JSON object");
        let e = parse::<Outer>(br#"{"wrap": {"inner": {"endorsementKey": 1}}}"#).unwrap_err().to_string();
        assert!(e.starts_with("wrap.inner.endorsementKey: invalid type: integer `1`, expected a string"), "{e}");
        let e = parse::<Outer>(br#"{"wrap": {"inner": {"endorsementKey": "k", "x": 1}}}"#).unwrap_err().to_string();
        assert!(e.starts_with("wrap.inner.x: unknown field `x`"), "{e}");
        assert!(parse::<Outer>(br#"{"tpm": null, "wrap": {"inner": {"endorsementKey": "k"}}}"#).is_ok());
    }

    #[test]
    fn humanise_leaves_other_text_alone() {
        assert_eq!(
            humanise("unknown variant `x`, expected one of `a`, `b`"),
            "unknown variant `x`, expected one of `a`, `b`"
        );
        assert_eq!(humanise("ünïcode expected struct Foo!"), "ünïcode expected a JSON object!");
    }
}
