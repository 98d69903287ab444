//! The dps-device library against a spawned dps: HTTPS and MQTT, individual key, group key
//! and X.509, a payload through a custom allocation webhook that returns one, and the typed
//! errors.

mod common;

use std::time::Duration;

use common::pki::{ca, device};
use common::webhook;
use common::{key, Dps};
use dps_device::{ClientConfig, DeviceClient, DeviceCredential, DeviceError, Transport};
use serde_json::json;

fn config(dps: &Dps, id: &str, credential: DeviceCredential, transport: Transport) -> ClientConfig {
    let ca = std::fs::read_to_string(dps.creds["caCertificatePath"].as_str().unwrap()).unwrap();
    ClientConfig {
        https_port: dps.addr.port(),
        mqtt_port: dps.creds["mqttPort"].as_u64().unwrap() as u16,
        transport,
        trusted_ca_pem: Some(ca),
        timeout: Duration::from_secs(20),
        ..ClientConfig::new("localhost", &dps.scope(), id, credential)
    }
}

#[tokio::test]
async fn every_attestation_over_both_transports() {
    let hook = webhook::start().await;
    let dps = Dps::start("[x509]\nrequire_verified_ca = false\n[[hubs]]\nhost_name = \"hub-a.test\"\n[[hubs]]\nhost_name = \"hub-b.test\"\n")
    .await;
    let group_key = key(61);
    dps.put_group(json!({"enrollmentGroupId": "lib-group", "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": hook.url("/ok"), "apiVersion": "2021-10-01"},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}}))
        .await;
    let root = ca("Lib Root", None);
    dps.put_group(json!({"enrollmentGroupId": "lib-x509", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": root.pem()}}}}}))
        .await;
    let own_key = key(62);
    dps.put_enrollment(json!({"registrationId": "lib-ind", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": own_key, "secondaryKey": own_key}}}))
        .await;

    for transport in [Transport::Https, Transport::Mqtt] {
        // Group key, with a payload that the webhook echoes back.
        let id = format!("lib-member-{transport:?}").to_lowercase();
        let mut cfg = config(&dps, &id, DeviceCredential::GroupKey(group_key.clone()), transport);
        cfg.payload = Some(json!({"modelId": "m-1"}));
        let r = DeviceClient::new(cfg).unwrap().register().await.unwrap();
        assert_eq!(r.state.assigned_hub.as_deref(), Some("hub-b.test"), "{transport:?}");
        assert_eq!(r.state.device_id.as_deref(), Some(id.as_str()));
        assert_eq!(r.state.payload, Some(json!({"echo": {"modelId": "m-1"}, "hub": "hub-b.test"})), "{transport:?}");

        // Individual key.
        let r = DeviceClient::new(config(&dps, "lib-ind", DeviceCredential::SymmetricKey(own_key.clone()), transport))
            .unwrap()
            .register()
            .await
            .unwrap();
        assert!(r.state.assigned_hub.is_some(), "{transport:?}");

        // X.509 chain and key.
        let id = format!("lib-cert-{transport:?}").to_lowercase();
        let leaf = device(&id, Some(&root), (-1, 30));
        let cred = DeviceCredential::X509 { chain_pem: leaf.pem(), key_pem: leaf.key.serialize_pem() };
        let r = DeviceClient::new(config(&dps, &id, cred, transport)).unwrap().register().await.unwrap();
        assert_eq!(r.state.x509, Some(json!({"enrollmentGroupId": "lib-x509"})), "{transport:?}");

        // Typed errors.
        let wrong =
            DeviceClient::new(config(&dps, "lib-ind", DeviceCredential::SymmetricKey(key(1)), transport)).unwrap();
        assert!(matches!(wrong.register().await, Err(DeviceError::Unauthorized(_))), "{transport:?}");
    }
}

#[tokio::test]
async fn failures_disabled_polling_and_timeouts() {
    let hook = webhook::start().await;
    let dps = Dps::start("[device]\nassigning_first = true\nretry_after_secs = 1\n[allocation]\nwebhook_timeout_secs = 5\nwebhook_inline_wait_ms = 200\n")
    .await;
    let k = key(70);
    let enroll = |id: &str, extra: serde_json::Value| {
        let mut body = json!({"registrationId": id, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    dps.put_enrollment(enroll("lib-off", json!({"provisioningStatus": "disabled"}))).await;
    dps.put_enrollment(enroll(
        "lib-bad-hook",
        json!({"allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": hook.url("/status-400"), "apiVersion": "2021-10-01"}}),
    ))
    .await;
    dps.put_enrollment(enroll("lib-poll", json!({}))).await;
    dps.put_enrollment(enroll(
        "lib-slow",
        json!({"allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": hook.url("/never"), "apiVersion": "2021-10-01"}}),
    ))
    .await;
    for transport in [Transport::Https, Transport::Mqtt] {
        let client = |id: &str| {
            DeviceClient::new(config(&dps, id, DeviceCredential::SymmetricKey(k.clone()), transport)).unwrap()
        };
        // Assigning first: the client polls after retry-after and gets the result.
        let r = client("lib-poll").register().await.unwrap();
        assert!(r.state.assigned_hub.is_some(), "{transport:?}");
        assert!(matches!(client("lib-off").register().await, Err(DeviceError::Disabled)), "{transport:?}");
        match client("lib-bad-hook").register().await {
            Err(DeviceError::Failed { code: 400209, message }) => assert!(message.contains("HTTP 400"), "{message}"),
            other => panic!("{transport:?}: {other:?}"),
        }
        // A webhook that never answers: the overall timeout ends it.
        let mut cfg = config(&dps, "lib-slow", DeviceCredential::SymmetricKey(k.clone()), transport);
        cfg.timeout = Duration::from_millis(1500);
        let started = std::time::Instant::now();
        assert!(
            matches!(DeviceClient::new(cfg).unwrap().register().await, Err(DeviceError::Timeout(_))),
            "{transport:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    // Nothing listens: transport error after the attempts, not a hang.
    let mut cfg = config(&dps, "lib-poll", DeviceCredential::SymmetricKey(k.clone()), Transport::Mqtt);
    cfg.mqtt_port = 1;
    cfg.max_attempts = 2;
    assert!(matches!(DeviceClient::new(cfg).unwrap().register().await, Err(DeviceError::Transport(_))));
}

/// A device that starts while the service is down retries (refused connections are
/// transient) and registers once the service is back; with too few attempts it gives up with
/// a transport error instead.
#[tokio::test]
async fn retries_until_the_service_is_back() {
    let mut dps = Dps::start("").await;
    let k = key(64);
    for id in ["retry-https", "retry-mqtt", "retry-gives-up"] {
        dps.put_enrollment(json!({"registrationId": id, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
            .await;
    }
    dps.pin_ports();
    dps.kill9();

    // Down for good as far as this device is concerned: two attempts, then a transport error.
    let mut cfg = config(&dps, "retry-gives-up", DeviceCredential::SymmetricKey(k.clone()), Transport::Https);
    cfg.max_attempts = 2;
    let err = DeviceClient::new(cfg).unwrap().register().await.unwrap_err();
    assert!(matches!(err, DeviceError::Transport(_)), "{err:?}");

    let devices: Vec<_> = [("retry-https", Transport::Https), ("retry-mqtt", Transport::Mqtt)]
        .into_iter()
        .map(|(id, transport)| {
            let mut cfg = config(&dps, id, DeviceCredential::SymmetricKey(k.clone()), transport);
            cfg.max_attempts = 10;
            tokio::spawn(async move { DeviceClient::new(cfg).unwrap().register().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(devices.iter().all(|d| !d.is_finished()), "still retrying while the service is down");
    dps.restart().await;
    for (device, id) in devices.into_iter().zip(["retry-https", "retry-mqtt"]) {
        let r = device.await.unwrap().unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(r.state.device_id.as_deref(), Some(id));
        assert_eq!(r.state.assigned_hub.as_deref(), Some("hub.localhost"));
    }
}
