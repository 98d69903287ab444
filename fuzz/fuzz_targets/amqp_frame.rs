//! The AMQP 1.0 codec on arbitrary bytes: frame, value and message decoding never panics,
//! never claims more bytes than it was given, and everything it accepts encodes back to bytes
//! that decode to the same thing (compared as values, and as bytes so that NaN floats, which
//! are not equal to themselves, are covered too).
#![no_main]
// `x == x` is false for values holding a NaN float, which only compare as bytes.
#![allow(clippy::eq_op)]

use dps_proto::amqp;
use dps_proto::amqp_frame::{decode_frame, Frame, Performative};
use dps_proto::amqp_message::decode_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small limit exercises the size check on the same input.
    let _ = decode_frame(data, 512);

    if let Ok((value, used)) = amqp::decode(data) {
        assert!(used > 0 && used <= data.len(), "used {used} of {}", data.len());
        let mut bytes = Vec::new();
        value.encode(&mut bytes);
        let (again, n) = amqp::decode(&bytes).expect("an encoded value decodes");
        assert_eq!(n, bytes.len());
        let mut twice = Vec::new();
        again.encode(&mut twice);
        assert_eq!(twice, bytes);
        if value == value {
            assert_eq!(again, value);
        }
    }

    let mut rest = data;
    while let Ok(Some((frame, used))) = decode_frame(rest, 65536) {
        assert!(used >= 8 && used <= rest.len(), "used {used} of {}", rest.len());
        let bytes = frame.to_bytes();
        let (again, n) = decode_frame(&bytes, u32::MAX).expect("re-decodes").expect("complete");
        assert_eq!(n, bytes.len());
        assert_eq!(again.to_bytes(), bytes);
        if frame == frame {
            assert_eq!(again, frame);
        }
        if let Frame::Amqp { performative: Performative::Transfer(_), payload, .. } = &frame {
            if let Ok(message) = decode_message(payload) {
                let bytes = message.to_bytes();
                let again = decode_message(&bytes).expect("an encoded message decodes");
                assert_eq!(again.to_bytes(), bytes);
                if message == message {
                    assert_eq!(again, message);
                }
            }
        }
        rest = &rest[used..];
    }
    // Every payload position is also tried as a message on its own.
    let _ = decode_message(data);
});
