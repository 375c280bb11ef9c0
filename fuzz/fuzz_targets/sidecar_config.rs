//! The sidecar's configuration file, with no environment: parsing, defaults, key
//! rings, bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = gw_sidecar::config::Config::from_json(
            text,
            std::path::Path::new("fuzz.json"),
            &|_| None,
        );
    }
});
