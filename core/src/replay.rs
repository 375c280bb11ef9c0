//! Replay protection: per issuer, a nonce is accepted once while its command is
//! fresh, in any order.
//!
//! Nonces are opaque unique values (gwctl uses nanoseconds). Each accepted
//! `(issuer, nonce)` is remembered until its command's `ts + max_skew` has passed —
//! after that freshness refuses the command anyway — and then forgotten. There is no
//! high-water mark and no count window: two commands signed milliseconds apart and
//! delivered in the other order both apply, and one command with a huge nonce
//! changes nothing for the next ones. Memory is bounded: at most
//! [`Limits::max_per_issuer`] live nonces per issuer and [`Limits::max_issuers`]
//! issuers; beyond that a fresh command is refused with `replay_capacity` (429), never
//! remembered without bound.
//!
//! Two forms of the same rule: [`NonceBook`] (the sidecar's authoritative guard,
//! made durable by its journal) and [`Shard`] (the edge's copy in proxy-wasm shared
//! data: an issuer's nonces spread over [`SHARDS`] values, each updated with
//! compare-and-swap). Both remember a digest of the command's bytes, so a resend of
//! the same bytes is told apart from a different command reusing a nonce.

use std::collections::{BTreeSet, HashMap};

use crate::code::{Code, Reject};

/// Default bound on live nonces per issuer (about 1 000 commands a second for the
/// default freshness window of ±30 s, with room to spare).
pub const DEFAULT_MAX_PER_ISSUER: usize = 1 << 18;
/// Default bound on issuers with live nonces.
pub const DEFAULT_MAX_ISSUERS: usize = 4096;
/// Shards of one issuer's nonces at the edge.
pub const SHARDS: u64 = 64;

/// How much a replay guard may remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Live nonces per issuer.
    pub max_per_issuer: usize,
    /// Issuers with live nonces.
    pub max_issuers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_per_issuer: DEFAULT_MAX_PER_ISSUER,
            max_issuers: DEFAULT_MAX_ISSUERS,
        }
    }
}

impl Limits {
    /// Checks the bounds: each at least one, per issuer a multiple of [`SHARDS`]
    /// (so the edge's shards split it evenly) and at most 2^24.
    pub fn validate(&self) -> Result<(), String> {
        let per = self.max_per_issuer;
        if per == 0 || per > 1 << 24 || !(per as u64).is_multiple_of(SHARDS) {
            return Err(format!(
                "replay max_per_issuer must be a multiple of {SHARDS} within {SHARDS}..=16777216, got {per}"
            ));
        }
        if self.max_issuers == 0 || self.max_issuers > 1 << 20 {
            return Err(format!(
                "replay max_issuers must be within 1..=1048576, got {}",
                self.max_issuers
            ));
        }
        Ok(())
    }

    /// Live nonces per edge shard.
    pub fn per_shard(&self) -> usize {
        self.max_per_issuer / SHARDS as usize
    }
}

/// Until when a command's nonce must be remembered: `ts + max_skew` (unix seconds).
pub fn expiry(ts: u64, max_skew: u64) -> u64 {
    ts.saturating_add(max_skew)
}

/// A digest of a command's bytes, to tell a resend from a different command.
pub type Digest = [u8; 16];

/// The digest of `body`.
pub fn digest(body: &[u8]) -> Digest {
    use sha2::{Digest as _, Sha256};
    let h = Sha256::digest(body);
    let mut d = [0u8; 16];
    d.copy_from_slice(&h[..16]);
    d
}

/// Why a nonce was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused<V> {
    /// Seen before, while still fresh; what it was remembered with.
    Replay(V),
    /// The issuer already has the most live nonces it may have.
    IssuerFull,
    /// The guard already remembers the most issuers it may.
    TooManyIssuers,
}

impl<V> Refused<V> {
    /// The rejection a gateway answers with (`what` describes the nonce).
    pub fn reject(&self, issuer: &str, nonce: u64) -> Reject {
        match self {
            Refused::Replay(_) => Reject::with(
                Code::Replay,
                format!(
                    "nonce {nonce} of issuer `{}` was already used",
                    issuer.escape_debug()
                ),
            ),
            Refused::IssuerFull => Reject::with(
                Code::ReplayCapacity,
                format!(
                    "issuer `{}` has the most fresh commands the replay guard keeps; retry shortly",
                    issuer.escape_debug()
                ),
            ),
            Refused::TooManyIssuers => Reject::new(
                Code::ReplayCapacity,
                "the replay guard keeps the most issuers it may; retry shortly",
            ),
        }
    }
}

/// One remembered nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen<V> {
    /// Unix seconds after which it is forgotten.
    pub expires: u64,
    /// What it is remembered with.
    pub value: V,
}

#[derive(Debug, Clone)]
struct IssuerNonces<V> {
    seen: HashMap<u64, Seen<V>>,
    by_expiry: BTreeSet<(u64, u64)>,
}

impl<V> Default for IssuerNonces<V> {
    fn default() -> Self {
        IssuerNonces {
            seen: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }
}

impl<V> IssuerNonces<V> {
    /// Nonces still live at `now` (expiring at `now` or later).
    fn live(&self, now: u64) -> usize {
        self.seen.len() - self.by_expiry.range(..(now, 0)).count()
    }

    /// Whether any nonce is live at `now` (the latest expiry is not past).
    fn any_live(&self, now: u64) -> bool {
        self.by_expiry.last().is_some_and(|&(e, _)| e >= now)
    }

    /// Forgets what expired before `now`; the latest expiry forgotten.
    fn prune(&mut self, now: u64) -> Option<u64> {
        let mut latest = None;
        while let Some(&(exp, nonce)) = self.by_expiry.first() {
            if exp >= now {
                break;
            }
            self.by_expiry.pop_first();
            self.seen.remove(&nonce);
            latest = Some(exp);
        }
        latest
    }
}

/// Every issuer's live nonces (the sidecar's guard). `V` is what a nonce is
/// remembered with (the command's digest, where it is in the ledger, …).
#[derive(Debug, Clone)]
pub struct NonceBook<V> {
    limits: Limits,
    issuers: HashMap<String, IssuerNonces<V>>,
    len: usize,
    /// Just past the latest expiry of a nonce the book forgot: a command
    /// expiring before it may have been forgotten, so commands are judged no
    /// earlier than it ([`Self::clock`]).
    high: u64,
}

impl<V: Clone> NonceBook<V> {
    /// An empty book bounded by `limits`.
    pub fn new(limits: Limits) -> NonceBook<V> {
        NonceBook {
            limits,
            issuers: HashMap::new(),
            len: 0,
            high: 0,
        }
    }

    /// The time to judge a command at, the caller's clock reading `now`: never
    /// earlier than just past the latest expiry of a nonce the book forgot. Judged
    /// at a reading before that (another caller read its clock a moment earlier,
    /// or the wall clock was stepped back) the forgotten command would be fresh
    /// and unknown — a replay let through; judged at this time, it is stale. Only
    /// expiries move it, never a clock reading itself: a clock that jumped ahead
    /// and came back holds commands back only as long as the nonces it made the
    /// book forget were fresh.
    pub fn clock(&self, now: u64) -> u64 {
        now.max(self.high)
    }

    fn forgot(&mut self, latest_expiry: Option<u64>) {
        if let Some(e) = latest_expiry {
            self.high = self.high.max(e.saturating_add(1));
        }
    }

    /// A nonce expiring at `expires` was dropped without the book holding it
    /// (already expired when a record of it was read back, or left out of a
    /// state loaded from elsewhere): [`Self::clock`] goes past it all the same.
    pub fn forgotten(&mut self, expires: u64) {
        self.forgot(Some(expires));
    }

    /// The bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// What `(issuer, nonce)` is remembered with, if it is live at `now`.
    pub fn get(&self, issuer: &str, nonce: u64, now: u64) -> Option<&Seen<V>> {
        self.issuers
            .get(issuer)?
            .seen
            .get(&nonce)
            .filter(|s| s.expires >= now)
    }

    /// Whether `(issuer, nonce)` would be accepted at `now`.
    pub fn check(&self, issuer: &str, nonce: u64, now: u64) -> Result<(), Refused<V>> {
        self.check_reserved(issuer, nonce, now, &HashMap::new())
    }

    /// Whether `(issuer, nonce)` would be accepted at `now` while `reserved` nonces
    /// (per issuer) were accepted but are not in the book yet — a guard whose
    /// nonces become durable after the decision counts them, so that requests
    /// decided together cannot take it past its bounds between them.
    pub fn check_reserved(
        &self,
        issuer: &str,
        nonce: u64,
        now: u64,
        reserved: &HashMap<String, usize>,
    ) -> Result<(), Refused<V>> {
        if let Some(s) = self.get(issuer, nonce, now) {
            return Err(Refused::Replay(s.value.clone()));
        }
        let held = reserved.get(issuer).copied().unwrap_or(0);
        let live = self.issuers.get(issuer).map_or(0, |i| i.live(now));
        if live.saturating_add(held) >= self.limits.max_per_issuer {
            return Err(Refused::IssuerFull);
        }
        if held == 0 && live == 0 {
            // A new issuer: the book's live issuers and those only reserved. The
            // book's issuers are counted one by one (some may have expired) only
            // when all of them, live or not, would not leave room.
            let only_reserved = reserved
                .iter()
                .filter(|(k, n)| **n > 0 && !self.issuers.get(*k).is_some_and(|i| i.any_live(now)))
                .count();
            let room =
                |issuers: usize| issuers.saturating_add(only_reserved) < self.limits.max_issuers;
            if !room(self.issuers.len())
                && !room(self.issuers.values().filter(|i| i.any_live(now)).count())
            {
                return Err(Refused::TooManyIssuers);
            }
        }
        Ok(())
    }

    /// Accepts `(issuer, nonce)` once: remembered with `value` until `expires`.
    /// Forgets what expired before `now` first.
    pub fn insert(
        &mut self,
        issuer: &str,
        nonce: u64,
        expires: u64,
        value: V,
        now: u64,
    ) -> Result<(), Refused<V>> {
        if !self.issuers.contains_key(issuer) && self.issuers.len() >= self.limits.max_issuers {
            self.prune(now);
        }
        self.check(issuer, nonce, now)?;
        self.prune_issuer(issuer, now);
        let i = self.issuers.entry(issuer.to_owned()).or_default();
        if let Some(old) = i.seen.insert(nonce, Seen { expires, value }) {
            // Only an expired entry can be here (check refused a live one).
            i.by_expiry.remove(&(old.expires, nonce));
            self.len -= 1;
        }
        i.by_expiry.insert((expires, nonce));
        self.len += 1;
        Ok(())
    }

    /// Remembers `(issuer, nonce)` with `value` until `expires`, within the bounds or
    /// not: for a nonce that is already a durable fact (accepted in the journal,
    /// applied by an agent), which forgetting would open to a replay. The bounds are
    /// kept by whoever decides to accept ([`Self::check_reserved`]); past them (the
    /// bounds lowered across a restart), the book is over them until its nonces
    /// expire and every new one is refused meanwhile. A nonce already live keeps the
    /// later expiry and takes `value`. Forgets what expired before `now` first.
    pub fn remember(&mut self, issuer: &str, nonce: u64, expires: u64, value: V, now: u64) {
        // An issuer's own nonces are pruned as it sends more; those of issuers
        // that went quiet only here: without it the book kept every issuer it
        // ever saw, and a new issuer's check scanned them all.
        if !self.issuers.contains_key(issuer) && self.issuers.len() >= self.limits.max_issuers {
            self.prune(now);
        }
        self.prune_issuer(issuer, now);
        let i = self.issuers.entry(issuer.to_owned()).or_default();
        let expires = match i.seen.remove(&nonce) {
            Some(old) => {
                i.by_expiry.remove(&(old.expires, nonce));
                self.len -= 1;
                expires.max(old.expires)
            }
            None => expires,
        };
        i.seen.insert(nonce, Seen { expires, value });
        i.by_expiry.insert((expires, nonce));
        self.len += 1;
    }

    /// Forgets `(issuer, nonce)` (a command whose acceptance was not made durable).
    pub fn remove(&mut self, issuer: &str, nonce: u64) -> Option<Seen<V>> {
        let i = self.issuers.get_mut(issuer)?;
        let s = i.seen.remove(&nonce)?;
        i.by_expiry.remove(&(s.expires, nonce));
        self.len -= 1;
        if i.seen.is_empty() {
            self.issuers.remove(issuer);
        }
        Some(s)
    }

    /// Replaces what a live nonce is remembered with; `false` when it is not there.
    pub fn update(&mut self, issuer: &str, nonce: u64, value: V) -> bool {
        match self
            .issuers
            .get_mut(issuer)
            .and_then(|i| i.seen.get_mut(&nonce))
        {
            Some(s) => {
                s.value = value;
                true
            }
            None => false,
        }
    }

    /// Forgets everything that expired before `now`.
    pub fn prune(&mut self, now: u64) {
        let mut len = 0;
        let mut latest = None;
        self.issuers.retain(|_, i| {
            latest = latest.max(i.prune(now));
            len += i.seen.len();
            !i.seen.is_empty()
        });
        self.len = len;
        self.forgot(latest);
    }

    /// [`Self::remember`], beyond the bounds by as much again at most: while the
    /// issuer holds fewer than twice `max_per_issuer` nonces and, for a new
    /// issuer, fewer than twice `max_issuers` issuers are held. For durable facts
    /// that their caller lets past the bounds for a reason of its own (an
    /// agent's stop or kill), so that the book stays bounded. Whether it was
    /// remembered.
    pub fn remember_within_twice(
        &mut self,
        issuer: &str,
        nonce: u64,
        expires: u64,
        value: V,
        now: u64,
    ) -> bool {
        let twice = |n: usize| n.saturating_mul(2);
        // What expired makes room first (counted, it left none).
        if self.issuers.contains_key(issuer) {
            self.prune_issuer(issuer, now);
        } else if self.issuers.len() >= twice(self.limits.max_issuers) {
            self.prune(now);
        }
        let room = match self.issuers.get(issuer) {
            Some(i) => i.seen.len() < twice(self.limits.max_per_issuer),
            None => self.issuers.len() < twice(self.limits.max_issuers),
        };
        if room {
            self.remember(issuer, nonce, expires, value, now);
        }
        room
    }

    /// Forgets what of `issuer`'s nonces expired before `now` (an issuer not
    /// held: nothing).
    fn prune_issuer(&mut self, issuer: &str, now: u64) {
        if let Some(i) = self.issuers.get_mut(issuer) {
            let before = i.seen.len();
            let forgot = i.prune(now);
            self.len -= before - i.seen.len();
            self.forgot(forgot);
        }
    }

    /// Live nonces (not yet pruned ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every remembered nonce: `(issuer, nonce, seen)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64, &Seen<V>)> {
        self.issuers
            .iter()
            .flat_map(|(issuer, i)| i.seen.iter().map(move |(n, s)| (issuer.as_str(), *n, s)))
    }
}

/// Bytes of one entry of a [`Shard`]: nonce (8), expiry (4, unix seconds), digest (8).
pub const SHARD_ENTRY_BYTES: usize = 20;

/// Seconds a [`Shard`] keeps an entry past its expiry. Each worker prunes at its
/// own clock reading, and a shard holds no mark of what it forgot: a request
/// that read the clock at the last second of its command's freshness, while
/// another worker (one second on) dropped the nonce, found it gone and took a
/// replay for fresh. Kept this long, the entry outlives any request's time
/// between reading the clock and writing the shard (and a wall clock stepped
/// back as far). Such entries do not count against the shard's bound.
pub const SHARD_GRACE_SECS: u64 = 10;

/// The shard of an issuer's nonces a nonce belongs to.
pub fn shard_of(nonce: u64) -> u64 {
    // Mixed so that nonces with regular low bits (counters, nanoseconds) spread.
    nonce.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58
}

/// What the edge remembers of one nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardEntry {
    /// The nonce.
    pub nonce: u64,
    /// Unix seconds after which it is forgotten.
    pub expires: u32,
    /// The first bytes of the command's digest.
    pub digest: [u8; 8],
}

/// One shard of an issuer's nonces at the edge, as stored in shared data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shard {
    entries: Vec<ShardEntry>,
}

/// What accepting a nonce into a shard found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardOutcome {
    /// Not seen: now remembered.
    Fresh,
    /// Seen with the same digest: a resend of the same bytes (the sidecar, which
    /// knows whether it was applied, answers it).
    Resend,
}

impl Shard {
    /// Parses a stored shard; `None` when the bytes are not one.
    pub fn from_bytes(b: &[u8]) -> Option<Shard> {
        if !b.len().is_multiple_of(SHARD_ENTRY_BYTES) {
            return None;
        }
        let entries = b
            .chunks_exact(SHARD_ENTRY_BYTES)
            .map(|c| {
                let mut n = [0u8; 8];
                n.copy_from_slice(&c[..8]);
                let mut e = [0u8; 4];
                e.copy_from_slice(&c[8..12]);
                let mut d = [0u8; 8];
                d.copy_from_slice(&c[12..20]);
                ShardEntry {
                    nonce: u64::from_le_bytes(n),
                    expires: u32::from_le_bytes(e),
                    digest: d,
                }
            })
            .collect();
        Some(Shard { entries })
    }

    /// The stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * SHARD_ENTRY_BYTES);
        for e in &self.entries {
            out.extend_from_slice(&e.nonce.to_le_bytes());
            out.extend_from_slice(&e.expires.to_le_bytes());
            out.extend_from_slice(&e.digest);
        }
        out
    }

    /// Entries held: live ones, and those within [`SHARD_GRACE_SECS`] of
    /// their expiry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the shard is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Accepts `nonce` (remembered until `expires`, with `digest`) at `now`,
    /// forgetting entries [`SHARD_GRACE_SECS`] past their expiry; at most `bound`
    /// live entries. Live means at the caller's clock: an entry another worker's
    /// later clock found expired is still there to refuse a replay of its
    /// nonce, and one expired at this clock makes way for a new command under
    /// its nonce.
    pub fn accept(
        &mut self,
        nonce: u64,
        expires: u64,
        digest: &Digest,
        now: u64,
        bound: usize,
    ) -> Result<ShardOutcome, Refused<()>> {
        self.entries
            .retain(|e| u64::from(e.expires).saturating_add(SHARD_GRACE_SECS) >= now);
        let mut short = [0u8; 8];
        short.copy_from_slice(&digest[..8]);
        let live = |e: &ShardEntry| u64::from(e.expires) >= now;
        if let Some(e) = self.entries.iter().find(|e| e.nonce == nonce && live(e)) {
            return if e.digest == short {
                Ok(ShardOutcome::Resend)
            } else {
                Err(Refused::Replay(()))
            };
        }
        if self.entries.iter().filter(|e| live(e)).count() >= bound {
            return Err(Refused::IssuerFull);
        }
        self.entries.retain(|e| e.nonce != nonce);
        // Entries in their grace are at most as many again as the bound (an
        // issuer whose commands expire as they come could fill a shard with
        // them ten times over): beyond, they go first.
        if self.entries.len() >= bound.saturating_mul(2) {
            self.entries.retain(|e| live(e));
        }
        self.entries.push(ShardEntry {
            nonce,
            expires: u32::try_from(expires).unwrap_or(u32::MAX),
            digest: short,
        });
        Ok(ShardOutcome::Fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const NOW: u64 = 1_750_000_000;

    fn book() -> NonceBook<u8> {
        NonceBook::new(Limits {
            max_per_issuer: 64,
            max_issuers: 2,
        })
    }

    #[test]
    fn beyond_the_bounds_a_book_remembers_as_much_again_at_most() {
        let mut b: NonceBook<()> = NonceBook::new(Limits {
            max_per_issuer: 2,
            max_issuers: 1,
        });
        for n in 1..=2 {
            b.insert("a", n, 1_000, (), 0).unwrap();
        }
        assert!(b.insert("a", 3, 1_000, (), 0).is_err());
        assert!(b.remember_within_twice("a", 3, 1_000, (), 0));
        assert!(b.remember_within_twice("a", 4, 1_000, (), 0));
        assert!(!b.remember_within_twice("a", 5, 1_000, (), 0));
        assert!(b.get("a", 4, 0).is_some() && b.get("a", 5, 0).is_none());
        // Issuers: twice max_issuers.
        assert!(b.remember_within_twice("b", 1, 1_000, (), 0));
        assert!(!b.remember_within_twice("c", 1, 1_000, (), 0));
        assert_eq!(b.len(), 5);
        // What expired makes room: "a"'s four expire at 1 000.
        b.remember("a", 9, 2_000, (), 0);
        assert!(b.remember_within_twice("a", 10, 3_000, (), 1_001));
        assert!(b.get("a", 10, 1_001).is_some());
        // "b"'s one expires too: room for a new issuer.
        assert!(b.remember_within_twice("c", 1, 3_000, (), 1_001));
    }

    #[test]
    fn accepts_once_in_any_order() {
        let mut b = book();
        for n in [10, 7, 11, 8, u64::MAX, 9] {
            b.insert("ops", n, NOW + 30, 1, NOW).unwrap();
        }
        for n in [10, 7, u64::MAX] {
            assert_eq!(
                b.insert("ops", n, NOW + 30, 2, NOW),
                Err(Refused::Replay(1))
            );
        }
        b.insert("other", 10, NOW + 30, 3, NOW).unwrap();
        assert_eq!(b.len(), 7);
    }

    /// Nonces remembered as durable facts (the guard's path) of issuers that
    /// went quiet are forgotten once they expire, when a new issuer comes and the
    /// book holds its bound of issuers: the book does not keep every issuer it
    /// ever saw.
    #[test]
    fn remembered_nonces_of_quiet_issuers_are_forgotten() {
        let mut b = book();
        for i in 0..100u64 {
            let now = NOW + i * 40;
            b.remember(&format!("issuer-{i}"), 1, now + 30, 0, now);
        }
        assert!(b.len() <= 2, "{}", b.len());
        assert!(b.get("issuer-99", 1, NOW + 99 * 40).is_some());
        // A quiet issuer's nonce is forgotten only once it expired.
        let mut b = book();
        b.remember("a", 1, NOW + 30, 0, NOW);
        b.remember("b", 1, NOW + 30, 0, NOW);
        b.remember("c", 1, NOW + 30, 0, NOW + 1);
        assert!(b.get("a", 1, NOW + 1).is_some() && b.get("b", 1, NOW + 1).is_some());
    }

    #[test]
    fn a_huge_nonce_changes_nothing_for_the_next_ones() {
        let mut b = book();
        b.insert("ops", u64::MAX, NOW + 30, 0, NOW).unwrap();
        b.insert("ops", 1, NOW + 30, 0, NOW).unwrap();
        b.insert("ops", 2, NOW + 30, 0, NOW).unwrap();
    }

    #[test]
    fn forgets_a_nonce_once_its_command_is_stale() {
        let mut b = book();
        b.insert("ops", 5, NOW + 30, 0, NOW).unwrap();
        assert!(b.get("ops", 5, NOW + 30).is_some());
        assert!(b.get("ops", 5, NOW + 31).is_none());
        b.insert("ops", 5, NOW + 61, 0, NOW + 31).unwrap();
        b.prune(NOW + 62);
        assert!(b.is_empty());
    }

    /// A nonce forgotten at one reading of the clock is not let through at an
    /// earlier one: the book's clock never goes back before a time it forgot at.
    #[test]
    fn the_books_clock_never_goes_back_before_what_it_forgot() {
        let mut b = book();
        assert_eq!(b.clock(NOW), NOW);
        b.insert("ops", 1, NOW + 30, 0, NOW).unwrap();
        // Another caller, its clock read a second later, forgets nonce 1.
        b.insert("ops", 2, NOW + 61, 0, NOW + 31).unwrap();
        assert!(b.get("ops", 1, NOW + 30).is_none(), "forgotten");
        // A replay of nonce 1 read the clock at NOW + 30, when it was still
        // fresh: it is judged just past nonce 1's expiry, stale.
        assert_eq!(b.clock(NOW + 30), NOW + 31);
        assert_eq!(b.clock(NOW + 40), NOW + 40);
        // A reading alone moves nothing: only what is forgotten does.
        b.prune(NOW + 50);
        b.remember("ops", 3, NOW + 90, 0, NOW + 60);
        assert_eq!(b.clock(NOW), NOW + 31);
        b.prune(NOW + 62);
        assert_eq!(b.clock(NOW), NOW + 62, "nonce 2 (NOW + 61) forgotten");
        // A clock that jumped a day ahead forgets nonce 3: once it is back, the
        // book holds commands back only past nonce 3's expiry, not for the day.
        b.insert("ops", 4, NOW + 86_430, 0, NOW + 86_400).unwrap();
        assert_eq!(b.clock(NOW + 100), NOW + 100);
        assert_eq!(b.clock(NOW + 80), NOW + 91);
        // A nonce dropped without the book holding it (read back expired).
        b.forgotten(NOW + 200);
        assert_eq!(b.clock(NOW + 100), NOW + 201);
    }

    #[test]
    fn is_bounded_per_issuer_and_in_issuers() {
        let mut b = book();
        for n in 1..=64 {
            b.insert("ops", n, NOW + 30, 0, NOW).unwrap();
        }
        assert_eq!(
            b.insert("ops", 65, NOW + 30, 0, NOW),
            Err(Refused::IssuerFull)
        );
        let r = Refused::<u8>::IssuerFull.reject("ops", 65);
        assert_eq!((r.code, r.code.http_status()), (Code::ReplayCapacity, 429));
        // Once the old ones expire there is room again.
        b.insert("ops", 65, NOW + 100, 0, NOW + 31).unwrap();
        b.insert("b", 1, NOW + 30, 0, NOW).unwrap();
        assert_eq!(
            b.insert("c", 1, NOW + 30, 0, NOW),
            Err(Refused::TooManyIssuers)
        );
        b.insert("c", 1, NOW + 100, 0, NOW + 31).unwrap();
    }

    #[test]
    fn reserved_nonces_count_against_the_bounds() {
        let mut b = book();
        for n in 1..=62 {
            b.insert("ops", n, NOW + 30, 0, NOW).unwrap();
        }
        let none = HashMap::new();
        let mut reserved = HashMap::from([("ops".to_string(), 2)]);
        // 62 in the book and 2 reserved: the issuer is full.
        assert_eq!(b.check_reserved("ops", 63, NOW, &none), Ok(()));
        assert_eq!(
            b.check_reserved("ops", 63, NOW, &reserved),
            Err(Refused::IssuerFull)
        );
        // A replay is still told as one.
        assert_eq!(
            b.check_reserved("ops", 5, NOW, &reserved),
            Err(Refused::Replay(0))
        );
        // Issuers: "ops" in the book, "b" only reserved — a third is one too many
        // (the bound is 2), a second nonce of "b" is not a new issuer.
        reserved.insert("b".into(), 1);
        assert_eq!(
            b.check_reserved("c", 1, NOW, &reserved),
            Err(Refused::TooManyIssuers)
        );
        assert_eq!(b.check_reserved("b", 2, NOW, &reserved), Ok(()));
        // Once the book's issuer expired, "b" (reserved) and a new one fit — unless
        // the expired one has nonces reserved again.
        assert_eq!(
            b.check_reserved("c", 1, NOW + 31, &reserved),
            Err(Refused::TooManyIssuers)
        );
        reserved.remove("ops");
        assert_eq!(b.check_reserved("c", 1, NOW + 31, &reserved), Ok(()));
        // A zero count is no reservation.
        reserved.insert("b".into(), 0);
        assert_eq!(b.check_reserved("c", 1, NOW, &reserved), Ok(()));
    }

    #[test]
    fn a_durable_nonce_is_remembered_past_the_bounds() {
        let mut b = book();
        for n in 1..=64 {
            b.insert("ops", n, NOW + 30, 0, NOW).unwrap();
        }
        b.insert("b", 1, NOW + 30, 0, NOW).unwrap();
        // Full per issuer and in issuers; remembered all the same, and then a
        // resend of either is a replay.
        b.remember("ops", 65, NOW + 30, 1, NOW);
        b.remember("c", 1, NOW + 30, 2, NOW);
        assert_eq!(b.check("ops", 65, NOW), Err(Refused::Replay(1)));
        assert_eq!(b.check("c", 1, NOW), Err(Refused::Replay(2)));
        assert_eq!(b.len(), 67);
        // Remembered again: the later expiry and the new value.
        b.remember("c", 1, NOW + 10, 3, NOW);
        assert_eq!(b.get("c", 1, NOW + 30).map(|s| s.value), Some(3));
        // New nonces are refused until the book is back within its bounds.
        assert_eq!(b.check("ops", 66, NOW), Err(Refused::IssuerFull));
        assert_eq!(b.check("d", 1, NOW), Err(Refused::TooManyIssuers));
        b.prune(NOW + 31);
        assert!(b.is_empty());
        assert_eq!(b.check("d", 1, NOW + 31), Ok(()));
    }

    #[test]
    fn removed_and_updated_entries() {
        let mut b = book();
        b.insert("ops", 5, NOW + 30, 0, NOW).unwrap();
        assert!(b.update("ops", 5, 9));
        assert_eq!(b.get("ops", 5, NOW).map(|s| s.value), Some(9));
        assert_eq!(b.remove("ops", 5).map(|s| s.value), Some(9));
        assert!(!b.update("ops", 5, 1));
        b.insert("ops", 5, NOW + 30, 0, NOW).unwrap();
    }

    #[test]
    fn limits_are_checked() {
        assert!(Limits::default().validate().is_ok());
        for bad in [0, 63, 100, (1 << 24) + 64] {
            let l = Limits {
                max_per_issuer: bad,
                ..Limits::default()
            };
            assert!(l.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn shards_round_trip_and_tell_resends_from_reuse() {
        let mut s = Shard::default();
        let d = digest(b"command");
        assert_eq!(s.accept(7, NOW + 30, &d, NOW, 4), Ok(ShardOutcome::Fresh));
        assert_eq!(s.accept(7, NOW + 30, &d, NOW, 4), Ok(ShardOutcome::Resend));
        assert_eq!(
            s.accept(7, NOW + 30, &digest(b"another"), NOW, 4),
            Err(Refused::Replay(()))
        );
        let b = s.to_bytes();
        assert_eq!(b.len(), SHARD_ENTRY_BYTES);
        assert_eq!(Shard::from_bytes(&b), Some(s.clone()));
        assert_eq!(Shard::from_bytes(&b[..5]), None);
        for n in 8..11 {
            s.accept(n, NOW + 30, &d, NOW, 4).unwrap();
        }
        assert_eq!(s.accept(11, NOW + 30, &d, NOW, 4), Err(Refused::IssuerFull));
        assert_eq!(
            s.accept(11, NOW + 100, &d, NOW + 31, 4),
            Ok(ShardOutcome::Fresh),
            "expired entries make room"
        );
        // Kept through their grace, then forgotten.
        assert_eq!(s.len(), 5);
        let last = NOW + 30 + SHARD_GRACE_SECS + 1;
        assert_eq!(
            s.accept(12, NOW + 100, &d, last, 4),
            Ok(ShardOutcome::Fresh)
        );
        assert_eq!(s.len(), 2);
    }

    /// Two workers read the clock a second apart: the later one's write must not
    /// make the earlier one, still within a nonce's freshness, take a replay of
    /// it for fresh (a shard keeps no mark of what it forgot). A new command
    /// under a nonce expired at the caller's clock is fresh.
    #[test]
    fn a_nonce_forgotten_at_a_later_clock_still_refuses_its_replay() {
        let mut s = Shard::default();
        let (first, other) = (digest(b"command"), digest(b"another"));
        assert_eq!(
            s.accept(7, NOW + 30, &first, NOW, 4),
            Ok(ShardOutcome::Fresh)
        );
        // Another worker, at NOW + 31, accepts another nonce of the shard.
        assert_eq!(
            s.accept(8, NOW + 61, &first, NOW + 31, 4),
            Ok(ShardOutcome::Fresh)
        );
        // A worker whose clock read NOW + 30 (nonce 7's command still fresh).
        assert_eq!(
            s.accept(7, NOW + 30, &other, NOW + 30, 4),
            Err(Refused::Replay(()))
        );
        // At NOW + 31, nonce 7 is another command's to take.
        assert_eq!(
            s.accept(7, NOW + 61, &other, NOW + 31, 4),
            Ok(ShardOutcome::Fresh)
        );
        assert_eq!(s.len(), 2, "the old entry was replaced");
        // Entries in their grace hold at most the bound again.
        let mut s = Shard::default();
        for n in 0..100 {
            s.accept(n, NOW + n, &first, NOW + n, 4).unwrap();
            assert!(s.len() <= 8, "{}", s.len());
        }
    }

    #[test]
    fn shards_spread_regular_nonces() {
        let mut count = [0usize; SHARDS as usize];
        for i in 0..64_000u64 {
            count[shard_of(1_750_000_000_000_000_000 + i * 1000) as usize] += 1;
        }
        assert!(count.iter().all(|c| (500..1500).contains(c)), "{count:?}");
    }

    proptest! {
        /// Against a model: every (issuer, nonce) accepted at most once while fresh,
        /// every unseen one accepted (the bounds are not reached here), in any order.
        #[test]
        fn matches_a_set_model(ops in proptest::collection::vec((0u8..3, 1u64..50, 0u64..90), 1..300)) {
            let mut b: NonceBook<()> = NonceBook::new(Limits::default());
            let mut shards: BTreeMap<u8, Shard> = BTreeMap::new();
            let mut model: BTreeMap<(u8, u64), u64> = BTreeMap::new();
            let mut now = NOW;
            for (issuer, nonce, dt) in ops {
                now += dt % 3;
                let expires = now + 30;
                let live = model.get(&(issuer, nonce)).is_some_and(|e| *e >= now);
                let got = b.insert(&issuer.to_string(), nonce, expires, (), now);
                prop_assert_eq!(got.is_ok(), !live, "issuer {} nonce {}", issuer, nonce);
                let shard = shards.entry(issuer).or_default();
                let edge = shard.accept(nonce, expires, &digest(&nonce.to_le_bytes()), now, 1024);
                prop_assert_eq!(edge == Ok(ShardOutcome::Fresh), !live);
                if !live {
                    model.insert((issuer, nonce), expires);
                }
            }
        }
    }
}
