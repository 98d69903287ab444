//! The AMQP 1.0 device: one registration over a fresh AMQP-over-TLS connection, the steps a
//! DPS device SDK takes (docs/protocol-notes.md §5). A symmetric-key device authenticates with
//! SASL PLAIN (authcid `{scope}/registrations/{id}`, password the SAS token); a TPM device with
//! the SASL `TPM` mechanism (its EK, then its SRK, the authentication key in two challenge
//! segments, imported in its software TPM, then a SAS token signed with that key); an X.509
//! device skips SASL (`AMQP 0 1 0 0` right after the TLS handshake with its certificate).
//! Then `open`, a session, the receiver and sender links on `{scope}/registrations/{id}`, the
//! register request, status polls while `assigning`, and `close`.
//!
//! The AMQP header, `open`, `begin`, both `attach`es and the receiver's credit go out in one
//! write (AMQP allows pipelining them); the client waits for the server's answers before it
//! sends a request, as the SDKs do.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::amqp::Value as AmqpValue;
use dps_proto::amqp_frame::{
    Attach, Begin, Close, DeliveryState, Flow, Frame, Open, Performative, Role, Sasl, Terminus, Transfer, AMQP_HEADER,
    SASL_HEADER, SASL_OK,
};
use dps_proto::amqp_io::{FrameIoError, FrameStream};
use dps_proto::amqp_message::{decode_message, Body, Message, Properties};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::client::{dps_failure, finished, poll_pause, tls_connect, Device, DeviceAuth, Failure, MAX_POLLS};
use crate::target::Target;

/// Largest frame the bench device accepts (and announces in `open`).
const MAX_FRAME: u32 = 1 << 20;
/// Credit the device grants on its receiver link (replies), topped up as replies arrive.
const REPLY_CREDIT: u32 = 16;
/// Link handles of the device: replies come on the receiver, requests go on the sender.
const RECEIVER: u32 = 0;
const SENDER: u32 = 1;
/// How long the device waits for the server's `close` after its own.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// One device's AMQP connection, its links attached.
pub struct AmqpConnection {
    stream: FrameStream<TlsStream<TcpStream>>,
    /// Requests the sender link may still send (the server's credit).
    send_credit: u32,
    /// Deliveries sent on the sender link (its delivery-count).
    delivery_count: u32,
    /// Next delivery ID of the session.
    next_delivery: u32,
    /// Replies received since the last credit top-up of the receiver link.
    replies: u32,
    /// Replies received in all (the receiver link's delivery-count as the device counts it).
    received: u32,
    correlation: u32,
}

fn frame_failure(stage: &str, e: FrameIoError) -> Failure {
    match e {
        FrameIoError::Io(e) => Failure::io(stage, &e),
        FrameIoError::Truncated => {
            Failure::new("amqp: closed by server", format!("{stage}: the server closed the connection mid-frame"))
        }
        FrameIoError::Frame(e) => Failure::new("amqp decode", format!("{stage}: {e}")),
    }
}

fn closed(stage: &str) -> Failure {
    Failure::new("amqp: closed by server", format!("{stage}: the server closed the connection"))
}

fn unexpected(stage: &str, frame: &Frame) -> Failure {
    match frame {
        Frame::Amqp { performative: Performative::Close(c), .. } => Failure::new(
            format!("amqp close {}", c.error.as_ref().map(|e| e.condition.as_str()).unwrap_or("without error")),
            format!("{stage}: the server closed the connection: {:?}", c.error),
        ),
        Frame::Amqp { performative: Performative::Detach(d), .. } => Failure::new(
            format!("amqp detach {}", d.error.as_ref().map(|e| e.condition.as_str()).unwrap_or("without error")),
            format!("{stage}: the server detached a link: {:?}", d.error),
        ),
        other => Failure::new("amqp: unexpected frame", format!("{stage}: unexpected {}", other.name())),
    }
}

/// Reads the next frame that is not a heartbeat.
async fn next_frame(stream: &mut FrameStream<TlsStream<TcpStream>>, stage: &str) -> Result<Frame, Failure> {
    loop {
        match stream.read().await {
            Ok(Some(Frame::Heartbeat { .. })) => {}
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => return Err(closed(stage)),
            Err(e) => return Err(frame_failure(stage, e)),
        }
    }
}

async fn read_header(stream: &mut FrameStream<TlsStream<TcpStream>>, expect: [u8; 8]) -> Result<(), Failure> {
    match stream.read_header().await {
        Ok(Some(h)) if h == expect => Ok(()),
        Ok(Some(h)) => {
            Err(Failure::new("amqp: wrong protocol header", format!("expected {expect:02x?}, got {h:02x?}")))
        }
        Ok(None) => Err(closed("protocol header")),
        Err(e) => Err(frame_failure("protocol header", e)),
    }
}

async fn write(stream: &mut FrameStream<TlsStream<TcpStream>>, frames: &[Frame]) -> Result<(), Failure> {
    stream.write_all(frames).await.map_err(|e| frame_failure("amqp write", e))
}

async fn sasl(stream: &mut FrameStream<TlsStream<TcpStream>>, stage: &str) -> Result<Sasl, Failure> {
    match next_frame(stream, stage).await? {
        Frame::Sasl(s) => Ok(s),
        other => Err(unexpected(stage, &other)),
    }
}

/// The `sasl-outcome`; a failure unless it is `ok`.
fn outcome(s: Sasl, stage: &str) -> Result<(), Failure> {
    match s {
        Sasl::Outcome { code: SASL_OK, .. } => Ok(()),
        Sasl::Outcome { code, .. } => {
            Err(Failure::new(format!("amqp sasl outcome {code}"), format!("{stage}: SASL outcome {code}")))
        }
        other => {
            Err(Failure::new("amqp sasl: unexpected frame", format!("{stage}: expected an outcome, got {other:?}")))
        }
    }
}

/// SASL: the header, the mechanisms offered, `init` with `mechanism` and `initial`.
async fn sasl_init(
    stream: &mut FrameStream<TlsStream<TcpStream>>,
    host: &str,
    mechanism: &str,
    initial: Vec<u8>,
) -> Result<Sasl, Failure> {
    stream.write_header(&SASL_HEADER).await.map_err(|e| frame_failure("sasl header", e))?;
    read_header(stream, SASL_HEADER).await?;
    match sasl(stream, "sasl-mechanisms").await? {
        Sasl::Mechanisms(offered) if offered.iter().any(|m| m == mechanism) => {}
        Sasl::Mechanisms(offered) => {
            return Err(Failure::new(
                format!("amqp sasl: no {mechanism}"),
                format!("the server offers {offered:?}, not {mechanism}"),
            ))
        }
        other => return Err(Failure::new("amqp sasl: unexpected frame", format!("expected mechanisms: {other:?}"))),
    }
    write(
        stream,
        &[Frame::Sasl(Sasl::Init {
            mechanism: mechanism.into(),
            initial_response: Some(initial),
            hostname: Some(host.to_string()),
        })],
    )
    .await?;
    sasl(stream, "sasl-init").await
}

/// A TPM challenge segment: its control byte and its part of the blob.
fn segment(s: Sasl, control: u8, stage: &str) -> Result<Vec<u8>, Failure> {
    match s {
        Sasl::Challenge(mut c) if c.first() == Some(&control) => {
            c.remove(0);
            Ok(c)
        }
        Sasl::Outcome { code, .. } => {
            Err(Failure::new(format!("amqp sasl outcome {code}"), format!("{stage}: SASL outcome {code}")))
        }
        other => Err(Failure::new(
            "amqp sasl tpm: bad challenge",
            format!("{stage}: expected a challenge with control byte {control:#04x}, got {other:?}"),
        )),
    }
}

/// SASL `TPM`: EK in `init`, SRK after the first challenge, the two segments of the
/// authentication key, its import (on a blocking thread), the SAS token signed with it.
async fn sasl_tpm(
    stream: &mut FrameStream<TlsStream<TcpStream>>,
    target: &Target,
    device: &Device,
    id: &Arc<crate::client::TpmIdentity>,
) -> Result<(), Failure> {
    let decode = |b64: &str| BASE64.decode(b64).map_err(|e| Failure::new("tpm: bad public key", e.to_string()));
    let ek = decode(&id.endorsement_key)?;
    let srk = decode(&id.storage_root_key)?;
    let rid = &device.registration_id;
    let initial = [&[0u8][..], target.id_scope.as_bytes(), &[0], rid.as_bytes(), &[0], &ek].concat();
    let first = sasl_init(stream, &target.host, "TPM", initial).await?;
    segment(first, 0x00, "sasl tpm: first challenge")?;
    write(stream, &[Frame::Sasl(Sasl::Response([&[0u8][..], &srk].concat()))]).await?;
    let mut blob = segment(sasl(stream, "sasl tpm: first segment").await?, 0x80, "sasl tpm: first segment")?;
    write(stream, &[Frame::Sasl(Sasl::Response(vec![0x00]))]).await?;
    blob.extend(segment(sasl(stream, "sasl tpm: final segment").await?, 0xC1, "sasl tpm: final segment")?);
    let token = crate::client::tpm_token_blocking(id, &target.id_scope, rid, blob).await?;
    write(stream, &[Frame::Sasl(Sasl::Response([&[0u8][..], token.as_bytes()].concat()))]).await?;
    outcome(sasl(stream, "sasl tpm: outcome").await?, "sasl tpm")
}

impl AmqpConnection {
    /// After SASL (or none): the AMQP header, open, begin, both links and the receiver's
    /// credit in one write; then the server's header, open, begin, attaches and the sender's
    /// credit.
    async fn connect(
        mut stream: FrameStream<TlsStream<TcpStream>>,
        host: &str,
        address: &str,
    ) -> Result<AmqpConnection, Failure> {
        let terminus = |a: Option<&str>| Some(Terminus { address: a.map(str::to_string), ..Terminus::default() });
        let frames = [
            Performative::Open(Open {
                container_id: "dps-bench".into(),
                hostname: Some(host.to_string()),
                max_frame_size: MAX_FRAME,
                channel_max: 0,
                ..Open::default()
            }),
            Performative::Begin(Begin {
                remote_channel: None,
                next_outgoing_id: 0,
                incoming_window: 1000,
                outgoing_window: 1000,
                handle_max: 7,
            }),
            Performative::Attach(Attach {
                name: "receiver".into(),
                handle: RECEIVER,
                role: Role::Receiver,
                source: terminus(Some(address)),
                target: terminus(None),
                ..Attach::default()
            }),
            Performative::Flow(Flow {
                next_incoming_id: Some(0),
                incoming_window: 1000,
                next_outgoing_id: 0,
                outgoing_window: 1000,
                handle: Some(RECEIVER),
                delivery_count: Some(0),
                link_credit: Some(REPLY_CREDIT),
                ..Flow::default()
            }),
            Performative::Attach(Attach {
                name: "sender".into(),
                handle: SENDER,
                role: Role::Sender,
                source: terminus(None),
                target: terminus(Some(address)),
                initial_delivery_count: Some(0),
                ..Attach::default()
            }),
        ];
        let mut out = AMQP_HEADER.to_vec();
        for p in frames {
            Frame::amqp(0, p).encode(&mut out);
        }
        let io = |e: std::io::Error| Failure::io("amqp write", &e);
        stream.get_mut().write_all(&out).await.map_err(io)?;
        stream.get_mut().flush().await.map_err(io)?;
        read_header(&mut stream, AMQP_HEADER).await?;
        let mut c = AmqpConnection {
            stream,
            send_credit: 0,
            delivery_count: 0,
            next_delivery: 0,
            replies: 0,
            received: 0,
            correlation: 0,
        };
        let (mut opened, mut begun, mut attached) = (false, false, 0);
        while !(opened && begun && attached == 2 && c.send_credit > 0) {
            match next_frame(&mut c.stream, "open").await? {
                Frame::Amqp { performative: Performative::Open(_), .. } if !opened => opened = true,
                Frame::Amqp { performative: Performative::Begin(_), .. } if opened && !begun => begun = true,
                Frame::Amqp { performative: Performative::Attach(a), .. } if begun => {
                    let refused = match a.role {
                        Role::Sender => a.source.as_ref().and_then(|t| t.address.as_ref()).is_none(),
                        Role::Receiver => a.target.as_ref().and_then(|t| t.address.as_ref()).is_none(),
                    };
                    if refused {
                        // The detach that follows says why.
                        let detach = next_frame(&mut c.stream, "attach").await?;
                        return Err(unexpected("attach", &detach));
                    }
                    attached += 1;
                }
                Frame::Amqp { performative: Performative::Flow(f), .. } => c.credit(&f),
                other => return Err(unexpected("open", &other)),
            }
        }
        Ok(c)
    }

    /// A flow for the sender link: the credit it gives.
    fn credit(&mut self, f: &Flow) {
        if f.handle == Some(SENDER) {
            let their_count = f.delivery_count.unwrap_or(self.delivery_count);
            self.send_credit = their_count.wrapping_add(f.link_credit.unwrap_or(0)).wrapping_sub(self.delivery_count);
        }
    }

    /// Sends a request on the sender link; its reply: (retry-after, operation JSON), or the
    /// DPS error of a rejection.
    async fn request(
        &mut self,
        properties: Vec<(String, AmqpValue)>,
        body: Body,
    ) -> Result<(Option<u64>, Value), Failure> {
        while self.send_credit == 0 {
            match next_frame(&mut self.stream, "waiting for credit").await? {
                Frame::Amqp { performative: Performative::Flow(f), .. } => self.credit(&f),
                other => return Err(unexpected("waiting for credit", &other)),
            }
        }
        self.correlation += 1;
        let correlation = AmqpValue::String(format!("bench-{}", self.correlation));
        let message = Message {
            properties: Properties { correlation_id: Some(correlation.clone()), ..Properties::default() },
            application_properties: properties,
            body,
            ..Message::default()
        };
        let delivery_id = self.next_delivery;
        self.next_delivery = self.next_delivery.wrapping_add(1);
        self.delivery_count = self.delivery_count.wrapping_add(1);
        self.send_credit -= 1;
        let transfer = Transfer {
            handle: SENDER,
            delivery_id: Some(delivery_id),
            delivery_tag: Some(delivery_id.to_be_bytes().to_vec()),
            message_format: Some(0),
            settled: Some(false),
            ..Transfer::default()
        };
        let frame =
            Frame::Amqp { channel: 0, performative: Performative::Transfer(transfer), payload: message.to_bytes() };
        write(&mut self.stream, &[frame]).await?;
        let mut accepted = false;
        let mut reply: Option<Message> = None;
        // A reply may come before or after the disposition of its request.
        while !(accepted && reply.is_some()) {
            match next_frame(&mut self.stream, "request").await? {
                Frame::Amqp { performative: Performative::Disposition(d), .. } if d.first == delivery_id => {
                    match d.state {
                        Some(DeliveryState::Accepted) | None => accepted = true,
                        Some(DeliveryState::Rejected(e)) => return Err(rejection(e)),
                        Some(other) => {
                            return Err(Failure::new("amqp: unexpected outcome", format!("{other:?}")));
                        }
                    }
                }
                Frame::Amqp { performative: Performative::Disposition(_), .. } => {}
                Frame::Amqp { performative: Performative::Flow(f), .. } => self.credit(&f),
                Frame::Amqp { performative: Performative::Transfer(t), payload, .. } => {
                    if t.more {
                        return Err(Failure::new("amqp: multi-frame reply", "a reply split over frames"));
                    }
                    let m = decode_message(&payload).map_err(|e| Failure::new("amqp: bad reply", e.to_string()))?;
                    self.received = self.received.wrapping_add(1);
                    self.replies += 1;
                    if !t.settled.unwrap_or(false) {
                        if let Some(id) = t.delivery_id {
                            let d = dps_proto::amqp_frame::Disposition {
                                role: Role::Receiver,
                                first: id,
                                last: None,
                                settled: true,
                                state: Some(DeliveryState::Accepted),
                                batchable: false,
                            };
                            write(&mut self.stream, &[Frame::amqp(0, Performative::Disposition(d))]).await?;
                        }
                    }
                    if m.properties.correlation_id.as_ref() == Some(&correlation) {
                        reply = Some(m);
                    }
                }
                other => return Err(unexpected("request", &other)),
            }
        }
        if self.replies >= REPLY_CREDIT / 2 {
            self.replies = 0;
            let flow = Flow {
                next_incoming_id: Some(self.received),
                incoming_window: 1000,
                next_outgoing_id: self.next_delivery,
                outgoing_window: 1000,
                handle: Some(RECEIVER),
                delivery_count: Some(self.received),
                link_credit: Some(REPLY_CREDIT),
                ..Flow::default()
            };
            write(&mut self.stream, &[Frame::amqp(0, Performative::Flow(flow))]).await?;
        }
        let reply = reply.unwrap_or_default();
        let retry_after = match reply.application_property("retry-after") {
            Some(AmqpValue::String(s)) => s.trim().parse::<u64>().ok(),
            Some(AmqpValue::Int(n)) => u64::try_from(*n).ok(),
            Some(AmqpValue::Uint(n)) => Some(u64::from(*n)),
            Some(AmqpValue::Long(n)) => u64::try_from(*n).ok(),
            _ => None,
        };
        let json = match &reply.body {
            Body::Data(bytes) => serde_json::from_slice(bytes).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        Ok((retry_after, json))
    }

    /// `close`, the server's `close` (briefly awaited), the TLS close.
    pub async fn close(mut self) {
        if self.send_close().await {
            self.finish_close().await;
        }
    }

    /// Sends `close`; false when the connection is gone.
    async fn send_close(&mut self) -> bool {
        write(&mut self.stream, &[Frame::amqp(0, Performative::Close(Close::default()))]).await.is_ok()
    }

    /// Waits briefly for the server's `close` and closes TLS.
    async fn finish_close(mut self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            loop {
                match self.stream.read().await {
                    Ok(Some(Frame::Amqp { performative: Performative::Close(_), .. })) | Ok(None) | Err(_) => break,
                    Ok(Some(_)) => {}
                }
            }
        })
        .await;
        let _ = self.stream.get_mut().shutdown().await;
    }
}

/// A rejected request: the DPS error JSON of its description.
fn rejection(e: Option<dps_proto::amqp_frame::AmqpError>) -> Failure {
    let Some(e) = e else { return Failure::new("amqp rejected", "rejected without an error") };
    let json: Value = e.description.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or(Value::Null);
    match json["errorCode"].as_u64() {
        // DPS error codes start with their HTTP status.
        Some(code) => dps_failure(u16::try_from(code / 1000).unwrap_or(0), &json),
        None => Failure::new(format!("amqp rejected {}", e.condition), format!("{}: {:?}", e.condition, e.description)),
    }
}

impl AmqpConnection {
    /// Connects `device` to the AMQP listener: TLS, SASL unless X.509, open, session, links.
    pub async fn open(
        target: &Target,
        tls: &Arc<rustls::ClientConfig>,
        device: &Device,
    ) -> Result<AmqpConnection, Failure> {
        let addr = target.amqp_addr.ok_or_else(|| Failure::new("amqp disabled", "the server has no AMQP listener"))?;
        let stream = tls_connect(addr, &target.host, device.tls(tls)).await?;
        let mut stream = FrameStream::new(stream, MAX_FRAME);
        let address = format!("{}/registrations/{}", target.id_scope, device.registration_id);
        match &device.auth {
            DeviceAuth::Sas(token) => {
                let initial = format!("\0{address}\0{token}").into_bytes();
                let answer = sasl_init(&mut stream, &target.host, "PLAIN", initial).await?;
                outcome(answer, "sasl plain")?;
            }
            DeviceAuth::X509(_) => {}
            DeviceAuth::Tpm(tpm) => sasl_tpm(&mut stream, target, device, tpm).await?,
        }
        AmqpConnection::connect(stream, &target.host, &address).await
    }

    /// Registers `device` on this connection and polls while the operation is `assigning`;
    /// the final registration state.
    pub async fn register(&mut self, device: &Device) -> Result<Value, Failure> {
        let register = vec![
            ("iotdps-operation-type".to_string(), AmqpValue::String("iotdps-register".into())),
            ("iotdps-forceRegistration".to_string(), AmqpValue::Bool(false)),
        ];
        let (mut retry_after, mut op) = self.request(register, Body::Data(device.body())).await?;
        for _ in 0..MAX_POLLS {
            if op["status"] != "assigning" {
                return finished(&op);
            }
            poll_pause(retry_after).await;
            let op_id = op["operationId"].as_str().unwrap_or_default().to_string();
            (retry_after, op) = self.status(&op_id).await?;
        }
        Err(Failure::new("still assigning", format!("still assigning after {MAX_POLLS} polls")))
    }

    /// An operation-status query: (retry-after, operation JSON), or the DPS error.
    pub async fn status(&mut self, operation_id: &str) -> Result<(Option<u64>, Value), Failure> {
        let poll = vec![
            ("iotdps-operation-type".to_string(), AmqpValue::String("iotdps-get-operationstatus".into())),
            ("iotdps-operation-id".to_string(), AmqpValue::String(operation_id.to_string())),
        ];
        self.request(poll, Body::Value(AmqpValue::String(String::new()))).await
    }
}

/// Registers `device` over a fresh AMQP connection (TLS, SASL unless X.509, open, session,
/// links, register, polls, close); the final registration state.
pub async fn amqp_register(
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
    device: &Device,
) -> Result<Value, Failure> {
    let mut c = AmqpConnection::open(target, tls, device).await?;
    let result = c.register(device).await;
    // The device is done once its `close` is out (an MQTT device's DISCONNECT is not answered
    // at all): the server's `close` and the TLS close are awaited off the device's clock.
    if c.send_close().await {
        tokio::spawn(c.finish_close());
    }
    result
}
