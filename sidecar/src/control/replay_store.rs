//! The authoritative replay guard: [`gw_core::replay::NonceBook`] kept durable in the
//! journal, so a restart never re-opens a nonce. An accepted nonce is in the same
//! journal transaction as the command's `accepted` row and the command itself (on
//! the bus): a nonce is never taken by a command that was not durably accepted. At
//! start the guard is rebuilt from the nonces that are still fresh.

use std::collections::BTreeMap;

use gw_core::ledger::{Decision, Stage};
use gw_core::replay::{Digest, Limits, NonceBook, Refused, Seen};
use gw_core::Reject;

use crate::journal::txn::NonceEntry;
use crate::journal::{self, Journal, JournalError, Lsn, Txn};

/// What an accepted nonce is remembered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The digest of the command's bytes (a resend of the same bytes is told apart
    /// from another command reusing the nonce).
    pub digest: Digest,
    /// The command's `request_id`.
    pub request_id: String,
    /// The `seq` of its `accepted` row in this node's chain (0 when not audited).
    pub seq: u64,
    /// Once its agent applied it: the `seq` of the `applied` row (0 when not
    /// audited).
    pub applied: Option<u64>,
}

/// Why the guard could not record a nonce.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The journal refused the write (the nonce is not accepted).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A recovered record does not make sense.
    #[error("journal: {0}")]
    Corrupt(String),
    /// The guard is full or saw the nonce meanwhile.
    #[error("{0}")]
    Refused(Reject),
}

/// The replay guard.
pub struct ReplayStore {
    book: NonceBook<Accepted>,
    journal: Option<Journal>,
    /// Journal positions of the live nonces (to release what expired).
    positions: BTreeMap<Lsn, u64>,
}

const HOLD: &str = "replay";

impl ReplayStore {
    /// The guard with the fresh nonces of the journal's `records`.
    pub fn open(records: &[(Lsn, Txn)], limits: Limits, now: u64) -> ReplayStore {
        let mut s = ReplayStore {
            book: NonceBook::new(limits),
            journal: None,
            positions: BTreeMap::new(),
        };
        for (lsn, t) in records {
            let seq = accepted_seq(t);
            for e in &t.entries {
                let journal::Entry::Nonce(n) = e else {
                    continue;
                };
                if n.expires < now {
                    continue;
                }
                // A guard at its bound after a restart keeps what it had: never
                // refuse what was accepted before.
                let _ = s.book.insert(
                    &n.issuer,
                    n.nonce,
                    n.expires,
                    Accepted {
                        digest: n.digest,
                        request_id: n.request_id.clone(),
                        seq,
                        applied: None,
                    },
                    now,
                );
                s.positions.insert(*lsn, n.expires);
            }
        }
        // What the agents applied of them.
        for (_, t) in records {
            for e in &t.entries {
                if let journal::Entry::Agent(a) = e {
                    if let Some(n) = &a.applied {
                        s.mark_applied(&n.issuer, n.nonce, applied_seq(t), now);
                    }
                }
            }
        }
        s
    }

    /// The agent applied `(issuer, nonce)`; its row is `seq`.
    pub fn mark_applied(&mut self, issuer: &str, nonce: u64, seq: u64, now: u64) {
        if let Some(seen) = self.book.get(issuer, nonce, now) {
            let mut a = seen.value.clone();
            a.applied = Some(seq);
            self.book.update(issuer, nonce, a);
        }
    }

    /// Lets the guard release what it no longer needs in `journal`.
    pub fn set_journal(&mut self, journal: Journal, now: u64) {
        self.journal = Some(journal);
        self.release(now);
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

    /// The journal entry that accepts `(issuer, nonce)` until `expires`: commit it
    /// (with the command's rows and the command), then [`Self::accepted`].
    pub fn entry(
        issuer: &str,
        nonce: u64,
        expires: u64,
        digest: Digest,
        request_id: &str,
    ) -> journal::Entry {
        journal::Entry::Nonce(NonceEntry {
            issuer: issuer.to_owned(),
            nonce,
            expires,
            digest,
            request_id: request_id.to_owned(),
        })
    }

    /// Takes a nonce whose entry is durable at `lsn` into the guard.
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

    /// Lets the journal drop the records of nonces that expired.
    fn release(&mut self, now: u64) {
        self.positions.retain(|_, exp| *exp >= now);
        let hold = self.positions.keys().next().copied().unwrap_or(Lsn::MAX);
        if let Some(j) = &self.journal {
            j.hold(HOLD, hold);
        }
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

/// The seq of the row of `stage` and `decision` in a transaction (0 when none).
fn row_seq(t: &Txn, stage: Stage, decision: Decision) -> u64 {
    t.entries
        .iter()
        .find_map(|e| match e {
            journal::Entry::Row(r)
                if r.stage == stage.as_str() && r.decision == decision.as_str() =>
            {
                Some(r.seq)
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// The seq of the sidecar's `accepted` row in a transaction (0 when none).
fn accepted_seq(t: &Txn) -> u64 {
    row_seq(t, Stage::Sidecar, Decision::Accepted)
}

/// The seq of the agent's `applied` row in a transaction (0 when none).
pub fn applied_seq(t: &Txn) -> u64 {
    row_seq(t, Stage::Agent, Decision::Applied)
}

#[cfg(test)]
mod tests {
    use gw_core::replay::digest;

    use super::*;
    use crate::journal::Options;

    const NOW: u64 = 1_750_000_000;

    fn open(dir: &std::path::Path, now: u64) -> (ReplayStore, Journal) {
        let opened = Journal::open(dir, Options::default()).unwrap();
        let mut s = ReplayStore::open(&opened.records, Limits::default(), now);
        let j = opened.start(None, Vec::new()).unwrap();
        s.set_journal(j.clone(), now);
        (s, j)
    }

    #[tokio::test]
    async fn survives_a_restart_in_any_order_until_the_nonce_expires() {
        let d = testkit::TempDir::new("replay-store");
        let (mut s, j) = open(d.path(), NOW);
        for (n, req) in [(10, "a"), (8, "b"), (u64::MAX, "c")] {
            let dg = digest(req.as_bytes());
            let e = ReplayStore::entry("dashboard", n, NOW + 30, dg, req);
            let c = j.commit(Txn::of(vec![e])).await.unwrap();
            let acc = Accepted {
                digest: dg,
                request_id: req.into(),
                seq: 0,
                applied: None,
            };
            s.accepted(c.lsn, "dashboard", n, NOW + 30, acc, NOW)
                .unwrap();
        }
        drop((s, j));
        let (s, _j) = open(d.path(), NOW);
        assert_eq!(s.len(), 3);
        match s.check("dashboard", 8, NOW) {
            Err(Refused::Replay(a)) => assert_eq!(a.request_id, "b"),
            other => panic!("{other:?}"),
        }
        assert!(s.check("dashboard", 9, NOW).is_ok(), "never seen");
        drop((s, _j));
        // After the commands went stale, a restart forgets them.
        let (s, _j) = open(d.path(), NOW + 31);
        assert!(s.is_empty());
    }

    #[test]
    fn a_nonce_whose_entry_was_not_committed_is_not_accepted() {
        let d = testkit::TempDir::new("replay-closed");
        let (s, _j) = open(d.path(), NOW);
        // The entry never reached the journal: the guard does not know the nonce.
        let _ = ReplayStore::entry("x", 1, NOW + 30, digest(b"r"), "r");
        assert!(s.check("x", 1, NOW).is_ok());
    }
}
