//! Exports the core's verification to a wasm host (the benchmark's wasmtime runner).
//! Memory protocol: the host calls `bench_alloc(n)`, writes `n` bytes there, then
//! calls a verify function with the pointer. Results: 0 = ok, otherwise 1 + the
//! index of the rejection code in `Code::ALL`.

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

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

/// The command every verify benchmark signs (`policy` on `mev`, three arguments,
/// 232 bytes signed): the same bytes natively, in wasmtime, Node and Envoy.
pub fn bench_command() -> gw_core::Command {
    gw_core::Command {
        ts: 1_750_000_000,
        module: 1,
        action: 4,
        args: std::collections::BTreeMap::from([
            ("ev_min".to_string(), "0.25".to_string()),
            ("tip_ladder".to_string(), "0.1,0.2,0.35".to_string()),
            ("throttle_pct".to_string(), "40".to_string()),
        ]),
        request_id: "6f1c1f4e-8d7b-4a53-9c61-3f1f0a2b9e77".into(),
        issuer: "dashboard".into(),
        schema_version: "ctrl-v1".into(),
        nonce: 1_750_000_000_123_456_789,
        ..Default::default()
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
    // SAFETY: the caller's contract: 32 readable bytes at `ptr`.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, 32) };
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
    // SAFETY: the caller's contract: `len` readable bytes at `ptr`.
    let body = unsafe { std::slice::from_raw_parts(ptr, len as usize) };
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
    // SAFETY: the caller's contract: `len` bytes at `ptr` and 64 at `sig`.
    let (msg, sig) = unsafe {
        (
            std::slice::from_raw_parts(ptr, len as usize),
            std::slice::from_raw_parts(sig, 64),
        )
    };
    let mut s = [0u8; 64];
    s.copy_from_slice(sig);
    with_ring(tables, |ring| match ring.get("op-admin-1") {
        Some(key) => i32::from(!key.verify_strict(msg, &s)),
        None => -1,
    })
}

/// The same measurement inside a proxy-wasm host (Envoy's V8): loaded as a
/// bootstrap wasm service, the module times every variant when the VM starts and
/// logs one line `gw-verify-bench {json}` at warn level (`bench/run.sh verify`).
#[cfg(target_arch = "wasm32")]
mod proxy_wasm_host {
    use ed25519_dalek::{Signer, SigningKey};
    use gw_core::{sign_command, signing_payload};

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_log(level: u32, ptr: *const u8, len: usize) -> u32;
        fn proxy_get_current_time_nanoseconds(out: *mut u64) -> u32;
    }

    const WARN: u32 = 3;

    fn now_ns() -> u64 {
        let mut t = 0u64;
        // SAFETY: the host writes one u64 through the pointer.
        unsafe { proxy_get_current_time_nanoseconds(&mut t) };
        t
    }

    /// Median over 7 runs of `n` calls, in µs per call (the host clock is wall time).
    fn time(n: u32, mut f: impl FnMut() -> i32) -> f64 {
        for _ in 0..n {
            assert_eq!(f(), 0);
        }
        let mut runs: Vec<f64> = (0..7)
            .map(|_| {
                let t0 = now_ns();
                for _ in 0..n {
                    std::hint::black_box(f());
                }
                (now_ns() - t0) as f64 / f64::from(n) / 1e3
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[3]
    }

    #[no_mangle]
    pub extern "C" fn proxy_abi_version_0_2_1() {}

    #[no_mangle]
    pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
        super::bench_alloc(size as u32)
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_id: u32) {}

    #[no_mangle]
    pub extern "C" fn proxy_on_vm_start(_root_id: u32, _config_size: usize) -> u32 {
        let sk = SigningKey::from_bytes(&[42; 32]);
        let cmd = super::bench_command();
        let body = sign_command(&cmd, &sk, "op-admin-1");
        let payload = signing_payload(&cmd);
        let sig = sk.sign(&payload).to_bytes();
        let t0 = now_ns();
        // SAFETY: the pointers are to live slices of the stated lengths.
        let ok = unsafe { super::bench_set_key(sk.verifying_key().as_bytes().as_ptr()) } == 0;
        let setup_ms = (now_ns() - t0) as f64 / 1e6;
        let line = if ok {
            let (b, p) = (&body, &payload);
            // SAFETY: as above.
            let raw =
                |t| unsafe { super::bench_verify_raw(p.as_ptr(), p.len() as u32, sig.as_ptr(), t) };
            let com = |t| unsafe { super::bench_verify_command(b.as_ptr(), b.len() as u32, t) };
            format!(
                "gw-verify-bench {{\"raw_dalek\": {:.2}, \"raw_tables\": {:.2}, \"command_dalek\": {:.2}, \"command_tables\": {:.2}, \"set_key_ms\": {setup_ms:.2}}}",
                time(300, || raw(0)),
                time(300, || raw(1)),
                time(300, || com(0)),
                time(300, || com(1)),
            )
        } else {
            "gw-verify-bench {\"error\": \"set key failed\"}".to_string()
        };
        // SAFETY: the host reads `len` bytes from the pointer.
        unsafe { proxy_log(WARN, line.as_ptr(), line.len()) };
        1
    }
}
