//! Identifiers and paths as the transports receive them: registration IDs, group IDs, ID scopes,
//! operation IDs and API versions, the MQTT user name and topics, and the HTTP router after its
//! percent-decoding. Every input gets an answer; nothing panics.
#![no_main]

use dps_proto::{ids, mqtt_topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = ids::validate_registration_id(text);
    let _ = ids::validate_enrollment_group_id(text);
    let _ = ids::validate_id_scope(text);
    let _ = ids::validate_operation_id(text);
    let _ = ids::is_valid_api_version(text);
    let _ = ids::id_key(text);
    let _ = mqtt_topic::parse_username(text);
    if let Ok(request) = mqtt_topic::parse_request_topic(text) {
        let rid = match request {
            mqtt_topic::DeviceRequest::Register { rid } | mqtt_topic::DeviceRequest::Poll { rid, .. } => rid,
        };
        // The response topic for any rid is one the clients' parsers accept: `$rid` first, no
        // other `$`.
        let topic = mqtt_topic::response_topic(200, &rid, Some(3));
        assert_eq!(topic.matches('$').count(), 2, "{topic}");
    }
    for method in [http::Method::GET, http::Method::PUT, http::Method::POST, http::Method::DELETE] {
        let _ = dps_server::http::route_of(&method, text);
    }
});
