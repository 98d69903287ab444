//! Time limits and caps of connections that no other whole-server test covers: the HTTPS TLS
//! handshake, header and body deadlines, the HTTPS connection cap with established
//! connections (and which connection is shed at it), MQTT with keep-alive 0, the MQTT TLS
//! handshake deadline on its own, and a text frame on MQTT over WebSocket.
//!
//! Several of the lines that say why a connection ended are logged at `debug`; every server
//! started here runs with `RUST_LOG=info,dps_server=debug` (see [`start`]).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use common::mqtt::{connect_packet, RawMqtt, REGISTER};
use common::{key, Dps};
use dps_proto::mqtt::{decode, Connect, Packet};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Starts a server whose `dps_server` lines are logged down to `debug`. The variable is set
/// once, before the first server of this test binary starts; every test calls this first, so
/// no other thread of this binary is doing anything yet when it is set.
async fn start(config: &str) -> Dps {
    static LOG: Once = Once::new();
    LOG.call_once(|| std::env::set_var("RUST_LOG", "info,dps_server=debug"));
    Dps::start(config).await
}

/// Lower bound of a deadline of `secs`: a little early, for timer granularity.
fn early(secs: u64) -> Duration {
    Duration::from_secs(secs) - Duration::from_millis(200)
}

/// Upper bound of a deadline of `secs`: room for a loaded two-core machine.
fn late(secs: u64) -> Duration {
    Duration::from_secs(secs + 3)
}

fn assert_between(waited: Duration, low: Duration, high: Duration, what: &str) {
    assert!(waited >= low && waited <= high, "{what}: after {waited:?}, expected {low:?}..={high:?}");
}

/// Reads until the server closes the connection (end of stream, or an error such as a reset
/// or a TLS stream cut without close_notify); returns what it sent before. Panics when the
/// connection is still open after `within`.
async fn until_closed<S: AsyncRead + Unpin>(stream: &mut S, within: Duration, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let ended = tokio::time::timeout(within, read_all).await;
    assert!(ended.is_ok(), "{what}: still open after {within:?}");
    got
}

/// Whether the connection stays open (nothing read, not closed) for `period`.
async fn stays_open<S: AsyncRead + Unpin>(stream: &mut S, period: Duration) -> bool {
    let mut b = [0u8; 1];
    tokio::time::timeout(period, stream.read(&mut b)).await.is_err()
}

/// The log lines that contain every one of `needles`.
fn log_lines(dps: &Dps, needles: &[&str]) -> Vec<String> {
    dps.log().lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string).collect()
}

/// The log lines that contain every one of `needles`, once there are `count` of them (a line
/// may be written just after the client saw its connection close); panics after 3 s.
async fn await_log_lines(dps: &Dps, needles: &[&str], count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let lines = log_lines(dps, needles);
        if lines.len() >= count || Instant::now() > deadline {
            assert_eq!(lines.len(), count, "lines with {needles:?}: {}", dps.log());
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one request on an open connection and reads its whole response (by Content-Length),
/// leaving the connection open.
async fn exchange<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(
    conn: &mut S,
    request: &str,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    conn.write_all(request.as_bytes()).await.unwrap();
    conn.flush().await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let (_, headers, _) = parse_response(&raw[..end + 4]);
                let length: usize = header(&headers, "content-length").map_or(0, |v| v.parse().unwrap());
                if raw.len() >= end + 4 + length {
                    return;
                }
            }
            let n = conn.read(&mut buf).await.expect("read a response");
            assert!(n > 0, "closed in the middle of a response: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("a response within 10 s");
    parse_response(&raw)
}

fn peer_field(addr: SocketAddr) -> String {
    format!("peer={addr}")
}

/// The first flight of a real TLS client (its ClientHello record).
fn client_hello() -> Vec<u8> {
    let config =
        rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    assert!(out.len() > 100 && out[0] == 0x16, "a handshake record");
    out
}

/// A TLS connector trusting the server's test CA.
fn connector(dps: &Dps) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(dps.creds["caCertificatePath"].as_str().unwrap()).unwrap();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls_over(dps: &Dps, tcp: TcpStream) -> TlsStream<TcpStream> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector(dps).connect(name, tcp).await.expect("TLS handshake")
}

/// An HTTPS client that keeps no idle connection: each request's connection closes after it,
/// so that a test can count the server's open connections.
fn one_shot_client(dps: &Dps) -> reqwest::Client {
    dps.client_builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(10)).build().unwrap()
}

fn enrollment(id: &str, seed: u8) -> Value {
    let k = key(seed);
    json!({"registrationId": id,
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}})
}

/// Enrolls `id` and returns a device token for it.
async fn enroll(dps: &Dps, id: &str, seed: u8) -> String {
    dps.put_enrollment(enrollment(id, seed)).await;
    dps.device_token(id, &key(seed))
}

/// Registers `id` through `client`; the status and JSON body, or the transport error.
async fn register_via(dps: &Dps, client: &reqwest::Client, id: &str, token: &str) -> Result<(u16, Value), String> {
    let url = dps.url(&format!("/{}/registrations/{id}/register?api-version=2019-03-31", dps.scope()));
    let resp = client
        .put(url)
        .header("Authorization", token)
        .json(&json!({"registrationId": id}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// One HTTP/1.1 response read off a raw stream: status, lower-case headers, body.
fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let text = String::from_utf8_lossy(raw);
    let end = text.find("\r\n\r\n").unwrap_or_else(|| panic!("no complete response head: {text:?}"));
    let mut lines = text[..end].split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    (status, headers, raw[end + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// HTTPS: a TCP client that sends nothing, and one that sends half a ClientHello, are closed
/// after `limits.tls_handshake_timeout_secs` (not before), and say so in the log; a real
/// client registers meanwhile.
#[tokio::test]
async fn https_handshakes_that_never_finish_are_closed_after_the_handshake_timeout() {
    let dps = start("[limits]\ntls_handshake_timeout_secs = 2\n").await;
    let token = enroll(&dps, "hs-dev", 1).await;

    let started = Instant::now();
    let mut silent = TcpStream::connect(dps.addr).await.unwrap();
    let mut partial = TcpStream::connect(dps.addr).await.unwrap();
    let hello = client_hello();
    partial.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let (silent_addr, partial_addr) = (silent.local_addr().unwrap(), partial.local_addr().unwrap());

    // A real client is served while both hold their place.
    let (status, body) = register_via(&dps, &one_shot_client(&dps), "hs-dev", &token).await.unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "assigned", "{body}");

    let (sent_silent, sent_partial) = tokio::join!(
        async {
            let got = until_closed(&mut silent, late(2), "silent TCP client").await;
            (got, started.elapsed())
        },
        async {
            let got = until_closed(&mut partial, late(2), "half a ClientHello").await;
            (got, started.elapsed())
        }
    );
    for ((got, waited), what) in [(sent_silent, "silent TCP client"), (sent_partial, "half a ClientHello")] {
        assert!(got.is_empty(), "{what}: the server sent {got:?}");
        assert_between(waited, early(2), late(2), what);
    }
    for addr in [silent_addr, partial_addr] {
        let lines = await_log_lines(&dps, &["TLS handshake timed out", &peer_field(addr)], 1).await;
        assert!(lines[0].contains("listener=\"https\"") && lines[0].contains("ms=2000"), "{}", lines[0]);
    }
}

/// HTTPS: the request head must arrive within `limits.header_read_timeout_secs`, counted from
/// the end of the TLS handshake (or from the previous answer on a kept-alive connection): a
/// connection that sends nothing, one that trickles a head byte by byte, and one that idles
/// after an answer are closed at that deadline without any answer (no 408), and the log says
/// why; a real client registers meanwhile.
#[tokio::test]
async fn a_request_head_that_does_not_arrive_in_time_closes_the_connection() {
    let dps = start("[limits]\nheader_read_timeout_secs = 2\n").await;
    let token = enroll(&dps, "hdr-dev", 2).await;

    let mut idle = common::mqtt::tls(&dps, dps.addr.port()).await;
    let idle_since = Instant::now();
    let mut slow = common::mqtt::tls(&dps, dps.addr.port()).await;
    let slow_since = Instant::now();
    let slow_addr = slow.get_ref().0.local_addr().unwrap();
    let idle_addr = idle.get_ref().0.local_addr().unwrap();
    let head = format!(
        "PUT /{}/registrations/hdr-dev/register?api-version=2019-03-31 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token}\r\nX-Slow: ",
        dps.scope()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.flush().await.unwrap();

    let trickle = async {
        // One more header byte every 250 ms: progress does not extend the deadline.
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            assert!(slow_since.elapsed() < late(2), "the trickling client is still open");
            if slow.write_all(b"a").await.is_err() || slow.flush().await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_millis(250), slow.read(&mut buf)).await {
                Err(_) => {}
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            }
        }
        (answer, slow_since.elapsed())
    };
    let silent = async {
        let got = until_closed(&mut idle, late(2), "a TLS connection that sends nothing").await;
        (got, idle_since.elapsed())
    };
    let real = async { register_via(&dps, &one_shot_client(&dps), "hdr-dev", &token).await.unwrap() };
    // A kept-alive connection: the next request's head has the same time, from the answer on.
    let kept = async {
        let mut conn = common::mqtt::tls(&dps, dps.addr.port()).await;
        let addr = conn.get_ref().0.local_addr().unwrap();
        let request = format!("GET /enrollments/hdr-dev?{} HTTP/1.1\r\nHost: localhost\r\n\r\n", common::API);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (status, _, _) = exchange(&mut conn, &request).await;
        assert_eq!(status, 401, "no Authorization header");
        let answered = Instant::now();
        let got = until_closed(&mut conn, late(2), "a kept-alive connection").await;
        (got, answered.elapsed(), addr)
    };
    let ((slow_got, slow_waited), (idle_got, idle_waited), (status, body), (kept_got, kept_waited, kept_addr)) =
        tokio::join!(trickle, silent, real, kept);
    assert_eq!(status, 202, "{body}");
    assert!(kept_got.is_empty(), "{:?}", String::from_utf8_lossy(&kept_got));
    assert_between(kept_waited, early(2), late(2), "idle after an answer");
    assert!(slow_got.is_empty(), "no answer to a head that never ended: {:?}", String::from_utf8_lossy(&slow_got));
    assert!(idle_got.is_empty(), "no answer to silence: {:?}", String::from_utf8_lossy(&idle_got));
    assert_between(slow_waited, early(2), late(2), "trickled head");
    assert_between(idle_waited, early(2), late(2), "silent TLS connection");
    for addr in [slow_addr, idle_addr, kept_addr] {
        let lines = await_log_lines(&dps, &["connection ended with an error", &peer_field(addr)], 1).await;
        assert!(lines[0].contains("read header from client timeout"), "{}", lines[0]);
    }
}

/// HTTPS: a body shorter than its Content-Length, then silence: after
/// `limits.body_read_timeout_secs` the request is answered 400 `400001` saying so, and the
/// connection is closed after that answer (the rest of the body is never read).
#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_answered_400_and_the_connection_closed() {
    let dps = start("[limits]\nbody_read_timeout_secs = 2\n").await;
    let token = enroll(&dps, "body-dev", 3).await;

    let mut tls = common::mqtt::tls(&dps, dps.addr.port()).await;
    let head = format!(
        "PUT /{}/registrations/body-dev/register?api-version=2019-03-31 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"registrationId\"",
        dps.scope()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let sent = Instant::now();
    let raw = until_closed(&mut tls, late(2), "a request with half its body").await;
    let waited = sent.elapsed();
    assert_between(waited, early(2), late(2), "answer to a short body");
    let (status, headers, body) = parse_response(&raw);
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&raw));
    let length: usize = header(&headers, "content-length").unwrap().parse().unwrap();
    assert_eq!(body.len(), length, "exactly one answer, then the connection closed: {}", String::from_utf8_lossy(&raw));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["errorCode"], 400001, "{body}");
    assert_eq!(header(&headers, "x-ms-error-code"), Some("400001"));
    assert_eq!(body["message"], "the request body did not arrive within 2 s", "{body}");
    // The device was not registered by the half request.
    let resp = dps
        .client
        .post(dps.url(&format!("/{}/registrations/body-dev?api-version=2019-03-31", dps.scope())))
        .header("Authorization", &token)
        .json(&json!({"registrationId": "body-dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "{}", resp.text().await.unwrap());
}

/// HTTPS `limits.max_connections`: with every place held by an established connection, a
/// newcomer is closed at accept (with a log line saying why) and real clients are refused; with
/// a place held by an unfinished handshake, that one is shed for the newcomer while the older
/// established connections stay and keep serving.
#[tokio::test]
async fn at_the_https_cap_newcomers_are_refused_unless_a_handshake_can_be_shed() {
    // Long handshake budgets: a closed handshake below can only have been shed.
    let dps =
        start("[limits]\nmax_connections = 3\ntls_handshake_timeout_secs = 30\nbusy_handshake_timeout_ms = 30000\n")
            .await;
    let client = one_shot_client(&dps);
    let request = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path}?{} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            common::API,
            dps.service_token(),
            body.len()
        )
    };
    // Three connections, each of which has served a request (so the server, too, has seen its
    // handshake finish); the first one writes the enrollment.
    let mut a = common::mqtt::tls(&dps, dps.addr.port()).await;
    let (status, _, body) =
        exchange(&mut a, &request("PUT", "/enrollments/cap-dev", &enrollment("cap-dev", 4).to_string())).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let token = dps.device_token("cap-dev", &key(4));
    let mut b = common::mqtt::tls(&dps, dps.addr.port()).await;
    let mut c = common::mqtt::tls(&dps, dps.addr.port()).await;
    for conn in [&mut b, &mut c] {
        let (status, _, body) = exchange(conn, &request("GET", "/enrollments/cap-dev", "")).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    // All three finished their handshake: a fourth is closed at accept, at once.
    let mut fourth = TcpStream::connect(dps.addr).await.unwrap();
    let fourth_addr = fourth.local_addr().unwrap();
    let started = Instant::now();
    let got = until_closed(&mut fourth, Duration::from_secs(2), "a fourth connection").await;
    assert!(got.is_empty(), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "closed at accept, not later: {:?}", started.elapsed());
    let refused = register_via(&dps, &client, "cap-dev", &token).await;
    assert!(refused.is_err(), "a real client cannot get in either: {refused:?}");
    let lines = await_log_lines(&dps, &["connection refused at accept", &peer_field(fourth_addr)], 1).await;
    assert!(
        lines[0].contains("the connection limit is reached and every connection has finished its handshake")
            && lines[0].contains("listener=\"https\""),
        "{}",
        lines[0]
    );

    // One leaves; its place goes to a connection that does not finish its handshake.
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut half = TcpStream::connect(dps.addr).await.unwrap();
    let half_addr = half.local_addr().unwrap();
    let hello = client_hello();
    half.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let half_since = Instant::now();
    assert!(stays_open(&mut half, Duration::from_millis(300)).await, "admitted: it was not full");
    // A real client now gets the unfinished handshake's place, not an established one's.
    let (status, body) = register_via(&dps, &client, "cap-dev", &token).await.unwrap();
    assert_eq!(status, 202, "{body}");
    let got = until_closed(&mut half, Duration::from_secs(2), "the unfinished handshake").await;
    assert!(got.is_empty(), "{got:?}");
    assert!(half_since.elapsed() < Duration::from_secs(5), "shed, not timed out: {:?}", half_since.elapsed());
    await_log_lines(&dps, &["TLS handshake cut short", &peer_field(half_addr)], 1).await;
    // The older, established connections were kept and still serve requests.
    for conn in [&mut a, &mut b] {
        let (status, _, body) = exchange(conn, &request("GET", "/enrollments/cap-dev", "")).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    // Both gone: real clients get in again.
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = register_via(&dps, &client, "cap-dev", &token).await.unwrap();
    assert_eq!(status, 202, "{body}");
}

/// MQTT with keep-alive 0: closed after `mqtt.idle_timeout_secs` without a packet, and not
/// before; every whole packet restarts that time (half a packet does not).
#[tokio::test]
async fn mqtt_keep_alive_0_uses_the_idle_timeout() {
    let dps = start("[mqtt]\nidle_timeout_secs = 2\n").await;
    let token = enroll(&dps, "ka0-dev", 5).await;
    let connect = || Connect { keep_alive: 0, ..connect_packet(&dps, "ka0-dev", Some(&token)) };

    let quiet = async {
        let mut c = RawMqtt::tls(&dps).await;
        assert_eq!(c.connect(connect()).await, 0);
        let since = Instant::now();
        c.expect_closed("keep-alive 0, silent").await;
        assert_between(since.elapsed(), early(2), late(2), "silent session");
    };
    let half_packet = async {
        let mut c = RawMqtt::tls(&dps).await;
        assert_eq!(c.connect(connect()).await, 0);
        let since = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.send_raw(&[0xc0]).await; // the first byte of a PINGREQ
        c.expect_closed("half a packet").await;
        assert_between(since.elapsed(), early(2), late(2), "half a packet does not count");
    };
    let pinging = async {
        let mut c = RawMqtt::tls(&dps).await;
        assert_eq!(c.connect(connect()).await, 0);
        c.subscribe().await;
        let since = Instant::now();
        // Well past twice the idle timeout, a packet every 1.2 s.
        while since.elapsed() < Duration::from_millis(4800) {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            c.send(&Packet::PingReq).await;
            assert_eq!(c.recv().await, Some(Packet::PingResp), "open after {:?}", since.elapsed());
        }
        let (topic, body) = c.request(&format!("{REGISTER}1"), b"{}", Some(1)).await;
        assert!(topic.starts_with("$dps/registrations/res/202/"), "{topic}: {body}");
        assert_eq!(body["status"], "assigned", "{body}");
        // Then silence: the same deadline from the last packet.
        let last = Instant::now();
        c.expect_closed("keep-alive 0, silent after pings").await;
        assert_between(last.elapsed(), early(2), late(2), "silence after the last packet");
    };
    tokio::join!(quiet, half_packet, pinging);
    await_log_lines(&dps, &["MQTT connection closed", "no packet for 2 s (keep-alive 0 s)"], 3).await;
}

/// MQTT over TLS: the TLS handshake must finish within `mqtt.connect_timeout_secs`, and then
/// CONNECT must come within the same time again (each phase has its own deadline); a real
/// client connects and registers meanwhile.
#[tokio::test]
async fn mqtt_tls_handshake_and_connect_each_have_connect_timeout_secs() {
    let dps = start("[mqtt]\nconnect_timeout_secs = 2\n").await;
    let token = enroll(&dps, "mhs-dev", 6).await;
    let mqtt: SocketAddr = dps.creds["mqttAddress"].as_str().unwrap().parse().unwrap();

    let started = Instant::now();
    let mut silent = TcpStream::connect(mqtt).await.unwrap();
    let mut partial = TcpStream::connect(mqtt).await.unwrap();
    let hello = client_hello();
    partial.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let (silent_addr, partial_addr) = (silent.local_addr().unwrap(), partial.local_addr().unwrap());
    let slow = TcpStream::connect(mqtt).await.unwrap();
    let slow_since = Instant::now();
    let slow_addr = slow.local_addr().unwrap();

    let handshakes = async {
        let (s, p) = tokio::join!(
            until_closed(&mut silent, late(2), "silent TCP client on the MQTT port"),
            until_closed(&mut partial, late(2), "half a ClientHello on the MQTT port")
        );
        assert!(s.is_empty() && p.is_empty(), "{s:?} {p:?}");
        assert_between(started.elapsed(), early(2), late(2), "MQTT TLS handshake deadline");
    };
    let slow_then_silent = async {
        // 1 s of the handshake budget used, then TLS completes; CONNECT still gets 2 s.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut tls = tls_over(&dps, slow).await;
        let tls_done = Instant::now();
        let got = until_closed(&mut tls, late(2), "TLS done, no CONNECT").await;
        assert!(got.is_empty(), "{got:?}");
        assert_between(tls_done.elapsed(), early(2), late(2), "CONNECT deadline after the handshake");
        assert!(
            slow_since.elapsed() >= Duration::from_secs(1) + early(2),
            "not one deadline for both phases: {:?}",
            slow_since.elapsed()
        );
    };
    let real = async {
        let mut c = RawMqtt::tls(&dps).await;
        assert_eq!(c.connect(connect_packet(&dps, "mhs-dev", Some(&token))).await, 0);
        c.subscribe().await;
        let (topic, body) = c.request(&format!("{REGISTER}7"), b"{}", Some(7)).await;
        assert!(topic.starts_with("$dps/registrations/res/202/"), "{topic}: {body}");
    };
    tokio::join!(handshakes, slow_then_silent, real);
    for addr in [silent_addr, partial_addr] {
        let lines = await_log_lines(&dps, &["TLS handshake timed out", &peer_field(addr)], 1).await;
        assert!(lines[0].contains("listener=\"mqtt\"") && lines[0].contains("ms=2000"), "{}", lines[0]);
    }
    let lines = await_log_lines(&dps, &["MQTT connection closed", &peer_field(slow_addr)], 1).await;
    assert!(lines[0].contains("no CONNECT within 2 s"), "{}", lines[0]);
    assert!(log_lines(&dps, &["TLS handshake timed out", &peer_field(slow_addr)]).is_empty());
}

/// MQTT over WebSocket with frames built by the test.
struct WsMqtt {
    ws: WebSocketStream<TlsStream<TcpStream>>,
    buf: bytes::BytesMut,
    local: SocketAddr,
}

impl WsMqtt {
    async fn open(dps: &Dps) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = common::mqtt::tls(dps, dps.addr.port()).await;
        let local = stream.get_ref().0.local_addr().unwrap();
        let mut request =
            format!("wss://localhost:{}/$iothub/websocket", dps.addr.port()).into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        let (ws, response) = tokio_tungstenite::client_async(request, stream).await.expect("WebSocket upgrade");
        assert_eq!(response.status(), 101);
        WsMqtt { ws, buf: bytes::BytesMut::new(), local }
    }

    async fn send(&mut self, packet: &Packet) {
        self.ws.send(Message::Binary(packet.encode().unwrap().into())).await.unwrap();
    }

    /// The next MQTT packet, or `None` once the server closed; the frames that ended it.
    async fn recv(&mut self) -> Result<Packet, Vec<String>> {
        let mut ending = Vec::new();
        let next = async {
            loop {
                if let Some((p, n)) = decode(&self.buf, 1 << 20).expect("a well-formed packet") {
                    let _ = self.buf.split_to(n);
                    return Ok(p);
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                    Some(Ok(Message::Close(frame))) => ending.push(format!("close frame {frame:?}")),
                    Some(Ok(other)) => ending.push(format!("{other:?}")),
                    Some(Err(e)) => {
                        ending.push(format!("error {e}"));
                        return Err(());
                    }
                    None => return Err(()),
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), next).await.expect("a packet or the end within 5 s") {
            Ok(p) => Ok(p),
            Err(()) => Err(ending),
        }
    }

    async fn connected(dps: &Dps, token: &str) -> Self {
        let mut c = Self::open(dps).await;
        c.send(&Packet::Connect(connect_packet(dps, "ws-dev", Some(token)))).await;
        assert!(matches!(c.recv().await, Ok(Packet::ConnAck { code, .. }) if code as u8 == 0));
        c.send(&Packet::Subscribe { packet_id: 1, filters: vec![("$dps/registrations/res/#".into(), 1)] }).await;
        assert_eq!(c.recv().await, Ok(Packet::SubAck { packet_id: 1, return_codes: vec![1] }));
        c
    }

    /// A register over binary frames; the response topic.
    async fn register(&mut self, rid: u16) -> String {
        self.send(&Packet::Publish(dps_proto::mqtt::Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: format!("{REGISTER}{rid}"),
            packet_id: Some(rid),
            payload: b"{}".to_vec(),
        }))
        .await;
        assert_eq!(self.recv().await, Ok(Packet::PubAck(rid)));
        match self.recv().await {
            Ok(Packet::Publish(p)) => {
                self.send(&Packet::PubAck(p.packet_id.unwrap())).await;
                let body: Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(body["status"], "assigned", "{body}");
                p.topic
            }
            other => panic!("expected the response, got {other:?}"),
        }
    }
}

/// MQTT over WebSocket: binary frames carry the session; a text frame closes the connection
/// at once with an `info` line saying why; other sessions are unaffected.
#[tokio::test]
async fn a_text_frame_closes_an_mqtt_websocket_session() {
    let dps = start("").await;
    let token = enroll(&dps, "ws-dev", 7).await;
    let mut other = WsMqtt::connected(&dps, &token).await;
    let mut c = WsMqtt::connected(&dps, &token).await;
    assert!(c.register(1).await.starts_with("$dps/registrations/res/202/?$rid=1"));

    c.ws.send(Message::Text("{\"hello\": 1}".into())).await.unwrap();
    let sent = Instant::now();
    let ending = c.recv().await.expect_err("no packet after a text frame");
    assert!(sent.elapsed() < Duration::from_secs(3), "closed at once: {:?}", sent.elapsed());
    assert!(ending.iter().any(|f| f.starts_with("close frame")), "a WebSocket close: {ending:?}");
    let text_frame = "MQTT-WS connection closed: text frame (MQTT travels in binary frames)";
    let lines = await_log_lines(&dps, &[text_frame, &peer_field(c.local)], 1).await;
    assert!(lines[0].contains(" INFO "), "{}", lines[0]);

    // The other session goes on over binary frames.
    assert!(other.register(2).await.starts_with("$dps/registrations/res/202/?$rid=2"));
    let lines = log_lines(&dps, &["text frame", &peer_field(other.local)]);
    assert!(lines.is_empty(), "{lines:?}");
}

/// An MQTT-over-WebSocket session is an open connection on the HTTPS port, and
/// `limits.max_connections_per_address` says "Open HTTPS connections per source address (IPv6:
/// per /64) at most" (README: "Each listener has a cap … and a cap per source address"). With 2
/// sessions held from one address, a third connection from it must be refused at accept.
/// (Before the session kept its connection's ticket, hyper's hand-over of the upgraded stream
/// dropped it, and one address could hold every `mqtt.max_connections` slot.)
#[tokio::test]
async fn websocket_sessions_count_against_the_https_per_address_cap() {
    let dps = start("[limits]\nmax_connections_per_address = 2\n").await;
    // Enrolled over a connection that is closed right after (none stays in a pool).
    let resp = one_shot_client(&dps)
        .put(dps.url(&format!("/enrollments/ws-dev?{}", common::API)))
        .header("Authorization", dps.service_token())
        .json(&enrollment("ws-dev", 8))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let token = dps.device_token("ws-dev", &key(8));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = [WsMqtt::connected(&dps, &token).await, WsMqtt::connected(&dps, &token).await];
    let mut third = TcpStream::connect(dps.addr).await.unwrap();
    let got = until_closed(&mut third, Duration::from_secs(2), "a third connection from the same address").await;
    assert!(got.is_empty(), "{got:?}");
    await_log_lines(&dps, &["connection refused at accept", "the connection limit per source address is reached"], 1)
        .await;
    for (i, c) in held.iter_mut().enumerate() {
        assert!(c.register(20 + i as u16).await.starts_with("$dps/registrations/res/202/"));
    }
}
