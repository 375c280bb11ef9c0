//! Short scheduling slices for the sidecar's threads (`sched_slice_us`).
//!
//! Every step of a command hands it to another thread: the connection's task, the
//! journal's writer, the module's agent, the writer again, the connection. Each
//! hand-off wakes a thread, and on a busy machine a woken thread can wait for the
//! rest of another thread's slice first: Linux's EEVDF scheduler (6.6 on) gives
//! every task the kernel's base slice × (1 + log₂ CPUs, CPUs counted up to 8):
//! 1.4 ms on the 2-CPU machine of docs/benchmarks.md (`se.slice` in `/proc/*/sched`),
//! so one command at a time spreads from a p50 near 1 ms to a p99 several times it
//! (`bench control`, docs/benchmarks.md).
//!
//! Since Linux 6.12 a normal (`SCHED_OTHER`) thread may ask for a shorter slice
//! (`sched_setattr`'s `sched_runtime`, 100 µs to 100 ms, no privilege needed): its
//! virtual deadline comes sooner, so it runs sooner after a wake-up and in shorter
//! turns. Its share of the CPU does not change (that is its weight, its nice value).
//! Older kernels accept the call and keep their slice; the start-up log says which.
//!
//! It is a trade: the runtime's workers also carry the data plane's tasks, and
//! there short slices gained nothing; the paced p99 against
//! `solana-tpu-client-next` was, if anything, a little worse. So a node with a
//! sender keeps the kernel's slice unless configured otherwise
//! ([`crate::config::Config::sched_slice_us`]).
//!
//! The slice is a process-wide setting ([`configure`]) that each thread takes for
//! itself ([`apply_here`]): `gw-sidecar`'s main thread before any other starts (so
//! every later thread inherits it), and, for a sidecar embedded in another process
//! (tests, benchmarks), the runtime's threads when they start ([`runtime`]), the
//! journal's writer and the hot path's threads. A slice of 0 asks nothing: a thread
//! keeps what it inherited, usually the kernel's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The slice asked for, in nanoseconds; 0 asks nothing.
static SLICE_NS: AtomicU64 = AtomicU64::new(0);

/// The slices Linux accepts for a normal thread.
pub const RANGE_US: std::ops::RangeInclusive<u64> = 100..=100_000;
/// `sched_slice_us` on a node without a sender: Linux's shortest.
pub const DEFAULT_US: u64 = 100;

/// What a thread runs with after [`apply_here`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// Nothing asked (a slice of 0, or not Linux).
    Untouched,
    /// The kernel runs this thread with this slice.
    Short(Duration),
    /// The kernel took the request and kept its own slice (Linux before 6.12).
    KernelDefault,
    /// The thread runs under another policy than `SCHED_OTHER` (real-time, batch or
    /// idle, set by an operator): left as it is.
    OtherPolicy(u32),
}

impl std::fmt::Display for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slice::Untouched => f.write_str("the kernel's (none asked)"),
            Slice::Short(d) => write!(f, "{} µs", d.as_micros()),
            Slice::KernelDefault => {
                f.write_str("the kernel's (custom slices need Linux 6.12 or later)")
            }
            Slice::OtherPolicy(p) => write!(f, "left alone (scheduling policy {p})"),
        }
    }
}

/// Sets the slice the sidecar's threads ask for; `0` asks nothing. Call before
/// starting threads (it does not change running ones).
pub fn configure(slice_us: u64) {
    SLICE_NS.store(slice_us.saturating_mul(1_000), Ordering::Relaxed);
}

/// Asks for the configured slice for the calling thread.
pub fn apply_here() -> std::io::Result<Slice> {
    match SLICE_NS.load(Ordering::Relaxed) {
        0 => Ok(Slice::Untouched),
        ns => imp::set(0, ns),
    }
}

/// Sets `slice_us` (0: back to the kernel's) on every thread of this process now,
/// and on threads the runtime starts later: for a benchmark that measures both in
/// one run. Returns how many threads took it.
#[doc(hidden)]
pub fn set_process(slice_us: u64) -> std::io::Result<usize> {
    configure(slice_us);
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = e?.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended meanwhile is not an error.
        if imp::set(tid, slice_us.saturating_mul(1_000)).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// A multi-threaded tokio runtime whose threads (workers and the blocking pool)
/// take the configured slice when they start.
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        b.worker_threads(n);
    }
    b.enable_all()
        .on_thread_start(|| {
            // Logged once, by the main thread, at start; a thread that fails runs
            // with the slice it inherited, as before.
            let _ = apply_here();
        })
        .build()
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod imp {
    use super::Slice;
    use std::time::Duration;

    const SCHED_OTHER: u32 = 0;
    /// `SCHED_ATTR_SIZE_VER0`: the fields `libc::sched_attr` has.
    const SIZE: u32 = 48;
    const _: () = assert!(std::mem::size_of::<libc::sched_attr>() == SIZE as usize);
    /// Kept as an operator set it (systemd's `CPUSchedulingResetOnFork=`).
    const RESET_ON_FORK: u64 = libc::SCHED_FLAG_RESET_ON_FORK as u64;

    fn attr() -> libc::sched_attr {
        libc::sched_attr {
            size: 0,
            sched_policy: 0,
            sched_flags: 0,
            sched_nice: 0,
            sched_priority: 0,
            sched_runtime: 0,
            sched_deadline: 0,
            sched_period: 0,
        }
    }

    /// Thread `tid`'s attributes (0: the calling thread).
    pub(super) fn get(tid: libc::pid_t) -> std::io::Result<libc::sched_attr> {
        let mut a = attr();
        // SAFETY: sched_getattr(2) writes at most `SIZE` bytes into `a`, a live
        // `sched_attr` of that size; `tid` is only a number to the kernel.
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                tid,
                std::ptr::addr_of_mut!(a),
                SIZE,
                0,
            )
        };
        if r == 0 {
            Ok(a)
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Asks for slice `ns` (0: the kernel's) for thread `tid` (0: the calling one).
    pub(super) fn set(tid: libc::pid_t, ns: u64) -> std::io::Result<Slice> {
        let mut a = get(tid)?;
        if a.sched_policy != SCHED_OTHER {
            return Ok(Slice::OtherPolicy(a.sched_policy));
        }
        // The policy and nice value as they are; only the slice changes.
        a.size = SIZE;
        a.sched_flags &= RESET_ON_FORK;
        a.sched_runtime = ns;
        // SAFETY: sched_setattr(2) reads `a.size` bytes from `a`, a live,
        // initialised `sched_attr`; `tid` is only a number to the kernel.
        let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, std::ptr::addr_of!(a), 0) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Linux 6.12+ reports a normal thread's slice here; older kernels 0.
        Ok(match get(tid)?.sched_runtime {
            0 => Slice::KernelDefault,
            _ if ns == 0 => Slice::Untouched,
            s => Slice::Short(Duration::from_nanos(s)),
        })
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::Slice;

    pub(super) fn set(_tid: i32, _ns: u64) -> std::io::Result<Slice> {
        Ok(Slice::Untouched)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The setting is process-wide: one test at a time changes it.
    static SETTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        SETTING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this kernel has custom slices (6.12); says so when it has not, so a
    /// run on an older kernel shows what it did not test.
    fn custom_slices(test: &str) -> bool {
        let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut it = r
            .trim()
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        let yes = (a, b) >= (6, 12);
        if !yes {
            eprintln!(
                "{test}: skipped, kernel {} has no custom slices (6.12)",
                r.trim()
            );
        }
        yes
    }

    fn slice_now() -> u64 {
        imp::get(0).expect("sched_getattr").sched_runtime
    }

    #[test]
    fn a_thread_takes_the_configured_slice_and_its_own_threads_inherit_it() {
        let _one = one_at_a_time();
        // Its own thread: the kernel's state is per thread, so nothing here leaks
        // into other tests' threads.
        std::thread::spawn(|| {
            configure(0);
            assert_eq!(apply_here().expect("untouched"), Slice::Untouched);
            configure(250);
            let got = apply_here().expect("sched_setattr");
            configure(0);
            if !custom_slices("a_thread_takes_the_configured_slice") {
                assert_eq!(got, Slice::KernelDefault);
                return;
            }
            assert_eq!(got, Slice::Short(Duration::from_micros(250)));
            assert_eq!(slice_now(), 250_000);
            // A thread it starts runs with it too.
            let child = std::thread::spawn(slice_now).join().expect("join");
            assert_eq!(child, 250_000);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn a_benchmark_sets_every_thread_of_the_process_and_back() {
        if !custom_slices("a_benchmark_sets_every_thread_of_the_process_and_back") {
            return;
        }
        let _one = one_at_a_time();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (back, read) = std::sync::mpsc::channel();
        let other = std::thread::spawn(move || {
            while rx.recv().is_ok() {
                let _ = back.send(slice_now());
            }
        });
        let kernels = slice_now();
        assert!(set_process(400).expect("set") >= 2);
        tx.send(()).expect("send");
        assert_eq!(read.recv().expect("read"), 400_000);
        // Threads started from now on take it too.
        assert_eq!(
            std::thread::spawn(apply_here)
                .join()
                .expect("join")
                .expect("set"),
            Slice::Short(Duration::from_micros(400))
        );
        assert!(set_process(0).expect("reset") >= 2);
        tx.send(()).expect("send");
        assert_eq!(read.recv().expect("read"), kernels);
        assert_eq!(apply_here().expect("untouched"), Slice::Untouched);
        drop(tx);
        other.join().expect("join");
    }

    #[test]
    fn the_runtimes_threads_take_the_slice() {
        if !custom_slices("the_runtimes_threads_take_the_slice") {
            return;
        }
        // Held throughout: another test's `set_process` would change these threads.
        let _one = one_at_a_time();
        configure(300);
        let rt = runtime(Some(1)).expect("runtime");
        // A worker and a blocking thread, both started by the runtime.
        let (worker, blocking) = rt.block_on(async {
            let w = tokio::spawn(async { slice_now() }).await.expect("task");
            let b = tokio::task::spawn_blocking(slice_now).await.expect("task");
            (w, b)
        });
        configure(0);
        assert_eq!((worker, blocking), (300_000, 300_000));
    }
}
