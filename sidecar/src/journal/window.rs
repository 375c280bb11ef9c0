//! What a journal sink keeps in memory of the records it still has to ship
//! elsewhere (the ledger's rows, the send audit's), bounded.
//!
//! While ClickHouse is away those records pile up. They are durable in the journal
//! already, so memory needs only the oldest of them, the next to ship: a
//! [`Window`] keeps items in memory up to a bound (in rows); once it is full, a
//! record's items wait on disk only, and so does every record after it, so that
//! order is kept. When the items in memory have been shipped, [`Window::read_back`]
//! reads the next ones back from the journal. The sink's journal hold covers the
//! oldest record still on disk only ([`Window::hold`]).

use std::collections::VecDeque;

use parking_lot::Mutex;

use super::{Journal, JournalError, Lsn, Txn};

/// An item's weight against a window's bounds (rows, and bytes).
pub trait Weigh {
    /// Rows this item counts for.
    fn weight(&self) -> usize;
    /// Bytes of memory this item holds, as far as a window's byte bound counts
    /// them (0: not counted; the row bound alone holds it).
    fn bytes(&self) -> usize {
        0
    }
}

impl Weigh for gw_core::ledger::LedgerRow {
    fn weight(&self) -> usize {
        1
    }

    /// The row and every text it holds: a refusal's row keeps up to 128 KiB of
    /// hex, a command's twice its body.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.text_bytes()
    }
}

impl<T: Weigh> Weigh for std::sync::Arc<T> {
    fn weight(&self) -> usize {
        (**self).weight()
    }

    fn bytes(&self) -> usize {
        (**self).bytes()
    }
}

/// A record's send rows: small and of bounded size, counted by the row bound.
impl<T> Weigh for Vec<T> {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// Records committed while a read back ran that it reads too, under the window's
/// lock (the journal's writer, and so every commit, waits meanwhile), so that the
/// window leaves disk and new records go to memory again; more than this and they
/// wait for the next read back, which runs outside the lock again.
const CATCH_UP: Lsn = 64;

/// A sink's items in journal order: the oldest in memory, up to a bound in rows
/// and one in bytes; the rest on disk only, from one record on.
pub struct Window<T> {
    items: VecDeque<(Lsn, T)>,
    /// Weight of `items`.
    held: usize,
    cap: usize,
    /// Bytes of `items` ([`Weigh::bytes`]).
    held_bytes: usize,
    cap_bytes: usize,
    /// Items of this record and every later one wait on disk only.
    disk: Option<Lsn>,
    /// Their weight.
    on_disk: u64,
    /// The newest durable record the sink heard of.
    heard: Lsn,
}

impl<T: Weigh> Window<T> {
    /// A window holding at most `cap` rows in memory (at least one record's).
    pub fn new(cap: usize) -> Window<T> {
        Window::bounded(cap, usize::MAX)
    }

    /// A window holding at most `cap` rows and `cap_bytes` bytes in memory (at
    /// least one record's, whatever its size).
    pub fn bounded(cap: usize, cap_bytes: usize) -> Window<T> {
        Window {
            items: VecDeque::new(),
            held: 0,
            cap: cap.max(1),
            held_bytes: 0,
            cap_bytes,
            disk: None,
            on_disk: 0,
            heard: 0,
        }
    }

    /// Record `lsn` is durable; `items` are this sink's part of it (none: the
    /// record is heard of all the same). In memory while there is room and nothing
    /// waits on disk only; otherwise on disk, in order.
    pub fn push(&mut self, lsn: Lsn, items: Vec<T>) {
        self.heard = self.heard.max(lsn);
        if items.is_empty() {
            return;
        }
        let w: usize = items.iter().map(Weigh::weight).sum();
        if self.disk.is_some() || self.held >= self.cap || self.held_bytes >= self.cap_bytes {
            self.disk.get_or_insert(lsn);
            self.on_disk += w as u64;
        } else {
            self.held += w;
            self.held_bytes += items.iter().map(Weigh::bytes).sum::<usize>();
            self.items.extend(items.into_iter().map(|i| (lsn, i)));
        }
    }

    /// The oldest item in memory.
    pub fn front(&self) -> Option<&(Lsn, T)> {
        self.items.front()
    }

    /// Drops record `lsn`'s items from memory: `false` when none were there.
    pub fn remove(&mut self, lsn: Lsn) -> bool {
        // In LSN order; nearly always the oldest.
        let at = self.items.partition_point(|(l, _)| *l < lsn);
        let mut found = false;
        while self.items.get(at).is_some_and(|(l, _)| *l == lsn) {
            if let Some((_, it)) = self.items.remove(at) {
                self.held -= it.weight();
                self.held_bytes -= it.bytes();
                found = true;
            }
        }
        found
    }

    /// Item `i` in memory, from the oldest.
    pub fn get(&self, i: usize) -> Option<&(Lsn, T)> {
        self.items.get(i)
    }

    /// The number of items in memory, from the oldest, for which `pred` holds
    /// (it holds for a prefix of them: the items are ordered by it).
    pub fn partition_point(&self, pred: impl FnMut(&(Lsn, T)) -> bool) -> usize {
        self.items.partition_point(pred)
    }

    /// The newest item in memory.
    pub fn back(&self) -> Option<&(Lsn, T)> {
        self.items.back()
    }

    /// The items in memory, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &(Lsn, T)> {
        self.items.iter()
    }

    /// Takes the oldest item in memory.
    pub fn pop_front(&mut self) -> Option<(Lsn, T)> {
        let x = self.items.pop_front()?;
        self.held -= x.1.weight();
        self.held_bytes -= x.1.bytes();
        Some(x)
    }

    /// Items in memory.
    pub fn in_memory(&self) -> usize {
        self.items.len()
    }

    /// Rows waiting, in memory and on disk only.
    pub fn pending(&self) -> u64 {
        self.held as u64 + self.on_disk
    }

    /// Rows waiting on disk only.
    pub fn on_disk(&self) -> u64 {
        self.on_disk
    }

    /// Bytes of the items in memory, as [`Weigh::bytes`] counts them.
    pub fn bytes_in_memory(&self) -> usize {
        self.held_bytes
    }

    /// The newest durable record heard of.
    pub fn heard(&self) -> Lsn {
        self.heard
    }

    /// Items of `weight` that waited on disk only are not wanted any more (a
    /// recovered record marked shipped): the gauge no longer counts them; the
    /// caller's `extract` gives none for them at [`Self::read_back`].
    pub fn forget_on_disk(&mut self, weight: u64) {
        self.on_disk = self.on_disk.saturating_sub(weight);
    }

    /// The first record whose items wait on disk only.
    pub fn first_on_disk(&self) -> Option<Lsn> {
        self.disk
    }

    /// Puts the items in memory back on disk only (they are in the journal, held):
    /// the next [`Self::read_back`] starts from the oldest of them.
    pub fn unread(&mut self) {
        let Some(&(front, _)) = self.items.front() else {
            return;
        };
        self.disk = Some(front);
        self.on_disk += self.held as u64;
        self.items.clear();
        self.held = 0;
        self.held_bytes = 0;
    }

    /// Whether memory holds no items while some wait on disk only
    /// ([`Self::read_back`] has work).
    pub fn must_read_back(&self) -> bool {
        self.items.is_empty() && self.disk.is_some()
    }

    /// The oldest record still needed (`Lsn::MAX`: none).
    pub fn hold(&self) -> Lsn {
        let front = self.items.front().map_or(Lsn::MAX, |(l, _)| *l);
        front.min(self.disk.unwrap_or(Lsn::MAX))
    }

    /// When memory holds no items and some wait on disk only: reads them back from
    /// `journal`, in order, until a bound (or `at_least` rows, if more: the byte
    /// bound then holds only beyond them).
    /// `extract` gives a record's items as [`Self::push`] was given them (none for
    /// a record pushed without its items); `keep` says which of them are still
    /// wanted (those not kept are gone for good).
    /// `Ok(items now in memory)`. Blocking: call it off the async runtime's
    /// workers, from one task at a time (the queue's shipper).
    pub fn read_back(
        this: &Mutex<Window<T>>,
        journal: &Journal,
        extract: &mut dyn FnMut(Lsn, &Txn) -> Vec<T>,
        keep: &dyn Fn(Lsn, &T) -> bool,
        at_least: usize,
    ) -> Result<usize, JournalError> {
        let (from, upto, cap) = {
            let w = this.lock();
            match (w.items.is_empty(), w.disk) {
                (true, Some(from)) => (
                    from,
                    w.heard,
                    Bound {
                        rows: w.cap.max(at_least),
                        bytes: w.cap_bytes,
                        at_least,
                    },
                ),
                _ => return Ok(0),
            }
        };
        let mut r = Reading {
            got: Vec::new(),
            held: 0,
            held_bytes: 0,
            read: 0,
            next: from,
        };
        journal.read(from, upto, &mut |lsn, txn| {
            r.take(lsn, &txn, extract, keep, cap)
        })?;
        let mut w = this.lock();
        let heard = w.heard;
        if r.next > upto && heard > upto && heard - upto <= CATCH_UP && !r.full(cap) {
            journal.read(upto + 1, heard, &mut |lsn, txn| {
                r.take(lsn, &txn, extract, keep, cap)
            })?;
        }
        let n = r.got.len();
        w.items.extend(r.got);
        w.held += r.held;
        w.held_bytes += r.held_bytes;
        if r.next > heard {
            w.disk = None;
            w.on_disk = 0;
        } else {
            w.disk = Some(r.next);
            w.on_disk = w.on_disk.saturating_sub(r.read);
        }
        Ok(n)
    }
}

/// How much a read back takes into memory.
#[derive(Clone, Copy)]
struct Bound {
    /// Rows.
    rows: usize,
    /// Bytes, once `at_least` rows are read.
    bytes: usize,
    at_least: usize,
}

/// A read back under way.
struct Reading<T> {
    got: Vec<(Lsn, T)>,
    /// Weight of `got`.
    held: usize,
    /// Bytes of `got`.
    held_bytes: usize,
    /// Weight read, kept or not (all of it was counted on disk).
    read: u64,
    /// The record after the last one read.
    next: Lsn,
}

impl<T: Weigh> Reading<T> {
    /// Takes record `lsn`'s items; `false` once `cap` is reached.
    fn take(
        &mut self,
        lsn: Lsn,
        txn: &Txn,
        extract: &mut dyn FnMut(Lsn, &Txn) -> Vec<T>,
        keep: &dyn Fn(Lsn, &T) -> bool,
        cap: Bound,
    ) -> bool {
        for it in extract(lsn, txn) {
            self.read += it.weight() as u64;
            if keep(lsn, &it) {
                self.held += it.weight();
                self.held_bytes += it.bytes();
                self.got.push((lsn, it));
            }
        }
        self.next = lsn + 1;
        !self.full(cap)
    }

    /// Whether memory has taken what `cap` allows.
    fn full(&self, cap: Bound) -> bool {
        self.held >= cap.rows || (self.held >= cap.at_least && self.held_bytes >= cap.bytes)
    }
}
