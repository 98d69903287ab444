//! The MQTT codec and topic grammar on arbitrary bytes: decoding never panics, never claims
//! more bytes than it was given, and every packet it accepts encodes back to bytes that decode
//! to the same packet.
#![no_main]

use dps_proto::mqtt::{decode, Packet};
use dps_proto::mqtt_topic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small limit exercises the size check on the same input.
    let _ = decode(data, 64);
    let mut rest = data;
    while let Ok(Some((packet, used))) = decode(rest, 1 << 20) {
        assert!(used > 0 && used <= rest.len(), "used {used} of {}", rest.len());
        let bytes = packet.encode().expect("a decoded packet encodes");
        let (again, n) = decode(&bytes, 1 << 20).expect("re-decodes").expect("complete");
        assert_eq!(again, packet);
        assert_eq!(n, bytes.len());
        match &packet {
            Packet::Publish(p) => {
                let _ = mqtt_topic::parse_request_topic(&p.topic);
            }
            Packet::Connect(c) => {
                if let Some(u) = &c.username {
                    let _ = mqtt_topic::parse_username(u);
                }
            }
            _ => {}
        }
        rest = &rest[used..];
    }
});
