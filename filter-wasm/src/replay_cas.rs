//! The edge copy of the replay state in proxy-wasm shared data, updated with CAS so
//! that every worker VM agrees: a nonce is accepted at most once across workers.
//!
//! Envoy's shared data checks a CAS value only when the key already exists, so two
//! first writes with `cas = 0` both succeed. We never write a key blindly: a missing
//! key is *created* with a CAS value no live entry holds ([`CREATE_CAS`]), which
//! succeeds only while the key is absent; every later change is a CAS update. On a
//! host that refuses a non-zero CAS for a missing key, we fall back to a plain create
//! (the sidecar's replay guard stays authoritative either way).

use gw_core::replay::NonceWindow;
use gw_core::{Code, Reject};

/// CAS value used to create a key only while it does not exist.
pub const CREATE_CAS: u32 = u32::MAX;
/// Attempts before giving up under contention.
pub const MAX_ATTEMPTS: usize = 32;

/// Why the store refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The key changed since it was read.
    CasMismatch,
    /// The host failed.
    Unavailable(String),
}

/// Process-wide key/value data with CAS (proxy-wasm shared data).
pub trait SharedStore {
    /// The value and its CAS (0 when the key is absent).
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError>;
    /// Sets `value` if `cas` is 0 or matches the key's current CAS.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

fn unavailable(detail: String) -> Reject {
    Reject::with(Code::ReplayUnavailable, detail)
}

/// Accepts `nonce` once in the window stored at `key` (created with `window` nonces).
pub fn accept_nonce(
    store: &impl SharedStore,
    key: &str,
    window: u32,
    nonce: u64,
) -> Result<(), Reject> {
    let empty = NonceWindow::new(window)
        .map_err(|e| unavailable(e.to_string()))?
        .to_bytes();
    let mut tried_create = false;
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = store
            .get(key)
            .map_err(|e| unavailable(format!("shared data get: {e:?}")))?;
        let Some(bytes) = value else {
            // Strict hosts refuse CREATE_CAS on a missing key; then create plainly.
            let create_cas = if tried_create { 0 } else { CREATE_CAS };
            tried_create = true;
            match store.set(key, &empty, create_cas) {
                Ok(()) | Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Unavailable(e)) => {
                    return Err(unavailable(format!("shared data create: {e}")))
                }
            }
        };
        let mut w = NonceWindow::from_bytes_any(&bytes)
            .ok_or_else(|| unavailable(format!("shared data at `{key}` is not a replay window")))?;
        w.accept(nonce)?;
        match store.set(key, &w.to_bytes(), cas) {
            Ok(()) => return Ok(()),
            Err(StoreError::CasMismatch) => {}
            Err(StoreError::Unavailable(e)) => {
                return Err(unavailable(format!("shared data set: {e}")))
            }
        }
    }
    Err(unavailable("replay state is contended; retry".into()))
}
