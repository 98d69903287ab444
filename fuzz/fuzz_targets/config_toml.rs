//! Configuration files: any text is a valid configuration or an error naming the problem;
//! validation (rule-set compilation included) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = dps_server::Config::from_toml(text, std::path::Path::new("fuzz.toml")) {
        let _ = dps_server::descriptors::fit(&config, 20_000);
    }
});
