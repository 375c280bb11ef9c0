//! The filter's plugin configuration (either stage), as Envoy hands it over.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gw_filter::config::Stage::parse(data);
});
