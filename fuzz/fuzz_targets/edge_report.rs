//! The edge-report batches the sidecar accepts on `/internal/edge-decisions`, and
//! the verified-header value the stamp stage writes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gw_core::contract::parse_report_batch(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = gw_core::contract::Verified::parse(s);
    }
});
