//! Custom allocation webhook answers: any bytes a webhook sends are either an assignment to one
//! of the offered hubs or a failure with a DPS code; the device's message never carries the
//! webhook's own words.
#![no_main]

use dps_core::custom::{check_answer, parse_answer, AllocationFailure};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let hubs = vec!["hub-a.test".to_string(), "hub-b.test".to_string()];
    let twin = serde_json::json!({"tags": {"from": "enrollment"}});
    // What the engine does with a webhook's 2xx body: parse it, then decide.
    let checked = parse_answer(data)
        .map_err(|e| AllocationFailure::from_hook(e.into(), "dev-1", false))
        .and_then(|answer| check_answer(answer, &hubs, Some(&twin)));
    match checked {
        Ok(a) => assert!(hubs.contains(&a.hub), "{}", a.hub),
        Err(f) => {
            assert!(f.code.0 == 400208 || f.code.0 == 400209, "{}", f.code);
            if f.detail.is_some() {
                let body = String::from_utf8_lossy(data);
                let marker = "zz-webhook-words-zz";
                assert!(!(body.contains(marker) && f.message.contains(marker)), "{}", f.message);
            }
        }
    }
});
