//! The filter's `SharedStore` over the test host's shared data (Envoy's semantics).

#![allow(dead_code)]

use gw_filter::replay_cas::{SharedStore, StoreError};
use testkit::proxy_wasm::SharedData;

/// Shared data as the filter sees it through a host.
#[derive(Debug, Default)]
pub struct EnvoyLikeStore(pub SharedData);

impl EnvoyLikeStore {
    /// ngx_wasm_module's rule (Kong): the CAS must be the key's, 0 only for a
    /// missing key.
    pub fn strict() -> Self {
        EnvoyLikeStore(SharedData::strict())
    }
}

impl std::ops::Deref for EnvoyLikeStore {
    type Target = SharedData;
    fn deref(&self) -> &SharedData {
        &self.0
    }
}

impl SharedStore for EnvoyLikeStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        Ok(self.0.get(key))
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.0
            .set(key, value, cas)
            .map_err(|_| StoreError::CasMismatch)
    }
}
