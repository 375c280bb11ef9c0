//! A bounded, lock-free single-producer single-consumer ring.
//!
//! - Indices are free-running `usize` counters (no slot is wasted to tell full from
//!   empty); the capacity is a power of two so a slot is `index & mask`.
//! - The producer's `tail` and the consumer's `head` live on their own cache lines
//!   ([`CachePadded`]), and each side caches the other's index so the shared line is
//!   read only when the cached value says "full" (producer) or "empty" (consumer).
//! - Batch operations ([`Producer::push_iter`], [`Consumer::pop_into`]) publish the
//!   whole batch with one release store.
//! - Items never popped are dropped with the ring (nothing leaks); slots are
//!   `MaybeUninit` and only initialised slots are ever read or dropped.
//!
//! Proof: `tests/loom.rs` model-checks push/pop/batch/drop interleavings under
//! `RUSTFLAGS="--cfg loom"` (run by `scripts/test.sh`). Miri needs a nightly
//! toolchain, which this project's machines cannot install; see the README.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod sync;

use std::fmt;
use std::mem::MaybeUninit;

use sync::{Arc, AtomicUsize, Cell, Ordering};

/// Keeps a value on its own cache line (128 bytes: two 64-byte lines, because
/// x86's adjacent-line prefetcher pairs them; also Apple M-series line size).
#[derive(Default)]
#[repr(align(128))]
pub struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The largest capacity [`channel`] accepts.
pub const MAX_CAPACITY: usize = 1 << 30;

/// [`channel`] refused the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityError(pub usize);

impl fmt::Display for CapacityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ring capacity {} is outside 1..={MAX_CAPACITY}", self.0)
    }
}

impl std::error::Error for CapacityError {}

struct Shared<T> {
    /// Next slot the consumer reads; written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Next slot the producer writes; written only by the producer.
    tail: CachePadded<AtomicUsize>,
    slots: Box<[Cell<MaybeUninit<T>>]>,
    mask: usize,
}

// SAFETY: a slot is written only by the producer while it is outside head..tail and
// read only by the consumer while inside; the release/acquire pairs on head and tail
// order those accesses, so `T: Send` is all that crossing threads needs.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as above; the shared state itself is only atomics and those slots.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Both halves are gone (this is the last Arc): drop what was never popped.
        let mut i = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        while i != tail {
            self.slots[i & self.mask].with_mut(|p| {
                // SAFETY: every slot in head..tail was written by `push` and not read.
                unsafe { (*p).assume_init_drop() }
            });
            i = i.wrapping_add(1);
        }
    }
}

/// The writing half. Not `Clone`: exactly one producer.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    tail: usize,
    head_cache: usize,
    /// Copy of the shared mask: no pointer chase on the hot path.
    mask: usize,
}

/// The reading half. Not `Clone`: exactly one consumer.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    head: usize,
    tail_cache: usize,
    /// Copy of the shared mask.
    mask: usize,
}

/// A ring holding up to `capacity` items (rounded up to a power of two).
pub fn channel<T>(capacity: usize) -> Result<(Producer<T>, Consumer<T>), CapacityError> {
    if capacity == 0 || capacity > MAX_CAPACITY {
        return Err(CapacityError(capacity));
    }
    let cap = capacity.next_power_of_two();
    let slots = (0..cap).map(|_| Cell::new(MaybeUninit::uninit())).collect();
    let shared = Arc::new(Shared {
        head: CachePadded(AtomicUsize::new(0)),
        tail: CachePadded(AtomicUsize::new(0)),
        slots,
        mask: cap - 1,
    });
    Ok((
        Producer {
            shared: shared.clone(),
            tail: 0,
            head_cache: 0,
            mask: cap - 1,
        },
        Consumer {
            shared,
            head: 0,
            tail_cache: 0,
            mask: cap - 1,
        },
    ))
}

impl<T> Producer<T> {
    /// Slots in the ring.
    #[inline(always)]
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Free slots now (at least; the consumer may free more meanwhile).
    #[inline(always)]
    pub fn free(&mut self) -> usize {
        let cap = self.capacity();
        if self.tail.wrapping_sub(self.head_cache) == cap {
            self.head_cache = self.shared.head.load(Ordering::Acquire);
        }
        cap - self.tail.wrapping_sub(self.head_cache)
    }

    /// Appends `value`, or hands it back when the ring is full.
    #[inline]
    pub fn push(&mut self, value: T) -> Result<(), T> {
        if self.free() == 0 {
            return Err(value);
        }
        self.write(value);
        self.shared.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Appends items from `items` while there is room and publishes them at once;
    /// returns how many were taken. Items that did not fit stay in the iterator.
    pub fn push_iter<I: Iterator<Item = T>>(&mut self, items: &mut I) -> usize {
        // One fresh look at the consumer per batch, so a stale cache never shortens it.
        self.head_cache = self.shared.head.load(Ordering::Acquire);
        let room = self.capacity() - self.tail.wrapping_sub(self.head_cache);
        let n = self.write_iter(items, room);
        if n > 0 {
            self.shared.tail.store(self.tail, Ordering::Release);
        }
        n
    }

    /// Writes up to `room` items into the free slots (not yet published).
    #[cfg(not(loom))]
    #[inline(always)]
    fn write_iter<I: Iterator<Item = T>>(&mut self, items: &mut I, room: usize) -> usize {
        // The free slots are at most two contiguous runs: tail..end, then 0..
        let cap = self.capacity();
        let start = self.tail & self.mask;
        let first = room.min(cap - start);
        // `Cell` is a transparent `UnsafeCell<MaybeUninit<T>>`.
        let base = self.shared.slots.as_ptr() as *mut MaybeUninit<T>;
        let mut n = 0;
        for (from, len) in [(start, first), (0, room - first)] {
            for i in 0..len {
                let Some(v) = items.next() else {
                    self.tail = self.tail.wrapping_add(n);
                    return n;
                };
                // SAFETY: from + i < cap, and the slot is free (outside head..tail).
                unsafe { (*base.add(from + i)).write(v) };
                n += 1;
            }
        }
        self.tail = self.tail.wrapping_add(n);
        n
    }

    /// Model-checked variant: one tracked cell access per slot.
    #[cfg(loom)]
    fn write_iter<I: Iterator<Item = T>>(&mut self, items: &mut I, room: usize) -> usize {
        let mut n = 0;
        for v in items.by_ref().take(room) {
            self.write(v);
            n += 1;
        }
        n
    }

    #[inline(always)]
    fn write(&mut self, value: T) {
        // SAFETY: index & mask < slots.len() (the length is mask + 1).
        let slot = unsafe { self.shared.slots.get_unchecked(self.tail & self.mask) };
        slot.with_mut(|p| {
            // SAFETY: the slot is outside head..tail (free() said so), so the consumer
            // does not touch it and it holds no live value.
            unsafe { (*p).write(value) };
        });
        self.tail = self.tail.wrapping_add(1);
    }
}

impl<T> Consumer<T> {
    /// Slots in the ring.
    #[inline(always)]
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Items ready now (at least; the producer may add more meanwhile).
    #[inline(always)]
    pub fn available(&mut self) -> usize {
        if self.tail_cache == self.head {
            self.tail_cache = self.shared.tail.load(Ordering::Acquire);
        }
        self.tail_cache.wrapping_sub(self.head)
    }

    /// Takes the oldest item.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.available() == 0 {
            return None;
        }
        let v = self.read();
        self.shared.head.store(self.head, Ordering::Release);
        Some(v)
    }

    /// Moves up to `max` of the oldest items into `out`, freeing their slots at
    /// once; returns how many.
    pub fn pop_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let mut ready = self.available();
        if ready < max {
            // The cache may be behind: one fresh look before taking a short batch.
            self.tail_cache = self.shared.tail.load(Ordering::Acquire);
            ready = self.tail_cache.wrapping_sub(self.head);
        }
        let n = ready.min(max);
        out.reserve(n);
        let spare = &mut out.spare_capacity_mut()[..n];
        let mut k = 0;
        self.read_each(n, &mut |v| {
            spare[k].write(v);
            k += 1;
        });
        // SAFETY: the first n spare slots were just initialised.
        unsafe { out.set_len(out.len() + n) };
        if n > 0 {
            self.shared.head.store(self.head, Ordering::Release);
        }
        n
    }

    /// Hands up to `max` of the oldest items to `f` in order, then frees their slots
    /// at once; returns how many. (No intermediate buffer.)
    #[inline]
    pub fn pop_with(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let mut ready = self.available();
        if ready < max {
            self.tail_cache = self.shared.tail.load(Ordering::Acquire);
            ready = self.tail_cache.wrapping_sub(self.head);
        }
        let n = ready.min(max);
        self.read_each(n, &mut f);
        if n > 0 {
            self.shared.head.store(self.head, Ordering::Release);
        }
        n
    }

    /// Moves `n` ready items out to `f` (their slots are not yet released).
    #[cfg(not(loom))]
    #[inline(always)]
    fn read_each(&mut self, n: usize, f: &mut impl FnMut(T)) {
        let cap = self.capacity();
        let start = self.head & self.mask;
        let first = n.min(cap - start);
        let base = self.shared.slots.as_ptr() as *const MaybeUninit<T>;
        for (from, len) in [(start, first), (0, n - first)] {
            for i in 0..len {
                // SAFETY: from + i < cap and the slot is inside head..tail: written by
                // the producer (ordered by the acquire load of tail), read once here.
                f(unsafe { (*base.add(from + i)).assume_init_read() });
            }
        }
        self.head = self.head.wrapping_add(n);
    }

    /// Model-checked variant: one tracked cell access per slot.
    #[cfg(loom)]
    fn read_each(&mut self, n: usize, f: &mut impl FnMut(T)) {
        for _ in 0..n {
            let v = self.read();
            f(v);
        }
    }

    #[inline(always)]
    fn read(&mut self) -> T {
        // SAFETY: index & mask < slots.len() (the length is mask + 1).
        let slot = unsafe { self.shared.slots.get_unchecked(self.head & self.mask) };
        let v = slot.with_mut(|p| {
            // SAFETY: the slot is inside head..tail: the producer wrote it (its release
            // store of tail, acquired above, orders the write before this read) and
            // will not touch it until head moves past it.
            unsafe { (*p).assume_init_read() }
        });
        self.head = self.head.wrapping_add(1);
        v
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_a_power_of_two_and_bounded() {
        assert_eq!(channel::<u8>(0).err(), Some(CapacityError(0)));
        assert!(channel::<u8>(MAX_CAPACITY + 1).is_err());
        let (p, c) = channel::<u8>(5).unwrap();
        assert_eq!((p.capacity(), c.capacity()), (8, 8));
        assert_eq!(std::mem::align_of::<CachePadded<AtomicUsize>>(), 128);
    }

    #[test]
    fn full_hands_the_value_back_and_every_slot_is_usable() {
        let (mut p, mut c) = channel(4).unwrap();
        for i in 0..4 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(9), Err(9), "no wasted slot, and full is full");
        assert_eq!(c.pop(), Some(0));
        p.push(4).unwrap();
        let mut out = Vec::new();
        assert_eq!(c.pop_into(&mut out, 10), 4);
        assert_eq!(out, vec![1, 2, 3, 4]);
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn push_iter_leaves_what_did_not_fit() {
        let (mut p, mut c) = channel(4).unwrap();
        let mut items = 0..10;
        assert_eq!(p.push_iter(&mut items), 4);
        assert_eq!(items.next(), Some(4), "the fifth item was not consumed");
        assert_eq!(c.pop(), Some(0));
    }

    #[test]
    fn unread_items_are_dropped_with_the_ring() {
        let token = std::sync::Arc::new(());
        let (mut p, mut c) = channel(8).unwrap();
        for _ in 0..6 {
            p.push(token.clone()).unwrap();
        }
        drop(c.pop());
        assert_eq!(std::sync::Arc::strong_count(&token), 6);
        drop(p);
        assert_eq!(
            std::sync::Arc::strong_count(&token),
            6,
            "consumer still holds the ring"
        );
        drop(c);
        assert_eq!(std::sync::Arc::strong_count(&token), 1, "nothing leaked");
    }
}
