//! Ed25519 results this process has already established, so the same bytes under the
//! same key are not verified twice in one process.
//!
//! The sidecar checks every command's signature twice: admission re-verifies what
//! the edge verified, and the module's agent verifies again what it reads from the
//! bus before it applies it (on-agent verification). When both run in one process
//! on the same bytes, the second check repeats a pure function on the same input.
//! The memo keeps a SHA-256 over `(public key, signature, signed message)` of each
//! signature that verified, and the second check looks its digest up instead of
//! doing the curve arithmetic again: a hit means this process's `verify_strict`
//! accepted exactly these bytes under exactly this key.
//!
//! What it does not change: only successes are kept, so a bad signature is checked
//! in full every time; bytes this process never verified (another node's command on
//! Kafka, anything after a restart, anything older than the memo's `capacity`
//! newest entries) are checked in full; a key replaced under the same id has other
//! bytes, so nothing it did not verify matches. The key's validity window, its scope
//! and every other rule are checked on every call, outside the memo.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use crate::keyring::CommandKey;

/// The memo's key: SHA-256 over a domain tag, the public key, the signature and the
/// message (length-prefixed, which only matters if a field is ever added after it).
type Entry = [u8; 32];

/// Signatures that verified in this process, the newest `capacity` of them.
pub struct SigMemo {
    capacity: usize,
    inner: Mutex<Inner>,
    answered: AtomicU64,
    computed: AtomicU64,
}

#[derive(Default)]
struct Inner {
    seen: HashSet<Entry>,
    order: VecDeque<Entry>,
}

impl std::fmt::Debug for SigMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigMemo")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

fn entry(key: &CommandKey, message: &[u8], signature: &[u8; 64]) -> Entry {
    let mut h = Sha256::new();
    h.update(b"gw-sigmemo-v1\0");
    h.update(key.key().as_bytes());
    h.update(signature);
    h.update((message.len() as u64).to_le_bytes());
    h.update(message);
    h.finalize().into()
}

impl SigMemo {
    /// A memo of at most `capacity` signatures (at least one).
    pub fn new(capacity: usize) -> SigMemo {
        SigMemo {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
            answered: AtomicU64::new(0),
            computed: AtomicU64::new(0),
        }
    }

    /// `key.verify_strict(message, signature)`, answered from the memo when this
    /// process already saw exactly these bytes verify under this key.
    pub fn verify_strict(&self, key: &CommandKey, message: &[u8], signature: &[u8; 64]) -> bool {
        self.first_verified(key, &[message], signature).is_some()
    }

    /// The first of `messages` that `signature` verifies over under `key`
    /// (`verify_strict`), or `None`. Every candidate is looked up before any is
    /// computed, so bytes verified before as the second candidate (a command whose
    /// fields arrived out of order) do not cost a failing check of the first again.
    pub fn first_verified(
        &self,
        key: &CommandKey,
        messages: &[&[u8]],
        signature: &[u8; 64],
    ) -> Option<usize> {
        let entries: Vec<Entry> = messages.iter().map(|m| entry(key, m, signature)).collect();
        // A poisoned lock only loses the memo's help: verify in full.
        let hit = self
            .inner
            .lock()
            .ok()
            .and_then(|g| entries.iter().position(|e| g.seen.contains(e)));
        if hit.is_some() {
            self.answered.fetch_add(1, Ordering::Relaxed);
            return hit;
        }
        for (i, (m, e)) in messages.iter().zip(&entries).enumerate() {
            self.computed.fetch_add(1, Ordering::Relaxed);
            if key.verify_strict(m, signature) {
                self.remember(*e);
                return Some(i);
            }
        }
        None
    }

    fn remember(&self, e: Entry) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        if g.seen.contains(&e) {
            return;
        }
        if g.order.len() >= self.capacity {
            if let Some(old) = g.order.pop_front() {
                g.seen.remove(&old);
            }
        }
        g.seen.insert(e);
        g.order.push_back(e);
    }

    /// Checks answered from the memo, and checks that did the curve arithmetic
    /// (successes and failures), so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.computed.load(Ordering::Relaxed),
        )
    }

    /// Signatures remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |g| g.seen.len())
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> (SigningKey, CommandKey) {
        let sk = SigningKey::from_bytes(&[seed; 32]);
        let ck = CommandKey::unrestricted("k", sk.verifying_key());
        (sk, ck)
    }

    #[test]
    fn answers_like_verify_strict_and_keeps_only_successes() {
        let (sk, ck) = key(1);
        let memo = SigMemo::new(8);
        let sig = sk.sign(b"m").to_bytes();
        let mut bad = sig;
        bad[0] ^= 1;
        for _ in 0..2 {
            assert!(memo.verify_strict(&ck, b"m", &sig));
            assert!(!memo.verify_strict(&ck, b"m", &bad));
            assert!(!memo.verify_strict(&ck, b"n", &sig));
        }
        assert_eq!(memo.len(), 1);
        // The second good check was answered; every bad one was computed.
        assert_eq!(memo.counts(), (1, 5));
    }

    #[test]
    fn a_remembered_signature_does_not_verify_under_another_key() {
        let (sk, ck) = key(1);
        let (_, other) = key(2);
        let memo = SigMemo::new(8);
        let sig = sk.sign(b"m").to_bytes();
        assert!(memo.verify_strict(&ck, b"m", &sig));
        // Same id, other public key (a rotation): the memo does not answer for it.
        assert!(!memo.verify_strict(&other, b"m", &sig));
    }

    #[test]
    fn keeps_the_newest_capacity_entries() {
        let (sk, ck) = key(1);
        let memo = SigMemo::new(3);
        let sigs: Vec<_> = (0u8..5).map(|i| (i, sk.sign(&[i]).to_bytes())).collect();
        for (m, s) in &sigs {
            assert!(memo.verify_strict(&ck, &[*m], s));
        }
        assert_eq!(memo.len(), 3);
        let g = memo.inner.lock().unwrap();
        assert!(!g.seen.contains(&entry(&ck, &[0], &sigs[0].1)));
        assert!(g.seen.contains(&entry(&ck, &[4], &sigs[4].1)));
    }
}
