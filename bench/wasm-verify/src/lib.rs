//! Exports the core's verification to a wasm host (the benchmark's wasmtime runner).
//! Memory protocol: the host calls `bench_alloc(n)`, writes `n` bytes there, then
//! calls a verify function with the pointer. Results: 0 = ok, otherwise 1 + the
//! index of the rejection code in `Code::ALL`.

use std::sync::Mutex;

use gw_core::keyring::CommandKey;
use gw_core::KeyRing;

/// [dalek ring, table ring]: the same key, verified by `ed25519-dalek` or by the
/// core's precomputed tables (what the edge filter uses).
static RINGS: Mutex<Option<[KeyRing; 2]>> = Mutex::new(None);

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

fn with_ring(tables: i32, f: impl FnOnce(&KeyRing) -> i32) -> i32 {
    let Ok(g) = RINGS.lock() else { return -1 };
    match g.as_ref() {
        Some(rings) => f(&rings[usize::from(tables != 0)]),
        None => -1,
    }
}

/// Installs the 32-byte public key at `ptr` as `pubkey_id` `op-admin-1` in both
/// rings (building the table ring's tables). Returns 0 on success.
///
/// # Safety
/// `ptr` must point to 32 readable bytes.
#[no_mangle]
pub unsafe extern "C" fn bench_set_key(ptr: *const u8) -> i32 {
    let bytes = std::slice::from_raw_parts(ptr, 32);
    let Ok(vk) = gw_core::jwk::ed25519_from_bytes(bytes) else {
        return -1;
    };
    let mut rings = [KeyRing::new(), KeyRing::new()];
    if rings[1].precompute_tables().is_err() {
        return -1;
    }
    for ring in &mut rings {
        if ring
            .insert(CommandKey::unrestricted("op-admin-1", vk))
            .is_err()
        {
            return -1;
        }
    }
    match RINGS.lock() {
        Ok(mut g) => {
            *g = Some(rings);
            0
        }
        Err(_) => -1,
    }
}

/// Verifies the signed command at `ptr..ptr+len`; `tables` ≠ 0 selects the table ring.
///
/// # Safety
/// `ptr` must point to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn bench_verify_command(ptr: *const u8, len: u32, tables: i32) -> i32 {
    let body = std::slice::from_raw_parts(ptr, len as usize);
    with_ring(tables, |ring| {
        code_result(gw_core::verify_command(body, ring, None).map(|_| ()))
    })
}

/// Raw strict Ed25519 verification of `msg` (at `ptr`, `len` bytes) against the
/// 64-byte signature at `sig`; `tables` ≠ 0 selects the table ring. 0 = valid.
///
/// # Safety
/// The pointers must be readable for their lengths.
#[no_mangle]
pub unsafe extern "C" fn bench_verify_raw(
    ptr: *const u8,
    len: u32,
    sig: *const u8,
    tables: i32,
) -> i32 {
    let msg = std::slice::from_raw_parts(ptr, len as usize);
    let mut s = [0u8; 64];
    s.copy_from_slice(std::slice::from_raw_parts(sig, 64));
    with_ring(tables, |ring| match ring.get("op-admin-1") {
        Some(key) => i32::from(!key.verify_strict(msg, &s)),
        None => -1,
    })
}
