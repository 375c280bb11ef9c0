//! The JSON-RPC route's transaction decoding: base58/base64 text to a checked
//! Solana transaction (size, shortvecs, signatures, message header, account keys),
//! and the wire parser on raw bytes.
#![no_main]

use gw_core::txwire::{decode, parse, Encoding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let _ = parse(rest, true);
        }
        1 => {
            let _ = decode(&String::from_utf8_lossy(rest), Encoding::Base58);
        }
        _ => {
            let _ = decode(&String::from_utf8_lossy(rest), Encoding::Base64);
        }
    }
});
