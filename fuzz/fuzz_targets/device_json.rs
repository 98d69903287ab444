//! Device runtime bodies (register, status lookup) as every transport receives them: the strict
//! parser refuses or accepts, never panics; what it accepts is one object without repeated keys.
#![no_main]

use dps_proto::device::DeviceRegistration;
use dps_proto::json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = json::parse_object(data) {
        // A re-serialised object parses to the same object.
        let again = serde_json::to_vec(&map).expect("serialises");
        assert_eq!(json::parse_object(&again).expect("re-parses"), map);
    }
    if let Ok(r) = json::parse::<DeviceRegistration>(data) {
        let _ = serde_json::to_vec(&r).expect("serialises");
    }
});
