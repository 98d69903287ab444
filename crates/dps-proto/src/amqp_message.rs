//! The AMQP 1.0 message format (OASIS AMQP 1.0 part 3, "Messaging"): the bytes a transfer
//! carries, as [`Message`].
//!
//! [`decode_message`] reads the sections in the order the specification fixes (header,
//! delivery-annotations, message-annotations, properties, application-properties, body,
//! footer; each optional), keeps what DPS uses and skips the annotations and the footer.
//! [`Message::encode`] writes header (when kept), properties, application-properties and body.

use crate::amqp::{self, descriptor_code, DecodeError, Value};

/// Section descriptor codes.
const HEADER: u64 = 0x70;
const DELIVERY_ANNOTATIONS: u64 = 0x71;
const MESSAGE_ANNOTATIONS: u64 = 0x72;
const PROPERTIES: u64 = 0x73;
const APPLICATION_PROPERTIES: u64 = 0x74;
const DATA: u64 = 0x75;
const AMQP_SEQUENCE: u64 = 0x76;
const AMQP_VALUE: u64 = 0x77;
const FOOTER: u64 = 0x78;

/// Why bytes are not a valid AMQP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// A section is not a valid AMQP value.
    #[error("malformed message section: {0}")]
    Decode(#[from] DecodeError),
    /// A value that is not a described section.
    #[error("message section is a {0}, not a described value")]
    NotASection(&'static str),
    /// A section descriptor this decoder does not know.
    #[error("unknown message section {0}")]
    UnknownSection(String),
    /// A section after one that must follow it, or a repeated section.
    #[error("message section {section} may not follow {after}")]
    OutOfOrder {
        /// The section found.
        section: &'static str,
        /// The section before it.
        after: &'static str,
    },
    /// A section or field of the wrong type.
    #[error("{section}: {field} must be {expected}, not {got}")]
    WrongType {
        /// The section.
        section: &'static str,
        /// The field (or "section" for the section's own value).
        field: &'static str,
        /// The type the specification requires.
        expected: &'static str,
        /// The type found.
        got: &'static str,
    },
}

/// The properties section (0x73).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Properties {
    /// message-id (ulong, uuid, binary or string).
    pub message_id: Option<Value>,
    /// user-id.
    pub user_id: Option<Vec<u8>>,
    /// to.
    pub to: Option<String>,
    /// subject.
    pub subject: Option<String>,
    /// reply-to.
    pub reply_to: Option<String>,
    /// correlation-id (ulong, uuid, binary or string).
    pub correlation_id: Option<Value>,
    /// content-type (a symbol on the wire).
    pub content_type: Option<String>,
    /// content-encoding (a symbol on the wire).
    pub content_encoding: Option<String>,
    /// absolute-expiry-time, ms since the Unix epoch.
    pub absolute_expiry_time: Option<i64>,
    /// creation-time, ms since the Unix epoch.
    pub creation_time: Option<i64>,
    /// group-id.
    pub group_id: Option<String>,
    /// group-sequence.
    pub group_sequence: Option<u32>,
    /// reply-to-group-id.
    pub reply_to_group_id: Option<String>,
}

impl Properties {
    /// Whether no field is set (the section is then not encoded).
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

/// A message body.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Body {
    /// No body section.
    #[default]
    Empty,
    /// The bytes of all data sections (0x75), concatenated; encoded as one section.
    Data(Vec<u8>),
    /// One amqp-value section (0x77).
    Value(Value),
    /// The elements of all amqp-sequence sections (0x76), concatenated; encoded as one.
    Sequence(Vec<Value>),
}

/// An AMQP message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    /// The header section's value (its list of fields, without the 0x70 descriptor), kept
    /// verbatim and re-encoded first when present.
    pub header: Option<Value>,
    /// The properties section.
    pub properties: Properties,
    /// The application-properties section: string keys, in wire order.
    pub application_properties: Vec<(String, Value)>,
    /// The body.
    pub body: Body,
}

fn section_name(code: u64) -> &'static str {
    match code {
        HEADER => "header",
        DELIVERY_ANNOTATIONS => "delivery-annotations",
        MESSAGE_ANNOTATIONS => "message-annotations",
        PROPERTIES => "properties",
        APPLICATION_PROPERTIES => "application-properties",
        DATA => "data",
        AMQP_SEQUENCE => "amqp-sequence",
        AMQP_VALUE => "amqp-value",
        FOOTER => "footer",
        _ => "unknown",
    }
}

/// The position of a section in the order the specification fixes; body sections share one.
fn rank(code: u64) -> u8 {
    match code {
        HEADER => 0,
        DELIVERY_ANNOTATIONS => 1,
        MESSAGE_ANNOTATIONS => 2,
        PROPERTIES => 3,
        APPLICATION_PROPERTIES => 4,
        DATA | AMQP_SEQUENCE | AMQP_VALUE => 5,
        _ => 6,
    }
}

/// Decodes a whole message (the concatenated payloads of a delivery's transfers).
pub fn decode_message(bytes: &[u8]) -> Result<Message, MessageError> {
    let mut msg = Message::default();
    let mut rest = bytes;
    let mut last: Option<u64> = None;
    while !rest.is_empty() {
        let (value, used) = amqp::decode(rest)?;
        rest = rest.get(used..).unwrap_or_default();
        let Value::Described(descriptor, inner) = value else {
            return Err(MessageError::NotASection(value.type_name()));
        };
        let code = match descriptor_code(&descriptor) {
            Some(c @ HEADER..=FOOTER) => c,
            _ => {
                let shown = match &*descriptor {
                    Value::Ulong(c) => format!("0x{c:x}"),
                    Value::Symbol(s) => s.clone(),
                    other => format!("with a {} descriptor", other.type_name()),
                };
                return Err(MessageError::UnknownSection(shown));
            }
        };
        let name = section_name(code);
        if let Some(prev) = last {
            // Each section at most once and in order; only data and amqp-sequence repeat.
            let repeat_ok = prev == code && matches!(code, DATA | AMQP_SEQUENCE);
            if rank(code) < rank(prev) || (rank(code) == rank(prev) && !repeat_ok) {
                return Err(MessageError::OutOfOrder { section: name, after: section_name(prev) });
            }
        }
        last = Some(code);
        let wrong = |field: &'static str, expected: &'static str, got: &Value| MessageError::WrongType {
            section: name,
            field,
            expected,
            got: got.type_name(),
        };
        match code {
            HEADER => {
                if !matches!(*inner, Value::List(_)) {
                    return Err(wrong("section", "a list", &inner));
                }
                msg.header = Some(*inner);
            }
            DELIVERY_ANNOTATIONS | MESSAGE_ANNOTATIONS | FOOTER => {
                if !matches!(*inner, Value::Map(_) | Value::Null) {
                    return Err(wrong("section", "a map", &inner));
                }
            }
            PROPERTIES => {
                let Value::List(fields) = &*inner else { return Err(wrong("section", "a list", &inner)) };
                msg.properties = properties(fields, &wrong)?;
            }
            APPLICATION_PROPERTIES => {
                let pairs = match *inner {
                    Value::Map(pairs) => pairs,
                    Value::Null => Vec::new(),
                    other => return Err(wrong("section", "a map", &other)),
                };
                for (k, v) in pairs {
                    match k {
                        Value::String(s) => msg.application_properties.push((s, v)),
                        other => return Err(wrong("key", "a string", &other)),
                    }
                }
            }
            DATA => {
                let Value::Binary(b) = *inner else { return Err(wrong("section", "a binary", &inner)) };
                match &mut msg.body {
                    Body::Data(all) => all.extend_from_slice(&b),
                    body => *body = Body::Data(b),
                }
            }
            AMQP_SEQUENCE => {
                let Value::List(items) = *inner else { return Err(wrong("section", "a list", &inner)) };
                match &mut msg.body {
                    Body::Sequence(all) => all.extend(items),
                    body => *body = Body::Sequence(items),
                }
            }
            _ => msg.body = Body::Value(*inner), // AMQP_VALUE
        }
    }
    Ok(msg)
}

fn properties(
    fields: &[Value],
    wrong: &dyn Fn(&'static str, &'static str, &Value) -> MessageError,
) -> Result<Properties, MessageError> {
    let get = |i: usize| fields.get(i).filter(|v| !v.is_null());
    let string = |i: usize, field: &'static str| -> Result<Option<String>, MessageError> {
        match get(i) {
            None => Ok(None),
            Some(v) => v.as_str().map(|s| Some(s.to_owned())).ok_or_else(|| wrong(field, "a string", v)),
        }
    };
    let symbol = |i: usize, field: &'static str| -> Result<Option<String>, MessageError> {
        match get(i) {
            None => Ok(None),
            Some(Value::Symbol(s)) => Ok(Some(s.clone())),
            Some(Value::String(s)) if s.is_ascii() => Ok(Some(s.clone())),
            Some(v) => Err(wrong(field, "a symbol", v)),
        }
    };
    let timestamp = |i: usize, field: &'static str| -> Result<Option<i64>, MessageError> {
        match get(i) {
            None => Ok(None),
            Some(Value::Timestamp(t)) => Ok(Some(*t)),
            Some(v) => Err(wrong(field, "a timestamp", v)),
        }
    };
    Ok(Properties {
        message_id: get(0).cloned(),
        user_id: match get(1) {
            None => None,
            Some(v) => Some(v.as_bytes().ok_or_else(|| wrong("user-id", "a binary", v))?.to_vec()),
        },
        to: string(2, "to")?,
        subject: string(3, "subject")?,
        reply_to: string(4, "reply-to")?,
        correlation_id: get(5).cloned(),
        content_type: symbol(6, "content-type")?,
        content_encoding: symbol(7, "content-encoding")?,
        absolute_expiry_time: timestamp(8, "absolute-expiry-time")?,
        creation_time: timestamp(9, "creation-time")?,
        group_id: string(10, "group-id")?,
        group_sequence: match get(11) {
            None => None,
            Some(v) => Some(v.as_u32().ok_or_else(|| wrong("group-sequence", "a uint", v))?),
        },
        reply_to_group_id: string(12, "reply-to-group-id")?,
    })
}

impl Message {
    /// A message whose body is one data section.
    pub fn with_data(data: Vec<u8>) -> Self {
        Message { body: Body::Data(data), ..Message::default() }
    }

    /// The value of the application property `key`, if present.
    pub fn application_property(&self, key: &str) -> Option<&Value> {
        self.application_properties.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Appends the message's sections to `out`: header (when kept), properties (when any field
    /// is set), application-properties (when any), and the body (none for [`Body::Empty`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let section = |code: u64, v: Value, out: &mut Vec<u8>| {
            Value::Described(Box::new(Value::Ulong(code)), Box::new(v)).encode(out);
        };
        if let Some(h) = &self.header {
            section(HEADER, h.clone(), out);
        }
        if !self.properties.is_empty() {
            let p = &self.properties;
            let s = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
            let sym = |v: &Option<String>| v.clone().map_or(Value::Null, Value::Symbol);
            let mut fields = vec![
                p.message_id.clone().unwrap_or(Value::Null),
                p.user_id.clone().map_or(Value::Null, Value::Binary),
                s(&p.to),
                s(&p.subject),
                s(&p.reply_to),
                p.correlation_id.clone().unwrap_or(Value::Null),
                sym(&p.content_type),
                sym(&p.content_encoding),
                p.absolute_expiry_time.map_or(Value::Null, Value::Timestamp),
                p.creation_time.map_or(Value::Null, Value::Timestamp),
                s(&p.group_id),
                p.group_sequence.map_or(Value::Null, Value::Uint),
                s(&p.reply_to_group_id),
            ];
            while fields.last().is_some_and(Value::is_null) {
                fields.pop();
            }
            section(PROPERTIES, Value::List(fields), out);
        }
        if !self.application_properties.is_empty() {
            let pairs =
                self.application_properties.iter().map(|(k, v)| (Value::String(k.clone()), v.clone())).collect();
            section(APPLICATION_PROPERTIES, Value::Map(pairs), out);
        }
        match &self.body {
            Body::Empty => {}
            Body::Data(d) => section(DATA, Value::Binary(d.clone()), out),
            Body::Value(v) => section(AMQP_VALUE, v.clone(), out),
            Body::Sequence(items) => section(AMQP_SEQUENCE, Value::List(items.clone()), out),
        }
    }

    /// The message's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::described;

    fn section(code: u64, v: Value) -> Vec<u8> {
        let mut out = Vec::new();
        Value::Described(Box::new(Value::Ulong(code)), Box::new(v)).encode(&mut out);
        out
    }

    fn full() -> Message {
        Message {
            header: Some(Value::List(vec![Value::Bool(true), Value::Ubyte(4)])),
            properties: Properties {
                message_id: Some(Value::String("m-1".into())),
                user_id: Some(b"u".to_vec()),
                to: Some("/x".into()),
                subject: Some("s".into()),
                reply_to: Some("r".into()),
                correlation_id: Some(Value::Uuid([3; 16])),
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                absolute_expiry_time: Some(1),
                creation_time: Some(-2),
                group_id: Some("g".into()),
                group_sequence: Some(9),
                reply_to_group_id: Some("rg".into()),
            },
            application_properties: vec![
                ("iotdps-operation-type".into(), Value::String("Register".into())),
                ("iotdps-forceRegistration".into(), Value::Bool(false)),
            ],
            body: Body::Data(br#"{"registrationId":"dev"}"#.to_vec()),
        }
    }

    fn messages() -> Vec<Message> {
        vec![
            Message::default(),
            full(),
            Message::with_data(vec![]),
            Message { body: Body::Value(Value::Map(vec![(Value::Null, Value::Null)])), ..Message::default() },
            Message { body: Body::Sequence(vec![Value::Uint(1), Value::Null]), ..Message::default() },
            Message {
                properties: Properties { correlation_id: Some(Value::Ulong(5)), ..Properties::default() },
                ..Message::default()
            },
        ]
    }

    #[test]
    fn messages_round_trip() {
        for m in messages() {
            let b = m.to_bytes();
            assert_eq!(decode_message(&b), Ok(m.clone()), "{b:02x?}");
        }
        assert!(Message::default().to_bytes().is_empty());
        let m = full();
        assert_eq!(m.application_property("iotdps-operation-type"), Some(&Value::String("Register".into())));
        assert_eq!(m.application_property("nope"), None);
    }

    #[test]
    fn every_prefix_fails_or_is_a_shorter_message() {
        let b = full().to_bytes();
        for n in 0..b.len() {
            // A cut inside a section is an error; a cut between sections a valid message.
            let _ = decode_message(&b[..n]);
        }
        assert!(matches!(decode_message(&b[..b.len() - 1]), Err(MessageError::Decode(DecodeError::Truncated { .. }))));
    }

    #[test]
    fn a_hand_written_message() {
        // What an Azure IoT device SDK sends for register: application-properties and one
        // data section; the message-annotations and footer are skipped.
        let mut b = Vec::new();
        b.extend(section(0x72, Value::Map(vec![(Value::Symbol("x-opt".into()), Value::Int(1))])));
        b.extend(section(
            0x73,
            Value::List(vec![
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Symbol("application/json".into()),
            ]),
        ));
        b.extend(section(
            0x74,
            Value::Map(vec![(Value::String("iotdps-operation-type".into()), Value::String("iotdps-register".into()))]),
        ));
        b.extend_from_slice(&[0x00, 0x53, 0x75, 0xa0, 0x02, b'{', b'}']);
        b.extend_from_slice(&[0x00, 0x53, 0x75, 0xa0, 0x01, b' ']);
        b.extend(section(0x78, Value::Map(vec![])));
        let m = decode_message(&b).unwrap();
        assert_eq!(m.body, Body::Data(b"{} ".to_vec()));
        assert_eq!(m.properties.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.application_property("iotdps-operation-type").and_then(Value::as_str), Some("iotdps-register"));
        assert_eq!(m.header, None);
        // Symbolic descriptors work too.
        let mut b = Vec::new();
        Value::Described(Box::new(Value::Symbol("amqp:amqp-value:*".into())), Box::new(Value::Uint(3))).encode(&mut b);
        assert_eq!(decode_message(&b).unwrap().body, Body::Value(Value::Uint(3)));
    }

    #[test]
    fn bad_messages_are_refused() {
        let data = section(0x75, Value::Binary(vec![1]));
        let props = section(0x73, Value::List(vec![]));
        // Out of order, repeated, mixed bodies.
        let e = decode_message(&[data.clone(), props.clone()].concat()).unwrap_err();
        assert_eq!(e, MessageError::OutOfOrder { section: "properties", after: "data" });
        assert_eq!(e.to_string(), "message section properties may not follow data");
        assert!(decode_message(&[props.clone(), props.clone()].concat()).is_err());
        let value = section(0x77, Value::Null);
        assert!(decode_message(&[data.clone(), value.clone()].concat()).is_err());
        assert!(decode_message(&[value.clone(), value].concat()).is_err());
        // Unknown sections and non-sections.
        assert_eq!(decode_message(&section(0x79, Value::Null)), Err(MessageError::UnknownSection("0x79".into())));
        assert_eq!(decode_message(&[0x40]), Err(MessageError::NotASection("null")));
        // Non-string application property keys, wrong section types, bad field types.
        let e = decode_message(&section(0x74, Value::Map(vec![(Value::Symbol("k".into()), Value::Null)]))).unwrap_err();
        assert_eq!(e.to_string(), "application-properties: key must be a string, not symbol");
        assert!(decode_message(&section(0x75, Value::String("x".into()))).is_err());
        assert!(decode_message(&section(0x70, Value::Null)).is_err());
        assert!(decode_message(&section(0x72, Value::List(vec![]))).is_err());
        let e = decode_message(&section(0x73, Value::List(vec![Value::Null, Value::String("u".into())]))).unwrap_err();
        assert_eq!(e.to_string(), "properties: user-id must be a binary, not string");
        assert!(decode_message(&section(
            0x73,
            Value::List(vec![Value::Null; 9].into_iter().chain([Value::Long(1)]).collect())
        ))
        .is_err());
        assert!(decode_message(&[0x99]).is_err());
        let _ = described(0, vec![]);
    }
}
