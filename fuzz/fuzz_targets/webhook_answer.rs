//! Custom allocation webhook answers: any bytes a webhook sends are either an assignment to one
//! of the offered hubs or a failure with a DPS code; the device's message never carries the
//! webhook's own words.
#![no_main]

use dps_core::custom::check_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let hubs = vec!["hub-a.test".to_string(), "hub-b.test".to_string()];
    let twin = serde_json::json!({"tags": {"from": "enrollment"}});
    match check_response(data, &hubs, Some(&twin)) {
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
