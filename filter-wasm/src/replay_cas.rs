//! The edge copy of the replay state in proxy-wasm shared data, updated with CAS so
//! that every worker VM agrees: a nonce is accepted at most once across workers
//! while its command is fresh. An issuer's nonces are spread over
//! [`gw_core::replay::SHARDS`] keys, each a [`Shard`] (the rule is the core's). A
//! resend of the same bytes is let through to the sidecar, whose guard is
//! authoritative and knows whether the command was applied; a different command
//! reusing a nonce is refused here.
//!
//! Envoy's shared data checks a CAS value only when the key already exists, so two
//! first writes with `cas = 0` both succeed. We never write a key blindly: a missing
//! key is *created* with a CAS value no live entry holds ([`CREATE_CAS`]), which
//! succeeds only while the key is absent; every later change is a CAS update. On a
//! host that refuses a non-zero CAS for a missing key, we fall back to a plain create
//! (the sidecar's replay guard stays authoritative either way).

use gw_core::replay::{shard_of, Digest, Limits, Shard, ShardOutcome};
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

/// The value at `key` and its CAS.
fn get(store: &impl SharedStore, key: &str) -> Result<(Option<Vec<u8>>, u32), Reject> {
    store
        .get(key)
        .map_err(|e| unavailable(format!("shared data get: {e:?}")))
}

/// The CAS a missing key is created with: [`CREATE_CAS`] first; strict hosts
/// refuse it on a missing key, so once it was tried, a plain create (0).
fn create_cas(tried: &mut bool) -> u32 {
    if std::mem::replace(tried, true) {
        0
    } else {
        CREATE_CAS
    }
}

/// Every attempt found the key changed by another worker.
fn contended() -> Reject {
    Reject::new(Code::ReplayUnavailable, "replay state is contended; retry")
}

/// Writes `value` at `key` if its CAS is still `cas`: `Ok(false)` when another
/// worker changed it meanwhile (read it again).
fn cas_set(store: &impl SharedStore, key: &str, value: &[u8], cas: u32) -> Result<bool, Reject> {
    match store.set(key, value, cas) {
        Ok(()) => Ok(true),
        Err(StoreError::CasMismatch) => Ok(false),
        Err(StoreError::Unavailable(e)) => Err(unavailable(format!("shared data set: {e}"))),
    }
}

/// One command's nonce, as the edge's replay copy needs it.
#[derive(Debug, Clone, Copy)]
pub struct NonceUse<'a> {
    /// The command's issuer.
    pub issuer: &'a str,
    /// Its nonce.
    pub nonce: u64,
    /// Until when it must be remembered (`ts + max_skew`).
    pub expires: u64,
    /// The digest of the command's bytes.
    pub digest: &'a Digest,
}

/// The shared-data key of the shard holding `issuer`'s `nonce`.
pub fn shard_key(prefix: &str, issuer: &str, nonce: u64) -> String {
    format!("{prefix}{issuer}.{}", shard_of(nonce))
}

/// The key counting the shard keys created under `prefix` (a shard key ends in
/// `.<shard>`, so no issuer's shard is named so).
pub fn keys_count_key(prefix: &str) -> String {
    format!("{prefix}#keys")
}

/// Takes one of the `cap` shard keys `prefix` may ever create, before one is:
/// proxy-wasm 0.2.1 cannot delete shared data, so every issuer seen keeps its
/// keys for Envoy's life, and issuers beyond [`Limits::max_issuers`] (with every
/// shard) are refused `replay_capacity` instead of growing Envoy's memory.
/// (A key reserved by a worker whose create lost a race is counted all the
/// same: the bound errs low.)
fn reserve_key(store: &impl SharedStore, prefix: &str, cap: u64) -> Result<(), Reject> {
    let key = keys_count_key(prefix);
    let mut tried_create = false;
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = get(store, &key)?;
        let n = match &value {
            None => 0,
            Some(b) => <[u8; 8]>::try_from(b.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| unavailable(format!("shared data at `{key}` is not a count")))?,
        };
        if n >= cap {
            return Err(Reject::with(
                Code::ReplayCapacity,
                format!("the edge remembers the nonces of {cap} shards (replay_max_issuers issuers) and cannot forget an issuer: no new issuer until Envoy restarts"),
            ));
        }
        let cas = match value {
            Some(_) => cas,
            None => create_cas(&mut tried_create),
        };
        if cas_set(store, &key, &(n + 1).to_le_bytes(), cas)? {
            return Ok(());
        }
    }
    Err(contended())
}

/// Accepts a nonce once into the issuer's shard under `prefix` (see
/// [`gw_core::replay`]): `Fresh`, or `Resend` for the same bytes seen before.
/// A shard key not there yet is created only within the bound of
/// [`Limits::max_issuers`] issuers' shards ([`keys_count_key`]).
pub fn accept_nonce(
    store: &impl SharedStore,
    prefix: &str,
    u: &NonceUse<'_>,
    now: u64,
    limits: Limits,
) -> Result<ShardOutcome, Reject> {
    let key = shard_key(prefix, u.issuer, u.nonce);
    let mut tried_create = false;
    let mut reserved = false;
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = get(store, &key)?;
        let Some(bytes) = value else {
            if !reserved {
                let cap = (limits.max_issuers as u64).saturating_mul(gw_core::replay::SHARDS);
                reserve_key(store, prefix, cap)?;
                reserved = true;
            }
            match store.set(&key, &[], create_cas(&mut tried_create)) {
                Ok(()) | Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Unavailable(e)) => {
                    return Err(unavailable(format!("shared data create: {e}")))
                }
            }
        };
        let mut shard = Shard::from_bytes(&bytes)
            .ok_or_else(|| unavailable(format!("shared data at `{key}` is not a replay shard")))?;
        let outcome = shard
            .accept(u.nonce, u.expires, u.digest, now, limits.per_shard())
            .map_err(|r| r.reject(u.issuer, u.nonce))?;
        if outcome == ShardOutcome::Resend {
            return Ok(outcome);
        }
        if cas_set(store, &key, &shard.to_bytes(), cas)? {
            return Ok(outcome);
        }
    }
    Err(contended())
}
