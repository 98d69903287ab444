//! SAS tokens (device and service `Authorization`, MQTT passwords) and service connection
//! strings on arbitrary text: parsing is total (a token or a reason), never panics, and a parsed
//! token's checks run on whatever it holds.
#![no_main]

use dps_proto::connection_string::ServiceConnectionString;
use dps_proto::sas::{derive_device_key, service_audience_matches, SasToken};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(token) = SasToken::parse(text) {
        let key = derive_device_key(b"fuzz-group-key-0123456789", &token.resource);
        let _ = token.is_signed_by(&key);
        let _ = token.is_expired(1_800_000_000, 300);
        let _ = service_audience_matches(&token.resource, "localhost", "/enrollments/x");
    }
    if let Ok(c) = ServiceConnectionString::parse(text) {
        assert!(!c.host_name.is_empty() && !c.key_name.is_empty());
    }
});
