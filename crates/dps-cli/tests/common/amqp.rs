//! A raw AMQP 1.0 client for frame-level tests: real TLS (or WebSocket over TLS) to a spawned
//! dps, frames built with the codec of dps-proto or written byte by byte, and the few steps a
//! DPS device takes (SASL PLAIN, open, session, the two links, requests).

use std::time::Duration;

use dps_proto::amqp::Value;
use dps_proto::amqp_frame::{
    decode_frame, AmqpError, Attach, Begin, DeliveryState, Flow, Frame, Open, Performative, Role, Sasl, Terminus,
    Transfer, AMQP_HEADER, SASL_HEADER,
};
use dps_proto::amqp_message::{decode_message, Body, Message, Properties};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use super::mqtt::{tls_as, tls_over, ClientIdentity};
use super::Dps;

enum Transport {
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<WebSocketStream<TlsStream<TcpStream>>>),
}

/// One AMQP connection.
pub struct RawAmqp {
    transport: Transport,
    buf: Vec<u8>,
    next_delivery: u32,
    correlation: u32,
}

/// What a request got: the reply's JSON and application properties, or the rejection.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    Reply { json: serde_json::Value, message: Message },
    Rejected(Option<AmqpError>),
}

impl RawAmqp {
    /// AMQP over TLS to the AMQP listener.
    pub async fn tls(dps: &Dps) -> Self {
        Self::new(Transport::Tls(Box::new(tls_as(dps, amqp_port(dps), None).await)))
    }

    /// AMQP over TLS presenting a client certificate chain.
    pub async fn tls_with_certificate(dps: &Dps, identity: &ClientIdentity) -> Self {
        Self::new(Transport::Tls(Box::new(tls_as(dps, amqp_port(dps), Some(identity)).await)))
    }

    /// AMQP over TLS on a socket whose receive buffer is `bytes` small (a client that reads
    /// little, or nothing).
    pub async fn tls_small_window(dps: &Dps, bytes: u32) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        let tcp = socket.connect(([127, 0, 0, 1], amqp_port(dps)).into()).await.unwrap();
        Self::new(Transport::Tls(Box::new(tls_over(dps, tcp, None).await)))
    }

    /// Writes bytes unless that takes longer than `limit` (the server stopped reading).
    pub async fn try_send_raw(&mut self, bytes: &[u8], limit: Duration) -> bool {
        tokio::time::timeout(limit, self.send_raw(bytes)).await.is_ok()
    }

    /// AMQP over WebSocket on the HTTPS port (subprotocol AMQPWSB10).
    pub async fn ws(dps: &Dps, identity: Option<&ClientIdentity>) -> Result<Self, (u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = tls_as(dps, dps.addr.port(), identity).await;
        let mut request =
            format!("wss://localhost:{}/$iothub/websocket", dps.addr.port()).into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "AMQPWSB10".parse().unwrap());
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((ws, response)) => {
                assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), "AMQPWSB10");
                Ok(Self::new(Transport::Ws(Box::new(ws))))
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("WebSocket handshake: {e}"),
        }
    }

    fn new(transport: Transport) -> Self {
        RawAmqp { transport, buf: Vec::new(), next_delivery: 0, correlation: 0 }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.transport {
            Transport::Tls(s) => {
                let _ = s.write_all(bytes).await;
                let _ = s.flush().await;
            }
            Transport::Ws(ws) => {
                let _ = ws.send(WsMessage::Binary(bytes.to_vec().into())).await;
            }
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut out = Vec::new();
        frame.encode(&mut out);
        self.send_raw(&out).await;
    }

    pub async fn perform(&mut self, channel: u16, performative: Performative) {
        self.send(Frame::Amqp { channel, performative, payload: Vec::new() }).await;
    }

    async fn fill(&mut self) -> bool {
        match &mut self.transport {
            Transport::Tls(s) => {
                let mut chunk = [0u8; 8192];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => false,
                    Ok(n) => {
                        self.buf.extend_from_slice(&chunk[..n]);
                        true
                    }
                }
            }
            Transport::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Binary(b))) => {
                        self.buf.extend_from_slice(&b);
                        return true;
                    }
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return false,
                    Some(Ok(_)) => {}
                }
            },
        }
    }

    /// The 8-byte protocol header the server answers with, or `None` if it closed first.
    pub async fn header(&mut self) -> Option<[u8; 8]> {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.buf.len() < 8 {
                if !self.fill().await {
                    return None;
                }
            }
            let h: [u8; 8] = self.buf[..8].try_into().unwrap();
            self.buf.drain(..8);
            Some(h)
        })
        .await
        .expect("no protocol header within 10 s")
    }

    /// The next frame (heartbeats skipped), or `None` when the server closed the connection.
    /// Panics after 10 s.
    pub async fn frame(&mut self) -> Option<Frame> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some((frame, n)) = decode_frame(&self.buf, 1 << 20).expect("the server sent a malformed frame") {
                    self.buf.drain(..n);
                    if matches!(frame, Frame::Heartbeat { .. }) {
                        continue;
                    }
                    return Some(frame);
                }
                if !self.fill().await {
                    return None;
                }
            }
        })
        .await
        .expect("no frame within 10 s")
    }

    pub async fn sasl(&mut self) -> Sasl {
        match self.frame().await {
            Some(Frame::Sasl(s)) => s,
            other => panic!("expected a SASL frame, got {other:?}"),
        }
    }

    pub async fn performative(&mut self) -> Performative {
        match self.frame().await {
            Some(Frame::Amqp { performative, .. }) => performative,
            other => panic!("expected an AMQP frame, got {other:?}"),
        }
    }

    /// Reads until the server closes the connection; returns the `close` error it sent, if any.
    pub async fn closed(&mut self, why: &str) -> Option<AmqpError> {
        let mut error = None;
        for _ in 0..20 {
            match self.frame().await {
                None => return error,
                Some(Frame::Amqp { performative: Performative::Close(c), .. }) => error = c.error,
                Some(_) => {}
            }
        }
        panic!("the server did not close the connection: {why}");
    }

    /// SASL header, the mechanisms offered, `init` with `mechanism` and `initial`; returns the
    /// server's next SASL frame.
    pub async fn sasl_init(&mut self, mechanism: &str, initial: &[u8]) -> Sasl {
        self.send_raw(&SASL_HEADER).await;
        assert_eq!(self.header().await, Some(SASL_HEADER));
        let Sasl::Mechanisms(offered) = self.sasl().await else { panic!("no sasl-mechanisms") };
        assert_eq!(offered, vec!["PLAIN".to_string(), "TPM".to_string()]);
        self.send(Frame::Sasl(Sasl::Init {
            mechanism: mechanism.into(),
            initial_response: Some(initial.to_vec()),
            hostname: Some("localhost".into()),
        }))
        .await;
        self.sasl().await
    }

    /// SASL PLAIN; returns the outcome code.
    pub async fn sasl_plain(&mut self, scope: &str, registration_id: &str, token: &str) -> u8 {
        let initial = format!("\0{scope}/registrations/{registration_id}\0{token}");
        match self.sasl_init("PLAIN", initial.as_bytes()).await {
            Sasl::Outcome { code, .. } => code,
            other => panic!("expected sasl-outcome, got {other:?}"),
        }
    }

    /// Counts the empty frames (heartbeats) the server sends within `time`; any other frame
    /// is a failure.
    pub async fn heartbeats_within(&mut self, time: Duration) -> usize {
        let mut count = 0;
        let end = tokio::time::Instant::now() + time;
        loop {
            while let Some((frame, n)) = decode_frame(&self.buf, 1 << 20).expect("a malformed frame") {
                self.buf.drain(..n);
                assert!(matches!(frame, Frame::Heartbeat { .. }), "only heartbeats expected, got {frame:?}");
                count += 1;
            }
            match tokio::time::timeout_at(end, self.fill()).await {
                Err(_) => return count,
                Ok(true) => {}
                Ok(false) => panic!("the server closed the connection"),
            }
        }
    }

    /// The AMQP header and `open` after SASL (or without it); returns the server's open.
    pub async fn open(&mut self) -> Open {
        self.open_with(Open { container_id: "test".into(), ..Open::default() }).await
    }

    /// [`RawAmqp::open`] with the client's own `open`.
    pub async fn open_with(&mut self, open: Open) -> Open {
        self.send_raw(&AMQP_HEADER).await;
        assert_eq!(self.header().await, Some(AMQP_HEADER));
        self.perform(0, Performative::Open(open)).await;
        match self.performative().await {
            Performative::Open(o) => o,
            other => panic!("expected open, got {other:?}"),
        }
    }

    /// `begin` on channel 0 and the two links on `address`, as the SDKs attach them; returns the
    /// refusal of the first link the server refused (its detach error), if any.
    pub async fn links(&mut self, address: &str) -> Result<(), AmqpError> {
        self.links_with_credit(address, 10).await
    }

    /// [`RawAmqp::links`], granting `credit` replies on the receiver link.
    pub async fn links_with_credit(&mut self, address: &str, credit: u32) -> Result<(), AmqpError> {
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: credit.max(1000),
            outgoing_window: 1000,
            handle_max: 7,
        };
        self.perform(0, Performative::Begin(begin)).await;
        let Performative::Begin(b) = self.performative().await else { panic!("no begin") };
        assert_eq!(b.remote_channel, Some(0));
        let terminus = |a: Option<&str>| Some(Terminus { address: a.map(str::to_string), ..Terminus::default() });
        let receiver = Attach {
            name: "receiver".into(),
            handle: 0,
            role: Role::Receiver,
            source: terminus(Some(address)),
            target: terminus(None),
            ..Attach::default()
        };
        let sender = Attach {
            name: "sender".into(),
            handle: 1,
            role: Role::Sender,
            source: terminus(None),
            target: terminus(Some(address)),
            initial_delivery_count: Some(0),
            ..Attach::default()
        };
        for attach in [receiver, sender] {
            let handle = attach.handle;
            let client_role = attach.role;
            self.perform(0, Performative::Attach(attach)).await;
            let Performative::Attach(reply) = self.performative().await else { panic!("no attach") };
            assert_eq!(reply.handle, handle);
            assert_ne!(reply.role, client_role);
            let refused = match client_role {
                Role::Receiver => reply.source.as_ref().and_then(|t| t.address.as_ref()).is_none(),
                Role::Sender => reply.target.as_ref().and_then(|t| t.address.as_ref()).is_none(),
            };
            if refused {
                let Performative::Detach(d) = self.performative().await else { panic!("a refused link is detached") };
                assert!(d.closed);
                return Err(d.error.expect("a refused link says why"));
            }
            if client_role == Role::Receiver {
                let flow = Flow {
                    next_incoming_id: Some(0),
                    incoming_window: credit.max(1000),
                    next_outgoing_id: 0,
                    outgoing_window: 1000,
                    handle: Some(0),
                    delivery_count: Some(0),
                    link_credit: Some(credit),
                    ..Flow::default()
                };
                self.perform(0, Performative::Flow(flow)).await;
            } else {
                let Performative::Flow(f) = self.performative().await else { panic!("credit for the sender link") };
                assert_eq!(f.handle, Some(1));
                assert!(f.link_credit.unwrap() > 0);
            }
        }
        Ok(())
    }

    /// Sends a request on the sender link and returns its disposition and reply.
    pub async fn request(&mut self, properties: &[(&str, Value)], body: Body) -> Answer {
        self.correlation += 1;
        let correlation = Value::String(format!("corr-{}", self.correlation));
        let message = Message {
            properties: Properties { correlation_id: Some(correlation.clone()), ..Properties::default() },
            application_properties: properties.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            body,
            ..Message::default()
        };
        let mut payload = Vec::new();
        message.encode(&mut payload);
        let delivery_id = self.next_delivery;
        self.next_delivery += 1;
        let transfer = Transfer {
            handle: 1,
            delivery_id: Some(delivery_id),
            delivery_tag: Some(delivery_id.to_be_bytes().to_vec()),
            message_format: Some(0),
            settled: Some(false),
            ..Transfer::default()
        };
        self.send(Frame::Amqp { channel: 0, performative: Performative::Transfer(transfer), payload }).await;
        loop {
            match self.frame().await {
                Some(Frame::Amqp { performative: Performative::Disposition(d), .. }) => {
                    assert_eq!(d.first, delivery_id);
                    assert!(d.settled);
                    match d.state {
                        Some(DeliveryState::Accepted) => {}
                        Some(DeliveryState::Rejected(e)) => return Answer::Rejected(e),
                        other => panic!("unexpected outcome {other:?}"),
                    }
                }
                Some(Frame::Amqp { performative: Performative::Flow(_), .. }) => {}
                Some(Frame::Amqp { performative: Performative::Transfer(t), payload, .. }) => {
                    assert_eq!(t.handle, 0, "replies come on the receiver link");
                    assert!(!t.more);
                    let message = decode_message(&payload).expect("a reply message");
                    assert_eq!(message.properties.correlation_id, Some(correlation), "the request's correlation-id");
                    let Body::Data(bytes) = &message.body else { panic!("replies are data sections") };
                    let json = serde_json::from_slice(bytes).expect("JSON reply");
                    return Answer::Reply { json, message };
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// A register request with a JSON body.
    pub async fn register(&mut self, body: &serde_json::Value) -> Answer {
        let props = [
            ("iotdps-operation-type", Value::String("iotdps-register".into())),
            ("iotdps-forceRegistration", Value::Bool(false)),
        ];
        self.request(&props, Body::Data(serde_json::to_vec(body).unwrap())).await
    }

    /// An operation-status query.
    pub async fn poll(&mut self, operation_id: &str) -> Answer {
        let props = [
            ("iotdps-operation-type", Value::String("iotdps-get-operationstatus".into())),
            ("iotdps-operation-id", Value::String(operation_id.into())),
        ];
        self.request(&props, Body::Value(Value::String(String::new()))).await
    }
}

pub fn amqp_port(dps: &Dps) -> u16 {
    dps.creds["amqpPort"].as_u64().expect("the AMQP listener is on") as u16
}

impl Answer {
    /// The reply's JSON; panics on a rejection.
    pub fn json(self) -> serde_json::Value {
        match self {
            Answer::Reply { json, .. } => json,
            Answer::Rejected(e) => panic!("rejected: {e:?}"),
        }
    }

    /// The rejection's DPS error JSON; panics on a reply.
    pub fn rejection(self) -> (String, serde_json::Value) {
        match self {
            Answer::Rejected(Some(e)) => {
                let json =
                    serde_json::from_str(e.description.as_deref().expect("a description")).expect("DPS error JSON");
                (e.condition, json)
            }
            other => panic!("expected a rejection with an error, got {other:?}"),
        }
    }
}
