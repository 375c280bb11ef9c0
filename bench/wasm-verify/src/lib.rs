//! Exports the core's verification to a wasm host (the benchmark's wasmtime runner).
//! Memory protocol: the host calls `bench_alloc(n)`, writes `n` bytes there, then
//! calls a verify function with the pointer. Results: 0 = ok, otherwise 1 + the
//! index of the rejection code in `Code::ALL`.

use std::sync::Mutex;

use gw_core::keyring::CommandKey;
use gw_core::KeyRing;

static RING: Mutex<Option<KeyRing>> = Mutex::new(None);

/// Allocates `len` bytes for the host to fill; never freed (benchmark inputs are few).
#[no_mangle]
pub extern "C" fn bench_alloc(len: u32) -> *mut u8 {
    let mut v = Vec::<u8>::with_capacity(len as usize);
    let p = v.as_mut_ptr();
    std::mem::forget(v);
    p
}

fn code_result(r: Result<(), gw_core::Reject>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            1 + gw_core::Code::ALL
                .iter()
                .position(|c| *c == e.code)
                .unwrap_or(0) as i32
        }
    }
}

/// Installs the 32-byte public key at `ptr` as `pubkey_id` `op-admin-1`. Returns 0 on success.
///
/// # Safety
/// `ptr` must point to 32 readable bytes.
#[no_mangle]
pub unsafe extern "C" fn bench_set_key(ptr: *const u8) -> i32 {
    let bytes = std::slice::from_raw_parts(ptr, 32);
    let Ok(vk) = gw_core::jwk::ed25519_from_bytes(bytes) else {
        return -1;
    };
    let mut ring = KeyRing::new();
    if ring
        .insert(CommandKey::unrestricted("op-admin-1", vk))
        .is_err()
    {
        return -1;
    }
    match RING.lock() {
        Ok(mut g) => {
            *g = Some(ring);
            0
        }
        Err(_) => -1,
    }
}

/// Verifies the signed command at `ptr..ptr+len` with the installed key ring.
///
/// # Safety
/// `ptr` must point to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn bench_verify_command(ptr: *const u8, len: u32) -> i32 {
    let body = std::slice::from_raw_parts(ptr, len as usize);
    let Ok(g) = RING.lock() else { return -1 };
    let Some(ring) = g.as_ref() else { return -1 };
    code_result(gw_core::verify_command(body, ring, None).map(|_| ()))
}

/// Raw Ed25519 `verify_strict` of `msg` (at `ptr`, `len` bytes) against the 64-byte
/// signature at `sig` with the installed key.
///
/// # Safety
/// The pointers must be readable for their lengths.
#[no_mangle]
pub unsafe extern "C" fn bench_verify_raw(ptr: *const u8, len: u32, sig: *const u8) -> i32 {
    let msg = std::slice::from_raw_parts(ptr, len as usize);
    let mut s = [0u8; 64];
    s.copy_from_slice(std::slice::from_raw_parts(sig, 64));
    let Ok(g) = RING.lock() else { return -1 };
    let Some(key) = g.as_ref().and_then(|r| r.get("op-admin-1")) else {
        return -1;
    };
    match key
        .key
        .verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&s))
    {
        Ok(()) => 0,
        Err(_) => 1,
    }
}
