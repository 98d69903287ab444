//! A strict MQTT 3.1.1 codec for the packets DPS uses (docs/protocol-notes.md §4).
//!
//! [`decode`] reads one packet from the front of a buffer, or says that more bytes are needed;
//! [`Packet::encode`] writes one. Both directions of every packet DPS exchanges are covered, so
//! the same code serves the server and the tests' raw clients. The decoder never panics and
//! never allocates more than the packet it was given; it refuses anything the 3.1.1 spec calls
//! malformed (reserved flag bits, bad UTF-8, lengths that disagree, QoS 3) and QoS 2, which DPS
//! does not support. A fuzz target (`fuzz/fuzz_targets/mqtt_decode.rs`) checks both claims.

use std::fmt;

/// Protocol level of MQTT 3.1.1 in CONNECT.
pub const PROTOCOL_LEVEL_3_1_1: u8 = 4;

/// The largest remaining length the MQTT fixed header can express (256 MiB - 1).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectReturnCode {
    /// 0: connection accepted.
    Accepted = 0,
    /// 1: the server does not support the requested protocol level.
    UnacceptableProtocolVersion = 1,
    /// 2: the client identifier is not allowed.
    IdentifierRejected = 2,
    /// 3: the service is unavailable; try again later.
    ServerUnavailable = 3,
    /// 4: the user name or password is malformed.
    BadUserNameOrPassword = 4,
    /// 5: the client is not authorized to connect.
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Accepted,
            1 => Self::UnacceptableProtocolVersion,
            2 => Self::IdentifierRejected,
            3 => Self::ServerUnavailable,
            4 => Self::BadUserNameOrPassword,
            5 => Self::NotAuthorized,
            _ => return None,
        })
    }
}

/// A will message in CONNECT (DPS ignores it, but it must be parsed to reach the user name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Message.
    pub message: Vec<u8>,
    /// QoS (0–2).
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol name, `MQTT` for 3.1.1.
    pub protocol_name: String,
    /// Protocol level, 4 for 3.1.1. For any other level the rest of the packet is not parsed
    /// (its layout differs) and the fields below are empty.
    pub protocol_level: u8,
    /// Clean-session flag.
    pub clean_session: bool,
    /// Keep-alive in seconds (0 = none).
    pub keep_alive: u16,
    /// Client identifier.
    pub client_id: String,
    /// Will, if any.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<String>,
    /// Password (binary in MQTT; a SAS token for DPS).
    pub password: Option<Vec<u8>>,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag.
    pub dup: bool,
    /// QoS 0 or 1 (QoS 2 is refused by the decoder).
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name.
    pub topic: String,
    /// Packet identifier, present exactly when `qos > 0`.
    pub packet_id: Option<u16>,
    /// Application payload.
    pub payload: Vec<u8>,
}

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (client → server).
    Connect(Connect),
    /// CONNACK (server → client).
    ConnAck {
        /// Session-present flag (always false from DPS).
        session_present: bool,
        /// Return code.
        code: ConnectReturnCode,
    },
    /// PUBLISH (both ways).
    Publish(Publish),
    /// PUBACK (both ways).
    PubAck(u16),
    /// SUBSCRIBE (client → server): packet ID and (filter, requested QoS) pairs.
    Subscribe {
        /// Packet identifier.
        packet_id: u16,
        /// Topic filters with their requested QoS.
        filters: Vec<(String, u8)>,
    },
    /// SUBACK (server → client): packet ID and a return code per filter (0–2, or 0x80).
    SubAck {
        /// Packet identifier.
        packet_id: u16,
        /// Granted QoS per filter, or 0x80 for failure.
        return_codes: Vec<u8>,
    },
    /// UNSUBSCRIBE (client → server).
    Unsubscribe {
        /// Packet identifier.
        packet_id: u16,
        /// Topic filters.
        filters: Vec<String>,
    },
    /// UNSUBACK (server → client).
    UnsubAck(u16),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect,
}

impl Packet {
    /// The packet's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck { .. } => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::Subscribe { .. } => "SUBSCRIBE",
            Packet::SubAck { .. } => "SUBACK",
            Packet::Unsubscribe { .. } => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect => "DISCONNECT",
        }
    }
}

/// Why bytes are not a valid MQTT 3.1.1 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The remaining-length field is longer than four bytes or otherwise broken.
    BadRemainingLength,
    /// The packet is larger than the limit.
    TooLarge {
        /// Size of the whole packet in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A packet type this codec does not handle (PUBREC, PUBREL, PUBCOMP, AUTH, reserved).
    UnsupportedPacketType(u8),
    /// QoS 2 publishes are not supported by DPS.
    QoS2NotSupported,
    /// Anything else the spec calls malformed; the text says what.
    Malformed(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadRemainingLength => write!(f, "malformed remaining length"),
            DecodeError::TooLarge { size, limit } => {
                write!(f, "packet of {size} bytes is larger than the limit of {limit} bytes")
            }
            DecodeError::UnsupportedPacketType(t) => write!(f, "unsupported MQTT packet type {t}"),
            DecodeError::QoS2NotSupported => write!(f, "QoS 2 is not supported; publish with QoS 0 or 1"),
            DecodeError::Malformed(m) => write!(f, "malformed packet: {m}"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn malformed(m: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(m.into())
}

/// Reads the remaining length at `buf[1..]`: `Ok(None)` when more bytes are needed, else
/// (length, bytes used by the field).
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else { return Ok(None) };
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // 3.1.1 §2.2.3: the minimum number of bytes must be used.
            if i > 0 && byte == 0 {
                return Err(DecodeError::BadRemainingLength);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::BadRemainingLength)
}

/// Decodes one packet from the front of `buf`. `Ok(None)`: more bytes are needed (nothing is
/// consumed). `Ok(Some((packet, n)))`: the packet took the first `n` bytes. Packets larger
/// than `max_packet_bytes` are refused as soon as their header says so.
pub fn decode(buf: &[u8], max_packet_bytes: usize) -> Result<Option<(Packet, usize)>, DecodeError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let Some((len, len_bytes)) = remaining_length(buf)? else { return Ok(None) };
    let total = 1 + len_bytes + len;
    if total > max_packet_bytes {
        return Err(DecodeError::TooLarge { size: total, limit: max_packet_bytes });
    }
    let Some(body) = buf.get(1 + len_bytes..total) else { return Ok(None) };
    let packet = decode_body(first, body)?;
    Ok(Some((packet, total)))
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| malformed(format!("{} is truncated", self.what)))?;
        self.buf = rest;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::from(self.u16()?);
        if self.buf.len() < n {
            return Err(malformed(format!("{}: a length prefix points past the end of the packet", self.what)));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.bytes()?;
        let s = std::str::from_utf8(raw).map_err(|_| malformed(format!("{}: a string is not UTF-8", self.what)))?;
        // 3.1.1 §1.5.3: U+0000 must not appear.
        if s.contains('\0') {
            return Err(malformed(format!("{}: a string contains U+0000", self.what)));
        }
        Ok(s.to_string())
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn done(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(format!("{} has {} unexpected trailing bytes", self.what, self.buf.len())))
        }
    }
}

fn expect_flags(first: u8, flags: u8, what: &str) -> Result<(), DecodeError> {
    if first & 0x0f != flags {
        return Err(malformed(format!("{what} has reserved flag bits {:#06b}, expected {flags:#06b}", first & 0x0f)));
    }
    Ok(())
}

fn decode_body(first: u8, body: &[u8]) -> Result<Packet, DecodeError> {
    let kind = first >> 4;
    match kind {
        1 => {
            expect_flags(first, 0, "CONNECT")?;
            decode_connect(Reader { buf: body, what: "CONNECT" })
        }
        2 => {
            expect_flags(first, 0, "CONNACK")?;
            let mut r = Reader { buf: body, what: "CONNACK" };
            let ack_flags = r.u8()?;
            if ack_flags & 0xfe != 0 {
                return Err(malformed("CONNACK has reserved acknowledge flags set"));
            }
            let code = r.u8()?;
            r.done()?;
            let code =
                ConnectReturnCode::from_u8(code).ok_or_else(|| malformed(format!("CONNACK return code {code}")))?;
            Ok(Packet::ConnAck { session_present: ack_flags & 1 == 1, code })
        }
        3 => decode_publish(first, body),
        4 => {
            expect_flags(first, 0, "PUBACK")?;
            let mut r = Reader { buf: body, what: "PUBACK" };
            let id = r.u16()?;
            r.done()?;
            Ok(Packet::PubAck(id))
        }
        8 => {
            expect_flags(first, 0b0010, "SUBSCRIBE")?;
            let mut r = Reader { buf: body, what: "SUBSCRIBE" };
            let packet_id = r.u16()?;
            let mut filters = Vec::new();
            while !r.buf.is_empty() {
                let filter = r.string()?;
                let qos = r.u8()?;
                if qos > 2 {
                    return Err(malformed(format!("SUBSCRIBE requests QoS byte {qos:#04x}")));
                }
                filters.push((filter, qos));
            }
            if filters.is_empty() {
                return Err(malformed("SUBSCRIBE has no topic filter"));
            }
            Ok(Packet::Subscribe { packet_id, filters })
        }
        9 => {
            expect_flags(first, 0, "SUBACK")?;
            let mut r = Reader { buf: body, what: "SUBACK" };
            let packet_id = r.u16()?;
            let return_codes = r.rest().to_vec();
            if return_codes.is_empty() || return_codes.iter().any(|&c| c > 2 && c != 0x80) {
                return Err(malformed("SUBACK return codes"));
            }
            Ok(Packet::SubAck { packet_id, return_codes })
        }
        10 => {
            expect_flags(first, 0b0010, "UNSUBSCRIBE")?;
            let mut r = Reader { buf: body, what: "UNSUBSCRIBE" };
            let packet_id = r.u16()?;
            let mut filters = Vec::new();
            while !r.buf.is_empty() {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(malformed("UNSUBSCRIBE has no topic filter"));
            }
            Ok(Packet::Unsubscribe { packet_id, filters })
        }
        11 => {
            expect_flags(first, 0, "UNSUBACK")?;
            let mut r = Reader { buf: body, what: "UNSUBACK" };
            let id = r.u16()?;
            r.done()?;
            Ok(Packet::UnsubAck(id))
        }
        12..=14 => {
            let (packet, what) = match kind {
                12 => (Packet::PingReq, "PINGREQ"),
                13 => (Packet::PingResp, "PINGRESP"),
                _ => (Packet::Disconnect, "DISCONNECT"),
            };
            expect_flags(first, 0, what)?;
            if !body.is_empty() {
                return Err(malformed(format!("{what} must have no body")));
            }
            Ok(packet)
        }
        other => Err(DecodeError::UnsupportedPacketType(other)),
    }
}

fn decode_connect(mut r: Reader<'_>) -> Result<Packet, DecodeError> {
    let protocol_name = r.string()?;
    let protocol_level = r.u8()?;
    if protocol_level != PROTOCOL_LEVEL_3_1_1 || protocol_name != "MQTT" {
        // Another protocol version: the rest has another layout; report what was asked for.
        return Ok(Packet::Connect(Connect {
            protocol_name,
            protocol_level,
            clean_session: false,
            keep_alive: 0,
            client_id: String::new(),
            will: None,
            username: None,
            password: None,
        }));
    }
    let flags = r.u8()?;
    if flags & 1 != 0 {
        return Err(malformed("CONNECT reserved flag is set"));
    }
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let has_password = flags & 0b0100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(malformed("CONNECT sets will QoS or retain without a will"));
    }
    if will_qos > 2 {
        return Err(malformed("CONNECT will QoS is 3"));
    }
    if has_password && !has_username {
        return Err(malformed("CONNECT has a password but no user name"));
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?;
    let will = if will_flag {
        Some(Will { topic: r.string()?, message: r.bytes()?.to_vec(), qos: will_qos, retain: will_retain })
    } else {
        None
    };
    let username = if has_username { Some(r.string()?) } else { None };
    let password = if has_password { Some(r.bytes()?.to_vec()) } else { None };
    r.done()?;
    Ok(Packet::Connect(Connect {
        protocol_name,
        protocol_level,
        clean_session: flags & 0b10 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
    }))
}

fn decode_publish(first: u8, body: &[u8]) -> Result<Packet, DecodeError> {
    let qos = (first >> 1) & 0b11;
    let dup = first & 0b1000 != 0;
    match qos {
        0 if dup => return Err(malformed("PUBLISH with QoS 0 has DUP set")),
        0 | 1 => {}
        2 => return Err(DecodeError::QoS2NotSupported),
        _ => return Err(malformed("PUBLISH has QoS 3")),
    }
    let mut r = Reader { buf: body, what: "PUBLISH" };
    let topic = r.string()?;
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err(malformed("PUBLISH topic is empty or has wildcards"));
    }
    let packet_id = if qos > 0 {
        let id = r.u16()?;
        if id == 0 {
            return Err(malformed("PUBLISH packet identifier is 0"));
        }
        Some(id)
    } else {
        None
    };
    Ok(Packet::Publish(Publish { dup, qos, retain: first & 1 != 0, topic, packet_id, payload: r.rest().to_vec() }))
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError(pub String);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot encode MQTT packet: {}", self.0)
    }
}

impl std::error::Error for EncodeError {}

/// Where a packet body goes: first a [`Count`] (the size, and every check), then the output.
trait Sink {
    fn put(&mut self, b: &[u8]);
}

/// Counts the bytes of a body without writing them.
struct Count(usize);

impl Sink for Count {
    fn put(&mut self, b: &[u8]) {
        self.0 = self.0.saturating_add(b.len());
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

struct Writer<'a, W>(&'a mut W);

impl<W: Sink> Writer<'_, W> {
    fn u8(&mut self, v: u8) {
        self.0.put(&[v]);
    }

    fn u16(&mut self, v: u16) {
        self.0.put(&v.to_be_bytes());
    }

    fn raw(&mut self, b: &[u8]) {
        self.0.put(b);
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        let n = u16::try_from(b.len()).map_err(|_| EncodeError(format!("a field of {} bytes (max 65535)", b.len())))?;
        self.u16(n);
        self.0.put(b);
        Ok(())
    }
}

/// Bytes the remaining-length field takes for a body of `len` bytes (at most 4 when
/// `len <= MAX_REMAINING_LENGTH`).
fn remaining_length_bytes(mut len: usize) -> usize {
    let mut n = 1;
    while len >= 128 {
        len /= 128;
        n += 1;
    }
    n
}

impl Packet {
    /// Encodes the packet into one buffer of exactly its size (a single allocation).
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        // First pass: the body's size and every check; the second cannot fail after it.
        let mut count = Count(0);
        let first = self.encode_body(&mut Writer(&mut count))?;
        let body_len = count.0;
        if body_len > MAX_REMAINING_LENGTH {
            return Err(EncodeError(format!("a packet body of {body_len} bytes")));
        }
        let mut out = Vec::with_capacity(1 + remaining_length_bytes(body_len) + body_len);
        out.push(first);
        let mut len = body_len;
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                break;
            }
        }
        self.encode_body(&mut Writer(&mut out))?;
        debug_assert_eq!(out.len(), 1 + remaining_length_bytes(body_len) + body_len);
        Ok(out)
    }

    /// Writes the body (everything after the fixed header) to `w`; the first header byte.
    fn encode_body<W: Sink>(&self, w: &mut Writer<'_, W>) -> Result<u8, EncodeError> {
        Ok(match self {
            Packet::Connect(c) => {
                w.bytes(c.protocol_name.as_bytes())?;
                w.u8(c.protocol_level);
                let mut flags = 0u8;
                if c.clean_session {
                    flags |= 0b10;
                }
                if let Some(will) = &c.will {
                    flags |= 0b100 | ((will.qos & 0b11) << 3);
                    if will.retain {
                        flags |= 0b0010_0000;
                    }
                }
                if c.password.is_some() {
                    flags |= 0b0100_0000;
                }
                if c.username.is_some() {
                    flags |= 0b1000_0000;
                }
                w.u8(flags);
                w.u16(c.keep_alive);
                w.bytes(c.client_id.as_bytes())?;
                if let Some(will) = &c.will {
                    w.bytes(will.topic.as_bytes())?;
                    w.bytes(&will.message)?;
                }
                if let Some(u) = &c.username {
                    w.bytes(u.as_bytes())?;
                }
                if let Some(p) = &c.password {
                    w.bytes(p)?;
                }
                0x10
            }
            Packet::ConnAck { session_present, code } => {
                w.u8(u8::from(*session_present));
                w.u8(*code as u8);
                0x20
            }
            Packet::Publish(p) => {
                if p.qos > 1 || p.packet_id.is_some() != (p.qos > 0) {
                    return Err(EncodeError("PUBLISH needs QoS 0 without, or QoS 1 with, a packet id".into()));
                }
                w.bytes(p.topic.as_bytes())?;
                if let Some(id) = p.packet_id {
                    w.u16(id);
                }
                w.raw(&p.payload);
                0x30 | (u8::from(p.dup) << 3) | (p.qos << 1) | u8::from(p.retain)
            }
            Packet::PubAck(id) => {
                w.u16(*id);
                0x40
            }
            Packet::Subscribe { packet_id, filters } => {
                w.u16(*packet_id);
                for (f, q) in filters {
                    w.bytes(f.as_bytes())?;
                    w.u8(*q);
                }
                0x82
            }
            Packet::SubAck { packet_id, return_codes } => {
                w.u16(*packet_id);
                w.raw(return_codes);
                0x90
            }
            Packet::Unsubscribe { packet_id, filters } => {
                w.u16(*packet_id);
                for f in filters {
                    w.bytes(f.as_bytes())?;
                }
                0xa2
            }
            Packet::UnsubAck(id) => {
                w.u16(*id);
                0xb0
            }
            Packet::PingReq => 0xc0,
            Packet::PingResp => 0xd0,
            Packet::Disconnect => 0xe0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect() -> Connect {
        Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            clean_session: true,
            keep_alive: 180,
            client_id: "dev-1".into(),
            will: None,
            username: Some("0ne00000001/registrations/dev-1/api-version=2019-03-31".into()),
            password: Some(b"SharedAccessSignature sr=x&sig=y&se=1".to_vec()),
        }
    }

    #[test]
    fn every_packet_round_trips() {
        let packets = vec![
            Packet::Connect(connect()),
            Packet::Connect(Connect {
                will: Some(Will { topic: "w".into(), message: vec![1, 2], qos: 1, retain: true }),
                username: None,
                password: None,
                ..connect()
            }),
            Packet::ConnAck { session_present: false, code: ConnectReturnCode::NotAuthorized },
            Packet::Publish(Publish {
                dup: false,
                qos: 1,
                retain: false,
                topic: "$dps/registrations/PUT/iotdps-register/?$rid=1".into(),
                packet_id: Some(7),
                payload: b"{}".to_vec(),
            }),
            Packet::Publish(Publish {
                dup: false,
                qos: 0,
                retain: true,
                topic: "t".into(),
                packet_id: None,
                payload: vec![0; 300],
            }),
            Packet::PubAck(7),
            Packet::Subscribe { packet_id: 1, filters: vec![("$dps/registrations/res/#".into(), 1)] },
            Packet::SubAck { packet_id: 1, return_codes: vec![1, 0x80] },
            Packet::Unsubscribe { packet_id: 2, filters: vec!["a".into(), "b".into()] },
            Packet::UnsubAck(2),
            Packet::PingReq,
            Packet::PingResp,
            Packet::Disconnect,
        ];
        for p in packets {
            let bytes = p.encode().unwrap();
            let (back, used) = decode(&bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(back, p);
            assert_eq!(used, bytes.len());
            // Every strict prefix asks for more bytes.
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut], 1 << 20), Ok(None), "{} cut at {cut}", p.name());
            }
        }
    }

    #[test]
    fn encode_writes_the_known_bytes_into_one_exact_buffer() {
        let sub = Packet::Subscribe { packet_id: 1, filters: vec![("a/#".into(), 1)] };
        assert_eq!(sub.encode().unwrap(), [0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'#', 0x01]);
        assert_eq!(Packet::PubAck(0x1234).encode().unwrap(), [0x40, 0x02, 0x12, 0x34]);
        assert_eq!(Packet::PingReq.encode().unwrap(), [0xc0, 0x00]);
        // Bodies on both sides of every remaining-length size step.
        for body in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let payload_len = body.saturating_sub(3);
            let p = Packet::Publish(Publish {
                dup: false,
                qos: 0,
                retain: false,
                topic: "t".into(),
                packet_id: None,
                payload: vec![7; payload_len],
            });
            let bytes = p.encode().unwrap();
            assert_eq!(bytes.len(), bytes.capacity(), "body {body}: the buffer is allocated at its final size");
            assert_eq!(bytes.len(), 1 + remaining_length_bytes(payload_len + 3) + payload_len + 3);
            let (back, used) = decode(&bytes, 1 << 23).unwrap().unwrap();
            assert_eq!((back, used), (p, bytes.len()));
        }
    }

    #[test]
    fn encode_errors_are_unchanged() {
        let long = "x".repeat(70_000);
        let p = Packet::Subscribe { packet_id: 1, filters: vec![(long, 0)] };
        assert_eq!(
            p.encode().unwrap_err().to_string(),
            "cannot encode MQTT packet: a field of 70000 bytes (max 65535)"
        );
        let p = Packet::Publish(Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: "t".into(),
            packet_id: None,
            payload: Vec::new(),
        });
        assert!(p.encode().unwrap_err().0.contains("QoS 1 with"));
    }

    #[test]
    fn two_packets_in_one_buffer() {
        let mut bytes = Packet::PingReq.encode().unwrap();
        bytes.extend(Packet::PubAck(3).encode().unwrap());
        let (p, n) = decode(&bytes, 100).unwrap().unwrap();
        assert_eq!((p, n), (Packet::PingReq, 2));
        assert_eq!(decode(&bytes[n..], 100).unwrap().unwrap().0, Packet::PubAck(3));
    }

    #[test]
    fn malformed_packets_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xc1, 0x00], "reserved flag bits"),
            (vec![0x80, 0x02, 0x00, 0x01], "reserved flag bits"),
            (vec![0x34, 0x05, 0x00, 0x01, b't', 0x00, 0x01], "QoS 2"),
            (vec![0x36, 0x03, 0x00, 0x01, b't'], "QoS 3"),
            (vec![0x38, 0x03, 0x00, 0x01, b't'], "DUP"),
            (vec![0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x00], "identifier is 0"),
            (vec![0x30, 0x03, 0x00, 0x01, b'#'], "wildcards"),
            (vec![0x30, 0x03, 0x00, 0x05, b't'], "past the end"),
            (vec![0x30, 0x03, 0x00, 0x01, 0xff], "UTF-8"),
            (vec![0x30, 0x03, 0x00, 0x01, 0x00], "U+0000"),
            (vec![0x82, 0x02, 0x00, 0x01], "no topic filter"),
            (vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03], "QoS byte"),
            (vec![0xc0, 0x01, 0x00], "no body"),
            (vec![0x40, 0x03, 0x00, 0x01, 0x02], "trailing"),
            (vec![0x50, 0x02, 0x00, 0x01], "type 5"),
            (vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], "remaining length"),
            (vec![0x30, 0x80, 0x00], "remaining length"),
        ];
        for (bytes, needle) in cases {
            let err = decode(&bytes, 1 << 20).unwrap_err();
            assert!(err.to_string().contains(needle), "{bytes:02x?}: {err}");
        }
        // A CONNECT with the reserved bit, a password without a user name, a will QoS without a will.
        for flags in [0b0000_0011u8, 0b0100_0010, 0b0000_1010] {
            let mut bytes = vec![0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x3c, 0x00, 0x00];
            bytes[1] = (bytes.len() - 2) as u8;
            assert!(matches!(decode(&bytes, 100), Err(DecodeError::Malformed(_))), "flags {flags:#010b}");
        }
    }

    #[test]
    fn size_limit_applies_before_the_body_arrives() {
        // Header announces 1000 bytes; only the header is here.
        let err = decode(&[0x30, 0xe8, 0x07], 512).unwrap_err();
        assert_eq!(err, DecodeError::TooLarge { size: 1003, limit: 512 });
    }

    #[test]
    fn other_protocol_levels_are_reported_not_parsed() {
        // MQTT 5 CONNECT (level 5, then properties).
        let bytes = [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x00];
        let (p, _) = decode(&bytes, 100).unwrap().unwrap();
        let Packet::Connect(c) = p else { panic!("{p:?}") };
        assert_eq!(c.protocol_level, 5);
        // MQTT 3.1 ("MQIsdp", level 3).
        let bytes = [0x10, 0x0c, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c];
        let (p, _) = decode(&bytes, 100).unwrap().unwrap();
        assert!(matches!(p, Packet::Connect(Connect { protocol_level: 3, .. })));
    }
}
