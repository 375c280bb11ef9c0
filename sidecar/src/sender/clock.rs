//! The hedged send's clock: the system's monotonic clock (`std::time::Instant`,
//! which tokio's timer needs) read through the CPU's counter (`quanta`).
//!
//! Why: `bench sender` showed each system-clock read inside a send costing points
//! of its rate (≈ 23 ns a read here against ≈ 10 ns for the counter). The hedged
//! send read it twice: relay armed, median 0.71× of raw quinn over 13 runs, 0.75×
//! with this clock (`docs/benchmarks.md`, *The hedged send's clock*).
//!
//! The counter's rate is calibrated once at start, while NTP may slew the system
//! clock by up to 500 ppm, so the clock re-reads the system clock every
//! [`REANCHOR`] and corrects the difference: a time it gives is within the drift
//! of one interval (≤ 50 µs at NTP's limit, in practice a few µs) of the system
//! clock's, never seconds off after days up. Timer deadlines and latencies
//! computed from it are therefore the system clock's.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the clock checks itself against the system clock.
pub const REANCHOR: Duration = Duration::from_millis(100);

/// The system's monotonic clock, read through the CPU's counter.
#[derive(Debug)]
pub struct SendClock {
    /// The system clock's time at `base_q`.
    base: Instant,
    /// The counter's time at `base`.
    base_q: quanta::Instant,
    /// What the counter's time after `base_q` is off the system clock's, ns (the
    /// system's minus the counter's), as last measured.
    skew_ns: AtomicI64,
    /// When that was measured: ns of the counter after `base_q`.
    anchored_ns: AtomicU64,
}

impl Default for SendClock {
    fn default() -> Self {
        Self::new()
    }
}

impl SendClock {
    /// A clock anchored now. The counter calibrates against the system clock on
    /// its first use in the process (up to 200 ms): call this at start, not in a
    /// send.
    pub fn new() -> SendClock {
        let base_q = quanta::Instant::now();
        SendClock {
            base: Instant::now(),
            base_q,
            skew_ns: AtomicI64::new(0),
            anchored_ns: AtomicU64::new(0),
        }
    }

    /// The time now, on the system's monotonic clock.
    pub fn now(&self) -> Instant {
        let since = self.since_base(quanta::Instant::now());
        if since.saturating_sub(self.anchored_ns.load(Ordering::Relaxed)) >= REANCHOR_NS {
            return self.reanchor();
        }
        let skew = self.skew_ns.load(Ordering::Relaxed);
        self.base + Duration::from_nanos(since.saturating_add_signed(skew))
    }

    /// Reads the system clock, records how far the counter is off it, and returns it.
    /// Concurrent re-anchors are harmless: each stores a measurement of the same
    /// difference.
    fn reanchor(&self) -> Instant {
        let now = Instant::now();
        let since = self.since_base(quanta::Instant::now());
        let real = now.saturating_duration_since(self.base).as_nanos();
        let real = u64::try_from(real).unwrap_or(u64::MAX);
        let skew = i64::try_from(i128::from(real) - i128::from(since)).unwrap_or(0);
        self.skew_ns.store(skew, Ordering::Relaxed);
        self.anchored_ns.store(since, Ordering::Relaxed);
        now
    }

    /// ns of the counter from `base_q` to `q` (u64 ns: 584 years).
    fn since_base(&self, q: quanta::Instant) -> u64 {
        let d = q.saturating_duration_since(self.base_q).as_nanos();
        u64::try_from(d).unwrap_or(u64::MAX)
    }
}

const REANCHOR_NS: u64 = REANCHOR.as_nanos() as u64;

#[cfg(test)]
mod tests {
    use super::*;

    /// How far `clock` is from the system clock now, in µs (either side).
    fn off_us(clock: &SendClock) -> u128 {
        let before = Instant::now();
        let t = clock.now();
        let after = Instant::now();
        if t < before {
            (before - t).as_micros()
        } else {
            t.saturating_duration_since(after).as_micros()
        }
    }

    #[test]
    fn it_reads_the_system_clock() {
        let clock = SendClock::new();
        for _ in 0..5 {
            assert!(off_us(&clock) < 1_000, "{} µs off", off_us(&clock));
            std::thread::sleep(Duration::from_millis(30));
        }
        // Monotonic between re-anchors.
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
    }

    #[test]
    fn a_skewed_clock_corrects_itself_within_one_interval() {
        // As if the counter had drifted a whole second from the system clock.
        let clock = SendClock::new();
        clock.reanchor();
        clock.skew_ns.fetch_add(1_000_000_000, Ordering::Relaxed);
        let off = off_us(&clock);
        assert!(
            off > 900_000,
            "the skew shows before the interval: {off} µs"
        );
        std::thread::sleep(REANCHOR + Duration::from_millis(10));
        let off = off_us(&clock);
        assert!(off < 1_000, "{off} µs off after re-anchoring");
        assert!(off_us(&clock) < 1_000);
    }
}
