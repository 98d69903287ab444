//! The SASL layer of an AMQP connection (docs/protocol-notes.md §5.1, §5.2): the mechanisms
//! devices use, `PLAIN` (symmetric keys: the authentication ID names the registration, the
//! password is the SAS token) and `TPM` (the endorsement and storage root keys in, the TPM
//! challenge out in exactly two segments, the SAS signed with the key it delivers back), each
//! ending in one `sasl-outcome`. What a device proves here is checked by the engine's
//! authentication stage, the same as over HTTPS and MQTT; the TPM challenge is the engine's
//! challenge stage, so its state survives a restart like the HTTPS 401's.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use dps_core::registration::{AuthenticatedDevice, Authentication, Challenge, Credential, TpmEndorsement};
use dps_proto::amqp_frame::{Frame, Sasl, SASL_AUTH, SASL_OK, SASL_SYS_TEMP};
use dps_proto::amqp_io::FrameStream;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::amqp_address;
use crate::amqp_context::{AmqpContext, End};

/// The mechanisms offered, in the server's order of preference.
pub const MECHANISMS: [&str; 2] = ["PLAIN", "TPM"];

/// The most bytes a SASL frame of ours may have (AMQP's MIN-MAX-FRAME-SIZE: the peer has
/// announced nothing yet).
const SASL_FRAME_LIMIT: usize = 512;

/// Control bytes of the `TPM` mechanism's challenges (protocol-notes §5.2): segment present,
/// and final segment with sequence number 1. The SDKs accept exactly these two.
const TPM_FIRST_SEGMENT: u8 = 0x80;
const TPM_FINAL_SEGMENT: u8 = 0xC1;

/// Runs the SASL exchange after the SASL protocol header: offers the mechanisms, checks what
/// the client proves and answers with an outcome. `Ok` is the authenticated device (outcome
/// `ok` sent); a refusal sends outcome `auth` (or `sys-temp` when trying again can help) and
/// ends the connection.
pub(crate) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FrameStream<S>,
    ctx: &AmqpContext,
    peer: SocketAddr,
) -> Result<AuthenticatedDevice, End> {
    let write_timeout = Duration::from_secs(ctx.config.write_timeout_secs);
    let mechanisms = Sasl::Mechanisms(MECHANISMS.iter().map(|m| m.to_string()).collect());
    send(stream, mechanisms, write_timeout).await?;
    let Sasl::Init { mechanism, initial_response, .. } = read(stream).await? else {
        return Err(End::Violation("the first SASL frame must be sasl-init".into()));
    };
    let initial = initial_response.unwrap_or_default();
    let result = match mechanism.as_str() {
        "PLAIN" => plain(ctx, peer, &initial).await,
        "TPM" => tpm(stream, ctx, peer, &initial, write_timeout).await,
        other => {
            let shown: String = other.chars().take(40).collect();
            send(stream, Sasl::Outcome { code: SASL_AUTH, additional_data: None }, write_timeout).await?;
            return Err(End::Refused(format!(
                "SASL mechanism '{shown}' is not offered; DPS devices use PLAIN (symmetric keys), TPM, or no SASL (X.509)"
            )));
        }
    };
    match result {
        Ok(device) => {
            send(stream, Sasl::Outcome { code: SASL_OK, additional_data: None }, write_timeout).await?;
            Ok(device)
        }
        Err(Refusal { code, why }) => {
            send(stream, Sasl::Outcome { code, additional_data: None }, write_timeout).await?;
            Err(End::Refused(why))
        }
        Err(Violation(why)) => Err(End::Violation(why)),
        Err(Io(end)) => Err(end),
    }
}

/// Why a mechanism did not authenticate the device.
enum Failure {
    /// The outcome to send, and why (for the log).
    Refusal { code: u8, why: String },
    /// The client broke the mechanism's rules: the connection closes without an outcome.
    Violation(String),
    /// Reading or writing failed.
    Io(End),
}
use Failure::{Io, Refusal, Violation};

impl From<End> for Failure {
    fn from(end: End) -> Failure {
        match end {
            End::Violation(why) => Violation(why),
            other => Io(other),
        }
    }
}

/// The outcome for an engine error: `auth` when the credential is wrong or names nothing,
/// `sys-temp` when the server could not decide now (throttled, store unavailable).
fn refusal(err: dps_core::Error) -> Failure {
    let code = match err {
        dps_core::Error::Unavailable(_) | dps_core::Error::Internal(_) | dps_core::Error::Throttled { .. } => {
            SASL_SYS_TEMP
        }
        _ => SASL_AUTH,
    };
    Refusal { code, why: err.to_string() }
}

/// `PLAIN` (RFC 4616): `[authzid] NUL authcid NUL passwd`; the authentication ID names the
/// registration, the password is its SAS token.
async fn plain(ctx: &AmqpContext, peer: SocketAddr, response: &[u8]) -> Result<AuthenticatedDevice, Failure> {
    let mut parts = response.splitn(3, |b| *b == 0);
    let (Some(_authzid), Some(authcid), Some(passwd)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Refusal {
            code: SASL_AUTH,
            why: "SASL PLAIN response is not [authzid] NUL authcid NUL password".into(),
        });
    };
    let text = |b: &[u8], what: &str| {
        String::from_utf8(b.to_vec())
            .map_err(|_| Refusal { code: SASL_AUTH, why: format!("SASL PLAIN {what} is not UTF-8") })
    };
    let authcid = text(authcid, "authentication ID")?;
    let address = amqp_address::parse(&authcid)
        .map_err(|e| Refusal { code: SASL_AUTH, why: format!("SASL PLAIN authentication ID: {e}") })?;
    let token = text(passwd, "password")?;
    let device = check(ctx, peer, &address.id_scope, &address.registration_id, &Credential::Sas(token)).await?;
    match device {
        Authentication::Authenticated(device) => Ok(device),
        Authentication::Challenge(_) => {
            Err(Refusal { code: SASL_AUTH, why: "a SAS token cannot be challenged".into() })
        }
    }
}

/// Checks a credential through the engine's authentication stage, with the per-address
/// failed-authentication allowance.
async fn check(
    ctx: &AmqpContext,
    peer: SocketAddr,
    id_scope: &str,
    registration_id: &str,
    credential: &Credential,
) -> Result<Authentication, Failure> {
    ctx.auth_failures.check(peer.ip()).map_err(|r| Refusal { code: SASL_SYS_TEMP, why: r.message })?;
    let result = Box::pin(ctx.engine.devices().authenticate_device(id_scope, registration_id, credential)).await;
    ctx.auth_failures.observe(peer.ip(), crate::metrics::Transport::Amqp, result).map_err(refusal)
}

/// `TPM` (protocol-notes §5.2): initial response `NUL idScope NUL registrationId NUL EK`;
/// challenge `0x00`; response `0x00 SRK`; the challenge blob in two segments (`0x80 part`,
/// answered `0x00`, then `0xC1 part`); last response `0x00 SAS`, signed with the key the blob
/// delivered.
async fn tpm<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FrameStream<S>,
    ctx: &AmqpContext,
    peer: SocketAddr,
    initial: &[u8],
    write_timeout: Duration,
) -> Result<AuthenticatedDevice, Failure> {
    let (id_scope, registration_id, endorsement_key) = parse_tpm_init(initial).map_err(Violation)?;
    send(stream, Sasl::Challenge(vec![0x00]), write_timeout).await?;
    let storage_root_key = response(stream, "the storage root key").await?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let credential = Credential::TpmEndorsement(TpmEndorsement {
        endorsement_key: b64(&endorsement_key),
        storage_root_key: Some(b64(&storage_root_key)),
    });
    let challenge = match check(ctx, peer, &id_scope, &registration_id, &credential).await? {
        Authentication::Challenge(c) => c,
        Authentication::Authenticated(_) => {
            return Err(Refusal { code: SASL_AUTH, why: "a TPM's endorsement key alone proves nothing".into() })
        }
    };
    let (first, last) = segments(&challenge).map_err(|why| Refusal { code: SASL_SYS_TEMP, why })?;
    send(stream, Sasl::Challenge(first), write_timeout).await?;
    let ack = response(stream, "the acknowledgement of the first segment").await?;
    if !ack.is_empty() {
        return Err(Violation(format!(
            "SASL TPM: the first segment must be acknowledged with the single byte 0x00, not {} bytes",
            ack.len() + 1
        )));
    }
    send(stream, Sasl::Challenge(last), write_timeout).await?;
    let sas = response(stream, "the SAS token").await?;
    let token = String::from_utf8(sas)
        .map_err(|_| Refusal { code: SASL_AUTH, why: "SASL TPM: the SAS token is not UTF-8".into() })?;
    match check(ctx, peer, &id_scope, &registration_id, &Credential::Sas(token)).await? {
        Authentication::Authenticated(device) => Ok(device),
        Authentication::Challenge(_) => {
            Err(Refusal { code: SASL_AUTH, why: "a SAS token cannot be challenged".into() })
        }
    }
}

/// Splits `NUL idScope NUL registrationId NUL EK`.
fn parse_tpm_init(initial: &[u8]) -> Result<(String, String, Vec<u8>), String> {
    let bad = || "SASL TPM initial response is not NUL idScope NUL registrationId NUL endorsementKey".to_string();
    let rest = initial.strip_prefix(&[0u8]).ok_or_else(bad)?;
    let mut parts = rest.splitn(3, |b| *b == 0);
    let (Some(scope), Some(id), Some(ek)) = (parts.next(), parts.next(), parts.next()) else { return Err(bad()) };
    if scope.is_empty() || id.is_empty() || ek.is_empty() {
        return Err(bad());
    }
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad());
    Ok((text(scope)?, text(id)?, ek.to_vec()))
}

/// The challenge blob in the mechanism's two segments, each with its control byte, each
/// fitting a 512-byte SASL frame.
fn segments(challenge: &Challenge) -> Result<(Vec<u8>, Vec<u8>), String> {
    let blob = &challenge.blob;
    let half = blob.len().div_ceil(2);
    let (a, b) = blob.split_at(half);
    // Frame header (8), descriptor and list headers and the binary's header leave this much.
    let room = SASL_FRAME_LIMIT - 32;
    if a.len() + 1 > room {
        return Err(format!("the TPM challenge ({} bytes) does not fit two SASL frames", blob.len()));
    }
    let with = |control: u8, part: &[u8]| {
        let mut v = Vec::with_capacity(part.len() + 1);
        v.push(control);
        v.extend_from_slice(part);
        v
    };
    Ok((with(TPM_FIRST_SEGMENT, a), with(TPM_FINAL_SEGMENT, b)))
}

/// Reads a `sasl-response` of the TPM mechanism and strips its control byte (`0x00`).
async fn response<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FrameStream<S>,
    what: &str,
) -> Result<Vec<u8>, Failure> {
    let Sasl::Response(bytes) = read(stream).await? else {
        return Err(Violation(format!("SASL TPM: expected a sasl-response with {what}")));
    };
    match bytes.split_first() {
        Some((0, rest)) => Ok(rest.to_vec()),
        Some((b, _)) => {
            Err(Violation(format!("SASL TPM: the response with {what} must start with 0x00, not {b:#04x}")))
        }
        None => Err(Violation(format!("SASL TPM: the response with {what} is empty"))),
    }
}

async fn read<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut FrameStream<S>) -> Result<Sasl, End> {
    match stream.read().await.map_err(End::from)? {
        Some(Frame::Sasl(sasl)) => Ok(sasl),
        Some(_) => Err(End::Violation("an AMQP frame during SASL".into())),
        None => Err(End::Closed),
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FrameStream<S>,
    sasl: Sasl,
    deadline: Duration,
) -> Result<(), End> {
    crate::amqp_context::write_frames(stream, &[Frame::Sasl(sasl)], deadline).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tpm_initial_response_is_split_at_the_first_three_nuls_only() {
        let mut init = b"\x000ne00000A0A\x00dev-1\x00".to_vec();
        init.extend_from_slice(&[1, 0, 0, 2]);
        let (scope, id, ek) = parse_tpm_init(&init).unwrap();
        assert_eq!((scope.as_str(), id.as_str(), ek.as_slice()), ("0ne00000A0A", "dev-1", &[1u8, 0, 0, 2][..]));
        for bad in [&b""[..], b"\x00", b"x\x00y\x00z", b"\x00scope\x00id", b"\x00\x00id\x00ek", b"\x00scope\x00id\x00"]
        {
            assert!(parse_tpm_init(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_typical_challenge_goes_in_two_segments_that_fit_sasl_frames() {
        let challenge = Challenge {
            registration_id: "d".into(),
            blob: (0..770u32).map(|i| i as u8).collect(),
            key_name: "registration".into(),
        };
        let (a, b) = segments(&challenge).unwrap();
        assert_eq!((a[0], b[0]), (0x80, 0xC1));
        assert_eq!([&a[1..], &b[1..]].concat(), challenge.blob);
        for seg in [a, b] {
            let mut out = Vec::new();
            Frame::Sasl(Sasl::Challenge(seg)).encode(&mut out);
            assert!(out.len() <= SASL_FRAME_LIMIT, "{} bytes", out.len());
        }
        let huge = Challenge { blob: vec![0; 1000], ..challenge };
        assert!(segments(&huge).is_err());
    }
}
