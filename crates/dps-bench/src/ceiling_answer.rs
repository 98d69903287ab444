//! What every ceiling responder (HTTPS, MQTT, AMQP) answers with: the fixed operation of an
//! assigned device, the TLS stream it serves, and the one piece of real work a TPM challenge
//! cannot do without (the authentication key encrypted to the device's keys).

/// The fixed answer: what dps sends for an assigned device, give or take the IDs.
pub const FIXED_OPERATION: &str = r#"{"operationId":"4.0000000000000000.00000000-0000-0000-0000-000000000000","status":"assigned","registrationState":{"registrationId":"ceiling","createdDateTimeUtc":"2026-01-01T00:00:00.0000000Z","assignedHub":"hub-1.bench.localhost","deviceId":"ceiling","status":"assigned","substatus":"initialAssignment","lastUpdatedDateTimeUtc":"2026-01-01T00:00:00.0000000Z","etag":"IjAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMCI="}}"#;

/// A ceiling connection after its TLS handshake.
pub(crate) type Stream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// The authentication-key blob of a TPM challenge for the device keys `ek` and `srk` (base64
/// of their marshalled TPM2B_PUBLIC): the fixed HMAC key `[0x42; 32]`, encrypted to them as
/// dps does (an RSA encryption each and the blob's AES and HMAC). `None` when a key is not a
/// valid TPM key.
pub(crate) fn authentication_key(ek: &str, srk: &str) -> Option<Vec<u8>> {
    use dps_core::tpm::{build_authentication_key, parse_device_key, DeviceKey};
    let ek = parse_device_key("ek", ek, DeviceKey::Endorsement).ok()?;
    let srk = parse_device_key("srk", srk, DeviceKey::StorageRoot).ok()?;
    build_authentication_key(&ek, &srk, &[0x42; 32], &mut rand::rngs::OsRng).ok()
}
