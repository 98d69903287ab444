//! The AMQP 1.0 device transport (docs/protocol-notes.md §5): one connection per device, over
//! TLS on `listen.amqp` or over WebSocket on the HTTPS port (subprotocol `AMQPWSB10`; both
//! through [`crate::connection`]).
//!
//! A connection starts with a protocol header: SASL (`AMQP 3 1 0 0`), where the device proves
//! who it is with `PLAIN` or `TPM` ([`crate::amqp_sasl`]), or bare AMQP (`AMQP 0 1 0 0`), where
//! its TLS client certificate does and the registration is the one its first link addresses.
//! Then `open`, a session, a receiver and a sender link on `{idScope}/registrations/{id}`
//! ([`crate::amqp_address`]); each request message on the sender link is settled with a
//! disposition and answered on the receiver link ([`crate::amqp_request`]). Every protocol
//! violation or exceeded limit closes that connection (with an AMQP `close` carrying the reason
//! once `open` was exchanged) and a log line saying why; nothing a client sends can make the
//! server panic or wait forever (header, SASL and `open` deadlines, idle time-out, write
//! deadline, frame, message, session and link limits).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dps_core::registration::{AuthenticatedDevice, Authentication, Credential};
use dps_proto::amqp_frame::{
    AmqpError, Attach, Begin, Close, Detach, Disposition, End as EndFrame, Flow, Frame, Open, Performative,
    ProtocolHeader, Role, Transfer, AMQP_HEADER, SASL_HEADER,
};
use dps_proto::amqp_io::FrameStream;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::amqp_address::{self, RegistrationAddress};
pub use crate::amqp_context::AmqpContext;
use crate::amqp_context::{write_frames, End};
use crate::amqp_request;

impl crate::connection::ConnectionTransport for AmqpContext {
    const NAME: &'static str = "AMQP";
    const LISTENER: &'static str = "amqp";
    const WS_LISTENER: &'static str = "amqp-ws";

    fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    fn max_connections(&self) -> usize {
        self.config.max_connections()
    }

    fn max_ws_message_bytes(&self) -> usize {
        self.config.max_frame_bytes as usize + 1024
    }

    fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        stream: S,
        peer: std::net::SocketAddr,
        client_chain: Option<Arc<Vec<Vec<u8>>>>,
        transport: &'static str,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send {
        run_connection(stream, self, peer, client_chain, transport, stop)
    }
}

/// Runs one AMQP connection over any byte stream (TLS, or a WebSocket bridged to bytes) until
/// the client leaves, breaks the protocol or `stop` turns true.
pub async fn run_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ctx: &AmqpContext,
    peer: SocketAddr,
    client_chain: Option<Arc<Vec<Vec<u8>>>>,
    transport: &'static str,
    mut stop: watch::Receiver<bool>,
) {
    // SASL frames are small (AMQP's MIN-MAX-FRAME-SIZE is 512); the limit rises after `open`.
    let stream = FrameStream::new(stream, SASL_FRAME_BYTES);
    let mut conn = Connection {
        stream,
        ctx,
        peer,
        transport,
        client_chain,
        identity: None,
        opened: false,
        remote_max_frame: dps_proto::amqp_frame::MIN_MAX_FRAME_SIZE,
        sessions: HashMap::new(),
        links: 0,
        last_write: Instant::now(),
    };
    let end = tokio::select! {
        end = conn.body() => end,
        _ = async { let _ = stop.wait_for(|s| *s).await; } => End::Shutdown,
    };
    match &end {
        End::Closed | End::Shutdown => tracing::debug!(%peer, transport, "AMQP connection ended"),
        End::Refused(why) => tracing::info!(%peer, transport, reason = %why, "AMQP authentication refused"),
        End::Violation(why) | End::Limit(why) => {
            tracing::info!(%peer, transport, reason = %why, "AMQP connection closed")
        }
        End::Io(e) => tracing::debug!(%peer, transport, error = %e, "AMQP connection failed"),
    }
    if conn.opened {
        if let Some(error) = end.close_error() {
            let close = Frame::Amqp {
                channel: 0,
                performative: Performative::Close(Close { error: Some(error) }),
                payload: Vec::new(),
            };
            let _ = write_frames(&mut conn.stream, &[close], Duration::from_secs(1)).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.stream.get_mut().shutdown()).await;
}

/// The largest frame accepted before `open` (SASL frames and `open` itself).
const SASL_FRAME_BYTES: u32 = 4096;
/// Deliveries a device may send on its sender link before it is granted more.
const LINK_CREDIT: u32 = 8;
/// The session window announced in both directions.
const SESSION_WINDOW: u32 = 65_536;
/// Replies held for a receiver link that has no credit, at most.
const MAX_PENDING_REPLIES: usize = 16;

/// One AMQP connection's state.
struct Connection<'a, S> {
    stream: FrameStream<S>,
    ctx: &'a AmqpContext,
    peer: SocketAddr,
    transport: &'static str,
    client_chain: Option<Arc<Vec<Vec<u8>>>>,
    /// The device this connection proved to be (at SASL, or at the first link without SASL).
    identity: Option<AuthenticatedDevice>,
    /// `open` was exchanged: errors are reported with `close`.
    opened: bool,
    /// The client's `max-frame-size`.
    remote_max_frame: u32,
    /// Sessions by the client's channel (our channel is the same number).
    sessions: HashMap<u16, Session>,
    /// Links open on all sessions.
    links: u32,
    /// When a frame was last written (heartbeats go when nothing else did).
    last_write: Instant,
}

/// A session's state.
#[derive(Default)]
struct Session {
    /// Our next transfer ID.
    next_outgoing_id: u32,
    /// Transfers the client will still take.
    remote_incoming_window: u32,
    /// The transfer ID the client's next transfer has.
    next_incoming_id: u32,
    /// Links by handle (ours mirrors the client's).
    links: HashMap<u32, Link>,
}

/// A link's state, as seen from the server.
struct Link {
    /// The client's role: `Sender` sends requests, `Receiver` takes replies.
    client_role: Role,
    /// Delivery count (the sender's).
    delivery_count: u32,
    /// Credit: on a request link what the client may still send; on a reply link what we may.
    credit: u32,
    /// The request being received (a delivery in several transfer frames).
    partial: Option<Partial>,
    /// Replies waiting for credit (reply links).
    pending: VecDeque<Vec<u8>>,
    /// Our next delivery ID tag on a reply link.
    next_tag: u32,
}

/// A delivery in transfer frames.
struct Partial {
    delivery_id: u32,
    settled: bool,
    bytes: Vec<u8>,
}

/// What the main loop waits for. Matched at once: boxing the frame would cost an allocation
/// per frame.
#[allow(clippy::large_enum_variant)]
enum Event {
    Frame(Option<Frame>),
    Heartbeat,
    Idle,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<'_, S> {
    fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.ctx.config.write_timeout_secs)
    }

    async fn send(&mut self, frames: &[Frame]) -> Result<(), End> {
        let deadline = self.write_timeout();
        write_frames(&mut self.stream, frames, deadline).await?;
        self.last_write = Instant::now();
        Ok(())
    }

    async fn body(&mut self) -> End {
        match self.body_inner().await {
            Ok(()) => End::Closed,
            Err(end) => end,
        }
    }

    async fn body_inner(&mut self) -> Result<(), End> {
        let config = &self.ctx.config;
        let connect_deadline = Instant::now() + Duration::from_secs(config.connect_timeout_secs);
        let header = self.read_header(connect_deadline).await?;
        match ProtocolHeader::parse(&header) {
            ProtocolHeader::Sasl => {
                let write_timeout = self.write_timeout();
                tokio::time::timeout(write_timeout, self.stream.write_header(&SASL_HEADER))
                    .await
                    .map_err(|_| End::Limit("the client did not read the protocol header".into()))?
                    .map_err(End::from)?;
                let sasl_time = Duration::from_secs(config.sasl_timeout_secs);
                let device = match tokio::time::timeout(
                    sasl_time,
                    crate::amqp_sasl::authenticate(&mut self.stream, self.ctx, self.peer),
                )
                .await
                {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(End::Limit(format!(
                            "SASL not finished within {} s (amqp.sasl_timeout_secs)",
                            sasl_time.as_secs()
                        )))
                    }
                };
                tracing::debug!(peer = %self.peer, transport = self.transport, registration_id = device.registration_id(), "AMQP SASL authenticated");
                self.identity = Some(device);
                let next = self.read_header(Instant::now() + Duration::from_secs(config.connect_timeout_secs)).await?;
                if ProtocolHeader::parse(&next) != ProtocolHeader::Amqp {
                    return Err(End::Violation(
                        "after SASL the AMQP protocol header (AMQP 0 1 0 0) must follow".into(),
                    ));
                }
            }
            ProtocolHeader::Amqp => {}
            ProtocolHeader::Tls => {
                let _ = self.stream.write_header(&SASL_HEADER).await;
                return Err(End::Violation(
                    "the TLS protocol header: this port is TLS already; send AMQP 3 1 0 0 (SASL) or AMQP 0 1 0 0"
                        .into(),
                ));
            }
            ProtocolHeader::Unsupported(h) => {
                let _ = self.stream.write_header(&SASL_HEADER).await;
                return Err(End::Violation(format!("not an AMQP 1.0 protocol header: {h:02x?}")));
            }
        }
        let write_timeout = self.write_timeout();
        tokio::time::timeout(write_timeout, self.stream.write_header(&AMQP_HEADER))
            .await
            .map_err(|_| End::Limit("the client did not read the protocol header".into()))?
            .map_err(End::from)?;
        // A fresh allowance after SASL, as for the header.
        let open_deadline = Instant::now() + Duration::from_secs(config.connect_timeout_secs);
        let open = match tokio::time::timeout_at(open_deadline, self.stream.read()).await {
            Err(_) => {
                return Err(End::Limit(format!(
                    "no open within {} s (amqp.connect_timeout_secs)",
                    config.connect_timeout_secs
                )))
            }
            Ok(r) => r.map_err(End::from)?,
        };
        let open = match open {
            None => return Err(End::Closed),
            Some(Frame::Amqp { performative: Performative::Open(open), .. }) => open,
            Some(other) => {
                return Err(End::Violation(format!("the first frame must be open, not {}", frame_name(&other))))
            }
        };
        self.open(open).await
    }

    async fn read_header(&mut self, deadline: Instant) -> Result<[u8; 8], End> {
        match tokio::time::timeout_at(deadline, self.stream.read_header()).await {
            Err(_) => Err(End::Limit(format!(
                "no protocol header within {} s (amqp.connect_timeout_secs)",
                self.ctx.config.connect_timeout_secs
            ))),
            Ok(Err(e)) => Err(End::from(e)),
            Ok(Ok(None)) => Err(End::Closed),
            Ok(Ok(Some(h))) => Ok(h),
        }
    }

    /// Answers `open`, then serves frames until the connection ends.
    async fn open(&mut self, open: Open) -> Result<(), End> {
        let config = &self.ctx.config;
        if open.max_frame_size < dps_proto::amqp_frame::MIN_MAX_FRAME_SIZE {
            return Err(End::Violation(format!(
                "max-frame-size {} is below AMQP's minimum of 512",
                open.max_frame_size
            )));
        }
        self.remote_max_frame = open.max_frame_size.min(config.max_frame_bytes);
        self.stream.set_max_frame_size(config.max_frame_bytes);
        let ours = Open {
            // Nothing about this instance: the peer may not have authenticated yet (X.509).
            container_id: "dps-rs".to_string(),
            hostname: None,
            max_frame_size: config.max_frame_bytes,
            channel_max: config.max_sessions.saturating_sub(1),
            idle_time_out: u32::try_from(config.idle_timeout_secs * 1000).ok(),
            ..Open::default()
        };
        self.send(&[Frame::Amqp { channel: 0, performative: Performative::Open(ours), payload: Vec::new() }]).await?;
        self.opened = true;
        // Keep the client's idle time-out: an empty frame at half of it when nothing else went.
        let heartbeat = open.idle_time_out.filter(|t| *t > 0).map(|t| Duration::from_millis(u64::from(t / 2).max(500)));
        let idle = Duration::from_secs(config.idle_timeout_secs);
        let mut last_read = Instant::now();
        loop {
            let event = {
                let heartbeat_due = heartbeat.map(|h| self.last_write + h);
                tokio::select! {
                    r = self.stream.read() => Event::Frame(r.map_err(End::from)?),
                    _ = tokio::time::sleep_until(last_read + idle) => Event::Idle,
                    _ = async { match heartbeat_due { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => Event::Heartbeat,
                }
            };
            match event {
                Event::Idle => {
                    return Err(End::Limit(format!(
                        "no frame for {} s (amqp.idle_timeout_secs, the idle-time-out announced in open)",
                        idle.as_secs()
                    )))
                }
                Event::Heartbeat => self.send(&[Frame::Heartbeat { channel: 0 }]).await?,
                Event::Frame(None) => return Err(End::Closed),
                Event::Frame(Some(frame)) => {
                    last_read = Instant::now();
                    if self.frame(frame).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Handles one frame; `true` when the connection is closed.
    async fn frame(&mut self, frame: Frame) -> Result<bool, End> {
        let (channel, performative, payload) = match frame {
            Frame::Heartbeat { .. } => return Ok(false),
            Frame::Sasl(s) => return Err(End::Violation(format!("a SASL frame ({}) after open", s.name()))),
            Frame::Amqp { channel, performative, payload } => (channel, performative, payload),
        };
        match performative {
            Performative::Open(_) => Err(End::Violation("a second open".into())),
            Performative::Close(_) => {
                let close = Frame::Amqp {
                    channel: 0,
                    performative: Performative::Close(Close { error: None }),
                    payload: Vec::new(),
                };
                let _ = self.send(&[close]).await;
                self.opened = false;
                Ok(true)
            }
            Performative::Begin(b) => self.begin(channel, b).await.map(|()| false),
            Performative::End(_) => {
                if let Some(s) = self.sessions.remove(&channel) {
                    self.links -= s.links.len() as u32;
                }
                let end = Frame::Amqp {
                    channel,
                    performative: Performative::End(EndFrame { error: None }),
                    payload: Vec::new(),
                };
                self.send(&[end]).await.map(|()| false)
            }
            Performative::Attach(a) => self.attach(channel, a).await.map(|()| false),
            Performative::Detach(d) => {
                let session = self.session(channel)?;
                if session.links.remove(&d.handle).is_some() {
                    self.links -= 1;
                }
                let detach = Detach { handle: d.handle, closed: d.closed, error: None };
                self.send(&[Frame::Amqp { channel, performative: Performative::Detach(detach), payload: Vec::new() }])
                    .await
                    .map(|()| false)
            }
            Performative::Flow(f) => self.flow(channel, f).await.map(|()| false),
            Performative::Transfer(t) => self.transfer(channel, t, payload).await.map(|()| false),
            // The client settling our (pre-settled) replies, or its own requests: nothing to do.
            Performative::Disposition(_) => Ok(false),
        }
    }

    fn session(&mut self, channel: u16) -> Result<&mut Session, End> {
        self.sessions
            .get_mut(&channel)
            .ok_or_else(|| End::Violation(format!("a frame on channel {channel}, which has no session")))
    }

    async fn begin(&mut self, channel: u16, begin: Begin) -> Result<(), End> {
        if begin.remote_channel.is_some() {
            return Err(End::Violation("begin with remote-channel: this server never begins a session".into()));
        }
        if self.sessions.contains_key(&channel) {
            return Err(End::Violation(format!("a second begin on channel {channel}")));
        }
        let max = self.ctx.config.max_sessions;
        if self.sessions.len() >= usize::from(max) || channel >= max {
            return Err(End::Limit(format!("more than {max} sessions, or channel {channel} (amqp.max_sessions)")));
        }
        self.sessions.insert(
            channel,
            Session {
                remote_incoming_window: begin.incoming_window,
                next_incoming_id: begin.next_outgoing_id,
                ..Session::default()
            },
        );
        let ours = Begin {
            remote_channel: Some(channel),
            next_outgoing_id: 0,
            incoming_window: SESSION_WINDOW,
            outgoing_window: SESSION_WINDOW,
            handle_max: self.ctx.config.max_links.saturating_sub(1),
        };
        self.send(&[Frame::Amqp { channel, performative: Performative::Begin(ours), payload: Vec::new() }]).await
    }

    /// Checks who a link's address names: the registration the connection authenticated as
    /// (SASL), or, on a connection without SASL, the first link's registration authenticated
    /// with the TLS client certificate.
    async fn link_identity(&mut self, address: Option<&str>) -> Result<(), (String, &'static str)> {
        let address = address.ok_or_else(|| {
            (
                "the link has no address; attach to {idScope}/registrations/{registrationId}".to_string(),
                "amqp:invalid-field",
            )
        })?;
        let parsed: RegistrationAddress =
            amqp_address::parse(address).map_err(|e| (e.to_string(), "amqp:invalid-field"))?;
        if let Some(device) = &self.identity {
            if parsed.same_as(device.id_scope(), device.registration_id()) {
                return Ok(());
            }
            return Err((
                format!(
                    "this connection authenticated as '{}'; a link may only address that registration",
                    device.registration_id()
                ),
                "amqp:unauthorized-access",
            ));
        }
        let credential = self.client_chain.clone().map(Credential::X509).unwrap_or(Credential::None);
        let ctx = self.ctx;
        let ip = self.peer.ip();
        ctx.auth_failures.check(ip).map_err(|r| (r.message, "com.microsoft:device-container-throttled"))?;
        let result =
            Box::pin(ctx.engine.devices().authenticate_device(&parsed.id_scope, &parsed.registration_id, &credential))
                .await;
        match ctx.auth_failures.observe(ip, crate::metrics::Transport::Amqp, result) {
            Ok(Authentication::Authenticated(device)) => {
                tracing::debug!(peer = %self.peer, transport = self.transport, registration_id = device.registration_id(), "AMQP authenticated by client certificate");
                self.identity = Some(device);
                Ok(())
            }
            Ok(Authentication::Challenge(_)) => {
                Err(("TPM devices authenticate with SASL TPM".into(), "amqp:unauthorized-access"))
            }
            Err(e @ (dps_core::Error::Unavailable(_) | dps_core::Error::Internal(_))) => {
                Err((e.to_string(), "amqp:internal-error"))
            }
            Err(e @ dps_core::Error::Throttled { .. }) => {
                Err((e.to_string(), "com.microsoft:device-container-throttled"))
            }
            Err(e @ dps_core::Error::BadRequest { .. }) => Err((e.to_string(), "com.microsoft:argument-error")),
            Err(e) => Err((e.to_string(), "amqp:unauthorized-access")),
        }
    }

    async fn attach(&mut self, channel: u16, attach: Attach) -> Result<(), End> {
        let handle_max = self.ctx.config.max_links;
        let session = self.session(channel)?;
        if session.links.contains_key(&attach.handle) {
            return Err(End::Violation(format!("handle {} is already attached", attach.handle)));
        }
        if self.links >= handle_max || attach.handle >= handle_max {
            return Err(End::Limit(format!(
                "more than {handle_max} links, or handle {} (amqp.max_links)",
                attach.handle
            )));
        }
        let client_role = attach.role;
        let address = match client_role {
            Role::Receiver => attach.source.as_ref().and_then(|t| t.address.clone()),
            Role::Sender => attach.target.as_ref().and_then(|t| t.address.clone()),
        };
        let our_role = match client_role {
            Role::Receiver => Role::Sender,
            Role::Sender => Role::Receiver,
        };
        if let Err((why, condition)) = self.link_identity(address.as_deref()).await {
            tracing::info!(peer = %self.peer, transport = self.transport, link = %attach.name.chars().take(64).collect::<String>(), reason = %why, "AMQP link refused");
            // The refusal of a link: an attach without the terminus asked for, then detach.
            let (source, target) = match client_role {
                Role::Receiver => (None, attach.target.clone()),
                Role::Sender => (attach.source.clone(), None),
            };
            let reply = Attach {
                name: attach.name,
                handle: attach.handle,
                role: our_role,
                source,
                target,
                ..Attach::default()
            };
            let detach = Detach {
                handle: attach.handle,
                closed: true,
                error: Some(AmqpError { condition: condition.into(), description: Some(why), info: Vec::new() }),
            };
            return self
                .send(&[
                    Frame::Amqp { channel, performative: Performative::Attach(reply), payload: Vec::new() },
                    Frame::Amqp { channel, performative: Performative::Detach(detach), payload: Vec::new() },
                ])
                .await;
        }
        let handle = attach.handle;
        let reply = Attach {
            name: attach.name,
            handle,
            role: our_role,
            snd_settle_mode: attach.snd_settle_mode,
            rcv_settle_mode: attach.rcv_settle_mode,
            source: attach.source,
            target: attach.target,
            initial_delivery_count: (our_role == Role::Sender).then_some(0),
            max_message_size: (our_role == Role::Receiver).then_some(self.ctx.config.max_message_bytes as u64),
            ..Attach::default()
        };
        let link = Link {
            client_role,
            delivery_count: attach.initial_delivery_count.unwrap_or(0),
            credit: if client_role == Role::Sender { LINK_CREDIT } else { 0 },
            partial: None,
            pending: VecDeque::new(),
            next_tag: 0,
        };
        let mut frames = vec![Frame::Amqp { channel, performative: Performative::Attach(reply), payload: Vec::new() }];
        let session = self.session(channel)?;
        if client_role == Role::Sender {
            frames.push(Frame::Amqp {
                channel,
                performative: Performative::Flow(credit_flow(session, handle, link.delivery_count)),
                payload: Vec::new(),
            });
        }
        session.links.insert(handle, link);
        self.links += 1;
        self.send(&frames).await
    }

    async fn flow(&mut self, channel: u16, flow: Flow) -> Result<(), End> {
        let session = self.session(channel)?;
        if let Some(next_incoming) = flow.next_incoming_id {
            session.remote_incoming_window =
                next_incoming.wrapping_add(flow.incoming_window).wrapping_sub(session.next_outgoing_id);
        } else {
            session.remote_incoming_window = flow.incoming_window;
        }
        let Some(handle) = flow.handle else { return Ok(()) };
        let link = session
            .links
            .get_mut(&handle)
            .ok_or_else(|| End::Violation(format!("flow on handle {handle}, which is not attached")))?;
        if link.client_role == Role::Receiver {
            let their_count = flow.delivery_count.unwrap_or(link.delivery_count);
            link.credit = their_count.wrapping_add(flow.link_credit.unwrap_or(0)).wrapping_sub(link.delivery_count);
            self.flush(channel, handle).await?;
        } else if flow.echo {
            let session = self.session(channel)?;
            let count = session.links.get(&handle).map(|l| l.delivery_count).unwrap_or(0);
            let f = credit_flow(session, handle, count);
            self.send(&[Frame::Amqp { channel, performative: Performative::Flow(f), payload: Vec::new() }]).await?;
        }
        Ok(())
    }

    async fn transfer(&mut self, channel: u16, transfer: Transfer, payload: Vec<u8>) -> Result<(), End> {
        let max_message = self.ctx.config.max_message_bytes;
        let session = self.session(channel)?;
        session.next_incoming_id = session.next_incoming_id.wrapping_add(1);
        let handle = transfer.handle;
        let link = session
            .links
            .get_mut(&handle)
            .ok_or_else(|| End::Violation(format!("transfer on handle {handle}, which is not attached")))?;
        if link.client_role != Role::Sender {
            return Err(End::Violation(
                "transfer on the reply link: requests go on the link whose target is the registration".into(),
            ));
        }
        let partial = match link.partial.take() {
            Some(p) => p,
            None => {
                if link.credit == 0 {
                    return Err(End::Violation("a transfer without link credit".into()));
                }
                link.credit -= 1;
                link.delivery_count = link.delivery_count.wrapping_add(1);
                let Some(delivery_id) = transfer.delivery_id else {
                    return Err(End::Violation("the first transfer of a delivery has no delivery-id".into()));
                };
                Partial { delivery_id, settled: transfer.settled.unwrap_or(false), bytes: Vec::new() }
            }
        };
        let mut partial = partial;
        if transfer.aborted {
            return Ok(());
        }
        if partial.bytes.len() + payload.len() > max_message {
            return Err(End::Limit(format!("a request message over {max_message} bytes (amqp.max_message_bytes)")));
        }
        partial.bytes.extend_from_slice(&payload);
        partial.settled |= transfer.settled.unwrap_or(false);
        if transfer.more {
            link.partial = Some(partial);
            return Ok(());
        }
        let top_up = (link.credit <= LINK_CREDIT / 2).then(|| {
            link.credit = LINK_CREDIT;
            link.delivery_count
        });
        if let Some(count) = top_up {
            let f = credit_flow(session, handle, count);
            self.send(&[Frame::Amqp { channel, performative: Performative::Flow(f), payload: Vec::new() }]).await?;
        }
        self.request(channel, partial).await
    }

    /// Answers one request: the disposition that settles it, and the reply on the receiver
    /// link of the same session.
    async fn request(&mut self, channel: u16, partial: Partial) -> Result<(), End> {
        let Some(device) = self.identity.as_mut() else {
            return Err(End::Violation("a request before authentication".into()));
        };
        let answer = amqp_request::answer(self.ctx, device, &partial.bytes).await;
        let reply_link = self
            .sessions
            .get(&channel)
            .and_then(|s| s.links.iter().find(|(_, l)| l.client_role == Role::Receiver).map(|(h, _)| *h));
        let (state, reply) = match (answer, reply_link) {
            (amqp_request::Answer::Reply(message), Some(_)) => (dps_proto::amqp_frame::DeliveryState::Accepted, Some(message)),
            (amqp_request::Answer::Reply(_), None) => (
                dps_proto::amqp_frame::DeliveryState::Rejected(Some(AmqpError {
                    condition: "amqp:precondition-failed".into(),
                    description: Some("no receiver link: attach one with source {idScope}/registrations/{registrationId} for the replies".into()),
                    info: Vec::new(),
                })),
                None,
            ),
            (amqp_request::Answer::Rejected(error, message), _) => {
                // A request sent settled cannot be rejected: its reply carries the error instead.
                let reply = if partial.settled { Some(message) } else { None };
                (dps_proto::amqp_frame::DeliveryState::Rejected(Some(error)), reply)
            }
        };
        if !partial.settled {
            let disposition = Disposition {
                role: Role::Receiver,
                first: partial.delivery_id,
                last: None,
                settled: true,
                state: Some(state),
                batchable: false,
            };
            self.send(&[Frame::Amqp {
                channel,
                performative: Performative::Disposition(disposition),
                payload: Vec::new(),
            }])
            .await?;
        }
        if let (Some(message), Some(link)) = (reply, reply_link) {
            let mut bytes = Vec::new();
            message.encode(&mut bytes);
            let session = self.session(channel)?;
            let Some(l) = session.links.get_mut(&link) else { return Ok(()) };
            if l.pending.len() >= MAX_PENDING_REPLIES {
                return Err(End::Limit(format!(
                    "{MAX_PENDING_REPLIES} replies wait for link credit the client does not grant"
                )));
            }
            l.pending.push_back(bytes);
            self.flush(channel, link).await?;
        }
        Ok(())
    }

    /// Sends the replies waiting on a reply link, as far as its credit and the session window go.
    async fn flush(&mut self, channel: u16, handle: u32) -> Result<(), End> {
        let max_frame = self.remote_max_frame as usize;
        let mut frames = Vec::new();
        {
            let session = self.session(channel)?;
            while let Some(link) = session.links.get_mut(&handle) {
                if link.credit == 0 || link.pending.is_empty() {
                    break;
                }
                // Frame header, transfer performative: well under 64 bytes.
                let room = max_frame.saturating_sub(64).max(64);
                let Some(bytes) = link.pending.front() else { break };
                let pieces = bytes.len().div_ceil(room).max(1) as u32;
                if session.remote_incoming_window < pieces {
                    break;
                }
                let Some(bytes) = link.pending.pop_front() else { break };
                link.credit -= 1;
                link.delivery_count = link.delivery_count.wrapping_add(1);
                let tag = link.next_tag;
                link.next_tag = link.next_tag.wrapping_add(1);
                let delivery_id = session.next_outgoing_id;
                let chunks: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(room).collect() };
                let last = chunks.len() - 1;
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let first = i == 0;
                    let transfer = Transfer {
                        handle,
                        delivery_id: first.then_some(delivery_id),
                        delivery_tag: first.then(|| tag.to_be_bytes().to_vec()),
                        message_format: first.then_some(0),
                        settled: first.then_some(true),
                        more: i < last,
                        ..Transfer::default()
                    };
                    frames.push(Frame::Amqp {
                        channel,
                        performative: Performative::Transfer(transfer),
                        payload: chunk.to_vec(),
                    });
                    session.next_outgoing_id = session.next_outgoing_id.wrapping_add(1);
                    session.remote_incoming_window = session.remote_incoming_window.saturating_sub(1);
                }
            }
        }
        if frames.is_empty() {
            return Ok(());
        }
        self.send(&frames).await
    }
}

/// A flow granting [`LINK_CREDIT`] on a request link, with the session's state.
fn credit_flow(session: &Session, handle: u32, delivery_count: u32) -> Flow {
    Flow {
        next_incoming_id: Some(session.next_incoming_id),
        incoming_window: SESSION_WINDOW,
        next_outgoing_id: session.next_outgoing_id,
        outgoing_window: SESSION_WINDOW,
        handle: Some(handle),
        delivery_count: Some(delivery_count),
        link_credit: Some(LINK_CREDIT),
        ..Flow::default()
    }
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Heartbeat { .. } => "an empty frame",
        Frame::Sasl(s) => s.name(),
        Frame::Amqp { performative, .. } => performative.name(),
    }
}
