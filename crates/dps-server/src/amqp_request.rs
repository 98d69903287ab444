//! One AMQP request message and its answer (docs/protocol-notes.md §5.4, §5.5): the
//! application property `iotdps-operation-type` says what is asked (`iotdps-register`, with the
//! registration JSON in a data section, possibly empty, and `iotdps-forceRegistration`;
//! `iotdps-get-operationstatus` with `iotdps-operation-id`). The answer is a reply message
//! (data section with the operation status JSON, the request's `correlation-id`, the retry
//! interval under both `retry-after` and `Retry-After`), or, for an error, a `rejected` outcome
//! whose `error.description` is the DPS error JSON (with `retry-after` and `Retry-After` in
//! `error.info` when trying again can help). `failed` and `disabled` registrations are answers, not errors.

use dps_core::registration::AuthenticatedDevice;
use dps_proto::amqp::Value;
use dps_proto::amqp_frame::AmqpError;
use dps_proto::amqp_message::{decode_message, Body, Message, Properties};
use dps_proto::error::ErrorCode;

use crate::amqp_context::AmqpContext;
use crate::metrics::Transport;
use crate::reply::{ErrorReply, Refusal, RequestError};
use tracing::Instrument;

/// The application property naming the operation.
pub const OPERATION_TYPE: &str = "iotdps-operation-type";
/// Its value for a registration.
pub const REGISTER: &str = "iotdps-register";
/// Its value for an operation-status query.
pub const GET_OPERATION_STATUS: &str = "iotdps-get-operationstatus";
/// The operation a status query asks about.
pub const OPERATION_ID: &str = "iotdps-operation-id";
/// Reprovision even when nothing changed.
pub const FORCE_REGISTRATION: &str = "iotdps-forceRegistration";

/// How a request is settled.
#[derive(Debug)]
pub(crate) enum Answer {
    /// `accepted`, with this reply.
    Reply(Message),
    /// `rejected` with this error; the message carries the same error for a request that was
    /// sent settled (and so cannot be rejected).
    Rejected(AmqpError, Message),
}

/// Answers one request message (its bytes as received) of `device`.
pub(crate) async fn answer(ctx: &AmqpContext, device: &mut AuthenticatedDevice, bytes: &[u8]) -> Answer {
    let request_id = uuid::Uuid::new_v4().to_string();
    let message = match decode_message(bytes) {
        Ok(m) => m,
        Err(e) => {
            let refusal =
                Refusal::new(ErrorCode::INVALID_REQUEST_BODY, format!("the request is not an AMQP message: {e}"));
            return rejected(&RequestError::Refused(refusal), &request_id, None, "amqp:decode-error");
        }
    };
    let correlation = message.properties.correlation_id.clone().or_else(|| message.properties.message_id.clone());
    // Lines logged while the engine works carry the request's ID (the error body's trackingId).
    let span = tracing::info_span!("request", request_id = %request_id);
    let outcome = handle(ctx, device, &message).instrument(span.clone()).await;
    let _entered = span.enter();
    match outcome {
        Ok(reply) => {
            let body = match serde_json::to_vec(&reply.operation) {
                Ok(b) => b,
                Err(e) => {
                    let err = dps_core::Error::Internal(format!("cannot serialise the operation status: {e}"));
                    return rejected(&RequestError::Engine(err), &request_id, correlation, "amqp:internal-error");
                }
            };
            Answer::Reply(reply_message(correlation, reply.retry_after, body))
        }
        Err(err) => {
            tracing::debug!(registration_id = device.registration_id(), error = %err, "AMQP request failed");
            let condition = condition(&err);
            rejected(&err, &request_id, correlation, condition)
        }
    }
}

async fn handle(
    ctx: &AmqpContext,
    device: &mut AuthenticatedDevice,
    message: &Message,
) -> Result<dps_core::registration::DeviceReply, RequestError> {
    let bad = |m: String| RequestError::Refused(Refusal::new(ErrorCode::INVALID_ARGUMENT, m));
    let operation = message.application_property(OPERATION_TYPE).and_then(Value::as_str).ok_or_else(|| {
        bad(format!("the application property {OPERATION_TYPE} is missing; send {REGISTER} or {GET_OPERATION_STATUS}"))
    })?;
    let devices = ctx.engine.devices();
    match operation {
        REGISTER => {
            let body: &[u8] = match &message.body {
                Body::Empty => &[],
                Body::Data(bytes) => bytes,
                Body::Value(Value::Binary(bytes)) => bytes,
                Body::Value(Value::String(text)) => text.as_bytes(),
                _ => return Err(bad("the registration must be JSON in a data section".into())),
            };
            let force = match message.application_property(FORCE_REGISTRATION) {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
                Some(_) => return Err(bad(format!("{FORCE_REGISTRATION} must be a boolean"))),
            };
            // Boxed: the engine's futures are large, and inline they would make every held
            // connection's task that large while it idles.
            let attestation = crate::metrics::attestation_label(device.enrollment().attestation_type());
            let started = std::time::Instant::now();
            let result = Box::pin(devices.register_device_forced(device, body, force)).await;
            crate::metrics::registration(Transport::Amqp, attestation, result.as_ref(), started);
            Ok(result?)
        }
        GET_OPERATION_STATUS => {
            let operation_id = message
                .application_property(OPERATION_ID)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("the application property {OPERATION_ID} is missing")))?;
            let result = Box::pin(devices.operation_status_of(device, operation_id)).await;
            crate::metrics::poll(Transport::Amqp, result.as_ref());
            Ok(result?)
        }
        other => Err(bad(format!(
            "{OPERATION_TYPE} '{}' is not known; send {REGISTER} or {GET_OPERATION_STATUS}",
            other.chars().take(64).collect::<String>()
        ))),
    }
}

/// The reply to a request: its correlation ID, the retry interval, the JSON body.
fn reply_message(correlation: Option<Value>, retry_after: Option<u32>, body: Vec<u8>) -> Message {
    let mut application_properties = Vec::new();
    if let Some(secs) = retry_after {
        // Both spellings (C, Node and Java read `retry-after`, C# `Retry-After`), as strings,
        // which all four parse.
        application_properties.push(("retry-after".to_string(), Value::String(secs.to_string())));
        application_properties.push(("Retry-After".to_string(), Value::String(secs.to_string())));
    }
    Message {
        properties: Properties { correlation_id: correlation, ..Properties::default() },
        application_properties,
        body: Body::Data(body),
        ..Message::default()
    }
}

/// The AMQP error condition for a DPS error, chosen so that the SDKs map it to the right
/// error type (Node: `amqp_common_errors`; C# reads the status from the JSON).
fn condition(err: &RequestError) -> &'static str {
    let code = match err {
        RequestError::Engine(e) => e.code(),
        RequestError::Refused(r) => r.code,
    };
    match code.http_status() {
        400 => "com.microsoft:argument-error",
        401 => "amqp:unauthorized-access",
        404 => "amqp:not-found",
        412 => "com.microsoft:precondition-failed",
        429 => "com.microsoft:device-container-throttled",
        _ => "amqp:internal-error",
    }
}

fn rejected(err: &RequestError, request_id: &str, correlation: Option<Value>, condition: &'static str) -> Answer {
    let reply = ErrorReply::for_request(err, request_id);
    let json =
        serde_json::to_string(&reply.body).unwrap_or_else(|_| format!("{{\"errorCode\":{}}}", reply.body.error_code.0));
    let mut info = Vec::new();
    if let Some(secs) = reply.retry_after {
        // Node reads `retry-after`, C# `Retry-After`.
        let secs = Value::Int(i32::try_from(secs).unwrap_or(i32::MAX));
        info.push((Value::Symbol("retry-after".into()), secs.clone()));
        info.push((Value::Symbol("Retry-After".into()), secs));
    }
    let error = AmqpError { condition: condition.into(), description: Some(json.clone()), info };
    Answer::Rejected(error, reply_message(correlation, reply.retry_after, json.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_the_status() {
        let engine = |e: dps_core::Error| condition(&RequestError::Engine(e));
        assert_eq!(engine(dps_core::Error::Unauthorized("x".into())), "amqp:unauthorized-access");
        assert_eq!(
            engine(dps_core::Error::Throttled { retry_after: 3, message: "x".into() }),
            "com.microsoft:device-container-throttled"
        );
        assert_eq!(engine(dps_core::Error::Unavailable("x".into())), "amqp:internal-error");
        assert_eq!(engine(dps_core::Error::not_found(ErrorCode::OPERATION_NOT_FOUND, "x")), "amqp:not-found");
        assert_eq!(
            condition(&RequestError::Refused(Refusal::new(ErrorCode::INVALID_ARGUMENT, "x"))),
            "com.microsoft:argument-error"
        );
    }

    #[test]
    fn a_rejection_carries_the_dps_error_and_retry_after() {
        let err = RequestError::Engine(dps_core::Error::Throttled { retry_after: 7, message: "slow down".into() });
        let Answer::Rejected(error, message) =
            rejected(&err, "req-1", Some(Value::String("c-1".into())), condition(&err))
        else {
            panic!("not rejected")
        };
        let json: serde_json::Value = serde_json::from_str(error.description.as_deref().unwrap()).unwrap();
        assert_eq!(json["errorCode"], 429001);
        assert_eq!(json["trackingId"], "req-1");
        assert_eq!(
            error.info,
            vec![
                (Value::Symbol("retry-after".into()), Value::Int(7)),
                (Value::Symbol("Retry-After".into()), Value::Int(7))
            ]
        );
        assert_eq!(message.properties.correlation_id, Some(Value::String("c-1".into())));
        assert_eq!(message.application_property("retry-after"), Some(&Value::String("7".into())));
        assert_eq!(message.application_property("Retry-After"), Some(&Value::String("7".into())));
    }
}
