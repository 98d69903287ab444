//! A raw MQTT 3.1.1 client for packet-level tests: real TLS (or WebSocket over TLS) to a
//! spawned dps, packets built with the codec of dps-proto or written byte by byte.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dps_proto::mqtt::{decode, Connect, Packet, Publish};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::Dps;

enum Transport {
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<WebSocketStream<TlsStream<TcpStream>>>),
}

/// One MQTT connection.
pub struct RawMqtt {
    transport: Transport,
    buf: BytesMut,
}

pub const REGISTER: &str = "$dps/registrations/PUT/iotdps-register/?$rid=";

/// A client certificate chain (DER, leaf first) and its key (PKCS#8 DER).
pub type ClientIdentity = (Vec<Vec<u8>>, Vec<u8>);

/// A TLS connection to one of the server's ports, trusting its test CA.
pub async fn tls(dps: &Dps, port: u16) -> TlsStream<TcpStream> {
    tls_as(dps, port, None).await
}

pub async fn tls_as(dps: &Dps, port: u16, identity: Option<&ClientIdentity>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tls_over(dps, tcp, identity).await
}

/// TLS on a connected socket, trusting the server's test CA.
pub async fn tls_over(dps: &Dps, tcp: TcpStream, identity: Option<&ClientIdentity>) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(dps.creds["caCertificatePath"].as_str().unwrap()).unwrap();
    for cert in rustls_pemfile_certs(&ca) {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain.iter().map(|c| rustls_pki_types::CertificateDer::from(c.clone())).collect(),
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.clone().into()),
            )
            .unwrap(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem).map(|c| c.unwrap()).collect()
}

impl RawMqtt {
    /// MQTT over TLS to the MQTT listener.
    pub async fn tls(dps: &Dps) -> Self {
        let port = dps.creds["mqttPort"].as_u64().unwrap() as u16;
        RawMqtt { transport: Transport::Tls(Box::new(tls(dps, port).await)), buf: BytesMut::new() }
    }

    /// MQTT over TLS presenting a client certificate chain.
    pub async fn tls_with_certificate(dps: &Dps, identity: &ClientIdentity) -> Self {
        let port = dps.creds["mqttPort"].as_u64().unwrap() as u16;
        RawMqtt { transport: Transport::Tls(Box::new(tls_as(dps, port, Some(identity)).await)), buf: BytesMut::new() }
    }

    /// MQTT over WebSocket on the HTTPS port, with the given path and subprotocol.
    pub async fn ws(dps: &Dps, path: &str, subprotocol: &str) -> Result<Self, (u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = tls(dps, dps.addr.port()).await;
        let mut request = format!("wss://localhost:{}{path}", dps.addr.port()).into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", subprotocol.parse().unwrap());
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((ws, response)) => {
                assert_eq!(
                    response.headers().get("sec-websocket-protocol").unwrap().to_str().unwrap(),
                    subprotocol,
                    "the server echoes the subprotocol"
                );
                Ok(RawMqtt { transport: Transport::Ws(Box::new(ws)), buf: BytesMut::new() })
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("WebSocket handshake: {e}"),
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.transport {
            Transport::Tls(s) => {
                let _ = s.write_all(bytes).await;
                let _ = s.flush().await;
            }
            Transport::Ws(ws) => {
                let _ = ws.send(Message::Binary(bytes.to_vec().into())).await;
            }
        }
    }

    pub async fn send(&mut self, packet: &Packet) {
        self.send_raw(&packet.encode().unwrap()).await;
    }

    /// The next packet, or `None` when the server closed the connection. Panics after 10 s.
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(Duration::from_secs(10), self.recv_inner()).await.expect("no packet within 10 s")
    }

    async fn recv_inner(&mut self) -> Option<Packet> {
        loop {
            if let Some((p, n)) = decode(&self.buf, 1 << 24).expect("the server sent a malformed packet") {
                let _ = self.buf.split_to(n);
                return Some(p);
            }
            match &mut self.transport {
                Transport::Tls(s) => match s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
                Transport::Ws(ws) => match ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Asserts that the server closes the connection (after any packets it still sends).
    pub async fn expect_closed(&mut self, why: &str) {
        for _ in 0..10 {
            if self.recv().await.is_none() {
                return;
            }
        }
        panic!("the server did not close the connection: {why}");
    }

    /// CONNECT + CONNACK; returns the return code.
    pub async fn connect(&mut self, packet: Connect) -> u8 {
        self.send(&Packet::Connect(packet)).await;
        match self.recv().await {
            Some(Packet::ConnAck { session_present, code }) => {
                assert!(!session_present, "session present is always 0");
                code as u8
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// SUBSCRIBE to the response filter and check the SUBACK.
    pub async fn subscribe(&mut self) {
        self.send(&Packet::Subscribe { packet_id: 1, filters: vec![("$dps/registrations/res/#".into(), 1)] }).await;
        assert_eq!(self.recv().await, Some(Packet::SubAck { packet_id: 1, return_codes: vec![1] }));
    }

    /// Publishes a request (QoS 1 with `packet_id`, or QoS 0) and returns the response topic
    /// and JSON body, acknowledging it.
    pub async fn request(
        &mut self,
        topic: &str,
        payload: &[u8],
        packet_id: Option<u16>,
    ) -> (String, serde_json::Value) {
        let qos = u8::from(packet_id.is_some());
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id,
            payload: payload.to_vec(),
        }))
        .await;
        if let Some(id) = packet_id {
            assert_eq!(self.recv().await, Some(Packet::PubAck(id)), "PUBACK comes before the response");
        }
        match self.recv().await {
            Some(Packet::Publish(p)) => {
                assert_eq!(p.qos, 1, "responses are QoS 1");
                let id = p.packet_id.unwrap();
                self.send(&Packet::PubAck(id)).await;
                (p.topic, serde_json::from_slice(&p.payload).expect("JSON response"))
            }
            other => panic!("expected a response PUBLISH, got {other:?}"),
        }
    }
}

/// A CONNECT as the Node SDK sends it.
pub fn connect_packet(dps: &Dps, registration_id: &str, token: Option<&str>) -> Connect {
    Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: true,
        keep_alive: 180,
        client_id: registration_id.into(),
        will: None,
        username: Some(format!(
            "{}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=raw-test%2F1.0",
            dps.scope()
        )),
        password: token.map(|t| t.as_bytes().to_vec()),
    }
}
