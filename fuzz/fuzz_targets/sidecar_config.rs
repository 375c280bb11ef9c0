//! The sidecar's configuration file, with only the edge key from the environment
//! (without it every input would stop there): parsing, defaults, key rings,
//! bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = gw_sidecar::config::Config::from_json(
            text,
            std::path::Path::new("fuzz.json"),
            &|k| (k == "GW_EDGE_KEY_HEX").then(|| "ab".repeat(32)),
        );
    }
});
