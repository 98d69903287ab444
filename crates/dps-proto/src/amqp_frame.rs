//! AMQP 1.0 frames and performatives (OASIS AMQP 1.0 part 2, "Transport", and the SASL
//! frames of part 5, "Security"), the subset a Device Provisioning Service exchanges.
//!
//! [`decode_frame`] cuts one frame from the front of a buffer (or says that more bytes are
//! needed) and decodes its performative; [`Frame::encode`] writes one. Decoding applies the
//! specification's defaults to absent or null fields and names the performative and field in
//! every error. Values are in [`crate::amqp`], messages (transfer payloads) in
//! [`crate::amqp_message`].

use crate::amqp::{self, descriptor_code, DecodeError, Value};

/// The protocol header of plain AMQP 1.0 (protocol id 0).
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// The protocol header of the SASL security layer (protocol id 3).
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// The protocol header of the TLS security layer (protocol id 2).
pub const TLS_HEADER: [u8; 8] = *b"AMQP\x02\x01\x00\x00";
/// The smallest max-frame-size a peer may announce (spec 2.7.1).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

/// SASL outcome: authentication succeeded.
pub const SASL_OK: u8 = 0;
/// SASL outcome: authentication failed (bad credentials).
pub const SASL_AUTH: u8 = 1;
/// SASL outcome: a system error.
pub const SASL_SYS: u8 = 2;
/// SASL outcome: a permanent system error.
pub const SASL_SYS_PERM: u8 = 3;
/// SASL outcome: a transient system error.
pub const SASL_SYS_TEMP: u8 = 4;

/// Frame type of AMQP frames.
const FRAME_TYPE_AMQP: u8 = 0;
/// Frame type of SASL frames.
const FRAME_TYPE_SASL: u8 = 1;

/// Which protocol an 8-byte protocol header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeader {
    /// `AMQP 0 1.0.0`: plain AMQP.
    Amqp,
    /// `AMQP 3 1.0.0`: the SASL layer.
    Sasl,
    /// `AMQP 2 1.0.0`: the TLS layer.
    Tls,
    /// Anything else (another protocol id or version, or not AMQP at all).
    Unsupported([u8; 8]),
}

impl ProtocolHeader {
    /// Classifies the first eight bytes a peer sent.
    pub fn parse(h: &[u8; 8]) -> ProtocolHeader {
        if *h == AMQP_HEADER {
            ProtocolHeader::Amqp
        } else if *h == SASL_HEADER {
            ProtocolHeader::Sasl
        } else if *h == TLS_HEADER {
            ProtocolHeader::Tls
        } else {
            ProtocolHeader::Unsupported(*h)
        }
    }

    /// The eight bytes of this header.
    pub fn bytes(&self) -> [u8; 8] {
        match self {
            ProtocolHeader::Amqp => AMQP_HEADER,
            ProtocolHeader::Sasl => SASL_HEADER,
            ProtocolHeader::Tls => TLS_HEADER,
            ProtocolHeader::Unsupported(h) => *h,
        }
    }
}

/// Why bytes are not a valid AMQP frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame's size field exceeds the maximum frame size.
    #[error("frame of {size} bytes is larger than the maximum frame size of {max} bytes")]
    TooLarge {
        /// The size field.
        size: u32,
        /// The maximum frame size in force.
        max: u32,
    },
    /// The frame's size field is smaller than the 8-byte frame header.
    #[error("frame size {size} is smaller than the 8-byte frame header")]
    TooSmall {
        /// The size field.
        size: u32,
    },
    /// The data offset is below 2 or points past the end of the frame.
    #[error("frame data offset {doff} is invalid for a frame of {size} bytes (must be at least 2 and at most size/4)")]
    BadDataOffset {
        /// The data offset (in 4-byte words).
        doff: u8,
        /// The frame size.
        size: u32,
    },
    /// A frame type other than 0 (AMQP) and 1 (SASL).
    #[error("unknown frame type {0} (0 is AMQP, 1 is SASL)")]
    UnknownFrameType(u8),
    /// The frame body is not a valid AMQP value.
    #[error("malformed frame body: {0}")]
    Decode(#[from] DecodeError),
    /// The body is not a described list with a known performative descriptor.
    #[error("unknown {layer} performative: {descriptor}")]
    UnknownPerformative {
        /// "AMQP" or "SASL".
        layer: &'static str,
        /// The descriptor (or value) found, rendered.
        descriptor: String,
    },
    /// A SASL performative in an AMQP frame or an AMQP performative in a SASL frame.
    #[error("{frame} frame carries the {performative} performative of the other layer")]
    WrongFrameType {
        /// The frame type: "AMQP" or "SASL".
        frame: &'static str,
        /// The performative found.
        performative: &'static str,
    },
    /// A SASL frame with an empty body (only AMQP frames may be empty heartbeats).
    #[error("empty SASL frame")]
    EmptySaslFrame,
    /// Bytes after a performative that carries no payload.
    #[error("{len} unexpected bytes after the {performative} performative (only transfer carries a payload)")]
    TrailingBytes {
        /// The performative.
        performative: &'static str,
        /// How many bytes were left.
        len: usize,
    },
    /// A mandatory field is absent or null.
    #[error("{performative}: mandatory field {field} is missing")]
    MissingField {
        /// The performative or composite type.
        performative: &'static str,
        /// The field's name in the specification.
        field: &'static str,
    },
    /// A field holds a value of the wrong type.
    #[error("{performative}: field {field} must be {expected}, not {got}")]
    WrongType {
        /// The performative or composite type.
        performative: &'static str,
        /// The field's name in the specification.
        field: &'static str,
        /// The type the specification requires.
        expected: &'static str,
        /// The type found.
        got: &'static str,
    },
    /// Anything else; the text says what.
    #[error("invalid frame: {0}")]
    Invalid(String),
}

/// One AMQP frame.
// Frames are moved rarely and short-lived; boxing the performative would cost an allocation
// per frame and an awkward API.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// An AMQP frame with an empty body: a heartbeat.
    Heartbeat {
        /// The channel (meaningless for heartbeats; normally 0).
        channel: u16,
    },
    /// An AMQP frame with a performative.
    Amqp {
        /// The channel.
        channel: u16,
        /// The performative.
        performative: Performative,
        /// The bytes after the performative: a transfer's message (part); empty otherwise.
        payload: Vec<u8>,
    },
    /// A SASL frame (always channel 0 on the wire; the decoder ignores the channel).
    Sasl(Sasl),
}

/// The link role: `false` on the wire is sender, `true` is receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// The sending end of a link.
    #[default]
    Sender,
    /// The receiving end of a link.
    Receiver,
}

impl Role {
    /// The wire boolean (`true` = receiver).
    pub fn as_bool(self) -> bool {
        self == Role::Receiver
    }

    /// The role of a wire boolean.
    pub fn from_bool(b: bool) -> Role {
        if b {
            Role::Receiver
        } else {
            Role::Sender
        }
    }
}

/// `open` (0x10).
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    /// container-id (mandatory).
    pub container_id: String,
    /// hostname.
    pub hostname: Option<String>,
    /// max-frame-size; default `u32::MAX`.
    pub max_frame_size: u32,
    /// channel-max; default 65535.
    pub channel_max: u16,
    /// idle-time-out in milliseconds.
    pub idle_time_out: Option<u32>,
    /// offered-capabilities.
    pub offered_capabilities: Vec<String>,
    /// desired-capabilities.
    pub desired_capabilities: Vec<String>,
    /// properties (a map with symbol keys).
    pub properties: Vec<(Value, Value)>,
}

impl Default for Open {
    fn default() -> Self {
        Open {
            container_id: String::new(),
            hostname: None,
            max_frame_size: u32::MAX,
            channel_max: u16::MAX,
            idle_time_out: None,
            offered_capabilities: Vec::new(),
            desired_capabilities: Vec::new(),
            properties: Vec::new(),
        }
    }
}

/// `begin` (0x11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// remote-channel: set when answering a peer's begin.
    pub remote_channel: Option<u16>,
    /// next-outgoing-id (mandatory).
    pub next_outgoing_id: u32,
    /// incoming-window (mandatory).
    pub incoming_window: u32,
    /// outgoing-window (mandatory).
    pub outgoing_window: u32,
    /// handle-max; default `u32::MAX`.
    pub handle_max: u32,
}

impl Default for Begin {
    fn default() -> Self {
        Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 0,
            outgoing_window: 0,
            handle_max: u32::MAX,
        }
    }
}

/// A link's source (0x28) or target (0x29).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Terminus {
    /// address (string or symbol on the wire; encoded as a string).
    pub address: Option<String>,
    /// The fields after the address, verbatim, so they can be echoed.
    pub rest: Vec<Value>,
}

/// `attach` (0x12).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Attach {
    /// name (mandatory).
    pub name: String,
    /// handle (mandatory).
    pub handle: u32,
    /// role (mandatory).
    pub role: Role,
    /// snd-settle-mode (0 unsettled, 1 settled, 2 mixed; absent means mixed).
    pub snd_settle_mode: Option<u8>,
    /// rcv-settle-mode (0 first, 1 second; absent means first).
    pub rcv_settle_mode: Option<u8>,
    /// source; encoded with descriptor 0x28.
    pub source: Option<Terminus>,
    /// target; encoded with descriptor 0x29.
    pub target: Option<Terminus>,
    /// unsettled (a map), verbatim.
    pub unsettled: Option<Value>,
    /// incomplete-unsettled; default false.
    pub incomplete_unsettled: bool,
    /// initial-delivery-count (mandatory for senders by the spec; not enforced).
    pub initial_delivery_count: Option<u32>,
    /// max-message-size.
    pub max_message_size: Option<u64>,
    /// offered-capabilities.
    pub offered_capabilities: Vec<String>,
    /// desired-capabilities.
    pub desired_capabilities: Vec<String>,
    /// properties.
    pub properties: Vec<(Value, Value)>,
}

/// `flow` (0x13).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Flow {
    /// next-incoming-id.
    pub next_incoming_id: Option<u32>,
    /// incoming-window (mandatory).
    pub incoming_window: u32,
    /// next-outgoing-id (mandatory).
    pub next_outgoing_id: u32,
    /// outgoing-window (mandatory).
    pub outgoing_window: u32,
    /// handle: set for link flow, absent for session flow.
    pub handle: Option<u32>,
    /// delivery-count.
    pub delivery_count: Option<u32>,
    /// link-credit.
    pub link_credit: Option<u32>,
    /// available.
    pub available: Option<u32>,
    /// drain; default false.
    pub drain: bool,
    /// echo; default false.
    pub echo: bool,
    /// properties.
    pub properties: Vec<(Value, Value)>,
}

/// `transfer` (0x14); the message bytes are the frame's payload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transfer {
    /// handle (mandatory).
    pub handle: u32,
    /// delivery-id (mandatory on the first transfer of a delivery).
    pub delivery_id: Option<u32>,
    /// delivery-tag.
    pub delivery_tag: Option<Vec<u8>>,
    /// message-format (0 for AMQP messages).
    pub message_format: Option<u32>,
    /// settled.
    pub settled: Option<bool>,
    /// more: further transfers of this delivery follow; default false.
    pub more: bool,
    /// rcv-settle-mode.
    pub rcv_settle_mode: Option<u8>,
    /// state.
    pub state: Option<DeliveryState>,
    /// resume; default false.
    pub resume: bool,
    /// aborted; default false.
    pub aborted: bool,
    /// batchable; default false.
    pub batchable: bool,
}

/// `disposition` (0x15).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Disposition {
    /// role (mandatory).
    pub role: Role,
    /// first (mandatory).
    pub first: u32,
    /// last; absent means `first`.
    pub last: Option<u32>,
    /// settled; default false.
    pub settled: bool,
    /// state.
    pub state: Option<DeliveryState>,
    /// batchable; default false.
    pub batchable: bool,
}

/// `detach` (0x16).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Detach {
    /// handle (mandatory).
    pub handle: u32,
    /// closed; default false.
    pub closed: bool,
    /// error.
    pub error: Option<AmqpError>,
}

/// `end` (0x17).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct End {
    /// error.
    pub error: Option<AmqpError>,
}

/// `close` (0x18).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Close {
    /// error.
    pub error: Option<AmqpError>,
}

/// `error` (0x1d).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AmqpError {
    /// condition, a symbol such as `amqp:unauthorized-access` (mandatory).
    pub condition: String,
    /// description.
    pub description: Option<String>,
    /// info: a map, encoded with the keys as given (symbols by convention).
    pub info: Vec<(Value, Value)>,
}

impl AmqpError {
    /// An error with a condition and a description and no info.
    pub fn new(condition: impl Into<String>, description: impl Into<String>) -> Self {
        AmqpError { condition: condition.into(), description: Some(description.into()), info: Vec::new() }
    }
}

/// The outcome or state of a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryState {
    /// `received` (0x23); its section number and offset are not kept (encoded as 0, 0).
    Received,
    /// `accepted` (0x24).
    Accepted,
    /// `rejected` (0x25) with its error.
    Rejected(Option<AmqpError>),
    /// `released` (0x26).
    Released,
    /// `modified` (0x27); its fields are not kept (encoded empty).
    Modified,
    /// Another descriptor code (a transactional state, …); its fields are not kept.
    Other(u64),
}

/// An AMQP performative.
#[derive(Debug, Clone, PartialEq)]
pub enum Performative {
    /// `open`.
    Open(Open),
    /// `begin`.
    Begin(Begin),
    /// `attach`.
    Attach(Attach),
    /// `flow`.
    Flow(Flow),
    /// `transfer`.
    Transfer(Transfer),
    /// `disposition`.
    Disposition(Disposition),
    /// `detach`.
    Detach(Detach),
    /// `end`.
    End(End),
    /// `close`.
    Close(Close),
}

/// A SASL frame body.
#[derive(Debug, Clone, PartialEq)]
pub enum Sasl {
    /// `sasl-mechanisms` (0x40): the mechanisms the server offers.
    Mechanisms(Vec<String>),
    /// `sasl-init` (0x41).
    Init {
        /// The mechanism chosen.
        mechanism: String,
        /// The initial response.
        initial_response: Option<Vec<u8>>,
        /// The host name the client wants.
        hostname: Option<String>,
    },
    /// `sasl-challenge` (0x42).
    Challenge(Vec<u8>),
    /// `sasl-response` (0x43).
    Response(Vec<u8>),
    /// `sasl-outcome` (0x44).
    Outcome {
        /// [`SASL_OK`], [`SASL_AUTH`], …
        code: u8,
        /// Additional data.
        additional_data: Option<Vec<u8>>,
    },
}

/// Decodes one frame from the front of `buf`: `Ok(None)` when `buf` does not hold a whole
/// frame yet, otherwise the frame and the bytes it used. A size field over `max_frame_size`
/// is refused as soon as its four bytes are present.
pub fn decode_frame(buf: &[u8], max_frame_size: u32) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(size_bytes) = buf.get(..4) else { return Ok(None) };
    let size = u32::from_be_bytes([size_bytes[0], size_bytes[1], size_bytes[2], size_bytes[3]]);
    if size > max_frame_size {
        return Err(FrameError::TooLarge { size, max: max_frame_size });
    }
    if size < 8 {
        return Err(FrameError::TooSmall { size });
    }
    let Some(frame) = buf.get(..size as usize) else { return Ok(None) };
    let (doff, frame_type, channel) = (frame[4], frame[5], u16::from_be_bytes([frame[6], frame[7]]));
    let body_start = usize::from(doff) * 4;
    if doff < 2 || body_start > frame.len() {
        return Err(FrameError::BadDataOffset { doff, size });
    }
    let body = frame.get(body_start..).unwrap_or_default();
    let frame = match frame_type {
        FRAME_TYPE_AMQP => {
            if body.is_empty() {
                Frame::Heartbeat { channel }
            } else {
                let (value, used) = amqp::decode(body)?;
                let performative = Performative::from_value(&value)?;
                let payload = body.get(used..).unwrap_or_default();
                if !payload.is_empty() && !matches!(performative, Performative::Transfer(_)) {
                    return Err(FrameError::TrailingBytes { performative: performative.name(), len: payload.len() });
                }
                Frame::Amqp { channel, performative, payload: payload.to_vec() }
            }
        }
        FRAME_TYPE_SASL => {
            if body.is_empty() {
                return Err(FrameError::EmptySaslFrame);
            }
            let (value, used) = amqp::decode(body)?;
            let sasl = Sasl::from_value(&value)?;
            if used != body.len() {
                return Err(FrameError::TrailingBytes { performative: sasl.name(), len: body.len() - used });
            }
            Frame::Sasl(sasl)
        }
        other => return Err(FrameError::UnknownFrameType(other)),
    };
    Ok(Some((frame, size as usize)))
}

impl Frame {
    /// An AMQP frame carrying `performative` and no payload.
    pub fn amqp(channel: u16, performative: Performative) -> Frame {
        Frame::Amqp { channel, performative, payload: Vec::new() }
    }

    /// Appends this frame (data offset 2, no extended header) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let (frame_type, channel) = match self {
            Frame::Heartbeat { channel } | Frame::Amqp { channel, .. } => (FRAME_TYPE_AMQP, *channel),
            Frame::Sasl(_) => (FRAME_TYPE_SASL, 0),
        };
        out.extend_from_slice(&[0, 0, 0, 0, 2, frame_type]);
        out.extend_from_slice(&channel.to_be_bytes());
        match self {
            Frame::Heartbeat { .. } => {}
            Frame::Amqp { performative, payload, .. } => {
                performative.to_value().encode(out);
                out.extend_from_slice(payload);
            }
            Frame::Sasl(sasl) => sasl.to_value().encode(out),
        }
        let size = (out.len() - start) as u32;
        if let Some(field) = out.get_mut(start..start + 4) {
            field.copy_from_slice(&size.to_be_bytes());
        }
    }

    /// This frame's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// The performative's name, or "heartbeat".
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Heartbeat { .. } => "heartbeat",
            Frame::Amqp { performative, .. } => performative.name(),
            Frame::Sasl(s) => s.name(),
        }
    }
}

/// The name of a descriptor code, for errors.
fn code_name(code: u64) -> &'static str {
    match code {
        0x10 => "open",
        0x11 => "begin",
        0x12 => "attach",
        0x13 => "flow",
        0x14 => "transfer",
        0x15 => "disposition",
        0x16 => "detach",
        0x17 => "end",
        0x18 => "close",
        0x40 => "sasl-mechanisms",
        0x41 => "sasl-init",
        0x42 => "sasl-challenge",
        0x43 => "sasl-response",
        0x44 => "sasl-outcome",
        _ => "unknown",
    }
}

/// Splits a described list into its descriptor code and fields.
fn composite(v: &Value) -> Option<(u64, &[Value])> {
    match v {
        Value::Described(d, inner) => match (descriptor_code(d), &**inner) {
            (Some(code), Value::List(fields)) => Some((code, fields)),
            _ => None,
        },
        _ => None,
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::Described(d, _) => match &**d {
            Value::Ulong(c) => format!("0x{c:x}"),
            Value::Symbol(s) => s.clone(),
            other => format!("a {} descriptor", other.type_name()),
        },
        other => format!("a {} instead of a described list", other.type_name()),
    }
}

impl Performative {
    /// The performative's name in the specification: "open", "begin", …
    pub fn name(&self) -> &'static str {
        match self {
            Performative::Open(_) => "open",
            Performative::Begin(_) => "begin",
            Performative::Attach(_) => "attach",
            Performative::Flow(_) => "flow",
            Performative::Transfer(_) => "transfer",
            Performative::Disposition(_) => "disposition",
            Performative::Detach(_) => "detach",
            Performative::End(_) => "end",
            Performative::Close(_) => "close",
        }
    }

    /// Reads a performative from its described list (numeric or symbolic descriptor).
    pub fn from_value(v: &Value) -> Result<Performative, FrameError> {
        let unknown = || FrameError::UnknownPerformative { layer: "AMQP", descriptor: render(v) };
        let (code, items) = composite(v).ok_or_else(unknown)?;
        let name = code_name(code);
        let f = Fields { name, items };
        Ok(match code {
            0x10 => Performative::Open(Open {
                container_id: f.string_req(0, "container-id")?,
                hostname: f.string(1, "hostname")?,
                max_frame_size: f.u32(2, "max-frame-size")?.unwrap_or(u32::MAX),
                channel_max: f.u16(3, "channel-max")?.unwrap_or(u16::MAX),
                idle_time_out: f.u32(4, "idle-time-out")?,
                offered_capabilities: f.symbols(7, "offered-capabilities")?,
                desired_capabilities: f.symbols(8, "desired-capabilities")?,
                properties: f.map(9, "properties")?,
            }),
            0x11 => Performative::Begin(Begin {
                remote_channel: f.u16(0, "remote-channel")?,
                next_outgoing_id: f.u32_req(1, "next-outgoing-id")?,
                incoming_window: f.u32_req(2, "incoming-window")?,
                outgoing_window: f.u32_req(3, "outgoing-window")?,
                handle_max: f.u32(4, "handle-max")?.unwrap_or(u32::MAX),
            }),
            0x12 => Performative::Attach(Attach {
                name: f.string_req(0, "name")?,
                handle: f.u32_req(1, "handle")?,
                role: Role::from_bool(f.bool(2, "role")?.ok_or_else(|| f.missing("role"))?),
                snd_settle_mode: f.u8(3, "snd-settle-mode")?,
                rcv_settle_mode: f.u8(4, "rcv-settle-mode")?,
                source: f.terminus(5, "source")?,
                target: f.terminus(6, "target")?,
                unsettled: f.get(7).cloned(),
                incomplete_unsettled: f.bool(8, "incomplete-unsettled")?.unwrap_or(false),
                initial_delivery_count: f.u32(9, "initial-delivery-count")?,
                max_message_size: f.u64(10, "max-message-size")?,
                offered_capabilities: f.symbols(11, "offered-capabilities")?,
                desired_capabilities: f.symbols(12, "desired-capabilities")?,
                properties: f.map(13, "properties")?,
            }),
            0x13 => Performative::Flow(Flow {
                next_incoming_id: f.u32(0, "next-incoming-id")?,
                incoming_window: f.u32_req(1, "incoming-window")?,
                next_outgoing_id: f.u32_req(2, "next-outgoing-id")?,
                outgoing_window: f.u32_req(3, "outgoing-window")?,
                handle: f.u32(4, "handle")?,
                delivery_count: f.u32(5, "delivery-count")?,
                link_credit: f.u32(6, "link-credit")?,
                available: f.u32(7, "available")?,
                drain: f.bool(8, "drain")?.unwrap_or(false),
                echo: f.bool(9, "echo")?.unwrap_or(false),
                properties: f.map(10, "properties")?,
            }),
            0x14 => Performative::Transfer(Transfer {
                handle: f.u32_req(0, "handle")?,
                delivery_id: f.u32(1, "delivery-id")?,
                delivery_tag: f.binary(2, "delivery-tag")?,
                message_format: f.u32(3, "message-format")?,
                settled: f.bool(4, "settled")?,
                more: f.bool(5, "more")?.unwrap_or(false),
                rcv_settle_mode: f.u8(6, "rcv-settle-mode")?,
                state: f.state(7, "state")?,
                resume: f.bool(8, "resume")?.unwrap_or(false),
                aborted: f.bool(9, "aborted")?.unwrap_or(false),
                batchable: f.bool(10, "batchable")?.unwrap_or(false),
            }),
            0x15 => Performative::Disposition(Disposition {
                role: Role::from_bool(f.bool(0, "role")?.ok_or_else(|| f.missing("role"))?),
                first: f.u32_req(1, "first")?,
                last: f.u32(2, "last")?,
                settled: f.bool(3, "settled")?.unwrap_or(false),
                state: f.state(4, "state")?,
                batchable: f.bool(5, "batchable")?.unwrap_or(false),
            }),
            0x16 => Performative::Detach(Detach {
                handle: f.u32_req(0, "handle")?,
                closed: f.bool(1, "closed")?.unwrap_or(false),
                error: f.error(2, "error")?,
            }),
            0x17 => Performative::End(End { error: f.error(0, "error")? }),
            0x18 => Performative::Close(Close { error: f.error(0, "error")? }),
            0x40..=0x44 => return Err(FrameError::WrongFrameType { frame: "AMQP", performative: name }),
            _ => return Err(unknown()),
        })
    }

    /// The performative as its described list.
    pub fn to_value(&self) -> Value {
        let (code, fields) = match self {
            Performative::Open(o) => (
                0x10,
                vec![
                    Value::String(o.container_id.clone()),
                    opt_string(&o.hostname),
                    if o.max_frame_size == u32::MAX { Value::Null } else { Value::Uint(o.max_frame_size) },
                    if o.channel_max == u16::MAX { Value::Null } else { Value::Ushort(o.channel_max) },
                    o.idle_time_out.map_or(Value::Null, Value::Uint),
                    Value::Null,
                    Value::Null,
                    symbols(&o.offered_capabilities),
                    symbols(&o.desired_capabilities),
                    map(&o.properties),
                ],
            ),
            Performative::Begin(b) => (
                0x11,
                vec![
                    b.remote_channel.map_or(Value::Null, Value::Ushort),
                    Value::Uint(b.next_outgoing_id),
                    Value::Uint(b.incoming_window),
                    Value::Uint(b.outgoing_window),
                    if b.handle_max == u32::MAX { Value::Null } else { Value::Uint(b.handle_max) },
                ],
            ),
            Performative::Attach(a) => (
                0x12,
                vec![
                    Value::String(a.name.clone()),
                    Value::Uint(a.handle),
                    Value::Bool(a.role.as_bool()),
                    a.snd_settle_mode.map_or(Value::Null, Value::Ubyte),
                    a.rcv_settle_mode.map_or(Value::Null, Value::Ubyte),
                    a.source.as_ref().map_or(Value::Null, |t| t.to_value(0x28)),
                    a.target.as_ref().map_or(Value::Null, |t| t.to_value(0x29)),
                    a.unsettled.clone().unwrap_or(Value::Null),
                    flag(a.incomplete_unsettled),
                    a.initial_delivery_count.map_or(Value::Null, Value::Uint),
                    a.max_message_size.map_or(Value::Null, Value::Ulong),
                    symbols(&a.offered_capabilities),
                    symbols(&a.desired_capabilities),
                    map(&a.properties),
                ],
            ),
            Performative::Flow(fl) => (
                0x13,
                vec![
                    fl.next_incoming_id.map_or(Value::Null, Value::Uint),
                    Value::Uint(fl.incoming_window),
                    Value::Uint(fl.next_outgoing_id),
                    Value::Uint(fl.outgoing_window),
                    fl.handle.map_or(Value::Null, Value::Uint),
                    fl.delivery_count.map_or(Value::Null, Value::Uint),
                    fl.link_credit.map_or(Value::Null, Value::Uint),
                    fl.available.map_or(Value::Null, Value::Uint),
                    flag(fl.drain),
                    flag(fl.echo),
                    map(&fl.properties),
                ],
            ),
            Performative::Transfer(t) => (
                0x14,
                vec![
                    Value::Uint(t.handle),
                    t.delivery_id.map_or(Value::Null, Value::Uint),
                    t.delivery_tag.clone().map_or(Value::Null, Value::Binary),
                    t.message_format.map_or(Value::Null, Value::Uint),
                    t.settled.map_or(Value::Null, Value::Bool),
                    flag(t.more),
                    t.rcv_settle_mode.map_or(Value::Null, Value::Ubyte),
                    t.state.as_ref().map_or(Value::Null, DeliveryState::to_value),
                    flag(t.resume),
                    flag(t.aborted),
                    flag(t.batchable),
                ],
            ),
            Performative::Disposition(d) => (
                0x15,
                vec![
                    Value::Bool(d.role.as_bool()),
                    Value::Uint(d.first),
                    d.last.map_or(Value::Null, Value::Uint),
                    flag(d.settled),
                    d.state.as_ref().map_or(Value::Null, DeliveryState::to_value),
                    flag(d.batchable),
                ],
            ),
            Performative::Detach(d) => (
                0x16,
                vec![Value::Uint(d.handle), flag(d.closed), d.error.as_ref().map_or(Value::Null, AmqpError::to_value)],
            ),
            Performative::End(e) => (0x17, vec![e.error.as_ref().map_or(Value::Null, AmqpError::to_value)]),
            Performative::Close(c) => (0x18, vec![c.error.as_ref().map_or(Value::Null, AmqpError::to_value)]),
        };
        amqp::described(code, trimmed(fields))
    }
}

impl Sasl {
    /// The frame's name in the specification: "sasl-mechanisms", "sasl-init", …
    pub fn name(&self) -> &'static str {
        match self {
            Sasl::Mechanisms(_) => "sasl-mechanisms",
            Sasl::Init { .. } => "sasl-init",
            Sasl::Challenge(_) => "sasl-challenge",
            Sasl::Response(_) => "sasl-response",
            Sasl::Outcome { .. } => "sasl-outcome",
        }
    }

    /// Reads a SASL frame body from its described list.
    pub fn from_value(v: &Value) -> Result<Sasl, FrameError> {
        let unknown = || FrameError::UnknownPerformative { layer: "SASL", descriptor: render(v) };
        let (code, items) = composite(v).ok_or_else(unknown)?;
        let name = code_name(code);
        let f = Fields { name, items };
        Ok(match code {
            0x40 => {
                let mechanisms = f.symbols(0, "sasl-server-mechanisms")?;
                if f.get(0).is_none() {
                    return Err(f.missing("sasl-server-mechanisms"));
                }
                Sasl::Mechanisms(mechanisms)
            }
            0x41 => Sasl::Init {
                mechanism: f.symbol_req(0, "mechanism")?,
                initial_response: f.binary(1, "initial-response")?,
                hostname: f.string(2, "hostname")?,
            },
            0x42 => Sasl::Challenge(f.binary(0, "challenge")?.ok_or_else(|| f.missing("challenge"))?),
            0x43 => Sasl::Response(f.binary(0, "response")?.ok_or_else(|| f.missing("response"))?),
            0x44 => Sasl::Outcome {
                code: f.u8(0, "code")?.ok_or_else(|| f.missing("code"))?,
                additional_data: f.binary(1, "additional-data")?,
            },
            0x10..=0x18 => return Err(FrameError::WrongFrameType { frame: "SASL", performative: name }),
            _ => return Err(unknown()),
        })
    }

    /// The SASL frame body as its described list.
    pub fn to_value(&self) -> Value {
        let (code, fields) = match self {
            Sasl::Mechanisms(m) => (0x40, vec![Value::Array(m.iter().map(|s| Value::Symbol(s.clone())).collect())]),
            Sasl::Init { mechanism, initial_response, hostname } => (
                0x41,
                vec![
                    Value::Symbol(mechanism.clone()),
                    initial_response.clone().map_or(Value::Null, Value::Binary),
                    opt_string(hostname),
                ],
            ),
            Sasl::Challenge(c) => (0x42, vec![Value::Binary(c.clone())]),
            Sasl::Response(r) => (0x43, vec![Value::Binary(r.clone())]),
            Sasl::Outcome { code, additional_data } => {
                (0x44, vec![Value::Ubyte(*code), additional_data.clone().map_or(Value::Null, Value::Binary)])
            }
        };
        amqp::described(code, trimmed(fields))
    }
}

impl Terminus {
    /// A terminus with just an address.
    pub fn with_address(address: impl Into<String>) -> Self {
        Terminus { address: Some(address.into()), rest: Vec::new() }
    }

    /// The terminus as a described list with descriptor `code` (0x28 source, 0x29 target).
    pub fn to_value(&self, code: u64) -> Value {
        let mut fields = Vec::with_capacity(1 + self.rest.len());
        fields.push(opt_string(&self.address));
        fields.extend(self.rest.iter().cloned());
        amqp::described(code, fields)
    }

    /// Reads a source or target (descriptor 0x28 or 0x29); `None` for null.
    pub fn from_value(v: &Value) -> Result<Option<Terminus>, FrameError> {
        if v.is_null() {
            return Ok(None);
        }
        match composite(v) {
            Some((0x28 | 0x29, items)) => {
                let f = Fields { name: "terminus", items };
                Ok(Some(Terminus {
                    address: f.string(0, "address")?,
                    rest: items.get(1..).unwrap_or_default().to_vec(),
                }))
            }
            _ => Err(FrameError::Invalid(format!("a source or target must be 0x28 or 0x29, not {}", render(v)))),
        }
    }
}

impl AmqpError {
    /// The error as its described list (0x1d).
    pub fn to_value(&self) -> Value {
        amqp::described(
            0x1d,
            trimmed(vec![Value::Symbol(self.condition.clone()), opt_string(&self.description), map(&self.info)]),
        )
    }

    /// Reads an error from its described list.
    pub fn from_value(v: &Value) -> Result<AmqpError, FrameError> {
        match composite(v) {
            Some((0x1d, items)) => {
                let f = Fields { name: "error", items };
                Ok(AmqpError {
                    condition: f.symbol_req(0, "condition")?,
                    description: f.string(1, "description")?,
                    info: f.map(2, "info")?,
                })
            }
            _ => Err(FrameError::Invalid(format!("an error must be described 0x1d, not {}", render(v)))),
        }
    }
}

impl DeliveryState {
    /// The state as its described list.
    pub fn to_value(&self) -> Value {
        match self {
            DeliveryState::Received => amqp::described(0x23, vec![Value::Uint(0), Value::Ulong(0)]),
            DeliveryState::Accepted => amqp::described(0x24, Vec::new()),
            DeliveryState::Rejected(e) => {
                amqp::described(0x25, e.as_ref().map(|e| vec![e.to_value()]).unwrap_or_default())
            }
            DeliveryState::Released => amqp::described(0x26, Vec::new()),
            DeliveryState::Modified => amqp::described(0x27, Vec::new()),
            DeliveryState::Other(code) => amqp::described(*code, Vec::new()),
        }
    }

    /// Reads a delivery state from its described list.
    pub fn from_value(v: &Value) -> Result<DeliveryState, FrameError> {
        let Some((code, items)) = composite(v) else {
            return Err(FrameError::Invalid(format!("a delivery state must be a described list, not {}", render(v))));
        };
        Ok(match code {
            0x23 => DeliveryState::Received,
            0x24 => DeliveryState::Accepted,
            0x25 => DeliveryState::Rejected(Fields { name: "rejected", items }.error(0, "error")?),
            0x26 => DeliveryState::Released,
            0x27 => DeliveryState::Modified,
            other => DeliveryState::Other(other),
        })
    }
}

fn flag(b: bool) -> Value {
    if b {
        Value::Bool(true)
    } else {
        Value::Null
    }
}

fn opt_string(s: &Option<String>) -> Value {
    s.clone().map_or(Value::Null, Value::String)
}

fn symbols(list: &[String]) -> Value {
    if list.is_empty() {
        Value::Null
    } else {
        Value::Array(list.iter().map(|s| Value::Symbol(s.clone())).collect())
    }
}

fn map(pairs: &[(Value, Value)]) -> Value {
    if pairs.is_empty() {
        Value::Null
    } else {
        Value::Map(pairs.to_vec())
    }
}

/// Drops trailing nulls: absent fields at the end of a list need not be sent.
fn trimmed(mut fields: Vec<Value>) -> Vec<Value> {
    while fields.last().is_some_and(Value::is_null) {
        fields.pop();
    }
    fields
}

/// The text of a symbol, or of a string that could be one (ASCII).
fn symbol_text(v: &Value) -> Option<String> {
    match v {
        Value::Symbol(s) => Some(s.clone()),
        Value::String(s) if s.is_ascii() => Some(s.clone()),
        _ => None,
    }
}

/// The fields of one composite value, read with the spec's types.
struct Fields<'a> {
    name: &'static str,
    items: &'a [Value],
}

impl<'a> Fields<'a> {
    /// The field at `i`, `None` when absent or null.
    fn get(&self, i: usize) -> Option<&'a Value> {
        self.items.get(i).filter(|v| !v.is_null())
    }

    fn missing(&self, field: &'static str) -> FrameError {
        FrameError::MissingField { performative: self.name, field }
    }

    fn wrong(&self, field: &'static str, expected: &'static str, got: &Value) -> FrameError {
        FrameError::WrongType { performative: self.name, field, expected, got: got.type_name() }
    }

    fn typed<T>(
        &self,
        i: usize,
        field: &'static str,
        expected: &'static str,
        read: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, FrameError> {
        match self.get(i) {
            None => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| self.wrong(field, expected, v)),
        }
    }

    fn u8(&self, i: usize, field: &'static str) -> Result<Option<u8>, FrameError> {
        self.typed(i, field, "a ubyte", |v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
    }

    fn u16(&self, i: usize, field: &'static str) -> Result<Option<u16>, FrameError> {
        self.typed(i, field, "a ushort", |v| v.as_u64().and_then(|n| u16::try_from(n).ok()))
    }

    fn u32(&self, i: usize, field: &'static str) -> Result<Option<u32>, FrameError> {
        self.typed(i, field, "a uint", Value::as_u32)
    }

    fn u32_req(&self, i: usize, field: &'static str) -> Result<u32, FrameError> {
        self.u32(i, field)?.ok_or_else(|| self.missing(field))
    }

    fn u64(&self, i: usize, field: &'static str) -> Result<Option<u64>, FrameError> {
        self.typed(i, field, "a ulong", Value::as_u64)
    }

    fn bool(&self, i: usize, field: &'static str) -> Result<Option<bool>, FrameError> {
        self.typed(i, field, "a boolean", Value::as_bool)
    }

    fn string(&self, i: usize, field: &'static str) -> Result<Option<String>, FrameError> {
        self.typed(i, field, "a string or symbol", |v| v.as_str().map(str::to_owned))
    }

    fn string_req(&self, i: usize, field: &'static str) -> Result<String, FrameError> {
        self.string(i, field)?.ok_or_else(|| self.missing(field))
    }

    /// A symbol; an ASCII string is accepted too (it encodes back as a symbol).
    fn symbol_req(&self, i: usize, field: &'static str) -> Result<String, FrameError> {
        self.typed(i, field, "a symbol", symbol_text)?.ok_or_else(|| self.missing(field))
    }

    fn binary(&self, i: usize, field: &'static str) -> Result<Option<Vec<u8>>, FrameError> {
        self.typed(i, field, "a binary", |v| v.as_bytes().map(<[u8]>::to_vec))
    }

    /// A multiple symbol field: one symbol or an array of them.
    fn symbols(&self, i: usize, field: &'static str) -> Result<Vec<String>, FrameError> {
        let read = |v: &'a Value| match v {
            Value::Symbol(s) => Some(vec![s.clone()]),
            Value::Array(items) => items.iter().map(symbol_text).collect(),
            _ => None,
        };
        Ok(self.typed(i, field, "a symbol or an array of symbols", read)?.unwrap_or_default())
    }

    fn map(&self, i: usize, field: &'static str) -> Result<Vec<(Value, Value)>, FrameError> {
        let read = |v: &'a Value| match v {
            Value::Map(pairs) => Some(pairs.clone()),
            _ => None,
        };
        Ok(self.typed(i, field, "a map", read)?.unwrap_or_default())
    }

    fn error(&self, i: usize, _field: &'static str) -> Result<Option<AmqpError>, FrameError> {
        self.get(i).map(AmqpError::from_value).transpose()
    }

    fn state(&self, i: usize, _field: &'static str) -> Result<Option<DeliveryState>, FrameError> {
        self.get(i).map(DeliveryState::from_value).transpose()
    }

    fn terminus(&self, i: usize, _field: &'static str) -> Result<Option<Terminus>, FrameError> {
        match self.get(i) {
            None => Ok(None),
            Some(v) => Terminus::from_value(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::{self, described};

    fn error() -> AmqpError {
        AmqpError {
            condition: "amqp:unauthorized-access".into(),
            description: Some("bad token".into()),
            info: vec![(Value::Symbol("com.microsoft:tracking-id".into()), Value::String("t-1".into()))],
        }
    }

    fn frames() -> Vec<Frame> {
        let amqp = |channel: u16, p: Performative| Frame::Amqp { channel, performative: p, payload: Vec::new() };
        vec![
            Frame::Heartbeat { channel: 0 },
            amqp(0, Performative::Open(Open::default())),
            amqp(
                0,
                Performative::Open(Open {
                    container_id: "dps".into(),
                    hostname: Some("global.azure-devices-provisioning.net".into()),
                    max_frame_size: 65536,
                    channel_max: 7,
                    idle_time_out: Some(120_000),
                    offered_capabilities: vec!["ANONYMOUS-RELAY".into()],
                    desired_capabilities: vec!["a".into(), "b".into()],
                    properties: vec![(Value::Symbol("product".into()), Value::String("dps-rs".into()))],
                }),
            ),
            amqp(1, Performative::Begin(Begin::default())),
            amqp(
                1,
                Performative::Begin(Begin {
                    remote_channel: Some(3),
                    next_outgoing_id: 1,
                    incoming_window: 5000,
                    outgoing_window: u32::MAX - 1,
                    handle_max: 255,
                }),
            ),
            amqp(1, Performative::Attach(Attach { name: "l".into(), ..Attach::default() })),
            amqp(
                1,
                Performative::Attach(Attach {
                    name: "sender-link".into(),
                    handle: 2,
                    role: Role::Receiver,
                    snd_settle_mode: Some(2),
                    rcv_settle_mode: Some(0),
                    source: Some(Terminus {
                        address: Some("0ne000/registrations/dev".into()),
                        rest: vec![
                            Value::Uint(0),
                            Value::Symbol("session-end".into()),
                            Value::Null,
                            Value::Bool(false),
                        ],
                    }),
                    target: Some(Terminus::with_address("amqps://x/y")),
                    unsettled: Some(Value::Map(vec![])),
                    incomplete_unsettled: true,
                    initial_delivery_count: Some(0),
                    max_message_size: Some(1 << 40),
                    offered_capabilities: vec![],
                    desired_capabilities: vec!["x".into()],
                    properties: vec![(
                        Value::Symbol("com.microsoft:api-version".into()),
                        Value::String("2019-03-31".into()),
                    )],
                }),
            ),
            amqp(1, Performative::Attach(Attach { source: Some(Terminus::default()), ..Attach::default() })),
            amqp(1, Performative::Flow(Flow::default())),
            amqp(
                1,
                Performative::Flow(Flow {
                    next_incoming_id: Some(1),
                    incoming_window: 2,
                    next_outgoing_id: 3,
                    outgoing_window: 4,
                    handle: Some(5),
                    delivery_count: Some(6),
                    link_credit: Some(100),
                    available: Some(0),
                    drain: true,
                    echo: true,
                    properties: vec![(Value::Symbol("k".into()), Value::Null)],
                }),
            ),
            Frame::Amqp {
                channel: 1,
                performative: Performative::Transfer(Transfer {
                    handle: 0,
                    delivery_id: Some(0),
                    delivery_tag: Some(vec![0, 0, 0, 1]),
                    message_format: Some(0),
                    settled: Some(false),
                    more: true,
                    rcv_settle_mode: Some(1),
                    state: Some(DeliveryState::Accepted),
                    resume: true,
                    aborted: true,
                    batchable: true,
                }),
                payload: vec![0x00, 0x53, 0x75, 0xa0, 0x02, b'{', b'}'],
            },
            amqp(1, Performative::Transfer(Transfer::default())),
            amqp(
                1,
                Performative::Disposition(Disposition {
                    role: Role::Receiver,
                    first: 1,
                    last: Some(9),
                    settled: true,
                    state: Some(DeliveryState::Rejected(Some(error()))),
                    batchable: true,
                }),
            ),
            amqp(
                1,
                Performative::Disposition(Disposition { state: Some(DeliveryState::Received), ..Default::default() }),
            ),
            amqp(
                1,
                Performative::Disposition(Disposition { state: Some(DeliveryState::Released), ..Default::default() }),
            ),
            amqp(
                1,
                Performative::Disposition(Disposition { state: Some(DeliveryState::Modified), ..Default::default() }),
            ),
            amqp(
                1,
                Performative::Disposition(Disposition {
                    state: Some(DeliveryState::Rejected(None)),
                    ..Default::default()
                }),
            ),
            amqp(
                1,
                Performative::Disposition(Disposition {
                    state: Some(DeliveryState::Other(0x34)),
                    ..Default::default()
                }),
            ),
            amqp(1, Performative::Detach(Detach::default())),
            amqp(1, Performative::Detach(Detach { handle: 4, closed: true, error: Some(error()) })),
            amqp(1, Performative::End(End::default())),
            amqp(1, Performative::End(End { error: Some(AmqpError::new("amqp:internal-error", "x")) })),
            amqp(0, Performative::Close(Close::default())),
            amqp(
                0,
                Performative::Close(Close {
                    error: Some(AmqpError { condition: "c".into(), description: None, info: vec![] }),
                }),
            ),
            Frame::Sasl(Sasl::Mechanisms(vec!["PLAIN".into(), "ANONYMOUS".into(), "MSSBCBS".into()])),
            Frame::Sasl(Sasl::Mechanisms(vec![])),
            Frame::Sasl(Sasl::Init {
                mechanism: "PLAIN".into(),
                initial_response: Some(b"\0user\0pass".to_vec()),
                hostname: Some("h".into()),
            }),
            Frame::Sasl(Sasl::Init { mechanism: "ANONYMOUS".into(), initial_response: None, hostname: None }),
            Frame::Sasl(Sasl::Challenge(vec![1, 2, 3])),
            Frame::Sasl(Sasl::Response(vec![])),
            Frame::Sasl(Sasl::Outcome { code: SASL_OK, additional_data: None }),
            Frame::Sasl(Sasl::Outcome { code: SASL_AUTH, additional_data: Some(b"welcome".to_vec()) }),
        ]
    }

    fn bytes(f: &Frame) -> Vec<u8> {
        f.to_bytes()
    }

    #[test]
    fn every_frame_round_trips() {
        for f in frames() {
            let b = bytes(&f);
            let (back, used) = decode_frame(&b, 1 << 20).unwrap_or_else(|e| panic!("{f:?}: {e}")).unwrap();
            assert_eq!(back, f, "{b:02x?}");
            assert_eq!(used, b.len());
            // Followed by another frame: only the first is used.
            let mut two = b.clone();
            two.extend_from_slice(&b);
            assert_eq!(decode_frame(&two, 1 << 20).unwrap().unwrap().1, b.len());
        }
    }

    #[test]
    fn names() {
        let names: Vec<&str> = frames().iter().map(Frame::name).collect();
        for n in ["heartbeat", "open", "begin", "attach", "flow", "transfer", "disposition", "detach", "end", "close"] {
            assert!(names.contains(&n), "{n}");
        }
        for n in ["sasl-mechanisms", "sasl-init", "sasl-challenge", "sasl-response", "sasl-outcome"] {
            assert!(names.contains(&n), "{n}");
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for f in frames() {
            let b = bytes(&f);
            for n in 0..b.len() {
                assert_eq!(decode_frame(&b[..n], 1 << 20), Ok(None), "{f:?} cut at {n}");
            }
        }
    }

    #[test]
    fn a_hand_written_open() {
        // What rhea sends: open("container-1", "localhost", max-frame-size 65536,
        // channel-max 65535, idle-time-out 30000).
        let mut b = vec![0, 0, 0, 0x33, 2, 0, 0, 0, 0x00, 0x53, 0x10, 0xc0, 0x26, 0x05];
        b.extend_from_slice(b"\xa1\x0bcontainer-1\xa1\x09localhost");
        b.extend_from_slice(&[0x70, 0, 1, 0, 0, 0x60, 0xff, 0xff, 0x70, 0, 0, 0x75, 0x30]);
        assert_eq!(b.len(), 0x33);
        let (f, used) = decode_frame(&b, 512).unwrap().unwrap();
        assert_eq!(used, 0x33);
        assert_eq!(
            f,
            Frame::Amqp {
                channel: 0,
                performative: Performative::Open(Open {
                    container_id: "container-1".into(),
                    hostname: Some("localhost".into()),
                    max_frame_size: 65536,
                    channel_max: 65535,
                    idle_time_out: Some(30_000),
                    ..Open::default()
                }),
                payload: vec![],
            }
        );
    }

    #[test]
    fn a_hand_written_sasl_init_and_symbolic_descriptors() {
        // sasl-init(PLAIN, "\0u\0p") with the symbolic descriptor, on channel 5 (ignored).
        let mut body = vec![0x00, 0xa3, 19];
        body.extend_from_slice(b"amqp:sasl-init:list");
        body.extend_from_slice(&[0xc0, 14, 2, 0xa3, 5]);
        body.extend_from_slice(b"PLAIN");
        body.extend_from_slice(&[0xa0, 4, 0, b'u', 0, b'p']);
        let mut b = vec![0, 0, 0, 0, 2, 1, 0, 5];
        b.extend_from_slice(&body);
        let n = b.len() as u8;
        b[3] = n;
        let (f, _) = decode_frame(&b, 512).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Sasl(Sasl::Init {
                mechanism: "PLAIN".into(),
                initial_response: Some(vec![0, b'u', 0, b'p']),
                hostname: None
            })
        );
        // A single symbol for sasl-server-mechanisms.
        let v = described(0x40, vec![Value::Symbol("EXTERNAL".into())]);
        assert_eq!(Sasl::from_value(&v), Ok(Sasl::Mechanisms(vec!["EXTERNAL".into()])));
        let close = Value::Described(Box::new(Value::Symbol("amqp:close:list".into())), Box::new(Value::List(vec![])));
        assert_eq!(Performative::from_value(&close), Ok(Performative::Close(Close::default())));
    }

    #[test]
    fn sizes_offsets_and_types_are_checked() {
        // Refused from the size field alone.
        assert_eq!(decode_frame(&[0, 1, 0, 0], 65535), Err(FrameError::TooLarge { size: 65536, max: 65535 }));
        assert_eq!(
            decode_frame(&[0, 1, 0, 0], 65535).unwrap_err().to_string(),
            "frame of 65536 bytes is larger than the maximum frame size of 65535 bytes"
        );
        assert_eq!(decode_frame(&[0, 0, 0, 7], 512), Err(FrameError::TooSmall { size: 7 }));
        assert_eq!(decode_frame(&[0, 0, 0], 512), Ok(None));
        assert_eq!(decode_frame(&[0, 0, 0, 8, 1, 0, 0, 0], 512), Err(FrameError::BadDataOffset { doff: 1, size: 8 }));
        assert_eq!(decode_frame(&[0, 0, 0, 8, 3, 0, 0, 0], 512), Err(FrameError::BadDataOffset { doff: 3, size: 8 }));
        assert_eq!(decode_frame(&[0, 0, 0, 8, 2, 7, 0, 0], 512), Err(FrameError::UnknownFrameType(7)));
        assert_eq!(decode_frame(&[0, 0, 0, 8, 2, 1, 0, 0], 512), Err(FrameError::EmptySaslFrame));
        // An extended header is skipped: doff 3 puts the body 4 bytes later.
        let mut b =
            bytes(&Frame::Amqp { channel: 2, performative: Performative::End(End::default()), payload: vec![] });
        b.splice(8..8, [0xee; 4]);
        b[4] = 3;
        b[3] += 4;
        assert_eq!(
            decode_frame(&b, 512).unwrap().unwrap().0,
            Frame::Amqp { channel: 2, performative: Performative::End(End::default()), payload: vec![] }
        );
        // A heartbeat with doff 3 and an extended header.
        assert_eq!(
            decode_frame(&[0, 0, 0, 12, 3, 0, 0, 9, 1, 2, 3, 4], 512).unwrap().unwrap().0,
            Frame::Heartbeat { channel: 9 }
        );
    }

    #[test]
    fn bodies_are_checked() {
        let frame = |ty: u8, body: &[u8]| {
            let mut b = ((8 + body.len()) as u32).to_be_bytes().to_vec();
            b.extend_from_slice(&[2, ty, 0, 0]);
            b.extend_from_slice(body);
            b
        };
        let enc = |v: &Value| {
            let mut o = Vec::new();
            v.encode(&mut o);
            o
        };
        // Trailing bytes after a performative other than transfer.
        let mut body = enc(&Performative::Close(Close::default()).to_value());
        body.push(0x40);
        assert_eq!(
            decode_frame(&frame(0, &body), 512),
            Err(FrameError::TrailingBytes { performative: "close", len: 1 })
        );
        let mut body = enc(&Sasl::Challenge(vec![]).to_value());
        body.push(0x40);
        assert!(matches!(decode_frame(&frame(1, &body), 512), Err(FrameError::TrailingBytes { .. })));
        // The wrong layer.
        let sasl = enc(&Sasl::Outcome { code: 0, additional_data: None }.to_value());
        assert_eq!(
            decode_frame(&frame(0, &sasl), 512),
            Err(FrameError::WrongFrameType { frame: "AMQP", performative: "sasl-outcome" })
        );
        let open = enc(&Performative::Open(Open::default()).to_value());
        assert_eq!(
            decode_frame(&frame(1, &open), 512),
            Err(FrameError::WrongFrameType { frame: "SASL", performative: "open" })
        );
        // Unknown descriptors and non-composites.
        let e = decode_frame(&frame(0, &enc(&described(0x99, vec![]))), 512).unwrap_err();
        assert_eq!(e.to_string(), "unknown AMQP performative: 0x99");
        let e = decode_frame(&frame(0, &[0x43]), 512).unwrap_err();
        assert_eq!(e.to_string(), "unknown AMQP performative: a uint instead of a described list");
        // Bad value bytes.
        assert!(matches!(decode_frame(&frame(0, &[0x00, 0x53, 0x10, 0xc0, 5]), 512), Err(FrameError::Decode(_))));
        assert!(matches!(decode_frame(&frame(0, &[0x13]), 512), Err(FrameError::Decode(_))));
        // Missing mandatory fields and wrong types name the performative and field.
        let e = Performative::from_value(&described(0x10, vec![])).unwrap_err();
        assert_eq!(e, FrameError::MissingField { performative: "open", field: "container-id" });
        assert_eq!(e.to_string(), "open: mandatory field container-id is missing");
        let e = Performative::from_value(&described(0x11, vec![Value::Null, Value::Uint(1), Value::Null])).unwrap_err();
        assert_eq!(e, FrameError::MissingField { performative: "begin", field: "incoming-window" });
        let e =
            Performative::from_value(&described(0x12, vec![Value::String("n".into()), Value::Uint(0)])).unwrap_err();
        assert_eq!(e, FrameError::MissingField { performative: "attach", field: "role" });
        let e = Performative::from_value(&described(0x14, vec![Value::String("x".into())])).unwrap_err();
        assert_eq!(e.to_string(), "transfer: field handle must be a uint, not string");
        let e = Sasl::from_value(&described(0x44, vec![Value::Uint(300)])).unwrap_err();
        assert_eq!(
            e,
            FrameError::WrongType { performative: "sasl-outcome", field: "code", expected: "a ubyte", got: "uint" }
        );
        assert_eq!(
            Sasl::from_value(&described(0x40, vec![])),
            Err(FrameError::MissingField { performative: "sasl-mechanisms", field: "sasl-server-mechanisms" })
        );
        let attach = |source: Value| {
            Performative::from_value(&described(
                0x12,
                vec![Value::String("n".into()), Value::Uint(0), Value::Bool(false), Value::Null, Value::Null, source],
            ))
        };
        assert!(matches!(attach(Value::Uint(1)), Err(FrameError::Invalid(_))));
        let Ok(Performative::Attach(a)) = attach(described(0x29, vec![Value::Symbol("addr".into())])) else {
            panic!("attach with a target as source")
        };
        assert_eq!(a.source, Some(Terminus::with_address("addr")));
    }

    #[test]
    fn defaults_apply_to_absent_and_null_fields() {
        let v = described(
            0x10,
            vec![Value::String("c".into()), Value::Null, Value::Null, Value::Null, Value::Null, Value::Null],
        );
        let Ok(Performative::Open(o)) = Performative::from_value(&v) else { panic!("open") };
        assert_eq!(o, Open { container_id: "c".into(), ..Open::default() });
        assert_eq!(o.max_frame_size, u32::MAX);
        assert_eq!(o.channel_max, 65535);
        let v = described(0x11, vec![Value::Null, Value::Uint(0), Value::Uint(1), Value::Uint(2)]);
        let Ok(Performative::Begin(b)) = Performative::from_value(&v) else { panic!("begin") };
        assert_eq!(b.handle_max, u32::MAX);
    }

    #[test]
    fn protocol_headers() {
        assert_eq!(ProtocolHeader::parse(&AMQP_HEADER), ProtocolHeader::Amqp);
        assert_eq!(ProtocolHeader::parse(&SASL_HEADER), ProtocolHeader::Sasl);
        assert_eq!(ProtocolHeader::parse(b"AMQP\x02\x01\x00\x00"), ProtocolHeader::Tls);
        assert_eq!(
            ProtocolHeader::parse(b"AMQP\x00\x01\x00\x01"),
            ProtocolHeader::Unsupported(*b"AMQP\x00\x01\x00\x01")
        );
        assert_eq!(
            ProtocolHeader::parse(b"AMQP\x00\x00\x09\x01"),
            ProtocolHeader::Unsupported(*b"AMQP\x00\x00\x09\x01")
        );
        assert_eq!(ProtocolHeader::parse(b"GET / HT"), ProtocolHeader::Unsupported(*b"GET / HT"));
        assert_eq!(ProtocolHeader::Sasl.bytes(), SASL_HEADER);
    }

    #[test]
    fn encoding_is_compact() {
        // close with no error: 8-byte header + 00 53 18 45.
        let b =
            bytes(&Frame::Amqp { channel: 0, performative: Performative::Close(Close::default()), payload: vec![] });
        assert_eq!(b, [0, 0, 0, 12, 2, 0, 0, 0, 0x00, 0x53, 0x18, 0x45]);
        assert_eq!(bytes(&Frame::Heartbeat { channel: 0 }), [0, 0, 0, 8, 2, 0, 0, 0]);
        let b = bytes(&Frame::Sasl(Sasl::Outcome { code: SASL_OK, additional_data: None }));
        assert_eq!(b, [0, 0, 0, 16, 2, 1, 0, 0, 0x00, 0x53, 0x44, 0xc0, 0x03, 0x01, 0x50, 0x00]);
    }

    /// What `fuzz/fuzz_targets/amqp_frame.rs` checks, for the mutation test below.
    // `x == x` is false for values holding a NaN float, which only compare as bytes.
    #[allow(clippy::eq_op)]
    fn check(data: &[u8]) {
        let _ = decode_frame(data, 512);
        if let Ok((value, used)) = amqp::decode(data) {
            assert!(used > 0 && used <= data.len());
            let mut bytes = Vec::new();
            value.encode(&mut bytes);
            let (again, n) = amqp::decode(&bytes).unwrap_or_else(|e| panic!("{value:?} → {bytes:02x?}: {e}"));
            assert_eq!(n, bytes.len());
            let mut twice = Vec::new();
            again.encode(&mut twice);
            assert_eq!(twice, bytes);
            if value == value {
                assert_eq!(again, value);
            }
        }
        let mut rest = data;
        while let Ok(Some((frame, used))) = decode_frame(rest, 65536) {
            assert!(used >= 8 && used <= rest.len());
            let bytes = frame.to_bytes();
            let (again, n) = decode_frame(&bytes, u32::MAX)
                .unwrap_or_else(|e| panic!("{frame:?} → {bytes:02x?}: {e}"))
                .expect("complete");
            assert_eq!(n, bytes.len());
            assert_eq!(again.to_bytes(), bytes);
            if frame == frame {
                assert_eq!(again, frame);
            }
            if let Frame::Amqp { performative: Performative::Transfer(_), payload, .. } = &frame {
                if let Ok(message) = crate::amqp_message::decode_message(payload) {
                    let bytes = message.to_bytes();
                    let again = crate::amqp_message::decode_message(&bytes)
                        .unwrap_or_else(|e| panic!("{message:?} → {bytes:02x?}: {e}"));
                    assert_eq!(again.to_bytes(), bytes);
                    if message == message {
                        assert_eq!(again, message);
                    }
                }
            }
            rest = &rest[used..];
        }
        let _ = crate::amqp_message::decode_message(data);
    }

    #[test]
    fn mutated_frames_never_panic_and_round_trip() {
        let mut corpus: Vec<Vec<u8>> = frames().iter().map(Frame::to_bytes).collect();
        let message = crate::amqp_message::Message {
            properties: crate::amqp_message::Properties {
                message_id: Some(Value::Ulong(1)),
                content_type: Some("application/json".into()),
                ..Default::default()
            },
            application_properties: vec![("k".into(), Value::Array(vec![Value::Int(1), Value::Int(2)]))],
            body: crate::amqp_message::Body::Data(b"{}".to_vec()),
            ..Default::default()
        };
        corpus.push(
            Frame::Amqp {
                channel: 0,
                performative: Performative::Transfer(Transfer { delivery_tag: Some(vec![1]), ..Default::default() }),
                payload: message.to_bytes(),
            }
            .to_bytes(),
        );
        // Frame bodies too: values and messages on their own.
        let bodies: Vec<Vec<u8>> = corpus.iter().filter_map(|f| f.get(8..)).map(<[u8]>::to_vec).collect();
        corpus.extend(bodies);
        corpus.push(message.to_bytes());
        let mut nested = Value::Null;
        for i in 0..20u32 {
            nested = Value::Array(vec![amqp::described(u64::from(i), vec![nested, Value::Double(f64::NAN)])]);
        }
        let mut b = Vec::new();
        nested.encode(&mut b);
        corpus.push(b);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..100_000 {
            let mut data = corpus[(next() as usize) % corpus.len()].clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % (data.len() + 1);
                match next() % 5 {
                    0 if at < data.len() => data[at] = next() as u8,
                    1 => data.insert(at, next() as u8),
                    2 if at < data.len() => {
                        data.remove(at);
                    }
                    3 if at < data.len() => data[at] ^= 1 << (next() % 8),
                    _ => data.truncate(at.max(4)),
                }
            }
            // Keep the size field honest half the time, so the body is reached.
            if next() % 2 == 0 && data.len() >= 8 && data[..4] != [0; 4] {
                let n = data.len() as u32;
                data[..4].copy_from_slice(&n.to_be_bytes());
            }
            check(&data);
        }
    }
}
