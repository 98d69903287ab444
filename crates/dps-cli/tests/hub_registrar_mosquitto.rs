//! The `mosquitto` registrar through a spawned dps and a real Mosquitto (Debian `mosquitto`,
//! its dynamic-security plugin) that each test starts on a free port: a registered device
//! connects with the password derived from its key and publishes on its own topics; a wrong
//! password, and another device's topics, are refused; a device that moves to another broker
//! loses its client on the first; a TPM device's password comes from its TPM key; a broker
//! that is down fails the registration.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::{key, Dps};
use std::sync::Arc;

use common::pki::{ca, device, Issued};
use dps_bench::mosquitto::{Broker, DeviceTls, ADMIN_PASSWORD};
use dps_core::tpm::software::SoftwareTpm;
use dps_proto::mqtt::{Connect, ConnectReturnCode, Packet, Publish};
use dps_proto::mqtt_io::PacketStream;
use dps_server::registrar::mosquitto::device_password;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;
use tokio::net::TcpStream;

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A device's MQTT connection to a broker.
struct Client {
    stream: PacketStream<Box<dyn Io>>,
}

impl Client {
    /// Connects; the broker's return code.
    async fn connect(port: u16, username: &str, password: &str) -> (ConnectReturnCode, Option<Client>) {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        Self::handshake(Box::new(tcp), username, Some(username), Some(password)).await
    }

    /// Connects over TLS with a client certificate, without a user name or password.
    async fn connect_with_certificate(port: u16, ca: &Issued, device: &Issued) -> (ConnectReturnCode, Option<Client>) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(device.key.serialize_der().into());
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![device.cert.der().clone()], key)
            .unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        Self::handshake(Box::new(tls), "x509", None, None).await
    }

    async fn handshake(
        io: Box<dyn Io>,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> (ConnectReturnCode, Option<Client>) {
        let mut stream = PacketStream::new(io, 1 << 20);
        stream
            .write(&Packet::Connect(Connect {
                protocol_name: "MQTT".into(),
                protocol_level: 4,
                clean_session: true,
                keep_alive: 30,
                client_id: format!("{client_id}-{}", rand::random::<u32>()),
                will: None,
                username: username.map(str::to_string),
                password: password.map(|p| p.as_bytes().to_vec()),
            }))
            .await
            .unwrap();
        match stream.read().await.unwrap() {
            Some(Packet::ConnAck { code: ConnectReturnCode::Accepted, .. }) => {
                (ConnectReturnCode::Accepted, Some(Client { stream }))
            }
            Some(Packet::ConnAck { code, .. }) => (code, None),
            other => panic!("no CONNACK: {other:?}"),
        }
    }

    /// Subscribes to `filter`; the SUBACK return code (0x80: refused).
    async fn subscribe(&mut self, filter: &str) -> u8 {
        self.stream.write(&Packet::Subscribe { packet_id: 7, filters: vec![(filter.into(), 1)] }).await.unwrap();
        loop {
            if let Some(Packet::SubAck { return_codes, .. }) = self.stream.read().await.unwrap() {
                return return_codes[0];
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    async fn publish(&mut self, topic: &str, payload: &[u8]) {
        let publish = Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: topic.into(),
            packet_id: Some(9),
            payload: payload.to_vec(),
        };
        self.stream.write(&Packet::Publish(publish)).await.unwrap();
    }

    /// The next PUBLISH within `within`, if any (acknowledged).
    async fn next_message(&mut self, within: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read()).await {
                Ok(Ok(Some(Packet::Publish(p)))) => {
                    if let Some(id) = p.packet_id {
                        self.stream.write(&Packet::PubAck(id)).await.unwrap();
                    }
                    return Some(p);
                }
                Ok(Ok(Some(_))) => continue,
                _ => return None,
            }
        }
    }
}

async fn enroll(dps: &Dps, id: &str, hub: &str) -> String {
    dps.put_enrollment(json!({"registrationId": id, "iotHubs": [hub],
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    dps.device_token(id, &key(1))
}

#[tokio::test]
async fn a_registered_device_uses_its_broker_on_its_own_topics_only() {
    let broker = Broker::start().await.unwrap();
    let dps = Dps::start(&broker.config("mqtt-1.test", "fail")).await;
    for id in ["dev-1", "dev-2"] {
        let token = enroll(&dps, id, "mqtt-1.test").await;
        let state = dps.register_to_end(id, &token).await;
        assert_eq!(state["status"], "assigned", "{state}");
        assert_eq!(state["assignedHub"], "mqtt-1.test");
    }
    let password = device_password(&BASE64.decode(key(1)).unwrap(), "mqtt-1.test", "dev-1");

    // A wrong password, and a device the broker does not know, are refused.
    let (code, _) = Client::connect(broker.port, "dev-1", "not-the-password").await;
    assert_ne!(code, ConnectReturnCode::Accepted);
    let (code, _) = Client::connect(broker.port, "dev-3", &password).await;
    assert_ne!(code, ConnectReturnCode::Accepted);

    // The device connects with the password derived from its key.
    let (code, client) = Client::connect(broker.port, "dev-1", &password).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    let mut client = client.unwrap();
    assert_eq!(client.subscribe("devices/dev-1/#").await, 1, "its own topics");
    assert_eq!(client.subscribe("devices/dev-2/#").await, 0x80, "another device's topics are refused");
    assert_eq!(client.subscribe("#").await, 0x80);
    client.publish("devices/dev-1/telemetry", b"{\"t\":21}").await;
    let got = client.next_message(Duration::from_secs(5)).await.expect("its own message comes back");
    assert_eq!((got.topic.as_str(), got.payload.as_slice()), ("devices/dev-1/telemetry", b"{\"t\":21}".as_slice()));

    // dev-2 listening on its own topics does not see dev-1 publishing there.
    let password_2 = device_password(&BASE64.decode(key(1)).unwrap(), "mqtt-1.test", "dev-2");
    let (_, other) = Client::connect(broker.port, "dev-2", &password_2).await;
    let mut other = other.expect("dev-2 connects");
    assert_eq!(other.subscribe("devices/dev-2/#").await, 1);
    client.publish("devices/dev-2/commands", b"forged").await;
    assert!(
        other.next_message(Duration::from_millis(800)).await.is_none(),
        "a publish on another device's topic is dropped"
    );

    // Registering again keeps it working (the client exists: updated, not duplicated).
    let state = dps.register_to_end("dev-1", &dps.device_token("dev-1", &key(1))).await;
    assert_eq!(state["status"], "assigned");
    assert_eq!(Client::connect(broker.port, "dev-1", &password).await.0, ConnectReturnCode::Accepted);
    assert!(!dps.log().contains(ADMIN_PASSWORD), "the admin password is in the log");
}

#[tokio::test]
async fn a_tpm_device_and_a_move_between_brokers() {
    let (b1, b2) = (Broker::start().await.unwrap(), Broker::start().await.unwrap());
    let config = format!("{}{}", b1.config("mqtt-a.test", "fail"), b2.config("mqtt-b.test", "fail"));
    let dps = Dps::start(&config).await;

    // A TPM device: its password is the HMAC its TPM computes with the imported key.
    let tpm = SoftwareTpm::generate(&mut StdRng::seed_from_u64(31)).unwrap();
    let ek = BASE64.encode(tpm.endorsement_key().marshal_tpm2b().unwrap());
    let srk = BASE64.encode(tpm.storage_root_key().marshal_tpm2b().unwrap());
    dps.put_enrollment(json!({"registrationId": "tpm-1", "iotHubs": ["mqtt-a.test"],
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}))
        .await;
    let first = json!({"registrationId": "tpm-1", "tpm": {"endorsementKey": ek, "storageRootKey": srk}});
    let (status, _, challenge) = dps.register("tpm-1", None, first).await;
    assert_eq!(status, 401);
    let imported = tpm.import(&BASE64.decode(challenge["authenticationKey"].as_str().unwrap()).unwrap()).unwrap();
    let token = dps.device_token("tpm-1", &BASE64.encode(&imported));
    assert_eq!(dps.register_to_end("tpm-1", &token).await["status"], "assigned");
    let password = device_password(&imported, "mqtt-a.test", "tpm-1");
    assert_eq!(Client::connect(b1.port, "tpm-1", &password).await.0, ConnectReturnCode::Accepted);

    // Moved to the other broker: a client there, none left on the first.
    dps.put_enrollment(json!({"registrationId": "tpm-1", "iotHubs": ["mqtt-b.test"],
        "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}))
        .await;
    let state = dps.register_to_end("tpm-1", &token).await;
    assert_eq!(
        (state["status"].as_str(), state["assignedHub"].as_str()),
        (Some("assigned"), Some("mqtt-b.test")),
        "{state}"
    );
    let password_b = device_password(&imported, "mqtt-b.test", "tpm-1");
    assert_eq!(Client::connect(b2.port, "tpm-1", &password_b).await.0, ConnectReturnCode::Accepted);
    for _ in 0..100 {
        if Client::connect(b1.port, "tpm-1", &password).await.0 != ConnectReturnCode::Accepted {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the first broker still lets the device in after it moved");
}

#[tokio::test]
async fn a_broker_that_is_down_fails_the_registration_and_names_the_hub() {
    let broker = Broker::start().await.unwrap();
    let config = broker.config("mqtt-down.test", "fail");
    drop(broker);
    let dps = Dps::start(&config).await;
    let token = enroll(&dps, "nobroker", "mqtt-down.test").await;
    let state = dps.register_to_end("nobroker", &token).await;
    assert_eq!(state["status"], "failed", "{state}");
    assert_eq!(state["errorCode"], 500210);
    let message = state["errorMessage"].as_str().unwrap();
    assert!(message.contains("mqtt-down.test") && message.contains("cannot be reached"), "{message}");

    // A wrong admin password: refused at once, said so.
    let broker = Broker::start().await.unwrap();
    let dps = Dps::start(&broker.config("mqtt-down.test", "fail").replace(ADMIN_PASSWORD, "wrong-password-000")).await;
    let token = enroll(&dps, "badadmin", "mqtt-down.test").await;
    let state = dps.register_to_end("badadmin", &token).await;
    assert_eq!(state["status"], "failed", "{state}");
    assert!(state["errorMessage"].as_str().unwrap().contains("refused dps's admin client"), "{state}");
}

#[tokio::test]
async fn an_x509_device_connects_with_its_certificate_to_its_own_topics() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let device_ca = ca("mqtt device CA", None);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &device_ca.cert, &device_ca.key)
        .unwrap();
    let tls = DeviceTls { cert_pem: server_cert.pem(), key_pem: server_key.serialize_pem(), ca_pem: device_ca.pem() };
    let broker = Broker::start_with(Some(&tls)).await.unwrap();
    let tls_port = broker.tls_port.unwrap();
    let dps =
        Dps::start(&format!("[x509]\nrequire_verified_ca = false\n{}", broker.config("mqtt-x.test", "fail"))).await;

    // Before it registers, the broker knows the certificate's CA but not the device: it may
    // connect (its certificate is valid) but use no topic at all.
    let leaf = device("x509-dev", Some(&device_ca), (-1, 30));
    let (code, early) = Client::connect_with_certificate(tls_port, &device_ca, &leaf).await;
    if code == ConnectReturnCode::Accepted {
        assert_eq!(early.unwrap().subscribe("devices/x509-dev/#").await, 0x80, "no role before registration");
    }

    // Registered through an X.509 group on the same CA: a client without password, with its role.
    dps.put_group(json!({"enrollmentGroupId": "mqtt-x509", "iotHubs": ["mqtt-x.test"],
        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": device_ca.pem()}}}}}))
    .await;
    let client = dps.client_with_certificate(&format!("{}{}", leaf.pem(), device_ca.pem()), &leaf.key.serialize_pem());
    let (status, body) = dps.register_as(&client, "x509-dev", json!({"registrationId": "x509-dev"})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("assigned")), "{body}");

    let (code, mqtt) = Client::connect_with_certificate(tls_port, &device_ca, &leaf).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    let mut mqtt = mqtt.unwrap();
    assert_eq!(mqtt.subscribe("devices/x509-dev/#").await, 1, "its own topics");
    assert_eq!(mqtt.subscribe("devices/other/#").await, 0x80, "another device's topics");
    mqtt.publish("devices/x509-dev/telemetry", b"x509").await;
    let got = mqtt.next_message(Duration::from_secs(5)).await.expect("its own message comes back");
    assert_eq!(got.payload, b"x509");
    // It has no password: the plain listener does not let it in by name.
    assert_ne!(Client::connect(broker.port, "x509-dev", "").await.0, ConnectReturnCode::Accepted);
}

#[tokio::test]
async fn a_broker_client_dps_did_not_create_is_not_taken_over() {
    let broker = Broker::start().await.unwrap();
    // The operator's own client, named like a device.
    let status = std::process::Command::new("mosquitto_ctrl")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", dps_bench::mosquitto::ADMIN, "-P"])
        .arg(ADMIN_PASSWORD)
        .args(["dynsec", "createClient", "gateway-7", "-p", "operator-password"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let dps = Dps::start(&broker.config("mqtt-own.test", "fail")).await;
    let token = enroll(&dps, "gateway-7", "mqtt-own.test").await;
    let state = dps.register_to_end("gateway-7", &token).await;
    assert_eq!(state["status"], "failed", "{state}");
    assert!(state["errorMessage"].as_str().unwrap().contains("dps does not take it over"), "{state}");
    // Its password is still the operator's.
    assert_eq!(Client::connect(broker.port, "gateway-7", "operator-password").await.0, ConnectReturnCode::Accepted);
    // A device named like dps's admin is refused, not merged into it.
    let token = enroll(&dps, dps_bench::mosquitto::ADMIN, "mqtt-own.test").await;
    let state = dps.register_to_end(dps_bench::mosquitto::ADMIN, &token).await;
    assert_eq!(state["status"], "failed", "{state}");
    assert_eq!(
        Client::connect(broker.port, dps_bench::mosquitto::ADMIN, ADMIN_PASSWORD).await.0,
        ConnectReturnCode::Accepted
    );
}
