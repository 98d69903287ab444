//! Custom allocation: the webhook port, the request the engine builds and the checks on the
//! answer (docs/protocol-notes.md §8). Every failure ends the registration `failed`. The device is told
//! the class of the cause (timeout, HTTP status N, unreachable, refused address, invalid
//! answer, unlinked hub); the webhook's own words (its body, the connection error, the start of
//! an unusable answer) go to the operator's log under the operation ID, and to the device only
//! when `allocation.expose_webhook_errors` is on (development instances).

use async_trait::async_trait;
use dps_proto::error::ErrorCode;
use dps_proto::webhook::{AllocationRequest, AllocationResponse};
use serde_json::Value;

/// Why a call to the hook brought no answer: the transport failed (the webhook could not be
/// reached, answered with an error status, too slowly, too much, or not with an allocation
/// response). Decisions of the hook are [`Declined`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// A non-2xx answer.
    #[error("the webhook answered HTTP {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The start of the body (at most 256 characters).
        body: String,
    },
    /// No complete answer within the timeout.
    #[error("the webhook did not answer within {0} s")]
    Timeout(u64),
    /// Connection refused, DNS failure, TLS failure…
    #[error("cannot reach the webhook: {0}")]
    Connect(String),
    /// The answer exceeds the size limit.
    #[error("the webhook's answer is larger than {0} bytes")]
    TooLarge(usize),
    /// The URL cannot be used.
    #[error("the webhook URL cannot be used: {0}")]
    InvalidUrl(String),
    /// Too many calls in flight.
    #[error("too many custom allocation calls in flight; try again")]
    Busy,
    /// The address policy (`allocation.webhook_allow` / `webhook_deny`) refused the address.
    #[error("the webhook's address is refused by the server's address policy: {0}")]
    Refused(String),
    /// The request could not be written as JSON.
    #[error("cannot serialise the allocation request: {0}")]
    Request(String),
    /// A 2xx answer whose body is not an allocation response.
    #[error("the webhook's answer is not a valid allocation response ({reason}); it starts with: {start}")]
    InvalidAnswer {
        /// What the JSON parser said.
        reason: String,
        /// The start of the body ([`body_start`]).
        start: String,
    },
}

impl CallError {
    /// What a device may be told: the cause class, without the webhook's body, the
    /// connection error text or the address.
    pub fn public_message(&self) -> String {
        match self {
            CallError::Status { status, .. } => format!("the webhook answered HTTP {status}"),
            CallError::Timeout(_) | CallError::TooLarge(_) | CallError::Busy => self.to_string(),
            CallError::Connect(_) => "the webhook could not be reached".into(),
            CallError::InvalidUrl(_) => "the webhook URL cannot be used".into(),
            CallError::Refused(_) => "the webhook's address is refused by the server's address policy".into(),
            CallError::Request(_) => "the allocation request could not be written".into(),
            CallError::InvalidAnswer { .. } => "the webhook's answer is not a valid allocation response".into(),
        }
    }
}

/// The hook answered, and its answer is that the device is not allocated (a built-in rule
/// set's decision). Shown to the device as it is: the rule set is the operator's own config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Declined {
    /// The device payload was refused (a rule set's JSON Schema); reported as 400003.
    #[error("{0}")]
    PayloadRejected(String),
    /// The rule set chose no hub (no case matched, an expression failed); reported as 400209.
    #[error("{0}")]
    NoDecision(String),
}

/// Why the hook gave no allocation response: the call failed, or the hook declined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The call failed (transport).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The hook decided not to allocate the device.
    #[error(transparent)]
    Declined(#[from] Declined),
}

/// The port through which the engine calls custom allocation webhooks.
#[async_trait]
pub trait AllocationHook: Send + Sync + 'static {
    /// Checks a `webhookUrl` when an enrollment is written (absolute http/https URL whose host
    /// the address policy permits, or a configured `rules://` name); the error says why not.
    fn check_url(&self, _url: &str) -> Result<(), String> {
        Ok(())
    }

    /// Sends the allocation request to `url` and returns the parsed answer; the engine then
    /// checks it against the linked hubs ([`check_answer`]).
    async fn call(&self, url: &str, request: &AllocationRequest) -> Result<AllocationResponse, HookError>;

    /// Whether `call` answers `url` in this process without waiting on I/O (a built-in rule
    /// set). The engine then allocates inside the request and writes the registration once,
    /// instead of first recording an `assigning` operation for a possibly slow webhook.
    fn answers_inline(&self, _url: &str) -> bool {
        false
    }
}

/// Parses the body of a webhook's 2xx answer.
pub fn parse_answer(body: &[u8]) -> Result<AllocationResponse, CallError> {
    serde_json::from_slice(body)
        .map_err(|e| CallError::InvalidAnswer { reason: e.to_string(), start: body_start(body) })
}

/// A successful allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Hub host name (as the linked hub spells it).
    pub hub: String,
    /// Initial twin to apply.
    pub initial_twin: Option<Value>,
    /// Payload to return to the device.
    pub payload: Option<Value>,
}

/// A failed allocation: DPS code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationFailure {
    /// 400208 (no/invalid hub) or 400209 (allocation failed).
    pub code: ErrorCode,
    /// What happened, as the device may be told.
    pub message: String,
    /// The same with the webhook's own words, for the operator (logged), when they differ.
    pub detail: Option<String>,
}

impl AllocationFailure {
    pub(crate) fn failed(message: impl Into<String>) -> Self {
        Self { code: ErrorCode::ALLOCATION_FAILED, message: message.into(), detail: None }
    }
    pub(crate) fn no_hub(message: impl Into<String>) -> Self {
        Self { code: ErrorCode::HUB_NOT_SPECIFIED, message: message.into(), detail: None }
    }
    fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The failure of a registration whose hook gave no answer. `what` names the enrollment;
    /// `in_process` (a built-in rule set) shows the whole reason to the device, a remote
    /// webhook only the cause class ([`CallError::public_message`]), the rest going to `detail`.
    pub fn from_hook(error: HookError, what: &str, in_process: bool) -> Self {
        match error {
            HookError::Declined(Declined::PayloadRejected(m)) => {
                Self { code: ErrorCode::INVALID_PAYLOAD, message: m, detail: None }
            }
            HookError::Declined(Declined::NoDecision(m)) => {
                Self::failed(format!("custom allocation failed for {what}: {m}"))
            }
            HookError::Call(e) => {
                let full = e.to_string();
                let public = if in_process { full.clone() } else { e.public_message() };
                Self {
                    code: ErrorCode::ALLOCATION_FAILED,
                    message: format!("custom allocation failed for {what}: {public}"),
                    detail: (public != full).then(|| format!("custom allocation failed for {what}: {full}")),
                }
            }
        }
    }
}

/// Checks a hook's answer against the hubs it was offered: the decision part of custom
/// allocation (a hub that is linked, an initial twin that is an object).
pub fn check_answer(
    response: AllocationResponse,
    linked_hubs: &[String],
    enrollment_twin: Option<&Value>,
) -> Result<Assignment, AllocationFailure> {
    let hub = match response.iot_hub_host_name.as_deref().map(str::trim) {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => {
            return Err(AllocationFailure::no_hub(
                "custom allocation failed: the webhook's answer has no iotHubHostName",
            ))
        }
    };
    let hub = linked_hubs.iter().find(|l| l.eq_ignore_ascii_case(&hub)).cloned().ok_or_else(|| {
        AllocationFailure::no_hub("custom allocation failed: the webhook chose an IoT hub that is not linked")
            .with_detail(format!(
                "custom allocation failed: the webhook chose IoT hub '{hub}', which is not in linkedHubs ({})",
                linked_hubs.join(", ")
            ))
    })?;
    // Any JSON value goes back to the device unchanged; `null` means none.
    let payload = response.payload.filter(|v| !v.is_null());
    let initial_twin = match response.initial_twin {
        None | Some(Value::Null) => enrollment_twin.cloned(),
        Some(v @ Value::Object(_)) => Some(v),
        Some(_) => {
            return Err(AllocationFailure::failed(
                "custom allocation failed: the webhook's initialTwin must be a JSON object (or absent)",
            ))
        }
    };
    Ok(Assignment { hub, initial_twin, payload })
}

/// The first 256 characters of a body, for messages.
pub fn body_start(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(256).collect();
    if text.chars().count() > 256 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hubs() -> Vec<String> {
        vec!["hub-a.test".into(), "hub-b.test".into()]
    }

    /// What the engine does with a webhook's 2xx body.
    fn check(body: &[u8], twin: Option<&Value>) -> Result<Assignment, AllocationFailure> {
        let answer = parse_answer(body).map_err(|e| AllocationFailure::from_hook(e.into(), "dev-1", false))?;
        check_answer(answer, &hubs(), twin)
    }

    #[test]
    fn accepts_a_good_answer() {
        let body = br#"{"iotHubHostName":"HUB-B.test","initialTwin":{"tags":{"x":1}},"payload":{"p":2}}"#;
        let a = check(body, None).unwrap();
        assert_eq!(a.hub, "hub-b.test");
        assert_eq!(a.initial_twin, Some(json!({"tags":{"x":1}})));
        assert_eq!(a.payload, Some(json!({"p":2})));
        let twin = json!({"tags":{"from":"enrollment"}});
        let a = check(br#"{"iotHubHostName":"hub-a.test"}"#, Some(&twin)).unwrap();
        assert_eq!(a.initial_twin, Some(twin), "the enrollment's twin when the webhook sends none");
        assert_eq!(a.payload, None);
    }

    #[test]
    fn refuses_bad_answers_with_reasons() {
        let cases: [(&[u8], ErrorCode, &str); 5] = [
            (b"<html>oops</html>", ErrorCode::ALLOCATION_FAILED, "<html>oops"),
            (br#"{"payload":{}}"#, ErrorCode::HUB_NOT_SPECIFIED, "no iotHubHostName"),
            (br#"{"iotHubHostName":""}"#, ErrorCode::HUB_NOT_SPECIFIED, "no iotHubHostName"),
            (br#"{"iotHubHostName":"evil.test"}"#, ErrorCode::HUB_NOT_SPECIFIED, "'evil.test'"),
            (
                br#"{"iotHubHostName":"hub-a.test","initialTwin":"x"}"#,
                ErrorCode::ALLOCATION_FAILED,
                "initialTwin must be",
            ),
        ];
        for (body, code, needle) in cases {
            let e = check(body, None).unwrap_err();
            assert_eq!(e.code, code, "{}", String::from_utf8_lossy(body));
            let detail = e.detail.clone().unwrap_or_else(|| e.message.clone());
            assert!(detail.contains(needle), "{detail}");
        }
        // The device's message names the class, not what the webhook said.
        let e = check(b"<html>internal host 10.1.2.3</html>", None).unwrap_err();
        assert!(!e.message.contains("10.1.2.3") && e.message.contains("not a valid allocation response"), "{e:?}");
        let e = check(br#"{"iotHubHostName":"evil.test"}"#, None).unwrap_err();
        assert!(!e.message.contains("hub-a.test") && e.message.contains("not linked"), "{e:?}");
    }

    #[test]
    fn call_failures_and_decisions_reach_the_device_differently() {
        let remote = AllocationFailure::from_hook(
            CallError::Status { status: 500, body: "stack trace at 10.0.0.7".into() }.into(),
            "dev-1",
            false,
        );
        assert_eq!(remote.code, ErrorCode::ALLOCATION_FAILED);
        assert!(remote.message.ends_with("the webhook answered HTTP 500"), "{remote:?}");
        assert!(remote.detail.as_deref().is_some_and(|d| d.contains("10.0.0.7")), "{remote:?}");
        // A rule set is the operator's config: the whole reason, no separate detail.
        let rules =
            AllocationFailure::from_hook(CallError::InvalidUrl("no rule set named 'x'".into()).into(), "dev-1", true);
        assert!(rules.message.contains("no rule set named 'x'") && rules.detail.is_none(), "{rules:?}");
        let declined =
            AllocationFailure::from_hook(Declined::NoDecision("no case matched".into()).into(), "dev-1", true);
        assert_eq!(declined.code, ErrorCode::ALLOCATION_FAILED);
        assert!(declined.message.ends_with("no case matched"), "{declined:?}");
        let payload =
            AllocationFailure::from_hook(Declined::PayloadRejected("/modelId: required".into()).into(), "dev-1", true);
        assert_eq!((payload.code, payload.message.as_str()), (ErrorCode::INVALID_PAYLOAD, "/modelId: required"));
    }

    #[test]
    fn any_json_payload_comes_back_unchanged() {
        for payload in [json!("{\"a\":1}"), json!([1, "two"]), json!(42), json!(false), json!({"p": null})] {
            let body = serde_json::to_vec(&json!({"iotHubHostName": "hub-a.test", "payload": payload})).unwrap();
            assert_eq!(check(&body, None).unwrap().payload, Some(payload));
        }
        let a = check(br#"{"iotHubHostName":"hub-a.test","payload":null}"#, None).unwrap();
        assert_eq!(a.payload, None, "null is no payload");
    }

    #[test]
    fn body_start_is_bounded() {
        assert_eq!(body_start(b"short"), "short");
        let long = "é".repeat(1000);
        let s = body_start(long.as_bytes());
        assert_eq!(s.chars().count(), 257);
    }
}
