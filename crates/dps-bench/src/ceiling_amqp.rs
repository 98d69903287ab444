//! The ceiling's AMQP responder: the least an AMQP 1.0 server does for a DPS device. It
//! answers the protocol headers; SASL with an outcome `ok` whatever the credentials (PLAIN),
//! except that a `TPM` device gets its three challenges, the second and third carrying a real
//! authentication key for its EK and SRK ([`crate::ceiling_answer::authentication_key`], the crypto a
//! TPM challenge cannot do without); `open`, `begin`, `attach` with credit for the device's
//! sender link; and each request an `accepted` disposition and the fixed operation
//! ([`crate::ceiling_answer::FIXED_OPERATION`]) as the reply, with the request's correlation-id. No
//! authentication, no store, no limits beyond the frame size.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::amqp_frame::{
    Attach, Begin, Close, DeliveryState, Detach, Disposition, End, Flow, Frame, Open, Performative, Role, Sasl,
    Transfer, AMQP_HEADER, SASL_HEADER, SASL_OK,
};
use dps_proto::amqp_io::FrameStream;
use dps_proto::amqp_message::{decode_message, Body, Message, Properties};

use crate::ceiling_answer::{authentication_key, Stream, FIXED_OPERATION};

/// Largest frame the ceiling reads and announces.
const MAX_FRAME: u32 = 65_536;
/// Credit the ceiling gives a device's sender link: more than a device's register and polls.
const CREDIT: u32 = 100;
/// Time a connection may stay silent before the ceiling drops it.
const IDLE: Duration = Duration::from_secs(60);

/// One link the device attached: the ceiling's handle for it is the device's.
struct Link {
    handle: u32,
    client_role: Role,
}

/// Serves one AMQP connection until the device closes it.
pub(crate) async fn serve_amqp(stream: Stream) {
    let mut s = FrameStream::new(stream, MAX_FRAME);
    let _ = tokio::time::timeout(IDLE * 5, connection(&mut s)).await;
}

async fn read(s: &mut FrameStream<Stream>) -> Option<Frame> {
    loop {
        match tokio::time::timeout(IDLE, s.read()).await {
            Ok(Ok(Some(Frame::Heartbeat { .. }))) => {}
            Ok(Ok(Some(f))) => return Some(f),
            _ => return None,
        }
    }
}

async fn header(s: &mut FrameStream<Stream>) -> Option<[u8; 8]> {
    tokio::time::timeout(IDLE, s.read_header()).await.ok()?.ok()?
}

async fn sasl_response(s: &mut FrameStream<Stream>) -> Option<Vec<u8>> {
    match read(s).await? {
        Frame::Sasl(Sasl::Response(r)) => Some(r),
        _ => None,
    }
}

/// SASL: `ok` for anything; the `TPM` mechanism's challenges first.
async fn sasl(s: &mut FrameStream<Stream>) -> Option<()> {
    s.write_header(&SASL_HEADER).await.ok()?;
    s.write(&Frame::Sasl(Sasl::Mechanisms(vec!["PLAIN".into(), "TPM".into()]))).await.ok()?;
    let Frame::Sasl(Sasl::Init { mechanism, initial_response, .. }) = read(s).await? else { return None };
    if mechanism == "TPM" {
        // NUL scope NUL registration ID NUL EK.
        let initial = initial_response.unwrap_or_default();
        let ek = initial.splitn(4, |b| *b == 0).nth(3)?.to_vec();
        s.write(&Frame::Sasl(Sasl::Challenge(vec![0x00]))).await.ok()?;
        let srk = sasl_response(s).await?;
        let srk = srk.get(1..)?;
        let blob = authentication_key(&BASE64.encode(&ek), &BASE64.encode(srk))?;
        let (a, b) = blob.split_at(blob.len().div_ceil(2));
        s.write(&Frame::Sasl(Sasl::Challenge([&[0x80u8][..], a].concat()))).await.ok()?;
        sasl_response(s).await?;
        s.write(&Frame::Sasl(Sasl::Challenge([&[0xC1u8][..], b].concat()))).await.ok()?;
        sasl_response(s).await?;
    }
    s.write(&Frame::Sasl(Sasl::Outcome { code: SASL_OK, additional_data: None })).await.ok()?;
    (header(s).await? == AMQP_HEADER).then_some(())
}

async fn connection(s: &mut FrameStream<Stream>) -> Option<()> {
    let first = header(s).await?;
    if first == SASL_HEADER {
        sasl(s).await?;
    } else if first != AMQP_HEADER {
        let _ = s.write_header(&SASL_HEADER).await;
        return None;
    }
    s.write_header(&AMQP_HEADER).await.ok()?;
    let mut links: Vec<Link> = Vec::new();
    let mut next_outgoing: u32 = 0;
    // A request split over several transfer frames.
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let Frame::Amqp { channel, performative, payload } = read(s).await? else { return None };
        let mut out: Vec<Frame> = Vec::new();
        match performative {
            Performative::Open(_) => out.push(Frame::amqp(
                0,
                Performative::Open(Open {
                    container_id: "dps-bench-ceiling".into(),
                    max_frame_size: MAX_FRAME,
                    channel_max: 3,
                    idle_time_out: Some(240_000),
                    ..Open::default()
                }),
            )),
            Performative::Begin(b) => out.push(Frame::amqp(
                channel,
                Performative::Begin(Begin {
                    remote_channel: Some(channel),
                    next_outgoing_id: 0,
                    incoming_window: 5000,
                    outgoing_window: 5000,
                    handle_max: b.handle_max.min(7),
                }),
            )),
            Performative::Attach(a) => {
                let our_role = if a.role == Role::Sender { Role::Receiver } else { Role::Sender };
                out.push(Frame::amqp(
                    channel,
                    Performative::Attach(Attach {
                        name: a.name,
                        handle: a.handle,
                        role: our_role,
                        source: a.source,
                        target: a.target,
                        initial_delivery_count: (our_role == Role::Sender).then_some(0),
                        ..Attach::default()
                    }),
                ));
                let count = a.initial_delivery_count.unwrap_or(0);
                if a.role == Role::Sender {
                    out.push(Frame::amqp(channel, Performative::Flow(credit(a.handle, count))));
                }
                links.push(Link { handle: a.handle, client_role: a.role });
            }
            Performative::Flow(_) => {}
            Performative::Transfer(t) => {
                partial.extend_from_slice(&payload);
                if t.more {
                    continue;
                }
                let request = std::mem::take(&mut partial);
                let correlation = decode_message(&request).ok().and_then(|m| {
                    let p = m.properties;
                    p.correlation_id.or(p.message_id)
                });
                if let (false, Some(id)) = (t.settled.unwrap_or(false), t.delivery_id) {
                    out.push(Frame::amqp(
                        channel,
                        Performative::Disposition(Disposition {
                            role: Role::Receiver,
                            first: id,
                            last: None,
                            settled: true,
                            state: Some(DeliveryState::Accepted),
                            batchable: false,
                        }),
                    ));
                }
                if let Some(reply_link) = links.iter().find(|l| l.client_role == Role::Receiver) {
                    let reply = Message {
                        properties: Properties { correlation_id: correlation, ..Properties::default() },
                        body: Body::Data(FIXED_OPERATION.as_bytes().to_vec()),
                        ..Message::default()
                    };
                    out.push(Frame::Amqp {
                        channel,
                        performative: Performative::Transfer(Transfer {
                            handle: reply_link.handle,
                            delivery_id: Some(next_outgoing),
                            delivery_tag: Some(next_outgoing.to_be_bytes().to_vec()),
                            message_format: Some(0),
                            settled: Some(true),
                            ..Transfer::default()
                        }),
                        payload: reply.to_bytes(),
                    });
                    next_outgoing = next_outgoing.wrapping_add(1);
                }
            }
            Performative::Disposition(_) => {}
            Performative::Detach(d) => out.push(Frame::amqp(
                channel,
                Performative::Detach(Detach { handle: d.handle, closed: true, error: None }),
            )),
            Performative::End(_) => out.push(Frame::amqp(channel, Performative::End(End::default()))),
            Performative::Close(_) => {
                let _ = s.write(&Frame::amqp(0, Performative::Close(Close::default()))).await;
                return Some(());
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await.ok()?;
        }
    }
}

/// The flow that gives a device's sender link [`CREDIT`].
fn credit(handle: u32, delivery_count: u32) -> Flow {
    Flow {
        next_incoming_id: Some(0),
        incoming_window: 5000,
        next_outgoing_id: 0,
        outgoing_window: 5000,
        handle: Some(handle),
        delivery_count: Some(delivery_count),
        link_credit: Some(CREDIT),
        ..Flow::default()
    }
}
