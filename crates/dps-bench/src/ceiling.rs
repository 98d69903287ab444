//! The ceiling: the least a server can do for the bench's requests on the same TLS settings
//! as dps (the same certificate and key, [`crate::tls::server_config`]). HTTPS: hyper
//! HTTP/1.1 with keep-alive answering every request with a fixed `202` and an `assigned`
//! operation, body read but not parsed. The one exception is a TPM device's first request
//! (no Authorization, a `tpm` object in the body): it gets the `401` challenge with an
//! authentication key built for the device's keys (the crypto a TPM challenge cannot do
//! without), so that the device can go on. MQTT: CONNACK, SUBACK, PUBACK and a fixed `200`
//! response, no authentication, no store. AMQP ([`crate::ceiling_amqp`]): the protocol
//! headers, a SASL outcome `ok` without checking anything (but the three challenges of the
//! `TPM` mechanism, with a real authentication key as for the HTTPS `401`), open, begin,
//! attach and flow answers, and for each request an `accepted` disposition and the fixed reply
//! with the request's correlation-id. Run in a process of its own, like dps (`dps
//! bench-ceiling`), so both get the same share of the machine.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use dps_proto::mqtt::{ConnectReturnCode, Packet, Publish};
use dps_proto::mqtt_io::PacketStream;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use crate::ceiling_answer::FIXED_OPERATION;
use crate::ceiling_answer::{authentication_key, Stream};
use crate::BenchError;

/// The addresses of the ceiling's listeners.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    /// HTTPS.
    pub https: SocketAddr,
    /// MQTT over TLS.
    pub mqtt: SocketAddr,
    /// AMQP over TLS.
    pub amqp: SocketAddr,
}

/// Which protocol a ceiling listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Https,
    Mqtt,
    Amqp,
}

/// Binds the ceiling listeners on loopback (free ports) and serves them until the process
/// ends. Calls `ready` with their addresses once bound.
pub async fn serve(cert: &Path, key: &Path, ready: impl FnOnce(Listeners)) -> Result<(), BenchError> {
    let tls = crate::tls::server_config(cert, key)?;
    let acceptor = TlsAcceptor::from(tls);
    let bind =
        || async { TcpListener::bind(("127.0.0.1", 0)).await.map_err(BenchError::io("cannot bind the ceiling")) };
    let (https, mqtt, amqp) = (bind().await?, bind().await?, bind().await?);
    let addr = |l: &TcpListener| l.local_addr().map_err(BenchError::io("ceiling address"));
    ready(Listeners { https: addr(&https)?, mqtt: addr(&mqtt)?, amqp: addr(&amqp)? });
    let https_task = tokio::spawn(accept_loop(https, acceptor.clone(), Protocol::Https));
    let mqtt_task = tokio::spawn(accept_loop(mqtt, acceptor.clone(), Protocol::Mqtt));
    let amqp_task = tokio::spawn(accept_loop(amqp, acceptor, Protocol::Amqp));
    let _ = tokio::join!(https_task, mqtt_task, amqp_task);
    Ok(())
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, protocol: Protocol) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                match protocol {
                    Protocol::Https => serve_https(stream).await,
                    Protocol::Mqtt => serve_mqtt(stream).await,
                    Protocol::Amqp => crate::ceiling_amqp::serve_amqp(stream).await,
                }
            }
        });
    }
}

async fn serve_https(stream: Stream) {
    {
        let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let unauthenticated = !req.headers().contains_key("authorization");
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if unauthenticated {
                if let Some(challenge) = tpm_challenge(&body) {
                    return Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .status(401)
                            .header("content-type", "application/json; charset=utf-8")
                            .body(Full::new(Bytes::from(challenge)))
                            .unwrap_or_default(),
                    );
                }
            }
            Ok::<_, Infallible>(
                hyper::Response::builder()
                    .status(202)
                    .header("content-type", "application/json; charset=utf-8")
                    .header("retry-after", "3")
                    .body(Full::new(Bytes::from_static(FIXED_OPERATION.as_bytes())))
                    .unwrap_or_default(),
            )
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            .await;
    }
}

/// The `401` body for a TPM device's first request (`tpm.endorsementKey` and
/// `tpm.storageRootKey` in `body`): an authentication key for a fixed HMAC key. `None` for
/// any other body.
fn tpm_challenge(body: &[u8]) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let tpm = v.get("tpm")?;
    let blob = authentication_key(tpm["endorsementKey"].as_str()?, tpm["storageRootKey"].as_str()?)?;
    let answer = serde_json::json!({
        "authenticationKey": BASE64.encode(blob),
        "keyName": "registration",
        "message": "ceiling: import the authenticationKey and send the request again",
    });
    serde_json::to_vec(&answer).ok()
}

async fn serve_mqtt(stream: Stream) {
    {
        let mut stream = PacketStream::new(stream, 1 << 20);
        let mut next_id: u16 = 1;
        loop {
            let Ok(Some(packet)) = stream.read().await else { return };
            let replies = match packet {
                Packet::Connect(_) => {
                    vec![Packet::ConnAck { session_present: false, code: ConnectReturnCode::Accepted }]
                }
                Packet::Subscribe { packet_id, filters } => {
                    vec![Packet::SubAck { packet_id, return_codes: filters.iter().map(|_| 1).collect() }]
                }
                Packet::Publish(p) => {
                    let rid = p.topic.split("$rid=").nth(1).unwrap_or("0").split('&').next().unwrap_or("0").to_string();
                    next_id = next_id.checked_add(1).unwrap_or(1);
                    let mut out = Vec::new();
                    if let Some(id) = p.packet_id {
                        out.push(Packet::PubAck(id));
                    }
                    out.push(Packet::Publish(Publish {
                        dup: false,
                        qos: 1,
                        retain: false,
                        topic: format!("$dps/registrations/res/200/?$rid={rid}"),
                        packet_id: Some(next_id),
                        payload: FIXED_OPERATION.as_bytes().to_vec(),
                    }));
                    out
                }
                Packet::PingReq => vec![Packet::PingResp],
                Packet::Disconnect => return,
                _ => Vec::new(),
            };
            for reply in replies {
                if stream.write(&reply).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::tpm::software::SoftwareTpm;

    #[test]
    fn a_tpm_first_request_gets_a_challenge_the_device_can_import() {
        let tpm = SoftwareTpm::generate(&mut rand::rngs::OsRng).unwrap();
        let b64 = |p: &dps_proto::tpm::TpmPublic| BASE64.encode(p.marshal_tpm2b().unwrap());
        let body = serde_json::json!({"registrationId": "d",
            "tpm": {"endorsementKey": b64(tpm.endorsement_key()), "storageRootKey": b64(tpm.storage_root_key())}});
        let answer: serde_json::Value =
            serde_json::from_slice(&tpm_challenge(body.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(answer["keyName"], "registration");
        let blob = BASE64.decode(answer["authenticationKey"].as_str().unwrap()).unwrap();
        assert_eq!(tpm.import(&blob).unwrap(), vec![0x42; 32]);
        // Anything else gets the fixed answer.
        assert!(tpm_challenge(br#"{"registrationId": "d"}"#).is_none());
        assert!(tpm_challenge(br#"{"registrationId": "d", "tpm": {"endorsementKey": "AAAA"}}"#).is_none());
        assert!(tpm_challenge(b"not json").is_none());
    }
}
