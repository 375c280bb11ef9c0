//! The edge's own Ed25519 verifier (core/src/edverify, kept for the wasm filter's
//! speed) against ed25519-dalek's `verify_strict` on the same (key, message,
//! signature): they must agree on every input. The first byte picks the mode: even
//! → key and signature come from the input as is (almost always invalid points or
//! signatures); odd → the message is signed by a key derived from the input, and
//! then one input-chosen bit of the signature or key may be flipped, so valid and
//! nearly valid signatures are compared too.
#![no_main]

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use gw_core::edverify::PrecomputedKey;
use libfuzzer_sys::fuzz_target;

fn library(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Option<bool> {
    let vk = VerifyingKey::from_bytes(pk).ok()?;
    Some(vk.verify_strict(msg, &Signature::from_bytes(sig)).is_ok())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 1 + 32 + 64 + 2 {
        return;
    }
    let (mode, rest) = (data[0], &data[1..]);
    let (mut pk, mut sig, msg): ([u8; 32], [u8; 64], &[u8]);
    if mode & 1 == 0 {
        pk = rest[..32].try_into().unwrap_or([0; 32]);
        sig = rest[32..96].try_into().unwrap_or([0; 64]);
        msg = &rest[96..];
    } else {
        let seed: [u8; 32] = rest[..32].try_into().unwrap_or([0; 32]);
        let sk = SigningKey::from_bytes(&seed);
        let flip = u16::from_le_bytes([rest[32], rest[33]]);
        msg = &rest[34..];
        pk = sk.verifying_key().to_bytes();
        sig = sk.sign(msg).to_bytes();
        match flip % 4 {
            0 => {}
            1 => sig[usize::from(flip >> 2) % 64] ^= 1 << (flip % 8),
            2 => pk[usize::from(flip >> 2) % 32] ^= 1 << (flip % 8),
            _ => sig[32..].copy_from_slice(&[0xff; 32]),
        }
    }
    let ours = PrecomputedKey::new(&pk)
        .ok()
        .map(|k| k.verify_strict(msg, &sig));
    let theirs = library(&pk, msg, &sig);
    // A key one side refuses to decompress verifies nothing on the other.
    assert_eq!(
        ours.unwrap_or(false),
        theirs.unwrap_or(false),
        "edverify and ed25519-dalek disagree: pk {pk:02x?} sig {sig:02x?} msg {msg:02x?}"
    );
});
