//! X.509 handling on arbitrary input: certificate text (PEM or base64 DER, as enrollments and
//! uploads carry it), certificate facts, and chain verification of a device chain split out of
//! the input against an anchor from it. Nothing may panic.
#![no_main]

use dps_core::x509::{decode_certificate_text, facts, verify_chain, verify_signed_by};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(der) = decode_certificate_text(text) {
            let _ = facts(&der).map(|f| f.info());
        }
    }
    // Raw DER: up to four certificates, each prefixed by a two-byte length.
    let mut parts = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && parts.len() < 4 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        parts.push(rest[2..2 + n].to_vec());
        rest = &rest[2 + n..];
    }
    if let Some(leaf) = parts.first() {
        if let Ok(f) = facts(leaf) {
            let _ = f.check_time(1_800_000_000, "device certificate");
            let _ = f.info();
        }
        if let Some(anchor) = parts.last() {
            let _ = verify_signed_by(leaf, anchor, 1_800_000_000);
            let between = if parts.len() > 2 { &parts[1..parts.len() - 1] } else { &[][..] };
            let _ = verify_chain(leaf, between, anchor, 1_800_000_000);
        }
    }
});
