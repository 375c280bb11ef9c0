//! Records that must stay in the journal until an expiry each (a nonce is
//! remembered until its command's freshness ends): the oldest one still live is
//! what a hold on the journal needs.

use std::collections::{BTreeMap, BTreeSet};

use super::Lsn;

/// Journal records by position, each live until its expiry. Expired records leave
/// from the front of an expiry index: each costs O(log n) once, where a scan of
/// every live record per transaction cost the journal's writer thread O(n) — 22 %
/// of the process after 40 000 commands (`bench control`, 2026-12-02).
#[derive(Debug, Default)]
pub struct Expiring {
    by_lsn: BTreeMap<Lsn, u64>,
    by_expiry: BTreeSet<(u64, Lsn)>,
}

impl Expiring {
    /// `lsn` holds something live until `expires` (a record noted twice is live
    /// until the later of the two).
    pub fn note(&mut self, lsn: Lsn, expires: u64) {
        match self.by_lsn.get(&lsn) {
            Some(&e) if e >= expires => {}
            old => {
                if let Some(&e) = old {
                    self.by_expiry.remove(&(e, lsn));
                }
                self.by_lsn.insert(lsn, expires);
                self.by_expiry.insert((expires, lsn));
            }
        }
    }

    /// Forgets the records whose expiry is before `now`.
    pub fn expire(&mut self, now: u64) {
        while let Some(&(e, lsn)) = self.by_expiry.first() {
            if e >= now {
                break;
            }
            self.by_expiry.pop_first();
            self.by_lsn.remove(&lsn);
        }
    }

    /// The latest expiry of a record that [`Self::expire`] at `now` would forget.
    pub fn latest_before(&self, now: u64) -> Option<u64> {
        self.by_expiry
            .range(..(now, 0))
            .next_back()
            .map(|&(e, _)| e)
    }

    /// The oldest record not yet forgotten.
    pub fn oldest(&self) -> Option<Lsn> {
        self.by_lsn.keys().next().copied()
    }

    /// Forgets every record.
    pub fn clear(&mut self) {
        self.by_lsn.clear();
        self.by_expiry.clear();
    }

    /// Records not yet forgotten.
    pub fn len(&self) -> usize {
        self.by_lsn.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.by_lsn.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answers as the scan it replaces: the oldest record whose expiry is
    /// not before `now`, over records noted in any expiry order.
    #[test]
    fn the_oldest_live_record_as_a_scan_finds_it() {
        let mut e = Expiring::default();
        let mut scan: BTreeMap<Lsn, u64> = BTreeMap::new();
        // Expiries out of order with positions, some records noted twice.
        let notes = [
            (1, 50),
            (2, 30),
            (3, 70),
            (4, 30),
            (2, 60),
            (5, 40),
            (3, 10),
            (6, 90),
        ];
        for (lsn, exp) in notes {
            e.note(lsn, exp);
            let s = scan.entry(lsn).or_insert(0);
            *s = (*s).max(exp);
        }
        for now in [0, 30, 31, 41, 51, 61, 71, 91] {
            e.expire(now);
            scan.retain(|_, exp| *exp >= now);
            assert_eq!(e.oldest(), scan.keys().next().copied(), "now {now}");
            assert_eq!(e.len(), scan.len(), "now {now}");
        }
        assert!(e.is_empty());
        e.note(9, 5);
        e.clear();
        assert_eq!(e.oldest(), None);
    }
}
