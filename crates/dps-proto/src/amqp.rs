//! The AMQP 1.0 type system (OASIS AMQP 1.0 part 1, "Types"): [`Value`], its decoder
//! [`decode`] and its encoder [`Value::encode`].
//!
//! The decoder takes bytes from a peer: it never panics, checks every length against the bytes
//! that remain before allocating, refuses compound values that claim more elements than their
//! bytes can hold, and limits nesting to [`MAX_DEPTH`]. The encoder always picks the smallest
//! encoding of a value. Frames and performatives are in [`crate::amqp_frame`], the message
//! format in [`crate::amqp_message`].

/// The deepest nesting of compound and described values [`decode`] accepts.
pub const MAX_DEPTH: usize = 32;

/// Array elements with a zero-width encoding (null, true, false, uint0, ulong0, list0) an
/// array may hold: they cost no bytes, so their count cannot be checked against the input.
pub const MAX_ZERO_WIDTH_ARRAY_ELEMENTS: usize = 32;

/// Budget of element count × element-constructor bytes for one array: a described element
/// constructor is copied into every element, so this bounds the memory a small array can claim.
const ARRAY_CONSTRUCTOR_BUDGET: usize = 256 * 1024;

/// One AMQP 1.0 value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `boolean`.
    Bool(bool),
    /// `ubyte`.
    Ubyte(u8),
    /// `ushort`.
    Ushort(u16),
    /// `uint`.
    Uint(u32),
    /// `ulong`.
    Ulong(u64),
    /// `byte`.
    Byte(i8),
    /// `short`.
    Short(i16),
    /// `int`.
    Int(i32),
    /// `long`.
    Long(i64),
    /// `float` (IEEE 754 binary32).
    Float(f32),
    /// `double` (IEEE 754 binary64).
    Double(f64),
    /// `decimal32` (IEEE 754 decimal32, kept as its raw bits).
    Decimal32(u32),
    /// `decimal64` (raw bits).
    Decimal64(u64),
    /// `decimal128` (raw bits).
    Decimal128(u128),
    /// `char`: a UTF-32BE code point, kept as its raw 32 bits.
    Char(u32),
    /// `timestamp`: milliseconds since the Unix epoch.
    Timestamp(i64),
    /// `uuid`.
    Uuid([u8; 16]),
    /// `binary`.
    Binary(Vec<u8>),
    /// `string` (UTF-8).
    String(String),
    /// `symbol` (ASCII).
    Symbol(String),
    /// `list`.
    List(Vec<Value>),
    /// `map`: key/value pairs in wire order.
    Map(Vec<(Value, Value)>),
    /// `array`: values of one type. Arrays whose elements are not all encodable with one
    /// element constructor are encoded as a list. [`decode`] refuses arrays of more than
    /// [`MAX_ZERO_WIDTH_ARRAY_ELEMENTS`] zero-width elements (nulls), which encode fine.
    Array(Vec<Value>),
    /// A described value: descriptor, then the value.
    Described(Box<Value>, Box<Value>),
}

/// Why bytes are not a valid AMQP 1.0 value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends before the value does.
    #[error("truncated AMQP value: {what} needs {needed} more bytes")]
    Truncated {
        /// How many more bytes are needed (at least).
        needed: usize,
        /// What was being read.
        what: &'static str,
    },
    /// A format code this decoder does not know.
    #[error("unknown AMQP type constructor 0x{0:02x}")]
    UnknownConstructor(u8),
    /// A `string` that is not valid UTF-8.
    #[error("AMQP string is not valid UTF-8")]
    InvalidUtf8,
    /// A `symbol` with non-ASCII bytes.
    #[error("AMQP symbol is not ASCII")]
    NonAsciiSymbol,
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("AMQP value nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// Anything else; the text says what.
    #[error("invalid AMQP value: {0}")]
    Invalid(String),
}

/// Decodes one value from the front of `input`; returns it and the number of bytes it used.
pub fn decode(input: &[u8]) -> Result<(Value, usize), DecodeError> {
    let mut r = Reader { buf: input, pos: 0 };
    let v = r.value(0)?;
    Ok((v, r.pos))
}

/// Builds the described list `code: [fields]`, the shape of every AMQP composite type.
pub fn described(code: u64, fields: Vec<Value>) -> Value {
    Value::Described(Box::new(Value::Ulong(code)), Box::new(Value::List(fields)))
}

/// The numeric codes and symbolic names of the descriptors the AMQP specification defines for
/// the composite types this crate uses (transport, SASL, delivery states, message sections).
pub const DESCRIPTORS: &[(u64, &str)] = &[
    (0x10, "amqp:open:list"),
    (0x11, "amqp:begin:list"),
    (0x12, "amqp:attach:list"),
    (0x13, "amqp:flow:list"),
    (0x14, "amqp:transfer:list"),
    (0x15, "amqp:disposition:list"),
    (0x16, "amqp:detach:list"),
    (0x17, "amqp:end:list"),
    (0x18, "amqp:close:list"),
    (0x1d, "amqp:error:list"),
    (0x23, "amqp:received:list"),
    (0x24, "amqp:accepted:list"),
    (0x25, "amqp:rejected:list"),
    (0x26, "amqp:released:list"),
    (0x27, "amqp:modified:list"),
    (0x28, "amqp:source:list"),
    (0x29, "amqp:target:list"),
    (0x30, "amqp:coordinator:list"),
    (0x34, "amqp:transactional-state:list"),
    (0x40, "amqp:sasl-mechanisms:list"),
    (0x41, "amqp:sasl-init:list"),
    (0x42, "amqp:sasl-challenge:list"),
    (0x43, "amqp:sasl-response:list"),
    (0x44, "amqp:sasl-outcome:list"),
    (0x70, "amqp:header:list"),
    (0x71, "amqp:delivery-annotations:map"),
    (0x72, "amqp:message-annotations:map"),
    (0x73, "amqp:properties:list"),
    (0x74, "amqp:application-properties:map"),
    (0x75, "amqp:data:binary"),
    (0x76, "amqp:amqp-sequence:list"),
    (0x77, "amqp:amqp-value:*"),
    (0x78, "amqp:footer:map"),
];

/// The numeric code of a descriptor: a `ulong` as is, a symbol of [`DESCRIPTORS`] by name.
pub fn descriptor_code(descriptor: &Value) -> Option<u64> {
    match descriptor {
        Value::Ulong(code) => Some(*code),
        Value::Symbol(name) => DESCRIPTORS.iter().find(|(_, n)| n == name).map(|(c, _)| *c),
        _ => None,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        match rest.get(..n) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(DecodeError::Truncated { needed: n - rest.len(), what }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        let code = self.u8("constructor")?;
        if code == 0x00 {
            if depth >= MAX_DEPTH {
                return Err(DecodeError::TooDeep);
            }
            let descriptor = self.value(depth + 1)?;
            let v = self.value(depth + 1)?;
            return Ok(Value::Described(Box::new(descriptor), Box::new(v)));
        }
        self.body(code, depth)
    }

    /// The width prefix (1 or 4 bytes) of a variable or compound encoding.
    fn width(&mut self, wide: bool, what: &'static str) -> Result<usize, DecodeError> {
        Ok(if wide { self.u32(what)? as usize } else { self.u8(what)? as usize })
    }

    fn variable(&mut self, wide: bool, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.width(wide, what)?;
        self.take(n, what)
    }

    /// Reads the size and count of a compound value; returns a reader over its elements and
    /// the count, checked against the bytes present.
    fn compound(&mut self, wide: bool, what: &'static str) -> Result<(Reader<'a>, usize), DecodeError> {
        let size = self.width(wide, what)?;
        let body = self.take(size, what)?;
        let mut inner = Reader { buf: body, pos: 0 };
        let count =
            inner.width(wide, what).map_err(|_| invalid(format!("{what} size {size} cannot hold its count")))?;
        Ok((inner, count))
    }

    fn body(&mut self, code: u8, depth: usize) -> Result<Value, DecodeError> {
        Ok(match code {
            0x40 => Value::Null,
            0x41 => Value::Bool(true),
            0x42 => Value::Bool(false),
            0x56 => match self.u8("boolean")? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(invalid(format!("boolean byte 0x{b:02x} is neither 0 nor 1"))),
            },
            0x50 => Value::Ubyte(self.u8("ubyte")?),
            0x60 => Value::Ushort(u16::from_be_bytes(self.array("ushort")?)),
            0x70 => Value::Uint(self.u32("uint")?),
            0x52 => Value::Uint(u32::from(self.u8("smalluint")?)),
            0x43 => Value::Uint(0),
            0x80 => Value::Ulong(u64::from_be_bytes(self.array("ulong")?)),
            0x53 => Value::Ulong(u64::from(self.u8("smallulong")?)),
            0x44 => Value::Ulong(0),
            0x51 => Value::Byte(i8::from_be_bytes(self.array("byte")?)),
            0x61 => Value::Short(i16::from_be_bytes(self.array("short")?)),
            0x71 => Value::Int(i32::from_be_bytes(self.array("int")?)),
            0x54 => Value::Int(i32::from(i8::from_be_bytes(self.array("smallint")?))),
            0x81 => Value::Long(i64::from_be_bytes(self.array("long")?)),
            0x55 => Value::Long(i64::from(i8::from_be_bytes(self.array("smalllong")?))),
            0x72 => Value::Float(f32::from_be_bytes(self.array("float")?)),
            0x82 => Value::Double(f64::from_be_bytes(self.array("double")?)),
            0x74 => Value::Decimal32(self.u32("decimal32")?),
            0x84 => Value::Decimal64(u64::from_be_bytes(self.array("decimal64")?)),
            0x94 => Value::Decimal128(u128::from_be_bytes(self.array("decimal128")?)),
            0x73 => Value::Char(self.u32("char")?),
            0x83 => Value::Timestamp(i64::from_be_bytes(self.array("timestamp")?)),
            0x98 => Value::Uuid(self.array("uuid")?),
            0xa0 | 0xb0 => Value::Binary(self.variable(code == 0xb0, "binary")?.to_vec()),
            0xa1 | 0xb1 => {
                let s = self.variable(code == 0xb1, "string")?;
                Value::String(std::str::from_utf8(s).map_err(|_| DecodeError::InvalidUtf8)?.to_owned())
            }
            0xa3 | 0xb3 => {
                let s = self.variable(code == 0xb3, "symbol")?;
                if !s.is_ascii() {
                    return Err(DecodeError::NonAsciiSymbol);
                }
                Value::Symbol(String::from_utf8_lossy(s).into_owned())
            }
            0x45 => Value::List(Vec::new()),
            0xc0 | 0xd0 => {
                let (mut inner, count) = self.compound(code == 0xd0, "list")?;
                Value::List(inner.elements(count, depth, "list")?)
            }
            0xc1 | 0xd1 => {
                let (mut inner, count) = self.compound(code == 0xd1, "map")?;
                if count % 2 != 0 {
                    return Err(invalid(format!("map with an odd number of elements ({count})")));
                }
                let mut items = inner.elements(count, depth, "map")?.into_iter();
                let mut pairs = Vec::with_capacity(count / 2);
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    pairs.push((k, v));
                }
                Value::Map(pairs)
            }
            0xe0 | 0xf0 => {
                let (mut inner, count) = self.compound(code == 0xf0, "array")?;
                Value::Array(inner.array_elements(count, depth)?)
            }
            other => return Err(DecodeError::UnknownConstructor(other)),
        })
    }

    /// Decodes exactly `count` values filling this reader (the body of a list or map).
    fn elements(&mut self, count: usize, depth: usize, what: &str) -> Result<Vec<Value>, DecodeError> {
        if depth >= MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        if count > self.remaining() {
            return Err(invalid(format!("{what} claims {count} elements in {} bytes", self.remaining())));
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(self.value(depth + 1).map_err(|e| overrun(e, what))?);
        }
        self.finish(what)?;
        Ok(items)
    }

    fn array_elements(&mut self, count: usize, depth: usize) -> Result<Vec<Value>, DecodeError> {
        if depth >= MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        // The element constructor: any number of descriptors, then a format code.
        let start = self.pos;
        let mut descriptors = Vec::new();
        let code = loop {
            let code = self.u8("array element constructor").map_err(|e| overrun(e, "array"))?;
            if code != 0x00 {
                break code;
            }
            if depth + 1 + descriptors.len() >= MAX_DEPTH {
                return Err(DecodeError::TooDeep);
            }
            descriptors.push(self.value(depth + 1 + descriptors.len()).map_err(|e| overrun(e, "array"))?);
        };
        let ctor_len = self.pos - start;
        let limit = self.remaining().max(MAX_ZERO_WIDTH_ARRAY_ELEMENTS);
        if count > limit || count.saturating_mul(ctor_len) > ARRAY_CONSTRUCTOR_BUDGET {
            return Err(invalid(format!("array claims {count} elements in {} bytes", self.remaining())));
        }
        let inner_depth = depth + 1 + descriptors.len();
        if inner_depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            let mut v = self.body(code, inner_depth).map_err(|e| overrun(e, "array"))?;
            for d in descriptors.iter().rev() {
                v = Value::Described(Box::new(d.clone()), Box::new(v));
            }
            items.push(v);
        }
        self.finish("array")?;
        Ok(items)
    }

    fn finish(&self, what: &str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(invalid(format!("{n} bytes left over after the elements of a {what}"))),
        }
    }
}

fn invalid(msg: String) -> DecodeError {
    DecodeError::Invalid(msg)
}

/// Inside a sized compound, running out of bytes means the size was wrong, not that more
/// input is needed.
fn overrun(e: DecodeError, what: &str) -> DecodeError {
    match e {
        DecodeError::Truncated { what: inner, .. } => {
            invalid(format!("a {inner} runs past the end of its enclosing {what}"))
        }
        e => e,
    }
}

impl Value {
    /// The AMQP name of this value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Ubyte(_) => "ubyte",
            Value::Ushort(_) => "ushort",
            Value::Uint(_) => "uint",
            Value::Ulong(_) => "ulong",
            Value::Byte(_) => "byte",
            Value::Short(_) => "short",
            Value::Int(_) => "int",
            Value::Long(_) => "long",
            Value::Float(_) => "float",
            Value::Double(_) => "double",
            Value::Decimal32(_) => "decimal32",
            Value::Decimal64(_) => "decimal64",
            Value::Decimal128(_) => "decimal128",
            Value::Char(_) => "char",
            Value::Timestamp(_) => "timestamp",
            Value::Uuid(_) => "uuid",
            Value::Binary(_) => "binary",
            Value::String(_) => "string",
            Value::Symbol(_) => "symbol",
            Value::List(_) => "list",
            Value::Map(_) => "map",
            Value::Array(_) => "array",
            Value::Described(..) => "described",
        }
    }

    /// The text of a `string` or `symbol`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::Symbol(s) => Some(s),
            _ => None,
        }
    }

    /// An unsigned integer (ubyte, ushort, uint, or ulong) that fits in 32 bits.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    /// Any unsigned integer (ubyte, ushort, uint, ulong).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Ubyte(v) => Some(v.into()),
            Value::Ushort(v) => Some(v.into()),
            Value::Uint(v) => Some(v.into()),
            Value::Ulong(v) => Some(v),
            _ => None,
        }
    }

    /// A `boolean`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The bytes of a `binary`.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Binary(b) => Some(b),
            _ => None,
        }
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Appends the smallest encoding of this value to `out`. Nothing is validated: lengths
    /// over `u32::MAX` (not expressible in AMQP) and non-ASCII symbols are the caller's to
    /// avoid.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Bool(true) => out.push(0x41),
            Value::Bool(false) => out.push(0x42),
            Value::Uint(0) => out.push(0x43),
            Value::Uint(v) if *v <= 0xff => out.extend_from_slice(&[0x52, *v as u8]),
            Value::Ulong(0) => out.push(0x44),
            Value::Ulong(v) if *v <= 0xff => out.extend_from_slice(&[0x53, *v as u8]),
            Value::Int(v) if i8::try_from(*v).is_ok() => out.extend_from_slice(&[0x54, *v as u8]),
            Value::Long(v) if i8::try_from(*v).is_ok() => out.extend_from_slice(&[0x55, *v as u8]),
            Value::Binary(b) => variable(out, 0xa0, 0xb0, b),
            Value::String(s) => variable(out, 0xa1, 0xb1, s.as_bytes()),
            Value::Symbol(s) => variable(out, 0xa3, 0xb3, s.as_bytes()),
            Value::List(items) if items.is_empty() => out.push(0x45),
            Value::List(items) => {
                let mut body = Vec::new();
                for item in items {
                    item.encode(&mut body);
                }
                compound(out, 0xc0, 0xd0, items.len(), &body);
            }
            Value::Map(pairs) => {
                let mut body = Vec::new();
                for (k, v) in pairs {
                    k.encode(&mut body);
                    v.encode(&mut body);
                }
                compound(out, 0xc1, 0xd1, pairs.len() * 2, &body);
            }
            Value::Array(items) => {
                let mut body = Vec::new();
                if array_body(items, &mut body) {
                    compound(out, 0xe0, 0xf0, items.len(), &body);
                } else {
                    let mut body = Vec::new();
                    for item in items {
                        item.encode(&mut body);
                    }
                    compound(out, 0xc0, 0xd0, items.len(), &body);
                }
            }
            Value::Described(d, v) => {
                out.push(0x00);
                d.encode(out);
                v.encode(out);
            }
            fixed => {
                out.push(fixed.wide_code());
                fixed.fixed_body(out);
            }
        }
    }

    /// The fixed-width (or 32-bit width) format code of this value's type.
    fn wide_code(&self) -> u8 {
        match self {
            Value::Null => 0x40,
            Value::Bool(_) => 0x56,
            Value::Ubyte(_) => 0x50,
            Value::Ushort(_) => 0x60,
            Value::Uint(_) => 0x70,
            Value::Ulong(_) => 0x80,
            Value::Byte(_) => 0x51,
            Value::Short(_) => 0x61,
            Value::Int(_) => 0x71,
            Value::Long(_) => 0x81,
            Value::Float(_) => 0x72,
            Value::Double(_) => 0x82,
            Value::Decimal32(_) => 0x74,
            Value::Decimal64(_) => 0x84,
            Value::Decimal128(_) => 0x94,
            Value::Char(_) => 0x73,
            Value::Timestamp(_) => 0x83,
            Value::Uuid(_) => 0x98,
            Value::Binary(_) => 0xb0,
            Value::String(_) => 0xb1,
            Value::Symbol(_) => 0xb3,
            Value::List(_) => 0xd0,
            Value::Map(_) => 0xd1,
            Value::Array(_) => 0xf0,
            Value::Described(..) => 0x00,
        }
    }

    /// The bytes after [`Value::wide_code`] of a fixed-width value (nothing for the others).
    fn fixed_body(&self, out: &mut Vec<u8>) {
        match self {
            Value::Bool(b) => out.push(u8::from(*b)),
            Value::Ubyte(v) => out.push(*v),
            Value::Ushort(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Uint(v) | Value::Decimal32(v) | Value::Char(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Ulong(v) | Value::Decimal64(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Byte(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Short(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Int(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Long(v) | Value::Timestamp(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Float(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Double(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Decimal128(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Uuid(v) => out.extend_from_slice(v),
            _ => {}
        }
    }
}

fn variable(out: &mut Vec<u8>, narrow: u8, wide: u8, bytes: &[u8]) {
    if bytes.len() <= 0xff {
        out.push(narrow);
        out.push(bytes.len() as u8);
    } else {
        out.push(wide);
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

/// Constructor, size, count and elements of a list, map or array, narrow when both fit.
fn compound(out: &mut Vec<u8>, narrow: u8, wide: u8, count: usize, body: &[u8]) {
    if count <= 0xff && body.len() < 0xff {
        out.extend_from_slice(&[narrow, (body.len() + 1) as u8, count as u8]);
    } else {
        out.push(wide);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(&(count as u32).to_be_bytes());
    }
    out.extend_from_slice(body);
}

/// Writes the element constructor and elements of an array into `body`; false (with `body`
/// unspecified) when the items do not share one element constructor.
fn array_body(items: &[Value], body: &mut Vec<u8>) -> bool {
    let mut leaves: Vec<&Value> = items.iter().collect();
    let mut layers = 0;
    while let Some(Value::Described(d, _)) = leaves.first() {
        layers += 1;
        if layers > MAX_DEPTH {
            return false;
        }
        let mut next = Vec::with_capacity(leaves.len());
        for v in &leaves {
            match v {
                Value::Described(d2, x) if d2 == d => next.push(&**x),
                _ => return false,
            }
        }
        body.push(0x00);
        d.encode(body);
        leaves = next;
    }
    let Some(first) = leaves.first() else {
        body.push(0x40);
        return true;
    };
    let kind = std::mem::discriminant(*first);
    if !leaves.iter().all(|v| std::mem::discriminant(*v) == kind) {
        return false;
    }
    let (narrow_code, wide_code) = match first {
        Value::Binary(_) => (0xa0, 0xb0),
        Value::String(_) => (0xa1, 0xb1),
        Value::Symbol(_) => (0xa3, 0xb3),
        Value::List(_) => (0xc0, 0xd0),
        Value::Map(_) => (0xc1, 0xd1),
        Value::Array(_) => (0xe0, 0xf0),
        fixed => {
            body.push(fixed.wide_code());
            for v in &leaves {
                v.fixed_body(body);
            }
            return true;
        }
    };
    // Variable and compound elements: encode each once, then share the narrowest width.
    let encodings: Vec<Vec<u8>> = leaves
        .iter()
        .map(|v| {
            let mut e = Vec::new();
            v.encode(&mut e);
            e
        })
        .collect();
    let first_byte = |e: &Vec<u8>| e.first().copied().unwrap_or(0);
    if matches!(first, Value::Array(_)) && !encodings.iter().all(|e| matches!(first_byte(e), 0xe0 | 0xf0)) {
        // An inner array fell back to a list.
        return false;
    }
    let narrow = encodings.iter().all(|e| matches!(first_byte(e), 0xa0 | 0xa1 | 0xa3 | 0x45 | 0xc0 | 0xc1 | 0xe0));
    body.push(if narrow { narrow_code } else { wide_code });
    for e in &encodings {
        let rest = e.get(1..).unwrap_or_default();
        match (first_byte(e), narrow) {
            (0x45, true) => body.extend_from_slice(&[1, 0]),
            (0x45, false) => body.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0]),
            (_, true) | (0xb0 | 0xb1 | 0xb3 | 0xd0 | 0xd1 | 0xf0, false) => body.extend_from_slice(rest),
            (0xa0 | 0xa1 | 0xa3, false) => {
                let len = rest.first().copied().unwrap_or(0);
                body.extend_from_slice(&u32::from(len).to_be_bytes());
                body.extend_from_slice(rest.get(1..).unwrap_or_default());
            }
            (_, false) => {
                // c0 / c1 / e0: size and count widen to 32 bits; the size grows by 3.
                let size = rest.first().copied().unwrap_or(0);
                let count = rest.get(1).copied().unwrap_or(0);
                body.extend_from_slice(&(u32::from(size) + 3).to_be_bytes());
                body.extend_from_slice(&u32::from(count).to_be_bytes());
                body.extend_from_slice(rest.get(2..).unwrap_or_default());
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        v.encode(&mut out);
        let (back, used) = decode(&out).unwrap_or_else(|e| panic!("{v:?} → {out:02x?}: {e}"));
        assert_eq!(&back, v, "bytes {out:02x?}");
        assert_eq!(used, out.len());
        out
    }

    fn enc(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        v.encode(&mut out);
        out
    }

    fn all_kinds() -> Vec<Value> {
        vec![
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Ubyte(200),
            Value::Ushort(65000),
            Value::Uint(0),
            Value::Uint(7),
            Value::Uint(70000),
            Value::Ulong(0),
            Value::Ulong(9),
            Value::Ulong(u64::MAX),
            Value::Byte(-5),
            Value::Short(-300),
            Value::Int(-1),
            Value::Int(i32::MIN),
            Value::Long(100),
            Value::Long(i64::MIN),
            Value::Float(1.5),
            Value::Double(-2.25),
            Value::Decimal32(0x1234_5678),
            Value::Decimal64(0x1234_5678_9abc_def0),
            Value::Decimal128(u128::MAX - 5),
            Value::Char(0x1f600),
            Value::Timestamp(1_700_000_000_000),
            Value::Uuid([7; 16]),
            Value::Binary(vec![1, 2, 3]),
            Value::Binary(vec![9; 300]),
            Value::String("héllo".into()),
            Value::String("x".repeat(256)),
            Value::Symbol("amqp:open:list".into()),
            Value::Symbol("s".repeat(1000)),
            Value::List(vec![]),
            Value::List(vec![Value::Uint(1), Value::String("a".into()), Value::Null]),
            Value::List(vec![Value::Ulong(1); 300]),
            Value::Map(vec![(Value::Symbol("k".into()), Value::Int(5))]),
            Value::Map(vec![]),
            Value::Map((0..200).map(|i| (Value::Uint(i), Value::Bool(true))).collect()),
            Value::Array(vec![]),
            Value::Array(vec![Value::Symbol("PLAIN".into()), Value::Symbol("ANONYMOUS".into())]),
            Value::Array(vec![Value::Uint(0), Value::Uint(1), Value::Uint(100_000)]),
            Value::Array(vec![Value::Bool(true), Value::Bool(false)]),
            Value::Array(vec![Value::Null, Value::Null]),
            Value::Array(vec![Value::Binary(vec![1; 300]), Value::Binary(vec![])]),
            Value::Array(vec![Value::List(vec![Value::Null]), Value::List(vec![])]),
            Value::Array(vec![Value::Array(vec![Value::Int(1)]), Value::Array(vec![Value::Int(2), Value::Int(3)])]),
            Value::Array(vec![Value::Map(vec![(Value::Null, Value::Null)])]),
            Value::Array(vec![described(0x24, vec![]), described(0x24, vec![Value::Uint(1)])]),
            Value::Array((0..300).map(Value::Long).collect()),
            described(0x10, vec![Value::String("container".into())]),
            Value::Described(Box::new(Value::Symbol("amqp:accepted:list".into())), Box::new(Value::List(vec![]))),
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for v in all_kinds() {
            round_trip(&v);
        }
        // And all of them in one list, map and described value.
        let all = Value::List(all_kinds());
        round_trip(&all);
        round_trip(&Value::Map(all_kinds().into_iter().map(|v| (v.clone(), v)).collect()));
        round_trip(&described(1, all_kinds()));
    }

    #[test]
    fn smallest_encodings() {
        assert_eq!(enc(&Value::Uint(0)), [0x43]);
        assert_eq!(enc(&Value::Uint(255)), [0x52, 0xff]);
        assert_eq!(enc(&Value::Uint(256)), [0x70, 0, 0, 1, 0]);
        assert_eq!(enc(&Value::Ulong(0)), [0x44]);
        assert_eq!(enc(&Value::Ulong(0x10)), [0x53, 0x10]);
        assert_eq!(enc(&Value::Int(-1)), [0x54, 0xff]);
        assert_eq!(enc(&Value::Long(-129)), [0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(enc(&Value::List(vec![])), [0x45]);
        assert_eq!(enc(&Value::List(vec![Value::Null])), [0xc0, 0x02, 0x01, 0x40]);
        assert_eq!(enc(&Value::Symbol("ab".into())), [0xa3, 2, b'a', b'b']);
        assert_eq!(enc(&Value::String("ab".into())), [0xa1, 2, b'a', b'b']);
        assert_eq!(&enc(&Value::Binary(vec![0; 256]))[..5], [0xb0, 0, 0, 1, 0]);
        assert_eq!(
            enc(&Value::Array(vec![Value::Symbol("a".into()), Value::Symbol("b".into())])),
            [0xe0, 0x06, 0x02, 0xa3, 0x01, b'a', 0x01, b'b']
        );
        assert_eq!(
            enc(&Value::Map(vec![(Value::Symbol("a".into()), Value::Null)])),
            [0xc1, 0x05, 0x02, 0xa3, 0x01, b'a', 0x40]
        );
        let big = enc(&Value::List(vec![Value::Null; 256]));
        assert_eq!(&big[..9], [0xd0, 0, 0, 1, 4, 0, 0, 1, 0]);
        let long = enc(&Value::List(vec![Value::Binary(vec![0; 253])]));
        assert_eq!(long[0], 0xd0, "255 bytes of elements + count byte do not fit a list8 size");
        assert_eq!(enc(&Value::List(vec![Value::Binary(vec![0; 252])]))[0], 0xc0);
    }

    #[test]
    fn every_constructor_decodes() {
        let cases: &[(&[u8], Value)] = &[
            (&[0x40], Value::Null),
            (&[0x41], Value::Bool(true)),
            (&[0x42], Value::Bool(false)),
            (&[0x56, 0x01], Value::Bool(true)),
            (&[0x56, 0x00], Value::Bool(false)),
            (&[0x50, 0x07], Value::Ubyte(7)),
            (&[0x60, 0x01, 0x02], Value::Ushort(0x0102)),
            (&[0x70, 0, 0, 1, 0], Value::Uint(256)),
            (&[0x52, 9], Value::Uint(9)),
            (&[0x43], Value::Uint(0)),
            (&[0x80, 0, 0, 0, 0, 0, 0, 0, 5], Value::Ulong(5)),
            (&[0x53, 0x10], Value::Ulong(0x10)),
            (&[0x44], Value::Ulong(0)),
            (&[0x51, 0xff], Value::Byte(-1)),
            (&[0x61, 0xff, 0xfe], Value::Short(-2)),
            (&[0x71, 0xff, 0xff, 0xff, 0xfd], Value::Int(-3)),
            (&[0x54, 0xfc], Value::Int(-4)),
            (&[0x81, 0, 0, 0, 0, 0, 0, 0, 5], Value::Long(5)),
            (&[0x55, 0xfb], Value::Long(-5)),
            (&[0x72, 0x3f, 0xc0, 0, 0], Value::Float(1.5)),
            (&[0x82, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0], Value::Double(1.5)),
            (&[0x74, 0, 0, 0, 1], Value::Decimal32(1)),
            (&[0x84, 0, 0, 0, 0, 0, 0, 0, 1], Value::Decimal64(1)),
            (&[0x94, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], Value::Decimal128(1)),
            (&[0x73, 0, 0, 0, 0x41], Value::Char(0x41)),
            (&[0x83, 0, 0, 0, 0, 0, 0, 0x03, 0xe8], Value::Timestamp(1000)),
            (
                &[0x98, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                Value::Uuid([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
            ),
            (&[0xa0, 2, 0xde, 0xad], Value::Binary(vec![0xde, 0xad])),
            (&[0xb0, 0, 0, 0, 1, 0xff], Value::Binary(vec![0xff])),
            (&[0xa1, 1, b'x'], Value::String("x".into())),
            (&[0xb1, 0, 0, 0, 1, b'y'], Value::String("y".into())),
            (&[0xa3, 1, b's'], Value::Symbol("s".into())),
            (&[0xb3, 0, 0, 0, 1, b't'], Value::Symbol("t".into())),
            (&[0x45], Value::List(vec![])),
            (&[0xc0, 3, 2, 0x41, 0x43], Value::List(vec![Value::Bool(true), Value::Uint(0)])),
            (&[0xd0, 0, 0, 0, 5, 0, 0, 0, 1, 0x40], Value::List(vec![Value::Null])),
            (&[0xc1, 3, 2, 0x40, 0x41], Value::Map(vec![(Value::Null, Value::Bool(true))])),
            (&[0xd1, 0, 0, 0, 4, 0, 0, 0, 0], Value::Map(vec![])),
            (&[0xe0, 4, 2, 0x50, 1, 2], Value::Array(vec![Value::Ubyte(1), Value::Ubyte(2)])),
            (&[0xf0, 0, 0, 0, 6, 0, 0, 0, 1, 0x52, 3], Value::Array(vec![Value::Uint(3)])),
            (&[0xe0, 2, 2, 0x41], Value::Array(vec![Value::Bool(true), Value::Bool(true)])),
            (
                &[0xe0, 5, 2, 0x00, 0x53, 0x24, 0x45],
                Value::Array(vec![described(0x24, vec![]), described(0x24, vec![])]),
            ),
            (&[0x00, 0x53, 0x24, 0x45], described(0x24, vec![])),
        ];
        for (bytes, want) in cases {
            let (v, used) = decode(bytes).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
            assert_eq!(&v, want, "{bytes:02x?}");
            assert_eq!(used, bytes.len(), "{bytes:02x?}");
        }
    }

    #[test]
    fn every_prefix_is_truncated() {
        for v in all_kinds() {
            let bytes = enc(&v);
            for n in 0..bytes.len() {
                match decode(&bytes[..n]) {
                    Err(DecodeError::Truncated { .. }) => {}
                    other => panic!("{v:?} cut at {n}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn malformed_input_is_refused() {
        assert_eq!(decode(&[0x99]), Err(DecodeError::UnknownConstructor(0x99)));
        assert_eq!(decode(&[0x99]).unwrap_err().to_string(), "unknown AMQP type constructor 0x99");
        assert_eq!(decode(&[0xa1, 2, 0xc3, 0x28]), Err(DecodeError::InvalidUtf8));
        assert_eq!(decode(&[0xa3, 1, 0xe9]), Err(DecodeError::NonAsciiSymbol));
        assert!(matches!(decode(&[0x56, 2]), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(&[0xc1, 2, 1, 0x40]), Err(DecodeError::Invalid(m)) if m.contains("odd")));
        // A list whose size leaves bytes after its elements, or cuts an element short.
        assert!(matches!(decode(&[0xc0, 3, 1, 0x40, 0x40]), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(&[0xc0, 3, 2, 0x52, 0x01]), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(&[0xc0, 2, 1, 0x52, 0x01]), Err(DecodeError::Invalid(m)) if m.contains("runs past")));
        // A size too small to hold the count.
        assert!(matches!(decode(&[0xc0, 0]), Err(DecodeError::Invalid(_))));
        assert_eq!(decode(&[0x00, 0x53]), Err(DecodeError::Truncated { needed: 1, what: "smallulong" }));
    }

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        // A list claiming 2^31 elements in 10 bytes.
        let bytes = [0xd0, 0, 0, 0, 5, 0x80, 0, 0, 0, 0x40];
        assert!(matches!(decode(&bytes), Err(DecodeError::Invalid(m)) if m.contains("2147483648 elements")));
        // The same for a map and for arrays, including zero-width elements.
        assert!(matches!(decode(&[0xd1, 0, 0, 0, 5, 0x80, 0, 0, 0, 0x40]), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(&[0xf0, 0, 0, 0, 5, 0x80, 0, 0, 0, 0x40]), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(&[0xf0, 0, 0, 0, 5, 0x80, 0, 0, 0, 0x50]), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(&[0xe0, 2, 33, 0x45]), Err(DecodeError::Invalid(_))));
        // A size beyond the input is simply truncated.
        assert!(matches!(
            decode(&[0xb0, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated { needed: 0xffff_ffff, what: "binary" })
        ));
        // A large described constructor cannot be multiplied by many elements.
        let mut bytes = vec![0xf0];
        let ctor_len = 1 + 5 + 4000 + 1;
        let count = 4001u32;
        bytes.extend_from_slice(&(4 + ctor_len as u32 + count).to_be_bytes());
        bytes.extend_from_slice(&count.to_be_bytes());
        bytes.extend_from_slice(&[0x00, 0xb0, 0, 0, 0x0f, 0xa0]);
        bytes.extend_from_slice(&[0; 4000]);
        bytes.push(0x50);
        bytes.extend_from_slice(&vec![0; count as usize]);
        assert!(matches!(decode(&bytes), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut v = Value::Null;
        for _ in 0..MAX_DEPTH {
            v = Value::List(vec![v]);
        }
        round_trip(&v);
        let deeper = Value::List(vec![v]);
        assert_eq!(decode(&enc(&deeper)), Err(DecodeError::TooDeep));
        let mut d = Value::Null;
        for _ in 0..=MAX_DEPTH {
            d = Value::Described(Box::new(Value::Null), Box::new(d));
        }
        assert_eq!(decode(&enc(&d)), Err(DecodeError::TooDeep));
        // Many nested list headers without their contents: refused, not a stack overflow.
        let bytes: Vec<u8> = (0..10_000).flat_map(|_| [0x00]).collect();
        assert_eq!(decode(&bytes), Err(DecodeError::TooDeep));
        let mut arrays = Vec::new();
        for _ in 0..100 {
            arrays.extend_from_slice(&[0xe0, 0xff, 1]);
        }
        assert!(decode(&arrays).is_err());
    }

    #[test]
    fn mixed_arrays_encode_as_lists() {
        let v = Value::Array(vec![Value::Uint(1), Value::String("x".into())]);
        let (back, _) = decode(&enc(&v)).unwrap();
        assert_eq!(back, Value::List(vec![Value::Uint(1), Value::String("x".into())]));
    }

    #[test]
    fn accessors() {
        assert_eq!(Value::Symbol("a".into()).as_str(), Some("a"));
        assert_eq!(Value::String("b".into()).as_str(), Some("b"));
        assert_eq!(Value::Uint(1).as_str(), None);
        assert_eq!(Value::Ubyte(3).as_u32(), Some(3));
        assert_eq!(Value::Ulong(1 << 40).as_u32(), None);
        assert_eq!(Value::Ulong(1 << 40).as_u64(), Some(1 << 40));
        assert_eq!(Value::Int(1).as_u64(), None);
        assert_eq!(Value::Bool(true).as_bool(), Some(true));
        assert_eq!(Value::Binary(vec![1]).as_bytes(), Some(&[1u8][..]));
        assert!(Value::Null.is_null());
        assert_eq!(described(0x10, vec![]).type_name(), "described");
    }
}
