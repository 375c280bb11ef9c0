//! The authoritative replay guard: [`gw_core::replay::NonceBook`] kept durable in the
//! journal, so a restart never re-opens a nonce. An accepted nonce is in the same
//! journal transaction as the command's `accepted` row and the command itself (on
//! the bus): a nonce is never taken by a command that was not durably accepted. At
//! start the guard is rebuilt from the nonces that are still fresh, and judges
//! commands no earlier than the durable [`ClockFloor`]: the record of an expired
//! nonce leaves the journal only once the floor is past its expiry.

use std::collections::HashMap;

use gw_core::ledger::{Decision, Stage};
use gw_core::replay::{Digest, Limits, NonceBook, Refused, Seen};

use super::clock_floor::ClockFloor;
use crate::journal::txn::{NonceEntry, RefusedCommand};
use crate::journal::{self, Expiring, Journal, Lsn, Txn};

/// What an accepted nonce is remembered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The digest of the command's bytes (a resend of the same bytes is told apart
    /// from another command reusing the nonce).
    pub digest: Digest,
    /// The command's `request_id`.
    pub request_id: String,
    /// What the command asks ([`super::agent::what_of`]; `None` for a nonce
    /// accepted before it was kept).
    pub what: Option<Digest>,
    /// The `seq` of its `accepted` row in this node's chain (0 when not audited).
    pub seq: u64,
    /// Once its agent applied it: the `seq` of the `applied` row (0 when not
    /// audited).
    pub applied: Option<u64>,
    /// When this node's agent refused to apply it: the refusal's code.
    pub refused: Option<String>,
}

impl Accepted {
    /// What became of the command, as far as the guard knows: applied (the seq
    /// of its row), refused by this node's agent (the code), or nothing yet.
    pub fn decided(&self) -> Option<Result<u64, &str>> {
        match (self.applied, &self.refused) {
            (Some(seq), _) => Some(Ok(seq)),
            (None, Some(code)) => Some(Err(code)),
            (None, None) => None,
        }
    }
}

/// The replay guard.
pub struct ReplayStore {
    book: NonceBook<Accepted>,
    journal: Option<Journal>,
    /// Journal positions of the live nonces (to release what expired).
    positions: Expiring,
    /// No command is judged earlier; the records of nonces expiring before it
    /// may be gone.
    floor: ClockFloor,
}

const HOLD: &str = "replay";

impl ReplayStore {
    /// The guard with the fresh nonces of the journal's `records`, judging
    /// commands no earlier than `floor`.
    pub fn open(
        records: &[(Lsn, Txn)],
        limits: Limits,
        now: u64,
        floor: ClockFloor,
    ) -> ReplayStore {
        let mut book = NonceBook::new(limits);
        if let Some(f) = floor.get().checked_sub(1) {
            book.forgotten(f);
        }
        let mut s = ReplayStore {
            book,
            journal: None,
            positions: Expiring::default(),
            floor,
        };
        for (lsn, t) in records {
            s.record(*lsn, t, now);
        }
        s
    }

    /// The agent applied `(issuer, nonce)` asking `what`; its row is `seq`. The
    /// command accepted here under that nonce is marked applied only if it asks
    /// the same (either `what` unknown: taken for the same, as before it was
    /// kept): another command under the nonce was applied, not this one, whose
    /// own refusal (`replay`) is still to come.
    pub fn mark_applied(
        &mut self,
        issuer: &str,
        nonce: u64,
        seq: u64,
        what: Option<Digest>,
        now: u64,
    ) {
        if let Some(seen) = self.book.get(issuer, nonce, now) {
            if let (Some(mine), Some(theirs)) = (seen.value.what, what) {
                if mine != theirs {
                    return;
                }
            }
            let mut a = seen.value.clone();
            a.applied = Some(seq);
            a.refused = None;
            self.book.update(issuer, nonce, a);
        }
    }

    /// The module's agent (this node's, or another node's on the Kafka bus)
    /// refused the command of `(issuer, nonce)` with these bytes (`digest`) with
    /// `code` — unless it was applied (a later refusal of the same bytes, say
    /// once its nonce was forgotten, does not undo that).
    pub fn mark_refused(&mut self, r: &RefusedCommand, now: u64) {
        if let Some(seen) = self.book.get(&r.issuer, r.nonce, now) {
            if seen.value.digest != r.digest || seen.value.applied.is_some() {
                return;
            }
            let mut a = seen.value.clone();
            a.refused = Some(r.code.clone());
            self.book.update(&r.issuer, r.nonce, a);
        }
    }

    /// Lets the guard release what it no longer needs in `journal`.
    pub fn set_journal(&mut self, journal: Journal, now: u64) {
        self.journal = Some(journal);
        self.release(now);
    }

    /// Whether `(issuer, nonce)` would be accepted at `now` with `reserved` nonces
    /// per issuer admitted but not durable yet (what it was accepted with, if it
    /// was).
    pub fn check(
        &self,
        issuer: &str,
        nonce: u64,
        now: u64,
        reserved: &HashMap<String, usize>,
    ) -> Result<(), Refused<Accepted>> {
        self.book.check_reserved(issuer, nonce, now, reserved)
    }

    /// The time a command is judged at, the caller's clock reading `now`
    /// ([`NonceBook::clock`]), never before the durable floor.
    pub fn clock(&self, now: u64) -> u64 {
        self.book.clock(now).max(self.floor.get())
    }

    /// What `(issuer, nonce)` was accepted with, if it is live.
    pub fn get(&self, issuer: &str, nonce: u64, now: u64) -> Option<&Seen<Accepted>> {
        self.book.get(issuer, nonce, now)
    }

    /// Takes in what a durable transaction says: the nonces it accepted, the nonce
    /// its agent applied. Called for every transaction in LSN order (at start, and
    /// by [`ReplaySink`] on the journal's writer thread before the transaction's
    /// caller is answered), so the guard knows a nonce the moment it is durable —
    /// even when the request that sent it was cancelled — and an `applied` after
    /// its `accepted`. A durable nonce is always remembered, within the bounds or
    /// not: admission keeps the bounds, counting what it reserved; only bounds
    /// lowered across a restart leave the guard over them (and refusing every new
    /// nonce) until enough expire.
    pub fn record(&mut self, lsn: Lsn, t: &Txn, now: u64) {
        for e in &t.entries {
            match e {
                journal::Entry::Nonce(n) if n.expires >= now => {
                    let a = Accepted {
                        digest: n.digest,
                        request_id: n.request_id.clone(),
                        what: super::agent::what_parsed(n.what.as_deref()),
                        seq: accepted_seq(t),
                        applied: None,
                        refused: None,
                    };
                    self.book.remember(&n.issuer, n.nonce, n.expires, a, now);
                    self.positions.note(lsn, n.expires);
                }
                // Expired already (read back at start, or durable only after
                // its expiry): forgotten, and the guard's clock goes past it;
                // its record is let go like any other, once the floor is past
                // it.
                journal::Entry::Nonce(n) => {
                    self.book.forgotten(n.expires);
                    self.positions.note(lsn, n.expires);
                }
                _ => {}
            }
        }
        for (a, seq) in t.agent_entries() {
            if let Some(n) = &a.applied {
                let what = super::agent::what_parsed(n.what.as_deref());
                self.mark_applied(&n.issuer, n.nonce, seq, what, now);
            }
            if let Some(r) = &a.refused {
                self.mark_refused(r, now);
            }
        }
        self.release(now);
    }

    /// The journal entry that accepts `(issuer, nonce)` until `expires`: commit it
    /// (with the command's rows and the command); the journal's sink then records
    /// it here ([`Self::record`], through [`ReplaySink`]).
    pub fn entry(
        issuer: &str,
        nonce: u64,
        expires: u64,
        digest: Digest,
        request_id: &str,
        what: Option<Digest>,
    ) -> journal::Entry {
        journal::Entry::Nonce(NonceEntry {
            issuer: issuer.to_owned(),
            nonce,
            expires,
            digest,
            request_id: request_id.to_owned(),
            what: what.map(hex::encode),
        })
    }

    /// Lets the journal drop the records of nonces that expired, once the floor
    /// is past them.
    fn release(&mut self, now: u64) {
        self.floor.expire(&mut self.positions, now);
        let hold = self.positions.oldest().unwrap_or(Lsn::MAX);
        if let Some(j) = &self.journal {
            j.hold(HOLD, hold);
        }
    }

    /// The durable clock floor this guard keeps (the agents keep it too).
    pub fn floor(&self) -> ClockFloor {
        self.floor.clone()
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

/// The replay guard shared by admission and the journal's writer thread.
pub type SharedReplay = std::sync::Arc<parking_lot::Mutex<ReplayStore>>;

/// Feeds every durable transaction to the shared guard ([`ReplayStore::record`]).
pub struct ReplaySink(pub SharedReplay);

impl journal::Sink for ReplaySink {
    fn committed(&self, lsn: Lsn, txn: &Txn) {
        self.0.lock().record(lsn, txn, crate::now_secs());
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

#[cfg(test)]
mod tests {
    use gw_core::replay::digest;

    use super::*;
    use crate::journal::Options;

    const NOW: u64 = 1_750_000_000;

    fn open(dir: &std::path::Path, now: u64) -> (SharedReplay, Journal) {
        open_with(dir, now, Options::default())
    }

    /// The guard over the journal in `dir` (with `opts`), started as the
    /// sidecar starts it: its floor in `dir`, the start's hold let go.
    fn open_with(dir: &std::path::Path, now: u64, opts: Options) -> (SharedReplay, Journal) {
        let opened = Journal::open(dir, opts).unwrap();
        let floor = ClockFloor::in_dir(dir).unwrap();
        let s = std::sync::Arc::new(parking_lot::Mutex::new(ReplayStore::open(
            &opened.records,
            Limits::default(),
            now,
            floor,
        )));
        let j = opened
            .start(None, vec![std::sync::Arc::new(ReplaySink(s.clone()))])
            .unwrap();
        j.hold(journal::STARTUP_HOLD, Lsn::MAX);
        s.lock().set_journal(j.clone(), now);
        (s, j)
    }

    #[tokio::test]
    async fn survives_a_restart_in_any_order_until_the_nonce_expires() {
        // The journal's sink reads the clock: so does this test.
        let now = crate::now_secs();
        let d = testkit::TempDir::new("replay-store");
        let (s, j) = open(d.path(), now);
        for (n, req) in [(10, "a"), (8, "b"), (u64::MAX, "c")] {
            let dg = digest(req.as_bytes());
            let e = ReplayStore::entry("dashboard", n, now + 30, dg, req, None);
            j.commit(Txn::of(vec![e])).await.unwrap();
            // Known the moment it is durable (the sink ran before the answer).
            let a = s.lock().get("dashboard", n, now).map(|x| x.value.clone());
            assert_eq!(a.map(|a| a.request_id), Some(req.to_owned()));
        }
        // A journal has one writer: the old one ends before the directory reopens.
        j.stop();
        drop((s, j));
        let (s, _j) = open(d.path(), now);
        assert_eq!(s.lock().len(), 3);
        match s.lock().check("dashboard", 8, now, &HashMap::new()) {
            Err(Refused::Replay(a)) => assert_eq!(a.request_id, "b"),
            other => panic!("{other:?}"),
        }
        assert!(
            s.lock().check("dashboard", 9, now, &HashMap::new()).is_ok(),
            "never seen"
        );
        _j.stop();
        drop((s, _j));
        // After the commands went stale, a restart forgets them.
        let (s, _j) = open(d.path(), now + 31);
        assert!(s.lock().is_empty());
    }

    /// The record of a forgotten nonce leaves the journal only once the clock
    /// floor is past its expiry, so a restart whose clock reads earlier (stepped
    /// back) still judges the command stale: before the floor, the record was
    /// gone and the command fresh and unknown — a replay.
    #[tokio::test]
    async fn a_forgotten_nonce_stays_stale_across_a_restart_with_the_clock_stepped_back() {
        let d = testkit::TempDir::new("replay-floor");
        // One record per segment: a record no owner holds is deleted.
        let opts = Options {
            segment_bytes: 64,
            ..Options::default()
        };
        let now = crate::now_secs();
        let start = |now| open_with(d.path(), now, opts);
        let (s, j) = start(now);
        // Fresh until the end of this second (the sink reads the real clock).
        let expires = now;
        let e = ReplayStore::entry("dashboard", 7, expires, digest(b"seven"), "r7", None);
        j.commit(Txn::of(vec![e])).await.unwrap();
        while crate::now_secs() <= expires {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Later commands: the guard lets the expired nonce's record go.
        for n in 100..103u64 {
            let e = ReplayStore::entry(
                "dashboard",
                n,
                expires + 600,
                digest(&n.to_le_bytes()),
                "r",
                None,
            );
            j.commit(Txn::of(vec![e])).await.unwrap();
        }
        assert_eq!(s.lock().floor().get(), expires + 1);
        j.stop();
        drop((s, j));
        let records = Journal::open(d.path(), opts).unwrap().records;
        let holds_seven = |r: &[(Lsn, Txn)]| {
            r.iter().any(|(_, t)| {
                t.entries
                    .iter()
                    .any(|e| matches!(e, journal::Entry::Nonce(n) if n.nonce == 7))
            })
        };
        assert!(!holds_seven(&records), "the record of nonce 7 is gone");
        // The restart's clock reads 100 s before the nonce's expiry.
        let stepped_back = expires - 100;
        let (s, j) = start(stepped_back);
        assert!(s.lock().get("dashboard", 7, stepped_back).is_none());
        assert_eq!(
            s.lock().clock(stepped_back),
            expires + 1,
            "judged past the forgotten nonce's expiry: its command is stale"
        );
        j.stop();
    }

    /// A nonce already expired when its record is read back (or made durable
    /// only after its expiry) is forgotten, and the guard's clock goes past it:
    /// a command under it, judged at an earlier reading of the clock (the clock
    /// stepped back across the restart's read), is stale. Its record is let go
    /// like any other: once the floor is past it. A floor less than a step
    /// behind is written at once when the expiry is a step old: a quiet spell
    /// does not hold the record back for good.
    #[test]
    fn a_nonce_read_back_expired_moves_the_clock_and_goes_only_behind_the_floor() {
        let (_d, floor) = super::super::clock_floor::scratch();
        // A nonce forgotten 2 s before the one below.
        floor.cover(NOW - 7, true);
        let records = vec![(
            1,
            Txn::of(vec![ReplayStore::entry(
                "dashboard",
                1,
                NOW - 5,
                digest(b"one"),
                "r",
                None,
            )]),
        )];
        let mut s = ReplayStore::open(&records, Limits::default(), NOW, floor.clone());
        assert!(s.get("dashboard", 1, NOW - 10).is_none());
        assert_eq!(s.clock(NOW - 10), NOW - 4);
        assert_eq!(s.clock(NOW), NOW);
        assert_eq!(floor.get(), NOW - 7, "less than a step behind");
        assert_eq!(s.positions.oldest(), Some(1), "so the record is kept");
        s.record(2, &Txn::of(Vec::new()), NOW + 5);
        assert_eq!(floor.get(), NOW - 4, "its expiry a step old: written");
        assert_eq!(s.positions.oldest(), None, "and the record let go");
    }

    /// What this node's agent refused is known to the guard from the journal (a
    /// resend, or a request that missed the agent's answer, is told the refusal,
    /// not "not applied yet"), across a restart; only for the bytes accepted, and
    /// never over an application.
    #[test]
    fn the_guard_learns_a_refusal_from_the_journal() {
        use crate::journal::txn::{AgentEntry, RefusedCommand};
        let agent = |nonce: u64, bytes: &[u8], code: &str| {
            journal::Entry::Agent(AgentEntry {
                module: gw_core::Module::Mev,
                offset: None,
                kafka: None,
                state: None,
                applied: None,
                refused: Some(RefusedCommand {
                    issuer: "dashboard".into(),
                    nonce,
                    digest: digest(bytes),
                    code: code.into(),
                }),
                generation: None,
            })
        };
        let accepted = |n: u64, bytes: &[u8]| {
            Txn::of(vec![ReplayStore::entry(
                "dashboard",
                n,
                NOW + 30,
                digest(bytes),
                "r",
                None,
            )])
        };
        let records = vec![
            (1, accepted(1, b"one")),
            (2, accepted(2, b"two")),
            (3, accepted(3, b"three")),
            (4, Txn::of(vec![agent(1, b"one", "key_expired")])),
            // Other bytes under nonce 2: not the command accepted.
            (5, Txn::of(vec![agent(2, b"other", "bad_signature")])),
        ];
        let (_d, floor) = super::super::clock_floor::scratch();
        let mut s = ReplayStore::open(&records, Limits::default(), NOW, floor);
        let refused =
            |s: &ReplayStore, n| s.get("dashboard", n, NOW).unwrap().value.refused.clone();
        assert_eq!(refused(&s, 1).as_deref(), Some("key_expired"));
        assert_eq!(refused(&s, 2), None);
        // Applied after all (another node's agent, say): applied it is, and a later
        // refusal of the same bytes does not undo that.
        s.mark_applied("dashboard", 1, 7, None, NOW);
        s.record(6, &Txn::of(vec![agent(1, b"one", "replay")]), NOW);
        s.mark_applied("dashboard", 3, 8, None, NOW);
        s.record(7, &Txn::of(vec![agent(3, b"three", "replay")]), NOW);
        let got = |n| s.get("dashboard", n, NOW).unwrap().value.clone();
        assert_eq!((got(1).applied, got(1).refused), (Some(7), None));
        assert_eq!((got(3).applied, got(3).refused), (Some(8), None));
    }

    /// Another command applied under a nonce (another node signed it for the
    /// same idempotency key, say) does not make the one accepted here applied:
    /// its own refusal (`replay`) is what a resend is told.
    #[test]
    fn an_applied_other_command_under_the_nonce_is_not_this_ones() {
        let (x, y) = ([1u8; 16], [2u8; 16]);
        let e = ReplayStore::entry("dashboard", 1, NOW + 30, digest(b"y"), "r-y", Some(y));
        let (_d, floor) = super::super::clock_floor::scratch();
        let mut s = ReplayStore::open(&[(1, Txn::of(vec![e]))], Limits::default(), NOW, floor);
        let decided = |s: &ReplayStore| {
            let v = &s.get("dashboard", 1, NOW).unwrap().value;
            v.decided().map(|r| r.map_err(str::to_owned))
        };
        s.mark_applied("dashboard", 1, 9, Some(x), NOW);
        assert_eq!(decided(&s), None, "x was applied, not y");
        s.mark_refused(
            &RefusedCommand {
                issuer: "dashboard".into(),
                nonce: 1,
                digest: digest(b"y"),
                code: "replay".into(),
            },
            NOW,
        );
        assert_eq!(decided(&s), Some(Err("replay".to_owned())));
        // Its own applied (or one whose `what` is not known) is.
        let e = ReplayStore::entry("dashboard", 2, NOW + 30, digest(b"z"), "r-z", Some(y));
        s.record(2, &Txn::of(vec![e]), NOW);
        s.mark_applied("dashboard", 2, 10, Some(y), NOW);
        assert_eq!(s.get("dashboard", 2, NOW).unwrap().value.applied, Some(10));
    }

    #[test]
    fn a_nonce_whose_entry_was_not_committed_is_not_accepted() {
        let d = testkit::TempDir::new("replay-closed");
        let (s, _j) = open(d.path(), NOW);
        // The entry never reached the journal: the guard does not know the nonce.
        let _ = ReplayStore::entry("x", 1, NOW + 30, digest(b"r"), "r", None);
        assert!(s.lock().check("x", 1, NOW, &HashMap::new()).is_ok());
    }

    #[tokio::test]
    async fn a_durable_nonce_is_remembered_when_the_guard_is_over_its_bounds() {
        // Bounds lowered across a restart: the journal holds more fresh nonces of
        // the issuer than the guard may keep. Every one is remembered (a resend is
        // a replay), and new ones are refused until enough expire.
        let now = crate::now_secs();
        let d = testkit::TempDir::new("replay-over");
        let (s, j) = open(d.path(), now);
        for n in 0..70u64 {
            let e = ReplayStore::entry(
                "dashboard",
                n,
                now + 30,
                digest(&n.to_le_bytes()),
                "r",
                None,
            );
            j.commit(Txn::of(vec![e])).await.unwrap();
        }
        // A journal has one writer: the old one ends before the directory reopens.
        j.stop();
        drop((s, j));
        let opened = Journal::open(d.path(), Options::default()).unwrap();
        let low = Limits {
            max_per_issuer: 64,
            max_issuers: 1,
        };
        let s = ReplayStore::open(
            &opened.records,
            low,
            now,
            ClockFloor::in_dir(d.path()).unwrap(),
        );
        assert_eq!(s.len(), 70);
        let none = HashMap::new();
        for n in [0, 63, 64, 69] {
            assert!(
                matches!(s.check("dashboard", n, now, &none), Err(Refused::Replay(_))),
                "nonce {n}"
            );
        }
        assert!(matches!(
            s.check("dashboard", 70, now, &none),
            Err(Refused::IssuerFull)
        ));
        assert!(matches!(
            s.check("other", 1, now, &none),
            Err(Refused::TooManyIssuers)
        ));
        assert!(s.check("dashboard", 70, now + 31, &none).is_ok());
    }
}
