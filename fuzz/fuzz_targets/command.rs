//! The wire scanner and command verification. The first byte picks the mode:
//! even → the input is a received command body as is (the scanner, the split into
//! signature and payload, the decoder); odd → the input is an unsigned payload,
//! which is signed with the fuzz key before verification, so the checks after the
//! signature (scope, typed args, builder rules) are reached too. Any panic is a bug.
#![no_main]

use ed25519_dalek::{Signer, SigningKey};
use gw_core::command::{split_signed, verify_command, SIG_ALG_ED25519_V1};
use gw_core::keyring::CommandKey;
use gw_core::KeyRing;
use libfuzzer_sys::fuzz_target;

fn len_record(out: &mut Vec<u8>, field: u64, value: &[u8]) {
    let mut varint = |mut v: u64| loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    };
    varint(field << 3 | 2);
    varint(value.len() as u64);
    out.extend_from_slice(value);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sk = SigningKey::from_bytes(&[7; 32]);
    let mut ring = KeyRing::new();
    if ring
        .insert(CommandKey::unrestricted("fuzz", sk.verifying_key()))
        .is_err()
    {
        return;
    }
    let body = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut body = rest.to_vec();
        len_record(&mut body, 8, &sk.sign(rest).to_bytes());
        len_record(&mut body, 9, b"fuzz");
        len_record(&mut body, 10, SIG_ALG_ED25519_V1.as_bytes());
        body
    };
    let split = split_signed(&body);
    let verified = verify_command(&body, &ring, Some(1_750_000_000));
    // A body that verifies has split cleanly, and its signed payload is one of the
    // two the split offers.
    if let Ok(v) = verified {
        let parts = split.expect("verified but did not split");
        assert!(
            v.signed_payload == parts.payload
                || parts.canonical.as_deref() == Some(&v.signed_payload[..])
        );
    }
});
