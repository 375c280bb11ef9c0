//! The authoritative replay guard: [`gw_core::replay::NonceBook`] kept durable in the
//! journal, so a restart never re-opens a nonce. An accepted nonce is in the journal
//! (fsynced, with whatever else the writer batched with it) before the command is
//! acknowledged; at start the guard is rebuilt from the nonces that are still fresh.

use std::collections::BTreeMap;

use gw_core::replay::{Digest, Limits, NonceBook, Refused, Seen};
use gw_core::Reject;
use serde::{Deserialize, Serialize};

use crate::journal::{self, Journal, JournalError, Lsn, Stream};

/// What an accepted nonce is remembered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The digest of the command's bytes (a resend of the same bytes is told apart
    /// from another command reusing the nonce).
    #[serde(with = "hex_digest")]
    pub digest: Digest,
    /// The command's `request_id`.
    pub request_id: String,
}

mod hex_digest {
    use gw_core::replay::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("a 16-byte hex digest"))
    }
}

/// One journal record: a nonce accepted until `expires`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NonceRecord {
    issuer: String,
    nonce: u64,
    expires: u64,
    #[serde(flatten)]
    accepted: Accepted,
}

/// Why the guard could not record a nonce.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The journal refused the write (the nonce is not accepted).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A recovered record is not a nonce record.
    #[error("journal: a replay record does not parse: {0}")]
    Corrupt(String),
    /// The guard is full or saw the nonce meanwhile.
    #[error("{0}")]
    Refused(Reject),
}

/// The replay guard and its journal.
pub struct ReplayStore {
    book: NonceBook<Accepted>,
    journal: Journal,
    /// Journal positions of the live nonces (to release what expired).
    positions: BTreeMap<Lsn, u64>,
}

const OWNER: &str = "replay";

impl ReplayStore {
    /// The guard with the journal's fresh nonces (`recovered`: this stream's records).
    pub fn open(
        journal: Journal,
        recovered: &[(Lsn, &[u8])],
        limits: Limits,
        now: u64,
    ) -> Result<ReplayStore, StoreError> {
        let mut s = ReplayStore {
            book: NonceBook::new(limits),
            journal,
            positions: BTreeMap::new(),
        };
        for (lsn, body) in recovered {
            let r: NonceRecord =
                serde_json::from_slice(body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if r.expires < now {
                continue;
            }
            // A guard at its bound after a restart keeps what it had: never refuse
            // what was accepted before.
            let _ = s
                .book
                .insert(&r.issuer, r.nonce, r.expires, r.accepted, now);
            s.positions.insert(*lsn, r.expires);
        }
        s.release(now);
        Ok(s)
    }

    /// Whether `(issuer, nonce)` would be accepted at `now` (what it was accepted
    /// with, if it was).
    pub fn check(&self, issuer: &str, nonce: u64, now: u64) -> Result<(), Refused<Accepted>> {
        self.book.check(issuer, nonce, now)
    }

    /// What `(issuer, nonce)` was accepted with, if it is live.
    pub fn get(&self, issuer: &str, nonce: u64, now: u64) -> Option<&Seen<Accepted>> {
        self.book.get(issuer, nonce, now)
    }

    /// The record that accepts `(issuer, nonce)` until `expires`; write it to the
    /// journal, then [`Self::accepted`].
    pub fn record(issuer: &str, nonce: u64, expires: u64, accepted: &Accepted) -> Vec<u8> {
        journal::encode(
            Stream::Nonce,
            &NonceRecord {
                issuer: issuer.to_owned(),
                nonce,
                expires,
                accepted: accepted.clone(),
            },
        )
    }

    /// Takes a nonce whose record is durable at `lsn` into the guard.
    pub fn accepted(
        &mut self,
        lsn: Lsn,
        issuer: &str,
        nonce: u64,
        expires: u64,
        accepted: Accepted,
        now: u64,
    ) -> Result<(), StoreError> {
        self.positions.insert(lsn, expires);
        self.book
            .insert(issuer, nonce, expires, accepted, now)
            .map_err(|r| StoreError::Refused(r.reject(issuer, nonce)))?;
        self.release(now);
        Ok(())
    }

    /// Accepts `(issuer, nonce)` once, durably (the journal first).
    pub async fn accept(
        this: &parking_lot::Mutex<ReplayStore>,
        issuer: &str,
        nonce: u64,
        expires: u64,
        accepted: Accepted,
        now: u64,
    ) -> Result<(), StoreError> {
        let journal = this.lock().journal.clone();
        let lsn = journal
            .append(vec![Self::record(issuer, nonce, expires, &accepted)])
            .await?;
        this.lock()
            .accepted(lsn, issuer, nonce, expires, accepted, now)
    }

    /// Lets the journal drop the records of nonces that expired.
    fn release(&mut self, now: u64) {
        self.positions.retain(|_, exp| *exp >= now);
        let hold = self.positions.keys().next().copied().unwrap_or(Lsn::MAX);
        self.journal.hold(OWNER, hold);
    }

    /// The journal it writes to.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Live nonces.
    pub fn len(&self) -> usize {
        self.book.len()
    }

    /// Whether no nonce is live.
    pub fn is_empty(&self) -> bool {
        self.book.is_empty()
    }
}

/// The journal's records of the replay stream, from everything recovered.
pub fn recovered(records: &[(Lsn, Vec<u8>)]) -> Vec<(Lsn, &[u8])> {
    records
        .iter()
        .filter_map(|(lsn, p)| match journal::split(p) {
            Some((Stream::Nonce, body)) => Some((*lsn, body)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use gw_core::replay::digest;

    use super::*;
    use crate::journal::Options;

    const NOW: u64 = 1_750_000_000;

    fn open(dir: &std::path::Path, now: u64) -> ReplayStore {
        let (j, rec) = Journal::open(dir, Options::default()).unwrap();
        ReplayStore::open(j, &recovered(&rec), Limits::default(), now).unwrap()
    }

    fn acc(req: &str) -> Accepted {
        Accepted {
            digest: digest(req.as_bytes()),
            request_id: req.into(),
        }
    }

    #[tokio::test]
    async fn survives_a_restart_in_any_order_until_the_nonce_expires() {
        let d = testkit::TempDir::new("replay-store");
        let s = parking_lot::Mutex::new(open(d.path(), NOW));
        for (n, req) in [(10, "a"), (8, "b"), (u64::MAX, "c")] {
            ReplayStore::accept(&s, "dashboard", n, NOW + 30, acc(req), NOW)
                .await
                .unwrap();
        }
        drop(s);
        let s = open(d.path(), NOW);
        assert_eq!(s.len(), 3);
        match s.check("dashboard", 8, NOW) {
            Err(Refused::Replay(a)) => assert_eq!(a.request_id, "b"),
            other => panic!("{other:?}"),
        }
        assert!(s.check("dashboard", 9, NOW).is_ok(), "never seen");
        // After the commands went stale, a restart forgets them.
        let s = open(d.path(), NOW + 31);
        assert!(s.is_empty());
    }

    #[test]
    fn a_nonce_whose_record_failed_is_not_accepted() {
        let d = testkit::TempDir::new("replay-closed");
        let s = open(d.path(), NOW);
        // The record never reached the journal: the guard does not know the nonce.
        let _ = ReplayStore::record("x", 1, NOW + 30, &acc("r"));
        assert!(s.check("x", 1, NOW).is_ok());
    }
}
