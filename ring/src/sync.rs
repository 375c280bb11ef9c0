//! The primitives the ring is built on: `std` normally, `loom`'s model-checked
//! versions under `--cfg loom` (see `tests/loom.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

/// `UnsafeCell` with loom's closure API, so every access is visible to the model
/// checker under `--cfg loom` and compiles to a plain pointer otherwise.
#[cfg(loom)]
pub(crate) struct Cell<T>(loom::cell::UnsafeCell<T>);
#[cfg(loom)]
impl<T> Cell<T> {
    pub(crate) fn new(v: T) -> Self {
        Cell(loom::cell::UnsafeCell::new(v))
    }
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        self.0.with_mut(f)
    }
}

#[cfg(not(loom))]
#[repr(transparent)]
pub(crate) struct Cell<T>(std::cell::UnsafeCell<T>);
#[cfg(not(loom))]
impl<T> Cell<T> {
    pub(crate) fn new(v: T) -> Self {
        Cell(std::cell::UnsafeCell::new(v))
    }
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
