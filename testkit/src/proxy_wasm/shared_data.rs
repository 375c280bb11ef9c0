//! Shared data as Envoy keeps it: one map behind one mutex for the whole process,
//! a CAS value per key from a global counter that skips 0, and the CAS checked only
//! when the key already exists (so two first writes with `cas = 0` both succeed).

use std::collections::HashMap;
use std::sync::Mutex;

/// A write refused because the key's CAS changed (or, strict, was absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasMismatch;

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
}

/// Process-wide shared data with Envoy's semantics.
#[derive(Debug, Default)]
pub struct SharedData {
    inner: Mutex<Inner>,
    /// ngx_wasm_module's (Kong's) rule instead of Envoy's: the CAS must equal the
    /// key's, 0 for a missing key — so a non-zero CAS on a missing key and a CAS
    /// of 0 on an existing one are both refused.
    pub strict: bool,
}

impl SharedData {
    /// A store with ngx_wasm_module's CAS rule ([`SharedData::strict`]).
    pub fn strict() -> Self {
        SharedData {
            strict: true,
            ..Default::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value and its CAS (0 when the key is absent).
    pub fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        match self.lock().entries.get(key) {
            Some((v, c)) => (Some(v.clone()), *c),
            None => (None, 0),
        }
    }

    /// Sets `value` if `cas` is 0 or matches the key's CAS (Envoy: only checked when
    /// the key exists); strict: if `cas` is the key's, or 0 for a missing key.
    pub fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), CasMismatch> {
        let strict = self.strict;
        let mut g = self.lock();
        g.last_cas = g.last_cas.wrapping_add(1).max(1);
        let next = g.last_cas;
        match g.entries.get_mut(key) {
            Some((v, c)) => {
                if (cas != 0 || strict) && cas != *c {
                    return Err(CasMismatch);
                }
                *v = value.to_vec();
                *c = next;
            }
            None if strict && cas != 0 => return Err(CasMismatch),
            None => {
                g.entries.insert(key.to_owned(), (value.to_vec(), next));
            }
        }
        Ok(())
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no key exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.lock().entries.keys().cloned().collect();
        k.sort();
        k
    }
}
