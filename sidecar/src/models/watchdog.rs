//! Ends the process when a model library stays inside its `predict` too long.
//!
//! A library that loops for ever, or waits for ever, on some row stops whatever
//! called it: the hot path's strategy thread (every send of both modules stops,
//! the ring fills) or an API request (its scoring permit is never given back).
//! The call cannot be taken back from the library's code, so the process ends
//! (fail-stop): the library is named first in the list of libraries the sidecar
//! died inside (`state_dir/model-crashed`, `crash_note`), so the next
//! start refuses it (`crashed`) instead of serving it until the same row comes
//! again — as for a library that crashes.
//!
//! Each thread that calls `predict` notes when it entered and which library
//! (a `Watched` guard, a lock of its own, uncontended but for the watchdog's look);
//! one thread ([`start`]) looks at them every quarter of the limit.
#![allow(unsafe_code)] // a raw pointer to the library's line: the block says why it is sound.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A call in a library's `predict`: since when, and the line naming the library
/// (its path and a newline, owned by the model the caller holds).
struct InCall {
    since: Instant,
    line: *const [u8],
}

/// One thread's call, if it is inside one.
#[derive(Default)]
struct ThreadCall(Mutex<Option<InCall>>);

// SAFETY: `line` is only read under the mutex, while the call it belongs to is
// still running (see `look`); nothing else in it is thread-bound.
unsafe impl Send for ThreadCall {}
// SAFETY: as for `Send`: every access is under the mutex.
unsafe impl Sync for ThreadCall {}

/// Every thread that called `predict` (a thread that ended is let go at the next
/// look).
static THREADS: Mutex<Vec<Arc<ThreadCall>>> = Mutex::new(Vec::new());

thread_local! {
    static MINE: Arc<ThreadCall> = {
        let mine = Arc::new(ThreadCall::default());
        THREADS.lock().push(mine.clone());
        mine
    };
}

/// While alive, this thread is inside the `predict` of the library `line` names
/// (the model's own line, the model held by the caller); it borrows `line`, and
/// stays on its thread.
/// (Crate-only: a guard forgotten with `mem::forget` would leave the watchdog a
/// line that may be gone; the crate never forgets one.)
pub(crate) struct Watched<'a>(std::marker::PhantomData<(&'a [u8], *const ())>);

impl<'a> Watched<'a> {
    /// Enters the `predict` of the library named by `line`.
    pub(crate) fn enter(line: &'a [u8]) -> Watched<'a> {
        let call = InCall {
            since: Instant::now(),
            line: std::ptr::from_ref(line),
        };
        // A thread being torn down (no thread-locals left) is not watched.
        let _ = MINE.try_with(|m| *m.0.lock() = Some(call));
        Watched(std::marker::PhantomData)
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        let _ = MINE.try_with(|m| *m.0.lock() = None);
    }
}

static STARTED: OnceLock<Duration> = OnceLock::new();

/// Starts the watchdog once per process: a call inside a library's `predict` for
/// longer than `limit` ends the process, the library listed first. Later calls
/// change nothing.
pub fn start(limit: Duration) -> std::io::Result<()> {
    if STARTED.set(limit).is_err() {
        if STARTED.get() != Some(&limit) {
            tracing::warn!(
                limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                "the model watchdog runs already, with another limit: that one holds"
            );
        }
        return Ok(());
    }
    let every = (limit / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    std::thread::Builder::new()
        .name("gw-model-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            if let Some((line, inside)) = look(limit) {
                hung(&line, inside);
            }
        })
        .map(drop)
}

/// A library a thread has been inside `predict` of for longer than `limit`
/// (its line, copied) and for how long.
fn look(limit: Duration) -> Option<(Vec<u8>, Duration)> {
    overdue(limit).into_iter().next()
}

/// Every call inside a library's `predict` for longer than `limit` (the
/// library's line, copied, and for how long); threads that ended are let go.
fn overdue(limit: Duration) -> Vec<(Vec<u8>, Duration)> {
    let mut threads = THREADS.lock();
    // Held only here: the thread is gone.
    threads.retain(|t| Arc::strong_count(t) > 1);
    let mut found = Vec::new();
    for t in threads.iter() {
        let call = t.0.lock();
        if let Some(c) = call.as_ref() {
            let inside = c.since.elapsed();
            if inside > limit {
                // SAFETY: the call is still running — its thread clears the
                // entry, under this lock, before it returns from `predict` —
                // so the model it holds, and the line the model owns, live.
                let line = unsafe { &*c.line }.to_vec();
                found.push((line, inside));
            }
        }
    }
    found
}

/// A library hung in `predict`: named in the list of libraries the sidecar died
/// inside, said, and the process ends (abort: a core dump to read, and a
/// supervisor restarts it).
fn hung(line: &[u8], inside: Duration) -> ! {
    let noted = super::crash_note::note(line);
    let library = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line)).into_owned();
    tracing::error!(
        library,
        inside_ms = u64::try_from(inside.as_millis()).unwrap_or(u64::MAX),
        listed = noted.is_ok(),
        "a model library has been inside its predict for longer than models.predict_timeout_ms: the process ends (the call cannot be taken back); the next start refuses the library (`crashed`)"
    );
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_longer_than_the_limit_is_found_and_a_returned_one_is_not() {
        let line = b"/models/libmev_vhang.so\n".to_vec();
        let (entered, release) = (
            std::sync::Arc::new(std::sync::Barrier::new(2)),
            std::sync::Arc::new(std::sync::Barrier::new(2)),
        );
        let (e, r, l) = (entered.clone(), release.clone(), line.clone());
        let t = std::thread::spawn(move || {
            let _w = Watched::enter(&l);
            e.wait();
            r.wait();
        });
        entered.wait();
        std::thread::sleep(Duration::from_millis(30));
        // (Other tests' calls may be listed too.)
        let ours = |limit| overdue(limit).into_iter().any(|(l, _)| l == line);
        assert!(ours(Duration::from_millis(10)));
        assert!(!ours(Duration::from_secs(60)), "within the limit");
        release.wait();
        t.join().unwrap();
        assert!(!ours(Duration::ZERO), "returned, and its thread gone");
    }
}
