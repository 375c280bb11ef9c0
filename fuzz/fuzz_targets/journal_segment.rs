//! A journal segment as the disk hands it back at start: damage refused, a torn
//! tail cut, never a panic; what is kept is whole, consecutive records (checked
//! inside `fuzz_scan`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gw_sidecar::journal::fuzz_scan(data);
});
